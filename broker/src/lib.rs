//! The broker: durable store, queues per job name, dispatch to workers over
//! ZeroMQ with fenced leases, follow-ups, and the HTTP front door.

pub mod clock;
pub mod core;
pub mod handle;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod model;
mod scheduler;
pub mod store;
pub mod throttle;
