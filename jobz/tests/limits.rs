//! Mesh-wide limits with real processes: `concurrency:` and `rate:` hold across
//! several workers and a broker restart, a held job says which limit holds it,
//! and a limited name does not block the others.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::{get, id_of, json, wait_until, Mesh};

const LIMITED: &str = r#"
jobs:
  capped:
    shell: true
    concurrency: 2
    command: "echo S $JOBZ_JOB_ID $(date +%s%N) >> $DIR/stamps; sleep {secs}; echo E $JOBZ_JOB_ID $(date +%s%N) >> $DIR/stamps"
    params:
      secs: { default: "0.4", pattern: '^[0-9.]+$' }
  single:
    shell: true
    concurrency: 1
    command: "echo S $JOBZ_JOB_ID $(date +%s%N) >> $DIR/single; sleep {secs}; echo E $JOBZ_JOB_ID $(date +%s%N) >> $DIR/single"
    params:
      secs: { default: "3", pattern: '^[0-9.]+$' }
  paced:
    shell: true
    rate: 5/s
    command: "echo $(date +%s%N) >> $DIR/paced"
  free:
    shell: true
    command: "echo $JOBZ_JOB_ID >> $DIR/free"
"#;

/// `(job id, start ns, end ns)` from lines `S id ns` / `E id ns`.
fn intervals(text: &str) -> Vec<(String, u128, u128)> {
    let mut starts: BTreeMap<String, u128> = BTreeMap::new();
    let mut out = Vec::new();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [kind, id, ns] = parts[..] else { panic!("bad stamp line {line:?}") };
        let ns: u128 = ns.parse().unwrap_or_else(|e| panic!("bad stamp {ns:?}: {e}"));
        match kind {
            "S" => {
                starts.insert(id.to_string(), ns);
            }
            "E" => {
                let start = starts.remove(id).unwrap_or_else(|| panic!("end before start for {id}"));
                out.push((id.to_string(), start, ns));
            }
            other => panic!("bad stamp kind {other:?}"),
        }
    }
    assert!(starts.is_empty(), "jobs that started and never ended: {starts:?}");
    out
}

/// The most jobs running at once, from their own start and end stamps.
fn max_overlap(intervals: &[(String, u128, u128)]) -> usize {
    let mut edges: Vec<(u128, i32)> = Vec::new();
    for (_, start, end) in intervals {
        edges.push((*start, 1));
        edges.push((*end, -1));
    }
    // At equal times an end comes before a start: touching is not overlapping.
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    most as usize
}

fn read(mesh: &Mesh, file: &str) -> String {
    std::fs::read_to_string(mesh.path().join(file)).unwrap_or_default()
}

#[test]
fn concurrency_2_across_4_workers_never_runs_more_than_2_and_a_held_job_says_so() {
    let mesh = Mesh::new(LIMITED);
    let _broker = mesh.broker(&[]);
    let _workers: Vec<_> = (1..=4).map(|i| mesh.worker(&format!("w{i}"), 2)).collect();
    mesh.wait_workers(4);

    let ids: Vec<String> = (0..10).map(|_| id_of(&mesh.start("job_name=capped"))).collect();

    // While the first ones run, a job at the back of the queue is held by the limit, and says so.
    let last = ids.last().cloned().unwrap_or_default();
    let mut seen = serde_json::Value::Null;
    let held = support::wait_for(Duration::from_secs(10), || {
        seen = mesh.job(&last);
        (seen["status"] == "queued" && seen["held_by"]["limit"] == "concurrency").then_some(())
    });
    assert!(held.is_some(), "the queued job never said it was held by the concurrency limit: {seen}");
    let message = seen["held_by"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("of 2 running"), "{message}");
    let listed = json(&get(&mesh.url(), "/jobs?job_name=capped&status=queued").1);
    let list = listed["jobs"].as_array().cloned().unwrap_or_default();
    assert!(list.iter().any(|j| j["held_by"]["limit"] == "concurrency"), "{listed}");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_jobz"))
        .args(["status", &last, "--url", &mesh.url()])
        .output()
        .unwrap_or_else(|e| panic!("jobz status: {e}"));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("held by") && text.contains("of 2 running"), "jobz status shows no hold: {text}");

    for id in &ids {
        let job = mesh.wait_final(id, Duration::from_secs(60));
        assert_eq!(job["status"], "succeeded", "{job}");
        assert!(job.get("held_by").is_none(), "a finished job is held by nothing: {job}");
    }
    let runs = intervals(&read(&mesh, "stamps"));
    assert_eq!(runs.len(), 10, "every job ran once");
    assert_eq!(max_overlap(&runs), 2, "at most 2 at once, and the limit was reached: {runs:?}");
    let workers: std::collections::BTreeSet<String> =
        ids.iter().filter_map(|id| mesh.job(id)["worker"].as_str().map(str::to_string)).collect();
    assert!(workers.len() >= 2, "the jobs were spread over the mesh, not run on one worker: {workers:?}");
}

#[test]
fn rate_5_per_second_holds_within_20_percent() {
    let mesh = Mesh::new(LIMITED);
    let _broker = mesh.broker(&[]);
    let _w1 = mesh.worker("w1", 4);
    let _w2 = mesh.worker("w2", 4);
    mesh.wait_workers(2);

    let ids: Vec<String> = (0..20).map(|_| id_of(&mesh.start("job_name=paced"))).collect();
    for id in &ids {
        assert_eq!(mesh.wait_final(id, Duration::from_secs(30))["status"], "succeeded");
    }
    let mut stamps: Vec<u128> =
        read(&mesh, "paced").lines().map(|l| l.trim().parse().unwrap_or_else(|e| panic!("stamp {l:?}: {e}"))).collect();
    stamps.sort();
    assert_eq!(stamps.len(), 20);
    let span = (stamps[19] - stamps[0]) as f64 / 1e9;
    let rate = 19.0 / span;
    assert!((4.0..=6.0).contains(&rate), "19 intervals in {span:.2} s is {rate:.2}/s, not 5/s ± 20%");
    // No second holds more than 5 + 20%.
    for (i, first) in stamps.iter().enumerate() {
        let within = stamps[i..].iter().take_while(|t| **t < first + 1_000_000_000).count();
        assert!(within <= 6, "{within} jobs started within 1 s of {first}: {stamps:?}");
    }
}

#[test]
fn a_limited_name_does_not_block_the_rest_of_the_queue() {
    let mesh = Mesh::new(LIMITED);
    let _broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 3);
    mesh.wait_workers(1);

    // Five jobs of a name limited to one at a time, 3 s each, then free jobs behind them.
    let single: Vec<String> = (0..5).map(|_| id_of(&mesh.start("job_name=single"))).collect();
    let free: Vec<String> = (0..6).map(|_| id_of(&mesh.start("job_name=free"))).collect();
    for id in &free {
        assert_eq!(mesh.wait_final(id, Duration::from_secs(20))["status"], "succeeded");
    }
    let still_queued = single.iter().filter(|id| mesh.job(id)["status"] == "queued").count();
    assert!(still_queued >= 3, "the free jobs should run while the limited ones wait; {still_queued} still queued");
}

#[test]
fn concurrency_holds_across_a_broker_restart() {
    let mesh = Mesh::new(LIMITED);
    let mut broker = mesh.broker(&[]);
    let _worker = mesh.worker("w1", 2);
    mesh.wait_workers(1);

    let first = id_of(&mesh.start("job_name=single&secs=4"));
    wait_until(Duration::from_secs(10), "the first job to run", || mesh.job(&first)["status"] == "running");
    broker.kill9();
    let _broker = mesh.broker(&[]);
    // Started right after the restart, while the first still runs on the worker that holds it.
    let second = id_of(&mesh.start("job_name=single&secs=0.2"));
    for id in [&first, &second] {
        assert_eq!(mesh.wait_final(id, Duration::from_secs(40))["status"], "succeeded", "{}", mesh.logs());
    }
    let runs = intervals(&read(&mesh, "single"));
    assert_eq!(runs.len(), 2, "each ran once: {runs:?}");
    assert_eq!(max_overlap(&runs), 1, "concurrency 1 held across the restart: {runs:?}");
}

#[test]
fn priority_orders_the_queue_and_equal_priorities_stay_first_in_first_out() {
    let mesh = Mesh::new(
        r#"
jobs:
  step:
    shell: true
    command: "echo {tag} >> $DIR/order"
    params:
      tag: { pattern: '^[a-z0-9]+$' }
  urgent:
    shell: true
    priority: 5
    command: "echo {tag} >> $DIR/order"
    params:
      tag: { pattern: '^[a-z0-9]+$' }
"#,
    );
    let _broker = mesh.broker(&[]);
    // Queued before any worker is there, so the queue decides the order.
    let starts = [
        "job_name=step&tag=low1&priority=-3",
        "job_name=step&tag=plain1",
        "job_name=step&tag=high1&priority=10",
        "job_name=urgent&tag=urgent1",
        "job_name=step&tag=plain2",
        "job_name=step&tag=high2&priority=10",
        "job_name=step&tag=low2&priority=-3",
    ];
    let ids: Vec<String> = starts.iter().map(|q| id_of(&mesh.start(q))).collect();
    assert_eq!(mesh.job(&ids[2])["priority"], 10);
    assert_eq!(mesh.job(&ids[3])["priority"], 5, "the job file's priority applies when the start gives none");
    let _worker = mesh.worker("w1", 1);
    for id in &ids {
        assert_eq!(mesh.wait_final(id, Duration::from_secs(30))["status"], "succeeded");
    }
    let order: Vec<String> = read(&mesh, "order").lines().map(str::to_string).collect();
    // By priority across names (the job file's 5 between a start's 10 and the default 0), then first in, first out.
    assert_eq!(order, ["high1", "high2", "urgent1", "plain1", "plain2", "low1", "low2"]);
}
