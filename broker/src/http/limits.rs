//! Every bound of the HTTP front door, in one place.
//!
//! The front door faces the network: each of these caps what one client can
//! make the broker hold (connections, buffers, time). The ones an operator may
//! want to change are the defaults of [`super::HttpOptions`]; the rest are
//! fixed here.

use std::time::Duration;

/// Connections served at once. Past it the accept loop stops accepting until
/// one closes, so new clients wait in the kernel's listen backlog rather than
/// being reset (mini-redis `MAX_CONNECTIONS` does the same).
pub const CONNECTIONS_MAX: usize = 1024;

/// A client must send a whole request head (request line and headers) within
/// this long, and an idle keep-alive connection is closed after it; slow
/// clients cannot pin connections.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest request head (request line plus headers) in bytes; larger is a
/// JSON `413` (hyper refuses it; `parse_errors.rs` words the answer) and the
/// connection is closed. As large as a body may be, so that a start's params fit
/// in a query as well as in a JSON body: a value may take 4 KiB, 12 KiB when
/// percent-encoded.
pub const HEADER_BYTES_MAX: usize = 64 * 1024;

/// The most header fields in one request; more is a 413 like an oversized head.
pub const HEADERS_MAX: usize = 64;

/// hyper refuses a read buffer smaller than this (it panics on less), so the
/// buffer is never set below it even when the head limit is.
pub const READ_BUFFER_BYTES_MIN: usize = 8192;

/// The largest request body in bytes (a start's JSON, a progress report); larger is `413`.
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// An oversized body is read and thrown away up to this many bytes past the
/// limit before the 413 is sent, so that a client still writing its body reads
/// the answer instead of a connection reset. Beyond it the connection is closed.
pub const BODY_DRAIN_BYTES_MAX: usize = 1024 * 1024;

/// A request body must arrive within this long once the head is in (`408` otherwise).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest any single call into the broker may take before the request is
/// answered `503`; `wait=` adds its own duration on top.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest `wait=` a start may ask for; more is a 400, not silently shortened.
/// A day: a cron line's `curl -fsS '…&wait=3h'` follows a long nightly job to
/// its end, and a held answer costs the broker one idle task.
pub const WAIT_MAX: Duration = Duration::from_secs(24 * 3600);

/// In-flight requests get this long to finish after shutdown begins; then their
/// connections are dropped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// After the grace, dropped connection tasks get this long to unwind before
/// `serve` returns regardless.
pub const SHUTDOWN_ABORT_WAIT: Duration = Duration::from_secs(1);

/// After an accept error such as "too many open files", the accept loop pauses
/// this long instead of spinning.
pub const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// `GET /jobs` returns this many jobs when `limit=` is not given.
pub const LIST_LIMIT_DEFAULT: usize = 50;

/// The largest `limit=` of `GET /jobs`; more is a 400.
pub const LIST_LIMIT_MAX: usize = 1000;

/// The largest read from a log file per body frame, in bytes.
pub const LOG_FRAME_BYTES: usize = 64 * 1024;

/// The longest progress message in bytes; longer is a 400.
pub const PROGRESS_MESSAGE_BYTES_MAX: usize = 1024;

/// The longest `Idempotency-Key` or `Jobz-Parent-Id` header value in bytes; longer is a 400.
pub const ID_HEADER_BYTES_MAX: usize = 256;

/// The longest bearer token in bytes; longer is a 401 (a real one is 69 bytes).
pub const TOKEN_BYTES_MAX: usize = 1024;

/// Refused clients (failed TLS handshakes, missing or wrong tokens) are logged at most
/// this many times per [`REFUSAL_LOG_WINDOW`]; the rest are counted and the count is logged.
pub const REFUSALS_LOGGED_PER_WINDOW: u32 = 30;
pub const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(60);

/// A plain HTTP request on the HTTPS port: this much of it is read (and thrown away)
/// before the 400 that says to use `https://`.
pub const PLAIN_REQUEST_BYTES_MAX: usize = 16 * 1024;
