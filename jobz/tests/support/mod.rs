//! Shared helpers for tests that start real jobz processes: free loopback
//! ports, a temp dir per test, processes killed by PID when the test ends, a
//! small HTTP/1.1 client, and waits that always have a deadline.

#![allow(dead_code)]

pub mod tls;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr.port(),
        Err(e) => panic!("no free port: {e}"),
    }
}

/// A jobz process that is killed (SIGKILL, by PID) when dropped.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with the PID of our own child; no memory is involved.
        unsafe {
            libc::kill(self.pid(), signal);
        }
    }

    /// Sends SIGTERM and waits for the exit, up to `limit`.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// One test's world: a temp dir, a job file, a broker's ports.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub http_port: u16,
    pub zmq_port: u16,
}

impl Mesh {
    pub fn new(yaml: &str) -> Mesh {
        let dir = match tempfile::tempdir() {
            Ok(d) => d,
            Err(e) => panic!("tempdir: {e}"),
        };
        let yaml = yaml.replace("$DIR", &dir.path().display().to_string());
        let config = dir.path().join("jobz.yaml");
        if let Err(e) = std::fs::write(&config, yaml) {
            panic!("writing the job file: {e}");
        }
        Mesh { dir, config, http_port: free_port(), zmq_port: free_port() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.zmq_port)
    }

    /// Starts `jobz ARGS` in the test's directory; its output goes to `<name>.log`.
    pub fn spawn(&self, name: &str, args: &[&str]) -> Proc {
        self.spawn_with_env(name, args, &[])
    }

    pub fn spawn_with_env(&self, name: &str, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let log =
            match std::fs::OpenOptions::new().create(true).append(true).open(self.path().join(format!("{name}.log"))) {
                Ok(f) => f,
                Err(e) => panic!("log file: {e}"),
            };
        let err = match log.try_clone() {
            Ok(f) => f,
            Err(e) => panic!("log file: {e}"),
        };
        let child = Command::new(env!("CARGO_BIN_EXE_jobz"))
            .args(args)
            .current_dir(self.path())
            .env("JOBZ_LOG", "info")
            .env("TMPDIR", self.path())
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn();
        match child {
            Ok(child) => Proc { child, name: name.to_string() },
            Err(e) => panic!("cannot start jobz {name}: {e}"),
        }
    }

    /// Starts a broker (with a short lease so tests do not wait long) and waits for /healthz.
    pub fn broker(&self, extra: &[&str]) -> Proc {
        self.broker_with_env(extra, &[])
    }

    /// [`Mesh::broker`] with extra environment variables (e.g. `JOBZ_TEST_CLOCK`).
    pub fn broker_with_env(&self, extra: &[&str], env: &[(&str, &str)]) -> Proc {
        let http = format!("127.0.0.1:{}", self.http_port);
        let endpoint = self.endpoint();
        let data = self.path().join("data").display().to_string();
        let config = self.config.display().to_string();
        let mut args = vec!["broker", "--config", &config, "--http", &http, "--bind", &endpoint, "--data", &data];
        args.extend_from_slice(extra);
        let proc = self.spawn_with_env("broker", &args, env);
        wait_until(Duration::from_secs(30), "the broker's /healthz", || get(&self.url(), "/healthz").0 == 200);
        proc
    }

    /// Starts a broker with `extra` flags and `env`, waiting until `ready` holds (for a
    /// front door that plain `get` cannot reach: HTTPS, tokens).
    pub fn broker_until(&self, extra: &[&str], env: &[(&str, &str)], ready: impl FnMut() -> bool) -> Proc {
        let http = format!("127.0.0.1:{}", self.http_port);
        let endpoint = self.endpoint();
        let data = self.path().join("data").display().to_string();
        let config = self.config.display().to_string();
        let mut args = vec!["broker", "--config", &config, "--http", &http, "--bind", &endpoint, "--data", &data];
        args.extend_from_slice(extra);
        let proc = self.spawn_with_env("broker", &args, env);
        wait_until(Duration::from_secs(30), "the broker's front door", ready);
        proc
    }

    /// A worker with extra environment variables (`JOBZ_TOKEN`, `JOBZ_CACERT`, …), which its jobs inherit.
    pub fn worker_with_env(&self, name: &str, concurrency: u32, env: &[(&str, &str)]) -> Proc {
        let endpoint = self.endpoint();
        let config = self.config.display().to_string();
        let concurrency = concurrency.to_string();
        self.spawn_with_env(
            name,
            &["worker", "--broker", &endpoint, "--config", &config, "--name", name, "--concurrency", &concurrency],
            env,
        )
    }

    pub fn worker(&self, name: &str, concurrency: u32) -> Proc {
        let endpoint = self.endpoint();
        let config = self.config.display().to_string();
        let concurrency = concurrency.to_string();
        self.spawn(
            name,
            &["worker", "--broker", &endpoint, "--config", &config, "--name", name, "--concurrency", &concurrency],
        )
    }

    /// Starts a semaphore (`jobz semaphore`) against this mesh's broker; its log is `<name>.log`
    /// (appended to, so a restarted semaphore's log follows its earlier life).
    pub fn semaphore(&self, name: &str) -> Proc {
        let endpoint = self.endpoint();
        let config = self.config.display().to_string();
        self.spawn(name, &["semaphore", "--broker", &endpoint, "--config", &config])
    }

    /// How many lines of process `name`'s log contain `needle`, once the log's colours
    /// (ANSI escapes, which split `field=value`) are taken out.
    pub fn log_lines_with(&self, name: &str, needle: &str) -> usize {
        let text = std::fs::read_to_string(self.path().join(format!("{name}.log"))).unwrap_or_default();
        text.lines().filter(|l| without_colours(l).contains(needle)).count()
    }

    /// Waits until `n` workers are registered.
    pub fn wait_workers(&self, n: usize) {
        wait_until(Duration::from_secs(30), "workers to register", || {
            json(&get(&self.url(), "/workers").1)["workers"].as_array().is_some_and(|w| w.len() >= n)
        });
    }

    pub fn start(&self, query: &str) -> serde_json::Value {
        let (code, body) = get(&self.url(), &format!("/job_start?{query}"));
        assert_eq!(code, 202, "start {query}: {body}");
        json(&body)
    }

    pub fn job(&self, id: &str) -> serde_json::Value {
        json(&get(&self.url(), &format!("/jobs/{id}")).1)
    }

    /// The value of the series `series` (`name{labels}`) in `GET /metrics` now.
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric_in(&get(&self.url(), "/metrics").1, series)
    }

    /// Waits until job `id` has a final status and returns it.
    pub fn wait_final(&self, id: &str, limit: Duration) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let found = wait_for(limit, || {
            last = self.job(id);
            let status = last["status"].as_str().unwrap_or("");
            ["succeeded", "failed", "timed_out", "cancelled"].contains(&status).then(|| last.clone())
        });
        match found {
            Some(job) => job,
            None => panic!("job {id} did not end within {limit:?}: {last}\n{}", self.logs()),
        }
    }

    /// Every process log of this test, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.path()) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    let tail: String = text
                        .lines()
                        .rev()
                        .take(40)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n");
                    out.push_str(&format!("--- {}\n{tail}\n", path.display()));
                }
            }
        }
        out
    }
}

/// `line` without ANSI colour escapes (`ESC [ ... m`).
pub fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // Skip to the end of the escape sequence.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Runs `jobz ARGS` in `dir` with `env` added until it exits; after `limit` it is
/// killed and the test fails. Returns the exit code, stdout and stderr.
pub fn run_jobz(dir: &Path, args: &[&str], env: &[(&str, &str)], limit: Duration) -> (i32, String, String) {
    let file = |name: &str| match std::fs::File::create(dir.join(name)) {
        Ok(f) => f,
        Err(e) => panic!("{name}: {e}"),
    };
    let child = Command::new(env!("CARGO_BIN_EXE_jobz"))
        .args(args)
        .current_dir(dir)
        .env("TMPDIR", dir)
        .env_remove("JOBZ_CONFIG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(file("run.stdout"))
        .stderr(file("run.stderr"))
        .spawn();
    let mut proc = match child {
        Ok(child) => Proc { child, name: format!("jobz {}", args.join(" ")) },
        Err(e) => panic!("cannot run jobz: {e}"),
    };
    let status = wait_for(limit, || proc.child.try_wait().ok().flatten());
    let Some(status) = status else { panic!("{} did not exit within {limit:?}", proc.name) };
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    (status.code().unwrap_or(-1), read("run.stdout"), read("run.stderr"))
}

/// The value of the series `series` (`name{labels}`) in a `GET /metrics` body.
pub fn metric_in(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

/// A job's id, from an answer or a listing (empty when it has none).
pub fn id_of(job: &serde_json::Value) -> String {
    job["id"].as_str().unwrap_or_default().to_string()
}

pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// Polls `cond` every 20 ms until it holds or `limit` passes (then panics naming `what`).
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    if wait_for(limit, || cond().then_some(())).is_none() {
        panic!("timed out after {limit:?} waiting for {what}");
    }
}

pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn get(base: &str, path: &str) -> (u16, String) {
    request(base, "GET", path, &[], b"")
}

pub fn post(base: &str, path: &str, body: &str) -> (u16, String) {
    request(base, "POST", path, &[("Content-Type", "application/json")], body.as_bytes())
}

/// One HTTP/1.1 request on a fresh connection; `(0, error)` when the connection fails.
pub fn request(base: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let host = base.trim_start_matches("http://");
    let mut stream = match TcpStream::connect(host) {
        Ok(s) => s,
        Err(e) => return (0, e.to_string()),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    if stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body)).is_err() {
        return (0, "write failed".into());
    }
    let mut raw = Vec::new();
    if let Err(e) = stream.read_to_end(&mut raw) {
        if raw.is_empty() {
            return (0, e.to_string());
        }
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.to_ascii_lowercase().contains("transfer-encoding: chunked") => dechunk(body),
        Some((_, body)) => body.to_string(),
        None => String::new(),
    };
    (code, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

impl Mesh {
    /// Starts a worker with extra flags (`--topics`, `--exit-when-idle`, …) after the usual ones.
    pub fn worker_with(&self, name: &str, concurrency: u32, extra: &[&str]) -> Proc {
        let endpoint = self.endpoint();
        let config = self.config.display().to_string();
        let concurrency = concurrency.to_string();
        let mut args =
            vec!["worker", "--broker", &endpoint, "--config", &config, "--name", name, "--concurrency", &concurrency];
        args.extend_from_slice(extra);
        self.spawn(name, &args)
    }

    /// Runs a client command (`jobz cancel ID`, …) against this mesh's front door and
    /// waits for it, up to `limit` (then kills it by PID and panics).
    pub fn client(&self, args: &[&str], limit: Duration) -> std::process::Output {
        let child = Command::new(env!("CARGO_BIN_EXE_jobz"))
            .args(args)
            .arg("--url")
            .arg(self.url())
            .current_dir(self.path())
            .env_remove("JOBZ_JOB_ID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) => panic!("cannot run jobz {args:?}: {e}"),
        };
        let deadline = Instant::now() + limit;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("jobz {args:?} did not finish within {limit:?}");
                }
            }
        }
        match child.wait_with_output() {
            Ok(output) => output,
            Err(e) => panic!("reading the output of jobz {args:?}: {e}"),
        }
    }

    /// Jobs with this name in the store, newest first.
    pub fn jobs_named(&self, name: &str) -> Vec<serde_json::Value> {
        let list = json(&get(&self.url(), &format!("/jobs?job_name={name}&limit=1000")).1);
        list["jobs"].as_array().cloned().unwrap_or_default()
    }
}

/// The pids a job wrote to `path`, one a line.
pub fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Whether process `pid` exists and is not a zombie (a zombie has exited; only its parent has
/// not collected it yet, which for an orphan is init's business).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain spaces.
        Ok(stat) => {
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|s| s != "Z")
        }
        Err(_) => false,
    }
}

/// Kills (SIGKILL) the processes whose pids a job wrote to a file, when dropped: a
/// failing test leaves no `sleep 300` behind. Only a pid whose command is still `sh`
/// or `sleep` is signalled, so a recycled pid is left alone.
pub struct PidFileGuard(pub PathBuf);

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        for pid in read_pids(&self.0) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if alive(pid) && (comm.trim() == "sleep" || comm.trim() == "sh") {
                // SAFETY: kill(2) on a pid our test's job recorded; no memory is involved.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}
