//! The job runner: executes one attempt of a job — the optional `before`
//! step, the command, and the optional `after` step — as local processes, and
//! reports how it ended.
//!
//! Workers and the eager mode (`jobz run`) both call [`run`]. The runner knows
//! nothing about YAML, templates or the broker: it receives filled-in argv
//! vectors and returns an [`Outcome`].
//!
//! Guarantees:
//! - Each step runs in a process group of its own, with stdin from
//!   `/dev/null` and stdout and stderr in one pipe.
//! - When a step is over — its main process exited, it timed out or it was
//!   cancelled — nothing is left running in its process group: SIGTERM, a
//!   grace period, SIGKILL (like systemd's `KillMode=control-group`).
//! - Every wait is bounded, except a step with no timeout whose main process
//!   never exits: that is what a job without `timeout` asks for.
//! - A job that cannot start (no such program, bad `cwd`) is a failed
//!   [`Outcome`] whose output says why, not a [`RunError`].

mod group;
mod output;
mod spawn;
mod step;

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::limits;
use output::Sink;
use step::{StepEnd, StepLimits, StopReason};

/// One attempt of a job, ready to run: argv vectors with every placeholder
/// already filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSpec {
    /// Set-up step. If it fails, the command does not run and the job fails.
    pub before: Option<Vec<String>>,
    /// The job's command. `command[0]` is the program, looked up in `PATH`
    /// when it contains no `/`; it runs directly, with no shell.
    pub command: Vec<String>,
    /// Tear-down step. Always runs after the command, also after a failure, a
    /// timeout or a cancel (and cannot itself be cancelled); bounded by
    /// [`limits::AFTER_STEP_TIMEOUT`].
    pub after: Option<Vec<String>>,
    /// Variables added to the environment the worker passes on.
    pub env: Vec<(String, String)>,
    /// Working directory of every step; the worker's own if `None`.
    pub cwd: Option<PathBuf>,
    /// Time limit for `before` and the command together.
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when a step is stopped.
    pub kill_grace: Duration,
    /// File the output of all steps is appended to as it comes, so it can be
    /// followed while it grows. Created if missing; its directory must exist.
    pub log_path: Option<PathBuf>,
}

impl JobSpec {
    /// A spec that runs just `command`, with no steps around it, no limits
    /// and no log file.
    pub fn new(command: Vec<String>) -> JobSpec {
        JobSpec {
            before: None,
            command,
            after: None,
            env: Vec::new(),
            cwd: None,
            timeout: None,
            kill_grace: limits::DEFAULT_KILL_GRACE,
            log_path: None,
        }
    }
}

/// A step of a job attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Before,
    Command,
    After,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::Before => "before",
            Step::Command => "command",
            Step::After => "after",
        })
    }
}

/// How a job attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ended {
    /// Every step ran and exited 0.
    Succeeded,
    /// A step exited non-zero, was killed by a signal it was not sent by the
    /// runner, or could not start; or the `after` step ran out of time.
    Failed,
    /// `before` and the command together ran longer than [`JobSpec::timeout`].
    TimedOut,
    /// The cancellation token was triggered during `before` or the command.
    Cancelled,
}

/// The job status an attempt that ended so leaves behind, before any retry.
impl From<Ended> for jobz_core::Status {
    fn from(ended: Ended) -> jobz_core::Status {
        match ended {
            Ended::Succeeded => jobz_core::Status::Succeeded,
            Ended::Failed => jobz_core::Status::Failed,
            Ended::TimedOut => jobz_core::Status::TimedOut,
            Ended::Cancelled => jobz_core::Status::Cancelled,
        }
    }
}

/// The result of one job attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: Ended,
    /// Exit code of the step named by `failed_step`, or of the command when
    /// nothing failed. `None` when that step was ended by a signal or never
    /// started.
    pub exit_code: Option<i32>,
    /// The signal that ended that same step's main process, if one did (for a
    /// timeout or cancel: SIGTERM, or SIGKILL if the grace ran out).
    pub signal: Option<i32>,
    /// The first step that failed, timed out or was cancelled. A later failure
    /// of `after` does not replace it.
    pub failed_step: Option<Step>,
    /// The last [`limits::OUTPUT_TAIL_BYTES`] of the output (all steps, plus
    /// the runner's own `jobz: ...` lines), as UTF-8 with invalid bytes
    /// replaced, starting at a character boundary.
    pub tail: String,
    /// Bytes of output, the runner's own lines included.
    pub output_bytes: u64,
    pub started_at: SystemTime,
    pub finished_at: SystemTime,
}

impl Outcome {
    pub fn succeeded(&self) -> bool {
        self.status == Ended::Succeeded
    }
}

/// Something that keeps the runner from running a job at all, through no
/// fault of the job.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open job log file {}", path.display())]
    OpenLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A step that did not succeed, and how.
#[derive(Debug, Clone, Copy)]
struct Failure {
    status: Ended,
    step: Step,
    exit_code: Option<i32>,
    signal: Option<i32>,
}

/// Runs one attempt of a job: `before`, then the command if `before`
/// succeeded, then always `after`.
///
/// `cancel` stops `before` or the command (the whole process group, SIGTERM
/// then SIGKILL after `kill_grace`). `output`, if given, receives the output
/// as it comes; a receiver that does not keep up slows the job down (the pipe
/// fills), and one that is dropped stops getting output without affecting
/// the job.
///
/// If the future is dropped before it completes, the running step's process
/// group is killed with SIGKILL and `after` does not run.
pub async fn run(
    spec: &JobSpec,
    cancel: CancellationToken,
    output: Option<mpsc::Sender<Vec<u8>>>,
) -> Result<Outcome, RunError> {
    let started_at = SystemTime::now();
    let mut sink = Sink::open(spec.log_path.as_deref(), output, limits::OUTPUT_TAIL_BYTES).await?;
    // A timeout too large to add to now is no timeout.
    let deadline = spec.timeout.and_then(|timeout| Instant::now().checked_add(timeout));
    let job_limits = StepLimits { deadline, cancel: Some(&cancel), kill_grace: spec.kill_grace };

    let mut failure = None;
    let mut command_status = None;
    let steps = spec.before.iter().map(|argv| (Step::Before, argv)).chain([(Step::Command, &spec.command)]);
    for (step, argv) in steps {
        // A cancel or timeout that came while the previous step was ending
        // must not start the next one.
        let too_late = if cancel.is_cancelled() {
            Some((Ended::Cancelled, "cancelled"))
        } else if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            Some((Ended::TimedOut, "timed out"))
        } else {
            None
        };
        if let Some((status, what)) = too_late {
            sink.line(&format!("jobz: {what} before the {step} step started")).await;
            failure = Some(Failure { status, step, exit_code: None, signal: None });
            break;
        }
        let end = step::run(step, argv, spec, job_limits, &mut sink).await;
        report(&mut sink, step, &end, spec.timeout).await;
        match judge(step, &end) {
            Ok(status) => command_status = Some(status),
            Err(step_failure) => {
                failure = Some(step_failure);
                break;
            }
        }
    }

    if let Some(argv) = &spec.after {
        let after_limits = StepLimits {
            deadline: Instant::now().checked_add(limits::AFTER_STEP_TIMEOUT),
            cancel: None,
            kill_grace: spec.kill_grace,
        };
        let end = step::run(Step::After, argv, spec, after_limits, &mut sink).await;
        report(&mut sink, Step::After, &end, Some(limits::AFTER_STEP_TIMEOUT)).await;
        if let Err(after_failure) = judge(Step::After, &end) {
            failure = failure.or(Some(after_failure));
        }
    }

    let (status, exit_code, signal, failed_step) = match failure {
        Some(failure) => (failure.status, failure.exit_code, failure.signal, Some(failure.step)),
        None => (Ended::Succeeded, command_status.and_then(|status| status.code()), None, None),
    };
    debug_assert!(
        status != Ended::Succeeded || (failed_step.is_none() && exit_code == Some(0)),
        "a succeeded job has no failed step and exit code 0"
    );
    Ok(Outcome {
        status,
        exit_code,
        signal,
        failed_step,
        tail: sink.tail_text(),
        output_bytes: sink.bytes_total(),
        started_at,
        finished_at: SystemTime::now(),
    })
}

/// The exit status of a step that succeeded, or how it failed.
fn judge(step: Step, end: &StepEnd) -> Result<ExitStatus, Failure> {
    let failure = |status, exit_status: Option<&ExitStatus>| Failure {
        status,
        step,
        exit_code: exit_status.and_then(ExitStatus::code),
        signal: exit_status.and_then(ExitStatus::signal),
    };
    match end {
        StepEnd::Exited(status) if status.success() => Ok(*status),
        StepEnd::Exited(status) => Err(failure(Ended::Failed, Some(status))),
        StepEnd::Stopped { reason, status } => {
            let ended = match (reason, step) {
                // The tear-down step has its own limit, not the job's: running
                // out of it is a failure of that step, not a job timeout.
                (StopReason::TimedOut, Step::After) => Ended::Failed,
                (StopReason::TimedOut, _) => Ended::TimedOut,
                (StopReason::Cancelled, _) => Ended::Cancelled,
            };
            Err(failure(ended, status.as_ref()))
        }
        StepEnd::NoStatus => Err(failure(Ended::Failed, None)),
    }
}

/// Writes a line about a step that did not succeed; nothing on success.
async fn report(sink: &mut Sink, step: Step, end: &StepEnd, timeout: Option<Duration>) {
    let line = match end {
        StepEnd::Exited(status) if status.success() => return,
        StepEnd::Exited(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("jobz: {step} step exited {code}"),
            (None, Some(signal)) => format!("jobz: {step} step was killed by signal {signal}"),
            (None, None) => format!("jobz: {step} step ended with {status}"),
        },
        StepEnd::Stopped { reason, status } => {
            let what = match (reason, timeout) {
                (StopReason::TimedOut, Some(timeout)) => format!("timed out after {timeout:?}"),
                (StopReason::TimedOut, None) => "timed out".to_owned(),
                (StopReason::Cancelled, _) => "was cancelled".to_owned(),
            };
            let how = match status.and_then(|status| status.signal()) {
                Some(signal) => format!(", stopped with signal {signal}"),
                None => match status.and_then(|status| status.code()) {
                    Some(code) => format!(", exited {code} when stopped"),
                    None => String::new(),
                },
            };
            format!("jobz: {step} step {what}{how}")
        }
        // The step wrote its own reason.
        StepEnd::NoStatus => return,
    };
    sink.line(&line).await;
}
