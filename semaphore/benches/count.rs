//! How fast one semaphore counts upstream successes, and how long a restarted
//! semaphore takes to rebuild its counts from 100,000 recorded successes.
//!
//! `cargo bench -p semaphore --bench count` (release build). The events are
//! synthetic: 10 shards × 10,000 keys of one gate (`count: 10`, keyed by
//! date), in shard-major order so that all 10,000 keys are open at once, the
//! hard case. Counting goes through `semaphore::count::Counter`, the path the
//! live session uses, and each effect becomes the `Fire` the session would
//! send. "rebuild from pages" adds what a rebuild does on top of counting:
//! decoding the 100 pages of 1000 events the broker sends. What it leaves out
//! is the broker's side (reading the events from SQLite) and the network.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::DateTime;
use jobz_core::gates::GateEffect;
use jobz_core::protocol::{self, Events, Fire, GateEvent, GateEventKind, ToWorker};
use semaphore::count::{self, Counter};

const SHARDS: u64 = 10;
const KEYS: u64 = 10_000;
const RUNS: usize = 5;

const FILE: &str = r#"
jobs:
  shard:
    command: "echo {date} {shard}"
    params:
      date: { required: true }
      shard: { required: true }
  merge:
    command: "echo {date}"
    params:
      date: { required: true }
gates:
  all_shards_done:
    after: [ shard ]
    count: 10
    key: "{date}"
    then: { job: merge, params: { date: "{date}" } }
    timeout: 6h
"#;

fn events() -> Vec<GateEvent> {
    let start = 1_700_000_000_000i64;
    let mut events = Vec::with_capacity((SHARDS * KEYS) as usize);
    for shard in 0..SHARDS {
        for key in 0..KEYS {
            let seq = shard * KEYS + key;
            events.push(GateEvent {
                seq,
                kind: GateEventKind::Succeeded,
                job_id: format!("0190a5c4-0000-7000-8000-{seq:012}"),
                job_name: "shard".into(),
                params: BTreeMap::from([
                    ("date".to_string(), format!("k{key:05}")),
                    ("shard".into(), shard.to_string()),
                ]),
                run_id: format!("0190a5c4-0000-7000-9000-{key:012}"),
                attempt: 1,
                at: DateTime::from_timestamp_millis(start + seq as i64).expect("a valid time"),
            });
        }
    }
    events
}

fn fires(effects: Vec<GateEffect>) -> usize {
    effects
        .into_iter()
        .filter_map(|e| match e {
            GateEffect::Start(job) => Fire::from_new_job(&job),
            GateEffect::KeyError { message, .. } => panic!("{message}"),
        })
        .count()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn main() {
    let file = config::parse("bench.yaml", FILE).unwrap_or_else(|e| panic!("{e}"));
    let events = events();
    let n = events.len();

    // Counting, event by event, as the live session does.
    let mut counting = Vec::new();
    for _ in 0..RUNS {
        let mut counter = Counter::new();
        let mut fired = 0;
        let started = Instant::now();
        for event in &events {
            fired += fires(counter.event(&file, event));
        }
        counting.push(started.elapsed());
        assert_eq!(fired as u64, KEYS, "every key fires once");
    }

    // A rebuild: the same, over the whole history at once.
    let mut rebuilding = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let (counter, effects) = count::rebuild(&file, &events);
        let fired = fires(effects);
        rebuilding.push(started.elapsed());
        assert_eq!(fired as u64, KEYS);
        assert_eq!(counter.book().keys("all_shards_done").map(|k| k.len()), Some(KEYS as usize));
    }

    // A rebuild from the wire: decode the pages the broker sends, then count.
    let mut pages = Vec::new();
    let mut from = 0;
    loop {
        let built =
            Events::page(from, events.iter().skip(from as usize).take(protocol::limits::EVENTS_PAGE_MAX).cloned());
        if built.page.events.is_empty() {
            break;
        }
        from = built.page.next;
        pages.push(protocol::try_encode(&ToWorker::Events(built.page)).expect("a page fits"));
    }
    let mut from_pages = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let mut counter = Counter::new();
        let mut fired = 0;
        for frames in &pages {
            let Ok(ToWorker::Events(page)) = protocol::decode_to_worker(frames) else { panic!("a page decodes") };
            for event in &page.events {
                fired += fires(counter.event(&file, event));
            }
        }
        from_pages.push(started.elapsed());
        assert_eq!(fired as u64, KEYS);
    }

    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let (c, r, p) = (median(counting), median(rebuilding), median(from_pages));
    println!("semaphore counting benchmark: {n} success events ({SHARDS} shards x {KEYS} keys), median of {RUNS} runs");
    println!("  counting, event by event     {:>10.0} events/s  ({c:.2?} for {n})", rate(c));
    println!("  rebuild from {n} events   {r:>10.2?}  ({:.0} events/s)", rate(r));
    println!("  rebuild from {} pages (decode + count) {p:.2?}  ({:.0} events/s)", pages.len(), rate(p));
    let target = 10_000.0;
    if rate(c) < target {
        println!("  BELOW TARGET: {target} events/s");
    }
}
