//! The client commands of SPEC "Processes" (`jobz start`, `status`, `logs`,
//! `cancel`, `retry`, `ls`, `workers`, `gates`, `schedules`, `progress`):
//! each is one or a few calls to the HTTP front door.
//!
//! Output: results go to stdout (an id, a table, a log, the job's output);
//! progress and errors go to stderr. `--json` prints the server's JSON as it
//! came, pretty-printed with its keys in the server's order.
//!
//! Exit codes: 0 done (for `start --wait`: the job succeeded); 1 the job did
//! not succeed, or the front door could not do it (409 conflict, 429 busy,
//! 5xx, unreachable, timed out); 2 the request was refused as bad and changed
//! nothing (400 bad params, 401/403 no token or out of scope, 404 unknown job
//! or id, 413/431 too large, a refused TLS handshake) or the command line was
//! wrong. Errors print the server's `error` message (and each
//! bad param) as `jobz: ...`.
//!
//! Inside a job, `JOBZ_JOB_ID` is set: `jobz start` sends it as
//! `Jobz-Parent-Id` (the new job joins the caller's run) and `jobz progress`
//! reports for that job. The token (`--token` or `JOBZ_TOKEN`) is sent as a
//! bearer token; `https://` URLs take `--cacert`, `--cert` and `--key` (or
//! `JOBZ_CACERT`, `JOBZ_CERT`, `JOBZ_KEY`), which a worker's jobs inherit from
//! the worker's environment. A refusal for want of a token or scope (401, 403)
//! or a failed TLS handshake exits 2: nothing was done.

mod http;
mod render;
mod tls;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use broker::http::wire::{JobList, JobView, WorkerList};
use broker::http::PARENT_ID;
use chrono::Utc;
use hyper::Method;
use jobz_core::Status;

use crate::cli::{EXIT_ERROR, EXIT_FAILURE};
pub use http::{ClientOptions, Failure, HttpClient};
pub use tls::ClientTls;

/// The first pause between two polls of a followed job or log; it grows while nothing changes.
const POLL_FIRST: Duration = Duration::from_millis(200);
/// The longest pause between two polls.
const POLL_MAX: Duration = Duration::from_secs(2);
/// A followed job keeps being polled through a front door outage (a broker restart)
/// this long before the command gives up.
const UNREACHABLE_MAX: Duration = Duration::from_secs(60);
/// The `--wait` line is cut to this many characters when the terminal's width is unknown.
const TERMINAL_WIDTH_DEFAULT: usize = 100;

/// Where a command writes: results to `out`, progress and errors to `err`.
pub struct Io<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
    /// A terminal gets one line redrawn in place; anything else gets a line per change.
    pub err_is_terminal: bool,
}

/// `jobz start NAME [k=v ...] [--wait]`.
pub fn start(front: &ClientOptions, name: &str, params: &[String], wait: bool, json: bool) -> anyhow::Result<ExitCode> {
    let parent = job_id_from_env();
    execute(front, async |client, io| start_with(client, name, params, parent, wait, json, io).await)
}

/// `jobz status ID`.
pub fn status(front: &ClientOptions, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    execute(front, async |client, io| status_with(client, id, json, io).await)
}

/// `jobz logs ID [--follow]`.
pub fn logs(front: &ClientOptions, id: &str, follow: bool) -> anyhow::Result<ExitCode> {
    execute(front, async |client, io| logs_with(client, id, follow, io).await)
}

/// `jobz cancel ID`.
pub fn cancel(front: &ClientOptions, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    execute(front, async |client, io| change_with(client, id, "cancel", json, io).await)
}

/// `jobz retry ID`.
pub fn retry(front: &ClientOptions, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    execute(front, async |client, io| change_with(client, id, "retry", json, io).await)
}

/// `jobz ls [--status S] [--job NAME]`.
pub fn ls(front: &ClientOptions, status: Option<&str>, job: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    execute(front, async |client, io| ls_with(client, status, job, json, io).await)
}

/// `jobz workers`.
pub fn workers(front: &ClientOptions, json: bool) -> anyhow::Result<ExitCode> {
    execute(front, async |client, io| workers_with(client, json, io).await)
}

/// `jobz gates`.
pub fn gates(front: &ClientOptions, json: bool) -> anyhow::Result<ExitCode> {
    execute(front, async |client, io| gates_with(client, json, io).await)
}

/// `jobz schedules`.
pub fn schedules(front: &ClientOptions, json: bool) -> anyhow::Result<ExitCode> {
    execute(front, async |client, io| schedules_with(client, json, io).await)
}

/// `jobz progress PERCENT [MESSAGE]`, inside a job.
pub fn progress(front: &ClientOptions, percent: f64, message: Option<&str>) -> anyhow::Result<ExitCode> {
    let id = job_id_from_env();
    execute(front, async |client, _io| progress_with(client, id.as_deref(), percent, message).await)
}

/// `JOBZ_JOB_ID`, set by the worker for the job's process.
fn job_id_from_env() -> Option<String> {
    std::env::var("JOBZ_JOB_ID").ok().filter(|id| !id.is_empty())
}

/// Runs one command on a single-threaded runtime with stdout and stderr, and turns
/// its failure into a message and an exit code.
fn execute(
    front: &ClientOptions,
    command: impl AsyncFnOnce(&HttpClient, &mut Io<'_>) -> Result<u8, Failure>,
) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let err_is_terminal = err.is_terminal();
    let mut io = Io { out: &mut out, err: &mut err, err_is_terminal };
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the client runtime")?;
    let result = runtime.block_on(async {
        let client = HttpClient::new(front)?;
        command(&client, &mut io).await
    });
    conclude(result, io.err).map(ExitCode::from)
}

/// A command's exit code; a failure is printed as `jobz: ...` first. Failing to write our
/// own output is an error for `main` (which treats a closed pipe as success).
fn conclude(result: Result<u8, Failure>, err: &mut dyn Write) -> anyhow::Result<u8> {
    match result {
        Ok(code) => Ok(code),
        Err(Failure::Output(e)) => Err(anyhow::Error::new(e).context("writing output")),
        Err(failure) => {
            writeln!(err, "jobz: {failure}").context("writing to stderr")?;
            Ok(exit_code(&failure))
        }
    }
}

/// See the module docs: 2 when the request was refused as bad, 1 otherwise.
fn exit_code(failure: &Failure) -> u8 {
    match failure {
        Failure::Usage(_) | Failure::Tls { .. } => EXIT_ERROR,
        Failure::Refused { status, .. } if matches!(status.as_u16(), 400 | 401 | 403 | 404 | 405 | 413 | 414 | 431) => {
            EXIT_ERROR
        }
        _ => EXIT_FAILURE,
    }
}

const SUCCESS: u8 = 0;

/// `k=v` arguments as params; a missing `=` or a key given twice is a usage error.
fn parse_params(params: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    let mut parsed = BTreeMap::new();
    for param in params {
        let Some((key, value)) = param.split_once('=').filter(|(key, _)| !key.is_empty()) else {
            return Err(Failure::Usage(format!("{param:?} is not a param: write key=value")));
        };
        if parsed.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(Failure::Usage(format!("param {key:?} is given more than once")));
        }
    }
    Ok(parsed)
}

fn job_path(id: &str) -> String {
    format!("/jobs/{}", http::encode(id))
}

fn bad_answer(client: &HttpClient, reason: impl std::fmt::Display) -> Failure {
    Failure::BadAnswer { url: client.base().to_owned(), reason: reason.to_string() }
}

fn parse_view<T: serde::de::DeserializeOwned>(client: &HttpClient, value: serde_json::Value) -> Result<T, Failure> {
    serde_json::from_value(value).map_err(|e| bad_answer(client, e))
}

/// Starts a job; with `wait`, follows it to its end.
pub async fn start_with(
    client: &HttpClient,
    name: &str,
    params: &[String],
    parent: Option<String>,
    wait: bool,
    json: bool,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let params = parse_params(params)?;
    if wait && parent.is_some() && std::env::var_os(worker::eager::EAGER_ENV).is_some() {
        return Err(Failure::Usage(
            "in eager mode (`jobz run`) a job started from a job runs after the calling job ends, so --wait \
             inside it would wait for ever; start it without --wait"
                .to_owned(),
        ));
    }
    let body = serde_json::json!({ "job_name": name, "params": params });
    let headers: Vec<_> = parent.into_iter().map(|id| (PARENT_ID, id)).collect();
    let answer = client.json(Method::POST, "/job_start", &headers, Some(body.to_string().into_bytes())).await?;
    let id = answer.value["id"].as_str().ok_or_else(|| bad_answer(client, "the start answer has no id"))?.to_owned();
    let deduplicated = answer.value["deduplicated"] == serde_json::Value::Bool(true);
    if !wait {
        if json {
            writeln!(io.out, "{}", render::pretty_json(&answer.raw))?;
        } else {
            writeln!(io.out, "{id}")?;
        }
        if deduplicated && !json {
            writeln!(
                io.err,
                "jobz: job {id} already existed (same unique key or Idempotency-Key); nothing new started"
            )?;
        }
        return Ok(SUCCESS);
    }
    if !json {
        writeln!(io.err, "jobz: job {id} started")?;
    }
    let started = Instant::now();
    let (view, raw) = follow(client, &id, !json, io).await?;
    if json {
        writeln!(io.out, "{}", render::pretty_json(&raw))?;
    } else {
        io.out.write_all(view.output.as_bytes())?;
        io.out.flush()?;
        let mut summary = format!("jobz: job {id} {} after {}", view.status, render::elapsed(started.elapsed()));
        if let Some(code) = view.exit_code {
            summary.push_str(&format!(", exit code {code}"));
        }
        if let Some(signal) = view.signal {
            summary.push_str(&format!(", signal {signal}"));
        }
        if let Some(error) = &view.error {
            summary.push_str(&format!(": {error}"));
        }
        writeln!(io.err, "{summary}")?;
    }
    Ok(if view.status == Status::Succeeded { SUCCESS } else { EXIT_FAILURE })
}

/// Polls job `id` until it is final; shows its progress on `io.err` when `show` is set.
/// Returns the final view and the server's JSON for it.
async fn follow(
    client: &HttpClient,
    id: &str,
    show: bool,
    io: &mut Io<'_>,
) -> Result<(JobView, bytes::Bytes), Failure> {
    let started = Instant::now();
    let width = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).unwrap_or(TERMINAL_WIDTH_DEFAULT);
    let mut trail: Vec<Status> = Vec::new();
    let mut shown: Option<String> = None;
    let mut interval = POLL_FIRST;
    let mut outage = Outage::default();
    loop {
        match client.json(Method::GET, &job_path(id), &[], None).await {
            Ok(answer) => {
                outage.over();
                let view: JobView = parse_view(client, answer.value)?;
                if trail.last() != Some(&view.status) {
                    trail.push(view.status);
                }
                let progress = match &view.held_by {
                    Some(hold) => format!("(held by {})", hold.message),
                    None => render::progress(view.progress.as_ref()),
                };
                let state = format!("{} {progress}", view.status).trim_end().to_owned();
                let changed = shown.as_deref() != Some(state.as_str());
                if show && io.err_is_terminal {
                    let line = render::fit(&render::wait_line(&trail, &progress, started.elapsed()), width);
                    write!(io.err, "\r\x1b[2K{line}")?;
                    if view.status.is_final() {
                        // Leave the terminal on a fresh line for the summary.
                        write!(io.err, "\r\x1b[2K")?;
                    }
                    io.err.flush()?;
                } else if show && changed && !view.status.is_final() {
                    writeln!(io.err, "jobz: job {id} {state}")?;
                }
                if view.status.is_final() {
                    return Ok((view, answer.raw));
                }
                interval = if changed { POLL_FIRST } else { (interval * 3 / 2).min(POLL_MAX) };
                shown = Some(state);
            }
            Err(failure @ (Failure::Unreachable { .. } | Failure::TimedOut { .. })) => {
                if outage.give_up() {
                    return Err(failure);
                }
                if show && outage.first() {
                    writeln!(io.err, "\njobz: {failure}; retrying for up to {}s", UNREACHABLE_MAX.as_secs())?;
                }
                interval = POLL_MAX;
            }
            Err(other) => return Err(other),
        }
        tokio::time::sleep(interval).await;
    }
}

/// Tracks a front door outage while following, so it is retried for a bounded time.
#[derive(Default)]
struct Outage {
    since: Option<Instant>,
    reported: bool,
}

impl Outage {
    fn over(&mut self) {
        *self = Outage::default();
    }

    /// True once the outage has lasted longer than [`UNREACHABLE_MAX`].
    fn give_up(&mut self) -> bool {
        self.since.get_or_insert_with(Instant::now).elapsed() > UNREACHABLE_MAX
    }

    /// True the first time it is asked during an outage.
    fn first(&mut self) -> bool {
        !std::mem::replace(&mut self.reported, true)
    }
}

/// Shows one job.
pub async fn status_with(client: &HttpClient, id: &str, json: bool, io: &mut Io<'_>) -> Result<u8, Failure> {
    let answer = client.json(Method::GET, &job_path(id), &[], None).await?;
    if json {
        writeln!(io.out, "{}", render::pretty_json(&answer.raw))?;
    } else {
        let view: JobView = parse_view(client, answer.value)?;
        write!(io.out, "{}", render::job(&view))?;
    }
    Ok(SUCCESS)
}

/// Prints a job's log; with `follow`, keeps printing what is added until the job is final
/// and the log is drained.
pub async fn logs_with(client: &HttpClient, id: &str, follow: bool, io: &mut Io<'_>) -> Result<u8, Failure> {
    let mut offset = 0u64;
    let mut interval = POLL_FIRST;
    let mut outage = Outage::default();
    loop {
        let piece = match client.log(id, offset, io.out).await {
            Ok(piece) => piece,
            Err(failure @ (Failure::Unreachable { .. } | Failure::TimedOut { .. })) if follow => {
                // Nothing of this request was written, so asking again from `offset` repeats nothing.
                if outage.give_up() {
                    return Err(failure);
                }
                if outage.first() {
                    writeln!(io.err, "jobz: {failure}; retrying for up to {}s", UNREACHABLE_MAX.as_secs())?;
                }
                tokio::time::sleep(POLL_MAX).await;
                continue;
            }
            Err(failure) => return Err(failure),
        };
        outage.over();
        offset = piece.next_offset.unwrap_or(offset + piece.written);
        if !follow {
            return Ok(SUCCESS);
        }
        // The status was read before the log: once it is final, this answer held the rest.
        let status = piece.status.as_deref().map(str::parse::<Status>);
        match status {
            Some(Ok(status)) if status.is_final() => return Ok(SUCCESS),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(bad_answer(client, e)),
            None => return Err(bad_answer(client, "the log answer has no Jobz-Job-Status header to follow by")),
        }
        interval = if piece.written > 0 { POLL_FIRST } else { (interval * 3 / 2).min(POLL_MAX) };
        tokio::time::sleep(interval).await;
    }
}

/// `cancel` or `retry` one job: POST `/jobs/{id}/{action}`.
pub async fn change_with(
    client: &HttpClient,
    id: &str,
    action: &str,
    json: bool,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let path = format!("{}/{action}", job_path(id));
    let answer = client.json(Method::POST, &path, &[], None).await?;
    if json {
        writeln!(io.out, "{}", render::pretty_json(&answer.raw))?;
    } else {
        let view: JobView = parse_view(client, answer.value)?;
        writeln!(io.out, "{} {}", view.id, view.status)?;
    }
    Ok(SUCCESS)
}

/// Lists jobs, newest first.
pub async fn ls_with(
    client: &HttpClient,
    status: Option<&str>,
    job: Option<&str>,
    json: bool,
    io: &mut Io<'_>,
) -> Result<u8, Failure> {
    let mut query = Vec::new();
    if let Some(status) = status {
        query.push(format!("status={}", http::encode(status)));
    }
    if let Some(job) = job {
        query.push(format!("job_name={}", http::encode(job)));
    }
    let path = if query.is_empty() { "/jobs".to_owned() } else { format!("/jobs?{}", query.join("&")) };
    let answer = client.json(Method::GET, &path, &[], None).await?;
    if json {
        writeln!(io.out, "{}", render::pretty_json(&answer.raw))?;
        return Ok(SUCCESS);
    }
    let list: JobList = parse_view(client, answer.value)?;
    let rows: Vec<Vec<String>> = list
        .jobs
        .iter()
        .map(|job| {
            vec![
                job.id.clone(),
                job.job_name.clone(),
                job.status.to_string(),
                job.attempts.to_string(),
                render::time(Some(&job.created_at)),
                render::time(job.finished_at.as_ref()),
            ]
        })
        .collect();
    write!(io.out, "{}", render::table(&["ID", "JOB", "STATUS", "ATTEMPTS", "CREATED", "FINISHED"], &rows))?;
    Ok(SUCCESS)
}

/// Lists connected workers; DRIFT names the jobs whose definition differs from the broker's.
pub async fn workers_with(client: &HttpClient, json: bool, io: &mut Io<'_>) -> Result<u8, Failure> {
    let answer = client.json(Method::GET, "/workers", &[], None).await?;
    if json {
        writeln!(io.out, "{}", render::pretty_json(&answer.raw))?;
        return Ok(SUCCESS);
    }
    let list: WorkerList = parse_view(client, answer.value)?;
    let now = Utc::now();
    let rows: Vec<Vec<String>> = list
        .workers
        .iter()
        .map(|worker| {
            let names = |drifted: bool| {
                let names: Vec<&str> =
                    worker.jobs.iter().filter(|j| j.matches != drifted).map(|j| j.name.as_str()).collect();
                if names.is_empty() {
                    "-".to_owned()
                } else {
                    names.join(",")
                }
            };
            vec![
                worker.name.clone(),
                worker.host.clone(),
                format!("{}/{}", worker.running, worker.concurrency),
                names(false),
                render::ago(&worker.last_heartbeat, &now),
                names(true),
            ]
        })
        .collect();
    write!(io.out, "{}", render::table(&["NAME", "HOST", "RUNNING", "JOBS", "LAST HEARTBEAT", "DRIFT"], &rows))?;
    Ok(SUCCESS)
}

/// `gates`: a row per key of each gate (see [`render::gates_table`]); a
/// table of whatever objects the answer holds under `"gates"` when they are
/// not gates as this client knows them; else pretty JSON.
pub async fn gates_with(client: &HttpClient, json: bool, io: &mut Io<'_>) -> Result<u8, Failure> {
    let answer = client.json(Method::GET, "/gates", &[], None).await?;
    let table = match answer.value.get("gates").and_then(|v| v.as_array()) {
        Some(items) if !json && items.is_empty() => Some(String::new()),
        Some(items) if !json => render::gates_table(items).or_else(|| render::object_table(items)),
        _ => None,
    };
    match table {
        Some(table) if table.is_empty() => writeln!(io.err, "jobz: no gates")?,
        Some(table) => write!(io.out, "{table}")?,
        None => writeln!(io.out, "{}", render::pretty_json(&answer.raw))?,
    }
    Ok(SUCCESS)
}

/// Lists schedules: each one's next instant, its last fire and the job that started.
pub async fn schedules_with(client: &HttpClient, json: bool, io: &mut Io<'_>) -> Result<u8, Failure> {
    let answer = client.json(Method::GET, "/schedules", &[], None).await?;
    if json {
        writeln!(io.out, "{}", render::pretty_json(&answer.raw))?;
        return Ok(SUCCESS);
    }
    match answer.value.get("schedules").and_then(|v| v.as_array()) {
        Some(items) if items.is_empty() => writeln!(io.err, "jobz: no schedules")?,
        Some(items) => write!(io.out, "{}", render::schedules_table(items))?,
        None => writeln!(io.out, "{}", render::pretty_json(&answer.raw))?,
    }
    Ok(SUCCESS)
}

/// Reports progress for job `id` (the job this runs in).
pub async fn progress_with(
    client: &HttpClient,
    id: Option<&str>,
    percent: f64,
    message: Option<&str>,
) -> Result<u8, Failure> {
    let id = id.ok_or_else(|| {
        Failure::Usage("jobz progress reports for the job it runs in, and JOBZ_JOB_ID is not set".to_owned())
    })?;
    if !(0.0..=100.0).contains(&percent) {
        return Err(Failure::Usage(format!("progress is a percentage from 0 to 100, not {percent}")));
    }
    let body = serde_json::json!({ "percent": percent, "message": message });
    let path = format!("{}/progress", job_path(id));
    client.json(Method::POST, &path, &[], Some(body.to_string().into_bytes())).await?;
    Ok(SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker::handle::{ServedJob, WorkerView};
    use broker::http::memory::MemoryApi;
    use broker::http::{serve, HttpOptions};
    use tokio_util::sync::CancellationToken;

    /// The longest any step of a test may take.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// A front door over a `MemoryApi` on 127.0.0.1, stopped when dropped.
    struct FrontDoor {
        api: MemoryApi,
        client: HttpClient,
        shutdown: CancellationToken,
        _logs: tempfile::TempDir,
    }

    impl Drop for FrontDoor {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    async fn front_door() -> FrontDoor {
        let logs = tempfile::tempdir().unwrap();
        let api = MemoryApi::new(logs.path());
        api.declare("hello", &["who"]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, api.clone(), HttpOptions::default(), shutdown.clone()));
        FrontDoor { api, client: HttpClient::new(&ClientOptions::plain(&url)).unwrap(), shutdown, _logs: logs }
    }

    /// What a command printed, and its exit code.
    struct Ran {
        code: u8,
        out: String,
        err: String,
    }

    /// Runs a command against buffers as `main` would (a failure becomes `jobz: ...` on err).
    async fn run(command: impl AsyncFnOnce(&mut Io<'_>) -> Result<u8, Failure>) -> Ran {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut io = Io { out: &mut out, err: &mut err, err_is_terminal: false };
        let result = tokio::time::timeout(DEADLINE, command(&mut io)).await.expect("the command ends in time");
        let code = conclude(result, &mut err).unwrap();
        Ran { code, out: String::from_utf8(out).unwrap(), err: String::from_utf8(err).unwrap() }
    }

    fn params(list: &[&str]) -> Vec<String> {
        list.iter().map(|p| (*p).to_owned()).collect()
    }

    #[tokio::test]
    async fn start_prints_the_id_and_sends_params_and_the_parent() {
        let door = front_door().await;
        let ran =
            run(async |io| start_with(&door.client, "hello", &params(&["who=a b"]), None, false, false, io).await)
                .await;
        assert_eq!((ran.code, ran.out.as_str()), (0, "job-000001\n"), "{}", ran.err);
        let parent = Some("job-000001".to_owned());
        let ran = run(async |io| start_with(&door.client, "hello", &[], parent, false, false, io).await).await;
        assert_eq!(ran.code, 0, "{}", ran.err);
        let starts = door.api.starts();
        assert_eq!(starts[0].params["who"], "a b");
        assert_eq!(starts[1].parent_id.as_deref(), Some("job-000001"));
        assert_eq!(door.api.get("job-000002").unwrap().run_id, "job-000001");
    }

    #[tokio::test]
    async fn start_json_prints_the_servers_json_in_its_order() {
        let door = front_door().await;
        let ran = run(async |io| start_with(&door.client, "hello", &[], None, false, true, io).await).await;
        assert!(ran.out.starts_with("{\n  \"id\": \"job-000001\",\n  \"job_name\": \"hello\""), "{}", ran.out);
    }

    #[tokio::test]
    async fn start_wait_follows_to_success_prints_the_output_and_exits_0() {
        let door = front_door().await;
        door.api.finish_after_start(Some((Status::Succeeded, Duration::from_millis(400))));
        let ran = run(async |io| start_with(&door.client, "hello", &[], None, true, false, io).await).await;
        assert_eq!(ran.code, 0, "{}", ran.err);
        assert_eq!(ran.out, "succeeded\n");
        assert!(ran.err.contains("jobz: job job-000001 running"), "{}", ran.err);
        assert!(ran.err.contains("job job-000001 succeeded after"), "{}", ran.err);
    }

    #[tokio::test]
    async fn start_wait_exits_1_when_the_job_fails() {
        let door = front_door().await;
        door.api.finish_after_start(Some((Status::Failed, Duration::from_millis(50))));
        let ran = run(async |io| start_with(&door.client, "hello", &[], None, true, false, io).await).await;
        assert_eq!(ran.code, 1, "{}", ran.err);
        assert!(ran.err.contains("failed after") && ran.err.contains("exit code 1"), "{}", ran.err);
    }

    #[tokio::test]
    async fn start_wait_on_a_terminal_redraws_one_line() {
        let door = front_door().await;
        door.api.finish_after_start(Some((Status::Succeeded, Duration::from_millis(300))));
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut io = Io { out: &mut out, err: &mut err, err_is_terminal: true };
        let code = start_with(&door.client, "hello", &[], None, true, false, &mut io).await.unwrap();
        assert_eq!(code, 0);
        let err = String::from_utf8(err).unwrap();
        assert!(err.contains("\r\x1b[2Krunning ("), "{err:?}");
        assert!(!err.contains("jobz: job job-000001 running"), "{err:?}");
    }

    #[tokio::test]
    async fn refusals_print_the_servers_message_with_exit_2_for_bad_requests() {
        let door = front_door().await;
        let ran =
            run(async |io| start_with(&door.client, "hello", &params(&["colour=red"]), None, false, false, io).await)
                .await;
        assert_eq!(ran.code, 2);
        assert!(ran.err.starts_with("jobz: bad params") && ran.err.contains("\n  colour: not declared"), "{}", ran.err);
        let ran = run(async |io| start_with(&door.client, "nope", &[], None, false, false, io).await).await;
        assert_eq!(ran.code, 2, "{}", ran.err);
        let ran =
            run(async |io| start_with(&door.client, "hello", &params(&["who"]), None, false, false, io).await).await;
        assert_eq!(ran.code, 2);
        assert!(ran.err.contains("key=value"), "{}", ran.err);
        assert_eq!(door.api.starts().len(), 2, "the malformed param list was never sent");
        let ran = run(async |io| status_with(&door.client, "no-such-id", false, io).await).await;
        assert_eq!(ran.code, 2);
    }

    #[tokio::test]
    async fn an_unreachable_front_door_names_the_url_and_suggests_jobz_up() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let client = HttpClient::new(&ClientOptions::plain(&url)).unwrap();
        let ran = run(async |io| status_with(&client, "x", false, io).await).await;
        assert_eq!(ran.code, 1);
        assert!(ran.err.contains(&url) && ran.err.contains("jobz up"), "{}", ran.err);
    }

    #[tokio::test]
    async fn status_shows_the_job_readably_or_as_json() {
        let door = front_door().await;
        run(async |io| start_with(&door.client, "hello", &params(&["who=x"]), None, false, false, io).await).await;
        door.api.set_running("job-000001", "w1");
        door.api.finish("job-000001", Status::Failed, Some(3), "boom\n");
        let ran = run(async |io| status_with(&door.client, "job-000001", false, io).await).await;
        assert_eq!(ran.code, 0, "{}", ran.err);
        for line in ["status     failed\n", "params     who=x\n", "worker     w1\n", "exit code  3\n", "output\nboom\n"]
        {
            assert!(ran.out.contains(line), "{line:?} not in\n{}", ran.out);
        }
        assert!(ran.out.contains("#1 on w1"), "{}", ran.out);
        let ran = run(async |io| status_with(&door.client, "job-000001", true, io).await).await;
        let json: serde_json::Value = serde_json::from_str(&ran.out).unwrap();
        assert_eq!(json["exit_code"], 3);
    }

    #[tokio::test]
    async fn logs_print_the_log_and_follow_until_the_job_ends() {
        let door = front_door().await;
        run(async |io| start_with(&door.client, "hello", &[], None, false, false, io).await).await;
        let log = door.api.log_file("job-000001");
        std::fs::write(&log, "one\n").unwrap();
        let ran = run(async |io| logs_with(&door.client, "job-000001", false, io).await).await;
        assert_eq!((ran.code, ran.out.as_str()), (0, "one\n"));

        let api = door.api.clone();
        let writer = tokio::spawn(async move {
            api.set_running("job-000001", "w1");
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::fs::write(&log, "one\ntwo\n").unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::fs::write(&log, "one\ntwo\nthree\n").unwrap();
            api.finish("job-000001", Status::Succeeded, Some(0), "");
        });
        let ran = run(async |io| logs_with(&door.client, "job-000001", true, io).await).await;
        assert_eq!((ran.code, ran.out.as_str()), (0, "one\ntwo\nthree\n"), "{}", ran.err);
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn cancel_and_retry_print_the_new_status_and_a_conflict_exits_1() {
        let door = front_door().await;
        run(async |io| start_with(&door.client, "hello", &[], None, false, false, io).await).await;
        let ran = run(async |io| change_with(&door.client, "job-000001", "cancel", false, io).await).await;
        assert_eq!((ran.code, ran.out.as_str()), (0, "job-000001 cancelled\n"));
        let ran = run(async |io| change_with(&door.client, "job-000001", "cancel", false, io).await).await;
        assert_eq!(ran.code, 1);
        assert!(ran.err.contains("already cancelled") && ran.err.contains("(409)"), "{}", ran.err);
        let ran = run(async |io| change_with(&door.client, "job-000001", "retry", false, io).await).await;
        assert_eq!((ran.code, ran.out.as_str()), (0, "job-000001 queued\n"));
    }

    #[tokio::test]
    async fn ls_shows_a_table_newest_first_and_passes_filters() {
        let door = front_door().await;
        for _ in 0..2 {
            run(async |io| start_with(&door.client, "hello", &[], None, false, false, io).await).await;
        }
        door.api.finish("job-000001", Status::Succeeded, Some(0), "");
        let ran = run(async |io| ls_with(&door.client, None, None, false, io).await).await;
        let lines: Vec<&str> = ran.out.lines().collect();
        assert!(lines[0].starts_with("ID          JOB    STATUS     ATTEMPTS  CREATED"), "{}", ran.out);
        assert!(lines[1].starts_with("job-000002") && lines[2].starts_with("job-000001"), "{}", ran.out);
        let ran = run(async |io| ls_with(&door.client, Some("succeeded"), Some("hello"), false, io).await).await;
        assert_eq!(ran.out.lines().count(), 2, "{}", ran.out);
        let ran = run(async |io| ls_with(&door.client, Some("done"), None, false, io).await).await;
        assert_eq!(ran.code, 2);
        assert!(ran.err.contains("unknown status"), "{}", ran.err);
    }

    #[tokio::test]
    async fn workers_show_running_jobs_heartbeat_and_drift() {
        let door = front_door().await;
        let now = Utc::now();
        door.api.set_workers(vec![WorkerView {
            name: "w1".into(),
            host: "box".into(),
            jobs: vec![ServedJob { name: "a".into(), matches: true }, ServedJob { name: "b".into(), matches: false }],
            running: 1,
            concurrency: 4,
            last_heartbeat: now - chrono::Duration::seconds(2),
            connected_at: now,
        }]);
        let ran = run(async |io| workers_with(&door.client, false, io).await).await;
        let lines: Vec<&str> = ran.out.lines().collect();
        assert_eq!(lines[0], "NAME  HOST  RUNNING  JOBS  LAST HEARTBEAT  DRIFT");
        assert!(lines[1].starts_with("w1    box   1/4      a     2s ago") && lines[1].ends_with("b"), "{}", ran.out);
    }

    #[tokio::test]
    async fn gates_and_schedules_are_tables_or_json() {
        let door = front_door().await;
        door.api.set_gates(serde_json::json!([
            {"name": "shards", "after": ["shard"], "count": 3, "then": "merge", "timeout": 60,
             "open": [{"key": "d2", "progress": "1/3 shard", "done": 1, "needed": 3,
                       "opened_at": "2026-12-07T10:51:16.119Z", "run_id": "r2", "failed": true}],
             "fired": [{"key": "d1", "job_id": "job-9", "error": null, "at": "2026-12-07T10:51:08.583Z"}],
             "timed_out": [{"key": "d0", "job_id": null, "error": "no on_timeout job", "at": "2026-12-07T09:00:00Z"}],
             "failed": []},
            {"name": "idle", "after": ["a", "b"], "count": 1, "then": "c", "timeout": null,
             "open": [], "fired": [], "timed_out": [], "failed": []}
        ]));
        let ran = run(async |io| gates_with(&door.client, false, io).await).await;
        let lines: Vec<&str> = ran.out.lines().collect();
        assert_eq!(lines[0], "GATE    KEY  STATE                  PROGRESS   SINCE/AT              JOB", "{}", ran.out);
        assert_eq!(lines[1], "shards  d2   open, upstream failed  1/3 shard  2026-12-07T10:51:16Z  -");
        assert_eq!(lines[2], "shards  d1   fired                  -          2026-12-07T10:51:08Z  job-9");
        assert_eq!(
            lines[3],
            "shards  d0   timed out              -          2026-12-07T09:00:00Z  not started: no on_timeout job"
        );
        assert_eq!(lines[4], "idle    -    waiting for a, b       -          -                     -");
        assert_eq!(lines.len(), 5, "{}", ran.out);
        // Objects that are not gates as this client knows them still make a table.
        door.api.set_gates(serde_json::json!([{"gate": "all_done", "key": "2026", "done": 3}]));
        let ran = run(async |io| gates_with(&door.client, false, io).await).await;
        assert_eq!(ran.out, "GATE      KEY   DONE\nall_done  2026  3\n", "naming columns lead");
        let ran = run(async |io| gates_with(&door.client, true, io).await).await;
        assert!(ran.out.starts_with("{\n  \"gates\": [\n"), "{}", ran.out);
        let ran = run(async |io| schedules_with(&door.client, false, io).await).await;
        assert_eq!((ran.out.as_str(), ran.err.as_str()), ("", "jobz: no schedules\n"));
    }

    #[tokio::test]
    async fn schedules_show_next_and_last_fire_in_a_table_or_json() {
        let door = front_door().await;
        door.api.set_schedules(serde_json::json!([
            {"job_name": "report", "cron": "30 2 * * *", "timezone": "Europe/Madrid", "params": {"kind": "daily"},
             "catch_up": "latest", "next": "2026-03-30T00:30:00.000Z", "last_fired": "2026-03-29T01:00:00.000Z",
             "last_job_id": "job-1", "fired": []},
            {"job_name": "tick", "cron": "* * * * *", "timezone": "UTC", "params": {},
             "catch_up": "none", "next": null, "last_fired": null, "last_job_id": null, "fired": []}
        ]));
        let ran = run(async |io| schedules_with(&door.client, false, io).await).await;
        let lines: Vec<&str> = ran.out.lines().collect();
        assert_eq!(lines[0], "JOB     CRON        TIMEZONE       PARAMS      CATCH-UP  NEXT                  LAST FIRED            LAST JOB");
        assert_eq!(lines[1], "report  30 2 * * *  Europe/Madrid  kind=daily  latest    2026-03-30T00:30:00Z  2026-03-29T01:00:00Z  job-1");
        assert_eq!(
            lines[2],
            "tick    * * * * *   UTC            -           none      -                     -                     -"
        );
        let ran = run(async |io| schedules_with(&door.client, true, io).await).await;
        assert!(ran.out.starts_with("{\n  \"schedules\": [\n"), "{}", ran.out);
        assert!(ran.out.contains("\"last_job_id\": \"job-1\""), "{}", ran.out);
    }

    #[tokio::test]
    async fn progress_needs_the_job_id_and_a_percentage() {
        let door = front_door().await;
        run(async |io| start_with(&door.client, "hello", &[], None, false, false, io).await).await;
        door.api.set_running("job-000001", "w1");
        let ran = run(async |_io| progress_with(&door.client, None, 5.0, None).await).await;
        assert_eq!(ran.code, 2);
        assert!(ran.err.contains("JOBZ_JOB_ID"), "{}", ran.err);
        let ran = run(async |_io| progress_with(&door.client, Some("job-000001"), 101.0, None).await).await;
        assert_eq!(ran.code, 2);
        let ran = run(async |_io| progress_with(&door.client, Some("job-000001"), 42.0, Some("copying")).await).await;
        assert_eq!(ran.code, 0, "{}", ran.err);
        let progress = door.api.get("job-000001").unwrap().progress.unwrap();
        assert_eq!((progress.percent, progress.message.as_deref()), (42.0, Some("copying")));
    }

    #[test]
    fn params_are_key_value_pairs_given_once() {
        let parsed = parse_params(&params(&["a=1", "b=x=y", "c="])).unwrap();
        assert_eq!(parsed["b"], "x=y");
        assert_eq!(parsed["c"], "");
        assert!(matches!(parse_params(&params(&["=v"])), Err(Failure::Usage(_))));
        assert!(
            matches!(parse_params(&params(&["a=1", "a=2"])), Err(Failure::Usage(m)) if m.contains("more than once"))
        );
    }
}
