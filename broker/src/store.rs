//! The broker's durable store: every job and attempt, kept so that a job
//! answered 202 survives a `kill -9` of the broker (SPEC "Durable").
//!
//! Dispatch code talks to the narrow [`Store`] trait only, so a PostgreSQL
//! store for several brokers sharing one database can be added later without
//! touching dispatch. The one implementation today is [`SqliteStore`]: one
//! SQLite file in WAL mode, written by one dedicated thread that
//! group-commits (many callers' changes in one transaction) while a second
//! thread syncs the WAL for the commits made meanwhile (one fsync for many),
//! answering none before its sync; and read through a small pool of read-only
//! connections that run beside the writer. Plain starts are answered once
//! the start journal holds them, before their rows are in SQLite; reads find
//! them in the meantime in `store/unflushed.rs`.
//!
//! Each [`Change`] applies only to a job in the state it expects, so the store
//! is the last line of defence against a stale or doubled change. A change
//! that matches no row (unknown or pruned job, wrong lease, wrong state) is a
//! no-op, logged and counted in [`StoreStats::skipped`], never an error:
//!
//! | change | applies when the job is | does |
//! |---|---|---|
//! | `Insert` | absent (a duplicate id is refused) | the row as given |
//! | `InsertUnlessHeld` | absent, and no job stands for it (see below) | the row as given; else nothing, and the commit answers with the job that stands for it |
//! | `Dispatch` | queued | running; `attempts`, `worker`, `lease`, `started_at` set; `not_before` and progress cleared; an attempt row added |
//! | `Finish` | running under `lease` | the final status, `finished_at`, `exit_code`, `signal`, `output_tail`, `error`; the attempt row gets status, end and exit code |
//! | `Requeue` | running | queued, `lease` cleared, `queued_at = at`, `not_before`; progress cleared; the attempt row gets `finished_at` and keeps status NULL (it ended without a result) |
//! | `Cancel` | queued or running | cancelled, `cancelled_at = finished_at = at`; a running attempt's row ends as cancelled |
//! | `Retry` | final (any of the four) | queued, `queued_at = at`, `not_before`; `attempts` kept; finish fields, lease and progress cleared |
//! | `Progress` | running | the progress columns |
//! | `Stale` | (the attempt row with that lease and worker exists) | that row: stale, its status, exit code and end; the job untouched |
//! | `ScheduleSeen` | (any) | the schedule's row, unless it exists: the first sighting stays |
//! | `ScheduleFire` | (no fire of that schedule and instant yet; a second one is *refused*, not skipped) | the fire's row |
//!
//! A guarded insert (`InsertUnlessHeld`) is the unique jobs and idempotency
//! keys of SPEC `job_start`, decided in the writer's transaction so that
//! concurrent starts are serialized there. A job stands for the start when its
//! idempotency key was first given to that job (within the key's time, with
//! the same job name and params; other params answer `KeyReused`), or when it
//! has the same job name and `unique_key` and is queued or running, or
//! succeeded at or after `succeeded_since`. Failed, timed-out and cancelled
//! jobs hold no key. The idempotency key is then recorded for the job that
//! stands for the start, new or not.
//!
//! `worker` and `started_at` stay on a requeued or retried job: they describe
//! the last attempt until the next dispatch replaces them.
//!
//! Times are stored as integer Unix microseconds: sub-microsecond digits are
//! dropped on the way in (see [`to_store_precision`]), so a record read back
//! equals the record written once its times are at microsecond precision.

mod checkpointer;
mod codec;
mod counts;
mod journal;
mod schema;
mod sqlite;
mod syncer;
mod unflushed;
mod writer;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use jobz_core::Status;

use crate::model::{
    Admission, AttemptRecord, Change, FireRecord, GateEventRecord, JobFilter, JobRecord, ScheduleFireRecord,
    ScheduleRecord,
};

pub use codec::to_store_precision;
pub use sqlite::{SqliteStore, WritesPaused};

// ---- Limits and settings, in one place (STYLE 6) ----

/// The database file inside the data directory.
pub const DB_FILE_NAME: &str = "jobz.sqlite3";

/// Commit requests (of any number of changes each) the writer's queue holds;
/// beyond that `commit` fails fast with [`StoreError::Busy`] (HTTP 429) instead
/// of queueing without bound.
pub const WRITE_QUEUE_CAPACITY: usize = 4096;

/// The share of the write queue (in percent) that only `commit_later` may
/// fill. Under overload new work is refused (`commit` answers Busy, the front
/// door 429) while the bookkeeping of jobs already running (dispatches,
/// progress) still gets through: losing a Dispatch would leave the job
/// queued in the store and make its Finish a no-op.
pub const WRITE_QUEUE_LATER_RESERVE_PERCENT: usize = 25;

/// Changes applied in one transaction at most. The writer stops draining the
/// queue when the next request would go beyond it; a single request larger
/// than this is still applied whole, in a transaction of its own.
pub const BATCH_CHANGES_MAX: usize = 1024;

/// How long the writer lets the loop's bookkeeping (dispatches, results,
/// follow-ups: [`Store::commit_grouped`] and [`Store::commit_later`]) wait for
/// other changes to share its commit and sync. Nobody is kept waiting by it:
/// a worker gets its next job before its result is committed; only the
/// result's acknowledgement and the start of follow-ups come this much later.
pub const GROUP_COMMIT_DELAY: Duration = Duration::from_millis(5);

/// How long starts answered through the start journal alone may wait for
/// their rows to go into SQLite when no other transaction takes them along
/// first (see `store/unflushed.rs`). Reads see them meanwhile; this bounds
/// how much the journal holds that SQLite does not.
pub const FLUSH_DELAY: Duration = Duration::from_millis(10);

/// Starts answered through the start journal whose rows wait for SQLite,
/// beyond which they go in at once rather than after [`FLUSH_DELAY`].
pub const DEFERRED_ROWS_MAX: usize = 1024;

/// Rows a flush of those starts inserts between looks at the queue: the
/// plain starts queued meanwhile are answered through the journal between
/// chunks, rather than after the whole flush (about 7 µs a row here).
pub const FLUSH_CHUNK_ROWS: usize = 32;

/// Committed transactions waiting for the syncer; beyond it the writer waits
/// for the disk instead of running further ahead of it.
pub const SYNC_QUEUE_CAPACITY: usize = 64;

/// How long a statement waits for a lock held by another connection (another
/// process with the file open, or a checkpoint) before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The start journal's size, preallocated in the data directory. It starts
/// over once past half of it, when a WAL sync has covered what it holds: at
/// 20,000 starts a second, about 200 bytes each, every second or so.
pub const START_JOURNAL_BYTES: u64 = 16 << 20;

/// Read-only connections serving `job`, `jobs`, `attempts` and the like.
pub const READ_CONNECTIONS: usize = 4;

/// Prepared statements each connection keeps compiled.
pub const STATEMENT_CACHE_CAPACITY: usize = 64;

/// The writer checkpoints the WAL into the database file itself once it
/// holds this many pages: a backstop only, for a checkpoint thread
/// (`store/checkpointer.rs`, every 50 ms) that cannot keep up. SQLite's
/// default, 1000, made every few dozen commits stall the writer on a copy
/// and a sync of the database file.
pub const WAL_AUTOCHECKPOINT_PAGES: u32 = 16_000;

/// After a checkpoint the WAL file is truncated to at most this size, so one
/// burst does not leave a large file behind for good.
pub const JOURNAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

/// `jobs()` with `limit: 0` returns this many jobs.
pub const LIST_LIMIT_DEFAULT: usize = 100;

/// `jobs()` never returns more than this many jobs, whatever the limit asked.
pub const LIST_LIMIT_MAX: usize = 10_000;

/// `prune()` deletes at most this many jobs per call, whatever the limit asked,
/// so one call never holds the writer for long.
pub const PRUNE_BATCH_MAX: usize = 10_000;

/// The durable store as the broker's dispatch code sees it.
///
/// Writes go through [`Store::commit`] (the caller waits until the changes are
/// durable), [`Store::commit_grouped`] (the same, for a caller that can wait a
/// few milliseconds for others to share the commit) or [`Store::commit_later`]
/// (it does not wait). Changes are applied in
/// the order they were queued, and one call's changes are all-or-nothing.
pub trait Store: Clone + Send + Sync + 'static {
    /// Applies `changes` in order, durably: returns only after they are
    /// committed (fsync'd). On error nothing of them was applied.
    ///
    /// Fails fast with [`StoreError::Busy`] when the write queue is full (a
    /// share of it is kept for [`Store::commit_later`]),
    /// [`StoreError::Rejected`] when a change breaks a rule of the schema (the
    /// changes of other callers committed in the same transaction are not
    /// affected), and [`StoreError::Sqlite`] when the storage failed (disk
    /// full, I/O error): then nothing of the whole transaction was applied.
    fn commit(&self, changes: Vec<Change>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Like [`Store::commit`], and answers what became of each
    /// [`Change::InsertUnlessHeld`] among `changes`, in their order. The
    /// decision is taken inside the writer's transaction, after every change
    /// committed before it: of two guarded inserts with one key, in one batch
    /// or not, the second sees the first.
    fn commit_admitting(&self, changes: Vec<Change>)
        -> impl Future<Output = Result<Vec<Admission>, StoreError>> + Send;

    /// Like [`Store::commit_admitting`], for a caller that nobody waits on
    /// urgently (the loop's results and follow-ups): the store may hold the
    /// changes up to [`GROUP_COMMIT_DELAY`] so that others share their commit.
    fn commit_grouped(&self, changes: Vec<Change>) -> impl Future<Output = Result<Vec<Admission>, StoreError>> + Send;

    /// Like [`Store::commit`], but the caller does not wait (dispatch
    /// bookkeeping); a failure to apply is logged. Only fails when the queue is
    /// full ([`StoreError::Busy`], back-pressure) or the store is closed.
    /// Reads see the changes once the writer has committed them.
    fn commit_later(&self, changes: Vec<Change>) -> Result<(), StoreError>;

    /// The job `id`, or `None` when there is no such job.
    fn job(&self, id: &str) -> impl Future<Output = Result<Option<JobRecord>, StoreError>> + Send;

    /// The attempts of job `id`, in attempt order (empty for an unknown job).
    fn attempts(&self, id: &str) -> impl Future<Output = Result<Vec<AttemptRecord>, StoreError>> + Send;

    /// Jobs matching `filter`, newest first (by `created_at`, then `id`).
    /// `limit: 0` means [`LIST_LIMIT_DEFAULT`]; no answer exceeds [`LIST_LIMIT_MAX`].
    fn jobs(&self, filter: JobFilter) -> impl Future<Output = Result<Vec<JobRecord>, StoreError>> + Send;

    /// The queued and running jobs, for recovery at start, in queue order:
    /// higher priority first, then first queued first (by `queued_at`, then
    /// insertion order).
    fn unfinished(&self) -> impl Future<Output = Result<Vec<JobRecord>, StoreError>> + Send;

    /// Deletes at most `limit` (and at most [`PRUNE_BATCH_MAX`]) finished jobs
    /// whose `finished_at` is before `finished_before`, oldest first, with their
    /// attempts, in one transaction. Returns the deleted jobs' ids, so the
    /// caller can delete their log files; fewer than `limit` means there is
    /// nothing more to prune for now.
    fn prune(
        &self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Forgets at most `limit` (and at most [`PRUNE_BATCH_MAX`]) idempotency
    /// keys first given before `created_before`, oldest first, in one
    /// transaction. Returns how many were forgotten; fewer than `limit` means
    /// there is nothing more to prune for now.
    fn prune_idempotency_keys(
        &self,
        created_before: DateTime<Utc>,
        limit: usize,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// The number of jobs by name and status, for metrics. Pairs with no job
    /// are left out.
    fn counts(&self) -> impl Future<Output = Result<Vec<(String, Status, u64)>, StoreError>> + Send;

    /// Gate events with `from <= seq <= through`, in `seq` order, at most `limit`.
    fn gate_events(
        &self,
        from: u64,
        through: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<GateEventRecord>, StoreError>> + Send;

    /// The largest gate event `seq` recorded (0 when there is none).
    fn last_gate_event(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Every recorded fire.
    fn gate_fires(&self) -> impl Future<Output = Result<Vec<FireRecord>, StoreError>> + Send;

    /// Every schedule the broker has run with.
    fn schedules(&self) -> impl Future<Output = Result<Vec<ScheduleRecord>, StoreError>> + Send;

    /// The latest fires of `schedule`, newest instant first, at most `limit`.
    fn schedule_fires(
        &self,
        schedule: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<ScheduleFireRecord>, StoreError>> + Send;

    /// True when the store can read and its writer is running and its last
    /// transaction (if any) committed. For `/healthz`.
    fn ping(&self) -> impl Future<Output = bool> + Send;

    /// Stops taking changes, applies everything already queued and waits until
    /// it is committed (SPEC: "the broker flushes its store" on SIGTERM).
    /// Later commits fail with [`StoreError::Closed`]; reads keep working. A
    /// second call returns at once.
    fn close(&self) -> impl Future<Output = ()> + Send;
}

/// Knobs of a [`SqliteStore`]; [`StoreOptions::default`] takes the named constants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Commit requests queued for the writer before `commit_later` answers
    /// Busy; `commit` and `prune` answer Busy once the queue is within
    /// [`WRITE_QUEUE_LATER_RESERVE_PERCENT`] of this.
    pub queue_capacity: usize,
    /// Changes applied in one transaction at most.
    pub batch_changes_max: usize,
    /// How long the loop's bookkeeping may wait for company ([`GROUP_COMMIT_DELAY`]).
    pub group_commit_delay: Duration,
    pub busy_timeout: Duration,
    pub read_connections: usize,
    /// Caps the database at this many pages (SQLite `max_page_count`); a write
    /// beyond it fails as on a full disk. `None` keeps SQLite's own cap.
    pub max_page_count: Option<u32>,
    /// Answer starts after a sync of the start journal (`store/journal.rs`)
    /// rather than of the WAL. Off, every commit waits for a WAL sync; the
    /// journal is still read at open, so turning it off loses nothing.
    pub start_journal: bool,
    /// The start journal's preallocated size ([`START_JOURNAL_BYTES`]).
    pub start_journal_bytes: u64,
    /// Answer urgent batches of plain starts once the start journal is
    /// synced, with no SQLite transaction on the way, and put their rows into
    /// SQLite afterwards (`store/unflushed.rs`). Off, such a batch is inserted
    /// and committed first, as every other transaction is, and a storage
    /// failure refuses it. Needs `start_journal`.
    pub defer_starts: bool,
}

impl Default for StoreOptions {
    fn default() -> StoreOptions {
        StoreOptions {
            queue_capacity: WRITE_QUEUE_CAPACITY,
            batch_changes_max: BATCH_CHANGES_MAX,
            group_commit_delay: GROUP_COMMIT_DELAY,
            busy_timeout: BUSY_TIMEOUT,
            read_connections: READ_CONNECTIONS,
            max_page_count: None,
            start_journal: true,
            start_journal_bytes: START_JOURNAL_BYTES,
            defer_starts: true,
        }
    }
}

/// Counters of the writer since the store was opened, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Transactions committed, prunes included.
    pub commits: u64,
    /// Syncs of the WAL; each makes one or more commits durable.
    pub syncs: u64,
    /// Syncs of the start journal; each makes the starts of one or more commits durable.
    pub journal_syncs: u64,
    /// Starts answered through the start journal while their writer was
    /// putting earlier ones into SQLite (between chunks of that transaction).
    pub starts_during_flushes: u64,
    /// Changes in committed transactions, skipped ones included.
    pub changes: u64,
    /// Committed changes that matched no row in the state they expect (unknown
    /// or pruned job, stale lease, job already finished): applied as no-ops.
    pub skipped: u64,
    /// Commit requests refused for breaking a rule of the schema.
    pub rejected: u64,
    /// Transactions rolled back because the storage failed.
    pub failed_batches: u64,
    /// The most changes one transaction held.
    pub largest_batch: u64,
    /// Requests waiting in the writer's queue right now.
    pub queued: u64,
    /// Requests queued for the writer since open.
    pub requests: u64,
}

/// Why the store could not do what was asked.
///
/// Cheap to clone, because the writer hands one error to every waiter of a
/// failed transaction.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The write queue is full: back-pressure, try again later (HTTP 429).
    #[error("the store's write queue is full; try again later")]
    Busy,
    /// The store was closed or its writer stopped.
    #[error("the store is closed")]
    Closed,
    #[error("{context} {}: {error}", path.display())]
    Io { context: &'static str, path: PathBuf, error: Arc<std::io::Error> },
    /// The storage failed (disk full, I/O error, lock timeout). Nothing of the
    /// transaction it happened in was applied.
    #[error("{context}: {error}")]
    Sqlite { context: String, error: Arc<rusqlite::Error> },
    /// A change broke a rule of the schema (duplicate id, a state the schema
    /// forbids, a value that cannot be stored): a bug in the caller. Nothing of
    /// this commit was applied; other callers' commits were not affected.
    #[error("{context} was refused, nothing of the commit was stored: {reason}")]
    Rejected { context: String, reason: String, code: Option<rusqlite::ErrorCode> },
    /// A stored row could not be read back into a record.
    #[error("job {id:?} in the store is unreadable: column {column}: {reason}")]
    Corrupt { id: String, column: &'static str, reason: String },
    /// The database was written by a newer jobz.
    #[error(
        "{} has schema version {found}, newer than the {supported} this jobz understands; upgrade jobz",
        path.display()
    )]
    SchemaTooNew { path: PathBuf, found: i64, supported: i64 },
    /// The database cannot be set up as the store needs it (e.g. no WAL on this file system).
    #[error("{0}")]
    Unsupported(String),
    /// The start journal cannot be read, so starts it may hold cannot be put back.
    #[error("the start journal {}: {reason}", path.display())]
    JournalUnreadable { path: PathBuf, reason: String },
    /// Another store (another broker, or this one still closing) has the data directory open.
    #[error("the data directory {} is in use by another jobz broker; stop it first", path.display())]
    InUse { path: PathBuf },
    /// A read task died (a bug); the store itself is unaffected.
    #[error("a store read failed unexpectedly: {0}")]
    Internal(String),
}

impl StoreError {
    /// The SQLite result code behind this error, if any (e.g. `DiskFull`,
    /// `ConstraintViolation`).
    pub fn sqlite_code(&self) -> Option<rusqlite::ErrorCode> {
        match self {
            StoreError::Sqlite { error, .. } => error.sqlite_error_code(),
            StoreError::Rejected { code, .. } => *code,
            _ => None,
        }
    }

    /// A closure for `map_err` that wraps a SQLite error with what was being done.
    /// The context is a `&'static str` so the success path allocates nothing.
    pub(crate) fn sqlite(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
        move |error| StoreError::Sqlite { context: context.to_string(), error: Arc::new(error) }
    }
}
