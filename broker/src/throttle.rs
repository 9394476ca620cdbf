//! Mesh-wide limits on dispatch: `concurrency: N` (at most N jobs of a name
//! running across every worker) and `rate: N/s` (at most N dispatches of a
//! name per second, also `/m` and `/h`).
//!
//! Only the broker's loop sees every worker, so these limits are enforced
//! there: before handing a job of a name to a worker, the loop asks
//! [`Throttle::admits`]. A name held back is skipped, not waited on, so the
//! jobs of other names keep flowing past a limited one. Jobs over a limit stay
//! in their queue, in order, and the job view says which limit holds them.
//!
//! Pure: time is an argument (a monotonic [`Instant`]), so the limits are
//! tested without sleeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use config::JobFile;

/// What holds the jobs of a name back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Hold {
    /// `concurrency` or `rate`.
    pub limit: &'static str,
    /// For people: the limit and where it stands.
    pub message: String,
}

/// The rate limit of one name as a "generic cell rate" (GCRA): one dispatch
/// per `interval`, no bursts. `next` is when the next dispatch is allowed.
#[derive(Debug, Clone)]
struct Rate {
    interval: Duration,
    /// `5/s`
    text: String,
    /// `5 per second`
    spelled: String,
    next: Option<Instant>,
}

/// A count per job name, holding only the names with a count above zero.
#[derive(Debug, Default)]
pub struct NameCounts(HashMap<String, u32>);

impl NameCounts {
    pub fn add(&mut self, name: &str) {
        match self.0.get_mut(name) {
            Some(n) => *n += 1,
            None => {
                self.0.insert(name.to_string(), 1);
            }
        }
    }

    pub fn sub(&mut self, name: &str) {
        if let Some(n) = self.0.get_mut(name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.0.remove(name);
            }
        }
    }

    pub fn get(&self, name: &str) -> u32 {
        self.0.get(name).copied().unwrap_or(0)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, u32)> {
        self.0.iter().map(|(name, n)| (name, *n))
    }
}

#[derive(Debug, Default)]
pub struct Throttle {
    /// `concurrency:` per name (only names that have one).
    caps: HashMap<String, u32>,
    /// Running attempts per name, whatever their limits (a broadcast counts once).
    running: NameCounts,
    rates: HashMap<String, Rate>,
}

impl Throttle {
    pub fn new(file: &JobFile) -> Throttle {
        let mut throttle = Throttle::default();
        for (name, def) in &file.jobs {
            if let Some(cap) = def.concurrency {
                throttle.caps.insert(name.clone(), cap);
            }
            if let Some(rate) = &def.rate {
                if rate.count > 0 {
                    let interval = rate.per / rate.count;
                    let (unit, word) = per_unit(rate.per);
                    let text = format!("{}/{unit}", rate.count);
                    let spelled = format!("{} per {word}", rate.count);
                    throttle.rates.insert(name.clone(), Rate { interval, text, spelled, next: None });
                }
            }
        }
        throttle
    }

    /// Whether the name has any limit at all.
    pub fn limits(&self, name: &str) -> bool {
        self.caps.contains_key(name) || self.rates.contains_key(name)
    }

    /// `Ok` when a job of `name` may be dispatched at `now`; else what holds it.
    pub fn admits(&self, name: &str, now: Instant) -> Result<(), Hold> {
        if let Some(&cap) = self.caps.get(name) {
            let running = self.running(name);
            if running >= cap {
                return Err(Hold {
                    limit: "concurrency",
                    message: format!("concurrency {cap}: {running} of {cap} running across the mesh"),
                });
            }
        }
        if let Some(rate) = self.rates.get(name) {
            if rate.next.is_some_and(|next| next > now) {
                return Err(Hold {
                    limit: "rate",
                    message: format!("rate {}: dispatched at most {} across the mesh", rate.text, rate.spelled),
                });
            }
        }
        Ok(())
    }

    /// A job of `name` was handed out at `now`: it counts against the rate.
    pub fn dispatched(&mut self, name: &str, now: Instant) {
        if let Some(rate) = self.rates.get_mut(name) {
            // Late wake-ups are not made up for: at most one dispatch per interval, ever.
            let from = rate.next.map_or(now, |next| next.max(now));
            rate.next = Some(from + rate.interval);
        }
    }

    /// An attempt of `name` holds a running slot (dispatched, or recovered as running).
    pub fn started(&mut self, name: &str) {
        self.running.add(name);
    }

    /// An attempt of `name` ended or went back to the queue.
    pub fn ended(&mut self, name: &str) {
        self.running.sub(name);
    }

    /// Running attempts of each name that has any.
    pub fn running_per_name(&self) -> impl Iterator<Item = (&String, u32)> {
        self.running.iter()
    }

    pub fn running(&self, name: &str) -> u32 {
        self.running.get(name)
    }

    /// The earliest moment a rate-held name among `waiting` may go again, so the
    /// loop can wake for it instead of waiting for its next tick.
    pub fn next_wake<'a>(&self, waiting: impl Iterator<Item = &'a str>, now: Instant) -> Option<Instant> {
        waiting.filter_map(|name| self.rates.get(name)?.next.filter(|next| *next > now)).min()
    }

    /// Names with a rate limit.
    pub fn rate_limited(&self) -> impl Iterator<Item = &str> {
        self.rates.keys().map(String::as_str)
    }
}

/// How a rate's period is written and spelled (`parse_rate` makes only these three).
fn per_unit(per: Duration) -> (String, String) {
    match per.as_secs() {
        1 => ("s".into(), "second".into()),
        60 => ("m".into(), "minute".into()),
        3600 => ("h".into(), "hour".into()),
        _ => (format!("{}s", per.as_secs_f64()), format!("{:?}", per)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(yaml: &str) -> JobFile {
        match config::parse("test.yaml", yaml) {
            Ok(f) => f,
            Err(e) => panic!("test job file: {e}"),
        }
    }

    const YAML: &str = "
jobs:
  capped: { command: /bin/true, concurrency: 2 }
  paced: { command: /bin/true, rate: 5/s }
  both: { command: /bin/true, concurrency: 1, rate: 2/m }
  free: { command: /bin/true }
";

    #[test]
    fn concurrency_holds_at_the_cap_and_frees_a_slot_per_end() {
        let mut t = Throttle::new(&file(YAML));
        let now = Instant::now();
        assert!(t.admits("capped", now).is_ok());
        t.started("capped");
        t.started("capped");
        let hold = t.admits("capped", now).unwrap_err();
        assert_eq!(hold.limit, "concurrency");
        assert!(hold.message.contains("2 of 2"), "{}", hold.message);
        t.ended("capped");
        assert!(t.admits("capped", now).is_ok());
        // An end more than starts never goes below zero.
        t.ended("capped");
        t.ended("capped");
        assert_eq!(t.running("capped"), 0);
    }

    #[test]
    fn rate_allows_one_dispatch_per_interval_and_never_bursts() {
        let mut t = Throttle::new(&file(YAML));
        let start = Instant::now();
        let mut dispatched = Vec::new();
        // Ask every millisecond for 3 s: 5/s allows exactly 15, 200 ms apart.
        for ms in 0..3000u64 {
            let now = start + Duration::from_millis(ms);
            if t.admits("paced", now).is_ok() {
                t.dispatched("paced", now);
                dispatched.push(ms);
            }
        }
        assert_eq!(dispatched.len(), 15, "{dispatched:?}");
        assert!(dispatched.windows(2).all(|w| w[1] - w[0] == 200), "{dispatched:?}");
        let hold = t.admits("paced", start + Duration::from_millis(2999)).unwrap_err();
        assert_eq!(hold.limit, "rate");
        assert_eq!(hold.message, "rate 5/s: dispatched at most 5 per second across the mesh");
    }

    #[test]
    fn an_idle_rate_does_not_save_up_a_burst() {
        let mut t = Throttle::new(&file(YAML));
        let start = Instant::now();
        t.dispatched("paced", start);
        let later = start + Duration::from_secs(60);
        assert!(t.admits("paced", later).is_ok());
        t.dispatched("paced", later);
        assert!(t.admits("paced", later).is_err());
    }

    #[test]
    fn concurrency_is_checked_before_rate_and_names_are_independent() {
        let mut t = Throttle::new(&file(YAML));
        let now = Instant::now();
        t.started("both");
        t.dispatched("both", now);
        assert_eq!(t.admits("both", now).unwrap_err().limit, "concurrency");
        t.ended("both");
        let hold = t.admits("both", now).unwrap_err();
        assert_eq!(hold.limit, "rate");
        assert!(hold.message.starts_with("rate 2/m"), "{}", hold.message);
        assert!(t.admits("both", now + Duration::from_secs(30)).is_ok());
        assert!(t.admits("free", now).is_ok());
        assert!(!t.limits("free"));
        assert!(t.limits("capped") && t.limits("paced"));
    }

    #[test]
    fn next_wake_is_the_earliest_rate_held_name_among_those_waiting() {
        let mut t = Throttle::new(&file(YAML));
        let now = Instant::now();
        assert_eq!(t.next_wake(["paced", "both"].into_iter(), now), None);
        t.dispatched("paced", now);
        t.dispatched("both", now);
        assert_eq!(t.next_wake(["paced", "both"].into_iter(), now), Some(now + Duration::from_millis(200)));
        assert_eq!(t.next_wake(["both"].into_iter(), now), Some(now + Duration::from_secs(30)));
        assert_eq!(t.next_wake(["free"].into_iter(), now), None);
    }
}
