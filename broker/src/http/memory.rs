//! [`MemoryApi`]: an in-memory [`Api`] for tests and demos of the front door
//! and the client commands, without a broker, a store or workers.
//!
//! It keeps jobs in a map and changes them only when told to (`set_running`,
//! `finish`, or `finish_after_start`), so a test decides every outcome. It is
//! not the broker: no params beyond "declared or not", no queues, no follow-ups.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::Utc;
use config::params::{ParamError, ParamProblem};
use jobz_core::pipeline::{NewJob, Origin};
use jobz_core::Status;
use tokio::sync::watch;

use super::api::Api;
use crate::handle::{ApiError, StartRequest, Started, Waited, WorkerView};
use crate::model::{AttemptRecord, JobFilter, JobRecord, Progress};

/// Makes every fallible call fail as the broker would under load or with its store down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// [`ApiError::Busy`] (429).
    Busy,
    /// [`ApiError::Unavailable`] (503).
    Unavailable,
}

/// An in-memory broker stand-in; clones share their state.
#[derive(Clone)]
pub struct MemoryApi {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// Bumped on every change to a job, so `wait` wakes up.
    changes: watch::Sender<u64>,
}

struct State {
    /// Job names that can be started, with their declared params.
    declared: BTreeMap<String, BTreeSet<String>>,
    /// By id; ids are zero-padded sequence numbers, so map order is creation order.
    jobs: BTreeMap<String, JobRecord>,
    attempts: BTreeMap<String, Vec<AttemptRecord>>,
    idempotency: BTreeMap<String, String>,
    next_id: u64,
    log_dir: PathBuf,
    refusal: Option<Refusal>,
    delay: Option<Duration>,
    finish_after_start: Option<(Status, Duration)>,
    healthy: bool,
    workers: Vec<WorkerView>,
    gates: serde_json::Value,
    schedules: serde_json::Value,
    metrics: String,
    starts: Vec<StartRequest>,
    calls: u64,
}

impl MemoryApi {
    /// An empty broker whose job logs live in `log_dir` as `<id>.log`.
    pub fn new(log_dir: impl Into<PathBuf>) -> MemoryApi {
        let state = State {
            declared: BTreeMap::new(),
            jobs: BTreeMap::new(),
            attempts: BTreeMap::new(),
            idempotency: BTreeMap::new(),
            next_id: 1,
            log_dir: log_dir.into(),
            refusal: None,
            delay: None,
            finish_after_start: None,
            healthy: true,
            workers: Vec::new(),
            gates: serde_json::json!([]),
            schedules: serde_json::json!([]),
            metrics: "# TYPE jobz_jobs gauge\njobz_jobs 0\n".to_owned(),
            starts: Vec::new(),
            calls: 0,
        };
        MemoryApi { inner: Arc::new(Inner { state: Mutex::new(state), changes: watch::channel(0).0 }) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has failed already; go on with the data.
        self.inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn changed(&self) {
        self.inner.changes.send_modify(|n| *n += 1);
    }

    /// Lets `job_name` be started with the params named (any others are refused).
    pub fn declare(&self, job_name: &str, params: &[&str]) {
        let names = params.iter().map(|p| (*p).to_owned()).collect();
        self.state().declared.insert(job_name.to_owned(), names);
    }

    /// Every fallible call fails this way until set back to `None`.
    pub fn refuse(&self, refusal: Option<Refusal>) {
        self.state().refusal = refusal;
    }

    /// Every call takes this long first (a slow broker).
    pub fn delay(&self, delay: Option<Duration>) {
        self.state().delay = delay;
    }

    /// Each job started from now on runs and ends with `status` after `after`.
    pub fn finish_after_start(&self, outcome: Option<(Status, Duration)>) {
        self.state().finish_after_start = outcome;
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state().healthy = healthy;
    }

    pub fn set_workers(&self, workers: Vec<WorkerView>) {
        self.state().workers = workers;
    }

    pub fn set_gates(&self, gates: serde_json::Value) {
        self.state().gates = gates;
    }

    pub fn set_schedules(&self, schedules: serde_json::Value) {
        self.state().schedules = schedules;
    }

    pub fn set_metrics(&self, text: &str) {
        self.state().metrics = text.to_owned();
    }

    /// The start requests received so far, as the front door built them.
    pub fn starts(&self) -> Vec<StartRequest> {
        self.state().starts.clone()
    }

    /// Where job `id`'s log is (it need not exist).
    pub fn log_file(&self, id: &str) -> PathBuf {
        self.state().log_dir.join(format!("{id}.log"))
    }

    /// Job `id` as it stands, if it exists.
    pub fn get(&self, id: &str) -> Option<JobRecord> {
        self.state().jobs.get(id).cloned()
    }

    /// Puts a job in as it is, replacing any with its id.
    pub fn insert(&self, job: JobRecord) {
        self.state().jobs.insert(job.id.clone(), job);
        self.changed();
    }

    /// Queued → running on `worker`, as attempt `attempts + 1`.
    pub fn set_running(&self, id: &str, worker: &str) -> bool {
        let found = {
            let mut state = self.state();
            run(&mut state, id, worker)
        };
        self.changed();
        found
    }

    /// Ends job `id` with `status`, `exit_code` and the output tail `output`.
    pub fn finish(&self, id: &str, status: Status, exit_code: Option<i32>, output: &str) -> bool {
        let found = {
            let mut state = self.state();
            end(&mut state, id, status, exit_code, output)
        };
        self.changed();
        found
    }

    /// Calls made so far (counted as they begin, so a test can see one in flight).
    pub fn calls(&self) -> u64 {
        self.state().calls
    }

    async fn pause(&self) {
        let delay = {
            let mut state = self.state();
            state.calls += 1;
            state.delay
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
    }

    fn refused(&self) -> Result<(), ApiError> {
        match self.state().refusal {
            None => Ok(()),
            Some(Refusal::Busy) => Err(ApiError::Busy),
            Some(Refusal::Unavailable) => Err(ApiError::Unavailable("the test store is down".to_owned())),
        }
    }

    fn lookup(&self, id: &str) -> Result<JobRecord, ApiError> {
        self.state().jobs.get(id).cloned().ok_or_else(|| ApiError::NotFound(format!("no job {id:?}")))
    }
}

fn run(state: &mut State, id: &str, worker: &str) -> bool {
    let Some(job) = state.jobs.get_mut(id) else { return false };
    let now = Utc::now();
    job.status = Status::Running;
    job.attempts += 1;
    job.worker = Some(worker.to_owned());
    job.started_at = Some(now);
    job.lease = Some(u64::from(job.attempts));
    let attempt = AttemptRecord {
        job_id: id.to_owned(),
        attempt: job.attempts,
        worker: worker.to_owned(),
        lease: u64::from(job.attempts),
        started_at: now,
        finished_at: None,
        status: None,
        exit_code: None,
        stale: false,
    };
    state.attempts.entry(id.to_owned()).or_default().push(attempt);
    true
}

fn end(state: &mut State, id: &str, status: Status, exit_code: Option<i32>, output: &str) -> bool {
    let Some(job) = state.jobs.get_mut(id) else { return false };
    let now = Utc::now();
    job.status = status;
    job.exit_code = exit_code;
    job.finished_at = Some(now);
    job.output_tail = output.to_owned();
    job.progress = None;
    if let Some(attempt) = state.attempts.get_mut(id).and_then(|a| a.last_mut()) {
        attempt.finished_at = Some(now);
        attempt.status = Some(status);
        attempt.exit_code = exit_code;
    }
    true
}

impl Api for MemoryApi {
    async fn start(&self, request: StartRequest) -> Result<Started, ApiError> {
        self.pause().await;
        self.refused()?;
        let (job, finish) = {
            let mut state = self.state();
            state.starts.push(request.clone());
            let declared = state
                .declared
                .get(&request.job_name)
                .ok_or_else(|| ApiError::NotFound(format!("no job named {:?} in the job file", request.job_name)))?;
            let undeclared: Vec<ParamError> = request
                .params
                .keys()
                .filter(|name| !declared.contains(*name))
                .map(|name| ParamError { param: name.clone(), problem: ParamProblem::Undeclared })
                .collect();
            if !undeclared.is_empty() {
                return Err(ApiError::BadParams(undeclared));
            }
            if let Some(existing) = request.idempotency_key.as_ref().and_then(|key| state.idempotency.get(key)) {
                let job = state.jobs.get(existing).cloned();
                if let Some(job) = job {
                    return Ok(Started { job, deduplicated: true });
                }
            }
            let id = format!("job-{:06}", state.next_id);
            state.next_id += 1;
            let run_id = match &request.parent_id {
                None => id.clone(),
                Some(parent) => match state.jobs.get(parent) {
                    Some(parent) => parent.run_id.clone(),
                    None => return Err(ApiError::BadRequest(format!("no parent job {parent:?}"))),
                },
            };
            let now = Utc::now();
            let new = NewJob {
                job_name: request.job_name.clone(),
                params: request.params.clone(),
                run_id: Some(run_id),
                parent_id: request.parent_id.clone(),
                origin: Origin::Start,
            };
            let job = JobRecord::queued(id.clone(), &new, request.priority.unwrap_or(0), now);
            state.jobs.insert(id.clone(), job.clone());
            if let Some(key) = &request.idempotency_key {
                state.idempotency.insert(key.clone(), id);
            }
            (job, state.finish_after_start)
        };
        self.changed();
        if let Some((status, after)) = finish {
            let api = self.clone();
            let id = job.id.clone();
            tokio::spawn(async move {
                api.set_running(&id, "memory-worker");
                tokio::time::sleep(after).await;
                let exit_code = if status == Status::Succeeded { Some(0) } else { Some(1) };
                api.finish(&id, status, exit_code, &format!("{status}\n"));
            });
        }
        Ok(Started { job, deduplicated: false })
    }

    async fn job(&self, id: &str) -> Result<JobRecord, ApiError> {
        self.pause().await;
        self.refused()?;
        self.lookup(id)
    }

    async fn attempts(&self, id: &str) -> Result<Vec<AttemptRecord>, ApiError> {
        self.pause().await;
        self.refused()?;
        self.lookup(id)?;
        Ok(self.state().attempts.get(id).cloned().unwrap_or_default())
    }

    async fn jobs(&self, filter: JobFilter) -> Result<Vec<JobRecord>, ApiError> {
        self.pause().await;
        self.refused()?;
        let state = self.state();
        Ok(state.jobs.values().rev().filter(|job| filter.matches(job)).take(filter.limit).cloned().collect())
    }

    async fn wait(&self, id: &str, limit: Duration) -> Result<Waited, ApiError> {
        self.pause().await;
        self.refused()?;
        let deadline = tokio::time::Instant::now() + limit;
        // Subscribe before looking, so a change in between is not missed.
        let mut changes = self.inner.changes.subscribe();
        loop {
            let job = self.lookup(id)?;
            if job.status.is_final() {
                return Ok(Waited::Ended(job));
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                // The sender lives as long as `self`; a closed channel cannot happen, but waiting out is right.
                Ok(Err(_)) | Err(_) => return Ok(Waited::StillOpen(self.lookup(id)?)),
            }
        }
    }

    async fn log_path(&self, id: &str) -> Result<PathBuf, ApiError> {
        self.pause().await;
        self.refused()?;
        self.lookup(id)?;
        Ok(self.log_file(id))
    }

    async fn cancel(&self, id: &str) -> Result<JobRecord, ApiError> {
        self.pause().await;
        self.refused()?;
        let job = {
            let mut state = self.state();
            let job = state.jobs.get_mut(id).ok_or_else(|| ApiError::NotFound(format!("no job {id:?}")))?;
            if job.status.is_final() {
                return Err(ApiError::Conflict(format!("job {id} is already {}", job.status)));
            }
            job.status = Status::Cancelled;
            job.cancelled_at = Some(Utc::now());
            job.finished_at = job.cancelled_at;
            job.clone()
        };
        self.changed();
        Ok(job)
    }

    async fn cancel_run(&self, run_id: &str) -> Result<Vec<JobRecord>, ApiError> {
        self.pause().await;
        self.refused()?;
        let cancelled = {
            let mut state = self.state();
            if !state.jobs.values().any(|job| job.run_id == run_id) {
                return Err(ApiError::NotFound(format!("no run {run_id:?}")));
            }
            let now = Utc::now();
            let mut cancelled = Vec::new();
            for job in state.jobs.values_mut().filter(|job| job.run_id == run_id && !job.status.is_final()) {
                job.status = Status::Cancelled;
                job.cancelled_at = Some(now);
                job.finished_at = Some(now);
                cancelled.push(job.clone());
            }
            cancelled
        };
        self.changed();
        Ok(cancelled)
    }

    async fn retry(&self, id: &str) -> Result<JobRecord, ApiError> {
        self.pause().await;
        self.refused()?;
        let job = {
            let mut state = self.state();
            let job = state.jobs.get_mut(id).ok_or_else(|| ApiError::NotFound(format!("no job {id:?}")))?;
            if !matches!(job.status, Status::Failed | Status::TimedOut | Status::Cancelled) {
                return Err(ApiError::Conflict(format!(
                    "job {id} is {}; only a failed job can be retried",
                    job.status
                )));
            }
            job.status = Status::Queued;
            job.queued_at = Some(Utc::now());
            job.finished_at = None;
            job.cancelled_at = None;
            job.exit_code = None;
            job.clone()
        };
        self.changed();
        Ok(job)
    }

    async fn progress(&self, id: &str, percent: f64, message: Option<String>) -> Result<(), ApiError> {
        self.pause().await;
        self.refused()?;
        {
            let mut state = self.state();
            let job = state.jobs.get_mut(id).ok_or_else(|| ApiError::NotFound(format!("no job {id:?}")))?;
            if job.status.is_final() {
                return Err(ApiError::Conflict(format!("job {id} is already {}", job.status)));
            }
            job.progress = Some(Progress { percent, message });
        }
        self.changed();
        Ok(())
    }

    async fn workers(&self) -> Vec<WorkerView> {
        self.pause().await;
        self.state().workers.clone()
    }

    async fn metrics(&self) -> String {
        self.pause().await;
        self.state().metrics.clone()
    }

    async fn gates(&self) -> serde_json::Value {
        self.pause().await;
        self.state().gates.clone()
    }

    async fn schedules(&self) -> serde_json::Value {
        self.pause().await;
        self.state().schedules.clone()
    }

    async fn healthy(&self) -> bool {
        self.pause().await;
        self.state().healthy
    }
}
