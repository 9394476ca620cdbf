//! The writer thread: the only code that writes the database, on its own
//! connection, with group commit.
//!
//! It blocks for the first request, drains whatever else is already queued (up
//! to the batch limit), applies all of it in one transaction and commits once,
//! so one fsync covers many callers, and then answers every waiter. A change
//! that breaks a rule of the schema (a caller's bug) fails only that caller:
//! the batch is first applied plainly, and only if a change is rejected is the
//! transaction rolled back and the batch redone with each caller's changes in
//! their own savepoint, which rolls back only the rejected caller's changes. A
//! storage failure (disk full, I/O error) rolls back the whole transaction and
//! every waiter gets the error.
//!
//! Committed answers go to the syncer thread ([`super::syncer`]), which
//! releases them once the WAL is synced, while the writer goes on with the
//! next batch. So nothing is answered before it is on disk, and no 202 is ever
//! sent for a job that is not.
//!
//! An urgent batch commits once nothing more is queued and the syncer is free:
//! while the syncer syncs the last commit, the writer keeps taking requests
//! into the open transaction (they could not be synced sooner anyway), and
//! commits them the moment the sync is done, so each sync covers one commit
//! applied while the one before it was on its way to the disk.
//!
//! Plain starts need no transaction before their answer: an urgent batch of
//! them is appended to the start journal, which the writer syncs itself
//! before it answers them, and their rows are inserted first thing in the
//! next transaction ([`Writer::defer_batch`]).
//!
//! Not every commit is waited on by a person. A request says how soon it must
//! be committed ([`Urgency`]): a start over HTTP commits at once (`Now`), while
//! the loop's bookkeeping (dispatches, results, follow-ups) may wait up to
//! [`GROUP_COMMIT_DELAY`](super::GROUP_COMMIT_DELAY) for company (`Soon`), so that under load many jobs'
//! results share one commit and one sync instead of one each.
//!
//! It is a `std::thread`, not a tokio task, because every SQLite call blocks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use tokio::sync::oneshot;
use tracing::{debug, error, warn};

use super::checkpointer::Checkpointer;
use super::codec::{
    gate_event_kind_to_sql, gate_reason_to_sql, job_from_row, lease_to_sql, opt_time_to_sql, origin_to_sql,
    params_to_sql, time_to_sql, JOB_COLUMNS,
};
use super::counts::{Counts, Transition};
use super::journal::{self, Journal, RowTable, JOB_VALUES, KEY_VALUES};
use super::syncer::{Durability, Syncer};
use super::unflushed::Unflushed;
use super::{StoreError, StoreStats, DEFERRED_ROWS_MAX, FLUSH_CHUNK_ROWS, FLUSH_DELAY, PRUNE_BATCH_MAX};
use jobz_core::Status;

use crate::model::{Admission, Change, GuardedInsert, JobRecord};

/// The answer to one request.
pub(super) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// What the store's handles ask of the writer, in one bounded queue so that
/// every write (and a pause or close) is ordered with every other.
pub(super) enum Request {
    /// `reply` is `None` for `commit_later`; it carries the admission of each
    /// guarded insert among `changes`, in order.
    Commit {
        changes: Vec<Change>,
        reply: Option<Reply<Vec<Admission>>>,
        urgency: Urgency,
    },
    Prune {
        finished_before: DateTime<Utc>,
        limit: usize,
        reply: Reply<Vec<String>>,
    },
    /// Forget idempotency keys first given before `created_before`.
    PruneKeys {
        created_before: DateTime<Utc>,
        limit: usize,
        reply: Reply<usize>,
    },
    /// Stop after the transaction in flight until `resume`'s sender is dropped.
    Pause {
        paused: oneshot::Sender<()>,
        resume: std::sync::mpsc::Receiver<()>,
    },
    /// Commit what came before, then stop.
    Close {
        done: oneshot::Sender<()>,
    },
}

/// How soon a commit request must be committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Urgency {
    /// Somebody waits for it (a start, cancel or retry over HTTP): commit at once,
    /// with whatever else is queued.
    Now,
    /// The loop's bookkeeping: commit within the group commit delay, with whatever
    /// comes meanwhile, or at once with the next `Now`.
    Soon,
}

/// Counters and flags shared between the writer and the store's handles.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) commits: AtomicU64,
    /// WAL syncs done by the syncer thread; each covers one or more commits.
    pub(super) syncs: AtomicU64,
    /// Start-journal syncs, done by the writer for plain starts and by the syncer for journaled transactions.
    pub(super) journal_syncs: AtomicU64,
    /// Starts answered through the journal while a flush's transaction was open.
    pub(super) starts_during_flushes: AtomicU64,
    /// The start-journal number of the last committed transaction that had one.
    pub(super) journal_committed: AtomicU64,
    /// Every journaled transaction up to this number is durable in the WAL (set after WAL syncs).
    pub(super) journal_covered: AtomicU64,
    changes: AtomicU64,
    skipped: AtomicU64,
    rejected: AtomicU64,
    failed_batches: AtomicU64,
    largest_batch: AtomicU64,
    /// Requests in the queue: incremented by senders, decremented on receipt.
    pub(super) queued: AtomicU64,
    /// Requests ever queued.
    pub(super) requests: AtomicU64,
    pub(super) writer_running: AtomicBool,
    pub(super) last_batch_failed: AtomicBool,
    /// Set when a sync failed (of the WAL or the start journal), cleared by the next that succeeds.
    pub(super) last_sync_failed: AtomicBool,
    /// Jobs by name and status, as committed.
    pub(super) counts: Counts,
    /// Starts durable in the start journal whose rows are not in SQLite yet.
    pub(super) unflushed: Unflushed,
    /// Set by the syncer while it syncs; the writer holds urgent commits until it is done.
    pub(super) syncing: AtomicBool,
    /// The writer thread, for the syncer to unpark when a sync is done.
    pub(super) writer_thread: std::sync::OnceLock<std::thread::Thread>,
}

impl Shared {
    pub(super) fn with_counts(counts: Counts) -> Shared {
        Shared { counts, ..Shared::default() }
    }

    pub(super) fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.commits.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            journal_syncs: self.journal_syncs.load(Ordering::Relaxed),
            starts_during_flushes: self.starts_during_flushes.load(Ordering::Relaxed),
            changes: self.changes.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            failed_batches: self.failed_batches.load(Ordering::Relaxed),
            largest_batch: self.largest_batch.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
        }
    }

    /// Records the outcome of a sync of `what` on which `waiting` callers wait:
    /// a failure is logged, and none of them is acknowledged.
    pub(super) fn record_sync(&self, synced: &Result<(), StoreError>, what: &str, waiting: usize) {
        self.last_sync_failed.store(synced.is_err(), Ordering::Relaxed);
        if let Err(e) = synced {
            error!(error = %e, waiting, "syncing {what} failed; what waits for it is not acknowledged");
        }
    }
}

/// Clears `writer_running` when the thread ends, however it ends (a panic included).
struct RunningFlag(Arc<Shared>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        self.0.writer_running.store(false, Ordering::Release);
    }
}

/// One caller's changes and where its answer goes.
struct Pending {
    changes: Vec<Change>,
    reply: Option<Reply<Vec<Admission>>>,
    urgency: Urgency,
}

/// Each caller's outcome in a batch: its admissions, or why its changes were refused.
type Outcomes = Vec<Result<Vec<Admission>, StoreError>>;

/// What a committed transaction of commit requests did.
struct Applied {
    /// Each caller's outcome, in the batch's order.
    outcomes: Outcomes,
    /// Changes that matched no row (no-ops).
    skipped: u64,
    /// The jobs it inserted or moved, for the counts.
    transitions: Vec<Transition>,
    /// Whether its urgent callers' inserts were written to the start journal,
    /// so that a sync of the journal makes them durable.
    journaled: bool,
}

/// The rows a transaction's urgent callers inserted, encoded for the start
/// journal while they are applied (`store/journal.rs`).
#[derive(Default)]
struct JournalRows {
    /// The caller being applied waits for durability (`Urgency::Now`): its rows go in.
    recording: bool,
    /// Some urgent caller changed something besides inserting jobs: the
    /// transaction is answered after a WAL sync, not through the journal.
    blocked: bool,
    /// The encoded rows (the payload without its leading count).
    rows: Vec<u8>,
    count: u32,
}

impl JournalRows {
    fn job(&mut self, values: &[ValueRef<'_>]) {
        if self.recording {
            journal::encode_row(&mut self.rows, RowTable::Jobs, values);
            self.count += 1;
        }
    }

    fn idempotency_key(&mut self, values: &[ValueRef<'_>]) {
        if self.recording {
            journal::encode_row(&mut self.rows, RowTable::IdempotencyKeys, values);
            self.count += 1;
        }
    }

    /// A change of an urgent caller that the journal does not carry.
    fn other(&mut self) {
        if self.recording {
            self.blocked = true;
        }
    }

    fn payload_len(&self) -> usize {
        4 + self.rows.len()
    }

    /// The record's payload: the row count, then the rows.
    fn payload(&self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(4 + self.rows.len());
        payload.extend_from_slice(&self.count.to_le_bytes());
        payload.extend_from_slice(&self.rows);
        payload
    }
}

/// What applying one transaction's changes learnt so far.
#[derive(Default)]
struct Applying {
    /// The admissions of the current caller's guarded inserts, in order.
    admissions: Vec<Admission>,
    /// Jobs not inserted because another stood for them (new id → that job's
    /// id), so a later change of the transaction naming the new id names that job.
    stood_for: HashMap<String, String>,
    /// The jobs the transaction inserted or changed the status of, for the counts.
    transitions: Vec<Transition>,
    /// Its urgent callers' inserts, for the start journal.
    journal: JournalRows,
    /// Dispatches not applied yet, by job id: where each is in the batch
    /// (request, change). See [`Writer::apply_plainly`].
    deferred: HashMap<String, (usize, usize)>,
}

impl Applying {
    /// A job was inserted.
    fn entered(&mut self, job: &JobRecord) {
        self.transitions.push(entered(job));
    }

    /// A statement that `updated` (matched its row, or not) moved the job
    /// named `job_name` from `from` to `to`; true if it did.
    fn moved_if(&mut self, updated: bool, job_name: &str, from: Option<Status>, to: Option<Status>) -> bool {
        if updated {
            self.transitions.push(Transition { job_name: job_name.to_owned(), from, to });
        }
        updated
    }

    /// A statement that `changed` the job that was `before` (name and status) now has it at `to`.
    fn changed(&mut self, changed: bool, before: Option<(String, Status)>, to: Status) -> bool {
        if let (true, Some((job_name, from))) = (changed, before) {
            self.transitions.push(Transition { job_name, from: Some(from), to: Some(to) });
        }
        changed
    }
}

/// Where a batch's further requests come from, and how long it waits for them.
struct Gather<'a> {
    requests: &'a Receiver<Request>,
    /// A request taken from the queue that is not part of the batch: it opens the next one.
    carried: &'a mut Option<Request>,
    /// Some request of the batch is `Urgency::Now`: take only what is queued, wait for nothing.
    urgent: bool,
    /// Until when a batch of `Urgency::Soon` requests waits for more.
    deadline: Instant,
    /// An urgent batch waits for the syncer to be free before it commits; not
    /// once a change failed (then only what is queued is taken in).
    wait_for_sync: bool,
}

impl Gather<'_> {
    /// Puts `pending` back, for the writer to take first once this batch is done.
    fn carry(&mut self, pending: Pending) {
        let Pending { changes, reply, urgency } = pending;
        *self.carried = Some(Request::Commit { changes, reply, urgency });
    }

    /// The next commit request for a batch that holds `total` changes so far,
    /// if one is queued (or, for a batch that is not urgent, comes before its
    /// deadline) and fits; `None` ends the batch.
    fn next(&mut self, writer: &Writer, total: usize) -> Option<Pending> {
        if self.carried.is_some() || total >= writer.batch_changes_max {
            return None;
        }
        let next = loop {
            match self.requests.try_recv() {
                Ok(next) => break next,
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if self.urgent {
                if !self.wait_for_sync || !writer.shared.syncing.load(Ordering::Acquire) {
                    return None;
                }
                // The disk is busy syncing the last commit, so this one could not
                // be synced before that ends anyway: keep taking requests in until
                // it does (the syncer unparks the writer), then commit them all.
                // Requests that come meanwhile join a transaction already applied.
                std::thread::park_timeout(SYNC_WAIT_RECHECK);
                continue;
            }
            if now >= self.deadline {
                return None;
            }
            // Parked rather than blocked on the queue: a `Soon` request arriving
            // meanwhile does not wake the writer (each wake-up is a context
            // switch, which costs more than the request), anything else does
            // (`SqliteStore::send` unparks). A spurious wake-up only looks again.
            std::thread::park_timeout(self.deadline - now);
        };
        writer.shared.queued.fetch_sub(1, Ordering::Relaxed);
        match next {
            Request::Commit { changes, reply, urgency } if total + changes.len() <= writer.batch_changes_max => {
                // An urgent request takes the batch with it now, with what else is queued.
                self.urgent |= urgency == Urgency::Now;
                Some(Pending { changes, reply, urgency })
            }
            other => {
                *self.carried = Some(other);
                None
            }
        }
    }
}

/// How often an urgent batch held for a busy syncer looks again, should a wake-up be missed.
const SYNC_WAIT_RECHECK: Duration = Duration::from_millis(10);

/// Why a change could not be applied.
enum Failure {
    /// The change broke a rule of the schema: roll back this caller's changes only.
    Rejected(StoreError),
    /// The storage failed: roll back the whole transaction.
    Storage(StoreError),
}

pub(super) struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    batch_changes_max: usize,
    /// How long a batch of `Urgency::Soon` requests waits for company.
    group_commit_delay: Duration,
    /// Releases committed answers once the WAL is synced; taken when the writer ends.
    syncer: Option<Syncer>,
    /// Copies the WAL into the database file beside the writer; stopped when the writer ends.
    checkpointer: Option<Checkpointer>,
    /// Where urgent inserts go for a short sync; `None` when turned off.
    journal: Option<Journal>,
    /// Whether urgent batches of plain starts are answered through the journal
    /// alone, their rows put into SQLite afterwards (see [`Writer::defer_batch`]).
    defer_starts: bool,
    /// Those rows, in the order they were started, until a transaction inserts them.
    deferred: Vec<DeferredRow>,
    /// The journal number of the last record holding deferred rows.
    deferred_seq: u64,
    /// When the oldest deferred row was deferred.
    deferred_since: Option<Instant>,
}

/// A start answered through the journal whose row is not in SQLite yet.
struct DeferredRow {
    job: JobRecord,
    params_json: String,
}

/// What the writer thread is started with.
pub(super) struct WriterParts {
    pub(super) conn: Connection,
    pub(super) shared: Arc<Shared>,
    pub(super) batch_changes_max: usize,
    pub(super) group_commit_delay: Duration,
    pub(super) syncer: Syncer,
    pub(super) checkpointer: Checkpointer,
    pub(super) journal: Option<Journal>,
    pub(super) defer_starts: bool,
}

impl Writer {
    /// Starts the writer thread; it runs until the queue's senders are all
    /// dropped (after draining it) or a [`Request::Close`] arrives.
    pub(super) fn spawn(parts: WriterParts, requests: Receiver<Request>) -> std::io::Result<JoinHandle<()>> {
        let WriterParts {
            conn,
            shared,
            batch_changes_max,
            group_commit_delay,
            syncer,
            checkpointer,
            journal,
            defer_starts,
        } = parts;
        shared.writer_running.store(true, Ordering::Release);
        let flag = RunningFlag(shared.clone());
        let writer = Writer {
            conn,
            shared,
            batch_changes_max: batch_changes_max.max(1),
            group_commit_delay,
            syncer: Some(syncer),
            checkpointer: Some(checkpointer),
            defer_starts: defer_starts && journal.is_some(),
            journal,
            deferred: Vec::new(),
            deferred_seq: 0,
            deferred_since: None,
        };
        std::thread::Builder::new().name("jobz-store-writer".into()).spawn(move || {
            let _flag = flag;
            writer.run(requests);
        })
    }

    fn run(mut self, requests: Receiver<Request>) {
        // Set once, here; a second set cannot happen and would change nothing.
        let _ = self.shared.writer_thread.set(std::thread::current());
        // A request drained that did not fit the batch: it opens the next one.
        let mut carried: Option<Request> = None;
        // Set by a Close: from then on the writer only empties the queue (of
        // requests that raced the close) and stops when it is empty.
        let mut closing: Option<oneshot::Sender<()>> = None;
        loop {
            if self.flush_due() {
                // While closing, only the queue's leftovers are taken, in order.
                let meanwhile = closing.is_none().then_some((&requests, &mut carried));
                self.flush_alone(meanwhile);
            }
            let request = match carried.take() {
                Some(request) => request,
                None => {
                    let received = match (&closing, self.deferred_since) {
                        (None, None) => requests.recv().ok(),
                        // Deferred rows wait for the next request at most until they are due.
                        (None, Some(since)) => match requests.recv_timeout(FLUSH_DELAY.saturating_sub(since.elapsed()))
                        {
                            Ok(request) => Some(request),
                            Err(RecvTimeoutError::Timeout) => continue,
                            Err(RecvTimeoutError::Disconnected) => None,
                        },
                        (Some(_), _) => requests.try_recv().ok(),
                    };
                    // None: every handle is gone (or, closing, the queue is empty).
                    let Some(request) = received else { break };
                    self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                    request
                }
            };
            match request {
                Request::Commit { changes, reply, urgency } => {
                    // While closing, nothing waits for company.
                    let urgent = urgency == Urgency::Now || closing.is_some();
                    let mut gather = Gather {
                        requests: &requests,
                        carried: &mut carried,
                        urgent,
                        deadline: Instant::now() + self.group_commit_delay,
                        wait_for_sync: true,
                    };
                    let first = Pending { changes, reply, urgency };
                    if closing.is_none() && self.deferrable(&first) {
                        self.defer_batch(first, &mut gather);
                    } else {
                        self.commit_batch(vec![first], &mut gather);
                    }
                }
                Request::Prune { finished_before, limit, reply } => {
                    let result = self.prune(finished_before, limit);
                    // The caller may have given up waiting; the prune stands either way.
                    self.after_commit(result, move |result| drop(reply.send(result)));
                }
                Request::PruneKeys { created_before, limit, reply } => {
                    let result = self.prune_keys(created_before, limit);
                    // The caller may have given up waiting; the prune stands either way.
                    self.after_commit(result, move |result| drop(reply.send(result)));
                }
                Request::Pause { paused, resume } => {
                    // The caller may have given up waiting; we pause regardless
                    // until it drops its guard.
                    let _ = paused.send(());
                    // Err means the guard was dropped: resume.
                    let _ = resume.recv();
                }
                Request::Close { done } => match &closing {
                    None => closing = Some(done),
                    // `close` sends one Close per store, so this cannot happen; dropping
                    // the answer would end that closer's wait.
                    Some(_) => drop(done),
                },
            }
        }
        // What the journal holds is put into SQLite before the store closes; if
        // that fails, the journal puts it back at the next open.
        self.flush_alone(None);
        self.finish();
        // Every committed answer is released (synced) before the close is.
        if let Some(syncer) = self.syncer.take() {
            syncer.finish();
        }
        if let Some(checkpointer) = self.checkpointer.take() {
            checkpointer.finish();
        }
        if let Some(done) = closing {
            // The closer may have given up waiting; the store is closed regardless.
            let _ = done.send(());
        }
    }

    /// Last words before the thread ends.
    fn finish(&self) {
        // Lets SQLite refresh its query planner statistics, as its docs advise
        // before closing; a failure costs only planning quality.
        if let Err(e) = self.conn.execute_batch("PRAGMA optimize") {
            debug!(error = %e, "PRAGMA optimize failed");
        }
    }

    /// Applies `first` and the commit requests that follow it (see
    /// [`Writer::apply_batch_plainly`]) in one transaction, commits, and hands
    /// the answers to the syncer.
    fn commit_batch(&mut self, mut batch: Vec<Pending>, gather: &mut Gather<'_>) {
        match self.apply_batch(&mut batch, gather) {
            Ok(Applied { outcomes, skipped, transitions, journaled }) => {
                let total: usize = batch.iter().map(|p| p.changes.len()).sum();
                let applied: usize =
                    batch.iter().zip(&outcomes).filter(|(_, o)| o.is_ok()).map(|(p, _)| p.changes.len()).sum();
                let rejected = outcomes.iter().filter(|o| o.is_err()).count();
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.shared.changes.fetch_add(applied as u64, Ordering::Relaxed);
                self.shared.skipped.fetch_add(skipped, Ordering::Relaxed);
                self.shared.rejected.fetch_add(rejected as u64, Ordering::Relaxed);
                self.shared.largest_batch.fetch_max(total as u64, Ordering::Relaxed);
                self.shared.last_batch_failed.store(false, Ordering::Relaxed);
                self.flushed();
                self.shared.counts.apply(&transitions);
                // Urgent callers of a journaled transaction are durable once the
                // journal is synced; everybody else once the WAL is.
                let (through_journal, through_wal): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .zip(outcomes)
                    .partition(|(pending, _)| journaled && pending.urgency == Urgency::Now);
                for (durability, group) in [(Durability::Journal, through_journal), (Durability::Wal, through_wal)] {
                    if group.is_empty() {
                        continue;
                    }
                    let answers: Vec<_> =
                        group.into_iter().map(|(pending, outcome)| (pending.reply, outcome)).collect();
                    self.after_commit_through(durability, Ok(()), move |synced: Result<(), StoreError>| {
                        for (reply, outcome) in answers {
                            // A refused caller's error stands; the others are durable only if the sync was.
                            answer(reply, outcome.and_then(|admissions| synced.clone().map(|()| admissions)));
                        }
                    });
                }
            }
            Err(e) => {
                self.rollback();
                self.shared.failed_batches.fetch_add(1, Ordering::Relaxed);
                self.shared.last_batch_failed.store(true, Ordering::Relaxed);
                let total: usize = batch.iter().map(|p| p.changes.len()).sum();
                error!(error = %e, requests = batch.len(), changes = total, "store transaction failed; rolled back");
                for pending in batch {
                    answer(pending.reply, Err(e.clone()));
                }
            }
        }
    }

    /// Whether `pending` can be answered through the start journal alone,
    /// its rows put into SQLite later: an urgent caller waiting for plain
    /// inserts of new queued jobs, while the store is healthy. Anything else
    /// (a guarded insert, a gate's job, a row the schema might refuse) takes
    /// a transaction, which decides and refuses as it always has.
    fn deferrable(&self, pending: &Pending) -> bool {
        self.defer_starts
            && pending.urgency == Urgency::Now
            && pending.reply.is_some()
            && !pending.changes.is_empty()
            && !self.shared.last_batch_failed.load(Ordering::Relaxed)
            && !self.shared.last_sync_failed.load(Ordering::Relaxed)
            && pending.changes.iter().all(|change| matches!(change, Change::Insert(job) if fresh_start(job)))
    }

    /// Answers `first`, and the urgent plain starts queued behind it, through
    /// the start journal alone: their rows are appended to it and synced (by
    /// this thread) before they are answered, and no SQLite transaction runs
    /// on the way. The rows join `deferred` (and
    /// the readers' [`Unflushed`] set) and go into SQLite at the start of the
    /// writer's next transaction, or on their own when due ([`FLUSH_DELAY`]).
    ///
    /// Nothing is lost meanwhile: the journal's number for them is stored in
    /// SQLite only by the transaction that inserts them, so after a crash
    /// [`Journal::open`] puts back every row that did not make it.
    ///
    /// Falls back to a transaction for the whole batch when an id is already
    /// taken, a row cannot be encoded or the journal has no room.
    fn defer_batch(&mut self, first: Pending, gather: &mut Gather<'_>) {
        let batch = self.gather_deferrable(first, gather);
        if let Some(batch) = self.journal_batch(batch) {
            // The transaction path takes the batch as it is, and what is queued behind it.
            gather.urgent = true;
            self.commit_batch(batch, gather);
        }
    }

    /// `first` and the deferrable requests queued behind it, up to the batch
    /// size; a request that is not deferrable is left in `gather.carried`.
    fn gather_deferrable(&self, first: Pending, gather: &mut Gather<'_>) -> Vec<Pending> {
        let mut batch = vec![first];
        let mut total = batch[0].changes.len();
        while let Some(next) = gather.next(self, total) {
            if !self.deferrable(&next) {
                // It opens the next batch, after this one is answered.
                gather.carry(next);
                break;
            }
            total += next.changes.len();
            batch.push(next);
        }
        batch
    }

    /// Answers `batch`'s plain starts through the start journal (see
    /// [`Writer::defer_batch`]). Returns the batch untouched when it must take
    /// a transaction instead: an id is already taken, a row cannot be encoded
    /// or the journal has no room.
    fn journal_batch(&mut self, batch: Vec<Pending>) -> Option<Vec<Pending>> {
        let total: usize = batch.iter().map(|pending| pending.changes.len()).sum();
        let mut rows = JournalRows { recording: true, ..JournalRows::default() };
        let mut deferred = Vec::with_capacity(total);
        let mut ids = std::collections::HashSet::with_capacity(total);
        let mut encodable = true;
        for change in batch.iter().flat_map(|pending| &pending.changes) {
            let Change::Insert(job) = change else {
                encodable = false;
                break;
            };
            let Ok(params_json) = params_to_sql(&job.params) else {
                encodable = false;
                break;
            };
            if !ids.insert(job.id.as_str()) || self.shared.unflushed.contains(&job.id) || self.stored(&job.id) {
                // A transaction refuses the taken id for its caller alone.
                encodable = false;
                break;
            }
            rows.job(&job_values(job, &params_json));
            deferred.push(DeferredRow { job: job.clone(), params_json });
        }
        let covered = self.shared.journal_covered.load(Ordering::Acquire);
        let seq = match self.journal.as_mut() {
            Some(journal) if encodable => {
                if journal.ready(covered) && journal.fits(rows.payload_len()) {
                    let seq = journal.next_seq();
                    match journal.append(&rows.payload()) {
                        Ok(()) => Some(seq),
                        Err(e) => {
                            warn!(error = %e, "cannot write the start journal; starts wait for a WAL sync until it starts over");
                            None
                        }
                    }
                } else {
                    None
                }
            }
            _ => None,
        };
        let Some(seq) = seq else { return Some(batch) };
        let transitions: Vec<Transition> = deferred.iter().map(|row| entered(&row.job)).collect();
        self.shared.counts.apply(&transitions);
        self.shared.unflushed.add(deferred.iter().map(|row| row.job.clone()));
        self.shared.changes.fetch_add(total as u64, Ordering::Relaxed);
        self.shared.largest_batch.fetch_max(total as u64, Ordering::Relaxed);
        self.deferred.extend(deferred);
        self.deferred_seq = seq;
        self.deferred_since.get_or_insert_with(Instant::now);
        let replies: Vec<_> = batch.into_iter().filter_map(|pending| pending.reply).collect();
        // The writer syncs the journal itself and answers: these callers wait
        // for nothing else, and handing the sync to the syncer thread would put
        // two thread wake-ups (there and back) on every start's round trip.
        // Meanwhile the next batch gathers in the queue, and the syncer may sync
        // the WAL for other commits at the same time.
        let synced = self
            .journal
            .as_ref()
            .map_or_else(|| Err(StoreError::Internal("deferred starts without a start journal".into())), Journal::sync);
        self.shared.journal_syncs.fetch_add(1, Ordering::Relaxed);
        self.shared.record_sync(&synced, "the start journal", replies.len());
        for reply in replies {
            answer(Some(reply), synced.clone().map(|()| Vec::new()));
        }
        None
    }

    /// Whether a job with this id has a row in SQLite.
    fn stored(&self, id: &str) -> bool {
        let found = self
            .conn
            .prepare_cached("SELECT 1 FROM jobs WHERE id = ?1")
            .and_then(|mut statement| statement.exists([id]));
        // When the store cannot even tell, the transaction path finds out properly.
        found.unwrap_or(true)
    }

    /// Inserts the deferred rows, first thing in the open transaction, and
    /// stores their journal number with them.
    fn flush_deferred(&self) -> Result<(), StoreError> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        self.insert_rows(&self.deferred)?;
        record_journal_seq(&self.conn, self.deferred_seq)
    }

    /// Inserts deferred rows into the open transaction.
    fn insert_rows(&self, rows: &[DeferredRow]) -> Result<(), StoreError> {
        let mut statement = self
            .conn
            .prepare_cached(INSERT_JOB)
            .map_err(StoreError::sqlite("prepare the insert of deferred starts"))?;
        for row in rows {
            let values = job_values(&row.job, &row.params_json);
            statement.execute(bound(&values)).map_err(StoreError::sqlite("insert a deferred start"))?;
        }
        Ok(())
    }

    /// The transaction that inserted the deferred rows committed: readers find them in SQLite now.
    fn flushed(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        self.rows_flushed(&self.deferred, self.deferred_seq);
        self.deferred.clear();
        self.deferred_since = None;
    }

    /// `rows`, up to journal number `seq`, are in SQLite now.
    fn rows_flushed(&self, rows: &[DeferredRow], seq: u64) {
        // A WAL sync from here on covers their journal records.
        self.shared.journal_committed.fetch_max(seq, Ordering::AcqRel);
        self.shared.unflushed.remove(rows.iter().map(|row| row.job.id.as_str()));
    }

    /// Whether the deferred rows should go into SQLite now rather than with the next transaction.
    fn flush_due(&self) -> bool {
        self.deferred.len() >= DEFERRED_ROWS_MAX
            || self.deferred_since.is_some_and(|since| since.elapsed() >= FLUSH_DELAY)
    }

    /// Inserts the deferred rows in a transaction of their own. Nobody waits
    /// for it: their callers were answered through the journal.
    ///
    /// With `meanwhile` (the queue, and the writer's carried request), plain
    /// starts queued during the flush are answered through the journal
    /// between chunks of [`FLUSH_CHUNK_ROWS`] rows, rather than after the
    /// whole flush: their rows join the next flush. The first request that
    /// is not one ends that: it waits in the carried slot, or, for starts
    /// that need a transaction after all, until this one has committed.
    ///
    /// On failure the rows stay deferred (and in the journal), the store
    /// reports itself unhealthy, and starts take the transaction path, which
    /// answers the error.
    fn flush_alone(&mut self, mut meanwhile: Option<(&Receiver<Request>, &mut Option<Request>)>) {
        if self.deferred.is_empty() {
            return;
        }
        let rows = std::mem::take(&mut self.deferred);
        let seq = self.deferred_seq;
        self.deferred_since = None;
        let mut after = None;
        let flushed = self
            .exec("BEGIN IMMEDIATE", "begin a transaction")
            .and_then(|()| self.insert_meanwhile(&rows, seq, &mut meanwhile, &mut after))
            .and_then(|()| self.exec("COMMIT", "commit"));
        match flushed {
            Ok(()) => {
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.shared.last_batch_failed.store(false, Ordering::Relaxed);
                self.rows_flushed(&rows, seq);
            }
            Err(e) => {
                self.rollback();
                self.shared.failed_batches.fetch_add(1, Ordering::Relaxed);
                self.shared.last_batch_failed.store(true, Ordering::Relaxed);
                error!(error = %e, rows = rows.len(), "putting journaled starts into the store failed; they stay in the journal");
                // In journal order: these first, then any deferred meanwhile.
                let mut rows = rows;
                rows.append(&mut self.deferred);
                self.deferred = rows;
                // Not again at once: the next transaction, or the next delay, tries again.
                self.deferred_since = Some(Instant::now());
            }
        }
        if let (Some(batch), Some((requests, carried))) = (after, meanwhile) {
            let mut gather = Gather { requests, carried, urgent: true, deadline: Instant::now(), wait_for_sync: true };
            self.commit_batch(batch, &mut gather);
        }
    }

    /// The body of [`Writer::flush_alone`]'s transaction: `rows` in chunks,
    /// the starts queued meanwhile answered between them, and the journal
    /// number `seq` the rows reach.
    fn insert_meanwhile(
        &mut self,
        rows: &[DeferredRow],
        seq: u64,
        meanwhile: &mut Option<(&Receiver<Request>, &mut Option<Request>)>,
        after: &mut Option<Vec<Pending>>,
    ) -> Result<(), StoreError> {
        for chunk in rows.chunks(FLUSH_CHUNK_ROWS) {
            self.insert_rows(chunk)?;
            if let Some((requests, carried)) = meanwhile.as_mut() {
                if after.is_none() && carried.is_none() {
                    *after = self.answer_queued_starts(requests, carried);
                }
            }
        }
        record_journal_seq(&self.conn, seq)
    }

    /// Answers the plain starts queued now through the journal, in the middle
    /// of a flush. Anything else is left in `carried`; starts that need a
    /// transaction after all are returned, to be committed after the flush.
    fn answer_queued_starts(
        &mut self,
        requests: &Receiver<Request>,
        carried: &mut Option<Request>,
    ) -> Option<Vec<Pending>> {
        // Only what is queued: the flush goes on as soon as these are answered.
        let mut gather = Gather { requests, carried, urgent: true, deadline: Instant::now(), wait_for_sync: false };
        let first = gather.next(self, 0)?;
        if !self.deferrable(&first) {
            gather.carry(first);
            return None;
        }
        let batch = self.gather_deferrable(first, &mut gather);
        let starts = batch.iter().map(|pending| pending.changes.len() as u64).sum();
        let refused = self.journal_batch(batch);
        if refused.is_none() {
            self.shared.starts_during_flushes.fetch_add(starts, Ordering::Relaxed);
        }
        refused
    }

    /// Answers a transaction's callers: once the WAL is synced when it
    /// committed (`result` is `Ok`), at once when it did not.
    fn after_commit<T: Send + 'static>(
        &self,
        result: Result<T, StoreError>,
        answer: impl FnOnce(Result<T, StoreError>) + Send + 'static,
    ) {
        self.after_commit_through(Durability::Wal, result, answer);
    }

    /// [`Writer::after_commit`], made durable by a sync of the file `durability` names.
    fn after_commit_through<T: Send + 'static>(
        &self,
        durability: Durability,
        result: Result<T, StoreError>,
        answer: impl FnOnce(Result<T, StoreError>) + Send + 'static,
    ) {
        match (result, &self.syncer) {
            (Ok(value), Some(syncer)) => syncer.after_commit(
                durability,
                Box::new(move |synced: Result<(), StoreError>| answer(synced.map(|()| value))),
            ),
            (result, _) => answer(result),
        }
    }

    /// Applies every caller's changes in one transaction and commits. Returns
    /// what it did ([`Applied`]), or the storage
    /// failure that aborted the transaction (the caller rolls back).
    ///
    /// The common case, where no change breaks a rule of the schema, applies
    /// the batch plainly, without a savepoint per caller. Only when some change
    /// is rejected is the whole transaction rolled back and the batch applied
    /// again with each caller in its own savepoint, so that the rejected
    /// callers alone fail.
    fn apply_batch(&mut self, batch: &mut Vec<Pending>, gather: &mut Gather<'_>) -> Result<Applied, StoreError> {
        if let Some(applied) = self.apply_batch_plainly(batch, gather)? {
            return Ok(applied);
        }
        self.rollback();
        self.apply_batch_carefully(batch)
    }

    /// Applies the batch in one transaction without savepoints, taking in the
    /// commit requests that arrive while it does (up to the batch limit), and
    /// commits once none is waiting; returns what it did ([`Applied`]). Applying each request as it comes, rather than draining
    /// the queue first and applying after, means a request that arrives while
    /// the writer is busy joins the transaction in flight instead of waiting
    /// for the next one. `Ok(None)` when a change was rejected: the
    /// transaction is then left open for the caller to roll back, and `batch`
    /// holds every request taken in.
    fn apply_batch_plainly(
        &mut self,
        batch: &mut Vec<Pending>,
        gather: &mut Gather<'_>,
    ) -> Result<Option<Applied>, StoreError> {
        self.exec("BEGIN IMMEDIATE", "begin a transaction")?;
        self.flush_deferred()?;
        let mut skipped = 0;
        let mut applying = Applying::default();
        let mut admissions = Vec::with_capacity(batch.len());
        let mut total = 0;
        let mut next = 0;
        loop {
            while let Some(pending) = batch.get(next) {
                next += 1;
                total += pending.changes.len();
                applying.journal.recording = pending.urgency == Urgency::Now;
                for (index, change) in pending.changes.iter().enumerate() {
                    let failure = match self.apply_plainly(change, (next - 1, index), batch, &mut applying) {
                        Ok(no_ops) => {
                            skipped += no_ops;
                            continue;
                        }
                        Err(failure) => failure,
                    };
                    // What is queued already belongs to this transaction, as if the
                    // queue had been drained first: the redo caller by caller takes it
                    // in, and a storage failure fails it too.
                    gather.urgent = true;
                    gather.wait_for_sync = false;
                    while let Some(pending) = gather.next(self, total) {
                        total += pending.changes.len();
                        batch.push(pending);
                    }
                    return match failure {
                        Failure::Rejected(e) => {
                            debug!(error = %e, "store refused a change; the batch is redone caller by caller");
                            Ok(None)
                        }
                        Failure::Storage(e) => Err(e),
                    };
                }
                admissions.push(Ok(std::mem::take(&mut applying.admissions)));
            }
            match gather.next(self, total) {
                Some(pending) => batch.push(pending),
                None => break,
            }
        }
        match self.apply_deferred(batch, &mut applying) {
            Ok(no_ops) => skipped += no_ops,
            Err(Failure::Rejected(e)) => {
                debug!(error = %e, "store refused a change; the batch is redone caller by caller");
                return Ok(None);
            }
            Err(Failure::Storage(e)) => return Err(e),
        }
        let journal_seq = self.journal_seq_for(&applying.journal)?;
        self.exec("COMMIT", "commit")?;
        let journaled = journal_seq.is_some_and(|seq| self.journal_append(seq, &applying.journal));
        Ok(Some(Applied { outcomes: admissions, skipped, transitions: applying.transitions, journaled }))
    }

    /// Applies the batch in one transaction with each caller's changes in
    /// their own savepoint, so a rejected caller rolls back alone, and commits.
    fn apply_batch_carefully(&mut self, batch: &[Pending]) -> Result<Applied, StoreError> {
        self.exec("BEGIN IMMEDIATE", "begin a transaction")?;
        self.flush_deferred()?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut skipped_total = 0;
        // A rolled-back caller's entries stay in `stood_for`: its new ids are
        // its own, so no other caller's change names them.
        let mut applying = Applying::default();
        for pending in batch {
            self.exec("SAVEPOINT request", "open a savepoint")?;
            let transitions_before = applying.transitions.len();
            let mut skipped = 0;
            let mut outcome = Ok(());
            for change in &pending.changes {
                match self.apply(change, &mut applying) {
                    Ok(true) => {}
                    Ok(false) => skipped += 1,
                    Err(Failure::Rejected(e)) => {
                        outcome = Err(e);
                        break;
                    }
                    Err(Failure::Storage(e)) => return Err(e),
                }
            }
            let admissions = std::mem::take(&mut applying.admissions);
            if let Err(e) = &outcome {
                warn!(error = %e, "store refused a commit; its changes were rolled back");
                self.exec("ROLLBACK TO request", "roll back to a savepoint")?;
                applying.transitions.truncate(transitions_before);
            } else {
                skipped_total += skipped;
            }
            self.exec("RELEASE request", "release a savepoint")?;
            outcomes.push(outcome.map(|()| admissions));
        }
        self.exec("COMMIT", "commit")?;
        // A redo is rare (a caller's bug); its callers wait for a WAL sync.
        Ok(Applied { outcomes, skipped: skipped_total, transitions: applying.transitions, journaled: false })
    }

    /// The start-journal number this transaction records, if it is to be
    /// answered through the journal: some urgent caller inserted rows, no
    /// urgent caller did anything else, and the journal has room. Stores the
    /// number in `journal_state` inside the transaction.
    fn journal_seq_for(&mut self, rows: &JournalRows) -> Result<Option<u64>, StoreError> {
        let Some(journal) = self.journal.as_mut() else { return Ok(None) };
        if rows.count == 0 || rows.blocked {
            return Ok(None);
        }
        if !journal.ready(self.shared.journal_covered.load(Ordering::Acquire)) || !journal.fits(rows.payload_len()) {
            return Ok(None);
        }
        let seq = journal.next_seq();
        record_journal_seq(&self.conn, seq)?;
        Ok(Some(seq))
    }

    /// Writes the committed transaction numbered `seq` to the start journal;
    /// false if it could not be (its callers then wait for a WAL sync).
    fn journal_append(&mut self, seq: u64, rows: &JournalRows) -> bool {
        // SQLite holds the transaction numbered `seq` now: a WAL sync from here on covers it.
        self.shared.journal_committed.fetch_max(seq, Ordering::AcqRel);
        let Some(journal) = self.journal.as_mut() else { return false };
        debug_assert_eq!(journal.next_seq(), seq, "one journal record per numbered transaction");
        match journal.append(&rows.payload()) {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "cannot write the start journal; starts wait for a WAL sync until it starts over");
                false
            }
        }
    }

    fn exec(&self, sql: &'static str, context: &'static str) -> Result<(), StoreError> {
        let mut statement = self.conn.prepare_cached(sql).map_err(StoreError::sqlite(context))?;
        statement.execute([]).map_err(StoreError::sqlite(context))?;
        Ok(())
    }

    fn rollback(&self) {
        // SQLite may already have rolled back by itself (it does on some I/O
        // errors); a second ROLLBACK would be an error.
        if self.conn.is_autocommit() {
            return;
        }
        if let Err(e) = self.conn.execute_batch("ROLLBACK") {
            error!(error = %e, "store rollback failed");
        }
    }

    /// Applies one change of the plain path (see [`Writer::apply_batch_plainly`]);
    /// returns how many changes turned out to be no-ops.
    ///
    /// A `Dispatch` is held back until the end of the transaction, or until
    /// another change names its job. When that change is the `Finish` of the
    /// same lease (a short job, ended before its dispatch was committed), the
    /// two are written as one: the job row goes from queued to its end in one
    /// update and its attempt row is inserted whole, two statements instead of
    /// four and one move in the status index instead of two. The rows and the
    /// counts come out as the two changes applied in turn would leave them.
    fn apply_plainly(
        &self,
        change: &Change,
        at: (usize, usize),
        batch: &[Pending],
        applying: &mut Applying,
    ) -> Result<u64, Failure> {
        let mut no_ops = 0;
        if let Change::Dispatch { id, .. } = change {
            if let Some(earlier) = applying.deferred.remove(id) {
                no_ops += self.apply_held_dispatch(&batch[earlier.0].changes[earlier.1], applying)?;
            }
            // What `apply` would say of this change to the start journal, said while its caller is the one applied.
            applying.journal.other();
            applying.deferred.insert(id.clone(), at);
            return Ok(no_ops);
        }
        let (_, id) = kind_and_id(change);
        if let Some(held) = applying.deferred.remove(id) {
            let dispatch = &batch[held.0].changes[held.1];
            match (dispatch, change) {
                (Change::Dispatch { lease, .. }, Change::Finish { lease: finished, .. }) if lease == finished => {
                    applying.journal.other();
                    let ran = self.apply_dispatch_and_finish(dispatch, change, applying)?;
                    return Ok(if ran { 0 } else { 2 });
                }
                _ => no_ops += self.apply_held_dispatch(dispatch, applying)?,
            }
        }
        Ok(no_ops + u64::from(!self.apply(change, applying)?))
    }

    /// Applies the dispatches still held back, in the order they came.
    fn apply_deferred(&self, batch: &[Pending], applying: &mut Applying) -> Result<u64, Failure> {
        let mut held: Vec<(usize, usize)> = applying.deferred.drain().map(|(_, at)| at).collect();
        held.sort_unstable();
        let mut no_ops = 0;
        for (request, index) in held {
            no_ops += self.apply_held_dispatch(&batch[request].changes[index], applying)?;
        }
        Ok(no_ops)
    }

    /// Applies a dispatch that was held back; 1 if it was a no-op.
    fn apply_held_dispatch(&self, dispatch: &Change, applying: &mut Applying) -> Result<u64, Failure> {
        // Its caller was told to the start journal when it was held back; `apply`
        // would tell it again, for whichever caller is being applied now.
        let recording = std::mem::replace(&mut applying.journal.recording, false);
        let applied = self.apply(dispatch, applying);
        applying.journal.recording = recording;
        Ok(u64::from(!applied?))
    }

    /// A `Dispatch` and the `Finish` of the same lease, as one update of the
    /// job and one insert of its attempt; true if the job was queued (else
    /// neither change would have matched it).
    fn apply_dispatch_and_finish(
        &self,
        dispatch: &Change,
        finish: &Change,
        applying: &mut Applying,
    ) -> Result<bool, Failure> {
        let (
            Change::Dispatch { id, job_name, attempt, worker, lease, at: started },
            Change::Finish { status, exit_code, signal, at: finished, output_tail, error, .. },
        ) = (dispatch, finish)
        else {
            return Err(Failure::Storage(StoreError::Internal(
                "a held dispatch met a change that is not its finish".into(),
            )));
        };
        let updated = self.execute(
            finish,
            "UPDATE jobs SET status = ?6, attempts = ?2, worker = ?3, lease = ?4, started_at = ?5,
                 not_before = NULL, progress_percent = NULL, progress_message = NULL,
                 finished_at = ?7, exit_code = ?8, signal = ?9, output_tail = ?10, error = ?11
             WHERE id = ?1 AND status = 'queued'",
            params![
                id,
                attempt,
                worker,
                lease_to_sql(*lease),
                time_to_sql(*started),
                status.as_str(),
                time_to_sql(*finished),
                exit_code,
                signal,
                output_tail,
                error
            ],
        )?;
        if !applying.moved_if(updated, job_name, Some(Status::Queued), Some(*status)) {
            self.log_skip(dispatch);
            return Ok(false);
        }
        self.execute(
            finish,
            "INSERT INTO attempts (job_id, lease, attempt, worker, started_at, status, finished_at, exit_code)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                id,
                lease_to_sql(*lease),
                attempt,
                worker,
                time_to_sql(*started),
                status.as_str(),
                time_to_sql(*finished),
                exit_code
            ],
        )?;
        Ok(true)
    }

    /// Applies one change. `Ok(false)` when it matched no row in the state it
    /// expects: a no-op, logged. A guarded insert is never a no-op: its
    /// admission, whatever it is, goes to `applying`.
    fn apply(&self, change: &Change, applying: &mut Applying) -> Result<bool, Failure> {
        if !matches!(change, Change::Insert(_) | Change::InsertUnlessHeld(_)) {
            applying.journal.other();
        }
        let changed = match change {
            Change::Insert(job) => {
                self.insert(job, &mut applying.journal)?;
                applying.entered(job);
                true
            }
            Change::InsertUnlessHeld(guarded) => {
                let admission = self.insert_unless_held(guarded, &mut applying.journal)?;
                match &admission {
                    Admission::Existing(existing) => {
                        applying.stood_for.insert(guarded.job.id.clone(), existing.id.clone());
                    }
                    Admission::Inserted => applying.entered(&guarded.job),
                    Admission::KeyReused { .. } => {}
                }
                applying.admissions.push(admission);
                true
            }
            Change::GateEvent(event) => {
                let params_json = params_to_sql(&event.params).map_err(|e| {
                    Failure::Rejected(StoreError::Rejected {
                        context: describe(change),
                        reason: e.to_string(),
                        code: None,
                    })
                })?;
                self.execute(
                    change,
                    "INSERT INTO gate_events (seq, kind, job_id, job_name, params, run_id, attempt, at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        lease_to_sql(event.seq),
                        gate_event_kind_to_sql(event.kind),
                        event.job_id,
                        event.job_name,
                        params_json,
                        event.run_id,
                        event.attempt,
                        time_to_sql(event.at)
                    ],
                )?
            }
            Change::Fire(fire) => {
                // A gate's job that another job stood for (its unique key) is recorded as that job.
                let job_id = fire.job_id.as_ref().map(|id| applying.stood_for.get(id).unwrap_or(id));
                self.execute(
                    change,
                    "INSERT OR IGNORE INTO gate_fires (gate, key, reason, job_id, error, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![fire.gate, fire.key, gate_reason_to_sql(fire.reason), job_id, fire.error, time_to_sql(fire.at)],
                )?
            }
            Change::ScheduleSeen(schedule) => {
                // A schedule seen before keeps its first sighting: ignoring the insert is the point.
                self.execute(
                    change,
                    "INSERT OR IGNORE INTO schedules (id, first_seen) VALUES (?1, ?2)",
                    params![schedule.id, time_to_sql(schedule.first_seen)],
                )?;
                true
            }
            // A plain INSERT: a second fire of the same (schedule, instant) breaks the primary key
            // and is refused with its whole commit, the job inserted beside it included.
            // A scheduled job that another job stood for (its unique key) is recorded as that job.
            Change::ScheduleFire(fire) => {
                let job_id = fire.job_id.as_ref().map(|id| applying.stood_for.get(id).unwrap_or(id));
                self.execute(
                    change,
                    "INSERT INTO schedule_fires (schedule, instant, job_id, error, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![fire.schedule, time_to_sql(fire.instant), job_id, fire.error, time_to_sql(fire.at)],
                )?
            }
            Change::Dispatch { id, job_name, attempt, worker, lease, at } => {
                let updated = self.execute(
                    change,
                    "UPDATE jobs SET status = 'running', attempts = ?2, worker = ?3, lease = ?4, started_at = ?5,
                         not_before = NULL, progress_percent = NULL, progress_message = NULL
                     WHERE id = ?1 AND status = 'queued'",
                    params![id, attempt, worker, lease_to_sql(*lease), time_to_sql(*at)],
                )?;
                let changed = applying.moved_if(updated, job_name, Some(Status::Queued), Some(Status::Running));
                if changed {
                    self.execute(
                        change,
                        "INSERT INTO attempts (job_id, lease, attempt, worker, started_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![id, lease_to_sql(*lease), attempt, worker, time_to_sql(*at)],
                    )?;
                }
                changed
            }
            Change::AttemptStart { id, attempt, worker, lease, at } => self.execute(
                change,
                "INSERT INTO attempts (job_id, lease, attempt, worker, started_at)
                 SELECT ?1, ?2, ?3, ?4, ?5 FROM jobs WHERE id = ?1 AND status = 'running'",
                params![id, lease_to_sql(*lease), attempt, worker, time_to_sql(*at)],
            )?,
            Change::AttemptEnd { id, lease, status, exit_code, at } => self.execute(
                change,
                "UPDATE attempts SET status = ?3, finished_at = ?4, exit_code = ?5
                 WHERE job_id = ?1 AND lease = ?2 AND finished_at IS NULL",
                params![id, lease_to_sql(*lease), status.as_str(), time_to_sql(*at), exit_code],
            )?,
            Change::Finish { id, job_name, lease, status, exit_code, signal, at, output_tail, error } => {
                // Conditional on the lease and on `running`: a result for an
                // attempt that was superseded, cancelled or already finished
                // changes nothing.
                let updated = self.execute(
                    change,
                    "UPDATE jobs SET status = ?3, finished_at = ?4, exit_code = ?5, signal = ?6, output_tail = ?7,
                         error = ?8
                     WHERE id = ?1 AND lease = ?2 AND status = 'running'",
                    params![
                        id,
                        lease_to_sql(*lease),
                        status.as_str(),
                        time_to_sql(*at),
                        exit_code,
                        signal,
                        output_tail,
                        error
                    ],
                )?;
                let changed = applying.moved_if(updated, job_name, Some(Status::Running), Some(*status));
                if changed {
                    self.execute(
                        change,
                        // A broadcast's copies end on their own (AttemptEnd): only an open attempt row is closed here.
                        "UPDATE attempts SET status = ?3, finished_at = ?4, exit_code = ?5
                         WHERE job_id = ?1 AND lease = ?2 AND finished_at IS NULL",
                        params![id, lease_to_sql(*lease), status.as_str(), time_to_sql(*at), exit_code],
                    )?;
                }
                changed
            }
            Change::Requeue { id, job_name, at, not_before } => {
                // The attempt that held the lease ended without a result; close
                // it before the job lets go of the lease.
                self.close_running_attempt(change, id, *at)?;
                let updated = self.execute(
                    change,
                    "UPDATE jobs SET status = 'queued', lease = NULL, queued_at = ?2, not_before = ?3,
                         progress_percent = NULL, progress_message = NULL
                     WHERE id = ?1 AND status = 'running'",
                    params![id, time_to_sql(*at), opt_time_to_sql(*not_before)],
                )?;
                applying.moved_if(updated, job_name, Some(Status::Running), Some(Status::Queued))
            }
            Change::Fail { id, at, error } => {
                let before = self.name_and_status(change, id)?;
                self.close_running_attempt(change, id, *at)?;
                let changed = self.execute(
                    change,
                    "UPDATE jobs SET status = 'failed', finished_at = ?2, error = ?3
                     WHERE id = ?1 AND status IN ('queued', 'running')",
                    params![id, time_to_sql(*at), error],
                )?;
                applying.changed(changed, before, Status::Failed)
            }
            Change::Cancel { id, at } => {
                let before = self.name_and_status(change, id)?;
                self.execute(
                    change,
                    "UPDATE attempts SET finished_at = ?2, status = 'cancelled'
                     WHERE job_id = ?1 AND finished_at IS NULL
                       AND lease = (SELECT lease FROM jobs WHERE id = ?1 AND status = 'running')",
                    params![id, time_to_sql(*at)],
                )?;
                let changed = self.execute(
                    change,
                    "UPDATE jobs SET status = 'cancelled', cancelled_at = ?2, finished_at = ?2
                     WHERE id = ?1 AND status IN ('queued', 'running')",
                    params![id, time_to_sql(*at)],
                )?;
                applying.changed(changed, before, Status::Cancelled)
            }
            Change::Retry { id, at, not_before } => {
                let before = self.name_and_status(change, id)?;
                let changed = self.execute(
                    change,
                    "UPDATE jobs SET status = 'queued', queued_at = ?2, not_before = ?3, finished_at = NULL,
                     cancelled_at = NULL, exit_code = NULL, signal = NULL, output_tail = '', error = NULL,
                     lease = NULL, progress_percent = NULL, progress_message = NULL
                 WHERE id = ?1 AND status IN ('succeeded', 'failed', 'timed_out', 'cancelled')",
                    params![id, time_to_sql(*at), opt_time_to_sql(*not_before)],
                )?;
                applying.changed(changed, before, Status::Queued)
            }
            Change::Progress { id, progress } => {
                check_percent(change, progress.percent)?;
                self.execute(
                    change,
                    "UPDATE jobs SET progress_percent = ?2, progress_message = ?3 WHERE id = ?1 AND status = 'running'",
                    params![id, progress.percent, progress.message],
                )?
            }
            Change::Stale { id, lease, worker, status, exit_code, at } => self.execute(
                change,
                "UPDATE attempts SET stale = 1, status = ?4, exit_code = ?5, finished_at = ?6
                 WHERE job_id = ?1 AND lease = ?2 AND worker = ?3",
                params![id, lease_to_sql(*lease), worker, status.as_str(), exit_code, time_to_sql(*at)],
            )?,
        };
        if !changed {
            self.log_skip(change);
        }
        Ok(changed)
    }

    /// Closes the attempt that holds a running job's lease, without a result
    /// (its worker is gone, or the job fails without one), before the job lets go of the lease.
    fn close_running_attempt(&self, change: &Change, id: &str, at: DateTime<Utc>) -> Result<bool, Failure> {
        self.execute(
            change,
            "UPDATE attempts SET finished_at = ?2
             WHERE job_id = ?1 AND finished_at IS NULL
               AND lease = (SELECT lease FROM jobs WHERE id = ?1 AND status = 'running')",
            params![id, time_to_sql(at)],
        )
    }

    fn insert(&self, job: &JobRecord, journal: &mut JournalRows) -> Result<(), Failure> {
        let change = || Change::Insert(job.clone());
        let params_json = params_to_sql(&job.params).map_err(|e| {
            Failure::Rejected(StoreError::Rejected { context: describe(&change()), reason: e.to_string(), code: None })
        })?;
        if let Some(progress) = &job.progress {
            check_percent(&change(), progress.percent)?;
        }
        let values = job_values(job, &params_json);
        let mut statement = self.conn.prepare_cached(INSERT_JOB).map_err(|e| classify(&change(), e))?;
        statement.execute(bound(&values)).map_err(|e| classify(&change(), e))?;
        journal.job(&values);
        Ok(())
    }

    /// Inserts `guarded.job` unless a job already stands for it, all inside the
    /// writer's transaction, so no other start can come in between:
    ///
    /// 1. An idempotency key recorded since `since` answers with its job when
    ///    the start is the same (job name and params), and refuses it when not.
    ///    A recorded job that is gone (pruned) leaves the key free.
    /// 2. A job of the same name with the same unique key that is queued or
    ///    running, or succeeded at or after `succeeded_since`, is the holder.
    /// 3. Otherwise the job is inserted.
    ///
    /// The idempotency key then names the job that stands for this start.
    fn insert_unless_held(&self, guarded: &GuardedInsert, journal: &mut JournalRows) -> Result<Admission, Failure> {
        let job = &guarded.job;
        let change = || Change::InsertUnlessHeld(Box::new(guarded.clone()));
        let rejected = |reason: String| {
            Failure::Rejected(StoreError::Rejected { context: describe(&change()), reason, code: None })
        };
        let params_json = params_to_sql(&job.params).map_err(|e| rejected(e.to_string()))?;
        if let Some(claim) = &guarded.idempotency {
            let first = self
                .conn
                .prepare_cached(
                    "SELECT job_id, job_name, params FROM idempotency_keys WHERE key = ?1 AND created_at >= ?2",
                )
                .and_then(|mut statement| {
                    statement
                        .query_row(params![claim.key, time_to_sql(claim.since)], |row| {
                            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?))
                        })
                        .optional()
                })
                .map_err(|e| classify(&change(), e))?;
            if let Some((job_id, job_name, params)) = first {
                if job_name != job.job_name || params != params_json {
                    let params = serde_json::from_str(&params).map_err(|e| {
                        rejected(format!("the params recorded for the idempotency key are unreadable: {e}"))
                    })?;
                    return Ok(Admission::KeyReused { job_id, job_name, params });
                }
                let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
                if let Some(existing) = self.read_job(&sql, params![job_id], &change)? {
                    return Ok(Admission::Existing(Box::new(existing)));
                }
            }
        }
        let holder = match &job.unique_key {
            None => None,
            Some(key) => {
                // INDEXED BY: SQLite refuses the statement rather than fall back to a scan.
                let sql = format!(
                    "SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_unique
                     WHERE job_name = ?1 AND unique_key = ?2
                       AND (status = 'queued' OR status = 'running' OR (status = 'succeeded' AND finished_at >= ?3))
                     ORDER BY created_at DESC LIMIT 1"
                );
                self.read_job(&sql, params![job.job_name, key, time_to_sql(guarded.succeeded_since)], &change)?
            }
        };
        let admission = match holder {
            Some(holder) => Admission::Existing(Box::new(holder)),
            None => {
                self.insert(job, journal)?;
                Admission::Inserted
            }
        };
        if let Some(claim) = &guarded.idempotency {
            let stands = match &admission {
                Admission::Existing(existing) => &existing.id,
                _ => &job.id,
            };
            let values: [ValueRef<'_>; KEY_VALUES] = [
                ValueRef::Text(claim.key.as_bytes()),
                ValueRef::Text(stands.as_bytes()),
                ValueRef::Text(job.job_name.as_bytes()),
                ValueRef::Text(params_json.as_bytes()),
                ValueRef::Integer(time_to_sql(job.created_at)),
            ];
            self.conn
                .prepare_cached(INSERT_IDEMPOTENCY_KEY)
                .and_then(|mut statement| statement.execute(bound(&values)))
                .map_err(|e| classify(&change(), e))?;
            journal.idempotency_key(&values);
        }
        Ok(admission)
    }

    /// The first job `sql` (selecting [`JOB_COLUMNS`]) finds, read inside the transaction.
    fn read_job(
        &self,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
        change: &dyn Fn() -> Change,
    ) -> Result<Option<JobRecord>, Failure> {
        let mut statement = self.conn.prepare_cached(sql).map_err(|e| classify(&change(), e))?;
        let mut rows = statement.query(params).map_err(|e| classify(&change(), e))?;
        match rows.next().map_err(|e| classify(&change(), e))? {
            // A row that cannot be read back fails this caller alone.
            Some(row) => job_from_row(row).map(Some).map_err(Failure::Rejected),
            None => Ok(None),
        }
    }

    /// The name and status of job `id` before a change whose earlier status
    /// may be one of several (fail, cancel, retry: none of them frequent).
    fn name_and_status(&self, change: &Change, id: &str) -> Result<Option<(String, Status)>, Failure> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT job_name, status FROM jobs WHERE id = ?1")
            .map_err(|e| classify(change, e))?;
        let found = statement
            .query_row([id], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))
            .optional()
            .map_err(|e| classify(change, e))?;
        Ok(found.and_then(|(name, status)| Some((name, status.parse().ok()?))))
    }

    /// Runs one cached statement for `change`; true when it changed a row.
    fn execute(&self, change: &Change, sql: &'static str, params: &[&dyn rusqlite::ToSql]) -> Result<bool, Failure> {
        let mut statement = self.conn.prepare_cached(sql).map_err(|e| classify(change, e))?;
        let rows = statement.execute(params).map_err(|e| classify(change, e))?;
        // Every statement addresses one job (or one attempt) by its key.
        debug_assert!(rows <= 1, "{} changed {rows} rows", describe(change));
        Ok(rows > 0)
    }

    /// Says why a change was a no-op. A result or dispatch that does not match
    /// the stored job is a warning: the broker should have filtered it, and the
    /// store is the last line. The rest (unknown or pruned ids, a cancel racing
    /// a finish) is ordinary and logged at debug.
    fn log_skip(&self, change: &Change) {
        let (kind, id) = kind_and_id(change);
        let state = self.conn.query_row("SELECT status, lease FROM jobs WHERE id = ?1", [id], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, Option<i64>>(1)?))
        });
        match state {
            Err(rusqlite::Error::QueryReturnedNoRows) => {
                debug!(job = id, change = kind, "store: change for an unknown (or pruned) job ignored");
            }
            Err(e) => debug!(job = id, change = kind, error = %e, "store: change ignored"),
            Ok((status, lease)) => {
                let lease = lease.map(super::codec::lease_from_sql);
                if matches!(change, Change::Finish { .. } | Change::Dispatch { .. } | Change::Stale { .. }) {
                    warn!(job = id, change = kind, %status, ?lease, ?change, "store: change does not match the stored job; ignored");
                } else {
                    debug!(job = id, change = kind, %status, ?lease, "store: change does not match the stored job; ignored");
                }
            }
        }
    }

    /// Deletes a bounded batch of jobs finished before `finished_before`, in a
    /// transaction of its own; their attempts go with them (ON DELETE CASCADE).
    fn prune(&mut self, finished_before: DateTime<Utc>, limit: usize) -> Result<Vec<String>, StoreError> {
        let limit = limit.min(PRUNE_BATCH_MAX);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let result = self.prune_in_transaction(finished_before, limit);
        match &result {
            Ok((ids, transitions)) => {
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.shared.last_batch_failed.store(false, Ordering::Relaxed);
                self.shared.counts.apply(transitions);
                debug!(jobs = ids.len(), "store: pruned finished jobs");
            }
            Err(e) => {
                self.rollback();
                self.shared.failed_batches.fetch_add(1, Ordering::Relaxed);
                self.shared.last_batch_failed.store(true, Ordering::Relaxed);
                error!(error = %e, "store prune failed; rolled back");
            }
        }
        result.map(|(ids, _)| ids)
    }

    /// The pruned jobs' ids, and their leaving the counts.
    fn prune_in_transaction(
        &mut self,
        finished_before: DateTime<Utc>,
        limit: usize,
    ) -> Result<(Vec<String>, Vec<Transition>), StoreError> {
        self.exec("BEGIN IMMEDIATE", "begin a prune")?;
        let (ids, transitions) = {
            let mut statement = self
                .conn
                .prepare_cached(
                    "DELETE FROM jobs WHERE seq IN (
                         SELECT seq FROM jobs WHERE finished_at < ?1 ORDER BY finished_at LIMIT ?2)
                     RETURNING id, job_name, status",
                )
                .map_err(StoreError::sqlite("prepare the prune"))?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = statement
                .query_map(params![time_to_sql(finished_before), limit], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?))
                })
                .map_err(StoreError::sqlite("prune"))?;
            let pruned = rows.collect::<Result<Vec<_>, _>>().map_err(StoreError::sqlite("prune"))?;
            let transitions = pruned
                .iter()
                .filter_map(|(_, job_name, status)| {
                    Some(Transition { job_name: job_name.clone(), from: Some(status.parse().ok()?), to: None })
                })
                .collect();
            (pruned.into_iter().map(|(id, _, _)| id).collect::<Vec<String>>(), transitions)
        };
        // Gate events and fires, and schedule fires, past the same retention go too, in the same bounded steps:
        // a key older than the retention is settled or given up long ago.
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let cutoff = time_to_sql(finished_before);
        self.conn
            .execute(
                // The newest event always stays: its `seq` is where numbering resumes after a restart.
                "DELETE FROM gate_events WHERE seq IN (
                     SELECT seq FROM gate_events WHERE at < ?1 AND seq < (SELECT MAX(seq) FROM gate_events)
                     ORDER BY seq LIMIT ?2)",
                params![cutoff, limit],
            )
            .map_err(StoreError::sqlite("prune gate events"))?;
        self.conn
            .execute(
                "DELETE FROM gate_fires WHERE (gate, key, reason) IN (
                     SELECT gate, key, reason FROM gate_fires WHERE at < ?1 LIMIT ?2)",
                params![cutoff, limit],
            )
            .map_err(StoreError::sqlite("prune gate fires"))?;
        // A schedule's latest fire always stays: it is where catching up starts after a restart.
        self.conn
            .execute(
                "DELETE FROM schedule_fires WHERE (schedule, instant) IN (
                     SELECT schedule, instant FROM schedule_fires AS f
                     WHERE at < ?1
                       AND instant < (SELECT MAX(instant) FROM schedule_fires AS g WHERE g.schedule = f.schedule)
                     LIMIT ?2)",
                params![cutoff, limit],
            )
            .map_err(StoreError::sqlite("prune schedule fires"))?;
        self.exec("COMMIT", "commit a prune")?;
        Ok((ids, transitions))
    }

    /// Forgets at most `limit` idempotency keys first given before
    /// `created_before`, oldest first, in a transaction of its own. Returns how
    /// many were forgotten. A key past its time is ignored by starts whether
    /// or not it was pruned yet; pruning only keeps the table small.
    fn prune_keys(&mut self, created_before: DateTime<Utc>, limit: usize) -> Result<usize, StoreError> {
        let limit = i64::try_from(limit.min(PRUNE_BATCH_MAX)).unwrap_or(i64::MAX);
        if limit == 0 {
            return Ok(0);
        }
        let result = self.exec("BEGIN IMMEDIATE", "begin a prune of idempotency keys").and_then(|()| {
            let deleted = self
                .conn
                .prepare_cached(
                    "DELETE FROM idempotency_keys WHERE key IN (
                         SELECT key FROM idempotency_keys WHERE created_at < ?1 ORDER BY created_at LIMIT ?2)",
                )
                .and_then(|mut statement| statement.execute(params![time_to_sql(created_before), limit]))
                .map_err(StoreError::sqlite("prune idempotency keys"))?;
            self.exec("COMMIT", "commit a prune of idempotency keys")?;
            Ok(deleted)
        });
        match &result {
            Ok(deleted) => {
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.shared.last_batch_failed.store(false, Ordering::Relaxed);
                debug!(keys = deleted, "store: pruned idempotency keys");
            }
            Err(e) => {
                self.rollback();
                self.shared.failed_batches.fetch_add(1, Ordering::Relaxed);
                self.shared.last_batch_failed.store(true, Ordering::Relaxed);
                error!(error = %e, "store prune of idempotency keys failed; rolled back");
            }
        }
        result
    }
}

fn answer(reply: Option<Reply<Vec<Admission>>>, outcome: Result<Vec<Admission>, StoreError>) {
    match reply {
        Some(reply) => {
            // The caller may have stopped waiting (its client went away); what
            // was committed stays committed.
            let _ = reply.send(outcome);
        }
        None => {
            if let Err(e) = outcome {
                error!(error = %e, "store: a commit_later batch was not stored");
            }
        }
    }
}

fn check_percent(change: &Change, percent: f64) -> Result<(), Failure> {
    if percent.is_finite() {
        return Ok(());
    }
    Err(Failure::Rejected(StoreError::Rejected {
        context: describe(change),
        reason: format!("progress percent {percent} is not a finite number"),
        code: None,
    }))
}

/// A change that broke a rule of the schema (or could not be bound) is the
/// caller's bug and fails that caller alone; anything else SQLite reports is a
/// storage failure that aborts the transaction.
fn classify(change: &Change, e: rusqlite::Error) -> Failure {
    let code = e.sqlite_error_code();
    let storage = matches!(&e, rusqlite::Error::SqliteFailure(..))
        && !matches!(code, Some(ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch));
    if storage {
        Failure::Storage(StoreError::Sqlite { context: describe(change), error: Arc::new(e) })
    } else {
        Failure::Rejected(StoreError::Rejected { context: describe(change), reason: e.to_string(), code })
    }
}

fn kind_and_id(change: &Change) -> (&'static str, &str) {
    match change {
        Change::Insert(job) => ("Insert", &job.id),
        Change::InsertUnlessHeld(guarded) => ("InsertUnlessHeld", &guarded.job.id),
        Change::GateEvent(event) => ("GateEvent", &event.job_id),
        Change::Fire(fire) => ("Fire", &fire.gate),
        Change::ScheduleSeen(schedule) => ("ScheduleSeen", &schedule.id),
        Change::ScheduleFire(fire) => ("ScheduleFire", &fire.schedule),
        Change::Dispatch { id, .. } => ("Dispatch", id),
        Change::Fail { id, .. } => ("Fail", id),
        Change::AttemptStart { id, .. } => ("AttemptStart", id),
        Change::AttemptEnd { id, .. } => ("AttemptEnd", id),
        Change::Finish { id, .. } => ("Finish", id),
        Change::Requeue { id, .. } => ("Requeue", id),
        Change::Cancel { id, .. } => ("Cancel", id),
        Change::Retry { id, .. } => ("Retry", id),
        Change::Progress { id, .. } => ("Progress", id),
        Change::Stale { id, .. } => ("Stale", id),
    }
}

fn describe(change: &Change) -> String {
    match change {
        Change::ScheduleSeen(schedule) => format!("ScheduleSeen of schedule {}", schedule.id),
        Change::ScheduleFire(fire) => {
            format!("ScheduleFire of schedule {} for {}", fire.schedule, fire.instant.to_rfc3339())
        }
        _ => {
            let (kind, id) = kind_and_id(change);
            format!("{kind} of job {id:?}")
        }
    }
}

/// The writer's insert of a job row; the start journal replays its rows with
/// the same statement, keeping a row that is there.
pub(super) const INSERT_JOB: &str = "INSERT INTO jobs (id, job_name, params, status, attempts, run_id, parent_id,
     origin_kind, origin_gate, origin_key, origin_reason, priority, worker, lease, exit_code, signal,
     created_at, queued_at, started_at, finished_at, cancelled_at, not_before, output_tail,
     progress_percent, progress_message, error, unique_key)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20,
     ?21, ?22, ?23, ?24, ?25, ?26, ?27)";

/// The writer's insert (or replacement) of an idempotency key's row; the
/// start journal replays its rows with the same statement.
pub(super) const INSERT_IDEMPOTENCY_KEY: &str =
    "INSERT OR REPLACE INTO idempotency_keys (key, job_id, job_name, params, created_at)
     VALUES (?1, ?2, ?3, ?4, ?5)";

/// Stores, inside the open transaction, the number of the last start-journal
/// record whose rows SQLite now holds (see `store/journal.rs`).
fn record_journal_seq(conn: &Connection, seq: u64) -> Result<(), StoreError> {
    let stored =
        i64::try_from(seq).map_err(|_| StoreError::Internal("the start journal's number overflowed".into()))?;
    conn.prepare_cached("UPDATE journal_state SET seq = ?1 WHERE id = 1")
        .and_then(|mut statement| statement.execute([stored]))
        .map_err(StoreError::sqlite("record the start journal's number"))?;
    Ok(())
}

/// The transition of `job` entering the store, for the counts.
fn entered(job: &JobRecord) -> Transition {
    Transition { job_name: job.job_name.clone(), from: None, to: Some(job.status) }
}

/// A plain start of a new job: queued, never run, with no unique key, not
/// a gate's job. Such a row satisfies every rule of the schema but the
/// uniqueness of its id, which [`Writer::defer_batch`] checks itself.
fn fresh_start(job: &JobRecord) -> bool {
    job.status == Status::Queued
        && job.attempts == 0
        && job.worker.is_none()
        && job.lease.is_none()
        && job.started_at.is_none()
        && job.finished_at.is_none()
        && job.cancelled_at.is_none()
        && job.progress.is_none()
        && job.unique_key.is_none()
        && !matches!(job.origin, jobz_core::pipeline::Origin::Gate { .. })
}

/// `values` as a statement's parameters, bound without copying.
fn bound<'a>(values: &'a [ValueRef<'a>]) -> impl rusqlite::Params + 'a {
    rusqlite::params_from_iter(values.iter().map(|v| ToSqlOutput::Borrowed(*v)))
}

/// A job's row as the values of [`INSERT_JOB`], in its column order.
fn job_values<'a>(job: &'a JobRecord, params_json: &'a str) -> [ValueRef<'a>; JOB_VALUES] {
    let text = |s: &'a str| ValueRef::Text(s.as_bytes());
    let opt_text = |s: Option<&'a str>| s.map_or(ValueRef::Null, text);
    let opt_int = |i: Option<i64>| i.map_or(ValueRef::Null, ValueRef::Integer);
    let (origin_kind, origin_gate, origin_key, origin_reason) = origin_to_sql(&job.origin);
    [
        text(&job.id),
        text(&job.job_name),
        text(params_json),
        text(job.status.as_str()),
        ValueRef::Integer(i64::from(job.attempts)),
        text(&job.run_id),
        opt_text(job.parent_id.as_deref()),
        text(origin_kind),
        opt_text(origin_gate),
        opt_text(origin_key),
        opt_text(origin_reason),
        ValueRef::Integer(i64::from(job.priority)),
        opt_text(job.worker.as_deref()),
        opt_int(job.lease.map(lease_to_sql)),
        opt_int(job.exit_code.map(i64::from)),
        opt_int(job.signal.map(i64::from)),
        ValueRef::Integer(time_to_sql(job.created_at)),
        opt_int(opt_time_to_sql(job.queued_at)),
        opt_int(opt_time_to_sql(job.started_at)),
        opt_int(opt_time_to_sql(job.finished_at)),
        opt_int(opt_time_to_sql(job.cancelled_at)),
        opt_int(opt_time_to_sql(job.not_before)),
        text(&job.output_tail),
        job.progress.as_ref().map_or(ValueRef::Null, |p| ValueRef::Real(p.percent)),
        opt_text(job.progress.as_ref().and_then(|p| p.message.as_deref())),
        opt_text(job.error.as_deref()),
        opt_text(job.unique_key.as_deref()),
    ]
}
