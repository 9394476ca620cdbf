//! The checkpointer thread: copies the WAL's committed pages into the
//! database file on a connection of its own, so that the writer never does.
//!
//! SQLite checkpoints on the committing connection by default, once the WAL
//! holds `wal_autocheckpoint` pages: that commit then copies up to that many
//! pages into the database file and syncs it, and every request queued behind
//! it waits, tens of milliseconds on a loaded disk. Here the writer's
//! automatic checkpoint is set far out, as a backstop only, and this thread
//! runs a PASSIVE checkpoint every [`CHECKPOINT_INTERVAL`] in which something
//! was committed. A PASSIVE checkpoint runs beside the writer (and readers):
//! it copies what no reader still needs and never blocks a commit; the writer
//! starts the WAL over once everything in it was copied.
//!
//! Durability does not depend on this thread: every commit is in the WAL,
//! synced by the syncer before it is answered; a checkpoint syncs the WAL
//! before it copies and the database file before it lets the WAL start over
//! (`synchronous=NORMAL` on this connection too).

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tracing::{debug, warn};

use super::writer::Shared;
use super::{StoreError, StoreOptions};

/// How often the checkpointer looks for new commits to copy.
pub(super) const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(50);

/// The writer's end: dropping it stops the thread after one last checkpoint.
pub(super) struct Checkpointer {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Checkpointer {
    /// Opens the thread's connection to `path` and starts it.
    pub(super) fn spawn(path: &Path, options: &StoreOptions, shared: Arc<Shared>) -> Result<Checkpointer, StoreError> {
        let conn = open(path, options)?;
        let (stop, stopped) = std::sync::mpsc::channel();
        let (path, thread_path) = (path.to_owned(), path.to_owned());
        let thread = std::thread::Builder::new()
            .name("jobz-store-ckpt".into())
            .spawn(move || run(&conn, &path, &shared, &stopped))
            .map_err(|error| StoreError::Io {
                context: "start the store checkpoint thread for",
                path: thread_path,
                error: Arc::new(error),
            })?;
        Ok(Checkpointer { stop, thread })
    }

    /// Stops the thread (after a last checkpoint) and waits for it.
    pub(super) fn finish(self) {
        drop(self.stop);
        if self.thread.join().is_err() {
            warn!("the store's checkpoint thread panicked");
        }
    }
}

fn open(path: &Path, options: &StoreOptions) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn =
        Connection::open_with_flags(path, flags).map_err(StoreError::sqlite("open the checkpoint connection"))?;
    conn.busy_timeout(options.busy_timeout).map_err(StoreError::sqlite("set busy_timeout"))?;
    // The checkpoint's syncs follow this connection's setting: NORMAL syncs
    // the WAL before copying and the database file before the WAL may restart.
    conn.pragma_update(None, "synchronous", 1).map_err(StoreError::sqlite("set synchronous=NORMAL"))?;
    Ok(conn)
}

fn run(conn: &Connection, path: &Path, shared: &Shared, stopped: &Receiver<()>) {
    let mut seen = shared.commits.load(Ordering::Relaxed);
    loop {
        let last = match stopped.recv_timeout(CHECKPOINT_INTERVAL) {
            Err(RecvTimeoutError::Timeout) => false,
            // The writer is gone: one last copy of what it committed.
            Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
        };
        let commits = shared.commits.load(Ordering::Relaxed);
        if commits != seen || last {
            seen = commits;
            checkpoint(conn, path);
        }
        if last {
            return;
        }
    }
}

/// One PASSIVE checkpoint. A failure is logged and tried again next time:
/// nothing waits for it, and the WAL keeps every commit meanwhile.
fn checkpoint(conn: &Connection, path: &Path) {
    let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    });
    match done {
        Ok((busy, log, copied)) => debug!(busy, log, copied, "store checkpoint"),
        Err(error) => warn!(path = %path.display(), %error, "store checkpoint failed; trying again later"),
    }
}
