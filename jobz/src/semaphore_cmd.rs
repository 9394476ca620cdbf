//! `jobz semaphore`: evaluates the `gates:` of the job file against a broker
//! (`semaphore::run`). Stops cleanly on SIGTERM or SIGINT; a broker that
//! refuses it (its gates differ from the broker's) is an error with the
//! broker's message and a non-zero exit.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use semaphore::SemaphoreConfig;

use crate::cli::{load_config, ClientCurveArgs, ConfigArg};

/// A semaphore's name among the broker's peers: unique per process, so that
/// several semaphores on one host do not replace each other.
pub fn default_name() -> String {
    format!("{}-semaphore-{}", semaphore::hostname(), std::process::id())
}

pub fn semaphore(broker: String, config: ConfigArg, curve: ClientCurveArgs) -> anyhow::Result<ExitCode> {
    let file = match load_config(&config, false)? {
        Ok(f) => Arc::new(f),
        Err(code) => return Ok(code),
    };
    crate::mesh_cmd::check_endpoint(&broker, crate::mesh_cmd::Side::Connect)?;
    let curve = crate::mesh_cmd::client_curve(&curve, &broker)?;
    let config = SemaphoreConfig { broker, file, name: default_name(), curve, local: None };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = crate::mesh_cmd::shutdown_on_signals()?;
        let ctx = zmq::Context::new();
        semaphore::run(config, &ctx, shutdown).await.context("semaphore")?;
        Ok(ExitCode::SUCCESS)
    })
}
