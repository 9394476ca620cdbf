//! What the front door asks of the broker: [`BrokerHandle`], a cheap clone
//! that sends requests to the broker's loop and reads the store.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::model::{AttemptRecord, JobFilter, JobRecord};

/// A request to start a job (SPEC `job_start`).
#[derive(Debug, Clone, Default)]
pub struct StartRequest {
    pub job_name: String,
    /// Raw params from the query string and the JSON or form body, not yet checked.
    pub params: BTreeMap<String, String>,
    /// The `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// `priority=` on the start; `None` takes the job's own.
    pub priority: Option<i32>,
    /// The id of the job that started this one from inside its command (`jobz start` in a job).
    pub parent_id: Option<String>,
}

/// What the broker takes from a start once it is checked.
#[derive(Debug, Clone)]
pub struct CheckedStart {
    /// The params as the job declares them, defaults filled in.
    pub params: BTreeMap<String, String>,
    /// The start's `priority=`, else the job's own.
    pub priority: i32,
}

impl StartRequest {
    /// Checks the start against `file` as the broker does before it stores
    /// anything: the job exists (404), its params pass (400 naming each), and
    /// its priority is in range (400).
    pub fn check(&self, file: &config::JobFile) -> Result<CheckedStart, ApiError> {
        let def = file
            .jobs
            .get(&self.job_name)
            .ok_or_else(|| ApiError::NotFound(format!("no job named {:?}", self.job_name)))?;
        let params = config::params::validate(def, &self.params).map_err(ApiError::BadParams)?;
        let priority = self.priority.unwrap_or(def.priority);
        if !(crate::limits::PRIORITY_MIN..=crate::limits::PRIORITY_MAX).contains(&priority) {
            return Err(ApiError::BadRequest(format!(
                "priority {priority} is out of range {}..={}",
                crate::limits::PRIORITY_MIN,
                crate::limits::PRIORITY_MAX
            )));
        }
        Ok(CheckedStart { params, priority })
    }
}

/// The answer to a start.
#[derive(Debug, Clone)]
pub struct Started {
    pub job: JobRecord,
    /// True when an existing job was returned (unique hit or repeated idempotency key).
    pub deduplicated: bool,
}

/// Why a request was refused. Each maps to one HTTP status in the front door.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 400: bad params; each names the param and the reason.
    #[error("bad params: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    BadParams(Vec<config::params::ParamError>),
    /// 400: any other bad request.
    #[error("{0}")]
    BadRequest(String),
    /// 409: the job is not in a state that allows this (e.g. cancel a finished job).
    #[error("{0}")]
    Conflict(String),
    /// 429: the store cannot keep up; try again later.
    #[error("the broker is busy; try again")]
    Busy,
    /// 503: the store is down or the disk is full; nothing was stored.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// A connected worker (SPEC `GET /workers`).
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub name: String,
    pub host: String,
    /// The job names it serves, with whether its definition matches the broker's.
    pub jobs: Vec<ServedJob>,
    pub running: usize,
    pub concurrency: usize,
    pub last_heartbeat: DateTime<Utc>,
    pub connected_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct ServedJob {
    pub name: String,
    /// False when the worker's definition differs from the broker's (drift).
    pub matches: bool,
}

/// How a `wait=` ended.
#[derive(Debug, Clone)]
pub enum Waited {
    /// The job reached a final status.
    Ended(JobRecord),
    /// The duration passed first; the job as it stands.
    StillOpen(JobRecord),
}

/// The broker as the front door sees it.
#[derive(Clone)]
pub struct BrokerHandle {
    pub(crate) inner: std::sync::Arc<crate::core::Shared>,
}

impl BrokerHandle {
    /// Checks and durably stores a job; answers once it is committed.
    pub async fn start(&self, request: StartRequest) -> Result<Started, ApiError> {
        crate::core::start_job(self, request).await
    }

    pub async fn job(&self, id: &str) -> Result<JobRecord, ApiError> {
        crate::core::job(self, id).await
    }

    pub async fn attempts(&self, id: &str) -> Result<Vec<AttemptRecord>, ApiError> {
        crate::core::attempts(self, id).await
    }

    pub async fn jobs(&self, filter: JobFilter) -> Result<Vec<JobRecord>, ApiError> {
        crate::core::jobs(self, filter).await
    }

    /// Waits until job `id` ends or `limit` passes.
    pub async fn wait(&self, id: &str, limit: Duration) -> Result<Waited, ApiError> {
        crate::core::wait(self, id, limit).await
    }

    /// The file holding job `id`'s full output (it may still be growing).
    pub async fn log_path(&self, id: &str) -> Result<PathBuf, ApiError> {
        crate::core::log_path(self, id).await
    }

    pub async fn cancel(&self, id: &str) -> Result<JobRecord, ApiError> {
        crate::core::cancel(self, id).await
    }

    pub async fn cancel_run(&self, run_id: &str) -> Result<Vec<JobRecord>, ApiError> {
        crate::core::cancel_run(self, run_id).await
    }

    pub async fn retry(&self, id: &str) -> Result<JobRecord, ApiError> {
        crate::core::retry(self, id).await
    }

    pub async fn progress(&self, id: &str, percent: f64, message: Option<String>) -> Result<(), ApiError> {
        crate::core::progress(self, id, percent, message).await
    }

    /// `(job name, queued, running, what holds it)` for every name with jobs queued or running.
    pub fn queues(&self) -> Vec<(String, u64, u64, Option<crate::throttle::Hold>)> {
        crate::core::queues(self)
    }

    /// What holds the queued jobs of `job_name` back now (`concurrency` or `rate`), if anything.
    pub fn hold(&self, job_name: &str) -> Option<crate::throttle::Hold> {
        crate::core::hold(self, job_name)
    }

    pub async fn workers(&self) -> Vec<WorkerView> {
        crate::core::workers(self).await
    }

    /// The Prometheus text exposition of the broker's metrics.
    pub async fn metrics(&self) -> String {
        crate::core::metrics(self).await
    }

    /// Each gate's keys with their progress (SPEC `GET /gates`).
    pub async fn gates(&self) -> serde_json::Value {
        crate::core::gates(self).await
    }

    /// Each schedule with its next fire time (SPEC `GET /schedules`).
    pub async fn schedules(&self) -> serde_json::Value {
        crate::core::schedules(self).await
    }

    /// True when the store answers and the ZeroMQ endpoint is bound.
    pub async fn healthy(&self) -> bool {
        crate::core::healthy(self).await
    }
}
