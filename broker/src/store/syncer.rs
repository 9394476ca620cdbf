//! The syncer thread: makes committed transactions durable with one
//! `fdatasync` of the WAL file for as many commits as have piled up, and only
//! then answers their callers.
//!
//! The writer commits with `synchronous=NORMAL`: SQLite writes a transaction's
//! WAL frames to the file and returns without waiting for the disk, and it
//! still syncs the WAL before every checkpoint and the database file after
//! it, so the file stays consistent across a power loss. What NORMAL leaves
//! out, the sync of the WAL at each commit, this thread does: after the
//! writer's `COMMIT` returned, the writer hands the commit's answers over and
//! goes on with the next transaction while this thread waits for the disk.
//! A sync covers every frame written before it began, so an answer released
//! after it is as durable as one under `synchronous=FULL`; and the writer's
//! CPU work on the next batch overlaps the disk's work on the last one. This
//! is group commit with a separate flusher, as in PostgreSQL's WAL writer.
//!
//! Starts can be made durable more cheaply: a transaction whose urgent
//! callers only inserted jobs also wrote them to the start journal
//! ([`super::journal`]), and its answers wait for a sync of that small file
//! instead ([`Durability::Journal`]). A sync of the WAL records how far it
//! covers the journal, so the journal can start over. (A batch of plain
//! starts that skips the transaction altogether is synced by the writer
//! itself, see `Writer::defer_batch`.)
//!
//! A failed sync answers the commits it covered with the error (HTTP 503):
//! their changes are in the database but may not be on the disk, so nothing
//! is acknowledged as durable that is not known to be.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use tracing::error;

use super::writer::Shared;
use super::StoreError;

/// One committed transaction's answers, released once the WAL is synced with
/// `Ok`, or with the sync's error. Boxed, so commits and prunes, whose answers
/// differ in type, share the one queue.
pub(super) type Answers = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Which file's sync makes a transaction's answers durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Durability {
    /// The start journal (its urgent callers' inserts were written there).
    Journal,
    /// The database's WAL.
    Wal,
}

/// The writer's end of the syncer's queue.
pub(super) struct Syncer {
    queue: SyncSender<(Durability, Answers)>,
    thread: JoinHandle<()>,
}

impl Syncer {
    /// Starts the thread that syncs `wal` (the database's `-wal` file) and
    /// `journal` (the start journal, if there is one).
    pub(super) fn spawn(
        wal: PathBuf,
        journal: Option<(Arc<File>, PathBuf)>,
        shared: Arc<Shared>,
        capacity: usize,
    ) -> std::io::Result<Syncer> {
        let (queue, pending) = std::sync::mpsc::sync_channel(capacity.max(1));
        let thread = std::thread::Builder::new()
            .name("jobz-store-sync".into())
            .spawn(move || SyncLoop { wal, file: None, journal, shared }.run(pending))?;
        Ok(Syncer { queue, thread })
    }

    /// Queues the answers of a transaction that has just committed, to be
    /// released after a sync of the file `durability` names. Blocks while the
    /// queue is full: the writer must not run further ahead of the disk.
    pub(super) fn after_commit(&self, durability: Durability, answers: Answers) {
        if let Err(e) = self.queue.send((durability, answers)) {
            // The thread is gone (it panicked): nothing can be made durable any more.
            error!("the store's sync thread is gone; failing the commit");
            (e.0 .1)(Err(StoreError::Internal("the store's sync thread stopped".into())));
        }
    }

    /// Syncs what is queued, answers it, and stops the thread.
    pub(super) fn finish(self) {
        drop(self.queue);
        if self.thread.join().is_err() {
            error!("the store's sync thread panicked");
        }
    }
}

struct SyncLoop {
    wal: PathBuf,
    /// Opened at the first sync: the WAL exists once anything was committed,
    /// and SQLite keeps the same file for as long as the writer's connection is open.
    file: Option<File>,
    /// The start journal and its path (for errors); opened by the store.
    journal: Option<(Arc<File>, PathBuf)>,
    shared: Arc<Shared>,
}

/// The most commits one sync answers; the rest wait for the next one.
const SYNC_BATCH_MAX: usize = 4096;

impl SyncLoop {
    fn run(mut self, pending: Receiver<(Durability, Answers)>) {
        // Ends when the writer drops its end, after the last answers were synced.
        while let Ok(first) = pending.recv() {
            let mut batch = vec![first];
            while batch.len() < SYNC_BATCH_MAX {
                match pending.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.shared.syncing.store(true, Ordering::Release);
            let (journal, wal): (Vec<_>, Vec<_>) = batch.into_iter().partition(|(d, _)| *d == Durability::Journal);
            if !journal.is_empty() {
                let synced = self.sync_journal();
                self.shared.journal_syncs.fetch_add(1, Ordering::Relaxed);
                self.answer(journal, synced, "the start journal");
            }
            if !wal.is_empty() {
                // Every journaled transaction committed by now is in the WAL this sync makes durable.
                let committed = self.shared.journal_committed.load(Ordering::Acquire);
                let synced = self.sync();
                self.shared.syncs.fetch_add(1, Ordering::Relaxed);
                if synced.is_ok() {
                    self.shared.journal_covered.fetch_max(committed, Ordering::AcqRel);
                }
                self.answer(wal, synced, "the store's WAL");
            }
            self.shared.syncing.store(false, Ordering::Release);
            // The writer may be holding an urgent commit for this sync to end.
            if let Some(writer) = self.shared.writer_thread.get() {
                writer.unpark();
            }
        }
    }

    /// Releases `batch`'s answers with the outcome of the sync that covered them.
    fn answer(&self, batch: Vec<(Durability, Answers)>, synced: Result<(), StoreError>, what: &str) {
        self.shared.record_sync(&synced, what, batch.len());
        for (_, answers) in batch {
            answers(synced.clone());
        }
    }

    fn sync_journal(&self) -> Result<(), StoreError> {
        match &self.journal {
            Some((file, path)) => super::journal::sync_file(file, path),
            // Nothing is answered through a journal the store does not have.
            None => Err(StoreError::Internal("a commit waits for a start journal the store does not have".into())),
        }
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        let synced = self.sync_wal();
        if synced.is_err() {
            // The file may be in a bad state: open it afresh next time.
            self.file = None;
        }
        synced
    }

    fn sync_wal(&mut self) -> Result<(), StoreError> {
        let io = |context| {
            let path = self.wal.clone();
            move |error| StoreError::Io { context, path, error: Arc::new(error) }
        };
        if self.file.is_none() {
            self.file = Some(OpenOptions::new().read(true).open(&self.wal).map_err(io("open the WAL to sync"))?);
        }
        match &self.file {
            Some(file) => file.sync_data().map_err(io("sync the WAL")),
            None => Ok(()),
        }
    }
}
