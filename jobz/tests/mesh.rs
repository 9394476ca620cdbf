//! The mesh end to end, with real processes on loopback: a broker, workers,
//! HTTP starts, follow-ups, crashes and restarts.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{get, id_of, json, post, wait_until, Mesh};

const CHAIN: &str = r#"
jobs:
  hello:
    shell: true
    command: "echo hello {who} >> $DIR/out"
    params:
      who: { default: world, pattern: '^[a-z]+$' }
    on_success: [ { job: bye, params: { who: "{who}" } } ]
  bye:
    shell: true
    command: "echo bye {who} >> $DIR/out"
    params:
      who: { required: true }
  breaks:
    shell: true
    command: "echo breaking; exit 3"
    on_failure: [ { job: notify, params: { what: "{job_name} {exit_code}" } } ]
  notify:
    shell: true
    command: "echo notified {what} >> $DIR/out"
    params:
      what: { required: true }
  slow:
    shell: true
    command: "echo run >> $DIR/runs-{tag}; sleep {secs}; echo done"
    params:
      tag: { pattern: '^[a-z0-9]+$' }
      secs: { default: "2", pattern: '^\d+$' }
  noop:
    command: "true"
  everywhere:
    shell: true
    mode: broadcast
    command: "echo attempt $JOBZ_ATTEMPT >> $DIR/broadcast"
"#;

#[test]
fn a_started_job_runs_its_follow_up_in_the_same_run_and_a_failure_runs_its_handler() {
    let mesh = Mesh::new(CHAIN);
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 2);
    mesh.wait_workers(1);

    let started = mesh.start("job_name=hello&who=mesh");
    let id = id_of(&started);
    assert_eq!(started["status"], "queued");
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["worker"], "w1");
    assert_eq!(job["exit_code"], 0);
    for field in ["created_at", "queued_at", "started_at", "finished_at"] {
        assert!(job[field].as_str().is_some_and(|t| t.ends_with('Z')), "{field} is filled: {job}");
    }
    let run_id = job["run_id"].as_str().unwrap_or_default().to_string();
    assert_eq!(run_id, id, "the first job's id is its run's id");
    let bye = support::wait_for(Duration::from_secs(30), || {
        let list = json(&get(&mesh.url(), &format!("/jobs?run_id={run_id}")).1);
        list["jobs"].as_array()?.iter().find(|j| j["job_name"] == "bye" && j["status"] == "succeeded").cloned()
    });
    let Some(bye) = bye else { panic!("bye did not run:\n{}", mesh.logs()) };
    assert_eq!(bye["parent_id"], id.as_str());
    assert_eq!(bye["params"]["who"], "mesh");

    let failing = mesh.start("job_name=breaks");
    let failing_id = id_of(&failing);
    let job = mesh.wait_final(&failing_id, Duration::from_secs(30));
    assert_eq!(job["status"], "failed");
    assert_eq!(job["exit_code"], 3);
    assert!(job["output"].as_str().is_some_and(|o| o.contains("breaking")), "{job}");
    wait_until(Duration::from_secs(30), "the failure handler", || {
        std::fs::read_to_string(mesh.path().join("out")).unwrap_or_default().contains("notified breaks 3")
    });
    let out = std::fs::read_to_string(mesh.path().join("out")).unwrap_or_default();
    assert_eq!(out.lines().filter(|l| *l == "hello mesh").count(), 1, "{out}");
    assert_eq!(out.lines().filter(|l| *l == "bye mesh").count(), 1, "{out}");
}

#[test]
fn bad_starts_get_clear_errors_and_store_nothing() {
    let mesh = Mesh::new(CHAIN);
    let _broker = mesh.broker(&[]);
    let (code, body) = get(&mesh.url(), "/job_start?job_name=nope");
    assert_eq!(code, 404, "{body}");
    assert!(json(&body)["error"].is_string());
    let (code, body) = get(&mesh.url(), "/job_start?job_name=hello&who=NOT-OK");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("who"), "{body}");
    let (code, body) = get(&mesh.url(), "/job_start?job_name=hello&color=red");
    assert_eq!(code, 400, "{body}");
    let (code, _) = get(&mesh.url(), "/jobs/not-a-job");
    assert_eq!(code, 404);
    // Too long: a value over 4 KiB names its param; a request head or body over the
    // front door's limits is a JSON 413, also to a client that writes all of it first.
    let (code, body) = get(&mesh.url(), &format!("/job_start?job_name=hello&who={}", "a".repeat(5000)));
    assert_eq!(code, 400, "{body}");
    assert!(json(&body)["params"]["who"].as_str().is_some_and(|why| why.contains("4096")), "{body}");
    let (code, body) = get(&mesh.url(), &format!("/job_start?job_name=hello&who={}", "a".repeat(200_000)));
    assert_eq!(code, 413, "{body}");
    assert!(json(&body)["error"].as_str().is_some_and(|e| e.contains("request head")), "{body}");
    let big = format!(r#"{{"job_name":"hello","params":{{"who":"{}"}}}}"#, "a".repeat(5 << 20));
    let (code, body) = post(&mesh.url(), "/job_start", &big);
    assert_eq!(code, 413, "{body}");
    assert!(json(&body)["error"].is_string(), "{body}");
    let list = json(&get(&mesh.url(), "/jobs").1);
    assert_eq!(list["jobs"].as_array().map(Vec::len), Some(0), "nothing was stored: {list}");
}

#[test]
fn every_job_answered_202_runs_after_the_broker_is_killed_mid_submission() {
    let mesh = Mesh::new(CHAIN);
    let mut broker = mesh.broker(&[]);
    let accepted: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let url = mesh.url();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let accepted = accepted.clone();
            let url = url.clone();
            std::thread::spawn(move || {
                for _ in 0..250 {
                    let (code, body) = get(&url, "/job_start?job_name=noop");
                    if code == 202 {
                        if let Some(id) = json(&body)["id"].as_str() {
                            if let Ok(mut set) = accepted.lock() {
                                set.insert(id.to_string());
                            }
                        }
                    } else if code == 0 {
                        // The broker is gone: the rest of this client's starts cannot be answered.
                        break;
                    }
                }
            })
        })
        .collect();
    wait_until(Duration::from_secs(60), "some jobs to be accepted", || accepted.lock().is_ok_and(|s| s.len() >= 300));
    broker.kill9();
    for c in clients {
        let _ = c.join();
    }
    let accepted: Vec<String> = accepted.lock().map(|s| s.iter().cloned().collect()).unwrap_or_default();
    assert!(accepted.len() >= 300 && accepted.len() < 2000, "killed mid-way: {} accepted", accepted.len());

    let _broker = mesh.broker(&[]);
    let _w1 = mesh.worker("w1", 4);
    let _w2 = mesh.worker("w2", 4);
    wait_until(Duration::from_secs(120), "every accepted job to succeed", || {
        let list = json(&get(&mesh.url(), "/jobs?status=succeeded&limit=1000").1);
        let done = list["jobs"].as_array().map(Vec::len).unwrap_or(0);
        done >= accepted.len().min(1000)
    });
    for id in &accepted {
        let job = mesh.job(id);
        assert!(job["status"] == "succeeded" || job["status"] == "running" || job["status"] == "queued", "{id}: {job}");
    }
    for id in &accepted {
        let job = mesh.wait_final(id, Duration::from_secs(60));
        assert_eq!(job["status"], "succeeded", "accepted job {id} ran: {job}");
    }
}

#[test]
fn a_job_whose_worker_is_killed_runs_again_on_another_worker() {
    let mesh = Mesh::new(CHAIN);
    let _broker = mesh.broker(&["--lease-timeout", "2s"]);
    let mut w1 = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let started = mesh.start("job_name=slow&tag=k&secs=3");
    let id = id_of(&started);
    wait_until(Duration::from_secs(30), "the job to run on w1", || mesh.job(&id)["status"] == "running");
    w1.kill9();
    let _w2 = mesh.worker("w2", 1);
    let job = mesh.wait_final(&id, Duration::from_secs(60));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["worker"], "w2");
    assert_eq!(job["attempts"], 2, "{job}");
}

#[test]
fn a_late_result_from_a_superseded_attempt_is_recorded_as_stale() {
    let mesh = Mesh::new(CHAIN);
    let _broker = mesh.broker(&["--lease-timeout", "2s"]);
    let w1 = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let started = mesh.start("job_name=slow&tag=s&secs=4");
    let id = id_of(&started);
    wait_until(Duration::from_secs(30), "the job to run on w1", || mesh.job(&id)["status"] == "running");
    // Freeze w1 past its lease: the broker hands the job to w2. The job's own
    // process keeps running; when w1 thaws, it reports a result for a lease that is no longer current.
    w1.signal(libc::SIGSTOP);
    let _w2 = mesh.worker("w2", 1);
    wait_until(Duration::from_secs(30), "the job to move to w2", || mesh.job(&id)["worker"] == "w2");
    std::thread::sleep(Duration::from_secs(3));
    w1.signal(libc::SIGCONT);
    let job = mesh.wait_final(&id, Duration::from_secs(60));
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["worker"], "w2", "the stale result changed nothing: {job}");
    wait_until(Duration::from_secs(30), "the stale result to be recorded", || {
        mesh.job(&id)["attempt_list"].as_array().is_some_and(|a| a.iter().any(|x| x["stale"] == true))
    });
}

#[test]
fn a_broker_restart_while_a_worker_runs_a_job_neither_loses_nor_repeats_it() {
    let mesh = Mesh::new(CHAIN);
    let mut broker = mesh.broker(&[]);
    let _w1 = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let started = mesh.start("job_name=slow&tag=r&secs=3");
    let id = id_of(&started);
    wait_until(Duration::from_secs(30), "the job to run", || mesh.job(&id)["status"] == "running");
    broker.kill9();
    let _broker = mesh.broker(&[]);
    let job = mesh.wait_final(&id, Duration::from_secs(60));
    assert_eq!(job["status"], "succeeded", "{job}\n{}", mesh.logs());
    assert!(job["output"].as_str().is_some_and(|o| o.contains("done")), "{job}");
    std::thread::sleep(Duration::from_secs(2));
    let runs = std::fs::read_to_string(mesh.path().join("runs-r")).unwrap_or_default();
    assert_eq!(runs.lines().count(), 1, "the job ran once");
}

#[test]
fn garbage_on_the_zeromq_port_does_not_stop_the_broker() {
    let mesh = Mesh::new(CHAIN);
    let _broker = mesh.broker(&[]);
    let ctx = zmq::Context::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut sent = 0;
    while std::time::Instant::now() < deadline {
        let Ok(socket) = ctx.socket(zmq::DEALER) else { continue };
        let _ = socket.set_linger(0);
        if socket.connect(&mesh.endpoint()).is_err() {
            continue;
        }
        for _ in 0..50 {
            let frames = 1 + next() % 3;
            let parts: Vec<Vec<u8>> = (0..frames)
                .map(|i| {
                    let len = (next() % 200) as usize;
                    let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                    if i == 0 && next() % 2 == 0 {
                        // Sometimes a valid header with junk after it, or an unknown version.
                        let version = if next() % 2 == 0 { 1 } else { 9 };
                        let mut head = vec![b'J', b'Z', version, (next() % 0x90) as u8];
                        head.append(&mut bytes);
                        bytes = head;
                    }
                    bytes
                })
                .collect();
            if socket.send_multipart(parts, zmq::DONTWAIT).is_ok() {
                sent += 1;
            }
        }
    }
    assert!(sent > 100, "sent {sent} garbage messages");
    let _w1 = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let started = mesh.start("job_name=noop");
    let job = mesh.wait_final(started["id"].as_str().unwrap_or_default(), Duration::from_secs(30));
    assert_eq!(job["status"], "succeeded");
    let metrics = get(&mesh.url(), "/metrics").1;
    assert!(metrics.contains("jobz_bad_frames_total"), "{metrics}");
}

#[test]
fn sigterm_stops_broker_and_worker_cleanly() {
    let mesh = Mesh::new(CHAIN);
    let mut broker = mesh.broker(&[]);
    let mut worker = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let started = mesh.start("job_name=slow&tag=t&secs=1");
    let id = id_of(&started);
    wait_until(Duration::from_secs(30), "the job to run", || mesh.job(&id)["status"] == "running");
    // A draining worker lets its running job finish and report before it exits.
    let status = worker.terminate(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "worker exit: {status:?}\n{}", mesh.logs());
    let job = mesh.job(&id);
    assert_eq!(job["status"], "succeeded", "{job}");
    let status = broker.terminate(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "broker exit: {status:?}");
}

#[test]
fn a_broadcast_job_runs_once_on_each_of_three_workers_with_one_result_each() {
    let mesh = Mesh::new(CHAIN);
    let _broker = mesh.broker(&[]);
    let _workers: Vec<_> = ["w1", "w2", "w3"].iter().map(|n| mesh.worker(n, 1)).collect();
    mesh.wait_workers(3);
    let started = mesh.start("job_name=everywhere");
    let id = id_of(&started);
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "succeeded", "{job}");
    let attempts = job["attempt_list"].as_array().cloned().unwrap_or_default();
    assert_eq!(attempts.len(), 3, "{job}");
    let workers: BTreeSet<String> = attempts.iter().filter_map(|a| a["worker"].as_str().map(String::from)).collect();
    assert_eq!(workers.len(), 3, "one copy per worker: {job}");
    assert!(attempts.iter().all(|a| a["status"] == "succeeded" && a["exit_code"] == 0), "one result each: {job}");
    // The three copies are the job's first attempt, each under its own lease.
    assert_eq!(job["attempts"], 1, "{job}");
    assert!(attempts.iter().all(|a| a["attempt"] == 1), "{job}");
    let lines = std::fs::read_to_string(mesh.path().join("broadcast")).unwrap_or_default();
    assert_eq!(lines.lines().collect::<Vec<_>>(), ["attempt 1"; 3], "ran three times, each as attempt 1: {lines}");
}

#[test]
fn a_queued_job_whose_definition_left_the_job_file_fails_at_restart_with_a_reason() {
    let mesh = Mesh::new(CHAIN);
    let mut broker = mesh.broker(&[]);
    let started = mesh.start("job_name=noop");
    let id = id_of(&started);
    broker.kill9();
    let without = CHAIN.replace("  noop:\n    command: \"true\"\n", "");
    let without = without.replace("$DIR", &mesh.path().display().to_string());
    if let Err(e) = std::fs::write(&mesh.config, without) {
        panic!("rewriting the job file: {e}");
    }
    let _broker = mesh.broker(&[]);
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["error"].as_str().is_some_and(|e| e.contains("no longer")), "{job}");
}

/// `jobz up --workers 0`: the broker, front door and semaphore in one process
/// and no local worker, so a job waits for a worker that connects from elsewhere.
#[test]
fn jobz_up_with_no_local_workers_runs_jobs_on_a_worker_that_connects() {
    let mesh = Mesh::new(CHAIN);
    let http = format!("127.0.0.1:{}", mesh.http_port);
    let endpoint = mesh.endpoint();
    let data = mesh.path().join("data").display().to_string();
    let config = mesh.config.display().to_string();
    let _up = mesh.spawn(
        "up",
        &["up", "--workers", "0", "--config", &config, "--http", &http, "--bind", &endpoint, "--data", &data],
    );
    wait_until(Duration::from_secs(30), "the front door of jobz up", || get(&mesh.url(), "/healthz").0 == 200);
    assert!(mesh.log_lines_with("up", "0 local worker(s) and a semaphore") == 1, "{}", mesh.logs());
    assert!(mesh.log_lines_with("up", &format!("jobz worker --broker {endpoint}")) == 1, "{}", mesh.logs());
    let workers = json(&get(&mesh.url(), "/workers").1);
    assert_eq!(workers["workers"].as_array().map(Vec::len), Some(0), "{workers}");

    let started = mesh.start("job_name=noop");
    let id = id_of(&started);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(mesh.job(&id)["status"], "queued", "no worker has taken it");

    let _worker = mesh.worker("w1", 1);
    let job = mesh.wait_final(&id, Duration::from_secs(30));
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["worker"], "w1", "{job}");
}

/// Flags that name an address or a size the processes cannot use are refused
/// at once, with what the flag takes, and before anything is created.
#[test]
fn bad_addresses_and_sizes_on_the_command_line_are_refused_before_anything_is_created() {
    let mesh = Mesh::new(CHAIN);
    let config = mesh.config.display().to_string();
    let data = mesh.path().join("data");
    let data_arg = data.display().to_string();
    let http = format!("127.0.0.1:{}", mesh.http_port);
    let endpoint = mesh.endpoint();
    let limit = Duration::from_secs(20);
    let cases: [(&[&str], &str); 7] = [
        (
            &["broker", "--config", &config, "--data", &data_arg, "--http", &http, "--bind", "garbage"],
            "--bind: `garbage` is not a ZeroMQ endpoint; use tcp://HOST:PORT",
        ),
        (
            &["up", "--config", &config, "--data", &data_arg, "--http", &http, "--bind", "tcp://127.0.0.1"],
            "--bind: `tcp://127.0.0.1` is not a ZeroMQ endpoint",
        ),
        (
            &["broker", "--config", &config, "--data", &data_arg, "--http", "garbage", "--bind", &endpoint],
            "cannot listen for HTTP on garbage (--http takes HOST:PORT)",
        ),
        (&["worker", "--config", &config, "--broker", "garbage"], "--broker: `garbage` is not a ZeroMQ endpoint"),
        (
            &["worker", "--config", &config, "--broker", "tcp://host:x"],
            "--broker: `tcp://host:x` is not a ZeroMQ endpoint",
        ),
        (
            &["semaphore", "--config", &config, "--broker", "tcp://:6770"],
            "--broker: `tcp://:6770` is not a ZeroMQ endpoint",
        ),
        (
            &["worker", "--config", &config, "--broker", &endpoint, "--concurrency", "0"],
            "--concurrency must be at least 1",
        ),
    ];
    for (args, message) in cases {
        let (code, _, err) = support::run_jobz(mesh.path(), args, &[], limit);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(!err.contains("plain text"), "no warning about a connection that is never made: {err}");
        assert!(!data.exists(), "{args:?} created the data directory");
    }
}

/// A second broker on a data directory that a running broker holds says that
/// it waits for it, gives up with a clear error, and leaves the first one
/// serving with its jobs intact.
#[test]
fn a_second_broker_on_a_data_directory_in_use_says_so_and_leaves_the_first_serving() {
    let mesh = Mesh::new(CHAIN);
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 1);
    mesh.wait_workers(1);
    let before = id_of(&mesh.start("job_name=hello&who=first"));
    let config = mesh.config.display().to_string();
    let data = mesh.path().join("data").display().to_string();
    let http = format!("127.0.0.1:{}", support::free_port());
    let endpoint = format!("tcp://127.0.0.1:{}", support::free_port());
    let args = ["broker", "--config", &config, "--data", &data, "--http", &http, "--bind", &endpoint];
    let (code, _, err) = support::run_jobz(mesh.path(), &args, &[("JOBZ_LOG", "info")], Duration::from_secs(30));
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("in use by another jobz broker; waiting for it to stop"), "{err}");
    assert!(err.contains("is in use by another jobz broker; stop it first"), "{err}");
    let done = mesh.wait_final(&before, Duration::from_secs(30));
    assert_eq!(done["status"], "succeeded", "{done}");
    let after = id_of(&mesh.start("job_name=hello&who=second"));
    let done = mesh.wait_final(&after, Duration::from_secs(30));
    assert_eq!(done["status"], "succeeded", "{done}");
}
