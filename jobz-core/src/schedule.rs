//! When a schedule fires: the instants of its cron expression in its time
//! zone, which of them a window of time makes due, and a schedule's identity.
//!
//! Pure: the caller says what "now" is and which window it looks at. The
//! broker keeps the durable record of what fired (one job per schedule and
//! instant) and hands each window here exactly once.
//!
//! An *instant* is a real point in time (UTC, whole seconds). The cron
//! expression is read on the wall clock of the schedule's time zone, and
//! [`croner`] turns wall clock times into instants. Around daylight saving
//! changes it follows the Open Cron Pattern Specification:
//!
//! - A **fixed time of day** (second, minute and hour each a single value, e.g.
//!   `30 2 * * *`) fires once a day. When that time is skipped (spring
//!   forward) it fires once at the first real instant after the jump, as Vixie
//!   cron does; when it is repeated (fall back) it fires once, at the first of
//!   the two instants.
//! - **Any other expression** (a `*`, step, range or list in the second,
//!   minute or hour, e.g. `0 * * * *`, `*/15 * * * *`, `0,30 2 * * *`) follows
//!   real time: wall clock times in a skipped hour do not exist and do not
//!   fire; those in a repeated hour fire at each of their real instants. So an
//!   hourly schedule fires every real hour, 23 times on the spring-forward day
//!   and 25 times on the fall-back day.
//!
//! Either way every real instant fires at most once.

use chrono::{DateTime, SubsecRound, Utc};
use config::{CatchUp, Schedule};

/// How the caller watched a window of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Watched all along: every instant in the window fires.
    Live,
    /// Not watched (the broker was down, or its clock jumped): the
    /// instants in it were missed, and the schedule's `catch_up` decides.
    CatchUp,
}

/// What a window makes due.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// The instants to fire, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// The window is dealt with up to here: the next one starts after it. It
    /// is the window's end, or the last instant listed when `max` cut it short.
    pub checked_through: DateTime<Utc>,
    /// The latest instant of a catch-up window that does not fire (`catch_up: none`).
    pub missed: Option<DateTime<Utc>>,
}

/// The instants due in the window `(after, through]`, at most `max` of them (at least one).
pub fn due(schedule: &Schedule, after: DateTime<Utc>, through: DateTime<Utc>, window: Window, max: usize) -> Due {
    if through <= after {
        return Due { fire: Vec::new(), checked_through: after, missed: None };
    }
    match (window, schedule.catch_up) {
        (Window::Live, _) => {
            let max = max.max(1);
            let fire = instants(schedule, after, through, max);
            let checked_through = match fire.last() {
                Some(last) if fire.len() == max => *last,
                _ => through,
            };
            Due { fire, checked_through, missed: None }
        }
        (Window::CatchUp, CatchUp::Latest) => Due {
            fire: latest_in(schedule, after, through).into_iter().collect(),
            checked_through: through,
            missed: None,
        },
        (Window::CatchUp, CatchUp::None) => {
            Due { fire: Vec::new(), checked_through: through, missed: latest_in(schedule, after, through) }
        }
    }
}

/// The first instant strictly after `t`, or `None` when the expression has no
/// more (e.g. `0 0 30 2 *`, the 30th of February).
pub fn next_after(schedule: &Schedule, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    // Instants are whole seconds: every one after the second `t` is in is after `t`.
    let local = t.trunc_subsecs(0).with_timezone(&schedule.timezone);
    let next = schedule.cron.pattern.find_next_occurrence(&local, false).ok()?.with_timezone(&Utc);
    // croner answers strictly later times; anything else would loop forever in a caller.
    (next > t).then_some(next)
}

/// The instants in `(after, through]`, oldest first, at most `max`.
pub fn instants(schedule: &Schedule, after: DateTime<Utc>, through: DateTime<Utc>, max: usize) -> Vec<DateTime<Utc>> {
    let mut found = Vec::new();
    let mut cursor = after;
    while found.len() < max {
        match next_after(schedule, cursor) {
            Some(next) if next <= through => {
                found.push(next);
                cursor = next;
            }
            _ => break,
        }
    }
    found
}

/// The latest instant in `(after, through]`, if there is one.
pub fn latest_in(schedule: &Schedule, after: DateTime<Utc>, through: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if through <= after {
        return None;
    }
    let local = through.trunc_subsecs(0).with_timezone(&schedule.timezone);
    let latest = schedule.cron.pattern.find_previous_occurrence(&local, true).ok()?.with_timezone(&Utc);
    (latest > after && latest <= through).then_some(latest)
}

/// A schedule's identity: its job, cron expression, time zone and params.
/// Editing any of them makes a new schedule, with its own record of what
/// fired; `catch_up` is how missed instants are treated, not which instants
/// there are, so it is left out. Runs of spaces in the expression do not count.
pub fn identity(job_name: &str, schedule: &Schedule) -> String {
    let cron: Vec<&str> = schedule.cron.source.split_whitespace().collect();
    // Written out field by field, so the text never depends on how serde_json orders maps.
    let text = |s: &str| serde_json::Value::from(s).to_string();
    let params: Vec<String> = schedule.params.iter().map(|(k, v)| format!("{}:{}", text(k), text(v))).collect();
    format!(
        "{{\"job\":{},\"cron\":{},\"timezone\":{},\"params\":{{{}}}}}",
        text(job_name),
        text(&cron.join(" ")),
        text(schedule.timezone.name()),
        params.join(",")
    )
}

/// `catch_up` as the job file spells it.
pub fn catch_up_name(catch_up: CatchUp) -> &'static str {
    match catch_up {
        CatchUp::Latest => "latest",
        CatchUp::None => "none",
    }
}
