//! The job controls the broker and workers have, against real processes on
//! loopback: retries with backoff, failure handlers, retry by hand, cancel of
//! queued and running jobs (and of whole runs), timeouts, cancels that reach a
//! paused or reconnecting worker, idle exit and drain, jobs that talk back
//! (`jobz start`, `jobz progress`), topics, refusals and queue metrics.

mod support;

use std::time::Duration;

use chrono::{DateTime, Utc};
use support::{alive, get, id_of, json, metric_in, post, read_pids, wait_until, Mesh, PidFileGuard};

/// `$DIR` is the test's temp dir; `@JOBZ@` the jobz binary under test.
const CONTROLS: &str = r#"
jobs:
  lingering:
    shell: true
    command: >-
      echo S $JOBZ_ATTEMPT $(date +%s%N) >> $DIR/linger;
      if [ "$JOBZ_ATTEMPT" -gt 1 ]; then exit 0; fi;
      trap 'sleep 2; echo E $JOBZ_ATTEMPT $(date +%s%N) >> $DIR/linger; exit 0' TERM;
      sleep 60 & wait
  flaky:
    shell: true
    command: "echo run >> $DIR/flaky-runs; test $(wc -l < $DIR/flaky-runs) -ge 3"
    retries: { max: 3, backoff: 400ms }
  doomed:
    shell: true
    command: "echo run >> $DIR/doomed-runs; exit 7"
    retries: { max: 1, backoff: 100ms }
    on_failure: [ { job: notify, params: { what: "{job_name} {exit_code}" } } ]
  later:
    shell: true
    command: "echo run >> $DIR/runs-{tag}; exit 1"
    retries: { max: 1, backoff: 1h }
    params:
      tag: { required: true, pattern: '^[a-z0-9]+$' }
  notify:
    shell: true
    command: "echo {what} >> $DIR/notified"
    params:
      what: { required: true }
  spawner:
    shell: true
    command: "sleep 300 & echo $! >> $DIR/pids-$JOBZ_PARAM_TAG; sh -c 'sleep 300 & echo $! >> $DIR/pids-$JOBZ_PARAM_TAG; wait' & echo $! >> $DIR/pids-$JOBZ_PARAM_TAG; echo $$ >> $DIR/pids-$JOBZ_PARAM_TAG; wait"
    params:
      tag: { required: true, pattern: '^[a-z0-9]+$' }
  stuck:
    shell: true
    timeout: 1s
    command: "sleep 300 & echo $! >> $DIR/pids-$JOBZ_PARAM_TAG; sh -c 'sleep 300 & echo $! >> $DIR/pids-$JOBZ_PARAM_TAG; wait' & echo $! >> $DIR/pids-$JOBZ_PARAM_TAG; echo $$ >> $DIR/pids-$JOBZ_PARAM_TAG; wait"
    params:
      tag: { required: true, pattern: '^[a-z0-9]+$' }
  hold:
    shell: true
    command: "echo run >> $DIR/runs-$JOBZ_PARAM_TAG; sleep 300 & echo $! >> $DIR/pids-$JOBZ_PARAM_TAG; echo $$ >> $DIR/pids-$JOBZ_PARAM_TAG; wait"
    params:
      tag: { required: true, pattern: '^[a-z0-9]+$' }
  head:
    command: "true"
    params:
      tag: { required: true, pattern: '^[a-z0-9]+$' }
    on_success: [ { job: hold, params: { tag: "{tag}x" } }, { job: hold, params: { tag: "{tag}y" } } ]
  slow:
    shell: true
    command: "echo run >> $DIR/runs-{tag}; sleep {secs}; echo done"
    params:
      tag: { required: true, pattern: '^[a-z0-9]+$' }
      secs: { default: "2", pattern: '^\d+$' }
  caller:
    shell: true
    command: "@JOBZ@ progress 50 halfway && @JOBZ@ start child k=v > $DIR/child-id && for i in $(seq 300); do test -e $DIR/release && break; sleep 0.1; done"
  child:
    shell: true
    command: "echo {k} >> $DIR/child-ran"
    params:
      k: { required: true }
  a:
    shell: true
    command: "echo $JOBZ_JOB_ID >> $DIR/ran-a"
  b:
    shell: true
    command: "echo $JOBZ_JOB_ID >> $DIR/ran-b"
"#;

fn mesh() -> Mesh {
    Mesh::new(&CONTROLS.replace("@JOBZ@", env!("CARGO_BIN_EXE_jobz")))
}

fn time(value: &serde_json::Value) -> DateTime<Utc> {
    match value.as_str().map(DateTime::parse_from_rfc3339) {
        Some(Ok(t)) => t.with_timezone(&Utc),
        _ => panic!("not an RFC 3339 time: {value}"),
    }
}

fn lines(mesh: &Mesh, file: &str) -> Vec<String> {
    std::fs::read_to_string(mesh.path().join(file)).unwrap_or_default().lines().map(String::from).collect()
}

/// Waits until the job's processes have written `count` pids to `pids-<tag>` and returns them.
fn wait_pids(mesh: &Mesh, tag: &str, count: usize) -> Vec<i32> {
    let path = mesh.path().join(format!("pids-{tag}"));
    wait_until(Duration::from_secs(30), &format!("{count} pids in pids-{tag}"), || read_pids(&path).len() >= count);
    let pids = read_pids(&path);
    assert!(pids.iter().all(|p| alive(*p)), "every recorded process runs: {pids:?}");
    pids
}

fn wait_all_gone(mesh: &Mesh, pids: &[i32], what: &str) {
    let found = support::wait_for(Duration::from_secs(10), || (!pids.iter().any(|p| alive(*p))).then_some(()));
    if found.is_none() {
        let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
        panic!("{what}: processes {left:?} of {pids:?} still run\n{}", mesh.logs());
    }
}

/// Cancels `id` over HTTP and returns the answer, which says it is cancelled.
fn cancel_over_http(mesh: &Mesh, id: &str) -> serde_json::Value {
    let (code, body) = post(&mesh.url(), &format!("/jobs/{id}/cancel"), "");
    assert_eq!(code, 200, "{body}");
    let answer = json(&body);
    assert_eq!(answer["status"], "cancelled", "{body}");
    answer
}

/// Resumes the paused `worker` of the cancelled job `id`, whose processes
/// `pids` still run: it kills them all, and the job stays cancelled after its one attempt.
fn resume_and_see_it_killed(mesh: &Mesh, worker: &support::Proc, id: &str, pids: &[i32], what: &str) {
    assert!(pids.iter().all(|p| alive(*p)), "{what}: nobody has killed the job yet");
    worker.signal(libc::SIGCONT);
    wait_all_gone(mesh, pids, what);
    let job = mesh.job(id);
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
}

/// The worker `w1` still serves: a job started now succeeds on it.
fn w1_still_serves(mesh: &Mesh) {
    let after = id_of(&mesh.start("job_name=a"));
    let done = mesh.wait_final(&after, Duration::from_secs(30));
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["worker"], "w1", "{done}");
}

#[test]
fn a_flaky_job_succeeds_on_its_third_attempt_after_a_backoff_that_grows() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let id = id_of(&mesh.start("job_name=flaky"));
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 3, "{job}");
    assert_eq!(lines(&mesh, "flaky-runs").len(), 3);
    let attempts = job["attempt_list"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 3, "{job}");
    for (i, a) in attempts.iter().enumerate() {
        assert_eq!(a["attempt"], i + 1, "{job}");
        assert_eq!(a["worker"], "w1", "{job}");
        assert_eq!(a["exit_code"], if i < 2 { 1 } else { 0 }, "{job}");
        assert_eq!(a["status"], if i < 2 { "failed" } else { "succeeded" }, "{job}");
    }
    // Backoff 400ms doubles per attempt, with equal jitter (jobz_core::pipeline::backoff_delay):
    // the wait after attempt 1 is in [200ms, 400ms], after attempt 2 in [400ms, 800ms]. Only the
    // floors are guaranteed (dispatch adds latency), so those are what is checked; the JSON's
    // millisecond times may each lose up to a millisecond.
    let gap = |before: usize| time(&attempts[before + 1]["started_at"]) - time(&attempts[before]["finished_at"]);
    let slack = chrono::Duration::milliseconds(2);
    assert!(gap(0) + slack >= chrono::Duration::milliseconds(200), "first backoff {:?}: {job}", gap(0));
    assert!(gap(1) + slack >= chrono::Duration::milliseconds(400), "second backoff {:?}: {job}", gap(1));
}

#[test]
fn a_job_out_of_attempts_stays_failed_runs_its_failure_handler_once_and_runs_again_when_retried() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let id = id_of(&mesh.start("job_name=doomed"));
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
    assert_eq!(job["exit_code"], 7, "{job}");
    let last_finished = time(&job["attempt_list"][1]["finished_at"]);
    wait_until(Duration::from_secs(30), "the failure handler", || mesh.jobs_named("notify").len() == 1);
    let notify = mesh.jobs_named("notify").remove(0);
    let notify = mesh.wait_final(&id_of(&notify), Duration::from_secs(30));
    assert_eq!(notify["status"], "succeeded", "{notify}");
    assert_eq!(notify["parent_id"], id.as_str());
    assert_eq!(notify["run_id"], id.as_str());
    assert!(time(&notify["created_at"]) >= last_finished, "the handler follows the last attempt: {notify}\n{job}");
    assert_eq!(lines(&mesh, "notified"), ["doomed 7"]);
    assert_eq!(lines(&mesh, "doomed-runs").len(), 2);

    // By hand, over HTTP: one more attempt, which fails again and runs the handler again.
    let (code, body) = post(&mesh.url(), &format!("/jobs/{id}/retry"), "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["status"], "queued", "{body}");
    wait_until(Duration::from_secs(30), "the retried job to run", || lines(&mesh, "doomed-runs").len() == 3);
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 3, "{job}");

    // And with `jobz retry ID`.
    let out = mesh.client(&["retry", &id], Duration::from_secs(20));
    assert!(out.status.success(), "jobz retry: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id), "{out:?}");
    wait_until(Duration::from_secs(30), "the second retry to run", || lines(&mesh, "doomed-runs").len() == 4);
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["attempts"], 4, "{job}");
    wait_until(Duration::from_secs(30), "a handler per failure for good", || lines(&mesh, "notified").len() == 3);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lines(&mesh, "doomed-runs").len(), 4, "no attempt beyond those asked for");
    assert_eq!(mesh.jobs_named("notify").len(), 3);
}

#[test]
fn cancelling_a_running_job_kills_its_whole_process_tree_over_http_and_from_the_cli() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 2);
    mesh.wait_workers(1);
    let _guards = [PidFileGuard(mesh.path().join("pids-h")), PidFileGuard(mesh.path().join("pids-c"))];

    let id = id_of(&mesh.start("job_name=spawner&tag=h"));
    let pids = wait_pids(&mesh, "h", 4);
    let answer = cancel_over_http(&mesh, &id);
    assert!(answer["cancelled_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{answer}");
    wait_all_gone(&mesh, &pids, "cancel over HTTP");
    let job = mesh.job(&id);
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");

    let id = id_of(&mesh.start("job_name=spawner&tag=c"));
    let pids = wait_pids(&mesh, "c", 4);
    let out = mesh.client(&["cancel", &id], Duration::from_secs(20));
    assert!(out.status.success(), "jobz cancel: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"), "{out:?}");
    wait_all_gone(&mesh, &pids, "jobz cancel");
    let job = mesh.job(&id);
    assert_eq!(job["status"], "cancelled", "{job}");
    assert!(job["cancelled_at"].is_string(), "{job}");
}

#[test]
fn a_job_past_its_timeout_is_timed_out_with_its_whole_process_tree_killed() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let _guard = PidFileGuard(mesh.path().join("pids-t"));
    let id = id_of(&mesh.start("job_name=stuck&tag=t"));
    let pids = wait_pids(&mesh, "t", 4);
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "timed_out", "{job}");
    assert!(job["cancelled_at"].is_null(), "{job}");
    wait_all_gone(&mesh, &pids, "timeout");
}

#[test]
fn a_cancelled_queued_job_is_never_dispatched_when_a_worker_arrives() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let id = id_of(&mesh.start("job_name=hold&tag=q"));
    cancel_over_http(&mesh, &id);
    let _worker = mesh.worker("w1", 2);
    mesh.wait_workers(1);
    // A job started after the cancelled one runs: the worker takes what is queued.
    let after = id_of(&mesh.start("job_name=a"));
    let done = mesh.wait_final(&after, Duration::from_secs(30));
    assert_eq!(done["status"], "succeeded", "{done}");
    std::thread::sleep(Duration::from_millis(500));
    let job = mesh.job(&id);
    assert_eq!(job["status"], "cancelled", "{job}");
    assert_eq!(job["attempts"], 0, "{job}");
    assert!(job["worker"].is_null(), "{job}");
    assert!(lines(&mesh, "runs-q").is_empty(), "the cancelled job never ran");
}

#[test]
fn cancelling_a_run_cancels_its_running_and_queued_jobs_and_kills_what_runs() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let _guards = [PidFileGuard(mesh.path().join("pids-rx")), PidFileGuard(mesh.path().join("pids-ry"))];
    let run_id = id_of(&mesh.start("job_name=head&tag=r"));
    let head = mesh.wait_final(&run_id, Duration::from_secs(30));
    assert_eq!(head["status"], "succeeded", "{head}");
    // Concurrency 1: one follow-up runs, the other waits in the queue.
    let mut running = None;
    wait_until(Duration::from_secs(30), "one follow-up to run and one to wait", || {
        let jobs = json(&get(&mesh.url(), &format!("/jobs?run_id={run_id}")).1)["jobs"].as_array().cloned();
        let jobs = jobs.unwrap_or_default();
        let holds: Vec<_> = jobs.iter().filter(|j| j["job_name"] == "hold").collect();
        running = holds.iter().find(|j| j["status"] == "running").map(|j| j["params"]["tag"].clone());
        holds.len() == 2 && running.is_some() && holds.iter().any(|j| j["status"] == "queued")
    });
    let tag = running.and_then(|t| t.as_str().map(String::from)).unwrap_or_default();
    let pids = wait_pids(&mesh, &tag, 2);
    let (code, body) = post(&mesh.url(), &format!("/runs/{run_id}/cancel"), "");
    assert_eq!(code, 200, "{body}");
    let cancelled = json(&body)["cancelled"].as_array().cloned().unwrap_or_default();
    assert_eq!(cancelled.len(), 2, "{body}");
    assert!(cancelled.iter().all(|j| j["status"] == "cancelled" && j["job_name"] == "hold"), "{body}");
    wait_all_gone(&mesh, &pids, "run cancel");
    let jobs = json(&get(&mesh.url(), &format!("/jobs?run_id={run_id}")).1)["jobs"].as_array().cloned();
    for job in jobs.unwrap_or_default() {
        let want = if job["id"] == run_id.as_str() { "succeeded" } else { "cancelled" };
        assert_eq!(job["status"], want, "{job}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let ran = lines(&mesh, "runs-rx").len() + lines(&mesh, "runs-ry").len();
    assert_eq!(ran, 1, "the queued follow-up never ran");
    let (code, body) = post(&mesh.url(), "/runs/no-such-run/cancel", "");
    assert_eq!(code, 404, "{body}");
}

#[test]
fn a_cancel_sent_while_the_worker_is_paused_kills_the_job_when_the_worker_resumes() {
    let mesh = mesh();
    let _broker = mesh.broker(&["--lease-timeout", "10s"]);
    let worker = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let _guard = PidFileGuard(mesh.path().join("pids-p"));
    let id = id_of(&mesh.start("job_name=spawner&tag=p"));
    let pids = wait_pids(&mesh, "p", 4);
    worker.signal(libc::SIGSTOP);
    cancel_over_http(&mesh, &id);
    // Paused past the worker's own broker timeout (3 heartbeats), well within the lease.
    std::thread::sleep(Duration::from_secs(4));
    resume_and_see_it_killed(&mesh, &worker, &id, &pids, "cancel delivered after SIGCONT");
}

#[test]
fn a_worker_that_reconnects_to_a_restarted_broker_holding_a_cancelled_lease_kills_the_job() {
    let mesh = mesh();
    let mut broker = mesh.broker(&["--lease-timeout", "10s"]);
    let worker = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let _guard = PidFileGuard(mesh.path().join("pids-k"));
    let id = id_of(&mesh.start("job_name=spawner&tag=k"));
    let pids = wait_pids(&mesh, "k", 4);
    wait_until(Duration::from_secs(30), "the job to be running", || mesh.job(&id)["status"] == "running");
    // The worker cannot hear the cancel: it is paused, and the broker that knew its connection is gone.
    worker.signal(libc::SIGSTOP);
    broker.kill9();
    let _broker = mesh.broker(&["--lease-timeout", "10s"]);
    cancel_over_http(&mesh, &id);
    resume_and_see_it_killed(&mesh, &worker, &id, &pids, "cancel of a lease held across a broker restart");
    w1_still_serves(&mesh);
}

#[test]
fn a_worker_paused_past_its_lease_kills_its_cancelled_job_when_it_comes_back() {
    let mesh = mesh();
    let _broker = mesh.broker(&["--lease-timeout", "2s"]);
    let worker = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let _guard = PidFileGuard(mesh.path().join("pids-l"));
    let id = id_of(&mesh.start("job_name=spawner&tag=l"));
    let pids = wait_pids(&mesh, "l", 4);
    wait_until(Duration::from_secs(30), "the job to be running", || mesh.job(&id)["status"] == "running");
    worker.signal(libc::SIGSTOP);
    // Silent past its lease: the broker drops the worker and queues its job again; no other worker takes it.
    wait_until(Duration::from_secs(30), "the job to be queued again", || mesh.job(&id)["status"] == "queued");
    cancel_over_http(&mesh, &id);
    resume_and_see_it_killed(&mesh, &worker, &id, &pids, "cancel of a lease the broker had taken back");
    w1_still_serves(&mesh);
}

#[test]
fn a_worker_with_exit_when_idle_exits_0_once_idle_but_not_while_it_runs_a_longer_job() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    // Queued first, so the worker gets it as soon as it registers.
    let id = id_of(&mesh.start("job_name=slow&tag=i&secs=4"));
    let mut worker = mesh.worker_with("w1", 1, &["--exit-when-idle", "2s"]);
    wait_until(Duration::from_secs(30), "the job to run", || mesh.job(&id)["status"] != "queued");
    let job = support::wait_for(Duration::from_secs(30), || {
        let job = mesh.job(&id);
        if job["status"] == "running" {
            let exited = worker.child.try_wait().ok().flatten();
            assert!(exited.is_none(), "the worker exited while its job ran: {exited:?}\n{}", mesh.logs());
            return None;
        }
        Some(job)
    });
    let Some(job) = job else { panic!("the job did not end:\n{}", mesh.logs()) };
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["worker"], "w1", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    let exited = support::wait_for(Duration::from_secs(15), || worker.child.try_wait().ok().flatten());
    let Some(status) = exited else { panic!("the idle worker did not exit:\n{}", mesh.logs()) };
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(lines(&mesh, "runs-i").len(), 1);
}

#[test]
fn a_worker_drained_with_sigterm_finishes_its_job_and_leaves_queued_jobs_to_others() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let mut w1 = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let first = id_of(&mesh.start("job_name=slow&tag=d&secs=2"));
    wait_until(Duration::from_secs(30), "the first job to run", || mesh.job(&first)["status"] == "running");
    let second = id_of(&mesh.start("job_name=slow&tag=e&secs=1"));
    let status = w1.terminate(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "w1 exit: {status:?}\n{}", mesh.logs());
    let job = mesh.job(&first);
    assert_eq!(job["status"], "succeeded", "finished within the grace and recorded: {job}");
    assert_eq!(job["worker"], "w1");
    assert_eq!(mesh.job(&second)["status"], "queued", "the draining worker took nothing new");
    let _w2 = mesh.worker("w2", 1);
    let job = mesh.wait_final(&second, Duration::from_secs(30));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["worker"], "w2", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lines(&mesh, "runs-d").len(), 1, "the first job ran once");
    assert_eq!(lines(&mesh, "runs-e").len(), 1, "the second job ran once");
}

#[test]
fn a_job_starts_a_child_in_its_own_run_and_reports_its_progress() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 2);
    mesh.wait_workers(1);
    let id = id_of(&mesh.start("job_name=caller"));
    let progress = support::wait_for(Duration::from_secs(30), || {
        let job = mesh.job(&id);
        job["progress"].is_object().then_some(job)
    });
    let Some(job) = progress else {
        let log = get(&mesh.url(), &format!("/jobs/{id}/log")).1;
        panic!("no progress shown: {}\n{log}\n{}", mesh.job(&id), mesh.logs())
    };
    assert_eq!(job["status"], "running", "{job}");
    assert_eq!(job["progress"]["percent"], 50.0, "{job}");
    assert_eq!(job["progress"]["message"], "halfway", "{job}");
    wait_until(Duration::from_secs(30), "the child's id", || !lines(&mesh, "child-id").is_empty());
    let child_id = lines(&mesh, "child-id").remove(0).trim().to_string();
    let child = mesh.wait_final(&child_id, Duration::from_secs(30));
    assert_eq!(child["status"], "succeeded", "{child}");
    assert_eq!(child["job_name"], "child");
    assert_eq!(child["parent_id"], id.as_str(), "{child}");
    assert_eq!(child["run_id"], id.as_str(), "{child}");
    assert_eq!(child["params"]["k"], "v", "{child}");
    assert_eq!(lines(&mesh, "child-ran"), ["v"]);
    if let Err(e) = std::fs::write(mesh.path().join("release"), "") {
        panic!("release file: {e}");
    }
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "succeeded", "{job}");
}

#[test]
fn a_worker_with_topics_runs_only_those_jobs() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let mut w1 = mesh.worker_with("w1", 2, &["--topics", "a"]);
    mesh.wait_workers(1);
    let workers = json(&get(&mesh.url(), "/workers").1);
    let served: Vec<_> = workers["workers"][0]["jobs"].as_array().cloned().unwrap_or_default();
    assert!(served.len() == 1 && served[0]["name"] == "a", "w1 serves only a: {workers}");
    let b = id_of(&mesh.start("job_name=b"));
    let a: Vec<String> = (0..3).map(|_| id_of(&mesh.start("job_name=a"))).collect();
    for id in &a {
        let job = mesh.wait_final(id, Duration::from_secs(30));
        assert_eq!(job["status"], "succeeded", "{job}");
        assert_eq!(job["worker"], "w1", "{job}");
    }
    std::thread::sleep(Duration::from_millis(500));
    let job = mesh.job(&b);
    assert_eq!(job["status"], "queued", "no worker serves b: {job}");
    assert_eq!(job["attempts"], 0, "{job}");
    let _w2 = mesh.worker_with("w2", 1, &["--topics", "b"]);
    let job = mesh.wait_final(&b, Duration::from_secs(30));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["worker"], "w2", "{job}");
    assert_eq!(lines(&mesh, "ran-a").len(), 3);
    assert_eq!(lines(&mesh, "ran-b"), [b]);

    // w1 comes back serving b only: it is no longer given a.
    w1.kill9();
    let _w1 = mesh.worker_with("w1", 2, &["--topics", "b"]);
    wait_until(Duration::from_secs(30), "w1 back, serving b", || {
        let workers = json(&get(&mesh.url(), "/workers").1)["workers"].as_array().cloned().unwrap_or_default();
        workers
            .iter()
            .any(|w| w["name"] == "w1" && w["jobs"].as_array().is_some_and(|j| j.len() == 1 && j[0]["name"] == "b"))
            && workers.len() == 2
    });
    let late_a = id_of(&mesh.start("job_name=a"));
    let more_b: Vec<String> = (0..4).map(|_| id_of(&mesh.start("job_name=b"))).collect();
    for id in &more_b {
        assert_eq!(mesh.wait_final(id, Duration::from_secs(30))["status"], "succeeded");
    }
    std::thread::sleep(Duration::from_millis(500));
    let job = mesh.job(&late_a);
    assert_eq!(job["status"], "queued", "no worker serves a any more: {job}");
    assert_eq!(lines(&mesh, "ran-a").len(), 3);
}

#[test]
fn two_workers_under_one_name_do_not_take_it_from_each_other_and_the_older_one_is_told_why() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let (endpoint, config) = (mesh.endpoint(), mesh.config.display().to_string());
    let args = ["worker", "--broker", &endpoint, "--config", &config, "--name", "twin"];
    let _first = mesh.spawn("twin-1", &args);
    mesh.wait_workers(1);
    let _second = mesh.spawn("twin-2", &args);
    let log = |name: &str| std::fs::read_to_string(mesh.path().join(format!("{name}.log"))).unwrap_or_default();
    // The second takes the name. The first hears why at its next heartbeat (every second),
    // instead of being asked to register again and taking the name back.
    wait_until(Duration::from_secs(15), "the first worker told that its name was taken", || {
        log("twin-1").contains("was taken by a newer connection")
    });
    std::thread::sleep(Duration::from_secs(3));
    let broker = log("broker");
    assert_eq!(broker.matches("worker joined").count(), 2, "{}", mesh.logs());
    assert_eq!(broker.matches("worker left").count(), 1, "{}", mesh.logs());
    assert!(!log("twin-2").contains("was taken"), "the newer one keeps the name: {}", mesh.logs());
    let workers = json(&get(&mesh.url(), "/workers").1)["workers"].as_array().cloned().unwrap_or_default();
    assert_eq!(workers.len(), 1, "{workers:?}");
    assert_eq!(workers[0]["name"], "twin", "{workers:?}");
    let id = id_of(&mesh.start("job_name=a"));
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
}

#[test]
fn refused_control_requests_answer_json_errors_and_change_nothing() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 2);
    mesh.wait_workers(1);
    let done = id_of(&mesh.start("job_name=a"));
    let before = mesh.wait_final(&done, Duration::from_secs(30));
    assert_eq!(before["status"], "succeeded", "{before}");

    let (code, body) = post(&mesh.url(), &format!("/jobs/{done}/cancel"), "");
    assert_eq!(code, 409, "cancel of a finished job: {body}");
    assert!(json(&body)["error"].as_str().is_some_and(|e| e.contains("succeeded")), "{body}");
    let (code, body) = post(&mesh.url(), &format!("/jobs/{done}/retry"), "");
    assert_eq!(code, 409, "retry of a succeeded job: {body}");
    assert!(json(&body)["error"].is_string(), "{body}");
    let after = mesh.job(&done);
    for field in ["status", "attempts", "finished_at", "cancelled_at", "exit_code", "worker"] {
        assert_eq!(after[field], before[field], "{field} unchanged: {after}");
    }

    let (code, body) = post(&mesh.url(), "/jobs/00000000-0000-7000-8000-000000000000/cancel", "");
    assert_eq!(code, 404, "{body}");
    assert!(json(&body)["error"].is_string(), "{body}");

    let _guard = PidFileGuard(mesh.path().join("pids-z"));
    let running = id_of(&mesh.start("job_name=hold&tag=z"));
    let pids = wait_pids(&mesh, "z", 2);
    wait_until(Duration::from_secs(30), "the job to be running", || mesh.job(&running)["status"] == "running");
    let (code, body) = post(&mesh.url(), &format!("/jobs/{running}/retry"), "");
    assert_eq!(code, 409, "retry of a running job: {body}");
    assert!(json(&body)["error"].is_string(), "{body}");
    let job = mesh.job(&running);
    assert_eq!(job["status"], "running", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    assert!(pids.iter().all(|p| alive(*p)), "the running job was left alone");
    assert_eq!(lines(&mesh, "runs-z").len(), 1);

    let count = mesh.jobs_named("b").len();
    let (code, body) = get(&mesh.url(), "/job_start?job_name=b&priority=5000");
    assert_eq!(code, 400, "{body}");
    assert!(json(&body)["error"].as_str().is_some_and(|e| e.contains("priority")), "{body}");
    assert_eq!(mesh.jobs_named("b").len(), count, "nothing stored for a refused start");

    let (code, body) = post(&mesh.url(), &format!("/jobs/{running}/cancel"), "");
    assert_eq!(code, 200, "{body}");
    wait_all_gone(&mesh, &pids, "cleanup cancel");
}

#[test]
fn metrics_show_the_queue_depth_per_job_name() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker_with("w1", 1, &["--topics", "a"]);
    mesh.wait_workers(1);
    for _ in 0..3 {
        mesh.start("job_name=b");
    }
    let a = id_of(&mesh.start("job_name=a"));
    assert_eq!(mesh.wait_final(&a, Duration::from_secs(30))["status"], "succeeded");
    let metrics = get(&mesh.url(), "/metrics").1;
    let value = |series: &str| metric_in(&metrics, series);
    assert_eq!(value("jobz_queue_depth{job_name=\"b\"}"), Some(3.0), "{metrics}");
    assert_eq!(value("jobz_jobs{job_name=\"b\",status=\"queued\"}"), Some(3.0), "{metrics}");
    assert!(value("jobz_queue_depth{job_name=\"a\"}").unwrap_or(0.0) == 0.0, "{metrics}");
    assert_eq!(value("jobz_jobs{job_name=\"a\",status=\"succeeded\"}"), Some(1.0), "{metrics}");
    assert_eq!(value("jobz_workers"), Some(1.0), "{metrics}");
}

#[test]
fn jobs_waiting_out_a_retry_backoff_count_in_the_queue_depth_and_cancel_alone_or_with_their_run() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 2);
    mesh.wait_workers(1);
    let depth = || mesh.metric("jobz_queue_depth{job_name=\"later\"}");
    let ids: Vec<String> =
        ["p", "q", "r"].iter().map(|tag| id_of(&mesh.start(&format!("job_name=later&tag={tag}")))).collect();
    wait_until(Duration::from_secs(30), "each job's first attempt to fail", || {
        ["p", "q", "r"].iter().all(|tag| lines(&mesh, &format!("runs-{tag}")).len() == 1)
    });
    // Back in the queue, with an hour to wait before the second attempt.
    wait_until(Duration::from_secs(30), "three jobs waiting out their backoff", || depth() == Some(3.0));
    for id in &ids {
        let job = mesh.job(id);
        assert_eq!(job["status"], "queued", "{job}");
        assert_eq!(job["attempts"], 1, "{job}");
        assert!(job["not_before"].is_string(), "{job}");
    }

    // One alone, one with its run (the job is its run's head); the third waits on.
    cancel_over_http(&mesh, &ids[0]);
    let (code, body) = post(&mesh.url(), &format!("/runs/{}/cancel", ids[1]), "");
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["cancelled"].as_array().map(Vec::len), Some(1), "{body}");
    wait_until(Duration::from_secs(10), "the queue depth to drop to the one left", || depth() == Some(1.0));
    for (id, want) in ids.iter().zip(["cancelled", "cancelled", "queued"]) {
        let job = mesh.job(id);
        assert_eq!(job["status"], want, "{job}");
        assert_eq!(job["attempts"], 1, "{job}");
    }
    // A second cancel of a job that left its backoff is refused and changes nothing.
    let (code, body) = post(&mesh.url(), &format!("/jobs/{}/cancel", ids[0]), "");
    assert_eq!(code, 409, "{body}");
    assert_eq!(depth(), Some(1.0));
    cancel_over_http(&mesh, &ids[2]);
    wait_until(Duration::from_secs(10), "an empty queue", || depth().unwrap_or(0.0) == 0.0);
    w1_still_serves(&mesh);
    for tag in ["p", "q", "r"] {
        assert_eq!(lines(&mesh, &format!("runs-{tag}")).len(), 1, "{tag} ran once, before its backoff");
    }
}

#[test]
fn a_job_past_the_drain_grace_is_handed_back_only_once_its_processes_are_gone() {
    let mesh = mesh();
    let _broker = mesh.broker(&[]);
    let mut w1 = mesh.worker_with("w1", 1, &["--grace", "1s"]);
    mesh.wait_workers(1);
    let id = id_of(&mesh.start("job_name=lingering"));
    wait_until(Duration::from_secs(30), "the job to start", || !lines(&mesh, "linger").is_empty());
    // A second worker is there to take the job as soon as it is handed back.
    let _w2 = mesh.worker("w2", 1);
    mesh.wait_workers(2);
    let status = w1.terminate(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "w1 exit: {status:?}\n{}", mesh.logs());
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["worker"], "w2", "{job}");
    let stamps = lines(&mesh, "linger");
    let fields: Vec<Vec<&str>> = stamps.iter().map(|l| l.split_whitespace().collect()).collect();
    let kinds: Vec<(&str, &str)> = fields.iter().map(|f| (f[0], f[1])).collect();
    assert_eq!(kinds, [("S", "1"), ("E", "1"), ("S", "2")], "{stamps:?}");
    let ns = |i: usize| fields[i][2].parse::<u128>().unwrap_or_else(|e| panic!("stamp {stamps:?}: {e}"));
    assert!(ns(1) <= ns(2), "the second attempt started before the first one's processes were gone: {stamps:?}");
}
