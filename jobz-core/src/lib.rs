//! What every jobz process speaks: the job's states, the pipeline semantics
//! (retries, follow-ups, gate counting, when schedules fire) and the preparation of a job's
//! commands from its definition.
//!
//! Everything here but [`transport`] and [`ids`] is pure: no I/O, no clock, no randomness.
//! Time and jitter come in as arguments, so eager mode, the broker and the
//! semaphore share one implementation and tests need no sleeping. The
//! transport (ZeroMQ sockets on their own threads) is kept apart in its module,
//! and so is the mesh's security: [`curve`] (keys and key files) and [`zap`]
//! (the broker's ZAP handler thread, around pure decisions).

pub mod command;
pub mod curve;
pub mod gates;
pub mod ids;
pub mod job;
pub mod limits;
pub mod pipeline;
pub mod protocol;
pub mod schedule;
pub mod transport;
pub mod zap;

pub use job::{Status, StatusParseError};
