//! Named limits of the worker: every buffer, wait and grace period the worker
//! uses has its bound here, so that a reader can see them all in one place and
//! tests can refer to them instead of repeating magic numbers.

use std::time::Duration;

/// How many bytes of a job attempt's output are kept in memory as its tail
/// (`Outcome::tail`, the `output` field of a job). The full output goes to the
/// log file; the tail is what a status request shows, so it is kept small
/// enough to travel in one message.
pub const OUTPUT_TAIL_BYTES: usize = 64 * 1024;

/// Size of the buffer the output pipe of a step is read into. Each read becomes
/// at most one chunk for the log file, the tail and the output channel.
pub const OUTPUT_CHUNK_BYTES: usize = 16 * 1024;

/// How long a step runs before its output pipe is watched. A step that ends
/// sooner has its output read once, after it ended; one that writes more than
/// the pipe holds (64 KiB on Linux) meanwhile waits at most this long.
pub const OUTPUT_WATCH_AFTER: Duration = Duration::from_millis(5);

/// Capacity, in chunks, of the channel a caller gives the runner to stream a
/// job's output live. Bounded, so a slow reader slows the job down (its pipe
/// fills) rather than grow memory.
pub const OUTPUT_CHANNEL_CAPACITY: usize = 64;

/// How long the output pipe is still read after every process of a step's
/// process group has been stopped. Only a process that left the group (for
/// example with `setsid`) can still hold the pipe open at that point, and it
/// could hold it forever; the runner stops reading after this long.
pub const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the `after` (tear-down) step may run. It always runs, also after
/// the job timed out or was cancelled, so it needs its own bound.
pub const AFTER_STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// Default time between SIGTERM and SIGKILL when a job's process group is
/// stopped because of a timeout or a cancel, for callers that have no
/// configured value.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(10);

/// Time between SIGTERM and SIGKILL for processes still left in a step's
/// process group after its main process exited on its own. A job is over when
/// its main process exits (like systemd's `KillMode=control-group`); the
/// leftovers get this short grace to clean up.
pub const LEFTOVER_KILL_GRACE: Duration = Duration::from_secs(1);

/// How often the runner checks whether a process group it signalled is empty.
pub const GROUP_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How long the runner waits for a step's main process to be reaped after
/// SIGKILL. SIGKILL cannot be caught, but a process stuck in uninterruptible
/// sleep (a hung NFS mount) may not die; the runner then gives up waiting and
/// reports no exit status rather than hang the worker.
pub const REAP_AFTER_KILL_TIMEOUT: Duration = Duration::from_secs(5);

// --- The worker's session with the broker (`mesh.rs`).

/// How often the worker sends a heartbeat when it has sent nothing else; the broker's Welcome overrides it.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Heartbeats the broker may miss before the worker reconnects (Paranoid Pirate's liveness).
pub const HEARTBEAT_LIVENESS: u32 = 3;
/// How long the broker may stay silent before the worker reconnects, until Welcome says otherwise.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(3);
/// The broker timeout never drops below this, however short the heartbeat.
pub const BROKER_TIMEOUT_MIN: Duration = Duration::from_millis(500);
/// How often the worker's loop looks at its timers.
pub const WORKER_TICK: Duration = Duration::from_millis(100);
/// The first wait before reconnecting to a lost broker; it doubles up to the maximum.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(250);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// Unacknowledged results are sent again this often.
pub const RESULT_RESEND: Duration = Duration::from_secs(2);
/// An unanswered Hello is sent again this often.
pub const HELLO_RESEND: Duration = Duration::from_secs(1);
/// Results held for acknowledgement at most; beyond that the oldest is given up.
pub const UNACKED_RESULTS_MAX: usize = 10_000;
/// Start, output and end events of attempts waiting for the worker's loop.
pub const ATTEMPT_EVENTS: usize = 1024;
/// On shutdown, running jobs get this long to finish (`--grace`).
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);
/// On shutdown, how long the worker waits for its last results to be acknowledged.
pub const RESULT_ACK_WAIT: Duration = Duration::from_secs(5);
/// On shutdown, beyond the kill grace, how long the worker waits for a stopped job's
/// processes to be gone before handing the job back anyway.
pub const KILL_WAIT_SLACK: Duration = Duration::from_secs(2);
