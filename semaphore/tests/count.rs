//! The counting path on its own: recorded events in, fires out, the same on
//! every replay.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use jobz_core::gates::{GateBook, GateEffect};
use jobz_core::pipeline::{GateReason, Origin};
use jobz_core::protocol::{GateEvent, GateEventKind};
use proptest::prelude::*;
use semaphore::count::{self, Counter};

const FILE: &str = r#"
jobs:
  shard:
    command: "echo {date} {shard}"
    params:
      date: { required: true }
      shard: { required: true }
  other:
    command: "true"
  merge:
    command: "echo {date}"
    params:
      date: { required: true }
  notify:
    command: "echo {what}"
    params:
      what: { required: true }
gates:
  shards_done:
    after: [ shard ]
    count: 10
    key: "{date}"
    then: { job: merge, params: { date: "{date}" } }
    timeout: 10s
    on_timeout: { job: notify, params: { what: "gate {gate} {key} timed out" } }
    on_failure: { job: notify, params: { what: "gate {gate} {key} failed" } }
  by_run:
    after: [ other ]
    then: { job: notify, params: { what: "run {run_id} done" } }
"#;

fn file() -> config::JobFile {
    config::parse("count.yaml", FILE).unwrap_or_else(|e| panic!("{e}"))
}

fn t0() -> DateTime<Utc> {
    DateTime::from_timestamp_millis(1_700_000_000_000).unwrap()
}

fn shard(seq: u64, date: &str, shard: u32, kind: GateEventKind, at_ms: i64) -> GateEvent {
    GateEvent {
        seq,
        kind,
        job_id: format!("job-{seq}"),
        job_name: "shard".into(),
        params: BTreeMap::from([("date".to_string(), date.to_string()), ("shard".into(), shard.to_string())]),
        run_id: format!("run-{date}"),
        attempt: 1,
        at: t0() + Duration::milliseconds(at_ms),
    }
}

/// The (gate, key, reason, job name) of each job the effects start.
fn starts(effects: &[GateEffect]) -> Vec<(String, String, GateReason, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            GateEffect::Start(job) => match &job.origin {
                Origin::Gate { gate, key, reason } => Some((gate.clone(), key.clone(), *reason, job.job_name.clone())),
                _ => None,
            },
            GateEffect::KeyError { .. } => None,
        })
        .collect()
}

#[test]
fn ten_shards_of_a_key_fire_then_once_and_nine_never() {
    let file = file();
    let mut counter = Counter::new();
    let mut effects = Vec::new();
    for i in 0..9 {
        effects.extend(counter.event(&file, &shard(i, "d1", i as u32, GateEventKind::Succeeded, i as i64)));
    }
    assert!(starts(&effects).is_empty(), "nine of ten fire nothing: {effects:?}");
    let state = &counter.book().keys("shards_done").unwrap()["d1"];
    assert_eq!(state.progress(&file.gates["shards_done"]), (9, 10));

    effects = counter.event(&file, &shard(9, "d1", 9, GateEventKind::Succeeded, 9));
    assert_eq!(starts(&effects), [("shards_done".into(), "d1".into(), GateReason::Then, "merge".into())]);
    let GateEffect::Start(job) = &effects[0] else { unreachable!() };
    assert_eq!(job.params["date"], "d1");
    assert_eq!(job.run_id.as_deref(), Some("run-d1"));
    assert_eq!(job.parent_id.as_deref(), Some("job-9"), "the job that completed the key");
    // An eleventh success, or the same job counted again, fires nothing more.
    assert!(counter.event(&file, &shard(10, "d1", 10, GateEventKind::Succeeded, 10)).is_empty());
    assert!(counter.event(&file, &shard(9, "d1", 9, GateEventKind::Succeeded, 11)).is_empty());
}

#[test]
fn two_keys_are_counted_apart() {
    let file = file();
    let mut events = Vec::new();
    for i in 0..10u64 {
        events.push(shard(2 * i, "a", i as u32, GateEventKind::Succeeded, i as i64));
        if i < 9 {
            events.push(shard(2 * i + 1, "b", i as u32, GateEventKind::Succeeded, i as i64));
        }
    }
    let (_, effects) = count::rebuild(&file, &events);
    assert_eq!(starts(&effects), [("shards_done".into(), "a".into(), GateReason::Then, "merge".into())]);
}

#[test]
fn an_incomplete_key_times_out_as_of_the_next_event_or_the_clock_and_the_same_on_replay() {
    let file = file();
    let mut counter = Counter::new();
    assert!(counter.event(&file, &shard(0, "late", 0, GateEventKind::Succeeded, 0)).is_empty());
    // The clock before the deadline gives up nothing; at the deadline it does.
    assert!(counter.expire(&file, t0() + Duration::milliseconds(9_999)).is_empty());
    let effects = counter.expire(&file, t0() + Duration::seconds(10));
    assert_eq!(starts(&effects), [("shards_done".into(), "late".into(), GateReason::Timeout, "notify".into())]);
    let GateEffect::Start(job) = &effects[0] else { unreachable!() };
    assert_eq!(job.params["what"], "gate shards_done late timed out");
    assert!(counter.expire(&file, t0() + Duration::seconds(20)).is_empty(), "once");

    // A replay without the clock: the key is given up when an event recorded after its deadline is counted.
    let mut events = vec![shard(0, "late", 0, GateEventKind::Succeeded, 0)];
    events.extend((1..10).map(|i| shard(i, "late", i as u32, GateEventKind::Succeeded, 10_000 + i as i64)));
    let (_, replayed) = count::rebuild(&file, &events);
    assert_eq!(starts(&replayed), [("shards_done".into(), "late".into(), GateReason::Timeout, "notify".into())]);
}

#[test]
fn a_shard_that_fails_for_good_fires_on_failure_once_and_the_key_does_not_time_out() {
    let file = file();
    let mut counter = Counter::new();
    counter.event(&file, &shard(0, "f", 0, GateEventKind::Succeeded, 0));
    let effects = counter.event(&file, &shard(1, "f", 1, GateEventKind::FailedForGood, 1));
    assert_eq!(starts(&effects), [("shards_done".into(), "f".into(), GateReason::Failure, "notify".into())]);
    assert!(counter.event(&file, &shard(2, "f", 2, GateEventKind::FailedForGood, 2)).is_empty(), "once per key");
    assert!(counter.expire(&file, t0() + Duration::hours(1)).is_empty(), "a failed key does not time out as well");
}

#[test]
fn a_key_that_cannot_be_filled_is_an_error_on_that_event_not_a_crash() {
    let file = file();
    let mut counter = Counter::new();
    let mut event = shard(0, "x", 0, GateEventKind::Succeeded, 0);
    event.params.remove("date");
    let effects = counter.event(&file, &event);
    assert!(
        matches!(&effects[..], [GateEffect::KeyError { gate, job_id, message }]
            if gate == "shards_done" && job_id == "job-0" && message.contains("date")),
        "{effects:?}"
    );
    // Jobs no gate waits for, and jobs the file does not know, count for nothing.
    let mut unknown = shard(1, "x", 0, GateEventKind::Succeeded, 0);
    unknown.job_name = "not_in_the_file".into();
    assert!(counter.event(&file, &unknown).is_empty());
    assert!(counter.book().keys("shards_done").is_none_or(|k| k.is_empty()));
}

#[test]
fn a_gate_without_a_key_counts_by_run() {
    let file = file();
    let mut counter = Counter::new();
    let mut event = shard(0, "x", 0, GateEventKind::Succeeded, 0);
    event.job_name = "other".into();
    event.params.clear();
    let effects = counter.event(&file, &event);
    assert_eq!(starts(&effects), [("by_run".into(), "run-x".into(), GateReason::Then, "notify".into())]);
}

/// The reference: a plain book, given up as of each event before counting it.
fn reference(file: &config::JobFile, events: &[GateEvent]) -> Vec<GateEffect> {
    let mut book = GateBook::new();
    let mut effects = Vec::new();
    for event in events {
        effects.extend(book.expire(file, event.at));
        effects.extend(book.observe(file, &event.upstream(), event.at));
    }
    effects
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The counter's shortcut (no scan until a deadline is due) changes nothing:
    /// any history gives the effects of the plain book, and a replay gives them again.
    #[test]
    fn any_history_gives_the_reference_effects_on_every_replay(
        steps in prop::collection::vec((0..4usize, 0..12u32, 0..6_000i64, prop::bool::weighted(0.1)), 0..120)
    ) {
        let file = file();
        let mut at = 0;
        let events: Vec<GateEvent> = steps.iter().enumerate().map(|(seq, (key, shard_no, gap, failed))| {
            at += gap;
            let kind = if *failed { GateEventKind::FailedForGood } else { GateEventKind::Succeeded };
            shard(seq as u64, &format!("k{key}"), *shard_no, kind, at)
        }).collect();
        let expected = reference(&file, &events);
        let (first, effects) = count::rebuild(&file, &events);
        prop_assert_eq!(&effects, &expected);
        let (_, again) = count::rebuild(&file, &events);
        prop_assert_eq!(&again, &expected);
        // And the clock after the last event gives up the same keys either way.
        let mut book = GateBook::new();
        for event in &events {
            book.expire(&file, event.at);
            book.observe(&file, &event.upstream(), event.at);
        }
        let end = t0() + Duration::milliseconds(at) + Duration::seconds(11);
        let mut counter = first;
        prop_assert_eq!(counter.expire(&file, end), book.expire(&file, end));
    }
}
