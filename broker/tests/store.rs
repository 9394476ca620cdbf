//! The durable store against a real SQLite file in a fresh temp dir per test:
//! every change's effect on the rows, durability across a reopen and a
//! `kill -9`, group commit, rollback on failure, back-pressure, and the
//! queries recovery, listings, pruning and metrics use.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker::model::{
    Admission, AttemptRecord, Change, FireRecord, GateEventKind, GateEventRecord, GuardedInsert, IdempotencyClaim,
    JobFilter, JobRecord, Progress, ScheduleFireRecord, ScheduleRecord,
};
use broker::store::{SqliteStore, Store, StoreError, StoreOptions, DB_FILE_NAME};
use chrono::{DateTime, TimeDelta, Utc};
use jobz_core::pipeline::{GateReason, NewJob, Origin};
use jobz_core::Status;
use rusqlite::ErrorCode;

/// Every wait in these tests polls its condition for at most this long.
const WAIT_MAX: Duration = Duration::from_secs(10);

/// A fixed instant at microsecond precision (what the store keeps), `seconds` after a base.
fn at(seconds: i64) -> DateTime<Utc> {
    let base = DateTime::from_timestamp(1_700_000_000, 123_456_000).expect("a valid base time");
    base + TimeDelta::seconds(seconds)
}

fn queued(id: &str, job_name: &str, created: DateTime<Utc>) -> JobRecord {
    let new = NewJob {
        job_name: job_name.to_owned(),
        params: BTreeMap::from([("date".to_owned(), "2024_01_31".to_owned())]),
        run_id: None,
        parent_id: None,
        origin: Origin::Start,
    };
    JobRecord::queued(id.to_owned(), &new, 0, created)
}

fn open(dir: &Path) -> SqliteStore {
    SqliteStore::open(dir, StoreOptions::default()).expect("open the store")
}

/// Options under which every commit, plain starts included, is a SQLite
/// transaction before it is answered: for tests of transactions themselves
/// (group commit, refusals, storage failures).
fn transactional() -> StoreOptions {
    StoreOptions { defer_starts: false, ..StoreOptions::default() }
}

async fn job(store: &SqliteStore, id: &str) -> JobRecord {
    store.job(id).await.expect("read").unwrap_or_else(|| panic!("job {id} is missing"))
}

/// Polls `condition` until it holds, failing the test after [`WAIT_MAX`].
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT_MAX;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Starts `count` commits of one Insert each as separate tasks and waits until
/// all of them are queued behind a paused writer.
async fn queue_commits(
    store: &SqliteStore,
    batches: Vec<Vec<Change>>,
) -> Vec<tokio::task::JoinHandle<Result<(), StoreError>>> {
    let before = store.stats().queued;
    let count = batches.len() as u64;
    let handles: Vec<_> = batches
        .into_iter()
        .map(|changes| {
            let store = store.clone();
            tokio::spawn(async move { store.commit(changes).await })
        })
        .collect();
    wait_until("every commit is queued", || store.stats().queued == before + count).await;
    handles
}

/// Commits `batches` as concurrent callers queued behind a paused writer, so
/// that the writer takes them up together; each caller's answer, in order.
async fn commit_together(store: &SqliteStore, batches: Vec<Vec<Change>>) -> Vec<Result<(), StoreError>> {
    let paused = store.pause_writes().await.expect("pause the writer");
    let handles = queue_commits(store, batches).await;
    drop(paused);
    with_timeout(join_all(handles)).await
}

async fn join_all<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("the commit task panicked"));
    }
    out
}

async fn with_timeout<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT_MAX, future).await.expect("timed out")
}

// ---- Records and changes ----

#[tokio::test]
async fn insert_round_trips_every_field_including_unicode_and_none_vs_some() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut bare = queued("bare", "import", at(0));
    bare.queued_at = None;
    bare.params = BTreeMap::new();
    let full = JobRecord {
        id: "full-ünïcødé-🚀".into(),
        job_name: "import_category_dump".into(),
        params: BTreeMap::from([
            ("städte".into(), "Zürich, 東京, Кёльн 🚀".into()),
            ("quotes".into(), "a \"b\" \\ c' {d}".into()),
            ("empty".into(), String::new()),
        ]),
        status: Status::Failed,
        attempts: 3,
        run_id: "run-1".into(),
        parent_id: Some("parent-1".into()),
        origin: Origin::Gate { gate: "all_shards_done".into(), key: "2024_01_31".into(), reason: GateReason::Failure },
        priority: -7,
        worker: Some("worker-ä".into()),
        lease: Some(u64::MAX),
        exit_code: Some(-2),
        signal: Some(9),
        created_at: at(1),
        queued_at: Some(at(2)),
        started_at: Some(at(3)),
        finished_at: Some(at(4)),
        cancelled_at: Some(at(5)),
        not_before: Some(at(6)),
        output_tail: "last line ✓\n".into(),
        progress: Some(Progress { percent: 42.5, message: Some("halfway ½".into()) }),
        error: Some("worker does not know the job".into()),
        unique_key: Some("2024_01_31/Zürich".into()),
    };
    let mut origins = vec![bare.clone(), full.clone()];
    for (i, origin) in [
        Origin::Start,
        Origin::OnSuccess,
        Origin::OnFailure,
        Origin::Schedule,
        Origin::Gate { gate: "g".into(), key: "k".into(), reason: GateReason::Then },
        Origin::Gate { gate: "g".into(), key: "k".into(), reason: GateReason::Timeout },
    ]
    .into_iter()
    .enumerate()
    {
        let mut job = queued(&format!("origin-{i}"), "import", at(10 + i as i64));
        job.origin = origin;
        job.progress = Some(Progress { percent: 0.0, message: None });
        origins.push(job);
    }
    store.commit(origins.iter().cloned().map(Change::Insert).collect()).await.unwrap();

    for expected in &origins {
        assert_eq!(&job(&store, &expected.id).await, expected);
    }
    let listed = store.jobs(JobFilter::default()).await.unwrap();
    assert_eq!(listed.len(), origins.len());
    assert!(listed.contains(&full));
    assert_eq!(store.job("nope").await.unwrap(), None);
}

#[tokio::test]
async fn times_are_kept_at_microsecond_precision() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let precise = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
    store.commit(vec![Change::Insert(queued("a", "import", precise))]).await.unwrap();
    let read = job(&store, "a").await;
    assert_eq!(read.created_at, broker::store::to_store_precision(precise));
    assert_eq!(read.created_at.timestamp_subsec_nanos(), 123_456_000);
}

#[tokio::test]
async fn every_change_applies_as_documented_on_job_and_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut expected = queued("j", "import", at(0));
    store.commit(vec![Change::Insert(expected.clone())]).await.unwrap();
    assert_eq!(job(&store, "j").await, expected);
    assert!(store.attempts("j").await.unwrap().is_empty());

    // Dispatch: running, attempt 1 under lease 7.
    let dispatch = |attempt, lease, worker: &str, t| Change::Dispatch {
        id: "j".into(),
        job_name: "import".into(),
        attempt,
        worker: worker.into(),
        lease,
        at: t,
    };
    store.commit(vec![dispatch(1, 7, "w1", at(1))]).await.unwrap();
    expected.status = Status::Running;
    expected.attempts = 1;
    expected.worker = Some("w1".into());
    expected.lease = Some(7);
    expected.started_at = Some(at(1));
    assert_eq!(job(&store, "j").await, expected);
    let mut attempt1 = AttemptRecord {
        job_id: "j".into(),
        attempt: 1,
        worker: "w1".into(),
        lease: 7,
        started_at: at(1),
        finished_at: None,
        status: None,
        exit_code: None,
        stale: false,
    };
    assert_eq!(store.attempts("j").await.unwrap(), vec![attempt1.clone()]);

    // Progress: only the progress columns.
    let progress = Progress { percent: 50.0, message: Some("half ½".into()) };
    store.commit(vec![Change::Progress { id: "j".into(), progress: progress.clone() }]).await.unwrap();
    expected.progress = Some(progress);
    assert_eq!(job(&store, "j").await, expected);

    // Finish: the final status and result, on the job and its attempt.
    store
        .commit(vec![Change::Finish {
            id: "j".into(),
            job_name: "import".into(),
            lease: 7,
            status: Status::Failed,
            exit_code: Some(3),
            signal: None,
            at: at(2),
            output_tail: "boom\n".into(),
            error: None,
        }])
        .await
        .unwrap();
    expected.status = Status::Failed;
    expected.finished_at = Some(at(2));
    expected.exit_code = Some(3);
    expected.output_tail = "boom\n".into();
    assert_eq!(job(&store, "j").await, expected);
    attempt1.finished_at = Some(at(2));
    attempt1.status = Some(Status::Failed);
    attempt1.exit_code = Some(3);
    assert_eq!(store.attempts("j").await.unwrap(), vec![attempt1.clone()]);

    // Retry: queued again, attempts unchanged, the finish fields cleared.
    store.commit(vec![Change::Retry { id: "j".into(), at: at(3), not_before: Some(at(13)) }]).await.unwrap();
    expected.status = Status::Queued;
    expected.queued_at = Some(at(3));
    expected.not_before = Some(at(13));
    expected.finished_at = None;
    expected.exit_code = None;
    expected.output_tail = String::new();
    expected.lease = None;
    expected.progress = None;
    assert_eq!(job(&store, "j").await, expected);

    // Dispatch attempt 2, then the worker is lost: Requeue with a not_before.
    store.commit(vec![dispatch(2, 8, "w2", at(4))]).await.unwrap();
    store
        .commit(vec![Change::Requeue {
            id: "j".into(),
            job_name: "import".into(),
            at: at(5),
            not_before: Some(at(15)),
        }])
        .await
        .unwrap();
    expected.attempts = 2;
    expected.worker = Some("w2".into());
    expected.started_at = Some(at(4));
    expected.queued_at = Some(at(5));
    expected.not_before = Some(at(15));
    assert_eq!(job(&store, "j").await, expected);
    let mut attempt2 = AttemptRecord {
        job_id: "j".into(),
        attempt: 2,
        worker: "w2".into(),
        lease: 8,
        started_at: at(4),
        finished_at: Some(at(5)),
        status: None,
        exit_code: None,
        stale: false,
    };
    assert_eq!(store.attempts("j").await.unwrap(), vec![attempt1.clone(), attempt2.clone()]);

    // Attempt 3 runs; attempt 2's worker comes back with a result: Stale.
    store.commit(vec![dispatch(3, 9, "w3", at(16))]).await.unwrap();
    store
        .commit(vec![Change::Stale {
            id: "j".into(),
            lease: 8,
            worker: "w2".into(),
            status: Status::Succeeded,
            exit_code: Some(0),
            at: at(17),
        }])
        .await
        .unwrap();
    expected.attempts = 3;
    expected.status = Status::Running;
    expected.worker = Some("w3".into());
    expected.lease = Some(9);
    expected.started_at = Some(at(16));
    expected.not_before = None;
    assert_eq!(job(&store, "j").await, expected, "a stale result leaves the job untouched");
    attempt2.stale = true;
    attempt2.status = Some(Status::Succeeded);
    attempt2.exit_code = Some(0);
    attempt2.finished_at = Some(at(17));
    let attempt3 = AttemptRecord {
        job_id: "j".into(),
        attempt: 3,
        worker: "w3".into(),
        lease: 9,
        started_at: at(16),
        finished_at: Some(at(18)),
        status: Some(Status::Cancelled),
        exit_code: None,
        stale: false,
    };

    // Cancel the running attempt 3.
    store.commit(vec![Change::Cancel { id: "j".into(), at: at(18) }]).await.unwrap();
    expected.status = Status::Cancelled;
    expected.cancelled_at = Some(at(18));
    expected.finished_at = Some(at(18));
    assert_eq!(job(&store, "j").await, expected);
    assert_eq!(store.attempts("j").await.unwrap(), vec![attempt1, attempt2, attempt3]);

    // A queued job cancels without any attempt.
    store.commit(vec![Change::Insert(queued("q", "import", at(20)))]).await.unwrap();
    store.commit(vec![Change::Cancel { id: "q".into(), at: at(21) }]).await.unwrap();
    let q = job(&store, "q").await;
    assert_eq!((q.status, q.cancelled_at, q.finished_at), (Status::Cancelled, Some(at(21)), Some(at(21))));
    assert_eq!(store.stats().skipped, 0);
}

#[tokio::test]
async fn finishing_with_a_wrong_lease_or_in_a_wrong_state_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.commit(vec![Change::Insert(queued("j", "import", at(0)))]).await.unwrap();
    let finish = |lease| Change::Finish {
        id: "j".into(),
        job_name: "import".into(),
        lease,
        status: Status::Succeeded,
        exit_code: Some(0),
        signal: None,
        at: at(5),
        output_tail: "done".into(),
        error: None,
    };
    // Not running yet: a finish is a no-op.
    store.commit(vec![finish(7)]).await.unwrap();
    assert_eq!(job(&store, "j").await, queued("j", "import", at(0)));

    store
        .commit(vec![Change::Dispatch {
            id: "j".into(),
            job_name: "import".into(),
            attempt: 1,
            worker: "w".into(),
            lease: 7,
            at: at(1),
        }])
        .await
        .unwrap();
    let running = job(&store, "j").await;
    let attempts = store.attempts("j").await.unwrap();
    let skipped = store.stats().skipped;

    store.commit(vec![finish(6)]).await.unwrap();
    assert_eq!(job(&store, "j").await, running, "a wrong lease changes nothing");
    assert_eq!(store.attempts("j").await.unwrap(), attempts);
    // A second dispatch of a running job, and a stale result for a lease never handed out, are no-ops too.
    store
        .commit(vec![
            Change::Dispatch {
                id: "j".into(),
                job_name: "import".into(),
                attempt: 2,
                worker: "x".into(),
                lease: 8,
                at: at(2),
            },
            Change::Stale {
                id: "j".into(),
                lease: 99,
                worker: "w".into(),
                status: Status::Failed,
                exit_code: None,
                at: at(2),
            },
        ])
        .await
        .unwrap();
    assert_eq!(job(&store, "j").await, running);
    assert_eq!(store.attempts("j").await.unwrap(), attempts);
    assert_eq!(store.stats().skipped, skipped + 3);

    // The right lease finishes it; a second finish with the same lease is a no-op.
    store.commit(vec![finish(7)]).await.unwrap();
    let finished = job(&store, "j").await;
    assert_eq!(finished.status, Status::Succeeded);
    store.commit(vec![finish(7)]).await.unwrap();
    assert_eq!(job(&store, "j").await, finished);
}

#[tokio::test]
async fn changes_for_unknown_ids_are_no_ops_not_errors() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit(vec![
            Change::Cancel { id: "pruned".into(), at: at(0) },
            Change::Insert(queued("new", "import", at(0))),
            Change::Dispatch {
                id: "pruned".into(),
                job_name: "import".into(),
                attempt: 1,
                worker: "w".into(),
                lease: 1,
                at: at(0),
            },
            Change::Requeue { id: "pruned".into(), job_name: "import".into(), at: at(0), not_before: None },
            Change::Retry { id: "pruned".into(), at: at(0), not_before: None },
            Change::Progress { id: "pruned".into(), progress: Progress { percent: 1.0, message: None } },
        ])
        .await
        .unwrap();
    assert_eq!(job(&store, "new").await, queued("new", "import", at(0)));
    assert_eq!(store.stats().skipped, 5);
}

#[tokio::test]
async fn a_non_finite_progress_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let err = store
        .commit(vec![
            Change::Insert(queued("j", "import", at(0))),
            Change::Progress { id: "j".into(), progress: Progress { percent: f64::NAN, message: None } },
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Rejected { .. }), "{err:?}");
    assert_eq!(store.job("j").await.unwrap(), None, "nothing of the refused commit is stored");
}

// ---- Durability ----

#[tokio::test]
async fn committed_jobs_survive_dropping_the_store_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let jobs: Vec<JobRecord> = (0..500).map(|i| queued(&format!("job-{i:04}"), "import", at(i))).collect();
    {
        let store = open(dir.path());
        for chunk in jobs.chunks(50) {
            store.commit(chunk.iter().cloned().map(Change::Insert).collect()).await.unwrap();
        }
        // Dropped without close().
    }
    let store = open(dir.path());
    for expected in &jobs {
        assert_eq!(&job(&store, &expected.id).await, expected);
    }
    assert_eq!(store.unfinished().await.unwrap().len(), jobs.len());
}

#[tokio::test]
async fn a_returned_commit_is_visible_to_a_fresh_connection_while_the_store_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), transactional()).unwrap();
    store.commit(vec![Change::Insert(queued("seen", "import", at(0)))]).await.unwrap();
    let raw = rusqlite::Connection::open(dir.path().join(DB_FILE_NAME)).unwrap();
    let (status, params): (String, String) = raw
        .query_row("SELECT status, params FROM jobs WHERE id = 'seen'", [], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap();
    assert_eq!(status, "queued");
    assert_eq!(params, r#"{"date":"2024_01_31"}"#);
    let (journal_mode, version): (String, i64) = raw
        .query_row("SELECT * FROM pragma_journal_mode, pragma_user_version", [], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap();
    assert_eq!((journal_mode.as_str(), version), ("wal", 8));
    drop(store);
}

/// The rows SQLite holds for `ids`, read over a connection of its own.
fn rows_in_sqlite(dir: &Path, ids: &[String]) -> usize {
    let raw = rusqlite::Connection::open(dir.join(DB_FILE_NAME)).unwrap();
    ids.iter().filter(|id| raw.query_row("SELECT 1 FROM jobs WHERE id = ?1", [id.as_str()], |_| Ok(())).is_ok()).count()
}

/// Plain starts are answered once the start journal is synced; their rows
/// reach SQLite soon after, and every read sees them in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deferred_starts_are_read_at_once_and_reach_sqlite_soon_after() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let batches = (0..40).map(|i| vec![Change::Insert(queued(&format!("d{i:02}"), "import", at(i)))]).collect();
    for result in commit_together(&store, batches).await {
        result.unwrap();
    }
    let ids: Vec<String> = (0..40).map(|i| format!("d{i:02}")).collect();
    let stats = store.stats();
    assert!(stats.journal_syncs >= 1, "{stats:?}");
    // Read at once, whether the rows are in SQLite yet or not.
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(job(&store, id).await, queued(id, "import", at(i as i64)));
    }
    let listed = store.jobs(JobFilter { limit: 10, ..JobFilter::default() }).await.unwrap();
    let newest: Vec<&str> = listed.iter().map(|job| job.id.as_str()).collect();
    assert_eq!(newest, ["d39", "d38", "d37", "d36", "d35", "d34", "d33", "d32", "d31", "d30"]);
    let queue: Vec<String> = store.unfinished().await.unwrap().into_iter().map(|job| job.id).collect();
    assert_eq!(queue, ids, "queue order is start order");
    // In SQLite within the flush delay (with room for a slow machine).
    wait_until("the deferred rows are in SQLite", || rows_in_sqlite(dir.path(), &ids) == ids.len()).await;
    assert_eq!(store.jobs(JobFilter { limit: 1000, ..JobFilter::default() }).await.unwrap().len(), 40);
    let counts = store.counts().await.unwrap();
    assert_eq!(counts, vec![("import".to_owned(), Status::Queued, 40)]);

    // A change to a deferred job finds its row: the transaction inserts it first.
    store.commit(vec![Change::Insert(queued("late", "import", at(50)))]).await.unwrap();
    store.commit(vec![Change::Cancel { id: "late".into(), at: at(51) }]).await.unwrap();
    assert_eq!(job(&store, "late").await.status, Status::Cancelled);
}

/// A start whose row cannot go into SQLite (the disk is full) is not lost: it
/// stays readable, the store says it is unhealthy and refuses further
/// starts, and the journal puts the row into SQLite at the next open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deferred_starts_outlive_a_full_disk() {
    let dir = tempfile::tempdir().unwrap();
    // 64 pages of 4 KiB: the first flush of these rows goes beyond it.
    let options = StoreOptions { max_page_count: Some(64), ..StoreOptions::default() };
    let store = SqliteStore::open(dir.path(), options).unwrap();
    let big = |id: &str, i: i64| {
        let mut job = queued(id, "import", at(i));
        job.params.insert("blob".into(), "x".repeat(3000));
        job
    };
    let ids: Vec<String> = (0..120).map(|i| format!("big{i:03}")).collect();
    store.commit(ids.iter().enumerate().map(|(i, id)| Change::Insert(big(id, i as i64))).collect()).await.unwrap();
    assert_eq!(job(&store, "big000").await, big("big000", 0), "answered, so readable");
    let failed = || {
        let store = store.clone();
        async move { !store.ping().await }
    };
    let deadline = Instant::now() + WAIT_MAX;
    while !failed().await {
        assert!(Instant::now() < deadline, "the flush never failed");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let refused = store.commit(vec![Change::Insert(queued("refused", "import", at(200)))]).await.unwrap_err();
    assert_eq!(refused.sqlite_code(), Some(ErrorCode::DiskFull), "{refused}");
    assert_eq!(store.job("refused").await.unwrap(), None);
    assert_eq!(job(&store, "big119").await, big("big119", 119), "still readable");
    assert_eq!(rows_in_sqlite(dir.path(), &ids), 0);
    store.close().await;
    drop(store);

    let store = open(dir.path());
    assert_eq!(rows_in_sqlite(dir.path(), &ids), ids.len(), "put back from the journal");
    assert_eq!(job(&store, "big119").await, big("big119", 119));
    assert_eq!(store.unfinished().await.unwrap().len(), 120);
}

/// Starts from 16 tasks at once, each committing its next start as soon as
/// the last is answered, until the writer has answered some of them while it
/// was putting earlier ones into SQLite (`starts_during_flushes`). Every
/// start is answered, read back, reaches SQLite once, and is counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn starts_that_come_during_a_flush_are_answered_and_reach_sqlite_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let deadline = Instant::now() + WAIT_MAX;
    let mut ids = Vec::new();
    for round in 0.. {
        let tasks: Vec<_> = (0..16)
            .map(|task| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut ids = Vec::new();
                    for i in 0..50 {
                        let id = format!("f{round:03}-{task:02}-{i:02}");
                        store.commit(vec![Change::Insert(queued(&id, "import", at(i)))]).await.unwrap();
                        ids.push(id);
                    }
                    ids
                })
            })
            .collect();
        ids.extend(join_all(tasks).await.into_iter().flatten());
        if store.stats().starts_during_flushes > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no start came during a flush: {:?}", store.stats());
    }
    for id in ids.iter().step_by(37) {
        assert_eq!(job(&store, id).await.id, *id);
    }
    wait_until("every start is in SQLite", || rows_in_sqlite(dir.path(), &ids) == ids.len()).await;
    let counts = store.counts().await.unwrap();
    assert_eq!(counts, vec![("import".to_owned(), Status::Queued, ids.len() as u64)]);
    assert_eq!(store.unfinished().await.unwrap().len(), ids.len());
    store.close().await;
    drop(store);
    // Nothing is put back twice at the next open.
    let store = open(dir.path());
    assert_eq!(store.unfinished().await.unwrap().len(), ids.len());
}

/// A flush that fails (the disk is full) while starts keep coming loses none
/// of those answered, whether they came before it or during it: the next
/// open puts every one into SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn starts_answered_around_a_failing_flush_come_back_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    // 64 pages of 4 KiB: the flush that holds the big rows goes beyond it, a few chunks in.
    let options = StoreOptions { max_page_count: Some(64), ..StoreOptions::default() };
    let store = SqliteStore::open(dir.path(), options).unwrap();
    // Small starts from 16 tasks, each until the store refuses one.
    let tasks: Vec<_> = (0..16)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut answered = Vec::new();
                for i in 0..5_000 {
                    let id = format!("s{task:02}-{i:04}");
                    if store.commit(vec![Change::Insert(queued(&id, "import", at(i)))]).await.is_err() {
                        break;
                    }
                    answered.push(id);
                }
                answered
            })
        })
        .collect();
    // The big rows come once some small starts were answered during a flush.
    let deadline = Instant::now() + WAIT_MAX;
    while store.stats().starts_during_flushes == 0 {
        assert!(Instant::now() < deadline, "no start came during a flush: {:?}", store.stats());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let big = (0..120).map(|i| {
        let mut job = queued(&format!("big{i:03}"), "import", at(i));
        job.params.insert("blob".into(), "x".repeat(3000));
        Change::Insert(job)
    });
    store.commit(big.collect()).await.unwrap();
    let mut answered: Vec<String> = join_all(tasks).await.into_iter().flatten().collect();
    answered.extend((0..120).map(|i| format!("big{i:03}")));
    assert!(!store.ping().await, "the flush of the big rows failed");
    store.close().await;
    drop(store);

    let store = open(dir.path());
    assert_eq!(rows_in_sqlite(dir.path(), &answered), answered.len(), "answered, so in SQLite after the open");
    assert_eq!(store.unfinished().await.unwrap().len(), answered.len());
}

/// The child half of [`a_kill_9_loses_no_acknowledged_job`]: when the
/// parent runs this test binary with `JOBZ_STORE_KILL_DIR` set, it commits jobs
/// from several tasks until killed, printing each id once its commit returned.
/// Run normally, it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_child() {
    let Some(dir) = std::env::var_os("JOBZ_STORE_KILL_DIR") else { return };
    let round = std::env::var("JOBZ_STORE_KILL_ROUND").unwrap();
    let store = open(Path::new(&dir));
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            let store = store.clone();
            let round = round.clone();
            tokio::spawn(async move {
                // Bounded so a child the parent failed to kill still ends.
                for i in 0..100_000 {
                    let id = format!("r{round}-t{task}-{i}");
                    store.commit(vec![Change::Insert(queued(&id, "import", at(i)))]).await.unwrap();
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "committed {id}").unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    join_all(tasks).await;
}

/// SPEC "Durable": a job answered 202 survives a `kill -9` of the broker at
/// any moment. A child process commits from several tasks and is killed with
/// SIGKILL mid-stream; every id it printed after its commit returned must be
/// in the store. Several rounds on one file, so each child also recovers the
/// hot WAL the last one left, and the kill lands at different moments.
#[tokio::test]
async fn a_kill_9_loses_no_acknowledged_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut acknowledged = Vec::new();
    for round in 0..4 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "kill_9_child", "--nocapture", "--test-threads=1"])
            .env("JOBZ_STORE_KILL_DIR", dir.path())
            .env("JOBZ_STORE_KILL_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let deadline = Instant::now() + WAIT_MAX;
        let mut seen = 0;
        while seen < 200 + 37 * round {
            assert!(Instant::now() < deadline, "the child committed too slowly");
            let line = lines.next().expect("the child ended early").unwrap();
            if let Some(id) = line.strip_prefix("committed ") {
                acknowledged.push(id.to_owned());
                seen += 1;
            }
        }
        // SIGKILL, in the middle of its commits.
        child.kill().unwrap();
        child.wait().unwrap();
        // Every line it printed before dying is still in the pipe.
        for line in lines {
            if let Some(id) = line.unwrap().strip_prefix("committed ") {
                acknowledged.push(id.to_owned());
            }
        }
    }

    let store = open(dir.path());
    let stored: std::collections::HashSet<String> =
        store.unfinished().await.unwrap().into_iter().map(|job| job.id).collect();
    let lost: Vec<_> = acknowledged.iter().filter(|id| !stored.contains(*id)).collect();
    assert!(lost.is_empty(), "{} of {} acknowledged jobs lost: {lost:?}", lost.len(), acknowledged.len());
}

// ---- Group commit, failures, back-pressure ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_share_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), transactional()).unwrap();
    let before = store.stats();
    let batches = (0..64).map(|i| vec![Change::Insert(queued(&format!("j{i}"), "import", at(i)))]).collect();
    for result in commit_together(&store, batches).await {
        result.unwrap();
    }
    let after = store.stats();
    assert_eq!(after.commits - before.commits, 1, "64 commits in one transaction");
    assert_eq!(after.changes - before.changes, 64);
    assert_eq!(after.largest_batch, 64);
    assert_eq!(store.jobs(JobFilter { limit: 1000, ..JobFilter::default() }).await.unwrap().len(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unpaused_concurrent_commits_batch_too() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(
                async move { store.commit(vec![Change::Insert(queued(&format!("j{i}"), "import", at(i)))]).await },
            )
        })
        .collect();
    for result in with_timeout(join_all(handles)).await {
        result.unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.changes, 64);
    assert!(stats.commits < 64, "{} transactions for 64 concurrent commits", stats.commits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_batch_limit_splits_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions { batch_changes_max: 16, ..transactional() };
    let store = SqliteStore::open(dir.path(), options).unwrap();
    let batches = (0..64).map(|i| vec![Change::Insert(queued(&format!("j{i}"), "import", at(i)))]).collect();
    for result in commit_together(&store, batches).await {
        result.unwrap();
    }
    assert_eq!(store.stats().commits, 4);
    assert_eq!(store.stats().largest_batch, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storage_failure_rolls_back_the_whole_batch_and_the_store_recovers() {
    let dir = tempfile::tempdir().unwrap();
    // A database capped at 64 pages of 4 KiB: a write beyond fails like a full disk.
    let options = StoreOptions { max_page_count: Some(64), ..transactional() };
    let store = SqliteStore::open(dir.path(), options).unwrap();
    store.commit(vec![Change::Insert(queued("before", "import", at(0)))]).await.unwrap();

    let mut huge = queued("huge", "import", at(3));
    huge.params.insert("blob".into(), "x".repeat(1024 * 1024));
    let mut batches: Vec<Vec<Change>> =
        (0..6).map(|i| vec![Change::Insert(queued(&format!("small{i}"), "import", at(i)))]).collect();
    batches.insert(3, vec![Change::Insert(huge)]);
    let results = commit_together(&store, batches).await;
    assert_eq!(results.len(), 7);
    for result in results {
        let err = result.unwrap_err();
        assert_eq!(err.sqlite_code(), Some(ErrorCode::DiskFull), "{err}");
    }
    for i in 0..6 {
        assert_eq!(store.job(&format!("small{i}")).await.unwrap(), None, "small{i} was rolled back");
    }
    assert_eq!(store.stats().failed_batches, 1);
    assert!(!store.ping().await, "unhealthy after a failed transaction");

    store.commit(vec![Change::Insert(queued("after", "import", at(9)))]).await.unwrap();
    assert!(store.job("after").await.unwrap().is_some());
    assert!(store.job("before").await.unwrap().is_some());
    assert!(store.ping().await, "healthy again after a committed transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_breaking_the_schema_fails_alone_and_whole() {
    a_commit_breaking_the_schema_fails_alone_and_whole_with(transactional()).await;
}

/// With starts answered through the journal, a batch holding a taken id goes
/// through a transaction, so each caller is answered as above.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_breaking_the_schema_fails_alone_and_whole_among_deferred_starts() {
    a_commit_breaking_the_schema_fails_alone_and_whole_with(StoreOptions::default()).await;
}

async fn a_commit_breaking_the_schema_fails_alone_and_whole_with(options: StoreOptions) {
    let transactional = !options.defer_starts;
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), options).unwrap();
    store.commit(vec![Change::Insert(queued("exists", "import", at(0)))]).await.unwrap();
    let before = store.stats();

    let results = commit_together(
        &store,
        vec![
            vec![Change::Insert(queued("x", "import", at(1)))],
            // Two inserts of one id: the second violates UNIQUE, the first must go too.
            vec![
                Change::Insert(queued("y", "import", at(2))),
                Change::Insert(queued("z", "import", at(2))),
                Change::Insert(queued("y", "import", at(2))),
            ],
            vec![Change::Insert(queued("exists", "import", at(3)))],
            // A queued job with a finish time breaks a CHECK.
            vec![Change::Insert(JobRecord { finished_at: Some(at(4)), ..queued("bad", "import", at(4)) })],
            vec![Change::Insert(queued("w", "import", at(5)))],
        ],
    )
    .await;
    assert!(results[0].is_ok());
    for refused in &results[1..4] {
        let err = refused.as_ref().unwrap_err();
        assert!(matches!(err, StoreError::Rejected { .. }), "{err:?}");
        assert_eq!(err.sqlite_code(), Some(ErrorCode::ConstraintViolation));
    }
    assert!(results[4].is_ok());
    for (id, stored) in [("x", true), ("y", false), ("z", false), ("bad", false), ("w", true)] {
        assert_eq!(store.job(id).await.unwrap().is_some(), stored, "job {id}");
    }
    assert_eq!(job(&store, "exists").await.created_at, at(0), "the first insert stands");
    let after = store.stats();
    if transactional {
        assert_eq!(after.commits - before.commits, 1);
    }
    assert_eq!(after.rejected - before.rejected, 3);
    assert!(store.ping().await, "a refused commit is not a storage failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_busy_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions { queue_capacity: 2, ..StoreOptions::default() };
    let store = SqliteStore::open(dir.path(), options).unwrap();
    let paused = store.pause_writes().await.unwrap();
    store.commit_later(vec![Change::Insert(queued("a", "import", at(0)))]).unwrap();
    store.commit_later(vec![Change::Insert(queued("b", "import", at(1)))]).unwrap();
    let later = store.commit_later(vec![Change::Insert(queued("c", "import", at(2)))]);
    assert!(matches!(later, Err(StoreError::Busy)), "{later:?}");
    let now = with_timeout(store.commit(vec![Change::Insert(queued("d", "import", at(3)))])).await;
    assert!(matches!(now, Err(StoreError::Busy)), "{now:?}");
    assert_eq!(store.stats().queued, 2);

    drop(paused);
    let deadline = Instant::now() + WAIT_MAX;
    while store.job("b").await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "the queued commits were not applied");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(store.job("a").await.unwrap().is_some());
    assert_eq!(store.job("c").await.unwrap(), None);
    store.commit(vec![Change::Insert(queued("e", "import", at(4)))]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_last_quarter_of_the_queue_is_kept_for_commit_later() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions { queue_capacity: 8, ..StoreOptions::default() };
    let store = SqliteStore::open(dir.path(), options).unwrap();
    let insert = |i: i64| vec![Change::Insert(queued(&format!("j{i}"), "import", at(i)))];
    let paused = store.pause_writes().await.unwrap();
    let handles = queue_commits(&store, (0..6).map(insert).collect()).await;
    // Six of eight queued: new work is refused, bookkeeping still gets in.
    assert!(matches!(store.commit(insert(6)).await, Err(StoreError::Busy)));
    assert!(matches!(store.prune(at(0), 10).await, Err(StoreError::Busy)));
    store.commit_later(insert(7)).unwrap();
    store.commit_later(insert(8)).unwrap();
    assert!(matches!(store.commit_later(insert(9)), Err(StoreError::Busy)));
    drop(paused);
    for result in with_timeout(join_all(handles)).await {
        result.unwrap();
    }
    store.commit(insert(10)).await.unwrap();
    let stored = store.jobs(JobFilter::default()).await.unwrap().len();
    assert_eq!(stored, 9, "j0..j5, j7, j8 and j10");
}

#[tokio::test]
async fn close_commits_what_was_queued_then_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert!(store.ping().await);
    for i in 0..100 {
        store.commit_later(vec![Change::Insert(queued(&format!("j{i}"), "import", at(i)))]).unwrap();
    }
    with_timeout(store.close()).await;
    let err = store.commit(vec![Change::Insert(queued("late", "import", at(0)))]).await.unwrap_err();
    assert!(matches!(err, StoreError::Closed), "{err:?}");
    assert!(matches!(store.commit_later(vec![Change::Cancel { id: "j1".into(), at: at(0) }]), Err(StoreError::Closed)));
    assert!(!store.ping().await);
    // Reads still work, and everything queued before the close was committed.
    assert_eq!(store.unfinished().await.unwrap().len(), 100);
}

#[tokio::test]
async fn a_database_from_a_newer_jobz_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let raw = rusqlite::Connection::open(dir.path().join(DB_FILE_NAME)).unwrap();
    raw.pragma_update(None, "user_version", 99).unwrap();
    drop(raw);
    let err = SqliteStore::open(dir.path(), StoreOptions::default()).err().expect("refused");
    assert!(matches!(err, StoreError::SchemaTooNew { found: 99, supported: 8, .. }), "{err:?}");
}

// ---- Queries ----

#[tokio::test]
async fn unfinished_lists_queued_and_running_jobs_in_queue_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let with_priority = |id: &str, priority, queued_at| JobRecord {
        priority,
        queued_at: Some(at(queued_at)),
        ..queued(id, "import", at(0))
    };
    let mut changes = vec![
        Change::Insert(with_priority("low-1", -5, 1)),
        Change::Insert(with_priority("mid-3", 0, 3)),
        Change::Insert(with_priority("high-2", 10, 2)),
        Change::Insert(with_priority("mid-1", 0, 1)),
        // Same priority and queue time: insertion order decides.
        Change::Insert(with_priority("mid-2a", 0, 2)),
        Change::Insert(with_priority("mid-2b", 0, 2)),
        Change::Insert(with_priority("done", 100, 0)),
        Change::Insert(with_priority("gone", 100, 0)),
    ];
    changes.push(Change::Dispatch {
        id: "done".into(),
        job_name: "import".into(),
        attempt: 1,
        worker: "w".into(),
        lease: 1,
        at: at(5),
    });
    changes.push(Change::Finish {
        id: "done".into(),
        job_name: "import".into(),
        lease: 1,
        status: Status::Succeeded,
        exit_code: Some(0),
        signal: None,
        at: at(6),
        output_tail: String::new(),
        error: None,
    });
    changes.push(Change::Cancel { id: "gone".into(), at: at(6) });
    changes.push(Change::Dispatch {
        id: "mid-1".into(),
        job_name: "import".into(),
        attempt: 1,
        worker: "w".into(),
        lease: 2,
        at: at(7),
    });
    store.commit(changes).await.unwrap();

    let order: Vec<_> = store.unfinished().await.unwrap().into_iter().map(|j| (j.id, j.status)).collect();
    let expected = [
        ("high-2", Status::Queued),
        ("mid-1", Status::Running),
        ("mid-2a", Status::Queued),
        ("mid-2b", Status::Queued),
        ("mid-3", Status::Queued),
        ("low-1", Status::Queued),
    ];
    assert_eq!(order, expected.map(|(id, status)| (id.to_owned(), status)).to_vec());
}

#[tokio::test]
async fn jobs_filters_newest_first_and_limits() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut changes = Vec::new();
    for i in 0..30 {
        let name = if i % 2 == 0 { "even" } else { "odd" };
        let mut job = queued(&format!("j{i:02}"), name, at(i / 3));
        job.run_id = format!("run{}", i % 3);
        changes.push(Change::Insert(job));
    }
    changes.push(Change::Cancel { id: "j04".into(), at: at(50) });
    changes.push(Change::Cancel { id: "j05".into(), at: at(50) });
    store.commit(changes).await.unwrap();

    let ids = |jobs: Vec<JobRecord>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    // Newest first by created_at, then id: j27..j29 share a created_at.
    let newest = ids(store.jobs(JobFilter { limit: 5, ..JobFilter::default() }).await.unwrap());
    assert_eq!(newest, ["j29", "j28", "j27", "j26", "j25"]);
    assert_eq!(store.jobs(JobFilter::default()).await.unwrap().len(), 30, "limit 0 takes the default");

    let even =
        ids(store.jobs(JobFilter { job_name: Some("even".into()), limit: 3, ..JobFilter::default() }).await.unwrap());
    assert_eq!(even, ["j28", "j26", "j24"]);
    let run1 =
        ids(store.jobs(JobFilter { run_id: Some("run1".into()), limit: 100, ..JobFilter::default() }).await.unwrap());
    assert_eq!(run1, ["j28", "j25", "j22", "j19", "j16", "j13", "j10", "j07", "j04", "j01"]);
    let cancelled = ids(store
        .jobs(JobFilter { status: Some(Status::Cancelled), limit: 100, ..JobFilter::default() })
        .await
        .unwrap());
    assert_eq!(cancelled, ["j05", "j04"]);
    let all_three = JobFilter {
        status: Some(Status::Cancelled),
        job_name: Some("odd".into()),
        run_id: Some("run2".into()),
        limit: 100,
    };
    assert_eq!(ids(store.jobs(all_three).await.unwrap()), ["j05"]);
    let none = JobFilter { job_name: Some("nope".into()), ..JobFilter::default() };
    assert!(store.jobs(none).await.unwrap().is_empty());
}

#[tokio::test]
async fn jobs_are_listed_by_created_at_then_id_whatever_the_insertion_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // Inserted neither in created_at order nor in id order.
    let inserted = [("b", 5), ("d", 7), ("a", 7), ("e", 1), ("c", 7), ("f", 5)];
    let job = |id: &str, created: i64| {
        Change::Insert(JobRecord { run_id: "run".into(), ..queued(id, "import", at(created)) })
    };
    store.commit(inserted.iter().map(|&(id, created)| job(id, created)).collect()).await.unwrap();
    store.commit(vec![job("g", 6)]).await.unwrap();
    store.commit(vec![job("0", 7)]).await.unwrap();
    let ids = |jobs: Vec<JobRecord>| jobs.into_iter().map(|j| j.id).collect::<Vec<_>>();
    let expected = ["d", "c", "a", "0", "g", "f", "b", "e"];
    assert_eq!(ids(store.jobs(JobFilter::default()).await.unwrap()), expected);
    assert_eq!(ids(store.jobs(JobFilter { limit: 3, ..JobFilter::default() }).await.unwrap()), expected[..3]);
    let by_name = JobFilter { job_name: Some("import".into()), limit: 5, ..JobFilter::default() };
    assert_eq!(ids(store.jobs(by_name).await.unwrap()), expected[..5]);
    let by_status = JobFilter { status: Some(Status::Queued), limit: 6, ..JobFilter::default() };
    assert_eq!(ids(store.jobs(by_status).await.unwrap()), expected[..6]);
    let by_run = JobFilter { run_id: Some("run".into()), limit: 100, ..JobFilter::default() };
    assert_eq!(ids(store.jobs(by_run).await.unwrap()), expected);
}

#[tokio::test]
async fn prune_deletes_only_finished_jobs_older_than_the_cutoff_up_to_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut changes = Vec::new();
    for i in 0..10 {
        let id = format!("old{i}");
        changes.push(Change::Insert(queued(&id, "import", at(0))));
        changes.push(Change::Dispatch {
            id: id.clone(),
            job_name: "import".into(),
            attempt: 1,
            worker: "w".into(),
            lease: i,
            at: at(1),
        });
        changes.push(Change::Finish {
            id,
            job_name: "import".into(),
            lease: i,
            status: Status::Failed,
            exit_code: Some(1),
            signal: None,
            at: at(10 + i as i64),
            output_tail: String::new(),
            error: None,
        });
    }
    changes.push(Change::Insert(queued("old-queued", "import", at(0))));
    changes.push(Change::Insert(queued("recent", "import", at(0))));
    changes.push(Change::Cancel { id: "recent".into(), at: at(100) });
    store.commit(changes).await.unwrap();

    // Cutoff after old0..old9 finished; at most 4 per call, oldest first.
    let first = store.prune(at(50), 4).await.unwrap();
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(sorted, ["old0", "old1", "old2", "old3"]);
    assert!(store.attempts("old0").await.unwrap().is_empty(), "attempts go with their job");
    assert_eq!(store.prune(at(50), 4).await.unwrap().len(), 4);
    assert_eq!(store.prune(at(50), 4).await.unwrap().len(), 2);
    assert!(store.prune(at(50), 4).await.unwrap().is_empty());
    assert!(store.prune(at(1000), 0).await.unwrap().is_empty(), "limit 0 prunes nothing");
    // A change for a pruned job is a no-op.
    store.commit(vec![Change::Retry { id: "old0".into(), at: at(200), not_before: None }]).await.unwrap();

    let left = store.jobs(JobFilter::default()).await.unwrap();
    let mut left: Vec<_> = left.into_iter().map(|j| j.id).collect();
    left.sort();
    assert_eq!(left, ["old-queued", "recent"]);
}

#[tokio::test]
async fn counts_are_by_name_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut changes = Vec::new();
    for i in 0..5 {
        changes.push(Change::Insert(queued(&format!("a{i}"), "alpha", at(i))));
    }
    changes.push(Change::Insert(queued("b0", "beta", at(0))));
    changes.push(Change::Cancel { id: "a0".into(), at: at(9) });
    changes.push(Change::Cancel { id: "a1".into(), at: at(9) });
    store.commit(changes).await.unwrap();
    let counts = store.counts().await.unwrap();
    assert_eq!(
        counts,
        vec![
            ("alpha".to_owned(), Status::Cancelled, 2),
            ("alpha".to_owned(), Status::Queued, 3),
            ("beta".to_owned(), Status::Queued, 1),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_commits_wait_for_company_and_an_urgent_one_takes_them_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // A delay no test run comes near, so that what is measured is who waits for it.
    let options = StoreOptions { group_commit_delay: Duration::from_secs(30), ..StoreOptions::default() };
    let store = SqliteStore::open(dir.path(), options).unwrap();
    let before = store.stats();
    let grouped: Vec<_> = (0..5)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store.commit_grouped(vec![Change::Insert(queued(&format!("g{i}"), "import", at(i)))]).await
            })
        })
        .collect();
    store.commit_later(vec![Change::Insert(queued("later", "import", at(6)))]).unwrap();
    wait_until("every grouped commit is queued", || store.stats().requests == before.requests + 6).await;
    // Nothing of them is committed while they wait for company...
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(store.stats().commits, before.commits, "grouped commits waited");
    assert_eq!(store.job("g0").await.unwrap(), None);
    // ...until an urgent commit comes: it takes them all into its transaction.
    let started = Instant::now();
    store.commit(vec![Change::Insert(queued("urgent", "import", at(7)))]).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "the urgent commit did not wait for the delay");
    for handle in grouped {
        with_timeout(handle).await.unwrap().unwrap();
    }
    assert_eq!(store.stats().commits - before.commits, 1, "one transaction for all seven");
    for id in ["g0", "g4", "later", "urgent"] {
        assert!(store.job(id).await.unwrap().is_some(), "{id} committed");
    }
}

#[tokio::test]
async fn a_grouped_commit_alone_commits_after_its_delay() {
    let dir = tempfile::tempdir().unwrap();
    let delay = Duration::from_millis(200);
    let store =
        SqliteStore::open(dir.path(), StoreOptions { group_commit_delay: delay, ..StoreOptions::default() }).unwrap();
    let started = Instant::now();
    with_timeout(store.commit_grouped(vec![Change::Insert(queued("alone", "import", at(0)))])).await.unwrap();
    assert!(started.elapsed() >= delay, "committed after {:?}, before the delay", started.elapsed());
    assert!(store.job("alone").await.unwrap().is_some());
    // Every answered commit was synced: syncs never lag commits once answered.
    let stats = store.stats();
    assert!(stats.syncs >= 1 && stats.syncs <= stats.commits, "{stats:?}");
}

/// The counts the writer keeps in memory, against a `GROUP BY` over the file itself.
fn counted_in_the_file(dir: &Path) -> Vec<(String, Status, u64)> {
    let raw = rusqlite::Connection::open(dir.join(DB_FILE_NAME)).unwrap();
    let mut statement = raw
        .prepare("SELECT job_name, status, COUNT(*) FROM jobs GROUP BY job_name, status ORDER BY job_name, status")
        .unwrap();
    let rows = statement
        .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, i64>(2)?)))
        .unwrap();
    rows.map(|r| r.unwrap()).map(|(name, status, n)| (name, status.parse().unwrap(), n as u64)).collect()
}

#[tokio::test]
async fn counts_follow_every_change_a_refused_commit_a_prune_and_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut inserts: Vec<Change> = (0..8).map(|i| Change::Insert(queued(&format!("j{i}"), "alpha", at(i)))).collect();
    inserts.push(Change::Insert(queued("b0", "beta", at(0))));
    store.commit(inserts).await.unwrap();
    let dispatch = |id: &str, lease: u64| Change::Dispatch {
        id: id.into(),
        job_name: "alpha".into(),
        attempt: 1,
        worker: "w".into(),
        lease,
        at: at(20),
    };
    let finish = |id: &str, lease: u64, status: Status| Change::Finish {
        id: id.into(),
        job_name: "alpha".into(),
        lease,
        status,
        exit_code: Some(0),
        signal: None,
        at: at(30),
        output_tail: String::new(),
        error: None,
    };
    let steps: Vec<Vec<Change>> = vec![
        (0..6).map(|i| dispatch(&format!("j{i}"), 100 + i)).collect(),
        vec![finish("j0", 100, Status::Succeeded), finish("j1", 101, Status::Failed)],
        // A stale finish and a second dispatch change nothing, and count nothing.
        vec![finish("j2", 999, Status::Succeeded), dispatch("j0", 7)],
        vec![Change::Requeue { id: "j2".into(), job_name: "alpha".into(), at: at(31), not_before: None }],
        vec![Change::Fail { id: "j3".into(), at: at(32), error: "gone".into() }],
        vec![Change::Cancel { id: "j4".into(), at: at(33) }, Change::Cancel { id: "j6".into(), at: at(33) }],
        vec![Change::Retry { id: "j1".into(), at: at(34), not_before: None }],
        vec![Change::Cancel { id: "j0".into(), at: at(35) }],
    ];
    for changes in steps {
        store.commit(changes).await.unwrap();
        assert_eq!(store.counts().await.unwrap(), counted_in_the_file(dir.path()));
    }
    // A refused commit (a duplicate id after a good insert) counts nothing of itself.
    let refused = store
        .commit(vec![Change::Insert(queued("new", "alpha", at(40))), Change::Insert(queued("j7", "alpha", at(40)))])
        .await;
    assert!(matches!(refused, Err(StoreError::Rejected { .. })), "{refused:?}");
    assert_eq!(store.counts().await.unwrap(), counted_in_the_file(dir.path()));
    // A prune takes its jobs out of the counts.
    assert!(!store.prune(at(100), 100).await.unwrap().is_empty());
    let counts = store.counts().await.unwrap();
    assert_eq!(counts, counted_in_the_file(dir.path()));
    assert!(counts.iter().all(|(_, status, _)| matches!(status, Status::Queued | Status::Running)), "{counts:?}");
    store.close().await;
    drop(store);
    // Reopened, the store counts the file afresh.
    let store = open(dir.path());
    assert_eq!(store.counts().await.unwrap(), counts);
}

// ---- Gates ----

fn gate_event(seq: u64, job_id: &str) -> GateEventRecord {
    GateEventRecord {
        seq,
        kind: if seq.is_multiple_of(2) { GateEventKind::FailedForGood } else { GateEventKind::Succeeded },
        job_id: job_id.into(),
        job_name: "shard".into(),
        params: BTreeMap::from([("date".to_string(), "2024_01_31".to_string())]),
        run_id: "run-1".into(),
        attempt: 1,
        at: at(seq as i64),
    }
}

#[tokio::test]
async fn gate_events_come_back_in_order_within_the_asked_range_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.last_gate_event().await.unwrap(), 0);
    let events: Vec<GateEventRecord> = (1..=5).map(|i| gate_event(i, &format!("j{i}"))).collect();
    store.commit(events.iter().cloned().map(Change::GateEvent).collect()).await.unwrap();
    assert_eq!(store.gate_events(2, 4, 100).await.unwrap(), events[1..4].to_vec());
    assert_eq!(store.gate_events(1, 5, 2).await.unwrap(), events[0..2].to_vec(), "the limit holds");
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.last_gate_event().await.unwrap(), 5);
    assert_eq!(store.gate_events(1, 99, 100).await.unwrap(), events);
}

#[tokio::test]
async fn a_fire_is_recorded_once_per_gate_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let fire = |reason, job: &str| FireRecord {
        gate: "g".into(),
        key: "k".into(),
        reason,
        job_id: Some(job.into()),
        error: None,
        at: at(1),
    };
    store.commit(vec![Change::Fire(fire(GateReason::Then, "first"))]).await.unwrap();
    // The same (gate, key, reason) again, from another semaphore: a no-op, not an error.
    store.commit(vec![Change::Fire(fire(GateReason::Then, "second"))]).await.unwrap();
    store.commit(vec![Change::Fire(fire(GateReason::Failure, "third"))]).await.unwrap();
    let fires = store.gate_fires().await.unwrap();
    assert_eq!(fires.len(), 2, "{fires:?}");
    assert_eq!(
        fires.iter().find(|f| f.reason == GateReason::Then).and_then(|f| f.job_id.clone()).as_deref(),
        Some("first")
    );
}

#[tokio::test]
async fn pruning_drops_old_gate_events_and_fires_but_keeps_the_newest_event_number() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let events: Vec<GateEventRecord> = (1..=4).map(|i| gate_event(i, &format!("j{i}"))).collect();
    let fire = FireRecord {
        gate: "g".into(),
        key: "k".into(),
        reason: GateReason::Then,
        job_id: None,
        error: None,
        at: at(1),
    };
    let mut changes: Vec<Change> = events.iter().cloned().map(Change::GateEvent).collect();
    changes.push(Change::Fire(fire));
    store.commit(changes).await.unwrap();
    store.prune(at(100), 1000).await.unwrap();
    assert_eq!(store.gate_events(1, 99, 100).await.unwrap(), events[3..].to_vec(), "only the newest stays");
    assert_eq!(store.last_gate_event().await.unwrap(), 4);
    assert!(store.gate_fires().await.unwrap().is_empty());
}

// ---- Unique jobs and idempotency keys (guarded inserts) ----

/// A queued job of `job_name` holding `key`, created at `created`.
fn keyed(id: &str, job_name: &str, key: &str, created: DateTime<Utc>) -> JobRecord {
    JobRecord { unique_key: Some(key.to_owned()), ..queued(id, job_name, created) }
}

/// A guarded insert of `job`, where a succeeded holder counts if it finished at or after `since`.
fn guarded(job: JobRecord, since: DateTime<Utc>, idempotency: Option<(&str, DateTime<Utc>)>) -> Change {
    let idempotency = idempotency.map(|(key, since)| IdempotencyClaim { key: key.to_owned(), since });
    Change::InsertUnlessHeld(Box::new(GuardedInsert { job, succeeded_since: since, idempotency }))
}

/// Commits one guarded insert and returns its admission.
async fn admit(store: &SqliteStore, change: Change) -> Admission {
    let mut admissions = store.commit_admitting(vec![change]).await.expect("commit");
    assert_eq!(admissions.len(), 1, "one admission per guarded insert: {admissions:?}");
    admissions.remove(0)
}

/// Runs job `id` to `status`, finishing at `finished`.
async fn run_to(store: &SqliteStore, id: &str, status: Status, finished: DateTime<Utc>) {
    let job_name = job(store, id).await.job_name;
    let dispatch = Change::Dispatch {
        id: id.into(),
        job_name: job_name.clone(),
        attempt: 1,
        worker: "w1".into(),
        lease: 9,
        at: finished,
    };
    let finish = Change::Finish {
        id: id.into(),
        job_name,
        lease: 9,
        status,
        exit_code: Some(i32::from(status != Status::Succeeded)),
        signal: None,
        at: finished,
        output_tail: String::new(),
        error: None,
    };
    store.commit(vec![dispatch, finish]).await.unwrap();
    assert_eq!(job(store, id).await.status, status);
}

fn existing_id(admission: &Admission) -> Option<&str> {
    match admission {
        Admission::Existing(job) => Some(&job.id),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_guarded_inserts_of_one_unique_key_insert_exactly_one_in_one_batch_or_many() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // First all 100 queued behind a paused writer (one transaction), then 100 more
    // racing an unpaused writer (any split into transactions).
    for round in ["paused", "racing"] {
        let key = format!("key-{round}");
        let paused = if round == "paused" { Some(store.pause_writes().await.unwrap()) } else { None };
        let before = store.stats().queued;
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let store = store.clone();
                let change = guarded(keyed(&format!("{round}-{i}"), "import", &key, at(i)), at(0), None);
                tokio::spawn(async move { store.commit_admitting(vec![change]).await })
            })
            .collect();
        if let Some(paused) = paused {
            wait_until("every start is queued", || store.stats().queued == before + 100).await;
            drop(paused);
        }
        let admissions: Vec<Admission> =
            with_timeout(join_all(handles)).await.into_iter().map(|r| r.unwrap().remove(0)).collect();
        let inserted = admissions.iter().filter(|a| **a == Admission::Inserted).count();
        assert_eq!(inserted, 1, "{round}: exactly one start inserts: {admissions:?}");
        let holders: BTreeSet<&str> = admissions.iter().filter_map(existing_id).collect();
        assert_eq!(holders.len(), 1, "{round}: every other start gets one and the same job: {holders:?}");
        let stored = store.jobs(JobFilter { limit: 1000, ..JobFilter::default() }).await.unwrap();
        let with_key: Vec<&JobRecord> = stored.iter().filter(|j| j.unique_key.as_deref() == Some(&key)).collect();
        assert_eq!(with_key.len(), 1, "{round}: one job stored for the key");
        assert!(holders.contains(with_key[0].id.as_str()), "{round}: the holder is the stored job");
    }
}

#[tokio::test]
async fn a_succeeded_holder_holds_its_key_for_the_ttl_a_failed_one_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // The holder is queued, then running: it holds.
    assert_eq!(admit(&store, guarded(keyed("h", "import", "k", at(0)), at(0), None)).await, Admission::Inserted);
    let again = admit(&store, guarded(keyed("x1", "import", "k", at(1)), at(0), None)).await;
    assert_eq!(existing_id(&again), Some("h"));
    // The same key of another job name is another key.
    let other = admit(&store, guarded(keyed("o", "export", "k", at(1)), at(0), None)).await;
    assert_eq!(other, Admission::Inserted);
    run_to(&store, "h", Status::Succeeded, at(10)).await;
    // Succeeded at 10: a start whose ttl reaches back to 10 (or earlier) gets it...
    let within = admit(&store, guarded(keyed("x2", "import", "k", at(20)), at(10), None)).await;
    assert_eq!(existing_id(&within), Some("h"), "{within:?}");
    // ...one whose ttl reaches back only to 11 does not: the job runs again.
    let after = admit(&store, guarded(keyed("n", "import", "k", at(21)), at(11), None)).await;
    assert_eq!(after, Admission::Inserted);
    // A failed, timed-out or cancelled holder does not block, whatever the ttl.
    run_to(&store, "n", Status::Failed, at(30)).await;
    assert_eq!(admit(&store, guarded(keyed("t", "import", "k", at(31)), at(11), None)).await, Admission::Inserted);
    run_to(&store, "t", Status::TimedOut, at(32)).await;
    assert_eq!(admit(&store, guarded(keyed("c", "import", "k", at(33)), at(11), None)).await, Admission::Inserted);
    store.commit(vec![Change::Cancel { id: "c".into(), at: at(34) }]).await.unwrap();
    assert_eq!(admit(&store, guarded(keyed("z", "import", "k", at(35)), at(11), None)).await, Admission::Inserted);
    for id in ["x1", "x2"] {
        assert_eq!(store.job(id).await.unwrap(), None, "a deduplicated start stores nothing");
    }
    assert_eq!(job(&store, "z").await.unique_key.as_deref(), Some("k"));
}

#[tokio::test]
async fn an_idempotency_key_answers_with_its_first_job_refuses_other_params_and_expires() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let first = queued("first", "import", at(100));
    assert_eq!(admit(&store, guarded(first.clone(), at(0), Some(("cron-1", at(0))))).await, Admission::Inserted);
    // The same start again: the first job, nothing stored.
    let repeat = admit(&store, guarded(queued("second", "import", at(101)), at(0), Some(("cron-1", at(0))))).await;
    assert_eq!(repeat, Admission::Existing(Box::new(first.clone())));
    assert_eq!(store.job("second").await.unwrap(), None);
    // Other params, or another job name, under the same key: refused, nothing stored.
    let mut other_params = queued("third", "import", at(102));
    other_params.params.insert("category".into(), "books".into());
    let reused = admit(&store, guarded(other_params, at(0), Some(("cron-1", at(0))))).await;
    assert_eq!(
        reused,
        Admission::KeyReused { job_id: "first".into(), job_name: "import".into(), params: first.params.clone() }
    );
    let reused = admit(&store, guarded(queued("fourth", "export", at(103)), at(0), Some(("cron-1", at(0))))).await;
    assert!(matches!(reused, Admission::KeyReused { .. }), "{reused:?}");
    for id in ["third", "fourth"] {
        assert_eq!(store.job(id).await.unwrap(), None);
    }
    // Keys are remembered from the first start's time: one asked with `since` past it has expired.
    let expired = admit(&store, guarded(queued("fifth", "import", at(200)), at(0), Some(("cron-1", at(101))))).await;
    assert_eq!(expired, Admission::Inserted);
    let repeat = admit(&store, guarded(queued("sixth", "import", at(201)), at(0), Some(("cron-1", at(101))))).await;
    assert_eq!(existing_id(&repeat), Some("fifth"), "the expired key now names the new job");
}

#[tokio::test]
async fn an_idempotency_key_whose_start_hit_a_unique_key_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(admit(&store, guarded(keyed("h", "import", "k", at(0)), at(0), None)).await, Admission::Inserted);
    let hit = admit(&store, guarded(keyed("a", "import", "k", at(1)), at(0), Some(("retry-me", at(0))))).await;
    assert_eq!(existing_id(&hit), Some("h"));
    // The holder fails: a new start of the key would run, but the repeated request still gets `h`.
    run_to(&store, "h", Status::Failed, at(2)).await;
    let repeat = admit(&store, guarded(keyed("b", "import", "k", at(3)), at(0), Some(("retry-me", at(0))))).await;
    assert_eq!(existing_id(&repeat), Some("h"));
    assert_eq!(store.job("b").await.unwrap(), None);
}

#[tokio::test]
async fn unique_and_idempotency_keys_survive_a_reopen_and_keys_are_pruned_by_age() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        admit(&store, guarded(keyed("u", "import", "k", at(0)), at(0), None)).await;
        admit(&store, guarded(queued("i", "import", at(0)), at(0), Some(("idem", at(0))))).await;
        admit(&store, guarded(queued("old", "import", at(-50)), at(0), Some(("older", at(-100))))).await;
        store.close().await;
    }
    let store = open(dir.path());
    let unique = admit(&store, guarded(keyed("u2", "import", "k", at(5)), at(0), None)).await;
    assert_eq!(existing_id(&unique), Some("u"));
    let idem = admit(&store, guarded(queued("i2", "import", at(5)), at(0), Some(("idem", at(0))))).await;
    assert_eq!(existing_id(&idem), Some("i"));
    // Pruning forgets keys given before the cutoff, and only those; their jobs stay.
    assert_eq!(store.prune_idempotency_keys(at(-1), 100).await.unwrap(), 1);
    assert_eq!(store.prune_idempotency_keys(at(-1), 100).await.unwrap(), 0);
    assert_eq!(job(&store, "old").await.id, "old");
    let older = admit(&store, guarded(queued("old2", "import", at(6)), at(0), Some(("older", at(-100))))).await;
    assert_eq!(older, Admission::Inserted, "a pruned key is given as new");
    let idem = admit(&store, guarded(queued("i3", "import", at(6)), at(0), Some(("idem", at(0))))).await;
    assert_eq!(existing_id(&idem), Some("i"), "a newer key is kept");
}

#[tokio::test]
async fn a_fire_whose_job_was_held_records_the_holder_and_plain_changes_report_no_admissions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert!(store.commit_admitting(vec![Change::Insert(keyed("h", "merge", "2024", at(0)))]).await.unwrap().is_empty());
    let fire = FireRecord {
        gate: "g".into(),
        key: "2024".into(),
        reason: GateReason::Then,
        job_id: Some("gate-job".into()),
        error: None,
        at: at(1),
    };
    let admissions = store
        .commit_admitting(vec![guarded(keyed("gate-job", "merge", "2024", at(1)), at(0), None), Change::Fire(fire)])
        .await
        .unwrap();
    assert_eq!(admissions.len(), 1);
    assert_eq!(existing_id(&admissions[0]), Some("h"));
    assert_eq!(store.gate_fires().await.unwrap()[0].job_id.as_deref(), Some("h"));
    assert_eq!(store.job("gate-job").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_commit_in_the_batch_leaves_the_other_starts_admissions_intact() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.commit(vec![Change::Insert(queued("dup", "import", at(0)))]).await.unwrap();
    let paused = store.pause_writes().await.unwrap();
    let before = store.stats().queued;
    let batches = vec![
        vec![guarded(keyed("a", "import", "k", at(1)), at(0), None)],
        // A duplicate id breaks the schema: this caller alone fails.
        vec![Change::Insert(queued("dup", "import", at(2)))],
        vec![guarded(keyed("b", "import", "k", at(3)), at(0), None)],
    ];
    let mut handles = Vec::new();
    for changes in batches {
        let task_store = store.clone();
        handles.push(tokio::spawn(async move { task_store.commit_admitting(changes).await }));
        // One at a time, so the batch keeps this order.
        let queued = before + handles.len() as u64;
        wait_until("the commit is queued", || store.stats().queued == queued).await;
    }
    drop(paused);
    let mut results = with_timeout(join_all(handles)).await.into_iter();
    assert_eq!(results.next().map(|r| r.unwrap()), Some(vec![Admission::Inserted]));
    assert!(matches!(results.next(), Some(Err(StoreError::Rejected { .. }))));
    let held = results.next().map(|r| r.unwrap()).unwrap_or_default();
    assert_eq!(held.first().and_then(existing_id), Some("a"), "b is held by a, though the batch was redone");
    assert_eq!(job(&store, "a").await.unique_key.as_deref(), Some("k"));
    assert_eq!(store.job("b").await.unwrap(), None);
    let again = admit(&store, guarded(keyed("c", "import", "k", at(4)), at(0), None)).await;
    assert_eq!(existing_id(&again), Some("a"));
}

#[tokio::test]
async fn a_guarded_insert_with_an_id_already_stored_is_refused_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store.commit(vec![Change::Insert(queued("j", "import", at(0)))]).await.unwrap();
    let err =
        store.commit_admitting(vec![guarded(keyed("j", "import", "k", at(1)), at(0), Some(("key", at(0))))]).await;
    assert!(matches!(err, Err(StoreError::Rejected { .. })), "{err:?}");
    // Nothing of it stayed: neither the key nor the idempotency record.
    let fresh = admit(&store, guarded(keyed("j2", "import", "k", at(2)), at(0), Some(("key", at(0))))).await;
    assert_eq!(fresh, Admission::Inserted);
}

// ---- Schedules ----

fn schedule_fire(schedule: &str, instant: i64, job_id: Option<&str>, fired_at: i64) -> ScheduleFireRecord {
    ScheduleFireRecord {
        schedule: schedule.to_owned(),
        instant: DateTime::from_timestamp(1_800_000_000 + instant, 0).expect("a valid instant"),
        job_id: job_id.map(str::to_owned),
        error: job_id.is_none().then(|| "the job refuses the schedule's params".to_owned()),
        at: at(fired_at),
    }
}

#[tokio::test]
async fn a_schedule_keeps_its_first_sighting() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let seen = |first_seen| Change::ScheduleSeen(ScheduleRecord { id: "s".into(), first_seen });
    store.commit(vec![seen(at(0))]).await.unwrap();
    store
        .commit(vec![seen(at(50)), Change::ScheduleSeen(ScheduleRecord { id: "t".into(), first_seen: at(7) })])
        .await
        .unwrap();
    let schedules = store.schedules().await.unwrap();
    assert_eq!(
        schedules,
        vec![
            ScheduleRecord { id: "s".into(), first_seen: at(0) },
            ScheduleRecord { id: "t".into(), first_seen: at(7) }
        ]
    );
}

#[tokio::test]
async fn a_second_fire_of_an_instant_is_refused_with_the_job_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut first = queued("first", "report", at(0));
    first.origin = Origin::Schedule;
    store
        .commit(vec![Change::ScheduleFire(schedule_fire("s", 60, Some("first"), 1)), Change::Insert(first.clone())])
        .await
        .unwrap();
    let mut second = queued("second", "report", at(1));
    second.origin = Origin::Schedule;
    let refused = store
        .commit(vec![Change::ScheduleFire(schedule_fire("s", 60, Some("second"), 2)), Change::Insert(second)])
        .await;
    assert!(
        matches!(&refused, Err(StoreError::Rejected { code: Some(ErrorCode::ConstraintViolation), .. })),
        "{refused:?}"
    );
    assert_eq!(store.job("second").await.unwrap(), None, "the job of the refused fire is not stored");
    assert_eq!(job(&store, "first").await, first);
    // Another instant, and the same instant of another schedule, are fine.
    store.commit(vec![Change::ScheduleFire(schedule_fire("s", 120, None, 3))]).await.unwrap();
    store.commit(vec![Change::ScheduleFire(schedule_fire("t", 60, None, 3))]).await.unwrap();
    let fires = store.schedule_fires("s", 10).await.unwrap();
    assert_eq!(fires, vec![schedule_fire("s", 120, None, 3), schedule_fire("s", 60, Some("first"), 1)], "newest first");
    assert_eq!(store.schedule_fires("s", 1).await.unwrap().len(), 1);
    assert!(store.schedule_fires("nope", 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_fire_with_both_a_job_and_an_error_or_neither_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut both = schedule_fire("s", 60, Some("j"), 1);
    both.error = Some("and an error".into());
    let mut neither = schedule_fire("s", 60, None, 1);
    neither.error = None;
    for fire in [both, neither] {
        let refused = store.commit(vec![Change::ScheduleFire(fire)]).await;
        assert!(matches!(refused, Err(StoreError::Rejected { .. })), "{refused:?}");
    }
    assert!(store.schedule_fires("s", 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn pruning_drops_old_schedule_fires_but_keeps_each_schedules_latest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let changes = vec![
        Change::ScheduleFire(schedule_fire("s", 60, None, 1)),
        Change::ScheduleFire(schedule_fire("s", 120, None, 2)),
        Change::ScheduleFire(schedule_fire("s", 180, None, 3)),
        Change::ScheduleFire(schedule_fire("t", 60, None, 1)),
        Change::ScheduleFire(schedule_fire("u", 60, None, 200)),
        Change::ScheduleFire(schedule_fire("u", 120, None, 201)),
    ];
    store.commit(changes).await.unwrap();
    store.prune(at(100), 1000).await.unwrap();
    assert_eq!(store.schedule_fires("s", 10).await.unwrap(), vec![schedule_fire("s", 180, None, 3)]);
    assert_eq!(store.schedule_fires("t", 10).await.unwrap(), vec![schedule_fire("t", 60, None, 1)]);
    assert_eq!(store.schedule_fires("u", 10).await.unwrap().len(), 2, "recent fires stay");
}

/// The writer does not checkpoint (its automatic checkpoint is a far-off
/// backstop): the checkpoint thread copies the WAL into the database file
/// beside it, so the file grows while the WAL holds far fewer pages than the
/// backstop, and every job reads back after a reopen.
#[tokio::test]
async fn the_checkpoint_thread_copies_the_wal_into_the_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let db = dir.path().join(DB_FILE_NAME);
    let before = std::fs::metadata(&db).unwrap().len();
    for batch in 0..20 {
        let changes = (0..100).map(|i| Change::Insert(queued(&format!("j{batch}-{i}"), "import", at(batch)))).collect();
        store.commit(changes).await.unwrap();
    }
    wait_until("the database file holds the committed pages", || {
        std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0) > before + 64 * 1024
    })
    .await;
    let wal_pages = std::fs::metadata(dir.path().join(format!("{DB_FILE_NAME}-wal"))).unwrap().len() / 4096;
    assert!(wal_pages < u64::from(broker::store::WAL_AUTOCHECKPOINT_PAGES), "the WAL holds {wal_pages} pages");
    store.close().await;
    let reopened = open(dir.path());
    assert_eq!(job(&reopened, "j19-99").await.id, "j19-99");
    assert_eq!(reopened.jobs(JobFilter { limit: 5000, ..JobFilter::default() }).await.unwrap().len(), 2000);
}

// ---- The start journal ----

/// Copies the files named `names` from `from` to `to`.
fn copy_files(from: &Path, to: &Path, names: &[&str]) {
    for name in names {
        let source = from.join(name);
        if source.exists() {
            std::fs::copy(&source, to.join(name)).unwrap();
        }
    }
}

const JOURNAL: &str = "starts.journal";

/// A power loss after starts were answered through the journal but before
/// SQLite's WAL reached the disk: the database files as they were before
/// those starts, beside the journal as it was after. Opening puts every
/// answered start back (plain and guarded, with its idempotency key), counts
/// them, and a second open changes nothing more.
#[tokio::test]
async fn starts_the_database_lost_come_back_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let early: Vec<JobRecord> = (0..20).map(|i| queued(&format!("early{i}"), "import", at(i))).collect();
    for job in &early {
        store.commit(vec![Change::Insert(job.clone())]).await.unwrap();
    }
    // What the disk held of SQLite before the later starts.
    let before = tempfile::tempdir().unwrap();
    {
        let _paused = store.pause_writes().await.unwrap();
        copy_files(dir.path(), before.path(), &[DB_FILE_NAME, &format!("{DB_FILE_NAME}-wal")]);
    }
    let late: Vec<JobRecord> = (0..30).map(|i| queued(&format!("late{i}"), "export", at(100 + i))).collect();
    for job in &late {
        store.commit(vec![Change::Insert(job.clone())]).await.unwrap();
    }
    let keyed_job = keyed("guarded", "export", "k1", at(200));
    let admission = admit(&store, guarded(keyed_job.clone(), at(0), Some(("idem-1", at(0))))).await;
    assert_eq!(admission, Admission::Inserted);
    assert!(store.stats().journal_syncs >= 1, "{:?}", store.stats());
    // ... and the journal as the disk held it after them.
    {
        let _paused = store.pause_writes().await.unwrap();
        copy_files(dir.path(), before.path(), &[JOURNAL]);
    }
    drop(store);

    let lost = before.path();
    let reopened = open(lost);
    for job in early.iter().chain(&late).chain([&keyed_job]) {
        assert_eq!(&self::job(&reopened, &job.id).await, job, "job {} after the loss", job.id);
    }
    // The idempotency key came back too: a repeat gets the same job.
    let repeat = keyed("repeat", "export", "k1", at(201));
    match admit(&reopened, guarded(repeat, at(0), Some(("idem-1", at(0))))).await {
        Admission::Existing(existing) => assert_eq!(existing.id, "guarded"),
        other => panic!("the key was lost: {other:?}"),
    }
    assert_eq!(reopened.counts().await.unwrap(), counted_in_the_file(lost));
    reopened.close().await;
    drop(reopened);
    let again = open(lost);
    assert_eq!(again.jobs(JobFilter { limit: 1000, ..JobFilter::default() }).await.unwrap().len(), 51);
}

/// A start is answered after a sync of the journal, not of the WAL; a
/// cancel (not a start) after a sync of the WAL.
#[tokio::test]
async fn starts_are_answered_through_the_journal_and_other_changes_through_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let before = store.stats();
    store.commit(vec![Change::Insert(queued("a", "import", at(0)))]).await.unwrap();
    let after_start = store.stats();
    assert_eq!(after_start.journal_syncs, before.journal_syncs + 1, "{after_start:?}");
    assert_eq!(after_start.syncs, before.syncs, "{after_start:?}");
    store.commit(vec![Change::Cancel { id: "a".into(), at: at(1) }]).await.unwrap();
    let after_cancel = store.stats();
    assert_eq!(after_cancel.syncs, after_start.syncs + 1, "{after_cancel:?}");
    assert_eq!(after_cancel.journal_syncs, after_start.journal_syncs, "{after_cancel:?}");
    // Turned off, a start waits for the WAL.
    drop(store);
    let off = SqliteStore::open(dir.path(), StoreOptions { start_journal: false, ..StoreOptions::default() }).unwrap();
    let before = off.stats();
    off.commit(vec![Change::Insert(queued("b", "import", at(2)))]).await.unwrap();
    assert_eq!(off.stats().syncs, before.syncs + 1);
    assert_eq!(off.stats().journal_syncs, 0);
}

/// A small journal fills and starts over many times (each time once a WAL
/// sync has covered it); its file keeps its size, and every start is there
/// after a reopen.
#[tokio::test]
async fn a_full_journal_starts_over_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions { start_journal_bytes: 16 * 1024, ..StoreOptions::default() };
    let store = SqliteStore::open(dir.path(), options.clone()).unwrap();
    let size = std::fs::metadata(dir.path().join(JOURNAL)).unwrap().len();
    assert_eq!(size, 16 * 1024);
    for batch in 0..60 {
        let changes = (0..10).map(|i| Change::Insert(queued(&format!("j{batch}-{i}"), "import", at(batch)))).collect();
        store.commit(changes).await.unwrap();
    }
    let stats = store.stats();
    // About 2 KiB a record: the 8 KiB half is passed every few commits, and a
    // commit answered through the WAL lets the journal start over.
    assert!(stats.journal_syncs >= 30 && stats.syncs >= 5, "{stats:?}");
    assert_eq!(std::fs::metadata(dir.path().join(JOURNAL)).unwrap().len(), size);
    drop(store);
    let reopened = SqliteStore::open(dir.path(), options).unwrap();
    assert_eq!(reopened.jobs(JobFilter { limit: 1000, ..JobFilter::default() }).await.unwrap().len(), 600);
}

/// A file where the journal should be that is not one (another program's,
/// or garbage) stops the store from opening, with a clear error, and is left as it was.
#[tokio::test]
async fn a_journal_that_is_not_one_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let path = dir.path().join(JOURNAL);
    std::fs::write(&path, b"not a journal at all, just some text").unwrap();
    let err = SqliteStore::open(dir.path(), StoreOptions::default()).err().expect("refused");
    assert!(matches!(err, StoreError::JournalUnreadable { .. }), "{err:?}");
    assert!(err.to_string().contains("starts.journal"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"not a journal at all, just some text");
}

/// Regression: CHECK constraints written as `x IN (...)` made SQLite fill a
/// temporary table with the list on every insert (three per job) and every
/// status update; schema 8 states them as comparisons. A database migrated
/// from schema 7 gets the same rules, and they still refuse a bad value.
#[tokio::test]
async fn job_inserts_and_updates_build_no_temporary_tables() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let raw = rusqlite::Connection::open(dir.path().join(DB_FILE_NAME)).unwrap();
    let opcodes = |sql: &str, values: usize| -> Vec<String> {
        let mut statement = raw.prepare(&format!("EXPLAIN {sql}")).unwrap();
        let nulls = vec![rusqlite::types::Value::Null; values];
        let rows =
            statement.query_map(rusqlite::params_from_iter(nulls.iter()), |row| row.get::<_, String>(1)).unwrap();
        rows.map(Result::unwrap).collect()
    };
    let columns: Vec<String> = (1..=27).map(|i| format!("?{i}")).collect();
    let insert = format!(
        "INSERT INTO jobs (id, job_name, params, status, attempts, run_id, parent_id, origin_kind, origin_gate,
         origin_key, origin_reason, priority, worker, lease, exit_code, signal, created_at, queued_at, started_at,
         finished_at, cancelled_at, not_before, output_tail, progress_percent, progress_message, error, unique_key)
         VALUES ({})",
        columns.join(", ")
    );
    for (sql, values) in [
        (insert.as_str(), 27),
        ("UPDATE jobs SET status = ?2, finished_at = ?3 WHERE id = ?1 AND status = 'running'", 3),
        ("INSERT INTO attempts (job_id, lease, attempt, worker, started_at) VALUES (?1, ?2, ?3, ?4, ?5)", 5),
        ("UPDATE attempts SET status = ?3, finished_at = ?4 WHERE job_id = ?1 AND lease = ?2", 4),
    ] {
        let ops = opcodes(sql, values);
        assert!(!ops.iter().any(|op| op == "OpenEphemeral"), "{sql}: {ops:?}");
    }
    // The rules hold as before.
    let refused = raw.execute(
        "INSERT INTO jobs (id, job_name, params, status, attempts, run_id, origin_kind, priority, created_at, output_tail)
         VALUES ('x', 'n', '{}', 'bogus', 0, 'x', 'start', 0, 0, '')",
        [],
    );
    assert!(refused.unwrap_err().to_string().contains("CHECK constraint failed"));
}

/// Two stores on one data directory would write over each other's journal
/// (and both dispatch its jobs): the second waits for the lock, up to its
/// busy timeout, and is refused; once the first is closed, it opens.
#[tokio::test]
async fn a_data_directory_in_use_is_refused_until_it_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let impatient = StoreOptions { busy_timeout: Duration::from_millis(200), ..StoreOptions::default() };
    let started = Instant::now();
    let err = SqliteStore::open(dir.path(), impatient.clone()).err().expect("refused while in use");
    assert!(matches!(err, StoreError::InUse { .. }), "{err:?}");
    assert!(err.to_string().contains("in use by another jobz broker"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    first.commit(vec![Change::Insert(queued("still", "import", at(0)))]).await.unwrap();
    first.close().await;
    drop(first);
    let second = SqliteStore::open(dir.path(), StoreOptions::default()).expect("free once closed");
    assert_eq!(job(&second, "still").await.id, "still");
}

/// Applies `changes` to a fresh store holding `jobs` queued: one change per
/// commit, or all of them in one commit. Returns the jobs, their attempts,
/// the counts (in memory and in the file) and the no-ops, to compare.
async fn apply_both_ways(
    jobs: &[&str],
    changes: &[Change],
) -> [(Vec<(JobRecord, Vec<AttemptRecord>)>, Vec<(String, Status, u64)>, Vec<(String, Status, u64)>, u64); 2] {
    let mut outcomes = Vec::new();
    for together in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let inserts = jobs.iter().map(|id| Change::Insert(queued(id, "import", at(0)))).collect();
        store.commit(inserts).await.unwrap();
        let skipped_before = store.stats().skipped;
        if together {
            store.commit(changes.to_vec()).await.unwrap();
        } else {
            for change in changes {
                store.commit(vec![change.clone()]).await.unwrap();
            }
        }
        let mut rows = Vec::new();
        for id in jobs {
            rows.push((job(&store, id).await, store.attempts(id).await.unwrap()));
        }
        let counts = store.counts().await.unwrap();
        let skipped = store.stats().skipped - skipped_before;
        store.close().await;
        outcomes.push((rows, counts, counted_in_the_file(dir.path()), skipped));
    }
    let together = outcomes.pop().unwrap();
    let apart = outcomes.pop().unwrap();
    [apart, together]
}

fn dispatch(id: &str, lease: u64, t: i64) -> Change {
    Change::Dispatch { id: id.into(), job_name: "import".into(), attempt: 1, worker: "w".into(), lease, at: at(t) }
}

fn finish(id: &str, lease: u64, status: Status, t: i64) -> Change {
    Change::Finish {
        id: id.into(),
        job_name: "import".into(),
        lease,
        status,
        exit_code: Some(if status == Status::Succeeded { 0 } else { 2 }),
        signal: None,
        at: at(t),
        output_tail: format!("{id} said so\n"),
        error: None,
    }
}

#[tokio::test]
async fn a_dispatch_and_its_finish_in_one_transaction_leave_what_they_leave_one_after_the_other() {
    let changes = [
        dispatch("ok", 7, 1),
        finish("ok", 7, Status::Succeeded, 2),
        dispatch("bad", 8, 1),
        finish("bad", 8, Status::Failed, 3),
    ];
    let [apart, together] = apply_both_ways(&["ok", "bad"], &changes).await;
    assert_eq!(together, apart);
    let (rows, counts, in_file, skipped) = together;
    assert_eq!(skipped, 0);
    let (ok, ok_attempts) = &rows[0];
    assert_eq!(
        (ok.status, ok.lease, ok.started_at, ok.finished_at),
        (Status::Succeeded, Some(7), Some(at(1)), Some(at(2)))
    );
    assert_eq!(ok.output_tail, "ok said so\n");
    assert_eq!(ok_attempts.len(), 1);
    assert_eq!(
        (ok_attempts[0].status, ok_attempts[0].finished_at, ok_attempts[0].exit_code),
        (Some(Status::Succeeded), Some(at(2)), Some(0))
    );
    assert_eq!(counts, vec![("import".to_owned(), Status::Failed, 1), ("import".to_owned(), Status::Succeeded, 1)]);
    assert_eq!(in_file, counts);
}

#[tokio::test]
async fn a_dispatch_held_in_a_transaction_meets_other_changes_of_its_job_as_if_applied_at_once() {
    let changes = [
        // A finish under another lease: the dispatch stands, the finish is a no-op.
        dispatch("other-lease", 1, 1),
        finish("other-lease", 2, Status::Succeeded, 2),
        // A cancel after the dispatch closes the running attempt.
        dispatch("cancelled", 3, 1),
        Change::Cancel { id: "cancelled".into(), at: at(2) },
        // A job cancelled before its dispatch: the dispatch and the finish are both no-ops.
        Change::Cancel { id: "gone".into(), at: at(1) },
        dispatch("gone", 4, 2),
        finish("gone", 4, Status::Succeeded, 3),
        // A requeue after the dispatch puts it back.
        dispatch("requeued", 5, 1),
        Change::Requeue { id: "requeued".into(), job_name: "import".into(), at: at(2), not_before: None },
        // A dispatch nothing else names, in the transaction until its end.
        dispatch("running", 6, 1),
        // Progress needs the job running: the dispatch comes first.
        dispatch("progressing", 7, 1),
        Change::Progress { id: "progressing".into(), progress: Progress { percent: 50.0, message: None } },
        finish("progressing", 7, Status::Succeeded, 3),
    ];
    let jobs = ["other-lease", "cancelled", "gone", "requeued", "running", "progressing"];
    let [apart, together] = apply_both_ways(&jobs, &changes).await;
    assert_eq!(together, apart);
    let (rows, _, _, skipped) = together;
    let status: Vec<Status> = rows.iter().map(|(job, _)| job.status).collect();
    assert_eq!(
        status,
        vec![Status::Running, Status::Cancelled, Status::Cancelled, Status::Queued, Status::Running, Status::Succeeded]
    );
    assert_eq!(skipped, 3, "the finish under another lease, and the dispatch and finish of the cancelled job");
}
