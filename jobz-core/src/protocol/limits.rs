//! Named bounds of the wire protocol, in one place.
//!
//! The decoder checks every one of them before it trusts a message, and the
//! encoder's [`super::try_encode`] checks the same ones before a message leaves,
//! so a sender learns locally that its peer would refuse what it is about to
//! send. The transport sizes its sockets from them.

/// Frames in one message: the header frame and, for `Output` and `Result`, the payload.
pub const FRAMES_MAX: usize = 2;

/// The first frame: the 4-byte header plus the JSON body. Checked before parsing,
/// so parsing never touches more than this many bytes.
pub const FRAME_MAX_BYTES: usize = 1024 * 1024;

/// The second frame: one chunk of output, or the output tail of a result.
pub const PAYLOAD_MAX_BYTES: usize = 1024 * 1024;

/// Job names, param names, worker names and host names.
pub const NAME_MAX_BYTES: usize = 256;

/// Job ids and run ids (UUIDs are 36 bytes; the rest is headroom).
pub const ID_MAX_BYTES: usize = 128;

/// A job-definition digest (16 hex chars today; room for a 256-bit hash later).
pub const DIGEST_MAX_BYTES: usize = 64;

/// Free text: progress messages, error strings, `Error` replies.
/// Senders clip with [`super::clip`].
pub const TEXT_MAX_BYTES: usize = 4096;

/// The front-door URL in `Welcome`.
pub const URL_MAX_BYTES: usize = 2048;

/// Params of one dispatch.
pub const PARAMS_MAX: usize = 128;

/// One param value: the same bound the front door enforces (SPEC: at most 4 KiB).
pub const PARAM_VALUE_MAX_BYTES: usize = config::params::VALUE_MAX_BYTES;

/// Jobs one worker serves (`Hello.jobs`), and job names in `Welcome.drift`.
pub const JOBS_MAX: usize = 1024;

/// Attempts one worker reports in `Hello.holding` or hands back in `Goodbye`:
/// the running ones (at most `concurrency`) plus finished ones whose result is
/// not acknowledged yet.
pub const HOLDING_MAX: usize = 2048;

/// A worker's `concurrency`, its `credit` in `Hello`, and one `Credit` grant.
pub const CONCURRENCY_MAX: u32 = 1024;

/// A gate key in `Fire` and `Fired`: a key template filled with param values,
/// so room for a few of them at [`PARAM_VALUE_MAX_BYTES`].
pub const GATE_KEY_MAX_BYTES: usize = 4 * PARAM_VALUE_MAX_BYTES;

/// Gate events in one `Events` page.
pub const EVENTS_PAGE_MAX: usize = 1000;

/// The JSON of one page's events, at most: the rest of [`FRAME_MAX_BYTES`] is
/// headroom for the header and the page's own fields, so a page built by
/// [`super::Events::page`] always fits one frame.
pub const EVENTS_PAGE_MAX_BYTES: usize = FRAME_MAX_BYTES - 4096;
