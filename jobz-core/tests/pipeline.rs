//! The pipeline semantics on their own: retries, follow-ups, gate counting.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use jobz_core::gates::{GateBook, GateEffect, UpstreamEvent};
use jobz_core::pipeline::{self, AttemptEnd, Decision, GateReason, JobFacts, Origin};
use jobz_core::Status;

const FILE: &str = r#"
jobs:
  extract:
    command: "echo {date} {category}"
    params:
      date: { required: true, pattern: '^\d{4}_\d{2}_\d{2}$' }
      category: { default: all }
      secret: { default: s3cr3t }
    retries: { max: 2, backoff: 10s }
    on_success:
      - load
      - { job: notify, params: { what: "{job_name} ok {exit_code}" } }
    on_failure: [ { job: notify, params: { what: "{job_name} {job_id} failed with {exit_code}" } } ]
  load:
    command: "echo {date}"
    params:
      date: { required: true }
  notify:
    command: "echo {what}"
    params:
      what: { required: true }
  shard:
    command: "echo {date} {shard}"
    params:
      date: { required: true }
      shard: { required: true }
  merge:
    command: "echo {date}"
    params:
      date: { required: true }
  index:
    command: "echo {date}"
    params:
      date: { required: true }
      part: {}
    unique: { key: "{job_name}:{date}:{part}:{run_id}", ttl: 1h }
gates:
  shards_done:
    after: [ shard ]
    count: 3
    key: "{date}"
    then: merge
    timeout: 1h
    on_timeout: { job: notify, params: { what: "gate {gate} {key} timed out" } }
    on_failure: { job: notify, params: { what: "gate {gate} {key} failed" } }
"#;

fn file() -> config::JobFile {
    match config::parse("pipeline.yaml", FILE) {
        Ok(f) => f,
        Err(e) => panic!("test file does not parse:\n{e}"),
    }
}

fn facts(id: &str, name: &str, params: &[(&str, &str)], attempt: u32) -> JobFacts {
    JobFacts {
        id: id.into(),
        job_name: name.into(),
        params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        run_id: "run-1".into(),
        attempt,
    }
}

fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn a_failed_attempt_retries_until_the_last_then_fires_on_failure_once() {
    let file = file();
    let def = &file.jobs["extract"];
    let failed = AttemptEnd { status: Status::Failed, exit_code: Some(3) };
    let job = facts("j1", "extract", &[("date", "2026_01_02"), ("category", "all")], 1);
    match pipeline::decide(&file, def, &job, failed, 0.0) {
        Decision::Retry { attempt: 2, delay } => assert_eq!(delay, Duration::from_secs(5)),
        other => panic!("attempt 1 of 3 should retry, got {other:?}"),
    }
    let job2 = JobFacts { attempt: 2, ..job.clone() };
    match pipeline::decide(&file, def, &job2, failed, 0.999_999) {
        Decision::Retry { attempt: 3, delay } => {
            assert!(delay > Duration::from_millis(19_900) && delay <= Duration::from_secs(20))
        }
        other => panic!("attempt 2 of 3 should retry, got {other:?}"),
    }
    let job3 = JobFacts { attempt: 3, ..job };
    let Decision::Finish { status, follow_ups, rejected } = pipeline::decide(&file, def, &job3, failed, 0.5) else {
        panic!("the last attempt must finish")
    };
    assert_eq!(status, Status::Failed);
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(follow_ups.len(), 1);
    let notify = &follow_ups[0];
    assert_eq!(notify.job_name, "notify");
    assert_eq!(notify.params, params(&[("what", "extract j1 failed with 3")]));
    assert_eq!(notify.run_id.as_deref(), Some("run-1"));
    assert_eq!(notify.parent_id.as_deref(), Some("j1"));
    assert_eq!(notify.origin, Origin::OnFailure);
}

#[test]
fn a_timed_out_attempt_counts_as_a_failure_and_a_cancel_starts_nothing() {
    let file = file();
    let def = &file.jobs["extract"];
    let job = facts("j1", "extract", &[("date", "2026_01_02")], 3);
    let timed_out = AttemptEnd { status: Status::TimedOut, exit_code: None };
    let Decision::Finish { status, follow_ups, .. } = pipeline::decide(&file, def, &job, timed_out, 0.0) else {
        panic!("last attempt")
    };
    assert_eq!(status, Status::TimedOut);
    assert_eq!(follow_ups[0].params["what"], "extract j1 failed with ");
    let first = JobFacts { attempt: 1, ..job };
    let cancelled = AttemptEnd { status: Status::Cancelled, exit_code: None };
    assert_eq!(
        pipeline::decide(&file, def, &first, cancelled, 0.0),
        Decision::Finish { status: Status::Cancelled, follow_ups: vec![], rejected: vec![] }
    );
}

#[test]
fn success_follow_ups_inherit_declared_params_and_drop_the_rest() {
    let file = file();
    let def = &file.jobs["extract"];
    let job = facts("j7", "extract", &[("date", "2026_01_02"), ("category", "books"), ("secret", "x")], 1);
    let ok = AttemptEnd { status: Status::Succeeded, exit_code: Some(0) };
    let Decision::Finish { status, follow_ups, rejected } = pipeline::decide(&file, def, &job, ok, 0.0) else {
        panic!("success finishes")
    };
    assert_eq!(status, Status::Succeeded);
    assert!(rejected.is_empty());
    let names: Vec<_> = follow_ups.iter().map(|j| j.job_name.as_str()).collect();
    assert_eq!(names, ["load", "notify"]);
    assert_eq!(follow_ups[0].params, params(&[("date", "2026_01_02")]), "undeclared params are dropped");
    assert_eq!(follow_ups[1].params, params(&[("what", "extract ok 0")]));
    assert!(follow_ups.iter().all(|j| j.parent_id.as_deref() == Some("j7") && j.run_id.as_deref() == Some("run-1")));
}

#[test]
fn a_follow_up_whose_params_fail_the_targets_checks_is_rejected_not_started() {
    let file = file();
    let def = &file.jobs["extract"];
    // The parent carries no `date`, so `load` (date required) cannot start.
    let job = facts("j8", "extract", &[("category", "all")], 1);
    let ok = AttemptEnd { status: Status::Succeeded, exit_code: Some(0) };
    let Decision::Finish { follow_ups, rejected, .. } = pipeline::decide(&file, def, &job, ok, 0.0) else {
        panic!("success finishes")
    };
    assert_eq!(follow_ups.len(), 1, "notify still starts");
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].to_string().contains("date"), "{}", rejected[0]);
}

#[test]
fn a_unique_key_fills_params_job_name_and_run_id_and_an_absent_param_as_empty() {
    let file = file();
    let index = &file.jobs["index"];
    let key = pipeline::unique_key(index, &params(&[("date", "2024_01_31")]), "run-9");
    assert_eq!(key, Ok(Some("index:2024_01_31::run-9".to_owned())));
    let key = pipeline::unique_key(index, &params(&[("date", "2024_01_31"), ("part", "a")]), "run-9");
    assert_eq!(key, Ok(Some("index:2024_01_31:a:run-9".to_owned())));
    assert_eq!(pipeline::unique_key(&file.jobs["merge"], &params(&[("date", "x")]), "run-9"), Ok(None));
}

#[test]
fn backoff_doubles_is_capped_and_never_below_half() {
    let policy = config::RetryPolicy { max: 50, backoff: Duration::from_secs(1) };
    assert_eq!(pipeline::backoff_delay(&policy, 1, 0.0), Duration::from_millis(500));
    assert_eq!(pipeline::backoff_delay(&policy, 1, 1.0), Duration::from_secs(1));
    assert_eq!(pipeline::backoff_delay(&policy, 4, 1.0), Duration::from_secs(8));
    assert_eq!(pipeline::backoff_delay(&policy, 40, 1.0), jobz_core::limits::BACKOFF_MAX);
    assert_eq!(pipeline::backoff_delay(&policy, 3, f64::NAN), Duration::from_secs(2));
}

fn succeeded(id: &str, date: &str) -> UpstreamEvent {
    UpstreamEvent::Succeeded(facts(id, "shard", &[("date", date), ("shard", id)], 1))
}

fn starts(effects: &[GateEffect]) -> Vec<&jobz_core::pipeline::NewJob> {
    effects
        .iter()
        .filter_map(|e| match e {
            GateEffect::Start(j) => Some(j),
            GateEffect::KeyError { .. } => None,
        })
        .collect()
}

#[test]
fn a_gate_fires_once_per_key_when_its_count_is_reached() {
    let file = file();
    let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap_or_default();
    let mut book = GateBook::new();
    assert!(starts(&book.observe(&file, &succeeded("a", "d1"), now)).is_empty());
    assert!(starts(&book.observe(&file, &succeeded("b", "d1"), now)).is_empty());
    // The same job reported twice (at-least-once) counts once.
    assert!(starts(&book.observe(&file, &succeeded("b", "d1"), now)).is_empty());
    // Another key is independent.
    assert!(starts(&book.observe(&file, &succeeded("x", "d2"), now)).is_empty());
    let effects = book.observe(&file, &succeeded("c", "d1"), now);
    let fired = starts(&effects);
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].job_name, "merge");
    assert_eq!(fired[0].params, params(&[("date", "d1")]));
    assert_eq!(fired[0].run_id.as_deref(), Some("run-1"));
    assert_eq!(
        fired[0].origin,
        Origin::Gate { gate: "shards_done".into(), key: "d1".into(), reason: GateReason::Then }
    );
    assert!(starts(&book.observe(&file, &succeeded("d", "d1"), now)).is_empty(), "fires once");
    let gate = &file.gates["shards_done"];
    let keys = book.keys("shards_done").map(|k| k.len());
    assert_eq!(keys, Some(2));
    let d2 = &book.keys("shards_done").and_then(|k| k.get("d2")).map(|s| s.progress(gate));
    assert_eq!(*d2, Some((1, 3)));
}

#[test]
fn a_gate_key_that_fails_fires_on_failure_once_and_an_old_key_times_out() {
    let file = file();
    let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap_or_default();
    let mut book = GateBook::new();
    book.observe(&file, &succeeded("a", "d1"), t0);
    let fail = UpstreamEvent::FailedForGood(facts("b", "shard", &[("date", "d1"), ("shard", "b")], 3));
    let fired = book.observe(&file, &fail, t0);
    assert_eq!(starts(&fired).len(), 1);
    assert_eq!(starts(&fired)[0].params, params(&[("what", "gate shards_done d1 failed")]));
    assert!(starts(&book.observe(&file, &fail, t0)).is_empty(), "on_failure fires once per key");
    book.observe(&file, &succeeded("z", "d3"), t0);
    assert!(book.expire(&file, t0 + chrono::Duration::minutes(59)).is_empty());
    let expired = book.expire(&file, t0 + chrono::Duration::minutes(61));
    let notes: Vec<_> = starts(&expired).iter().map(|j| j.params["what"].clone()).collect();
    assert_eq!(notes, ["gate shards_done d3 timed out"], "d1 failed already; only d3 times out");
    assert!(book.expire(&file, t0 + chrono::Duration::hours(3)).is_empty(), "a key times out once");
    // A timed-out key no longer fires.
    book.observe(&file, &succeeded("y", "d3"), t0);
    assert!(starts(&book.observe(&file, &succeeded("w", "d3"), t0)).is_empty());
}

#[test]
fn a_key_template_that_cannot_be_filled_is_an_error_not_a_crash() {
    let file = file();
    let now = Utc::now();
    let mut book = GateBook::new();
    let event = UpstreamEvent::Succeeded(facts("a", "shard", &[("shard", "1")], 1));
    let effects = book.observe(&file, &event, now);
    assert!(matches!(&effects[..], [GateEffect::KeyError { gate, .. }] if gate == "shards_done"), "{effects:?}");
    assert!(book.keys("shards_done").is_none_or(|k| k.is_empty()), "nothing changed");
}

#[test]
fn the_open_keys_bound_counts_open_keys_not_settled_ones() {
    let file = file();
    let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().unwrap_or_default();
    let mut book = GateBook::new();
    // Settle more keys than the bound allows open at once: each one completes (count 3) and fires.
    let keys = jobz_core::limits::GATE_OPEN_KEYS_MAX + 10;
    for k in 0..keys {
        let date = format!("d{k}");
        for shard in ["a", "b", "c"] {
            book.observe(&file, &succeeded(&format!("{shard}{k}"), &date), now);
        }
    }
    let effects = book.observe(&file, &succeeded("fresh", "another-day"), now);
    assert!(!effects.iter().any(|e| matches!(e, GateEffect::KeyError { .. })), "{effects:?}");
    assert_eq!(book.keys("shards_done").map(|k| k.len()), Some(keys + 1));
}
