//! Gate benchmark (`cargo bench -p jobz --bench gates`): how fast upstream
//! successes are recorded durably for the semaphores, and how long a broker
//! and a semaphore that (re)start take to rebuild from 100,000 recorded
//! successes, through the real store, the real processes and ZeroMQ.
//!
//! 10,000 keys (dates) × 10 shards; every key already fired, so the numbers
//! are the rebuild alone: the semaphore replays every event and its fires are
//! answered from the broker's record.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker::model::{Change, FireRecord, GateEventKind, GateEventRecord};
use broker::store::{SqliteStore, Store, StoreOptions};
use chrono::Utc;
use jobz_core::pipeline::GateReason;

const KEYS: usize = 10_000;
const SHARDS: usize = 10;
const EVENTS_PER_COMMIT: usize = 1_000;
const RUNS: usize = 3;

const CONFIG: &str = r#"
jobs:
  shard:
    command: "true"
    params:
      date: { required: true }
      shard: { required: true }
  merge:
    command: "true"
    params:
      date: { required: true }
gates:
  shards_done:
    after: [ shard ]
    count: 10
    key: "{date}"
    then: { job: merge, params: { date: "{date}" } }
"#;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // The bench ends or fails: the processes it started go with it.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Records every event and fire durably; returns events per second.
fn record(dir: &std::path::Path, runtime: &tokio::runtime::Runtime) -> f64 {
    runtime.block_on(async {
        let store = match SqliteStore::open(dir, StoreOptions::default()) {
            Ok(s) => s,
            Err(e) => panic!("store: {e}"),
        };
        let now = Utc::now();
        let mut seq = 0u64;
        let started = Instant::now();
        let mut batch = Vec::with_capacity(EVENTS_PER_COMMIT);
        for shard in 0..SHARDS {
            for key in 0..KEYS {
                seq += 1;
                batch.push(Change::GateEvent(GateEventRecord {
                    seq,
                    kind: GateEventKind::Succeeded,
                    job_id: format!("job-{shard}-{key}"),
                    job_name: "shard".into(),
                    params: BTreeMap::from([
                        ("date".to_string(), format!("d{key}")),
                        ("shard".to_string(), shard.to_string()),
                    ]),
                    run_id: format!("run-{key}"),
                    attempt: 1,
                    at: now,
                }));
                if batch.len() == EVENTS_PER_COMMIT {
                    if let Err(e) = store.commit(std::mem::take(&mut batch)).await {
                        panic!("commit: {e}");
                    }
                }
            }
        }
        let rate = seq as f64 / started.elapsed().as_secs_f64();
        let fires: Vec<Change> = (0..KEYS)
            .map(|key| {
                Change::Fire(FireRecord {
                    gate: "shards_done".into(),
                    key: format!("d{key}"),
                    reason: GateReason::Then,
                    job_id: Some(format!("merge-{key}")),
                    error: None,
                    at: now,
                })
            })
            .collect();
        for chunk in fires.chunks(EVENTS_PER_COMMIT) {
            if let Err(e) = store.commit(chunk.to_vec()).await {
                panic!("commit: {e}");
            }
        }
        store.close().await;
        rate
    })
}

fn spawn(dir: &std::path::Path, args: &[&str], log: &str) -> Killed {
    let log = match std::fs::File::create(dir.join(log)) {
        Ok(f) => f,
        Err(e) => panic!("log: {e}"),
    };
    let child = Command::new(env!("CARGO_BIN_EXE_jobz"))
        .args(args)
        .current_dir(dir)
        .env("JOBZ_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn();
    match child {
        Ok(c) => Killed(c),
        Err(e) => panic!("cannot start jobz: {e}"),
    }
}

/// Waits for a line containing `needle` in `log`, up to `limit`.
fn wait_line(path: &std::path::Path, needle: &str, limit: Duration) -> Option<Instant> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(file) = std::fs::File::open(path) {
            if BufReader::new(file).lines().map_while(Result::ok).any(|l| l.contains(needle)) {
                return Some(Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

fn main() {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => panic!("runtime: {e}"),
    };
    let mut record_rates = Vec::new();
    let mut broker_starts = Vec::new();
    let mut rebuilds = Vec::new();
    for run in 0..RUNS {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let data = dir.path().join("data");
        record_rates.push(record(&data, &runtime));
        let config = dir.path().join("jobz.yaml");
        if let Err(e) = std::fs::write(&config, CONFIG) {
            panic!("config: {e}");
        }
        let (http, zmq) = (free_port(), free_port());
        let http_addr = format!("127.0.0.1:{http}");
        let endpoint = format!("tcp://127.0.0.1:{zmq}");
        let (config, data) = (config.display().to_string(), data.display().to_string());
        let started = Instant::now();
        let _broker = spawn(
            dir.path(),
            &["broker", "--config", &config, "--http", &http_addr, "--bind", &endpoint, "--data", &data],
            "broker.log",
        );
        while !healthy(http) {
            if started.elapsed() > Duration::from_secs(120) {
                panic!("the broker did not come up");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        broker_starts.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let _semaphore = spawn(dir.path(), &["semaphore", "--broker", &endpoint, "--config", &config], "semaphore.log");
        let Some(done) = wait_line(&dir.path().join("semaphore.log"), "caught up", Duration::from_secs(300)) else {
            panic!("the semaphore did not catch up (run {run})");
        };
        rebuilds.push((done - started).as_secs_f64());
    }
    let events = (KEYS * SHARDS) as f64;
    println!("gates benchmark: {KEYS} keys x {SHARDS} shards = {events} recorded successes, median of {RUNS} runs");
    println!(
        "  recording successes durably (SQLite, each commit synced, {EVENTS_PER_COMMIT} per commit): {:.0} events/s",
        median(record_rates)
    );
    println!("  broker start to /healthz, replaying the events for GET /gates: {:.3} s", median(broker_starts));
    println!(
        "  semaphore start to caught up (connect, page through every event, count, fires answered): {:.3} s ({:.0} events/s)",
        median(rebuilds.clone()),
        events / median(rebuilds)
    );
}
