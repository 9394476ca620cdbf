//! Eager mode (`jobz run`): a job, its retries, follow-ups and gates, run
//! locally and synchronously, with no broker and no network.
//!
//! It is the mesh in miniature: the same [`jobz_core::pipeline`] decides
//! retries and follow-ups, the same [`jobz_core::gates::GateBook`] counts gate
//! keys, and the same [`crate::runner`] runs each attempt. Jobs run one at a
//! time, first in, first out, so output never interleaves.
//!
//! The jobs it runs may start jobs and report progress (`jobz start` and
//! `jobz progress` in a step): with [`EagerConfig::url`] set they are given it
//! as `JOBZ_URL`, and what arrives there comes in as [`EagerInput`] through
//! [`run_with_inbox`]. A job started from a job joins the caller's run and
//! runs after it, before the caller's follow-ups.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;
use config::params::{self, ParamError};
use config::JobFile;
use jobz_core::command;
use jobz_core::gates::{GateBook, GateEffect, UpstreamEvent};
use jobz_core::pipeline::{self, AttemptEnd, Decision, JobFacts, NewJob, Origin};
use jobz_core::Status;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::limits;
use crate::runner::{self, JobSpec, Outcome};

/// Jobs one eager run may start in all; a chain that goes beyond is cut short,
/// so a misconfigured pipeline cannot run forever.
pub const EAGER_JOBS_MAX: usize = 10_000;

#[derive(Debug, Clone)]
pub struct EagerConfig {
    /// Each attempt's full output is written to `<log_dir>/<job id>.log`.
    pub log_dir: PathBuf,
    pub kill_grace: Duration,
    /// Given to each job as `JOBZ_URL`: where `jobz start` and `jobz progress`
    /// in its steps reach this run. `None` leaves `JOBZ_URL` unset.
    pub url: Option<String>,
}

/// What the jobs of a run send it while they run (see [`run_with_inbox`]).
#[derive(Debug)]
pub enum EagerInput {
    /// A job started from a job, already checked, with the id its starter was given.
    Start { id: String, job: NewJob },
    /// A running job's progress.
    Progress { job_id: String, percent: f64, message: Option<String> },
}

/// Why an eager run could not start.
#[derive(Debug, thiserror::Error)]
pub enum EagerError {
    #[error("no job named {0:?} in the job file")]
    UnknownJob(String),
    #[error("bad params for {job:?}: {}", .errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Params { job: String, errors: Vec<ParamError> },
    #[error(transparent)]
    Run(#[from] runner::RunError),
}

/// One job of an eager run, as it ended.
#[derive(Debug, Clone)]
pub struct EagerJob {
    pub id: String,
    pub job_name: String,
    pub params: BTreeMap<String, String>,
    pub run_id: String,
    pub parent_id: Option<String>,
    pub origin: Origin,
    pub status: Status,
    pub attempts: u32,
    pub exit_code: Option<i32>,
    pub elapsed: Duration,
    /// Why the job could not even be prepared, if so.
    pub error: Option<String>,
}

/// What an eager run reports as it goes.
#[derive(Debug)]
pub enum EagerEvent<'a> {
    AttemptStarted {
        job: &'a JobFacts,
        /// The job that started this one: its follow-up's, gate's or `jobz start`'s caller.
        parent_id: Option<&'a str>,
    },
    /// The running job reported its progress.
    Progress {
        job: &'a JobFacts,
        percent: f64,
        message: Option<&'a str>,
    },
    Output {
        job: &'a JobFacts,
        chunk: &'a [u8],
    },
    AttemptEnded {
        job: &'a JobFacts,
        outcome: &'a Outcome,
        retry_in: Option<Duration>,
    },
    /// A follow-up or gate job that could not be created, and why.
    Problem {
        message: String,
    },
}

/// The whole run: every job in the order it ran, and the gates' books.
#[derive(Debug)]
pub struct EagerReport {
    pub jobs: Vec<EagerJob>,
    pub gates: GateBook,
    /// True when [`EAGER_JOBS_MAX`] cut the chain short.
    pub truncated: bool,
}

impl EagerReport {
    /// The job that was asked for.
    pub fn root(&self) -> Option<&EagerJob> {
        self.jobs.first()
    }
}

/// Runs `name` with `given` params and everything that follows from it.
pub async fn run(
    file: &JobFile,
    name: &str,
    given: &BTreeMap<String, String>,
    config: &EagerConfig,
    report: impl FnMut(EagerEvent<'_>),
) -> Result<EagerReport, EagerError> {
    run_with_inbox(file, name, given, config, None, report).await
}

/// [`run`], also taking the starts and progress its jobs send from `inbox`.
/// A start that comes while a job runs is queued after that job, before its
/// follow-ups; one that comes between jobs, at the end of the queue.
pub async fn run_with_inbox(
    file: &JobFile,
    name: &str,
    given: &BTreeMap<String, String>,
    config: &EagerConfig,
    mut inbox: Option<mpsc::UnboundedReceiver<EagerInput>>,
    mut report: impl FnMut(EagerEvent<'_>),
) -> Result<EagerReport, EagerError> {
    let def = file.jobs.get(name).ok_or_else(|| EagerError::UnknownJob(name.to_string()))?;
    let params = params::validate(def, given).map_err(|errors| EagerError::Params { job: name.to_string(), errors })?;
    let mut queue = VecDeque::from([(
        None,
        NewJob { job_name: name.to_string(), params, run_id: None, parent_id: None, origin: Origin::Start },
    )]);
    let mut jobs = Vec::new();
    let mut gates = GateBook::new();
    let mut truncated = false;
    while let Some((id, new)) = queue.pop_front() {
        if jobs.len() >= EAGER_JOBS_MAX {
            truncated = true;
            report(EagerEvent::Problem {
                message: format!("stopped after {EAGER_JOBS_MAX} jobs; the rest did not run"),
            });
            break;
        }
        let (ended, started, follow_ups) = run_job(file, id, new, config, &mut inbox, &mut report).await?;
        queue.extend(started);
        // Starts sent just before the job's processes ended may still be on their way in.
        while let Some(input) = inbox.as_mut().and_then(|rx| rx.try_recv().ok()) {
            if let EagerInput::Start { id, job } = input {
                queue.push_back((Some(id), job));
            }
        }
        queue.extend(follow_ups.into_iter().map(|job| (None, job)));
        let facts = JobFacts {
            id: ended.id.clone(),
            job_name: ended.job_name.clone(),
            params: ended.params.clone(),
            run_id: ended.run_id.clone(),
            attempt: ended.attempts,
        };
        let event = match ended.status {
            Status::Succeeded => Some(UpstreamEvent::Succeeded(facts)),
            Status::Failed | Status::TimedOut => Some(UpstreamEvent::FailedForGood(facts)),
            Status::Cancelled | Status::Queued | Status::Running => None,
        };
        if let Some(event) = event {
            for effect in gates.observe(file, &event, Utc::now()) {
                match effect {
                    GateEffect::Start(job) => queue.push_back((None, job)),
                    GateEffect::KeyError { message, .. } => report(EagerEvent::Problem { message }),
                }
            }
        }
        jobs.push(ended);
    }
    Ok(EagerReport { jobs, gates, truncated })
}

/// Jobs started from a job, with the ids their starters were given.
type Started = Vec<(Option<String>, NewJob)>;

/// Runs every attempt of one job (with id `id`, or a fresh one); returns how
/// it ended for good, the jobs it started, and the follow-ups to start.
async fn run_job(
    file: &JobFile,
    id: Option<String>,
    new: NewJob,
    config: &EagerConfig,
    inbox: &mut Option<mpsc::UnboundedReceiver<EagerInput>>,
    report: &mut impl FnMut(EagerEvent<'_>),
) -> Result<(EagerJob, Started, Vec<NewJob>), EagerError> {
    let id = id.unwrap_or_else(jobz_core::ids::new_id);
    let run_id = new.run_id.clone().unwrap_or_else(|| id.clone());
    let mut facts = JobFacts { id, job_name: new.job_name.clone(), params: new.params.clone(), run_id, attempt: 1 };
    let started = Instant::now();
    let mut ended = EagerJob {
        id: facts.id.clone(),
        job_name: new.job_name,
        params: new.params,
        run_id: facts.run_id.clone(),
        parent_id: new.parent_id,
        origin: new.origin,
        status: Status::Failed,
        attempts: 0,
        exit_code: None,
        elapsed: Duration::ZERO,
        error: None,
    };
    let Some(def) = file.jobs.get(&ended.job_name) else {
        ended.error = Some(format!("no job named {:?} in the job file", ended.job_name));
        return Ok((ended, Vec::new(), Vec::new()));
    };
    let mut follow_ups = Vec::new();
    let mut started_jobs = Vec::new();
    loop {
        ended.attempts = facts.attempt;
        let prepared = match command::prepare(def, &facts, config.url.as_deref()) {
            Ok(p) => p,
            Err(e) => {
                ended.error = Some(e.to_string());
                report(EagerEvent::Problem { message: format!("{} {}: {e}", facts.job_name, facts.id) });
                break;
            }
        };
        let spec = JobSpec {
            before: prepared.before,
            command: prepared.command,
            after: prepared.after,
            env: eager_env(prepared.env, config),
            cwd: def.cwd.clone(),
            timeout: def.timeout,
            kill_grace: config.kill_grace,
            log_path: Some(config.log_dir.join(format!("{}.log", facts.id))),
        };
        report(EagerEvent::AttemptStarted { job: &facts, parent_id: ended.parent_id.as_deref() });
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(limits::OUTPUT_CHANNEL_CAPACITY);
        let running = runner::run(&spec, CancellationToken::new(), Some(tx));
        tokio::pin!(running);
        let outcome = loop {
            tokio::select! {
                outcome = &mut running => break outcome?,
                Some(chunk) = rx.recv() => report(EagerEvent::Output { job: &facts, chunk: &chunk }),
                input = next_input(inbox) => match input {
                    Some(EagerInput::Start { id, job }) => started_jobs.push((Some(id), job)),
                    Some(EagerInput::Progress { job_id, percent, message }) if job_id == facts.id => {
                        report(EagerEvent::Progress { job: &facts, percent, message: message.as_deref() });
                    }
                    // Progress of a job that is not running: the front door refuses that; nothing to show.
                    Some(EagerInput::Progress { .. }) => {}
                    // Nobody can send any more.
                    None => *inbox = None,
                },
            }
        };
        while let Ok(chunk) = rx.try_recv() {
            report(EagerEvent::Output { job: &facts, chunk: &chunk });
        }
        let status = Status::from(outcome.status);
        ended.status = status;
        ended.exit_code = outcome.exit_code;
        let end = AttemptEnd { status, exit_code: outcome.exit_code };
        match pipeline::decide(file, def, &facts, end, jobz_core::ids::jitter(&facts)) {
            Decision::Retry { attempt, delay } => {
                report(EagerEvent::AttemptEnded { job: &facts, outcome: &outcome, retry_in: Some(delay) });
                tokio::time::sleep(delay).await;
                facts.attempt = attempt;
            }
            Decision::Finish { follow_ups: created, rejected, .. } => {
                report(EagerEvent::AttemptEnded { job: &facts, outcome: &outcome, retry_in: None });
                for e in rejected {
                    report(EagerEvent::Problem { message: format!("{} {}: {e}", facts.job_name, facts.id) });
                }
                follow_ups = created;
                break;
            }
        }
    }
    ended.elapsed = started.elapsed();
    Ok((ended, started_jobs, follow_ups))
}

/// Set for the processes of an eager run's jobs, so that `jobz start --wait`
/// in a step can say at once that it would wait for ever: the job it starts
/// runs after the step's own job has ended.
pub const EAGER_ENV: &str = "JOBZ_EAGER";

/// A job's environment in an eager run: [`EAGER_ENV`] added when the run has a front door.
fn eager_env(mut env: Vec<(String, String)>, config: &EagerConfig) -> Vec<(String, String)> {
    if config.url.is_some() {
        env.push((EAGER_ENV.to_owned(), "1".to_owned()));
    }
    env
}

/// The next input from `inbox`; never, without one.
async fn next_input(inbox: &mut Option<mpsc::UnboundedReceiver<EagerInput>>) -> Option<EagerInput> {
    match inbox {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
