//! [`Api`]: what the front door needs from the broker, as a trait.
//!
//! The HTTP layer is generic over it so that it can be tested on its own,
//! against [`super::memory::MemoryApi`], over real sockets; [`BrokerHandle`]
//! implements it by delegating, so production and tests run the same handlers.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use crate::handle::{ApiError, BrokerHandle, StartRequest, Started, Waited, WorkerView};
use crate::model::{AttemptRecord, JobFilter, JobRecord};
use crate::throttle::Hold;

use super::wire::{HoldView, QueueView};

/// The broker as the front door sees it; the methods mirror [`BrokerHandle`]'s.
///
/// Every future is `Send` because each request runs on the multi-threaded runtime.
pub trait Api: Clone + Send + Sync + 'static {
    /// Checks and durably stores a job; answers once it is committed.
    fn start(&self, request: StartRequest) -> impl Future<Output = Result<Started, ApiError>> + Send;
    fn job(&self, id: &str) -> impl Future<Output = Result<JobRecord, ApiError>> + Send;
    fn attempts(&self, id: &str) -> impl Future<Output = Result<Vec<AttemptRecord>, ApiError>> + Send;
    /// Jobs matching `filter`, newest first, at most `filter.limit`.
    fn jobs(&self, filter: JobFilter) -> impl Future<Output = Result<Vec<JobRecord>, ApiError>> + Send;
    /// Waits until job `id` ends or `limit` passes.
    fn wait(&self, id: &str, limit: Duration) -> impl Future<Output = Result<Waited, ApiError>> + Send;
    /// The file holding job `id`'s full output (it may still be growing, or not exist yet).
    fn log_path(&self, id: &str) -> impl Future<Output = Result<PathBuf, ApiError>> + Send;
    fn cancel(&self, id: &str) -> impl Future<Output = Result<JobRecord, ApiError>> + Send;
    fn cancel_run(&self, run_id: &str) -> impl Future<Output = Result<Vec<JobRecord>, ApiError>> + Send;
    fn retry(&self, id: &str) -> impl Future<Output = Result<JobRecord, ApiError>> + Send;
    fn progress(
        &self,
        id: &str,
        percent: f64,
        message: Option<String>,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    fn workers(&self) -> impl Future<Output = Vec<WorkerView>> + Send;
    /// The broker's Prometheus text; the front door appends its own request counters.
    fn metrics(&self) -> impl Future<Output = String> + Send;
    fn gates(&self) -> impl Future<Output = serde_json::Value> + Send;
    fn schedules(&self) -> impl Future<Output = serde_json::Value> + Send;
    /// True when the store answers and the ZeroMQ endpoint is bound.
    fn healthy(&self) -> impl Future<Output = bool> + Send;
    /// What holds the queued jobs of `job_name` back now, if a limit does.
    fn hold(&self, _job_name: &str) -> Option<Hold> {
        None
    }
    /// Queued and running jobs per job name (`GET /queues`).
    fn queues(&self) -> impl Future<Output = Vec<QueueView>> + Send {
        async { Vec::new() }
    }
}

impl Api for BrokerHandle {
    fn hold(&self, job_name: &str) -> Option<Hold> {
        BrokerHandle::hold(self, job_name)
    }

    fn queues(&self) -> impl Future<Output = Vec<QueueView>> + Send {
        let queues = BrokerHandle::queues(self)
            .into_iter()
            .map(|(job_name, queued, running, hold)| QueueView {
                job_name,
                queued,
                running,
                held_by: hold.as_ref().map(HoldView::new),
            })
            .collect();
        std::future::ready(queues)
    }

    fn start(&self, request: StartRequest) -> impl Future<Output = Result<Started, ApiError>> + Send {
        BrokerHandle::start(self, request)
    }

    fn job(&self, id: &str) -> impl Future<Output = Result<JobRecord, ApiError>> + Send {
        BrokerHandle::job(self, id)
    }

    fn attempts(&self, id: &str) -> impl Future<Output = Result<Vec<AttemptRecord>, ApiError>> + Send {
        BrokerHandle::attempts(self, id)
    }

    fn jobs(&self, filter: JobFilter) -> impl Future<Output = Result<Vec<JobRecord>, ApiError>> + Send {
        BrokerHandle::jobs(self, filter)
    }

    fn wait(&self, id: &str, limit: Duration) -> impl Future<Output = Result<Waited, ApiError>> + Send {
        BrokerHandle::wait(self, id, limit)
    }

    fn log_path(&self, id: &str) -> impl Future<Output = Result<PathBuf, ApiError>> + Send {
        BrokerHandle::log_path(self, id)
    }

    fn cancel(&self, id: &str) -> impl Future<Output = Result<JobRecord, ApiError>> + Send {
        BrokerHandle::cancel(self, id)
    }

    fn cancel_run(&self, run_id: &str) -> impl Future<Output = Result<Vec<JobRecord>, ApiError>> + Send {
        BrokerHandle::cancel_run(self, run_id)
    }

    fn retry(&self, id: &str) -> impl Future<Output = Result<JobRecord, ApiError>> + Send {
        BrokerHandle::retry(self, id)
    }

    fn progress(
        &self,
        id: &str,
        percent: f64,
        message: Option<String>,
    ) -> impl Future<Output = Result<(), ApiError>> + Send {
        BrokerHandle::progress(self, id, percent, message)
    }

    fn workers(&self) -> impl Future<Output = Vec<WorkerView>> + Send {
        BrokerHandle::workers(self)
    }

    fn metrics(&self) -> impl Future<Output = String> + Send {
        BrokerHandle::metrics(self)
    }

    fn gates(&self) -> impl Future<Output = serde_json::Value> + Send {
        BrokerHandle::gates(self)
    }

    fn schedules(&self) -> impl Future<Output = serde_json::Value> + Send {
        BrokerHandle::schedules(self)
    }

    fn healthy(&self) -> impl Future<Output = bool> + Send {
        BrokerHandle::healthy(self)
    }
}
