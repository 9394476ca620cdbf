//! The worker side of jobz: everything needed to execute jobs on this machine.
//!
//! [`runner`] runs one attempt of a job as local processes and reports how it
//! ended; both the `jobz worker` process and the eager mode (`jobz run`) use
//! it. [`limits`] names every bound the worker applies.

pub mod eager;
pub mod limits;
pub mod mesh;
pub mod runner;
