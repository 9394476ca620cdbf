//! Bounds of the binary's own waits.

use std::time::Duration;

/// After a shutdown signal, how long the process waits for its parts to stop.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(60);
