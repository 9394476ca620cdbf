//! [`SqliteStore`]: the [`Store`] on one SQLite file, for a single broker.
//!
//! Writes are queued to the writer thread ([`super::writer`]) through a
//! bounded channel; reads run in `spawn_blocking` on a small pool of read-only
//! connections, which WAL lets read beside the writer. A read sees every
//! change whose `commit` has returned.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Utc};
use jobz_core::Status;
use rusqlite::types::Value;
use rusqlite::{params_from_iter, Connection};
use tokio::sync::oneshot;

use super::checkpointer::Checkpointer;
use super::codec::{
    attempt_from_row, fire_from_row, gate_event_from_row, job_from_row, schedule_fire_from_row, schedule_from_row,
    ATTEMPT_COLUMNS, GATE_EVENT_COLUMNS, JOB_COLUMNS, SCHEDULE_FIRE_COLUMNS,
};
use super::counts::Counts;
use super::journal::Journal;
use super::schema::{open_reader, open_writer};
use super::syncer::Syncer;
use super::unflushed::{merge_newest_first, merge_queue_order};
use super::writer::{Request, Shared, Urgency, Writer, WriterParts};
use super::{
    Store, StoreError, StoreOptions, StoreStats, DB_FILE_NAME, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, SYNC_QUEUE_CAPACITY,
    WRITE_QUEUE_LATER_RESERVE_PERCENT,
};
use crate::model::{
    Admission, AttemptRecord, Change, FireRecord, GateEventRecord, JobFilter, JobRecord, ScheduleFireRecord,
    ScheduleRecord,
};

/// The store on a SQLite file; a cheap clone. The writer thread stops once
/// every clone is dropped (after committing what was queued) or on
/// [`Store::close`].
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    requests: SyncSender<Request>,
    shared: Arc<Shared>,
    readers: Arc<Readers>,
    /// Set by `close`: later writes fail with `Closed` even while the writer
    /// still drains what came before.
    closed: AtomicBool,
    /// Queued requests beyond which only `commit_later` is accepted.
    waited_max: u64,
    /// The writer thread, unparked by every request but a `Soon` commit (see `Gather::next`).
    writer: std::thread::Thread,
}

/// Read-only connections, each behind its own lock; a read takes the next one
/// round-robin and waits for it if it is busy.
struct Readers {
    connections: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl Readers {
    fn with<T>(&self, read: impl FnOnce(&Connection) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let count = self.connections.len();
        // Prefer an idle connection; if all are busy, queue on our turn's one.
        for offset in 0..count {
            if let Ok(conn) = self.connections[(start + offset) % count].try_lock() {
                return read(&conn);
            }
        }
        // A panic in another read poisons the lock but leaves the connection
        // usable: SQLite ends the failed statement when it is reset.
        let conn = self.connections[start % count].lock().unwrap_or_else(PoisonError::into_inner);
        read(&conn)
    }
}

/// While this lives, the writer thread is held after the transaction it was
/// in: queued commits wait and, once the queue is full, new ones fail with
/// [`StoreError::Busy`]. Dropping it lets the writer go on. For tests of
/// back-pressure and batching, and for taking a consistent copy of the file.
pub struct WritesPaused {
    _resume: std::sync::mpsc::Sender<()>,
}

impl SqliteStore {
    /// Opens (creating if needed) `dir/jobz.sqlite3`, brings its schema up to
    /// date and starts the writer thread.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<SqliteStore, StoreError> {
        let created = !dir.exists();
        std::fs::create_dir_all(dir).map_err(io_error("create the data directory", dir))?;
        if created {
            // The new directory's entry must reach the disk too, or a power
            // loss could take the whole store with it.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let path = dir.join(DB_FILE_NAME);
        let mut writer = open_writer(&path, &options)?;
        // Before anything reads the jobs: the starts a crash took from SQLite
        // come back from the journal first. It is read even when turned off.
        let journal = Journal::open(&mut writer, dir, options.start_journal_bytes, options.busy_timeout)?;
        let journal = options.start_journal.then_some(journal);
        // The migration above created the database and WAL files if they were
        // new; their directory entries are made durable before any commit is
        // acknowledged.
        sync_dir(dir)?;
        let connections = (0..options.read_connections.max(1))
            .map(|_| open_reader(&path, &options).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        let readers = Arc::new(Readers { connections, next: AtomicUsize::new(0) });
        let shared = Arc::new(Shared::with_counts(Counts::load(&writer)?));
        let capacity = options.queue_capacity.max(1);
        let (requests, receiver) = std::sync::mpsc::sync_channel(capacity);
        let waited_max = capacity - capacity * WRITE_QUEUE_LATER_RESERVE_PERCENT / 100;
        let wal = dir.join(format!("{DB_FILE_NAME}-wal"));
        let journal_file = journal.as_ref().map(|j| (j.file(), j.path().to_owned()));
        let syncer = Syncer::spawn(wal, journal_file, shared.clone(), SYNC_QUEUE_CAPACITY)
            .map_err(io_error("start the store sync thread for", &path))?;
        let checkpointer = Checkpointer::spawn(&path, &options, shared.clone())?;
        let parts = WriterParts {
            conn: writer,
            shared: shared.clone(),
            batch_changes_max: options.batch_changes_max,
            group_commit_delay: options.group_commit_delay,
            syncer,
            checkpointer,
            journal,
            defer_starts: options.defer_starts,
        };
        let writer = Writer::spawn(parts, receiver)
            .map_err(io_error("start the store writer thread for", &path))?
            .thread()
            .clone();
        let closed = AtomicBool::new(false);
        let waited_max = waited_max as u64;
        Ok(SqliteStore { inner: Arc::new(Inner { path, requests, shared, readers, closed, waited_max, writer }) })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The writer's counters since open.
    pub fn stats(&self) -> StoreStats {
        self.inner.shared.stats()
    }

    /// Holds the writer after the transaction in flight until the returned
    /// guard is dropped; see [`WritesPaused`].
    pub async fn pause_writes(&self) -> Result<WritesPaused, StoreError> {
        let (paused, paused_rx) = oneshot::channel();
        let (resume_tx, resume) = std::sync::mpsc::channel();
        self.send(Request::Pause { paused, resume })?;
        paused_rx.await.map_err(|_| StoreError::Closed)?;
        Ok(WritesPaused { _resume: resume_tx })
    }

    /// Queues `changes` and waits until they are durable.
    async fn commit_with(&self, changes: Vec<Change>, urgency: Urgency) -> Result<Vec<Admission>, StoreError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.send_waited(Request::Commit { changes, reply: Some(reply), urgency })?;
        // A dropped reply means the writer stopped before answering.
        answer.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues a request the caller will wait for, leaving the reserve of the
    /// queue to `commit_later`.
    fn send_waited(&self, request: Request) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        // A soft bound: concurrent senders may overshoot it by a few, which
        // the reserve absorbs.
        if self.inner.shared.queued.load(Ordering::Relaxed) >= self.inner.waited_max {
            return Err(StoreError::Busy);
        }
        self.send(request)
    }

    /// Queues a request without waiting for room: a full queue is back-pressure.
    fn send(&self, request: Request) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        // Counted before sending so the writer's decrement never runs first.
        self.inner.shared.queued.fetch_add(1, Ordering::Relaxed);
        let soon = matches!(request, Request::Commit { urgency: Urgency::Soon, .. });
        match self.inner.requests.try_send(request) {
            Ok(()) => {
                self.inner.shared.requests.fetch_add(1, Ordering::Relaxed);
                if !soon {
                    self.inner.writer.unpark();
                }
                Ok(())
            }
            Err(e) => {
                self.inner.shared.queued.fetch_sub(1, Ordering::Relaxed);
                match e {
                    TrySendError::Full(_) => Err(StoreError::Busy),
                    TrySendError::Disconnected(_) => Err(StoreError::Closed),
                }
            }
        }
    }

    /// Runs `read` on a read connection off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.inner.readers.clone();
        tokio::task::spawn_blocking(move || readers.with(read))
            .await
            .map_err(|e| StoreError::Internal(e.to_string()))?
    }
}

impl Store for SqliteStore {
    async fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        self.commit_admitting(changes).await.map(drop)
    }

    async fn commit_admitting(&self, changes: Vec<Change>) -> Result<Vec<Admission>, StoreError> {
        self.commit_with(changes, Urgency::Now).await
    }

    async fn commit_grouped(&self, changes: Vec<Change>) -> Result<Vec<Admission>, StoreError> {
        self.commit_with(changes, Urgency::Soon).await
    }

    fn commit_later(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.send(Request::Commit { changes, reply: None, urgency: Urgency::Soon })
    }

    async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        // Looked up here first: a job leaves the set only once its row is committed.
        if let Some(job) = self.inner.shared.unflushed.get(id) {
            return Ok(Some(job));
        }
        let id = id.to_owned();
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))
                .map_err(StoreError::sqlite("prepare the job query"))?;
            let mut rows = statement.query([&id]).map_err(StoreError::sqlite("read a job"))?;
            match rows.next().map_err(StoreError::sqlite("read a job"))? {
                Some(row) => job_from_row(row).map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn attempts(&self, id: &str) -> Result<Vec<AttemptRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(&format!(
                    "SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE job_id = ?1 ORDER BY attempt, started_at, lease"
                ))
                .map_err(StoreError::sqlite("prepare the attempts query"))?;
            let mut rows = statement.query([&id]).map_err(StoreError::sqlite("read attempts"))?;
            let mut attempts = Vec::new();
            while let Some(row) = rows.next().map_err(StoreError::sqlite("read attempts"))? {
                attempts.push(attempt_from_row(row)?);
            }
            Ok(attempts)
        })
        .await
    }

    async fn jobs(&self, filter: JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        // Read before SQLite: a job flushed in between is then found there.
        let unflushed = self.inner.shared.unflushed.matching(&filter);
        let limit = match filter.limit {
            0 => LIST_LIMIT_DEFAULT,
            limit => limit.min(LIST_LIMIT_MAX),
        };
        let stored = self
            .read(move |conn| {
                let mut conditions = Vec::new();
                let mut values = Vec::new();
                if let Some(status) = filter.status {
                    values.push(Value::Text(status.as_str().to_owned()));
                    conditions.push(format!("status = ?{}", values.len()));
                }
                if let Some(job_name) = filter.job_name {
                    values.push(Value::Text(job_name));
                    conditions.push(format!("job_name = ?{}", values.len()));
                }
                if let Some(run_id) = filter.run_id {
                    values.push(Value::Text(run_id));
                    conditions.push(format!("run_id = ?{}", values.len()));
                }
                values.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
                let filter_sql =
                    if conditions.is_empty() { String::new() } else { format!("WHERE {}", conditions.join(" AND ")) };
                // Eight shapes at most, so the statement cache holds them all.
                let sql = format!(
                    "SELECT {JOB_COLUMNS} FROM jobs {filter_sql} ORDER BY created_at DESC, id DESC LIMIT ?{}",
                    values.len()
                );
                let mut statement = conn.prepare_cached(&sql).map_err(StoreError::sqlite("prepare the jobs query"))?;
                collect_jobs(statement.query(params_from_iter(values)))
            })
            .await?;
        Ok(merge_newest_first(stored, unflushed, limit))
    }

    async fn unfinished(&self) -> Result<Vec<JobRecord>, StoreError> {
        let unflushed = self.inner.shared.unflushed.all();
        let stored = self
            .read(|conn| {
                // The few unfinished jobs are found through jobs_by_status; SQLite
                // sorts them (once, at start) in queue order.
                let mut statement = conn
                    .prepare_cached(&format!(
                        "SELECT {JOB_COLUMNS} FROM jobs WHERE status IN ('queued', 'running')
                     ORDER BY priority DESC, queued_at, seq"
                    ))
                    .map_err(StoreError::sqlite("prepare the unfinished query"))?;
                collect_jobs(statement.query([]))
            })
            .await?;
        Ok(merge_queue_order(stored, unflushed))
    }

    async fn prune(&self, finished_before: DateTime<Utc>, limit: usize) -> Result<Vec<String>, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send_waited(Request::Prune { finished_before, limit, reply })?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn prune_idempotency_keys(&self, created_before: DateTime<Utc>, limit: usize) -> Result<usize, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send_waited(Request::PruneKeys { created_before, limit, reply })?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn counts(&self) -> Result<Vec<(String, Status, u64)>, StoreError> {
        Ok(self.inner.shared.counts.snapshot())
    }

    async fn gate_events(&self, from: u64, through: u64, limit: usize) -> Result<Vec<GateEventRecord>, StoreError> {
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(&format!(
                    "SELECT {GATE_EVENT_COLUMNS} FROM gate_events WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3"
                ))
                .map_err(StoreError::sqlite("prepare the gate events query"))?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let mut rows = statement
                .query(rusqlite::params![from as i64, through as i64, limit])
                .map_err(StoreError::sqlite("read gate events"))?;
            let mut events = Vec::new();
            while let Some(row) = rows.next().map_err(StoreError::sqlite("read gate events"))? {
                events.push(gate_event_from_row(row)?);
            }
            Ok(events)
        })
        .await
    }

    async fn last_gate_event(&self) -> Result<u64, StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM gate_events", [], |row| row.get::<_, i64>(0))
                .map(|seq| seq.max(0) as u64)
                .map_err(StoreError::sqlite("read the last gate event"))
        })
        .await
    }

    async fn gate_fires(&self) -> Result<Vec<FireRecord>, StoreError> {
        self.read(|conn| {
            let mut statement = conn
                .prepare_cached("SELECT gate, key, reason, job_id, error, at FROM gate_fires ORDER BY at, gate, key")
                .map_err(StoreError::sqlite("prepare the gate fires query"))?;
            let mut rows = statement.query([]).map_err(StoreError::sqlite("read gate fires"))?;
            let mut fires = Vec::new();
            while let Some(row) = rows.next().map_err(StoreError::sqlite("read gate fires"))? {
                fires.push(fire_from_row(row)?);
            }
            Ok(fires)
        })
        .await
    }

    async fn schedules(&self) -> Result<Vec<ScheduleRecord>, StoreError> {
        self.read(|conn| {
            let mut statement = conn
                .prepare_cached("SELECT id, first_seen FROM schedules ORDER BY id")
                .map_err(StoreError::sqlite("prepare the schedules query"))?;
            let mut rows = statement.query([]).map_err(StoreError::sqlite("read schedules"))?;
            let mut schedules = Vec::new();
            while let Some(row) = rows.next().map_err(StoreError::sqlite("read schedules"))? {
                schedules.push(schedule_from_row(row)?);
            }
            Ok(schedules)
        })
        .await
    }

    async fn schedule_fires(&self, schedule: &str, limit: usize) -> Result<Vec<ScheduleFireRecord>, StoreError> {
        let schedule = schedule.to_string();
        self.read(move |conn| {
            let mut statement = conn
                .prepare_cached(&format!(
                    "SELECT {SCHEDULE_FIRE_COLUMNS} FROM schedule_fires WHERE schedule = ?1 ORDER BY instant DESC LIMIT ?2"
                ))
                .map_err(StoreError::sqlite("prepare the schedule fires query"))?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let mut rows =
                statement.query(rusqlite::params![schedule, limit]).map_err(StoreError::sqlite("read schedule fires"))?;
            let mut fires = Vec::new();
            while let Some(row) = rows.next().map_err(StoreError::sqlite("read schedule fires"))? {
                fires.push(schedule_fire_from_row(row)?);
            }
            Ok(fires)
        })
        .await
    }

    async fn ping(&self) -> bool {
        let shared = &self.inner.shared;
        if self.inner.closed.load(Ordering::Acquire)
            || !shared.writer_running.load(Ordering::Acquire)
            || shared.last_batch_failed.load(Ordering::Relaxed)
            || shared.last_sync_failed.load(Ordering::Relaxed)
        {
            return false;
        }
        let read = self.read(|conn| {
            conn.query_row("SELECT COUNT(*) FROM (SELECT 1 FROM jobs LIMIT 1)", [], |row| row.get::<_, i64>(0))
                .map_err(StoreError::sqlite("ping"))
        });
        read.await.is_ok()
    }

    async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let (done, finished) = oneshot::channel();
        let requests = self.inner.requests.clone();
        let shared = self.inner.shared.clone();
        let writer = self.inner.writer.clone();
        // A blocking send: the close must wait for room behind what is queued,
        // never be refused as Busy.
        let sent = tokio::task::spawn_blocking(move || {
            shared.queued.fetch_add(1, Ordering::Relaxed);
            let sent = requests.send(Request::Close { done }).is_ok();
            shared.requests.fetch_add(u64::from(sent), Ordering::Relaxed);
            writer.unpark();
            if !sent {
                shared.queued.fetch_sub(1, Ordering::Relaxed);
            }
            sent
        })
        .await;
        if matches!(sent, Ok(true)) {
            // Err means the writer stopped first; either way it is done.
            let _ = finished.await;
        }
    }
}

/// Decodes every row of a job query.
fn collect_jobs(rows: rusqlite::Result<rusqlite::Rows<'_>>) -> Result<Vec<JobRecord>, StoreError> {
    let mut rows = rows.map_err(StoreError::sqlite("list jobs"))?;
    let mut jobs = Vec::new();
    while let Some(row) = rows.next().map_err(StoreError::sqlite("list jobs"))? {
        jobs.push(job_from_row(row)?);
    }
    Ok(jobs)
}

fn io_error<'a>(context: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |error| StoreError::Io { context, path: path.to_owned(), error: Arc::new(error) }
}

/// fsyncs a directory, making the entries created in it durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("sync the directory", dir))
}
