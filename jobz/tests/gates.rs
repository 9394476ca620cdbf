//! Fan-in gates end to end, with real processes on loopback: a broker,
//! workers and `jobz semaphore`s, crashed and restarted, and `GET /gates`.
//!
//! "Fires once" is checked after every live semaphore has said it is caught
//! up (every recorded event counted, every fire answered by the broker), so a
//! late duplicate would already be there to count. Every wait has a deadline;
//! processes are killed by PID.

mod support;

use std::time::Duration;

use support::{get, id_of, json, Mesh, Proc};

const PIPELINE: &str = r#"
jobs:
  fan_out:
    command: "true"
    params:
      date: { required: true, pattern: '^[a-z0-9_]+$' }
    on_success:
      - { job: shard, params: { shard: "0" } }
      - { job: shard, params: { shard: "1" } }
      - { job: shard, params: { shard: "2" } }
      - { job: shard, params: { shard: "3" } }
      - { job: shard, params: { shard: "4" } }
      - { job: shard, params: { shard: "5" } }
      - { job: shard, params: { shard: "6" } }
      - { job: shard, params: { shard: "7" } }
      - { job: shard, params: { shard: "8" } }
      - { job: shard, params: { shard: "9" } }
  shard:
    shell: true
    command: "echo {date} {shard} >> $DIR/shards; exit {fail}"
    params:
      date: { required: true, pattern: '^[a-z0-9_]+$' }
      shard: { required: true, pattern: '^\d+$' }
      fail: { default: "0", one_of: [ "0", "1" ] }
    retries: { max: 1, backoff: 100ms }
  build_index:
    shell: true
    command: "echo {date} >> $DIR/built"
    params:
      date: { required: true }
  part:
    shell: true
    command: "echo {batch} >> $DIR/parts"
    params:
      batch: { required: true, pattern: '^[a-z0-9]+$' }
  notify:
    shell: true
    command: "echo {what} >> $DIR/notified"
    params:
      what: { required: true }
gates:
  all_shards_done:
    after: [ shard ]
    count: 10
    key: "{date}"
    then: { job: build_index, params: { date: "{date}" } }
    on_failure: { job: notify, params: { what: "failed {gate} {key}" } }
  parts_done:
    after: [ part ]
    count: 3
    key: "{batch}"
    then: { job: notify, params: { what: "parts {key} done" } }
    timeout: 2s
    on_timeout: { job: notify, params: { what: "parts {key} timed out" } }
"#;

const WAIT: Duration = Duration::from_secs(60);

/// A broker and two workers; semaphores are up to each test.
fn mesh() -> (Mesh, Proc, Vec<Proc>) {
    let mesh = Mesh::new(PIPELINE);
    let broker = mesh.broker(&[]);
    let workers = vec![mesh.worker("w1", 4), mesh.worker("w2", 4)];
    mesh.wait_workers(2);
    (mesh, broker, workers)
}

/// Starts shards `range` of key `date`; those in `failing` fail on every attempt.
fn start_shards(mesh: &Mesh, date: &str, range: std::ops::Range<u32>, failing: &[u32]) -> Vec<String> {
    range
        .map(|shard| {
            let fail = if failing.contains(&shard) { 1 } else { 0 };
            let started = mesh.start(&format!("job_name=shard&date={date}&shard={shard}&fail={fail}"));
            id_of(&started)
        })
        .collect()
}

/// Waits until every job in `ids` has ended, and returns them.
fn wait_ended(mesh: &Mesh, ids: &[String]) -> Vec<serde_json::Value> {
    ids.iter().map(|id| mesh.wait_final(id, WAIT)).collect()
}

/// The lines of a file the jobs write in the test's directory.
fn lines(mesh: &Mesh, file: &str) -> Vec<String> {
    std::fs::read_to_string(mesh.path().join(file)).unwrap_or_default().lines().map(String::from).collect()
}

fn count_lines(mesh: &Mesh, file: &str, line: &str) -> usize {
    lines(mesh, file).iter().filter(|l| *l == line).count()
}

/// Every job named `job_name` the broker knows.
fn jobs_named(mesh: &Mesh, job_name: &str) -> Vec<serde_json::Value> {
    let list = json(&get(&mesh.url(), &format!("/jobs?job_name={job_name}&limit=1000")).1);
    list["jobs"].as_array().cloned().unwrap_or_default()
}

/// The jobs named `job_name` whose param `param` is `value`.
fn jobs_with(mesh: &Mesh, job_name: &str, param: &str, value: &str) -> Vec<serde_json::Value> {
    jobs_named(mesh, job_name).into_iter().filter(|j| j["params"][param] == value).collect()
}

/// Waits until the gate's job `job_name` with `param=value` has ended, and returns it.
fn wait_gate_job(mesh: &Mesh, job_name: &str, param: &str, value: &str) -> serde_json::Value {
    let found = support::wait_for(WAIT, || {
        jobs_with(mesh, job_name, param, value).into_iter().find(|j| j["status"] == "succeeded")
    });
    match found {
        Some(job) => job,
        None => panic!(
            "the gate did not start {job_name} with {param}={value} within {WAIT:?} \
             (this needs the broker's side of gates: gate events, Fire/Fired, GET /gates)\n{}",
            mesh.logs()
        ),
    }
}

/// Waits until semaphore `name` has said, `starts` times in its log, that it
/// counted every recorded event and the broker answered every fire it sent.
fn wait_caught_up(mesh: &Mesh, name: &str, starts: usize) {
    let found = support::wait_for(WAIT, || {
        (mesh.log_lines_with(name, "caught up: every gate event counted") >= starts).then_some(())
    });
    if found.is_none() {
        panic!("semaphore {name} did not catch up (start {starts}) within {WAIT:?}\n{}", mesh.logs());
    }
}

/// Asserts that `job_name` with `param=value` exists exactly once (and ran once).
fn assert_once(mesh: &Mesh, job_name: &str, param: &str, value: &str, file: &str, line: &str) {
    let jobs = jobs_with(mesh, job_name, param, value);
    assert_eq!(jobs.len(), 1, "{job_name} {param}={value} started once: {jobs:#?}\n{}", mesh.logs());
    assert_eq!(count_lines(mesh, file, line), 1, "{job_name} {param}={value} ran once: {:?}", lines(mesh, file));
}

// --- GET /gates, read without depending on more of its layout than needed.

/// The entry of `gate` in `GET /gates` (a list of gates, or `{"gates": [...]}`).
fn gate_view(mesh: &Mesh, gate: &str) -> serde_json::Value {
    let body = json(&get(&mesh.url(), "/gates").1);
    let list = body.as_array().cloned().or_else(|| body["gates"].as_array().cloned()).unwrap_or_default();
    list.into_iter().find(|g| g["name"] == gate).unwrap_or(serde_json::Value::Null)
}

/// The entry of `key` in one of a gate's lists (`open`, `fired`, `timed_out`,
/// `failed`): an array of objects with a `key`, or an object keyed by key.
fn key_entry(view: &serde_json::Value, list: &str, key: &str) -> Option<serde_json::Value> {
    let entries = &view[list];
    if let Some(array) = entries.as_array() {
        return array.iter().find(|e| e["key"] == key).cloned();
    }
    entries.get(key).cloned()
}

/// `"done/needed"` of an open key: from a `progress` text like `7/10 shard`,
/// or from numeric `done` and `needed` fields.
fn progress(entry: &serde_json::Value) -> Option<String> {
    if let Some(text) = entry["progress"].as_str() {
        return text.split_whitespace().next().map(String::from);
    }
    Some(format!("{}/{}", entry["done"].as_u64()?, entry["needed"].as_u64()?))
}

fn wait_progress(mesh: &Mesh, gate: &str, key: &str, expected: &str) {
    let mut last = serde_json::Value::Null;
    let found = support::wait_for(WAIT, || {
        last = gate_view(mesh, gate);
        key_entry(&last, "open", key).and_then(|e| progress(&e)).filter(|p| p == expected)
    });
    if found.is_none() {
        panic!("GET /gates never showed {gate} key {key} at {expected}; last: {last:#}");
    }
}

// --- The tests

#[test]
fn ten_shards_of_a_key_fire_then_once_and_nine_never_do() {
    let (mesh, _broker, _workers) = mesh();
    let _semaphore = mesh.semaphore("s1");
    wait_caught_up(&mesh, "s1", 1);

    let nine = start_shards(&mesh, "d9", 0..9, &[]);
    wait_ended(&mesh, &nine);
    let ten = start_shards(&mesh, "d10", 0..10, &[]);
    let ten_jobs = wait_ended(&mesh, &ten);
    let build = wait_gate_job(&mesh, "build_index", "date", "d10");

    // The gate's job joins the run of the key's first upstream job, and its parent is the one that completed the key.
    let runs: Vec<&str> = ten_jobs.iter().filter_map(|j| j["run_id"].as_str()).collect();
    assert!(build["run_id"].as_str().is_some_and(|r| runs.contains(&r)), "{build}");
    assert!(build["parent_id"].as_str().is_some_and(|p| ten.iter().any(|id| id == p)), "{build}");

    // d9's successes were recorded before d10's, so the semaphore has counted them: nine never fire.
    wait_caught_up(&mesh, "s1", 1);
    assert_once(&mesh, "build_index", "date", "d10", "built", "d10");
    assert!(jobs_with(&mesh, "build_index", "date", "d9").is_empty(), "nine shards fired: {:?}", lines(&mesh, "built"));
    wait_progress(&mesh, "all_shards_done", "d9", "9/10");
}

#[test]
fn two_keys_in_parallel_are_counted_apart() {
    let (mesh, _broker, _workers) = mesh();
    let _semaphore = mesh.semaphore("s1");
    let mut ids = Vec::new();
    for shard in 0..10 {
        ids.extend(start_shards(&mesh, "ka", shard..shard + 1, &[]));
        ids.extend(start_shards(&mesh, "kb", shard..shard + 1, &[]));
    }
    wait_ended(&mesh, &ids);
    let a = wait_gate_job(&mesh, "build_index", "date", "ka");
    let b = wait_gate_job(&mesh, "build_index", "date", "kb");
    assert_ne!(a["id"], b["id"]);
    wait_caught_up(&mesh, "s1", 1);
    assert_once(&mesh, "build_index", "date", "ka", "built", "ka");
    assert_once(&mesh, "build_index", "date", "kb", "built", "kb");
}

#[test]
fn two_semaphores_side_by_side_fire_each_key_once() {
    let (mesh, _broker, _workers) = mesh();
    let _s1 = mesh.semaphore("s1");
    let _s2 = mesh.semaphore("s2");
    let keys = ["p1", "p2", "p3"];
    let mut ids = Vec::new();
    for key in keys {
        ids.extend(start_shards(&mesh, key, 0..10, &[]));
    }
    wait_ended(&mesh, &ids);
    for key in keys {
        wait_gate_job(&mesh, "build_index", "date", key);
    }
    wait_caught_up(&mesh, "s1", 1);
    wait_caught_up(&mesh, "s2", 1);
    for key in keys {
        assert_once(&mesh, "build_index", "date", key, "built", key);
    }
    assert_eq!(jobs_named(&mesh, "build_index").len(), keys.len());
}

#[test]
fn a_semaphore_killed_half_way_and_restarted_still_fires_once() {
    let (mesh, _broker, _workers) = mesh();
    let mut semaphore = mesh.semaphore("s1");
    wait_caught_up(&mesh, "s1", 1);
    let first = start_shards(&mesh, "h1", 0..5, &[]);
    wait_ended(&mesh, &first);
    wait_progress(&mesh, "all_shards_done", "h1", "5/10");

    semaphore.kill9();
    // The other half succeeds with no semaphore running: nothing can fire yet.
    let second = start_shards(&mesh, "h1", 5..10, &[]);
    wait_ended(&mesh, &second);
    assert!(jobs_with(&mesh, "build_index", "date", "h1").is_empty(), "fired with no semaphore running");

    // Restarted, it rebuilds its counts from the recorded events and fires.
    semaphore = mesh.semaphore("s1");
    wait_gate_job(&mesh, "build_index", "date", "h1");
    wait_caught_up(&mesh, "s1", 2);
    assert_once(&mesh, "build_index", "date", "h1", "built", "h1");

    // Killed and restarted once more, after the fire: the rebuild fires again, the broker starts nothing new.
    semaphore.kill9();
    let _semaphore = mesh.semaphore("s1");
    wait_caught_up(&mesh, "s1", 3);
    assert_once(&mesh, "build_index", "date", "h1", "built", "h1");
}

#[test]
fn a_semaphore_killed_while_another_runs_changes_nothing() {
    let (mesh, _broker, _workers) = mesh();
    let mut s1 = mesh.semaphore("s1");
    let _s2 = mesh.semaphore("s2");
    let mut ids = Vec::new();
    for key in ["m1", "m2"] {
        ids.extend(start_shards(&mesh, key, 0..5, &[]));
    }
    wait_ended(&mesh, &ids);
    s1.kill9();
    // Killed at whatever point it had reached: maybe before it first caught up.
    let caught_up_before = mesh.log_lines_with("s1", "caught up: every gate event counted");
    let mut ids = start_shards(&mesh, "m1", 5..10, &[]);
    let _s1 = mesh.semaphore("s1");
    ids.extend(start_shards(&mesh, "m2", 5..10, &[]));
    wait_ended(&mesh, &ids);
    wait_gate_job(&mesh, "build_index", "date", "m1");
    wait_gate_job(&mesh, "build_index", "date", "m2");
    wait_caught_up(&mesh, "s1", caught_up_before + 1);
    wait_caught_up(&mesh, "s2", 1);
    assert_once(&mesh, "build_index", "date", "m1", "built", "m1");
    assert_once(&mesh, "build_index", "date", "m2", "built", "m2");
}

#[test]
fn a_broker_restart_half_way_still_fires_once() {
    let (mesh, mut broker, _workers) = mesh();
    let _semaphore = mesh.semaphore("s1");
    let first = start_shards(&mesh, "r1", 0..5, &[]);
    wait_ended(&mesh, &first);
    wait_progress(&mesh, "all_shards_done", "r1", "5/10");
    // The semaphore has registered with this broker and counted what it has, so what follows
    // the restart is a re-registration (regression: under load it could still be connecting).
    wait_caught_up(&mesh, "s1", 1);

    broker.kill9();
    let _broker = mesh.broker(&[]);
    mesh.wait_workers(2);
    let second = start_shards(&mesh, "r1", 5..10, &[]);
    wait_ended(&mesh, &second);
    wait_gate_job(&mesh, "build_index", "date", "r1");
    // The semaphore registered again after the restart and resumed where it was.
    let resumed =
        support::wait_for(WAIT, || (mesh.log_lines_with("s1", "registered with the broker again") >= 1).then_some(()));
    assert!(resumed.is_some(), "the semaphore did not register again:\n{}", mesh.logs());
    // Every fire answered: no duplicate can still be on its way.
    let answered = support::wait_for(WAIT, || {
        let view = gate_view(&mesh, "all_shards_done");
        key_entry(&view, "fired", "r1")
    });
    assert!(answered.is_some(), "GET /gates does not show r1 as fired: {:#}", gate_view(&mesh, "all_shards_done"));
    assert_once(&mesh, "build_index", "date", "r1", "built", "r1");
}

#[test]
fn a_gate_with_a_timeout_fires_on_timeout_for_an_incomplete_key_once() {
    let (mesh, _broker, _workers) = mesh();
    let _semaphore = mesh.semaphore("s1");
    let started = mesh.start("job_name=part&batch=b1");
    wait_ended(&mesh, &[id_of(&started)]);
    wait_gate_job(&mesh, "notify", "what", "parts b1 timed out");

    // The key was given up: its missing parts arriving late complete nothing.
    let late: Vec<String> = (0..2).map(|_| id_of(&mesh.start("job_name=part&batch=b1"))).collect();
    wait_ended(&mesh, &late);
    wait_caught_up(&mesh, "s1", 1);
    assert_once(&mesh, "notify", "what", "parts b1 timed out", "notified", "parts b1 timed out");
    assert!(jobs_with(&mesh, "notify", "what", "parts b1 done").is_empty(), "{:?}", lines(&mesh, "notified"));
    let view = gate_view(&mesh, "parts_done");
    assert!(key_entry(&view, "timed_out", "b1").is_some(), "GET /gates shows b1 as timed out: {view:#}");
}

#[test]
fn a_shard_that_fails_for_good_fires_on_failure_once_for_its_key() {
    let (mesh, _broker, _workers) = mesh();
    let _semaphore = mesh.semaphore("s1");
    // Shards 3 and 7 fail on both attempts; the rest succeed.
    let ids = start_shards(&mesh, "f1", 0..10, &[3, 7]);
    let jobs = wait_ended(&mesh, &ids);
    let failed: Vec<&serde_json::Value> = jobs.iter().filter(|j| j["status"] == "failed").collect();
    assert_eq!(failed.len(), 2, "{jobs:#?}");
    assert!(failed.iter().all(|j| j["attempts"] == 2), "retried once before failing for good: {failed:#?}");

    wait_gate_job(&mesh, "notify", "what", "failed all_shards_done f1");
    wait_caught_up(&mesh, "s1", 1);
    assert_once(&mesh, "notify", "what", "failed all_shards_done f1", "notified", "failed all_shards_done f1");
    assert!(jobs_with(&mesh, "build_index", "date", "f1").is_empty(), "8 of 10 succeeded: no then");
    let view = gate_view(&mesh, "all_shards_done");
    assert!(key_entry(&view, "failed", "f1").is_some(), "GET /gates shows f1 as failed: {view:#}");
}

#[test]
fn get_gates_shows_the_progress_of_open_keys_and_the_job_of_fired_ones() {
    let (mesh, _broker, _workers) = mesh();
    let _semaphore = mesh.semaphore("s1");
    let seven = start_shards(&mesh, "g1", 0..7, &[]);
    wait_ended(&mesh, &seven);
    wait_progress(&mesh, "all_shards_done", "g1", "7/10");
    let (code, body) = get(&mesh.url(), "/gates");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("7/10") || body.contains("\"done\":7"), "progress like 7/10 in {body}");

    let rest = start_shards(&mesh, "g1", 7..10, &[]);
    wait_ended(&mesh, &rest);
    let build = wait_gate_job(&mesh, "build_index", "date", "g1");
    let mut view = serde_json::Value::Null;
    let fired = support::wait_for(WAIT, || {
        view = gate_view(&mesh, "all_shards_done");
        key_entry(&view, "fired", "g1")
    });
    let Some(fired) = fired else { panic!("g1 never shown as fired: {view:#}") };
    assert_eq!(fired["job_id"], build["id"], "the fired key names the job it started: {view:#}");
    assert!(key_entry(&view, "open", "g1").is_none(), "a fired key is no longer open: {view:#}");
}

#[test]
fn a_semaphore_whose_gates_differ_from_the_brokers_is_refused_with_a_clear_message() {
    let (mesh, _broker, _workers) = mesh();
    let other = mesh.path().join("other.yaml");
    let changed = PIPELINE.replace("$DIR", &mesh.path().display().to_string()).replace("count: 10", "count: 9");
    if let Err(e) = std::fs::write(&other, changed) {
        panic!("writing the other job file: {e}");
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_jobz"))
        .args(["semaphore", "--broker", &mesh.endpoint(), "--config", &other.display().to_string()])
        .env("JOBZ_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match out {
        Ok(child) => Proc { child, name: "refused".into() },
        Err(e) => panic!("cannot start jobz semaphore: {e}"),
    };
    let status = support::wait_for(WAIT, || child.child.try_wait().ok().flatten());
    let Some(status) = status else { panic!("a semaphore with other gates kept running") };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.child.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    assert!(!status.success(), "exit {status:?}\n{stderr}");
    // The last line is the error the binary prints: the refusal, with the broker's reason.
    let error = stderr.lines().rev().find(|l| l.starts_with("jobz:")).unwrap_or_default();
    assert!(error.contains("refused"), "says it was refused: {stderr}");
    assert!(error.contains("gates"), "says the gates differ: {stderr}");
}

#[test]
fn the_same_pipeline_fires_the_same_way_in_eager_mode_and_on_the_mesh() {
    let (mesh, _broker, _workers) = mesh();
    let _semaphore = mesh.semaphore("s1");

    let config = mesh.config.display().to_string();
    let eager = std::process::Command::new(env!("CARGO_BIN_EXE_jobz"))
        .args(["run", "fan_out", "date=eager", "--config", &config])
        .current_dir(mesh.path())
        .env("TMPDIR", mesh.path())
        .output();
    let eager = match eager {
        Ok(out) => out,
        Err(e) => panic!("cannot run jobz run: {e}"),
    };
    let stdout = String::from_utf8_lossy(&eager.stdout);
    assert!(eager.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&eager.stderr));
    assert!(stdout.contains("(gate all_shards_done, key eager)"), "{stdout}");

    let started = mesh.start("job_name=fan_out&date=mesh");
    wait_ended(&mesh, &[id_of(&started)]);
    let build = wait_gate_job(&mesh, "build_index", "date", "mesh");
    assert_eq!(build["run_id"], started["id"], "the gate's job joins the fan-out's run: {build}");
    wait_caught_up(&mesh, "s1", 1);
    // One build per key in each mode, and ten shards each.
    assert_eq!(count_lines(&mesh, "built", "eager"), 1, "{:?}", lines(&mesh, "built"));
    assert_once(&mesh, "build_index", "date", "mesh", "built", "mesh");
    for key in ["eager", "mesh"] {
        let shards = lines(&mesh, "shards").iter().filter(|l| l.starts_with(&format!("{key} "))).count();
        assert_eq!(shards, 10, "{key}: {:?}", lines(&mesh, "shards"));
    }
}
