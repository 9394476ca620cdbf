//! `jobz semaphore`: fan-in gates against the mesh.
//!
//! A semaphore reads the broker's durable gate events (upstream jobs that
//! succeeded or failed for good), counts them per gate and key with the same
//! [`jobz_core::gates::GateBook`] eager mode uses, and asks the broker to start
//! a gate's job (`then`, `on_timeout`, `on_failure`) when a key calls for it.
//! Correctness does not rest on its memory: the broker keeps the events and an
//! idempotent record of each fire, so several semaphores may run side by side,
//! and one that crashes rebuilds its counts by reading the events again from
//! the first. The protocol of this session is `docs/PROTOCOL.md`, "Gates".
//!
//! [`count`] is the pure counting path (also what the benchmark measures);
//! [`run`] is the session with the broker, modelled on the worker's
//! (`worker/src/mesh.rs`): registration, heartbeats, reconnection with backoff.

pub mod count;
pub mod limits;
mod session;

use std::sync::Arc;

use config::JobFile;
use jobz_core::transport::{CurveClient, LocalConnector, TransportError};

pub use session::run;

/// How a semaphore runs.
#[derive(Debug, Clone)]
pub struct SemaphoreConfig {
    /// The broker's ZeroMQ endpoint, e.g. `tcp://broker:6770`.
    pub broker: String,
    /// The job file whose `gates:` this semaphore evaluates; the broker must have the same gates.
    pub file: Arc<JobFile>,
    /// Unique among the broker's peers (the broker replaces a peer that registers under a known name).
    pub name: String,
    /// Keys for an encrypted broker (`--curve-key`, `--broker-key`); `None` speaks plain text.
    pub curve: Option<CurveClient>,
    /// A broker in this process (`jobz up`): an in-process link instead of ZeroMQ to `broker`.
    pub local: Option<LocalConnector>,
}

/// Why a semaphore stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SemaphoreError {
    #[error("cannot connect to the broker at {endpoint}: {source}")]
    Connect { endpoint: String, source: TransportError },
    /// The broker answered `Error` before serving any events: typically the
    /// gates of this semaphore's job file differ from the broker's, or the
    /// broker speaks another protocol version. The message is the broker's.
    #[error("the broker refused this semaphore: {0}")]
    Refused(String),
}

/// This machine's host name, for the broker's list of peers.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}
