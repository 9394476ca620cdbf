//! Named bounds of the pipeline semantics and of the mesh's security, in one place.

use std::time::Duration;

/// No retry waits longer than this, however many attempts came before.
pub const BACKOFF_MAX: Duration = Duration::from_secs(3600);

/// No job retries more often than this, whatever its file says.
pub const ATTEMPTS_MAX: u32 = 100;

/// Open keys a single gate tracks at once; a key beyond this is refused with an error
/// rather than letting a runaway key template exhaust memory.
pub const GATE_OPEN_KEYS_MAX: usize = 100_000;

// --- The mesh's security: CURVE keys and the broker's ZAP handler (`curve.rs`, `zap.rs`).

/// ZMQ_HANDSHAKE_IVL on every network socket: a connection must finish the ZMTP
/// (and CURVE) handshake within this, so a peer that connects and stalls, or
/// trickles a greeting, holds nothing for longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A key file is a few lines; a larger file is not one.
pub const KEY_FILE_MAX_BYTES: u64 = 64 * 1024;
/// Public keys the broker allows, across every `--allowed-keys` source.
pub const ALLOWED_KEYS_MAX: usize = 100_000;
/// Frames kept of one ZAP request (routing id, delimiter, the six fields of
/// RFC 27, one credential); the rest are read and dropped.
pub const ZAP_REQUEST_FRAMES_MAX: usize = 16;
/// How often the ZAP handler's thread looks whether it should stop, when
/// nothing else wakes it.
pub const ZAP_STOP_CHECK: Duration = Duration::from_millis(200);
/// Refusals of one kind logged by the broker: one line per this interval, the
/// rest counted and reported with the next line (and in `/metrics`).
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);
/// A worker or semaphore whose handshake keeps failing says so again at most this often.
pub const HANDSHAKE_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(30);
