//! The pipeline semantics, in one place: what happens when an attempt ends.
//!
//! Given a job's definition, the facts of the attempt that just ended and a
//! jitter value, [`decide`] answers whether to retry (and after how long) or to
//! finish, and which follow-ups to start with which params, run id and parent.
//! Eager mode, the broker and the semaphore all call this module; none of them
//! re-implements any of it. It does no I/O and reads no clock.

use std::collections::BTreeMap;
use std::time::Duration;

use config::params::{self, ParamError};
use config::template::{FillError, Values};
use config::{FollowUp, JobDef, JobFile, RetryPolicy};

use crate::job::Status;
use crate::limits::{ATTEMPTS_MAX, BACKOFF_MAX};

/// The facts about a job that the pipeline needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFacts {
    pub id: String,
    pub job_name: String,
    pub params: BTreeMap<String, String>,
    pub run_id: String,
    /// 1 for the first attempt.
    pub attempt: u32,
}

impl JobFacts {
    /// The placeholder values of this job: its params and the built-ins
    /// `job_id`, `job_name`, `run_id`, `attempt` (SPEC "Templates").
    pub fn values(&self) -> Values {
        let mut values = self.params.clone();
        values.insert("job_id".into(), self.id.clone());
        values.insert("job_name".into(), self.job_name.clone());
        values.insert("run_id".into(), self.run_id.clone());
        values.insert("attempt".into(), self.attempt.to_string());
        values
    }
}

/// Why a new job was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Started by a client (HTTP, `jobz start`, `jobz run`).
    Start,
    /// An `on_success` follow-up.
    OnSuccess,
    /// An `on_failure` follow-up.
    OnFailure,
    /// Started by a gate for one of its keys.
    Gate { gate: String, key: String, reason: GateReason },
    /// Started by a schedule for one scheduled instant.
    Schedule,
}

/// Which of a gate's jobs was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateReason {
    /// `then`: every upstream success of the key arrived.
    Then,
    /// `on_timeout`: the key was given up.
    Timeout,
    /// `on_failure`: an upstream job of the key failed for good.
    Failure,
}

/// A job to create: the params are already checked against its definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub job_name: String,
    pub params: BTreeMap<String, String>,
    /// `None` for a job that starts a run: its run id is its own id.
    pub run_id: Option<String>,
    pub parent_id: Option<String>,
    pub origin: Origin,
}

/// A follow-up that could not be created; the parent's result stands regardless.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FollowUpError {
    #[error("follow-up {target:?} names a job that is not in the job file")]
    UnknownJob { target: String },
    #[error("follow-up {target:?}: {source}")]
    Fill { target: String, source: FillError },
    #[error("follow-up {target:?}: {}", join_errors(.errors))]
    Params { target: String, errors: Vec<ParamError> },
}

fn join_errors(errors: &[ParamError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// How an attempt ended, as reported by whoever ran it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttemptEnd {
    /// One of the final statuses.
    pub status: Status,
    pub exit_code: Option<i32>,
}

/// What to do after an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run the job again as attempt `attempt` after `delay`.
    Retry { attempt: u32, delay: Duration },
    /// The job is over with `status`; start `follow_ups`.
    Finish { status: Status, follow_ups: Vec<NewJob>, rejected: Vec<FollowUpError> },
}

/// Decides what follows an attempt's end. `jitter` is a number in `[0, 1)`
/// drawn by the caller; it spreads retries of many jobs that failed together.
pub fn decide(file: &JobFile, def: &JobDef, job: &JobFacts, end: AttemptEnd, jitter: f64) -> Decision {
    debug_assert!(end.status.is_final(), "an attempt ends with a final status, not {}", end.status);
    if end.status.is_failure() && job.attempt < attempts_allowed(&def.retries) {
        return Decision::Retry { attempt: job.attempt + 1, delay: backoff_delay(&def.retries, job.attempt, jitter) };
    }
    let (follow_ups, rejected) = follow_ups(file, def, job, end);
    Decision::Finish { status: end.status, follow_ups, rejected }
}

/// How many attempts a job gets in all: the first plus `retries.max`, bounded.
pub fn attempts_allowed(policy: &RetryPolicy) -> u32 {
    policy.max.saturating_add(1).min(ATTEMPTS_MAX)
}

/// The delay before the retry that follows failed attempt `attempt` (1-based):
/// `backoff * 2^(attempt-1)`, capped at [`BACKOFF_MAX`], with "equal jitter":
/// half of it fixed, half of it scaled by `jitter`, so retries never come sooner
/// than half the nominal delay and never bunch up.
pub fn backoff_delay(policy: &RetryPolicy, attempt: u32, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(31);
    let nominal = policy.backoff.saturating_mul(1u32 << exponent).min(BACKOFF_MAX);
    let jitter = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 0.0 };
    let half = nominal / 2;
    half + half.mul_f64(jitter)
}

/// The follow-ups of a job that ended for good with `end`: `on_success` for a
/// success, `on_failure` for a failure or time-out, nothing for a cancel (a
/// cancel stops the run, it does not continue it).
pub fn follow_ups(file: &JobFile, def: &JobDef, job: &JobFacts, end: AttemptEnd) -> (Vec<NewJob>, Vec<FollowUpError>) {
    let (list, origin) = match end.status {
        Status::Succeeded => (&def.on_success, Origin::OnSuccess),
        Status::Failed | Status::TimedOut => (&def.on_failure, Origin::OnFailure),
        Status::Cancelled | Status::Queued | Status::Running => return (Vec::new(), Vec::new()),
    };
    let mut values = job.values();
    values.insert("exit_code".into(), end.exit_code.map(|c| c.to_string()).unwrap_or_default());
    let mut created = Vec::new();
    let mut rejected = Vec::new();
    for follow_up in list {
        match child(file, follow_up, &job.params, &values) {
            Ok(params) => created.push(NewJob {
                job_name: follow_up.job.clone(),
                params,
                run_id: Some(job.run_id.clone()),
                parent_id: Some(job.id.clone()),
                origin: origin.clone(),
            }),
            Err(e) => rejected.push(e),
        }
    }
    (created, rejected)
}

/// The checked params of a child job: `inherited` params that the target
/// declares, overridden by the follow-up's own params filled from `values`.
pub fn child(
    file: &JobFile,
    follow_up: &FollowUp,
    inherited: &BTreeMap<String, String>,
    values: &Values,
) -> Result<BTreeMap<String, String>, FollowUpError> {
    let target =
        file.jobs.get(&follow_up.job).ok_or_else(|| FollowUpError::UnknownJob { target: follow_up.job.clone() })?;
    let mut params = params::retain_declared(target, inherited);
    for (name, template) in &follow_up.params {
        let value =
            template.fill(values).map_err(|source| FollowUpError::Fill { target: follow_up.job.clone(), source })?;
        params.insert(name.clone(), value);
    }
    params::validate(target, &params).map_err(|errors| FollowUpError::Params { target: follow_up.job.clone(), errors })
}

/// The filled `unique` key of a job of `def` with `params` in run `run_id`, or
/// `None` when the job has no `unique`. Declared params that were not given
/// fill as empty strings, as in the command. The key may use the params,
/// `{job_name}` and `{run_id}` (`jobz check` refuses the other built-ins, which
/// a start does not know yet); a job starting a run has its own id as `run_id`.
pub fn unique_key(def: &JobDef, params: &BTreeMap<String, String>, run_id: &str) -> Result<Option<String>, FillError> {
    let Some(unique) = &def.unique else { return Ok(None) };
    let mut values: Values = def.params.keys().map(|name| (name.clone(), String::new())).collect();
    values.extend(params.iter().map(|(k, v)| (k.clone(), v.clone())));
    values.insert("job_name".into(), def.name.clone());
    values.insert("run_id".into(), run_id.to_owned());
    unique.key.fill(&values).map(Some)
}
