//! The front door of an eager run (`jobz run`): the jobs the run starts reach
//! it at `JOBZ_URL`, so `jobz start` and `jobz progress` in their steps work
//! as they do on the mesh, and never reach a broker that happens to listen
//! at the default address.
//!
//! It is the broker's own front door (`broker::http::serve`, the same routes,
//! checks and errors) over [`EagerApi`], on a loopback port of its own for as
//! long as the run lasts. A start is checked against the job file as the
//! broker checks it, gets its id and joins the caller's run; the job itself
//! runs in the eager run after its caller ([`worker::eager::run_with_inbox`]).
//! There is nothing to cancel or retry here, and a job started from a job
//! cannot be waited for inside it: it runs once its caller has ended.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use broker::handle::{ApiError, CheckedStart, StartRequest, Started, Waited, WorkerView};
use broker::http::{Api, HttpOptions};
use broker::model::{AttemptRecord, JobFilter, JobRecord, Progress};
use chrono::Utc;
use config::JobFile;
use jobz_core::pipeline::{NewJob, Origin};
use jobz_core::Status;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use worker::eager::{EagerEvent, EagerInput};

/// The jobs of one eager run as the front door shows them; clones share them.
#[derive(Clone)]
pub struct EagerApi {
    inner: Arc<Inner>,
}

struct Inner {
    file: Arc<JobFile>,
    log_dir: PathBuf,
    inbox: mpsc::UnboundedSender<EagerInput>,
    /// By id (UUID v7: map order is creation order).
    jobs: Mutex<BTreeMap<String, JobRecord>>,
}

/// Why eager mode refuses what only a broker does.
const NO_BROKER: &str = "eager mode (`jobz run`) runs each job to its end, once: cancel and retry need a broker";

impl EagerApi {
    /// The front door's state for a run of `file` whose logs are in `log_dir`;
    /// what its jobs send comes out of the returned receiver.
    pub fn new(file: Arc<JobFile>, log_dir: PathBuf) -> (EagerApi, mpsc::UnboundedReceiver<EagerInput>) {
        let (inbox, received) = mpsc::unbounded_channel();
        let inner = Inner { file, log_dir, inbox, jobs: Mutex::new(BTreeMap::new()) };
        (EagerApi { inner: Arc::new(inner) }, received)
    }

    /// Serves this API on a loopback port until `stop`; returns its URL.
    pub async fn serve(&self, stop: CancellationToken) -> std::io::Result<String> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let api = self.clone();
        tokio::spawn(async move {
            if let Err(e) = broker::http::serve(listener, api, HttpOptions::default(), stop).await {
                tracing::warn!(error = %e, "the eager run's front door stopped");
            }
        });
        Ok(url)
    }

    /// Keeps the jobs' records up to date with what the run reports.
    pub fn observe(&self, event: &EagerEvent<'_>) {
        let now = Utc::now();
        let mut jobs = self.jobs();
        match event {
            EagerEvent::AttemptStarted { job, parent_id } => {
                let record = jobs.entry(job.id.clone()).or_insert_with(|| {
                    let new = NewJob {
                        job_name: job.job_name.clone(),
                        params: job.params.clone(),
                        run_id: Some(job.run_id.clone()),
                        parent_id: parent_id.map(str::to_owned),
                        origin: Origin::Start,
                    };
                    JobRecord::queued(job.id.clone(), &new, 0, now)
                });
                record.status = Status::Running;
                record.attempts = job.attempt;
                record.worker = Some("jobz run".to_owned());
                record.started_at = Some(now);
                record.progress = None;
            }
            EagerEvent::AttemptEnded { job, outcome, retry_in } => {
                if let Some(record) = jobs.get_mut(&job.id) {
                    record.exit_code = outcome.exit_code;
                    record.signal = outcome.signal;
                    record.output_tail = outcome.tail.clone();
                    if retry_in.is_some() {
                        record.status = Status::Queued;
                        record.queued_at = Some(now);
                    } else {
                        record.status = Status::from(outcome.status);
                        record.finished_at = Some(now);
                    }
                }
            }
            EagerEvent::Progress { job, percent, message } => {
                if let Some(record) = jobs.get_mut(&job.id) {
                    record.progress = Some(Progress { percent: *percent, message: message.map(str::to_owned) });
                }
            }
            EagerEvent::Output { .. } | EagerEvent::Problem { .. } => {}
        }
    }

    fn jobs(&self) -> MutexGuard<'_, BTreeMap<String, JobRecord>> {
        // A panic while the lock was held left whole records behind: keep serving them.
        self.inner.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lookup(&self, id: &str) -> Result<JobRecord, ApiError> {
        self.jobs().get(id).cloned().ok_or_else(|| ApiError::NotFound(format!("no job with id {id:?} in this run")))
    }
}

impl Api for EagerApi {
    async fn start(&self, request: StartRequest) -> Result<Started, ApiError> {
        let CheckedStart { params, priority } = request.check(&self.inner.file)?;
        let mut jobs = self.jobs();
        let run_id = match &request.parent_id {
            None => None,
            Some(parent) => match jobs.get(parent) {
                Some(parent) => Some(parent.run_id.clone()),
                None => return Err(ApiError::BadRequest(format!("no job with id {parent:?} in this run"))),
            },
        };
        let id = jobz_core::ids::new_id();
        let new = NewJob {
            job_name: request.job_name.clone(),
            params,
            run_id,
            parent_id: request.parent_id.clone(),
            origin: Origin::Start,
        };
        let job = JobRecord::queued(id.clone(), &new, priority, Utc::now());
        self.inner
            .inbox
            .send(EagerInput::Start { id: id.clone(), job: new })
            .map_err(|_| ApiError::Unavailable("this eager run has ended".to_owned()))?;
        jobs.insert(id, job.clone());
        Ok(Started { job, deduplicated: false })
    }

    async fn job(&self, id: &str) -> Result<JobRecord, ApiError> {
        self.lookup(id)
    }

    async fn attempts(&self, id: &str) -> Result<Vec<AttemptRecord>, ApiError> {
        self.lookup(id).map(|_| Vec::new())
    }

    async fn jobs(&self, filter: JobFilter) -> Result<Vec<JobRecord>, ApiError> {
        Ok(self.jobs().values().rev().filter(|job| filter.matches(job)).take(filter.limit).cloned().collect())
    }

    /// Answers at once: the jobs here are started by a running job and run
    /// after it, so waiting inside it would only wait out the limit.
    async fn wait(&self, id: &str, _limit: Duration) -> Result<Waited, ApiError> {
        let job = self.lookup(id)?;
        Ok(if job.status.is_final() { Waited::Ended(job) } else { Waited::StillOpen(job) })
    }

    async fn log_path(&self, id: &str) -> Result<PathBuf, ApiError> {
        self.lookup(id).map(|_| self.inner.log_dir.join(format!("{id}.log")))
    }

    async fn cancel(&self, _id: &str) -> Result<JobRecord, ApiError> {
        Err(ApiError::Conflict(NO_BROKER.to_owned()))
    }

    async fn cancel_run(&self, _run_id: &str) -> Result<Vec<JobRecord>, ApiError> {
        Err(ApiError::Conflict(NO_BROKER.to_owned()))
    }

    async fn retry(&self, _id: &str) -> Result<JobRecord, ApiError> {
        Err(ApiError::Conflict(NO_BROKER.to_owned()))
    }

    async fn progress(&self, id: &str, percent: f64, message: Option<String>) -> Result<(), ApiError> {
        let job = self.lookup(id)?;
        if job.status != Status::Running {
            return Err(ApiError::Conflict(format!("job {id} is {}, not running", job.status)));
        }
        self.inner
            .inbox
            .send(EagerInput::Progress { job_id: id.to_owned(), percent, message })
            .map_err(|_| ApiError::Unavailable("this eager run has ended".to_owned()))
    }

    async fn workers(&self) -> Vec<WorkerView> {
        Vec::new()
    }

    async fn metrics(&self) -> String {
        String::new()
    }

    async fn gates(&self) -> serde_json::Value {
        serde_json::json!([])
    }

    async fn schedules(&self) -> serde_json::Value {
        serde_json::json!([])
    }

    async fn healthy(&self) -> bool {
        !self.inner.inbox.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobz_core::pipeline::JobFacts;

    fn api() -> (EagerApi, mpsc::UnboundedReceiver<EagerInput>) {
        let yaml = "jobs:\n  leaf:\n    command: \"echo {d}\"\n    params:\n      d: { pattern: '^[a-z]$' }\n";
        let file = config::parse("test.yaml", yaml).unwrap_or_else(|e| panic!("{e}"));
        EagerApi::new(Arc::new(file), PathBuf::from("/nonexistent"))
    }

    fn start(job_name: &str, d: &str, parent_id: Option<&str>) -> StartRequest {
        StartRequest {
            job_name: job_name.to_owned(),
            params: BTreeMap::from([("d".to_owned(), d.to_owned())]),
            idempotency_key: None,
            priority: None,
            parent_id: parent_id.map(str::to_owned),
        }
    }

    fn running(api: &EagerApi, id: &str) {
        let job = JobFacts {
            id: id.to_owned(),
            job_name: "leaf".to_owned(),
            params: BTreeMap::new(),
            run_id: "run-1".to_owned(),
            attempt: 1,
        };
        api.observe(&EagerEvent::AttemptStarted { job: &job, parent_id: None });
    }

    #[tokio::test]
    async fn a_start_is_checked_joins_its_callers_run_and_is_handed_to_the_run() {
        let (api, mut inbox) = api();
        running(&api, "caller");
        let started = api.start(start("leaf", "a", Some("caller"))).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((started.job.run_id.as_str(), started.job.parent_id.as_deref()), ("run-1", Some("caller")));
        assert_eq!(started.job.status, Status::Queued);
        match inbox.try_recv() {
            Ok(EagerInput::Start { id, job }) => {
                assert_eq!(id, started.job.id);
                assert_eq!(
                    (job.run_id.as_deref(), job.params.get("d").map(String::as_str)),
                    (Some("run-1"), Some("a"))
                );
            }
            other => panic!("expected the start in the inbox, got {other:?}"),
        }
        assert_eq!(api.job(&started.job.id).await.map(|j| j.status).ok(), Some(Status::Queued));
    }

    #[tokio::test]
    async fn bad_starts_and_progress_are_refused_and_hand_nothing_to_the_run() {
        let (api, mut inbox) = api();
        running(&api, "caller");
        assert!(matches!(api.start(start("nope", "a", None)).await, Err(ApiError::NotFound(_))));
        assert!(
            matches!(api.start(start("leaf", "BAD", None)).await, Err(ApiError::BadParams(e)) if e[0].param == "d")
        );
        assert!(matches!(api.start(start("leaf", "a", Some("stranger"))).await, Err(ApiError::BadRequest(_))));
        let too_high = StartRequest { priority: Some(5000), ..start("leaf", "a", None) };
        assert!(matches!(api.start(too_high).await, Err(ApiError::BadRequest(e)) if e.contains("priority")));
        assert!(matches!(api.progress("stranger", 5.0, None).await, Err(ApiError::NotFound(_))));
        assert!(matches!(api.cancel("caller").await, Err(ApiError::Conflict(_))));
        assert!(inbox.try_recv().is_err(), "nothing reached the run");
        // A queued job is not running: its progress is refused.
        let queued = api.start(start("leaf", "b", None)).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(api.progress(&queued.job.id, 5.0, None).await, Err(ApiError::Conflict(_))));
        // The running one's is passed on.
        assert!(api.progress("caller", 50.0, Some("half".to_owned())).await.is_ok());
        let inputs: Vec<_> = std::iter::from_fn(|| inbox.try_recv().ok()).collect();
        assert!(
            matches!(&inputs[..], [EagerInput::Start { .. }, EagerInput::Progress { job_id, percent, .. }]
            if job_id == "caller" && *percent == 50.0),
            "{inputs:?}"
        );
        // Once the run is over, a start is refused, not lost.
        drop(inbox);
        assert!(matches!(api.start(start("leaf", "c", None)).await, Err(ApiError::Unavailable(_))));
        assert!(!api.healthy().await);
    }
}
