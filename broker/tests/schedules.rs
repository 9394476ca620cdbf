//! Schedules in the real broker loop, with a real store in a temp dir and a
//! hand-moved clock: one job per instant across the Europe/Madrid daylight
//! saving changes of 2026, catch-up after a restart (`latest` and `none`), a
//! clock that jumps forward or back, a refused fire, and `GET /schedules`.
//!
//! Every wait polls under a deadline. "Nothing more fires" is watched for
//! [`QUIET`], several of the loop's ticks.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use broker::clock::ManualClock;
use broker::core::BrokerConfig;
use broker::handle::BrokerHandle;
use broker::model::{Change, JobFilter, JobRecord, Progress};
use broker::store::{SqliteStore, Store, StoreError, StoreOptions};
use chrono::{DateTime, Utc};
use jobz_core::pipeline::Origin;
use jobz_core::transport::{Router, SocketOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(500);

fn utc(text: &str) -> DateTime<Utc> {
    text.parse().expect("an RFC 3339 time")
}

struct Broker {
    handle: BrokerHandle,
    task: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
    _ctx: zmq::Context,
}

impl Broker {
    async fn start(dir: &Path, file: Arc<config::JobFile>, clock: &ManualClock) -> Broker {
        let store = SqliteStore::open(dir, StoreOptions::default()).expect("open the store");
        Broker::start_on(dir, file, clock, store).await
    }

    async fn start_on(dir: &Path, file: Arc<config::JobFile>, clock: &ManualClock, store: SqliteStore) -> Broker {
        let ctx = zmq::Context::new();
        let router = Router::bind(&ctx, "tcp://127.0.0.1:0", &SocketOptions::default()).expect("bind");
        let mut config = BrokerConfig::new(file, dir.to_path_buf());
        config.clock = Arc::new(clock.clone());
        let stop = CancellationToken::new();
        let (handle, task) = broker::core::start(config, store, router, stop.clone()).await.expect("the broker starts");
        Broker { handle, task, stop, _ctx: ctx }
    }

    /// Stops the loop (which flushes and closes the store) and waits for it.
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(DEADLINE, self.task).await.expect("the loop stops").expect("the loop ends cleanly");
    }

    async fn jobs(&self, name: &str) -> Vec<JobRecord> {
        let filter = JobFilter { job_name: Some(name.to_string()), limit: 10_000, ..JobFilter::default() };
        self.handle.jobs(filter).await.expect("list jobs")
    }

    /// Waits until `name` has `n` jobs, and checks it has no more.
    async fn wait_jobs(&self, name: &str, n: usize) -> Vec<JobRecord> {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let jobs = self.jobs(name).await;
            assert!(jobs.len() <= n, "{name}: {} jobs, expected {n}", jobs.len());
            if jobs.len() == n {
                return jobs;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: {} jobs after {DEADLINE:?}, expected {n}",
                jobs.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Watches for [`QUIET`] that the job counts stay as they are.
    async fn stays(&self, counts: &[(&str, usize)]) {
        tokio::time::sleep(QUIET).await;
        for (name, n) in counts {
            assert_eq!(self.jobs(name).await.len(), *n, "{name} fired again");
        }
    }

    async fn schedule(&self, job_name: &str) -> Value {
        let view = self.handle.schedules().await;
        let list = view.as_array().expect("a list of schedules");
        list.iter().find(|s| s["job_name"] == job_name).cloned().unwrap_or_else(|| panic!("no {job_name} in {view}"))
    }
}

fn job_file(yaml: &str) -> Arc<config::JobFile> {
    Arc::new(config::parse("schedules.yaml", yaml).expect("a valid job file"))
}

/// Every recorded fire instant of `schedule_id`, oldest first, read from the closed store.
async fn fired_instants(dir: &Path, schedule_id: &str) -> Vec<DateTime<Utc>> {
    let store = SqliteStore::open(dir, StoreOptions::default()).expect("reopen the store");
    let fires = store.schedule_fires(schedule_id, 100_000).await.expect("read fires");
    store.close().await;
    let mut instants: Vec<DateTime<Utc>> = fires.iter().map(|f| f.instant).collect();
    instants.reverse();
    instants
}

fn every_minute(from: &str, count: i64) -> Vec<DateTime<Utc>> {
    (1..=count).map(|i| utc(from) + chrono::Duration::minutes(i)).collect()
}

const DST: &str = r#"
jobs:
  daily:
    command: "true"
    schedule: { cron: "30 2 * * *", timezone: Europe/Madrid }
  hourly:
    command: "true"
    schedule: { cron: "0 * * * *", timezone: Europe/Madrid }
  minutely:
    command: "true"
    schedule: { cron: "* * * * *", timezone: Europe/Madrid }
"#;

/// Moves the clock from `from` in `step_minutes` steps for `steps` steps, each time
/// waiting until the every-minute schedule has caught up, so every window is live.
async fn walk(broker: &Broker, clock: &ManualClock, from: &str, step_minutes: i64, steps: i64) {
    for step in 1..=steps {
        clock.set(utc(from) + chrono::Duration::minutes(step * step_minutes));
        broker.wait_jobs("minutely", (step * step_minutes) as usize).await;
    }
}

/// Walks the clock over a daylight saving change in 10-minute steps and checks
/// each schedule's recorded instants, one job each.
async fn check_dst_change(start: &str, steps: i64, daily: &[&str], hourly: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(utc(start));
    let broker = Broker::start(dir.path(), job_file(DST), &clock).await;
    walk(&broker, &clock, start, 10, steps).await;
    broker.wait_jobs("daily", daily.len()).await;
    broker.wait_jobs("hourly", hourly.len()).await;
    let minutes = steps * 10;
    broker.stays(&[("daily", daily.len()), ("hourly", hourly.len()), ("minutely", minutes as usize)]).await;
    let mut ids = Vec::new();
    for name in ["daily", "hourly", "minutely"] {
        let view = broker.schedule(name).await;
        ids.push(view["id"].as_str().expect("an id").to_string());
        let jobs = broker.jobs(name).await;
        assert!(jobs.iter().all(|j| j.origin == Origin::Schedule && j.run_id == j.id), "{jobs:?}");
        let newest = jobs.first().expect("a job");
        assert_eq!(view["last_job_id"], newest.id.as_str(), "{view}");
    }
    broker.stop().await;
    let expected = |list: &[&str]| list.iter().map(|t| utc(t)).collect::<Vec<_>>();
    assert_eq!(fired_instants(dir.path(), &ids[0]).await, expected(daily), "daily");
    assert_eq!(fired_instants(dir.path(), &ids[1]).await, expected(hourly), "hourly");
    let minutely = fired_instants(dir.path(), &ids[2]).await;
    assert_eq!(minutely, every_minute(start, minutes), "every real minute once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spring_forward_in_madrid_fires_each_instant_once() {
    // 02:00 local (01:00Z) jumps to 03:00: the daily 02:30 fires once at 03:00 CEST.
    check_dst_change(
        "2026-03-29T00:20:00Z",
        12,
        &["2026-03-29T01:00:00Z"],
        &["2026-03-29T01:00:00Z", "2026-03-29T02:00:00Z"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fall_back_in_madrid_fires_each_instant_once() {
    // 03:00 local (01:00Z) goes back to 02:00: the daily 02:30 fires once, at 02:30 CEST;
    // the hourly one fires every real hour, 02:00 twice on the wall clock.
    check_dst_change(
        "2026-10-24T23:40:00Z",
        18,
        &["2026-10-25T00:30:00Z"],
        &["2026-10-25T00:00:00Z", "2026-10-25T01:00:00Z", "2026-10-25T02:00:00Z"],
    )
    .await;
}

const CATCH_UP: &str = r#"
jobs:
  caught:
    command: "true"
    schedule: { cron: "0 * * * *", timezone: Europe/Madrid }
  skipped:
    command: "true"
    schedule: { cron: "0 * * * *", timezone: Europe/Madrid, catch_up: none }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_latest_missed_instant_fires_once_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(utc("2026-03-29T00:50:00Z"));
    let broker = Broker::start(dir.path(), job_file(CATCH_UP), &clock).await;
    clock.set(utc("2026-03-29T01:00:30Z"));
    broker.wait_jobs("caught", 1).await;
    broker.wait_jobs("skipped", 1).await;
    broker.stop().await;

    // Down over 02:00Z and 03:00Z.
    clock.set(utc("2026-03-29T03:20:00Z"));
    let broker = Broker::start(dir.path(), job_file(CATCH_UP), &clock).await;
    broker.wait_jobs("caught", 2).await;
    broker.stays(&[("caught", 2), ("skipped", 1)]).await;
    let caught = broker.schedule("caught").await;
    assert_eq!(caught["last_fired"], "2026-03-29T03:00:00.000Z", "{caught}");
    assert_eq!(caught["next"], "2026-03-29T04:00:00.000Z", "{caught}");
    assert_eq!(caught["catch_up"], "latest");
    let skipped = broker.schedule("skipped").await;
    assert_eq!(skipped["last_fired"], "2026-03-29T01:00:00.000Z", "{skipped}");
    assert_eq!(skipped["catch_up"], "none");
    broker.stop().await;

    // A second restart finds nothing missed.
    clock.set(utc("2026-03-29T03:25:00Z"));
    let broker = Broker::start(dir.path(), job_file(CATCH_UP), &clock).await;
    broker.stays(&[("caught", 2), ("skipped", 1)]).await;
    // And the next instant fires live for both.
    clock.set(utc("2026-03-29T04:00:00Z"));
    broker.wait_jobs("caught", 3).await;
    broker.wait_jobs("skipped", 2).await;
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_schedule_fires_nothing_from_before_it_was_first_seen() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(utc("2026-05-01T05:30:00Z"));
    let broker = Broker::start(dir.path(), job_file(CATCH_UP), &clock).await;
    broker.stays(&[("caught", 0), ("skipped", 0)]).await;
    let view = broker.schedule("caught").await;
    assert_eq!(view["last_fired"], Value::Null, "{view}");
    assert_eq!(view["last_job_id"], Value::Null, "{view}");
    assert_eq!(view["first_seen"], "2026-05-01T05:30:00.000Z", "{view}");
    assert_eq!(view["next"], "2026-05-01T06:00:00.000Z", "{view}");
    assert_eq!(view["timezone"], "Europe/Madrid");
    assert_eq!(view["cron"], "0 * * * *");
    broker.stop().await;
    // Restarted after its first instant: the first sighting was stored, so that instant is missed, not unknown.
    clock.set(utc("2026-05-01T06:10:00Z"));
    let broker = Broker::start(dir.path(), job_file(CATCH_UP), &clock).await;
    broker.wait_jobs("caught", 1).await;
    broker.stays(&[("caught", 1), ("skipped", 0)]).await;
    assert_eq!(broker.schedule("caught").await["first_seen"], "2026-05-01T05:30:00.000Z");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_that_jumps_back_fires_nothing_twice_and_one_that_jumps_far_ahead_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(utc("2026-05-01T09:59:00Z"));
    let broker = Broker::start(dir.path(), job_file(CATCH_UP), &clock).await;
    clock.set(utc("2026-05-01T10:00:30Z"));
    broker.wait_jobs("caught", 1).await;
    broker.wait_jobs("skipped", 1).await;
    // Back by an hour, then forward again over 10:00Z: it fired already.
    clock.set(utc("2026-05-01T09:00:30Z"));
    broker.stays(&[("caught", 1), ("skipped", 1)]).await;
    clock.set(utc("2026-05-01T10:00:40Z"));
    broker.stays(&[("caught", 1), ("skipped", 1)]).await;
    // Three and a half hours ahead at once, more than `SCHEDULE_CLOCK_JUMP`: missed, like downtime.
    clock.set(utc("2026-05-01T13:30:00Z"));
    broker.wait_jobs("caught", 2).await;
    broker.stays(&[("caught", 2), ("skipped", 1)]).await;
    assert_eq!(broker.schedule("caught").await["last_fired"], "2026-05-01T13:00:00.000Z");
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_listed_twice_fires_once_per_instant() {
    let yaml = r#"
jobs:
  twice:
    command: "true"
    schedule:
      - { cron: "*/5 * * * *", timezone: UTC }
      - { cron: "*/5  * * * *", timezone: UTC, catch_up: none }
"#;
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(utc("2026-05-01T10:01:00Z"));
    let broker = Broker::start(dir.path(), job_file(yaml), &clock).await;
    clock.set(utc("2026-05-01T10:10:00Z"));
    broker.wait_jobs("twice", 2).await;
    broker.stays(&[("twice", 2)]).await;
    assert_eq!(broker.handle.schedules().await.as_array().map(Vec::len), Some(1));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_the_job_refuses_is_recorded_with_its_reason_and_others_go_on() {
    let yaml = r#"
jobs:
  picky:
    command: "echo {size}"
    params: { size: { default: small, one_of: [ small, large ] } }
    schedule: { cron: "* * * * *", timezone: UTC, params: { size: large } }
  fine:
    command: "true"
    schedule: { cron: "* * * * *", timezone: UTC }
"#;
    // A job file edited behind the checks' back: the schedule's params no longer pass.
    let mut file = config::parse("schedules.yaml", yaml).expect("a valid job file");
    let picky = file.jobs.get_mut("picky").expect("picky");
    picky.schedules[0].params.insert("size".into(), "huge".into());
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(utc("2026-05-01T10:00:30Z"));
    let broker = Broker::start(dir.path(), Arc::new(file), &clock).await;
    clock.set(utc("2026-05-01T10:02:00Z"));
    broker.wait_jobs("fine", 2).await;
    broker.stays(&[("picky", 0), ("fine", 2)]).await;
    let view = broker.schedule("picky").await;
    assert_eq!(view["last_fired"], "2026-05-01T10:02:00.000Z", "{view}");
    assert_eq!(view["last_job_id"], Value::Null, "{view}");
    let fired = view["fired"].as_array().expect("fired");
    assert_eq!(fired.len(), 2, "{view}");
    assert!(fired[0]["error"].as_str().is_some_and(|e| e.contains("param \"size\"")), "{view}");
    let instants: BTreeSet<&str> = fired.iter().filter_map(|f| f["instant"].as_str()).collect();
    assert_eq!(instants, BTreeSet::from(["2026-05-01T10:01:00.000Z", "2026-05-01T10:02:00.000Z"]));
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fire_the_store_cannot_take_fires_again_once_it_can_and_only_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), StoreOptions { queue_capacity: 4, ..StoreOptions::default() })
        .expect("open the store");
    let clock = ManualClock::new(utc("2026-05-01T09:59:00Z"));
    let broker = Broker::start_on(dir.path(), job_file(CATCH_UP), &clock, store.clone()).await;
    // Hold the writer and fill its queue: every commit is answered Busy.
    let paused = store.pause_writes().await.expect("pause");
    let filler = || vec![Change::Progress { id: "none".into(), progress: Progress { percent: 1.0, message: None } }];
    while store.commit_later(filler()).is_ok() {}
    assert!(matches!(store.commit_later(filler()), Err(StoreError::Busy)));
    clock.set(utc("2026-05-01T10:00:30Z"));
    broker.stays(&[("caught", 0), ("skipped", 0)]).await;
    drop(paused);
    broker.wait_jobs("caught", 1).await;
    broker.wait_jobs("skipped", 1).await;
    broker.stays(&[("caught", 1), ("skipped", 1)]).await;
    assert_eq!(broker.schedule("caught").await["last_fired"], "2026-05-01T10:00:00.000Z");
    broker.stop().await;
}
