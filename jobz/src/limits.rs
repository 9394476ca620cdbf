//! Bounds of the binary's own waits.

use std::time::Duration;

/// After a shutdown signal, how long the process waits for its parts to stop.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);

/// Worker threads of the async runtime of `jobz broker`, `jobz worker` and
/// `jobz up`. One: the broker is one loop over its events, its front door's
/// work per request is a few microseconds, and everything that blocks (the
/// store's writer and syncer, its reads, ZeroMQ's sockets) has threads of its
/// own; the processes a worker runs use every core regardless. More threads
/// only add hand-overs between them, and each one (a futex wake and a context
/// switch) costs more than the work handed over: on a 2-core VM the
/// in-process mesh of `cargo bench -p jobz --bench mesh` spent 4.5 context
/// switches and 294 µs of CPU per job on the runtime with two threads, 2.0
/// and 230 µs with one (docs/BENCHMARKS.md).
pub const RUNTIME_WORKER_THREADS: usize = 1;
