//! Named bounds of the pipeline semantics, in one place.

use std::time::Duration;

/// No retry waits longer than this, however many attempts came before.
pub const BACKOFF_MAX: Duration = Duration::from_secs(3600);

/// No job retries more often than this, whatever its file says.
pub const ATTEMPTS_MAX: u32 = 100;

/// Open keys a single gate tracks at once; a key beyond this is refused with an error
/// rather than letting a runaway key template exhaust memory.
pub const GATE_OPEN_KEYS_MAX: usize = 100_000;
