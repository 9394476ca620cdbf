//! Unique jobs and `Idempotency-Key` against the real broker (SPEC
//! `job_start`): real processes on loopback, real HTTP, the store on disk.
//! Each job appends a line to a file per key, so the tests count real runs.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{get, id_of, json, request, wait_until, Mesh};

const JOBS: &str = r#"
jobs:
  once:
    shell: true
    command: "echo ran >> $DIR/once-{day}"
    params:
      day: { required: true, pattern: '^[a-z0-9]+$' }
    unique: { key: "{day}", ttl: 1h }
  brief:
    shell: true
    command: "echo ran >> $DIR/brief-{day}"
    params:
      day: { required: true, pattern: '^[a-z0-9]+$' }
    unique: { key: "{day}", ttl: 2s }
  breaks:
    shell: true
    command: "echo ran >> $DIR/breaks-{day}; exit 3"
    params:
      day: { required: true, pattern: '^[a-z0-9]+$' }
    unique: { key: "{day}", ttl: 1h }
  per_run:
    shell: true
    command: "echo ran >> $DIR/per-run"
    unique: { key: "{job_name}@{run_id}", ttl: 1h }
  parent:
    shell: true
    command: "echo ran >> $DIR/parent-{day}"
    params:
      day: { required: true, pattern: '^[a-z0-9]+$' }
    on_success: [ once ]
  plain:
    shell: true
    command: "echo ran {day} >> $DIR/plain"
    params:
      day: { required: true, pattern: '^[a-z0-9]+$' }
  upstream:
    command: "true"
    params:
      day: { required: true, pattern: '^[a-z0-9]+$' }
gates:
  day_done:
    after: [ upstream ]
    key: "{day}"
    then: { job: once, params: { day: "{day}" } }
"#;

/// The lines of the file `name` in the test's directory (0 when it does not exist).
fn lines(mesh: &Mesh, name: &str) -> usize {
    std::fs::read_to_string(mesh.path().join(name)).unwrap_or_default().lines().count()
}

/// The jobs named `job_name` the broker has stored.
fn stored(mesh: &Mesh, job_name: &str) -> Vec<serde_json::Value> {
    let list = json(&get(&mesh.url(), &format!("/jobs?job_name={job_name}&limit=1000")).1);
    list["jobs"].as_array().cloned().unwrap_or_default()
}

/// A start answered `200` with an existing job and `"deduplicated": true`; returns its id.
fn deduplicated(mesh: &Mesh, query: &str, headers: &[(&str, &str)]) -> String {
    let (code, body) = request(&mesh.url(), "GET", &format!("/job_start?{query}"), headers, b"");
    assert_eq!(code, 200, "start {query}: {body}");
    let job = json(&body);
    assert_eq!(job["deduplicated"], true, "{body}");
    id_of(&job)
}

#[test]
fn a_hundred_concurrent_starts_of_one_unique_key_store_and_run_one_job() {
    let mesh = Mesh::new(JOBS);
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 4);
    mesh.wait_workers(1);
    let url = mesh.url();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(100));
    let clients: Vec<_> = (0..100)
        .map(|_| {
            let url = url.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                get(&url, "/job_start?job_name=once&day=monday")
            })
        })
        .collect();
    let answers: Vec<(u16, String)> =
        clients.into_iter().map(|c| c.join().unwrap_or_else(|_| (0, "client panicked".into()))).collect();
    let accepted: Vec<&(u16, String)> = answers.iter().filter(|(code, _)| *code == 202).collect();
    let repeats: Vec<&(u16, String)> = answers.iter().filter(|(code, _)| *code == 200).collect();
    assert_eq!(accepted.len(), 1, "exactly one 202: {answers:?}");
    assert_eq!(repeats.len(), 99, "99 answers 200: {answers:?}");
    assert!(repeats.iter().all(|(_, body)| json(body)["deduplicated"] == true), "{repeats:?}");
    let ids: BTreeSet<String> = answers.iter().map(|(_, body)| id_of(&json(body))).collect();
    assert_eq!(ids.len(), 1, "every answer names the same job: {ids:?}");
    let id = id_of(&json(&accepted[0].1));
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["unique_key"], "monday", "{job}");
    assert_eq!(stored(&mesh, "once").len(), 1, "one job stored");
    assert_eq!(lines(&mesh, "once-monday"), 1, "the command ran once");
    // Succeeded within its ttl (1h), the job still holds the key.
    assert_eq!(deduplicated(&mesh, "job_name=once&day=monday", &[]), id);
    // Another key is another job.
    let other = mesh.start("job_name=once&day=tuesday");
    assert_ne!(id_of(&other), id);
    // A job without `unique` has no unique_key field and is never deduplicated.
    let plain = mesh.start("job_name=plain&day=monday");
    assert!(mesh.job(&id_of(&plain)).get("unique_key").is_none(), "{}", mesh.job(&id_of(&plain)));
    mesh.start("job_name=plain&day=monday");
}

#[test]
fn a_succeeded_job_holds_its_key_for_the_ttl_and_a_failed_one_not_at_all() {
    let mesh = Mesh::new(JOBS);
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 2);
    mesh.wait_workers(1);

    // ttl 2s: once it has passed since the job succeeded, a start runs it again.
    let first = id_of(&mesh.start("job_name=brief&day=monday"));
    let job = mesh.wait_final(&first, Duration::from_secs(30));
    assert_eq!(job["status"], "succeeded", "{job}");
    let finished: chrono::DateTime<chrono::Utc> =
        job["finished_at"].as_str().and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("finished_at: {job}"));
    wait_until(Duration::from_secs(10), "the ttl to pass", || {
        chrono::Utc::now() > finished + chrono::Duration::milliseconds(2100)
    });
    let second = id_of(&mesh.start("job_name=brief&day=monday"));
    assert_ne!(second, first);
    assert_eq!(mesh.wait_final(&second, Duration::from_secs(30))["status"], "succeeded");
    assert_eq!(lines(&mesh, "brief-monday"), 2, "it ran again after the ttl");

    // A failed holder does not block: the next start runs.
    let failing = id_of(&mesh.start("job_name=breaks&day=monday"));
    assert_eq!(mesh.wait_final(&failing, Duration::from_secs(30))["status"], "failed");
    let again = id_of(&mesh.start("job_name=breaks&day=monday"));
    assert_ne!(again, failing);
    assert_eq!(mesh.wait_final(&again, Duration::from_secs(30))["status"], "failed");
    assert_eq!(lines(&mesh, "breaks-monday"), 2);
}

#[test]
fn a_follow_up_or_a_start_inside_a_run_that_hits_a_unique_key_starts_nothing_new() {
    let mesh = Mesh::new(JOBS);
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 2);
    mesh.wait_workers(1);

    // Two parents of one day: the second's follow-up finds the first's `once` holding the key.
    for round in 0..2 {
        let parent = id_of(&mesh.start("job_name=parent&day=friday"));
        assert_eq!(mesh.wait_final(&parent, Duration::from_secs(30))["status"], "succeeded");
        // The follow-up was decided in the parent's finishing commit: what is stored now is all there is.
        let children = stored(&mesh, "once");
        assert_eq!(children.len(), 1, "round {round}: one follow-up job: {children:?}");
        assert_eq!(mesh.wait_final(&id_of(&children[0]), Duration::from_secs(30))["status"], "succeeded");
    }
    assert_eq!(lines(&mesh, "parent-friday"), 2);
    assert_eq!(lines(&mesh, "once-friday"), 1, "the follow-up ran once");

    // `{run_id}` in the key: one per run. Starts inside a run (Jobz-Parent-Id) share it.
    let root = id_of(&mesh.start("job_name=plain&day=x"));
    let headers = [("Jobz-Parent-Id", root.as_str())];
    let (code, body) = request(&mesh.url(), "GET", "/job_start?job_name=per_run", &headers, b"");
    assert_eq!(code, 202, "{body}");
    let in_run = id_of(&json(&body));
    assert_eq!(deduplicated(&mesh, "job_name=per_run", &headers), in_run);
    assert_eq!(mesh.job(&in_run)["unique_key"], format!("per_run@{root}").as_str());
    // A start of its own is a run of its own: its key is its own id.
    let own = id_of(&mesh.start("job_name=per_run"));
    assert_ne!(own, in_run);
    assert_eq!(mesh.job(&own)["unique_key"], format!("per_run@{own}").as_str());
}

#[test]
fn an_idempotency_key_returns_the_first_job_after_a_kill_9_and_refuses_other_params() {
    let mesh = Mesh::new(JOBS);
    let mut broker = mesh.broker(&[]);
    let key = [("Idempotency-Key", "cron-2026-11-23")];
    let (code, body) = request(&mesh.url(), "GET", "/job_start?job_name=plain&day=monday", &key, b"");
    assert_eq!(code, 202, "{body}");
    let first = id_of(&json(&body));
    assert_eq!(deduplicated(&mesh, "job_name=plain&day=monday", &key), first);

    broker.kill9();
    let _broker = mesh.broker(&[]);
    assert_eq!(deduplicated(&mesh, "job_name=plain&day=monday", &key), first, "the key outlives a kill -9");

    // The same key with other params, or another job: 409, nothing stored.
    for query in ["job_name=plain&day=tuesday", "job_name=once&day=monday"] {
        let (code, body) = request(&mesh.url(), "GET", &format!("/job_start?{query}"), &key, b"");
        assert_eq!(code, 409, "{query}: {body}");
        let error = json(&body)["error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains("Idempotency-Key") && error.contains(&first), "{error}");
    }
    assert_eq!(stored(&mesh, "plain").len(), 1, "{:?}", stored(&mesh, "plain"));
    assert!(stored(&mesh, "once").is_empty());
    // Another key is another start.
    let other = [("Idempotency-Key", "cron-2026-11-24")];
    let (code, body) = request(&mesh.url(), "GET", "/job_start?job_name=plain&day=monday", &other, b"");
    assert_eq!(code, 202, "{body}");
    assert_ne!(id_of(&json(&body)), first);
    // The job itself runs once a worker comes.
    let _worker = mesh.worker("w1", 2);
    assert_eq!(mesh.wait_final(&first, Duration::from_secs(30))["status"], "succeeded");
}

#[test]
fn a_gate_whose_job_hits_a_unique_key_records_the_holder_as_its_job() {
    let mesh = Mesh::new(JOBS);
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 2);
    let _semaphore = mesh.semaphore("s1");
    mesh.wait_workers(1);
    let holder = id_of(&mesh.start("job_name=once&day=sunday"));
    assert_eq!(mesh.wait_final(&holder, Duration::from_secs(30))["status"], "succeeded");
    let upstream = id_of(&mesh.start("job_name=upstream&day=sunday"));
    assert_eq!(mesh.wait_final(&upstream, Duration::from_secs(30))["status"], "succeeded");
    let fired = support::wait_for(Duration::from_secs(30), || {
        let gates = json(&get(&mesh.url(), "/gates").1);
        let gate = gates["gates"].as_array()?.iter().find(|g| g["name"] == "day_done")?.clone();
        // While its commit is in flight a fire shows no job: wait for the one it settled on.
        gate["fired"].as_array()?.iter().find(|f| f["key"] == "sunday" && f["job_id"].is_string()).cloned()
    });
    let Some(fired) = fired else { panic!("the gate did not fire:\n{}", mesh.logs()) };
    assert_eq!(fired["job_id"], holder.as_str(), "{fired}");
    assert_eq!(stored(&mesh, "once").len(), 1, "the gate started no second job");
    assert_eq!(lines(&mesh, "once-sunday"), 1);
}
