//! `jobz run`: eager mode on the terminal. Prints each job's output as it
//! comes, then a summary tree of the chain; exits 0 only if the named job
//! succeeded.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use worker::eager::{self, EagerConfig, EagerError, EagerEvent, EagerJob, EagerReport};

use crate::cli::{load_config, ConfigArg, EXIT_ERROR, EXIT_FAILURE};
use crate::eager_door::EagerApi;

pub fn run(config: &ConfigArg, name: &str, raw_params: &[String]) -> anyhow::Result<ExitCode> {
    let given = match parse_params(raw_params) {
        Ok(p) => p,
        Err(message) => {
            eprintln!("jobz run: {message}");
            return Ok(ExitCode::from(EXIT_ERROR));
        }
    };
    let file = match load_config(config, true)? {
        Ok(file) => Arc::new(file),
        Err(code) => return Ok(code),
    };
    let log_dir = std::env::temp_dir().join(format!("jobz-run-{}", std::process::id()));
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating the log directory {}", log_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the runtime")?;
    // The run's own front door, for `jobz start` and `jobz progress` in its jobs' steps.
    let (door, inbox) = EagerApi::new(file.clone(), log_dir.clone());
    let stop_door = CancellationToken::new();
    // Without it the run still runs; only its steps' `jobz start` and `jobz progress` have nowhere to go.
    let url = match runtime.block_on(door.serve(stop_door.clone())) {
        Ok(url) => Some(url),
        Err(e) => {
            eprintln!("jobz run: cannot open a loopback port for the jobs' `jobz start` and `jobz progress` ({e}); running without");
            None
        }
    };
    let eager_config = EagerConfig { log_dir: log_dir.clone(), kill_grace: worker::limits::DEFAULT_KILL_GRACE, url };
    let mut printer = Printer::default();
    let result = runtime.block_on(eager::run_with_inbox(&file, name, &given, &eager_config, Some(inbox), |event| {
        door.observe(&event);
        printer.event(event);
    }));
    stop_door.cancel();
    let report = match result {
        Ok(report) => report,
        Err(e @ (EagerError::UnknownJob(_) | EagerError::Params { .. })) => {
            eprintln!("jobz run: {e}");
            return Ok(ExitCode::from(EXIT_ERROR));
        }
        Err(e) => return Err(e).context("running the job"),
    };
    print_summary(&file, &report, &log_dir)?;
    let succeeded = report.root().is_some_and(|j| j.status == jobz_core::Status::Succeeded);
    Ok(if succeeded { ExitCode::SUCCESS } else { ExitCode::from(EXIT_FAILURE) })
}

/// `k=v` words into params; the first `=` splits, so values may contain `=`.
pub fn parse_params(words: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut params = BTreeMap::new();
    for word in words {
        let (k, v) = word.split_once('=').ok_or_else(|| format!("param {word:?} is not of the form key=value"))?;
        if k.is_empty() {
            return Err(format!("param {word:?} has an empty name"));
        }
        if params.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("param {k:?} is given twice"));
        }
    }
    Ok(params)
}

struct Printer {
    /// Whether the last byte written to stdout ended a line.
    at_line_start: bool,
}

impl Default for Printer {
    fn default() -> Printer {
        Printer { at_line_start: true }
    }
}

impl Printer {
    fn event(&mut self, event: EagerEvent<'_>) {
        let mut out = std::io::stdout().lock();
        // Printing is best effort: a closed stdout must not stop the jobs.
        let _ = self.write_event(&mut out, event);
        let _ = out.flush();
    }

    fn write_event(&mut self, out: &mut impl Write, event: EagerEvent<'_>) -> std::io::Result<()> {
        match event {
            EagerEvent::AttemptStarted { job, .. } => {
                self.line_start(out)?;
                writeln!(out, "── {} {} (attempt {})", job.job_name, job.id, job.attempt)?;
                self.at_line_start = true;
            }
            EagerEvent::Output { chunk, .. } => {
                out.write_all(chunk)?;
                if let Some(last) = chunk.last() {
                    self.at_line_start = *last == b'\n';
                }
            }
            EagerEvent::AttemptEnded { job, outcome, retry_in } => {
                self.line_start(out)?;
                if let Some(delay) = retry_in {
                    writeln!(out, "── {} {:?}; retrying in {}", job.job_name, outcome.status, seconds(delay))?;
                }
            }
            EagerEvent::Progress { job, percent, message } => {
                self.line_start(out)?;
                let message = message.map(|m| format!(" {m}")).unwrap_or_default();
                writeln!(out, "── {} {}%{message}", job.job_name, percent.round())?;
            }
            EagerEvent::Problem { message } => {
                self.line_start(out)?;
                writeln!(out, "── problem: {message}")?;
            }
        }
        Ok(())
    }

    fn line_start(&mut self, out: &mut impl Write) -> std::io::Result<()> {
        if !self.at_line_start {
            writeln!(out)?;
            self.at_line_start = true;
        }
        Ok(())
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

fn print_summary(file: &config::JobFile, report: &EagerReport, log_dir: &std::path::Path) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    writeln!(out, "summary (logs in {}):", log_dir.display())?;
    let mut children: BTreeMap<Option<&str>, Vec<&EagerJob>> = BTreeMap::new();
    for job in &report.jobs {
        // A job whose parent is not part of this report shows at the top.
        let parent = job.parent_id.as_deref().filter(|p| report.jobs.iter().any(|j| j.id == *p));
        children.entry(parent).or_default().push(job);
    }
    let roots = children.get(&None).cloned().unwrap_or_default();
    for job in roots {
        print_tree(&mut out, &children, job, "", "")?;
    }
    for (name, gate) in &file.gates {
        let keys = report.gates.keys(name).into_iter().flatten();
        for (key, state) in keys.filter(|(_, s)| s.is_open()) {
            let (done, need) = state.progress(gate);
            writeln!(out, "gate {name} key {key}: still open, {done}/{need} {}", gate.after.join(", "))?;
        }
    }
    if report.truncated {
        writeln!(out, "(the chain was cut short)")?;
    }
    Ok(())
}

fn print_tree(
    out: &mut impl Write,
    children: &BTreeMap<Option<&str>, Vec<&EagerJob>>,
    job: &EagerJob,
    prefix: &str,
    child_prefix: &str,
) -> std::io::Result<()> {
    let attempts = if job.attempts == 1 { "1 attempt".to_string() } else { format!("{} attempts", job.attempts) };
    let via = match &job.origin {
        jobz_core::pipeline::Origin::Gate { gate, key, .. } => format!("  (gate {gate}, key {key})"),
        _ => String::new(),
    };
    let error = job.error.as_deref().map(|e| format!("  error: {e}")).unwrap_or_default();
    writeln!(out, "{prefix}{}  {}  {attempts}  {}{via}{error}", job.job_name, job.status, seconds(job.elapsed))?;
    let kids = children.get(&Some(job.id.as_str())).cloned().unwrap_or_default();
    for (i, kid) in kids.iter().enumerate() {
        let last = i + 1 == kids.len();
        let (p, c) = if last { ("└─ ", "   ") } else { ("├─ ", "│  ") };
        print_tree(out, children, kid, &format!("{child_prefix}{p}"), &format!("{child_prefix}{c}"))?;
    }
    Ok(())
}
