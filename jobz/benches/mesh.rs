//! The mesh's throughput and latency, end to end: `cargo bench -p jobz --bench mesh`.
//!
//! One run measures, on this machine, in under five minutes:
//!
//! 1. **Accepted starts per second over HTTP**: 16 keep-alive connections, each
//!    sending the next `GET /job_start?job_name=noop` only after its answer,
//!    against an in-process broker with no workers (every 202 waits for its
//!    job's fsync), and the same load against a bare hyper server that answers
//!    202 at once: the ratio is what durability and the broker cost. With
//!    `JOBZ_BENCH_TLS=1`, each run also loads the same broker behind HTTPS
//!    with client certificates (mutual TLS) and a bearer token, certificates
//!    made by rcgen in a temp dir, the clients on tokio-rustls with keep-alive
//!    (one handshake per connection): the ratio HTTPS / plain is what the
//!    locks cost.
//! 2. **`/bin/true` jobs per second through the mesh**: an in-process broker
//!    with 2 workers of concurrency 1 (what `jobz up --workers 2` runs), N jobs
//!    started as fast as 16 clients can, from the first start to the last
//!    success; against the machine's ceiling, 2 threads spawning and waiting
//!    for `/bin/true` with `std::process::Command`. Also the worker's runner
//!    alone (no broker, no network), to tell the runner's cost from the mesh's,
//!    and tokio's process support alone with the runner's way of spawning (the
//!    "tokio floor"), to tell the runner's own code from what it is built on.
//!    And the "lean probe" (`probe/lean.rs`): the same starts against a model
//!    of the leanest design with the same durability for starts (journal and
//!    fsync, a queue in memory, slot threads, a finish log), as a yardstick
//!    for what the machine allows; then the same with jobz's own store for the
//!    jobs' rows, and with a round trip per job on top, to show what each
//!    costs; and with the logs kept for durability and each job's row written
//!    once, in bulk, into a database with jobz's schema. The run is also split
//!    in two phases: while the starts come in, and the queue drained after them.
//! 3. **Latency from the 202 to the process start** at a light load: one
//!    `/bin/date +%s%N` at a time; the process prints its own start time, the
//!    client notes when the 202 arrived, both on CLOCK_REALTIME. `date`'s own
//!    start-up counts against jobz, so the same spawn-to-clock time is measured
//!    without jobz for comparison.
//! 4. **Dispatch with a 100,000-job backlog**: the real `jobz broker` process
//!    with 100,000 queued jobs, its resident memory, and the rate of the first
//!    N completions once 2 `jobz worker` processes attach, against the same
//!    separate processes with no backlog; and the in-process mesh of (2) with
//!    the same backlog, its 2 workers attached once it is queued, against (2).
//!
//! Beside each rate it prints where the CPU went, per job and per thread name
//! (from `/proc/*/task/*/stat` and `status`: CPU time and context switches),
//! the job processes' CPU (reaped children), and how busy the whole machine
//! was, with the share of processes outside the bench ("others"): a run with
//! a high "others" share was disturbed and its figures are not to be trusted.
//!
//! The in-process parts start the broker, front door and workers with the same
//! library calls as `jobz up` (jobz/src/mesh_cmd.rs), on a runtime of their
//! own; the load generator has its own runtime, as a separate client would.
//! Part 4 runs the binary Cargo built for this bench (`CARGO_BIN_EXE_jobz`),
//! falling back to `target/release/jobz`.
//!
//! The data directories live under Cargo's target tmp dir, on the build's disk
//! (fsync is real there; tmpfs would flatter the store); `JOBZ_BENCH_DIR`
//! measures another disk. `JOBZ_BENCH_PARTS=1,3` runs only some parts.
//! `JOBZ_BENCH_CURVE=1` runs the separate processes of (4) and (5) with the
//! mesh encrypted (CURVE): keys are made for the broker and each worker in the
//! run's temp dir, the workers' public keys allowed, as an operator would with
//! `jobz keygen`. Compare `JOBZ_BENCH_PARTS=4` with and without it. Every
//! wait has a deadline; every process started is killed by its PID at the end.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::error::Error;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use broker::core::BrokerConfig;
use broker::http::HttpOptions;
use broker::store::{SqliteStore, StoreOptions};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jobz_core::transport::{Router, SocketOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use worker::mesh::WorkerConfig;
use worker::runner::{self, JobSpec};

/// The allocator of the `jobz` binary, so that the in-process parts measure
/// what `jobz up` runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

type BenchResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

#[path = "probe/lean.rs"]
mod lean;

/// The bench's job file: one job that does nothing, one that prints its start
/// time, and (5) a slow one limited to two running across the mesh.
const JOB_FILE: &str = r#"jobs:
  noop: { command: "/bin/true" }
  stamp: { command: "/bin/date +%s%N" }
  capped: { command: "/bin/sleep 5", concurrency: 2 }
"#;

/// Concurrent keep-alive HTTP connections of every load.
const CLIENTS: usize = 16;
/// (1): load before the measured window, so connections and caches are warm.
const ACCEPT_WARMUP: Duration = Duration::from_secs(1);
/// (1): the measured window.
const ACCEPT_WINDOW: Duration = Duration::from_secs(5);
/// (1) and (2): runs per configuration; the median is reported.
const RUNS: usize = 3;
/// (2) and (4): jobs run to the end per measurement.
const E2E_JOBS: usize = 5_000;
/// (2): workers, each with concurrency 1, as `jobz up --workers 2` runs them.
const WORKERS: usize = 2;
/// (3): latency samples, after a few unmeasured ones.
const LATENCY_SAMPLES: usize = 300;
const LATENCY_WARMUP_SAMPLES: usize = 20;
/// (3): the first look at a started job's status, then the poll interval.
const LATENCY_FIRST_POLL: Duration = Duration::from_millis(5);
const LATENCY_POLL: Duration = Duration::from_millis(2);
/// (4): jobs queued before the workers attach, in slices timed one by one.
const BACKLOG: usize = 100_000;
const BACKLOG_SLICES: usize = 5;
/// (5): jobs of the limited name and free jobs queued beside them.
const LIMITED_JOBS: usize = 10_000;
/// (5): slots per worker: two of the four are taken by the limited name.
const LIMITED_WORKER_SLOTS: usize = 2;

/// The longest a single HTTP exchange may take.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// The longest for a broker or its workers to come up, or to stop.
const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
const STOP_DEADLINE: Duration = Duration::from_secs(10);
/// The longest for a batch of jobs to run to the end (a broken mesh fails the bench, it does not hang it).
const RUN_DEADLINE: Duration = Duration::from_secs(120);
/// The longest for one latency sample's job to end.
const SAMPLE_DEADLINE: Duration = Duration::from_secs(10);
/// How often the completion count is read from `/metrics` (it counts in the
/// store, so it is not free); the end time itself comes from the jobs' own
/// `finished_at` where it can.
const COUNT_POLL: Duration = Duration::from_millis(50);
const COUNT_POLL_BACKLOG: Duration = Duration::from_millis(100);

/// Targets from the brief, printed beside the figures.
const TARGET_ACCEPTED_PER_SECOND: f64 = 20_000.0;
/// (1) with `JOBZ_BENCH_TLS=1`: the HTTPS front door keeps this share of the plain one's rate.
const TARGET_TLS_RATIO: f64 = 0.7;
/// (1) with `JOBZ_BENCH_TLS=1`: the bearer token of the HTTPS runs.
const BENCH_TOKEN: &str = "jobz_bench_token_0123456789abcdef0123456789abcdef";
const TARGET_E2E_RATIO: f64 = 0.8;
const TARGET_P50: Duration = Duration::from_millis(2);
const TARGET_P99: Duration = Duration::from_millis(10);

/// What every part needs: where data goes, the job file, and the client's runtime.
struct Bench {
    base: PathBuf,
    _job_dir: tempfile::TempDir,
    job_path: PathBuf,
    file: Arc<config::JobFile>,
    /// The load generator's runtime, separate from every server's, as a client process would be.
    client: Runtime,
    /// `JOBZ_BENCH_CURVE=1`: the separate processes speak CURVE.
    curve: bool,
}

fn main() -> BenchResult<()> {
    // Cargo runs a bench with LD_LIBRARY_PATH set to its target and toolchain
    // directories. Every process started from here would inherit it, and the
    // dynamic loader of each /bin/true would search those directories first:
    // here 130-280 µs more per /bin/true, in the ceiling of (2) and in the mesh
    // alike. Neither the machine's ceiling nor a `jobz up` started from a shell
    // pays that, so the bench does not either. Nothing here needs it (jobz
    // links Rust's libraries statically), and no thread runs yet.
    let cargo_library_path = std::env::var_os("LD_LIBRARY_PATH").is_some();
    std::env::remove_var("LD_LIBRARY_PATH");
    let base =
        std::env::var_os("JOBZ_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| env!("CARGO_TARGET_TMPDIR").into());
    std::fs::create_dir_all(&base)?;
    let job_dir = tempfile::tempdir_in(&base)?;
    let job_path = job_dir.path().join("jobz.yaml");
    std::fs::write(&job_path, JOB_FILE)?;
    let file = Arc::new(config::load(&job_path)?);
    let client = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("bench-client").build()?;
    let bench = Bench { base, _job_dir: job_dir, job_path, file, client, curve: curve_wanted()? };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!(
        "jobz mesh bench, {} UTC, {cpus} CPU(s), data under {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M"),
        bench.base.display()
    );
    if cargo_library_path {
        println!("LD_LIBRARY_PATH removed (cargo sets it for benches): the processes started here do not search it");
    }
    if bench.curve {
        println!(
            "JOBZ_BENCH_CURVE=1: the separate processes of (4) and (5) speak CURVE (encrypted, allowed keys only)"
        );
    }
    let started = Instant::now();
    let parts = parts()?;

    let accept = if parts.contains(&1) {
        println!(
            "\n(1) accepted starts per second over HTTP: {CLIENTS} keep-alive clients, one request in flight each,"
        );
        println!(
            "    {}s warm-up + {}s measured, median of {RUNS} runs; jobz with no workers attached",
            ACCEPT_WARMUP.as_secs(),
            ACCEPT_WINDOW.as_secs()
        );
        let accept = accept_rates(&bench)?;
        print_accept(&accept);
        Some(accept)
    } else {
        None
    };

    let e2e = if parts.contains(&2) {
        println!("\n(2) /bin/true jobs per second: {E2E_JOBS} jobs, median of {RUNS} runs");
        let e2e = e2e_rates(&bench)?;
        print_e2e(&e2e);
        Some(e2e)
    } else {
        None
    };

    let latency = if parts.contains(&3) {
        println!("\n(3) latency from the 202 to the process start, one job at a time, {LATENCY_SAMPLES} samples");
        let latency = start_latency(&bench)?;
        print_latency(&latency);
        Some(latency)
    } else {
        None
    };

    let backlog = if parts.contains(&4) {
        let encrypted = if bench.curve { ", CURVE on" } else { "" };
        println!("\n(4) dispatch with a {BACKLOG}-job backlog: separate `jobz broker` and {WORKERS} `jobz worker --concurrency 1` processes{encrypted}");
        let backlog = backlog_rates(&bench)?;
        print_backlog(&backlog, e2e.as_ref().map(|e| e.mesh.rate));
        Some(backlog)
    } else {
        None
    };

    let limited = if parts.contains(&5) {
        println!("\n(5) free jobs beside {LIMITED_JOBS} jobs of a name under `concurrency: 2`: separate processes");
        let limited = limited_rates(&bench)?;
        print_limited(&limited);
        Some(limited)
    } else {
        None
    };

    println!("\nsummary");
    summary(accept.as_ref(), e2e.as_ref(), latency.as_ref(), backlog.as_ref(), limited.as_ref());
    println!("\nwhole run: {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `JOBZ_BENCH_CURVE`: `1` encrypts the mesh of the separate processes, `0` or unset does not.
fn curve_wanted() -> BenchResult<bool> {
    match std::env::var("JOBZ_BENCH_CURVE").as_deref() {
        Err(_) | Ok("0") | Ok("") => Ok(false),
        Ok("1") => Ok(true),
        Ok(other) => Err(format!("JOBZ_BENCH_CURVE: {other:?} is neither 0 nor 1").into()),
    }
}

/// The parts to run: `JOBZ_BENCH_PARTS=1,3` runs (1) and (3); all five by default.
fn parts() -> BenchResult<Vec<u8>> {
    match std::env::var("JOBZ_BENCH_PARTS") {
        Err(_) => Ok(vec![1, 2, 3, 4, 5]),
        Ok(text) => text
            .split(',')
            .map(|p| match p.trim().parse::<u8>() {
                Ok(n @ 1..=5) => Ok(n),
                _ => Err(format!("JOBZ_BENCH_PARTS: {p:?} is not a part from 1 to 5").into()),
            })
            .collect(),
    }
}

// ---------------------------------------------------------------------------
// (1) accepted starts per second
// ---------------------------------------------------------------------------

/// What a sustained load measured.
struct Sustained {
    rate: f64,
    latencies: Vec<Duration>,
    errors: u64,
    /// CPU spent in the measured window, and the starts it served.
    cpu: CpuSnapshot,
    window_starts: u64,
}

struct AcceptFigures {
    bare: Sustained,
    /// The broker and front door in this process, on a runtime of their own.
    jobz: Sustained,
    /// A `jobz broker` process, as it is deployed: the figure the target is about.
    process: Sustained,
    /// `JOBZ_BENCH_TLS=1`: the same broker behind HTTPS, client certificates and a token.
    tls: Option<Sustained>,
    /// Store commits and jobs per commit during the jobz runs, from the store's own counters.
    jobs_per_commit: f64,
    /// Jobs per sync (of the start journal or the WAL): a sync covers every commit made while the one before it ran.
    jobs_per_sync: f64,
}

fn accept_rates(bench: &Bench) -> BenchResult<AcceptFigures> {
    let secure = match std::env::var("JOBZ_BENCH_TLS").as_deref() {
        Ok("1") => Some(Secure::make(bench)?),
        Ok("0") | Err(_) => None,
        Ok(other) => return Err(format!("JOBZ_BENCH_TLS: {other:?} is not 0 or 1").into()),
    };
    let binary = jobz_binary()?;
    let mut bare = Vec::new();
    let mut jobz = Vec::new();
    let mut process = Vec::new();
    let mut tls = Vec::new();
    let mut per_commit = Vec::new();
    let plain = Access::default();
    for _ in 0..RUNS {
        let server = BareServer::start()?;
        bare.push(bench.client.block_on(sustained(server.addr, "/job_start?job_name=noop", &plain, None))?);
        server.stop();

        let mesh = InProcess::start(bench, 0)?;
        jobz.push(bench.client.block_on(sustained(mesh.http, "/job_start?job_name=noop", &plain, None))?);
        let stats = mesh.store.stats();
        per_commit.push((
            stats.changes as f64 / stats.commits.max(1) as f64,
            stats.changes as f64 / (stats.syncs + stats.journal_syncs).max(1) as f64,
        ));
        mesh.stop();

        let mut broker = Processes::broker(bench, &binary)?;
        let pid = broker.broker_pid();
        process.push(bench.client.block_on(sustained(broker.http, "/job_start?job_name=noop", &plain, Some(pid)))?);
        broker.stop();

        if let Some(secure) = &secure {
            let mesh = InProcess::start_with(bench, 0, secure.options())?;
            tls.push(bench.client.block_on(sustained(mesh.http, "/job_start?job_name=noop", &secure.access, None))?);
            mesh.stop();
        }
    }
    Ok(AcceptFigures {
        bare: median_run(bare),
        jobz: median_run(jobz),
        process: median_run(process),
        tls: (!tls.is_empty()).then(|| median_run(tls)),
        jobs_per_commit: median(per_commit.iter().map(|p| p.0).collect()),
        jobs_per_sync: median(per_commit.iter().map(|p| p.1).collect()),
    })
}

/// (1) with `JOBZ_BENCH_TLS=1`: a CA, the server's certificate and a client's, made
/// with rcgen in a temp dir, the front door's options and the clients' access.
struct Secure {
    server: Arc<rustls::ServerConfig>,
    tokens: Arc<broker::http::Tokens>,
    access: Access,
    _dir: tempfile::TempDir,
}

impl Secure {
    fn make(bench: &Bench) -> BenchResult<Secure> {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let dir = tempfile::tempdir_in(&bench.base)?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.distinguished_name.push(DnType::CommonName, "jobz bench CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        let leaf = |names: Vec<String>, usage| -> BenchResult<(String, String)> {
            let mut params = CertificateParams::new(names)?;
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate()?;
            Ok((params.signed_by(&key, &ca)?.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(vec!["127.0.0.1".into()], ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client_cert, client_key) = leaf(Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?;
        let write = |name: &str, text: &str| -> BenchResult<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            Ok(path)
        };
        let files = broker::http::tls::TlsFiles {
            cert: write("server.pem", &server_cert)?,
            key: write("server.key", &server_key)?,
            client_ca: Some(write("ca.pem", &ca.pem())?),
        };
        let server = broker::http::tls::server_config(&files)?;

        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ca.pem().as_bytes())?)?;
        let chain = vec![rustls::pki_types::CertificateDer::from_pem_slice(client_cert.as_bytes())?];
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(client_key.as_bytes())?;
        let mut client = rustls::ClientConfig::builder_with_provider(broker::http::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![b"http/1.1".to_vec()];

        let token = config::TokenDef {
            name: "bench".into(),
            sha256: broker::http::auth::hash_token(BENCH_TOKEN),
            scopes: config::Scopes { start: Some(config::StartScope::Any), read: true, admin: false },
        };
        let access = Access {
            tls: Some(tokio_rustls::TlsConnector::from(Arc::new(client))),
            authorization: Some(format!("Bearer {BENCH_TOKEN}")),
        };
        Ok(Secure { server, tokens: Arc::new(broker::http::Tokens::new(vec![token])), access, _dir: dir })
    }

    fn options(&self) -> HttpOptions {
        HttpOptions { tls: Some(self.server.clone()), tokens: self.tokens.clone(), ..HttpOptions::default() }
    }
}

/// The run with the median rate, with every run's errors added up.
fn median_run(mut runs: Vec<Sustained>) -> Sustained {
    let errors = runs.iter().map(|r| r.errors).sum();
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let mut middle = runs.swap_remove(runs.len() / 2);
    middle.errors = errors;
    middle
}

/// [`CLIENTS`] connections each sending `path` back to back: a warm-up, then the
/// measured window. Counts only 202s; anything else is an error. The CPU is
/// this process's, and `server`'s threads too when the server is a process of its own.
async fn sustained(
    addr: SocketAddr,
    path: &'static str,
    access: &Access,
    server: Option<u32>,
) -> BenchResult<Sustained> {
    let accepted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (accepted, errors, stop, first_error) =
            (accepted.clone(), errors.clone(), stop.clone(), first_error.clone());
        let mut load = Load::connect(addr, access, path).await?;
        let access = access.clone();
        clients.push(tokio::spawn(async move {
            // (end of the exchange, its duration), to keep those inside the window.
            let mut samples: Vec<(Instant, Duration)> = Vec::with_capacity(1 << 16);
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                match load.once().await {
                    Ok((StatusCode::ACCEPTED, _)) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        let now = Instant::now();
                        samples.push((now, now - sent));
                    }
                    other => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let text = match other {
                            Ok((status, body)) => format!("{status}: {}", String::from_utf8_lossy(&body)),
                            Err(e) => e.to_string(),
                        };
                        first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(text);
                        match Load::connect(addr, &access, path).await {
                            Ok(fresh) => load = fresh,
                            Err(_) => break,
                        }
                    }
                }
            }
            samples
        }));
    }
    tokio::time::sleep(ACCEPT_WARMUP).await;
    let (count_from, from, cpu_from) =
        (accepted.load(Ordering::Relaxed), Instant::now(), CpuSnapshot::take_with(server));
    tokio::time::sleep(ACCEPT_WINDOW).await;
    let (count_to, to, cpu_to) = (accepted.load(Ordering::Relaxed), Instant::now(), CpuSnapshot::take_with(server));
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for client in clients {
        let samples = tokio::time::timeout(REQUEST_DEADLINE, client).await.map_err(|_| "a client did not stop")??;
        latencies.extend(samples.into_iter().filter(|(at, _)| *at >= from && *at <= to).map(|(_, d)| d));
    }
    latencies.sort_unstable();
    if let Some(e) = first_error.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        eprintln!("    first error of the load against {addr}: {e}");
    }
    let rate = (count_to - count_from) as f64 / (to - from).as_secs_f64();
    Ok(Sustained {
        rate,
        latencies,
        errors: errors.load(Ordering::Relaxed),
        cpu: cpu_from.until(&cpu_to),
        window_starts: count_to - count_from,
    })
}

fn print_accept(f: &AcceptFigures) {
    println!("    {:<34} {:>10} {:>10} {:>10} {:>7}", "server", "starts/s", "p50", "p99", "errors");
    for (name, s) in [
        ("bare hyper 1.x (202 at once)", &f.bare),
        ("jobz, in-process (202 after fsync)", &f.jobz),
        ("`jobz broker` process (the same)", &f.process),
    ] {
        println!(
            "    {:<34} {:>10.0} {:>10} {:>10} {:>7}",
            name,
            s.rate,
            fmt_duration(percentile(&s.latencies, 50.0)),
            fmt_duration(percentile(&s.latencies, 99.0)),
            s.errors
        );
    }
    if let Some(tls) = &f.tls {
        println!(
            "    {:<34} {:>10.0} {:>10} {:>10} {:>7}",
            "jobz, HTTPS + client cert + token",
            tls.rate,
            fmt_duration(percentile(&tls.latencies, 50.0)),
            fmt_duration(percentile(&tls.latencies, 99.0)),
            tls.errors
        );
    }
    println!(
        "    ratio jobz / bare: {:.2} (process {:.2}); in-process jobs per store commit: {:.1}, per sync (journal or WAL): {:.1}",
        f.jobz.rate / f.bare.rate,
        f.process.rate / f.bare.rate,
        f.jobs_per_commit,
        f.jobs_per_sync
    );
    if let Some(tls) = &f.tls {
        println!("    ratio HTTPS / plain jobz: {:.2} (target >= {TARGET_TLS_RATIO})", tls.rate / f.jobz.rate);
    }
    println!("    CPU and context switches (cs) per start, in the window:");
    println!("      bare: {}; {}", f.bare.cpu.machine(), f.bare.cpu.per_job(f.bare.window_starts as f64));
    println!("      jobz: {}; {}", f.jobz.cpu.machine(), f.jobz.cpu.per_job(f.jobz.window_starts as f64));
    println!("      process: {}; {}", f.process.cpu.machine(), f.process.cpu.per_job(f.process.window_starts as f64));
    if let Some(tls) = &f.tls {
        println!("      https: {}; {}", tls.cpu.machine(), tls.cpu.per_job(tls.window_starts as f64));
    }
}

// ---------------------------------------------------------------------------
// (2) end-to-end jobs per second
// ---------------------------------------------------------------------------

/// One batch of jobs run to the end.
struct E2eRun {
    rate: f64,
    /// CPU this process spent from the first start to the end.
    cpu: CpuSnapshot,
    /// How long the starts themselves took (all 202s in).
    accepted_in: Duration,
    /// Jobs that had succeeded when the last 202 came in: what ran beside the starts.
    done_during_starts: usize,
    /// From the last 202 to the last `finished_at`: the queue drained with no starts beside it.
    drained_in: Duration,
    /// The in-process store's commits, WAL syncs, start-journal syncs and changes in all, from its counters.
    store_commits: u64,
    store_syncs: u64,
    store_journal_syncs: u64,
    store_changes: u64,
}

struct E2eFigures {
    mesh: E2eRun,
    ceiling: f64,
    ceiling_cpu: CpuSnapshot,
    runner_only: f64,
    runner_cpu: CpuSnapshot,
    tokio_floor: f64,
    tokio_cpu: CpuSnapshot,
    /// The lean probe's variants, as [`LEAN_VARIANTS`] lists them.
    lean: [(f64, CpuSnapshot); 4],
}

fn e2e_rates(bench: &Bench) -> BenchResult<E2eFigures> {
    // Interleaved, so that a burst of load from elsewhere on the machine does not hit one side only.
    let (mut meshes, mut ceilings, mut runners, mut floors) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut leans: [Vec<(f64, CpuSnapshot)>; 4] = Default::default();
    for _ in 0..RUNS {
        let mesh = InProcess::start(bench, WORKERS)?;
        let run = bench.client.block_on(run_batch(mesh.http, E2E_JOBS));
        let stats = mesh.store.stats();
        mesh.stop();
        meshes.push(E2eRun {
            store_commits: stats.commits,
            store_syncs: stats.syncs,
            store_journal_syncs: stats.journal_syncs,
            store_changes: stats.changes,
            ..run?
        });
        ceilings.push(spawn_ceiling(E2E_JOBS, WORKERS)?);
        runners.push(runner_ceiling(E2E_JOBS, WORKERS)?);
        floors.push(tokio_floor(E2E_JOBS, WORKERS)?);
        for (variant, runs) in LEAN_VARIANTS.iter().zip(leans.iter_mut()) {
            runs.push(lean_rate(bench, variant, E2E_JOBS, WORKERS)?);
        }
    }
    meshes.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let mesh = meshes.swap_remove(meshes.len() / 2);
    let (ceiling, ceiling_cpu) = median_by_rate(ceilings);
    let (runner_only, runner_cpu) = median_by_rate(runners);
    let (tokio_floor, tokio_cpu) = median_by_rate(floors);
    let lean = leans.map(median_by_rate);
    Ok(E2eFigures { mesh, ceiling, ceiling_cpu, runner_only, runner_cpu, tokio_floor, tokio_cpu, lean })
}

fn median_by_rate(mut runs: Vec<(f64, CpuSnapshot)>) -> (f64, CpuSnapshot) {
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    runs.swap_remove(runs.len() / 2)
}

/// Starts `jobs` noop jobs with [`CLIENTS`] connections, waits until they all
/// succeeded, and takes the rate from the first start to the last `finished_at`.
async fn run_batch(addr: SocketAddr, jobs: usize) -> BenchResult<E2eRun> {
    wait_workers(addr, WORKERS).await?;
    let cpu_from = CpuSnapshot::take();
    let first_start = SystemTime::now();
    let clock = Instant::now();
    start_many(addr, "/job_start?job_name=noop", jobs).await?;
    let accepted_in = clock.elapsed();
    let mut client = Client::connect(addr).await?;
    let deadline = Instant::now() + RUN_DEADLINE;
    let mut done_during_starts = None;
    loop {
        let metrics = client.text("/metrics").await?;
        let succeeded = metric(&metrics, r#"jobz_jobs{job_name="noop",status="succeeded"}"#).unwrap_or(0.0) as usize;
        let failed: f64 = ["failed", "timed_out", "cancelled"]
            .iter()
            .filter_map(|s| metric(&metrics, &format!(r#"jobz_jobs{{job_name="noop",status="{s}"}}"#)))
            .sum();
        if failed > 0.0 {
            return Err(format!("{failed} noop job(s) did not succeed").into());
        }
        // The first read follows the last 202 at once.
        done_during_starts.get_or_insert(succeeded);
        if succeeded >= jobs {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {succeeded} of {jobs} jobs succeeded within {RUN_DEADLINE:?}").into());
        }
        tokio::time::sleep(COUNT_POLL).await;
    }
    // Jobs run first in, first out, so the last to finish is among the newest started.
    let list: serde_json::Value =
        serde_json::from_slice(&client.ok("/jobs?status=succeeded&job_name=noop&limit=1000").await?)?;
    let last = list["jobs"]
        .as_array()
        .ok_or("GET /jobs did not list jobs")?
        .iter()
        .filter_map(|j| j["finished_at"].as_str())
        .filter_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .max()
        .ok_or("no finished_at in GET /jobs")?;
    let last = SystemTime::from(last);
    let elapsed = last.duration_since(first_start).map_err(|_| "the last job finished before the first start")?;
    let cpu = cpu_from.until(&CpuSnapshot::take());
    Ok(E2eRun {
        rate: jobs as f64 / elapsed.as_secs_f64(),
        cpu,
        accepted_in,
        done_during_starts: done_during_starts.unwrap_or(0),
        drained_in: elapsed.saturating_sub(accepted_in),
        store_commits: 0,
        store_syncs: 0,
        store_journal_syncs: 0,
        store_changes: 0,
    })
}

/// The machine's ceiling: `threads` threads each spawning `/bin/true` and
/// waiting for it (std uses posix_spawn where it can), `jobs` in all. Returns
/// the rate and what it cost, read before the threads end.
fn spawn_ceiling(jobs: usize, threads: usize) -> BenchResult<(f64, CpuSnapshot)> {
    let done = std::sync::Barrier::new(threads + 1);
    let from = CpuSnapshot::take();
    let clock = Instant::now();
    let (elapsed, spent) = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for _ in 0..threads {
            let done = &done;
            handles.push(std::thread::Builder::new().name("bench-spawner".into()).spawn_scoped(scope, move || {
                let mut result = Ok(());
                for _ in 0..jobs / threads {
                    match Command::new("/bin/true").status() {
                        Ok(status) if status.success() => {}
                        Ok(status) => result = Err(format!("/bin/true ended with {status}")),
                        Err(e) => result = Err(e.to_string()),
                    }
                    if result.is_err() {
                        break;
                    }
                }
                // Held until the CPU is read, so this thread's time is still counted.
                done.wait();
                result
            })?);
        }
        done.wait();
        let elapsed = clock.elapsed();
        let spent = from.until(&CpuSnapshot::take());
        for handle in handles {
            handle.join().map_err(|_| "a spawning thread panicked")??;
        }
        BenchResult::Ok((elapsed, spent))
    })?;
    Ok(((jobs / threads * threads) as f64 / elapsed.as_secs_f64(), spent))
}

/// How the lean probe keeps the jobs' state.
#[derive(Clone, Copy)]
enum LeanState {
    /// Logs only.
    Logs,
    /// jobz's store: each row inserted at the start, updated at the finish.
    Store,
    /// Logs, and each row written once, in bulk, into a database with jobz's schema.
    Bulk,
}

/// One variant of the lean probe, and how the bench names it.
struct LeanVariant {
    state: LeanState,
    /// Each slot asks the runtime thread for its next job.
    round_trip: bool,
    /// Its line among the rates.
    line: &'static str,
    /// Its label among the CPU figures.
    label: &'static str,
}

/// The lean probe's variants, in the order they are run and printed.
const LEAN_VARIANTS: [LeanVariant; 4] = [
    LeanVariant {
        state: LeanState::Logs,
        round_trip: false,
        line: "lean probe: logs, queue, slot threads (not jobz)",
        label: "lean:    ",
    },
    LeanVariant {
        state: LeanState::Store,
        round_trip: false,
        line: "  the same with jobz's store for jobs' rows",
        label: "  store: ",
    },
    LeanVariant {
        state: LeanState::Store,
        round_trip: true,
        line: "  and a round trip per job, as credit 1 asks",
        label: "  trip:  ",
    },
    LeanVariant {
        state: LeanState::Bulk,
        round_trip: false,
        line: "  logs, and each row written once, in bulk",
        label: "  bulk:  ",
    },
];

/// The lean probe (`probe/lean.rs`): the same 5,000 starts from the same
/// clients against a model of the leanest durable design, timed from the first
/// start to the last finish. A yardstick for the mesh, not jobz.
fn lean_rate(bench: &Bench, variant: &LeanVariant, jobs: usize, slots: usize) -> BenchResult<(f64, CpuSnapshot)> {
    let dir = tempfile::tempdir_in(&bench.base)?;
    let durable = match variant.state {
        LeanState::Logs => lean::Durable::Logs,
        LeanState::Store => lean::Durable::Store(SqliteStore::open(dir.path(), StoreOptions::default())?),
        LeanState::Bulk => {
            // jobz's schema, made by the store itself, then left to the probe's own connection.
            let store = SqliteStore::open(dir.path(), StoreOptions::default())?;
            bench.client.block_on(broker::store::Store::close(&store));
            drop(store);
            lean::Durable::LogsAndBulk(dir.path().join("jobz.sqlite3"))
        }
    };
    let probe = lean::Probe::start(dir.path(), durable, variant.round_trip, jobs, slots)?;
    let from = CpuSnapshot::take();
    let first_start = SystemTime::now();
    let started = bench.client.block_on(start_many(probe.addr, "/job_start?job_name=noop", jobs));
    let last = started.and_then(|()| probe.wait_done(RUN_DEADLINE));
    let spent = from.until(&CpuSnapshot::take());
    probe.stop(STOP_DEADLINE)?;
    let elapsed =
        last?.duration_since(first_start).map_err(|_| "the probe's last job finished before its first start")?;
    Ok((jobs as f64 / elapsed.as_secs_f64(), spent))
}

/// The worker's runner alone, no broker, no network: `tasks` concurrent loops
/// of `runner::run` on `/bin/true` (process group, output pipe, tokio child reaping).
fn runner_ceiling(jobs: usize, tasks: usize) -> BenchResult<(f64, CpuSnapshot)> {
    let spec = Arc::new(JobSpec::new(vec!["/bin/true".to_string()]));
    timed_loops("bench-runner", jobs, tasks, move || {
        let spec = spec.clone();
        async move {
            let outcome = runner::run(&spec, CancellationToken::new(), None).await.map_err(|e| e.to_string())?;
            if !outcome.succeeded() {
                return Err(format!("/bin/true did not succeed under the runner: {:?}", outcome.status));
            }
            Ok(())
        }
    })
}

/// What tokio's process support costs by itself, with the runner's way of
/// spawning and none of its code: `tasks` concurrent loops, each spawning
/// `/bin/true` in a process group of its own, stdin from `/dev/null`, stdout
/// and stderr in one pipe, then reading the pipe to EOF while awaiting the exit
/// (tokio reaps through a pidfd in its epoll). The runner cannot be cheaper
/// than this, and the mesh runs the runner.
fn tokio_floor(jobs: usize, tasks: usize) -> BenchResult<(f64, CpuSnapshot)> {
    let null = Arc::new(File::open("/dev/null")?);
    timed_loops("bench-tokio", jobs, tasks, move || tokio_floor_job(null.clone()))
}

/// One job of [`tokio_floor`].
async fn tokio_floor_job(null: Arc<File>) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let failed = |e: std::io::Error| e.to_string();
    let (sender, mut receiver) = tokio::net::unix::pipe::pipe().map_err(failed)?;
    let stdout = sender.into_blocking_fd().map_err(failed)?;
    let stderr = stdout.try_clone().map_err(failed)?;
    let mut command = tokio::process::Command::new("/bin/true");
    command.process_group(0).stdin(null.try_clone().map_err(failed)?).stdout(stdout).stderr(stderr);
    let mut child = command.spawn().map_err(failed)?;
    drop(command);
    let drain = async {
        let mut buffer = Vec::with_capacity(16 * 1024);
        while receiver.read_buf(&mut buffer).await? > 0 {
            buffer.clear();
        }
        std::io::Result::Ok(())
    };
    let (read, status) = tokio::join!(drain, child.wait());
    read.map_err(failed)?;
    if !status.map_err(failed)?.success() {
        return Err("/bin/true did not succeed under tokio::process".into());
    }
    Ok(())
}

/// Runs `tasks` concurrent loops of `jobs / tasks` calls of `job` each, on a
/// multi-thread runtime of its own whose threads are named `thread_name`.
/// Returns the rate and the CPU spent, read before the runtime's threads end.
fn timed_loops<J, F>(thread_name: &str, jobs: usize, tasks: usize, job: J) -> BenchResult<(f64, CpuSnapshot)>
where
    J: Fn() -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Result<(), String>> + Send,
{
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name(thread_name).build()?;
    let per_task = jobs / tasks;
    let from = CpuSnapshot::take();
    let clock = Instant::now();
    runtime.block_on(async {
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let job = job.clone();
            handles.push(tokio::spawn(async move {
                for _ in 0..per_task {
                    job().await?;
                }
                Ok::<(), String>(())
            }));
        }
        for handle in handles {
            tokio::time::timeout(RUN_DEADLINE, handle)
                .await
                .map_err(|_| format!("a {thread_name} loop timed out"))???;
        }
        BenchResult::Ok(())
    })?;
    let elapsed = clock.elapsed();
    let spent = from.until(&CpuSnapshot::take());
    runtime.shutdown_timeout(STOP_DEADLINE);
    Ok(((per_task * tasks) as f64 / elapsed.as_secs_f64(), spent))
}

fn print_e2e(f: &E2eFigures) {
    println!("    {:<52} {:>10} {:>9}", "", "jobs/s", "vs ceiling");
    println!("    {:<52} {:>10.0} {:>9}", "ceiling: 2 threads, std Command::status(/bin/true)", f.ceiling, "1.00");
    println!(
        "    {:<52} {:>10.0} {:>9.2}",
        "tokio floor: 2 tasks, tokio::process, pipe, pgroup",
        f.tokio_floor,
        f.tokio_floor / f.ceiling
    );
    println!(
        "    {:<52} {:>10.0} {:>9.2}",
        "runner only: 2 tasks, worker::runner::run(/bin/true)",
        f.runner_only,
        f.runner_only / f.ceiling
    );
    for (variant, (rate, _)) in LEAN_VARIANTS.iter().zip(&f.lean) {
        println!("    {:<52} {rate:>10.0} {:>9.2}", variant.line, rate / f.ceiling);
    }
    println!(
        "    {:<52} {:>10.0} {:>9.2}",
        "jobz mesh in-process: broker + 2 workers (jobz up)",
        f.mesh.rate,
        f.mesh.rate / f.ceiling
    );
    let jobs = E2E_JOBS as f64;
    println!("    CPU and context switches (cs) per job, in this process:");
    println!("      ceiling: {}; {}", f.ceiling_cpu.machine(), f.ceiling_cpu.per_job(jobs));
    println!("      tokio:   {}; {}", f.tokio_cpu.machine(), f.tokio_cpu.per_job(jobs));
    println!("      runner:  {}; {}", f.runner_cpu.machine(), f.runner_cpu.per_job(jobs));
    for (variant, (_, cpu)) in LEAN_VARIANTS.iter().zip(&f.lean) {
        println!("      {}{}; {}", variant.label, cpu.machine(), cpu.per_job(jobs));
    }
    println!("      mesh:    {}; {}", f.mesh.cpu.machine(), f.mesh.cpu.per_job(jobs));
    println!(
        "      mesh store: {:.2} commits, {:.2} WAL syncs and {:.2} journal syncs per job, {:.1} changes per commit",
        f.mesh.store_commits as f64 / jobs,
        f.mesh.store_syncs as f64 / jobs,
        f.mesh.store_journal_syncs as f64 / jobs,
        f.mesh.store_changes as f64 / f.mesh.store_commits.max(1) as f64
    );
    println!(
        "    (the {E2E_JOBS} starts of the median run were all answered 202 in {}; the jobs queue meanwhile)",
        fmt_duration(f.mesh.accepted_in)
    );
    // The run in two phases: while the starts come in, and the queue drained after them.
    let during = f.mesh.done_during_starts as f64;
    let beside = during / f.mesh.accepted_in.as_secs_f64().max(1e-9);
    let drained = (jobs - during) / f.mesh.drained_in.as_secs_f64().max(1e-9);
    println!(
        "    phases of the median run: beside the starts {:.0} starts/s and {:.0} jobs/s ({:.2} of the ceiling); \
         after them {:.0} jobs/s ({:.2})",
        jobs / f.mesh.accepted_in.as_secs_f64().max(1e-9),
        beside,
        beside / f.ceiling,
        drained,
        drained / f.ceiling
    );
}

// ---------------------------------------------------------------------------
// (3) latency from the 202 to the process start
// ---------------------------------------------------------------------------

struct LatencyFigures {
    /// 202 received → `date` read its clock, through the mesh.
    mesh: Vec<i64>,
    /// Request sent → 202 received.
    accept: Vec<Duration>,
    /// Spawn → `date` read its clock, std::process directly (date's own start-up).
    direct: Vec<i64>,
    /// Spawn → `date` read its clock, through `worker::runner::run`.
    runner: Vec<i64>,
    metrics: String,
}

fn start_latency(bench: &Bench) -> BenchResult<LatencyFigures> {
    let mesh = InProcess::start(bench, WORKERS)?;
    let measured = bench.client.block_on(mesh_latency(mesh.http));
    mesh.stop();
    let (mesh_samples, accept, metrics) = measured?;
    let mut direct = Vec::new();
    for i in 0..LATENCY_WARMUP_SAMPLES + LATENCY_SAMPLES {
        let before = now_ns();
        let output = Command::new("/bin/date").arg("+%s%N").stderr(Stdio::null()).output()?;
        let stamp = parse_stamp(&String::from_utf8_lossy(&output.stdout))?;
        if i >= LATENCY_WARMUP_SAMPLES {
            direct.push((stamp - before) as i64);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let runner_samples = runtime.block_on(async {
        let spec = JobSpec::new(vec!["/bin/date".to_string(), "+%s%N".to_string()]);
        let mut samples = Vec::new();
        for i in 0..LATENCY_WARMUP_SAMPLES + LATENCY_SAMPLES {
            let before = now_ns();
            let outcome = runner::run(&spec, CancellationToken::new(), None).await?;
            let stamp = parse_stamp(&outcome.tail)?;
            if i >= LATENCY_WARMUP_SAMPLES {
                samples.push((stamp - before) as i64);
            }
        }
        BenchResult::Ok(samples)
    })?;
    let mut figures = LatencyFigures { mesh: mesh_samples, accept, direct, runner: runner_samples, metrics };
    figures.mesh.sort_unstable();
    figures.accept.sort_unstable();
    figures.direct.sort_unstable();
    figures.runner.sort_unstable();
    Ok(figures)
}

/// One `stamp` job at a time: 202 receipt time against the time `date` printed.
async fn mesh_latency(addr: SocketAddr) -> BenchResult<(Vec<i64>, Vec<Duration>, String)> {
    wait_workers(addr, WORKERS).await?;
    let mut client = Client::connect(addr).await?;
    let mut poller = Client::connect(addr).await?;
    let mut samples = Vec::new();
    let mut accept = Vec::new();
    for i in 0..LATENCY_WARMUP_SAMPLES + LATENCY_SAMPLES {
        let sent = Instant::now();
        let (status, body) = client.get("/job_start?job_name=stamp").await?;
        let accepted_at = now_ns();
        let accept_time = sent.elapsed();
        if status != StatusCode::ACCEPTED {
            return Err(format!("start answered {status}: {}", String::from_utf8_lossy(&body)).into());
        }
        let started: serde_json::Value = serde_json::from_slice(&body)?;
        let id = started["id"].as_str().ok_or("no id in the 202")?.to_string();
        let job = wait_final(&mut poller, &id).await?;
        if job["status"] != "succeeded" {
            return Err(format!("stamp job {id} ended {}: {}", job["status"], job["output"]).into());
        }
        let stamp = parse_stamp(job["output"].as_str().unwrap_or(""))?;
        if i >= LATENCY_WARMUP_SAMPLES {
            samples.push((stamp - accepted_at) as i64);
            accept.push(accept_time);
        }
    }
    let metrics = client.text("/metrics").await?;
    Ok((samples, accept, metrics))
}

/// Polls `GET /jobs/{id}` until the job's status is final.
async fn wait_final(client: &mut Client, id: &str) -> BenchResult<serde_json::Value> {
    let deadline = Instant::now() + SAMPLE_DEADLINE;
    tokio::time::sleep(LATENCY_FIRST_POLL).await;
    loop {
        let job: serde_json::Value = serde_json::from_slice(&client.ok(&format!("/jobs/{id}")).await?)?;
        if !matches!(job["status"].as_str(), Some("queued" | "running")) {
            return Ok(job);
        }
        if Instant::now() > deadline {
            return Err(format!("job {id} did not end within {SAMPLE_DEADLINE:?}").into());
        }
        tokio::time::sleep(LATENCY_POLL).await;
    }
}

fn parse_stamp(text: &str) -> BenchResult<i128> {
    text.trim().parse::<i128>().map_err(|e| format!("date printed {text:?}: {e}").into())
}

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

fn print_latency(f: &LatencyFigures) {
    println!("    {:<58} {:>9} {:>9} {:>9}", "", "p50", "p99", "max");
    let row = |name: &str, v: &[i64]| {
        let get = |p: f64| fmt_signed_ns(percentile_i64(v, p));
        println!("    {:<58} {:>9} {:>9} {:>9}", name, get(50.0), get(99.0), get(100.0));
    };
    row("spawn -> date's clock, std Command (date's own start-up)", &f.direct);
    row("spawn -> date's clock, worker::runner::run", &f.runner);
    row("jobz: 202 received -> date's clock (the measured figure)", &f.mesh);
    let accept = |p: f64| fmt_duration(percentile(&f.accept, p));
    println!(
        "    {:<58} {:>9} {:>9} {:>9}",
        "jobz: request sent -> 202 received",
        accept(50.0),
        accept(99.0),
        accept(100.0)
    );
    println!(
        "    (from /metrics: dispatch latency p50 ~{} p99 ~{}; queued-to-spawn p50 ~{} p99 ~{}; bucket upper bounds)",
        fmt_seconds(histogram_quantile(&f.metrics, "jobz_dispatch_latency_seconds", 0.5)),
        fmt_seconds(histogram_quantile(&f.metrics, "jobz_dispatch_latency_seconds", 0.99)),
        fmt_seconds(histogram_quantile(&f.metrics, "jobz_start_latency_seconds", 0.5)),
        fmt_seconds(histogram_quantile(&f.metrics, "jobz_start_latency_seconds", 0.99)),
    );
}

// ---------------------------------------------------------------------------
// (4) dispatch with a backlog, separate processes
// ---------------------------------------------------------------------------

struct BacklogFigures {
    /// Starts per second while filling the backlog.
    fill_rate: f64,
    /// Starts per second of each slice of the fill, in order.
    fill_slices: Vec<f64>,
    /// The first E2E_JOBS completions with the backlog, from the workers' spawn.
    rate: f64,
    /// The same, from the first completion (worker start-up left out).
    steady_rate: f64,
    /// The same processes, no backlog: E2E_JOBS started and run (the control).
    control_rate: f64,
    /// CPU per job of each process, in the control and with the backlog.
    control_cpu: String,
    backlog_cpu: String,
    rss_idle_kib: u64,
    rss_backlog_kib: u64,
    rss_after_kib: u64,
    /// The in-process mesh of (2) with the same backlog: the first E2E_JOBS completions.
    in_process_rate: f64,
}

fn backlog_rates(bench: &Bench) -> BenchResult<BacklogFigures> {
    let binary = jobz_binary()?;
    println!("    binary: {}", binary.display());

    // The control: the same processes, workers attached first, no backlog.
    let (control_rate, control_cpu) = {
        let mut mesh = Processes::broker(bench, &binary)?;
        mesh.workers(&binary, WORKERS, 1)?;
        let before = mesh.snapshots();
        let run = bench.client.block_on(run_batch(mesh.http, E2E_JOBS));
        let spent = spent_per_job(&before, &mesh.snapshots(), E2E_JOBS as f64);
        mesh.stop();
        (run?.rate, spent)
    };

    let mut mesh = Processes::broker(bench, &binary)?;
    let rss_idle_kib = vm_rss_kib(mesh.broker_pid())?;
    let measured = bench.client.block_on(async {
        // In slices, to see whether accepting slows down as the table grows.
        let clock = Instant::now();
        let mut slices = Vec::new();
        for _ in 0..BACKLOG_SLICES {
            let slice = Instant::now();
            start_many(mesh.http, "/job_start?job_name=noop", BACKLOG / BACKLOG_SLICES).await?;
            slices.push((BACKLOG / BACKLOG_SLICES) as f64 / slice.elapsed().as_secs_f64());
        }
        let fill_rate = (BACKLOG / BACKLOG_SLICES * BACKLOG_SLICES) as f64 / clock.elapsed().as_secs_f64();
        let mut client = Client::connect(mesh.http).await?;
        wait_metric(&mut client, r#"jobz_queue_depth{job_name="noop"}"#, BACKLOG as f64).await?;
        BenchResult::Ok((fill_rate, slices))
    });
    let (fill_rate, fill_slices) = match measured {
        Ok(rates) => rates,
        Err(e) => {
            mesh.stop();
            return Err(e);
        }
    };
    let rss_backlog_kib = vm_rss_kib(mesh.broker_pid())?;
    let attached = Instant::now();
    let broker_before = mesh.snapshots();
    let drained =
        mesh.workers(&binary, WORKERS, 1).and_then(|()| bench.client.block_on(count_completions(mesh.http, attached)));
    let backlog_cpu = spent_per_job(&broker_before, &mesh.snapshots(), E2E_JOBS as f64);
    let rss_after_kib = vm_rss_kib(mesh.broker_pid()).unwrap_or(0);
    mesh.stop();
    let (rate, steady_rate) = drained?;

    // The same backlog in the in-process mesh of (2), `jobz up`'s: its workers attach once it is queued.
    let mesh = InProcess::start(bench, 0)?;
    let drained = bench.client.block_on(async {
        start_many(mesh.http, "/job_start?job_name=noop", BACKLOG).await?;
        let mut client = Client::connect(mesh.http).await?;
        wait_metric(&mut client, r#"jobz_queue_depth{job_name="noop"}"#, BACKLOG as f64).await?;
        BenchResult::Ok(())
    });
    let attached = Instant::now();
    let drained = drained.and_then(|()| {
        mesh.attach_workers(WORKERS);
        bench.client.block_on(count_completions(mesh.http, attached))
    });
    mesh.stop();
    let (in_process_rate, _) = drained?;
    Ok(BacklogFigures {
        fill_rate,
        fill_slices,
        rate,
        steady_rate,
        control_rate,
        control_cpu,
        backlog_cpu,
        rss_idle_kib,
        rss_backlog_kib,
        rss_after_kib,
        in_process_rate,
    })
}

// ---------------------------------------------------------------------------
// (5) free jobs beside a limited name
// ---------------------------------------------------------------------------

struct LimitedFigures {
    /// `noop` jobs/s with only `noop` queued, 2 workers of 1 slot (2 slots for noop).
    control_rate: f64,
    /// `noop` jobs/s with 10,000 `capped` queued beside them, 2 workers of 2 slots
    /// (two held by `capped` sleeping, two left for noop).
    rate: f64,
    steady_rate: f64,
    /// `capped` jobs running at the end (never more than 2).
    capped_running: f64,
}

fn limited_rates(bench: &Bench) -> BenchResult<LimitedFigures> {
    let binary = jobz_binary()?;
    let fill = |mesh: &Processes, names: &'static [&'static str]| {
        bench.client.block_on(async {
            for name in names {
                let path: &'static str =
                    if *name == "capped" { "/job_start?job_name=capped" } else { "/job_start?job_name=noop" };
                start_many(mesh.http, path, LIMITED_JOBS).await?;
            }
            let mut client = Client::connect(mesh.http).await?;
            wait_metric(&mut client, r#"jobz_queue_depth{job_name="noop"}"#, LIMITED_JOBS as f64).await
        })
    };
    let (control_rate, _) = {
        let mut mesh = Processes::broker(bench, &binary)?;
        fill(&mesh, &["noop"])?;
        let attached = Instant::now();
        let run = mesh
            .workers(&binary, WORKERS, 1)
            .and_then(|()| bench.client.block_on(count_completions(mesh.http, attached)));
        mesh.stop();
        run?
    };
    let mut mesh = Processes::broker(bench, &binary)?;
    fill(&mesh, &["capped", "noop"])?;
    let attached = Instant::now();
    let run = mesh
        .workers(&binary, WORKERS, LIMITED_WORKER_SLOTS)
        .and_then(|()| bench.client.block_on(count_completions(mesh.http, attached)));
    let capped_running = bench.client.block_on(async {
        let mut client = Client::connect(mesh.http).await?;
        let metrics = client.text("/metrics").await?;
        BenchResult::Ok(metric(&metrics, r#"jobz_running{job_name="capped"}"#).unwrap_or(0.0))
    });
    mesh.stop();
    let (rate, steady_rate) = run?;
    Ok(LimitedFigures { control_rate, rate, steady_rate, capped_running: capped_running? })
}

fn print_limited(f: &LimitedFigures) {
    println!("    {:<60} {:>10}", "", "jobs/s");
    println!("    {:<60} {:>10.0}", "noop alone, 2 workers x 1 slot (control)", f.control_rate);
    println!(
        "    {:<60} {:>10.0}",
        format!("noop beside {LIMITED_JOBS} capped, 2 workers x {LIMITED_WORKER_SLOTS} slots"),
        f.rate
    );
    println!("    {:<60} {:>10.0}", "the same, from the first completion (steady state)", f.steady_rate);
    println!("    capped running at the end: {} (limit 2)", f.capped_running);
    println!("    ratio beside the limited name / control: {:.2}", f.rate / f.control_rate);
}

/// Polls the succeeded count until [`E2E_JOBS`] have finished; returns the rate
/// since `from` and the rate since the first poll that saw a completion.
async fn count_completions(addr: SocketAddr, from: Instant) -> BenchResult<(f64, f64)> {
    let mut client = Client::connect(addr).await?;
    let deadline = Instant::now() + RUN_DEADLINE;
    let mut first: Option<(Instant, f64)> = None;
    loop {
        let asked = Instant::now();
        let metrics = client.text("/metrics").await?;
        // The count was taken somewhere in the exchange; its middle is the best guess.
        let at = asked + (Instant::now() - asked) / 2;
        let done = metric(&metrics, r#"jobz_jobs{job_name="noop",status="succeeded"}"#).unwrap_or(0.0);
        if done > 0.0 && first.is_none() {
            first = Some((at, done));
        }
        if done >= E2E_JOBS as f64 {
            let rate = done / (at - from).as_secs_f64();
            let steady = first.map_or(rate, |(t, n)| (done - n) / (at - t).as_secs_f64());
            return Ok((rate, steady));
        }
        if Instant::now() > deadline {
            return Err(format!("only {done} of {E2E_JOBS} backlog jobs succeeded within {RUN_DEADLINE:?}").into());
        }
        tokio::time::sleep(COUNT_POLL_BACKLOG).await;
    }
}

fn print_backlog(f: &BacklogFigures, in_process: Option<f64>) {
    let slices: Vec<String> = f.fill_slices.iter().map(|r| format!("{r:.0}")).collect();
    println!(
        "    filling the backlog: {:.0} starts/s ({CLIENTS} clients; by slice of {}: {})",
        f.fill_rate,
        BACKLOG / BACKLOG_SLICES,
        slices.join(", ")
    );
    println!(
        "    broker VmRSS: {} idle, {} with {BACKLOG} queued ({:.2} KiB per queued job), {} after the run",
        fmt_kib(f.rss_idle_kib),
        fmt_kib(f.rss_backlog_kib),
        f.rss_backlog_kib.saturating_sub(f.rss_idle_kib) as f64 / BACKLOG as f64,
        fmt_kib(f.rss_after_kib)
    );
    println!("    {:<60} {:>10}", "", "jobs/s");
    println!("    {:<60} {:>10.0}", "no backlog, separate processes (control)", f.control_rate);
    println!("    {:<60} {:>10.0}", format!("first {E2E_JOBS} of the backlog, from the workers' spawn"), f.rate);
    println!("    {:<60} {:>10.0}", "the same, from the first completion (steady state)", f.steady_rate);
    println!("    CPU and context switches (cs) per job, no backlog:{}", f.control_cpu);
    println!("    CPU and context switches (cs) per job, first {E2E_JOBS} of the backlog:{}", f.backlog_cpu);
    println!(
        "    {:<60} {:>10.0}",
        format!("in-process (jobz up, as (2)): first {E2E_JOBS} of the backlog"),
        f.in_process_rate
    );
    let versus_in_process = in_process.map_or("n/a".to_string(), |r| format!("{:.2}", f.in_process_rate / r));
    println!(
        "    ratio in-process backlog / (2): {versus_in_process}; separate processes, backlog / control: {:.2}",
        f.rate / f.control_rate
    );
}

/// The `jobz` binary: Cargo's own for this build when it says where
/// (`CARGO_BIN_EXE_jobz`), else `target/release/jobz` beside the workspace.
fn jobz_binary() -> BenchResult<PathBuf> {
    let candidates: Vec<PathBuf> = option_env!("CARGO_BIN_EXE_jobz")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("CARGO_TARGET_DIR").map(|d| PathBuf::from(d).join("release/jobz")))
        .chain([Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/jobz")])
        .collect();
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        format!(
            "no jobz binary at {}; build it first: cargo build --release -p jobz",
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" or ")
        )
        .into()
    })
}

/// Resident memory of a process, from `/proc/PID/status`.
fn vm_rss_kib(pid: u32) -> BenchResult<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status").into())
}

/// CURVE keys of one run of separate processes, written as `jobz keygen` would.
struct MeshKeys {
    broker: jobz_core::curve::KeyFiles,
    /// The allowed-keys directory: every worker's public key.
    allowed: PathBuf,
    /// Each worker's secret key file; worker `i` uses `workers[i % len]`.
    workers: Vec<PathBuf>,
}

impl MeshKeys {
    fn write(dir: &Path, workers: usize) -> BenchResult<MeshKeys> {
        use jobz_core::curve::{write_key_pair, KeyPair};
        let broker = write_key_pair(&dir.join("broker-key"), &KeyPair::generate()?, "for the bench")?;
        let allowed = dir.join("allowed");
        std::fs::create_dir_all(&allowed)?;
        let mut secrets = Vec::new();
        for i in 0..workers.max(1) {
            let files = write_key_pair(&dir.join(format!("worker-{i}-key")), &KeyPair::generate()?, "for the bench")?;
            std::fs::copy(&files.public, allowed.join(format!("worker-{i}.pub")))?;
            secrets.push(files.secret);
        }
        Ok(MeshKeys { broker, allowed, workers: secrets })
    }
}

/// A real broker process and its workers, killed by PID when stopped or dropped.
struct Processes {
    dir: tempfile::TempDir,
    job_path: PathBuf,
    http: SocketAddr,
    endpoint: String,
    broker: Option<Child>,
    workers: Vec<Child>,
    /// With `JOBZ_BENCH_CURVE=1`, the keys the processes were given.
    keys: Option<MeshKeys>,
}

impl Processes {
    fn broker(bench: &Bench, binary: &Path) -> BenchResult<Processes> {
        let dir = tempfile::tempdir_in(&bench.base)?;
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let endpoint = format!("tcp://127.0.0.1:{}", free_port()?);
        let log = File::create(dir.path().join("broker.log"))?;
        let keys = if bench.curve { Some(MeshKeys::write(dir.path(), WORKERS)?) } else { None };
        let mut command = Command::new(binary);
        command
            .arg("broker")
            .arg("--config")
            .arg(&bench.job_path)
            .args(["--http", &http.to_string(), "--bind", &endpoint, "--data"])
            .arg(dir.path().join("data"));
        if let Some(keys) = &keys {
            command.arg("--curve-key").arg(&keys.broker.secret).arg("--allowed-keys").arg(&keys.allowed);
        }
        let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn()?;
        let mut mesh = Processes {
            dir,
            job_path: bench.job_path.clone(),
            http,
            endpoint,
            broker: Some(child),
            workers: Vec::new(),
            keys,
        };
        let healthy = bench.client.block_on(async {
            let deadline = Instant::now() + STARTUP_DEADLINE;
            loop {
                if let Ok(mut client) = Client::connect(http).await {
                    if let Ok((StatusCode::OK, _)) = client.get("/healthz").await {
                        return Ok(());
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!("the broker did not answer /healthz within {STARTUP_DEADLINE:?}"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        if let Err(e) = healthy {
            let log = std::fs::read_to_string(mesh.dir.path().join("broker.log")).unwrap_or_default();
            mesh.stop();
            return Err(format!("{e}; its log:\n{log}").into());
        }
        Ok(mesh)
    }

    /// CPU and context switches of the broker and each worker, by process and thread name.
    fn snapshots(&self) -> Vec<(String, CpuSnapshot)> {
        let broker = self.broker.iter().map(|c| ("broker".to_string(), c));
        let workers = self.workers.iter().enumerate().map(|(i, c)| (format!("worker-{i}"), c));
        broker.chain(workers).map(|(name, child)| (name, CpuSnapshot::of(&format!("/proc/{}", child.id())))).collect()
    }

    fn broker_pid(&self) -> u32 {
        self.broker.as_ref().map_or(0, Child::id)
    }

    /// Starts `count` workers with `slots` concurrency each and waits until the broker lists them.
    fn workers(&mut self, binary: &Path, count: usize, slots: usize) -> BenchResult<()> {
        for i in 0..count {
            let log = File::create(self.dir.path().join(format!("worker-{i}.log")))?;
            let slots = slots.to_string();
            let mut command = Command::new(binary);
            command
                .args(["worker", "--broker", &self.endpoint, "--concurrency", &slots, "--name", &format!("bench-{i}")])
                .arg("--config")
                .arg(&self.job_path);
            if let Some(keys) = &self.keys {
                let own = &keys.workers[i % keys.workers.len()];
                command.arg("--curve-key").arg(own).arg("--broker-key").arg(&keys.broker.public);
            }
            let child = command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn()?;
            self.workers.push(child);
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(wait_workers(self.http, count))
    }

    /// SIGTERM to everyone, a bounded wait, then SIGKILL to whoever is left; by PID only.
    fn stop(&mut self) {
        let mut children: Vec<Child> = self.workers.drain(..).chain(self.broker.take()).collect();
        for child in &children {
            signal(child.id(), libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_DEADLINE;
        for child in &mut children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                signal(child.id(), libc::SIGKILL);
                // Reaps it; a wait error leaves nothing more to do.
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        self.stop();
    }
}

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on the PID of a child we started and have not reaped; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

fn free_port() -> BenchResult<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---------------------------------------------------------------------------
// Servers: an in-process mesh, a bare hyper server
// ---------------------------------------------------------------------------

/// A broker, its front door and `workers` workers in one runtime of their own,
/// started with the same library calls as `jobz up` (jobz/src/mesh_cmd.rs).
struct InProcess {
    runtime: Runtime,
    http: SocketAddr,
    store: SqliteStore,
    /// Stops the front door and the workers; the loop outlives the workers so they can drain.
    stop_front: CancellationToken,
    stop_loop: CancellationToken,
    broker_tasks: TaskTracker,
    worker_tasks: TaskTracker,
    /// For workers attached later ([`InProcess::attach_workers`]).
    local: jobz_core::transport::LocalConnector,
    file: Arc<config::JobFile>,
    ctx: zmq::Context,
    _dir: tempfile::TempDir,
}

impl InProcess {
    fn start(bench: &Bench, workers: usize) -> BenchResult<InProcess> {
        InProcess::start_with(bench, workers, HttpOptions::default())
    }

    /// [`InProcess::start`] with the front door's options (HTTPS, tokens).
    fn start_with(bench: &Bench, workers: usize, options: HttpOptions) -> BenchResult<InProcess> {
        let dir = tempfile::tempdir_in(&bench.base)?;
        // One worker thread, as `jobz up` runs (jobz/src/limits.rs, RUNTIME_WORKER_THREADS).
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("jobz-broker")
            .build()?;
        let ctx = zmq::Context::new();
        let (stop_front, stop_loop) = (CancellationToken::new(), CancellationToken::new());
        let (broker_tasks, worker_tasks) = (TaskTracker::new(), TaskTracker::new());
        let store = SqliteStore::open(dir.path(), StoreOptions::default())?;
        let (http, local) = runtime.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let http = listener.local_addr()?;
            let router = Router::bind(&ctx, "tcp://127.0.0.1:0", &SocketOptions::default())?;
            let local = router.local_connector();
            let mut config = BrokerConfig::new(bench.file.clone(), dir.path().to_path_buf());
            config.url = Some(format!("http://{http}"));
            let (handle, loop_task) = broker::core::start(config, store.clone(), router, stop_loop.clone()).await?;
            broker_tasks.spawn(async move {
                if let Err(e) = loop_task.await {
                    eprintln!("the broker loop failed: {e}");
                }
            });
            let stop = stop_front.clone();
            broker_tasks.spawn(async move {
                if let Err(e) = broker::http::serve(listener, handle, options, stop).await {
                    eprintln!("the front door stopped: {e}");
                }
            });
            BenchResult::Ok((http, local))
        })?;
        broker_tasks.close();
        worker_tasks.close();
        let mesh = InProcess {
            runtime,
            http,
            store,
            stop_front,
            stop_loop,
            broker_tasks,
            worker_tasks,
            local,
            file: bench.file.clone(),
            ctx,
            _dir: dir,
        };
        mesh.attach_workers(workers);
        Ok(mesh)
    }

    /// Starts `workers` workers of concurrency 1 that reach the broker in-process, as `jobz up`'s.
    fn attach_workers(&self, workers: usize) {
        for i in 1..=workers {
            let mut config = WorkerConfig::new("in-process".into(), self.file.clone(), format!("bench-up-{i}"), 1);
            config.local = Some(self.local.clone());
            let (ctx, stop) = (self.ctx.clone(), self.stop_front.clone());
            self.worker_tasks.spawn_on(
                async move {
                    if let Err(e) = worker::mesh::run(config, &ctx, stop).await {
                        eprintln!("a worker stopped: {e}");
                    }
                },
                self.runtime.handle(),
            );
        }
    }

    /// The order of `jobz up`: front door and workers, then the loop; each wait bounded.
    fn stop(self) {
        self.stop_front.cancel();
        let stopped = self.runtime.block_on(async {
            let workers = tokio::time::timeout(STOP_DEADLINE, self.worker_tasks.wait()).await.is_ok();
            self.stop_loop.cancel();
            workers && tokio::time::timeout(STOP_DEADLINE, self.broker_tasks.wait()).await.is_ok()
        });
        if !stopped {
            eprintln!("    the in-process mesh did not stop within {STOP_DEADLINE:?}; dropping it");
        }
        drop(self.store);
        self.runtime.shutdown_timeout(STOP_DEADLINE);
    }
}

/// The yardstick: hyper 1.x, http1 with keep-alive, 202 and a start's worth of JSON at once.
struct BareServer {
    runtime: Runtime,
    addr: SocketAddr,
}

const BARE_BODY: &[u8] = br#"{"id":"019ab1c2-0000-7000-8000-000000000000","job_name":"noop","status":"queued","run_id":"019ab1c2-0000-7000-8000-000000000000"}"#;

impl BareServer {
    fn start() -> BenchResult<BareServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("bare-hyper").build()?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                // Same as the front door: small answers are not held back by Nagle.
                if let Err(e) = stream.set_nodelay(true) {
                    eprintln!("bare server: TCP_NODELAY: {e}");
                }
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_request: Request<hyper::body::Incoming>| async {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(StatusCode::ACCEPTED)
                                .header(hyper::header::CONTENT_TYPE, "application/json")
                                .body(Full::new(Bytes::from_static(BARE_BODY)))
                                .unwrap_or_default(),
                        )
                    });
                    // The load ends by dropping its connections; nothing to report then.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(BareServer { runtime, addr })
    }

    fn stop(self) {
        self.runtime.shutdown_timeout(STOP_DEADLINE);
    }
}

// ---------------------------------------------------------------------------
// The HTTP client: one hyper http1 connection per client, no pool
// ---------------------------------------------------------------------------

/// How a client gets in: plain, or TLS (with its client certificate) and a bearer token.
#[derive(Clone, Default)]
struct Access {
    tls: Option<tokio_rustls::TlsConnector>,
    /// The `Authorization` header's value.
    authorization: Option<String>,
}

struct Client {
    access: Access,
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> BenchResult<Client> {
        Client::connect_with(addr, Access::default()).await
    }

    async fn connect_with(addr: SocketAddr, access: Access) -> BenchResult<Client> {
        let stream = open_stream(addr, &access).await?;
        let sender = tokio::time::timeout(REQUEST_DEADLINE, spawn_connection(TokioIo::new(stream)))
            .await
            .map_err(|_| format!("the handshake with {addr} took over {REQUEST_DEADLINE:?}"))??;
        Ok(Client { access, sender })
    }

    /// One GET on this connection: its status and whole body.
    async fn get(&mut self, path: &str) -> BenchResult<(StatusCode, Bytes)> {
        tokio::time::timeout(REQUEST_DEADLINE, async {
            self.sender.ready().await?;
            let mut request = Request::get(path).header(hyper::header::HOST, "127.0.0.1");
            if let Some(authorization) = &self.access.authorization {
                request = request.header(hyper::header::AUTHORIZATION, authorization);
            }
            let request = request.body(Empty::new())?;
            let response = self.sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            BenchResult::Ok((status, body))
        })
        .await
        .map_err(|_| format!("GET {path} took over {REQUEST_DEADLINE:?}"))?
    }

    /// A GET that must answer 200.
    async fn ok(&mut self, path: &str) -> BenchResult<Bytes> {
        match self.get(path).await? {
            (StatusCode::OK, body) => Ok(body),
            (status, body) => Err(format!("GET {path}: {status}: {}", String::from_utf8_lossy(&body)).into()),
        }
    }

    async fn text(&mut self, path: &str) -> BenchResult<String> {
        Ok(String::from_utf8_lossy(&self.ok(path).await?).into_owned())
    }
}

/// The HTTP/1.1 handshake on `io`, with the connection driven by a task of its own.
async fn spawn_connection<I>(io: I) -> BenchResult<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        // A connection dropped at the end of a load ends with an error nobody needs.
        let _ = connection.await;
    });
    Ok(sender)
}

// ---------------------------------------------------------------------------
// The load generator: one task per connection writing a request it built once
// and reading the answer straight off the socket, as wrk does. A load
// generator shares this machine's two cores with the server it loads, so it
// must cost little per request: hyper's client (a task for the caller and one
// for the connection, a request built each time) cost about twice as much.
// ---------------------------------------------------------------------------

/// A stream to the server: plain TCP or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// A connection to `addr` as `access` says: TCP without Nagle, and TLS over it if asked.
async fn open_stream(addr: SocketAddr, access: &Access) -> BenchResult<Box<dyn Stream>> {
    tokio::time::timeout(REQUEST_DEADLINE, async {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let stream: Box<dyn Stream> = match &access.tls {
            None => Box::new(stream),
            Some(tls) => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                Box::new(tls.connect(name, stream).await?)
            }
        };
        BenchResult::Ok(stream)
    })
    .await
    .map_err(|_| format!("connecting to {addr} took over {REQUEST_DEADLINE:?}"))?
}

/// One keep-alive connection sending the same GET again and again.
struct Load {
    stream: Box<dyn Stream>,
    request: Arc<[u8]>,
    buffer: Vec<u8>,
}

impl Load {
    async fn connect(addr: SocketAddr, access: &Access, path: &str) -> BenchResult<Load> {
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        if let Some(authorization) = &access.authorization {
            request.push_str(&format!("Authorization: {authorization}\r\n"));
        }
        request.push_str("\r\n");
        let stream = open_stream(addr, access).await?;
        Ok(Load { stream, request: request.into_bytes().into(), buffer: Vec::with_capacity(4096) })
    }

    /// Sends the request once and reads its whole answer: the status, and the body for an error's text.
    async fn once(&mut self) -> BenchResult<(StatusCode, Vec<u8>)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tokio::time::timeout(REQUEST_DEADLINE, async {
            self.stream.write_all(&self.request).await?;
            self.buffer.clear();
            loop {
                if self.stream.read_buf(&mut self.buffer).await? == 0 {
                    return Err("the server closed the connection".into());
                }
                if let Some((status, body)) = parse_answer(&self.buffer)? {
                    return Ok((status, body));
                }
            }
        })
        .await
        .map_err(|_| format!("an answer took over {REQUEST_DEADLINE:?}"))?
    }
}

/// The status and body of a complete HTTP/1.1 answer with a Content-Length,
/// or `None` while more bytes are needed.
fn parse_answer(bytes: &[u8]) -> BenchResult<Option<(StatusCode, Vec<u8>)>> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut answer = httparse::Response::new(&mut headers);
    let head = match answer.parse(bytes)? {
        httparse::Status::Complete(head) => head,
        httparse::Status::Partial => return Ok(None),
    };
    let status = StatusCode::from_u16(answer.code.ok_or("an answer without a status")?)?;
    let length = answer
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .ok_or("an answer without Content-Length")
        .and_then(|h| std::str::from_utf8(h.value).map_err(|_| "a Content-Length that is not text"))?
        .parse::<usize>()?;
    if bytes.len() < head + length {
        return Ok(None);
    }
    if bytes.len() > head + length {
        return Err("more bytes than one answer (nothing was pipelined)".into());
    }
    Ok(Some((status, bytes[head..].to_vec())))
}

/// Sends `count` starts over [`CLIENTS`] connections as fast as they are answered; every one must be a 202.
async fn start_many(addr: SocketAddr, path: &'static str, count: usize) -> BenchResult<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let next = next.clone();
        let mut load = Load::connect(addr, &Access::default(), path).await?;
        clients.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < count as u64 {
                match load.once().await? {
                    (StatusCode::ACCEPTED, _) => {}
                    (status, body) => {
                        return Err(format!("start answered {status}: {}", String::from_utf8_lossy(&body)).into())
                    }
                }
            }
            BenchResult::Ok(())
        }));
    }
    for client in clients {
        client.await??;
    }
    Ok(())
}

/// Waits until the broker lists `count` workers.
async fn wait_workers(addr: SocketAddr, count: usize) -> BenchResult<()> {
    let mut client = Client::connect(addr).await?;
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        let list: serde_json::Value = serde_json::from_slice(&client.ok("/workers").await?)?;
        let seen = list["workers"].as_array().map_or(0, Vec::len);
        if seen >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{seen} of {count} workers registered within {STARTUP_DEADLINE:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until the metric `name` (with labels) reaches `value`.
async fn wait_metric(client: &mut Client, name: &str, value: f64) -> BenchResult<()> {
    let deadline = Instant::now() + RUN_DEADLINE;
    loop {
        let seen = metric(&client.text("/metrics").await?, name).unwrap_or(0.0);
        if seen >= value {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{name} is {seen}, not {value}, after {RUN_DEADLINE:?}").into());
        }
        tokio::time::sleep(COUNT_POLL_BACKLOG).await;
    }
}

// ---------------------------------------------------------------------------
// CPU accounting: where the two cores went
// ---------------------------------------------------------------------------

/// Clock ticks per second of `/proc/*/stat` times (USER_HZ; 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// What a group of threads (one name) has spent so far.
#[derive(Clone, Copy, Default)]
struct Spent {
    /// User + system ticks.
    ticks: u64,
    /// Voluntary + involuntary context switches.
    switches: u64,
}

/// CPU time and context switches of one process's threads, plus its reaped
/// children and the whole machine, at one moment.
#[derive(Clone, Default)]
struct CpuSnapshot {
    /// By thread id, with the thread's name. Threads are told apart by id, so
    /// one that ended between two snapshots takes its time with it instead of
    /// cancelling another's; they are added up by name when printed.
    threads: BTreeMap<u64, (String, Spent)>,
    /// Ticks of reaped child processes (the jobs' processes).
    children: u64,
    /// The machine's busy and total ticks, all CPUs, from `/proc/stat`.
    machine_busy: u64,
    machine_total: u64,
}

impl CpuSnapshot {
    /// This process.
    fn take() -> CpuSnapshot {
        CpuSnapshot::of("/proc/self")
    }

    /// This process, with the threads of process `other` (one the bench started) beside its own.
    fn take_with(other: Option<u32>) -> CpuSnapshot {
        let mut snapshot = CpuSnapshot::take();
        if let Some(pid) = other {
            snapshot.threads.extend(CpuSnapshot::of(&format!("/proc/{pid}")).threads);
        }
        snapshot
    }

    /// The process whose `/proc` directory is `proc_dir`.
    fn of(proc_dir: &str) -> CpuSnapshot {
        let mut snapshot = CpuSnapshot::default();
        if let Ok(tasks) = std::fs::read_dir(format!("{proc_dir}/task")) {
            for task in tasks.flatten() {
                let Some(tid) = task.file_name().to_str().and_then(|t| t.parse::<u64>().ok()) else { continue };
                let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
                let Some((name, ticks, _)) = parse_stat(&stat) else { continue };
                let switches = std::fs::read_to_string(task.path().join("status")).map_or(0, |status| {
                    status
                        .lines()
                        .filter(|l| l.contains("ctxt_switches:"))
                        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                        .sum()
                });
                snapshot.threads.insert(tid, (name, Spent { ticks, switches }));
            }
        }
        let stat = std::fs::read_to_string(format!("{proc_dir}/stat")).unwrap_or_default();
        if let Some((_, _, children)) = parse_stat(&stat) {
            snapshot.children = children;
        }
        if let Some(line) = std::fs::read_to_string("/proc/stat").ok().and_then(|t| t.lines().next().map(str::to_owned))
        {
            // cpu  user nice system idle iowait irq softirq steal ...
            let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
            snapshot.machine_total = ticks.iter().sum();
            let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
            snapshot.machine_busy = snapshot.machine_total.saturating_sub(idle);
        }
        snapshot
    }

    /// What was spent between `self` and `later`.
    fn until(&self, later: &CpuSnapshot) -> CpuSnapshot {
        let threads = later
            .threads
            .iter()
            .map(|(tid, (name, t))| {
                let before = self.threads.get(tid).map(|(_, b)| *b).unwrap_or_default();
                let spent = Spent {
                    ticks: t.ticks.saturating_sub(before.ticks),
                    switches: t.switches.saturating_sub(before.switches),
                };
                (*tid, (name.clone(), spent))
            })
            .collect();
        CpuSnapshot {
            threads,
            children: later.children.saturating_sub(self.children),
            machine_busy: later.machine_busy.saturating_sub(self.machine_busy),
            machine_total: later.machine_total.saturating_sub(self.machine_total),
        }
    }

    fn own_ticks(&self) -> u64 {
        self.threads.values().map(|(_, t)| t.ticks).sum()
    }

    /// Spent by thread name.
    fn by_name(&self) -> BTreeMap<String, Spent> {
        let mut names: BTreeMap<String, Spent> = BTreeMap::new();
        for (name, t) in self.threads.values() {
            let entry = names.entry(name.clone()).or_default();
            entry.ticks += t.ticks;
            entry.switches += t.switches;
        }
        names
    }

    /// Per job: CPU and context switches of each thread name, largest first, and of the job processes.
    fn per_job(&self, jobs: f64) -> String {
        let names = self.by_name();
        let mut threads: Vec<(&String, &Spent)> = names.iter().collect();
        threads.sort_by(|a, b| b.1.ticks.cmp(&a.1.ticks).then(b.1.switches.cmp(&a.1.switches)));
        let mut parts: Vec<String> = threads
            .into_iter()
            .filter(|(_, t)| t.ticks as f64 / TICKS_PER_SECOND / jobs >= 1e-6 || t.switches as f64 / jobs >= 0.1)
            .map(|(name, t)| {
                format!("{name} {} {:.1}cs", fmt_ticks_per(t.ticks, jobs), t.switches as f64 / jobs.max(1.0))
            })
            .collect();
        if self.children > 0 {
            parts.push(format!("job processes {}", fmt_ticks_per(self.children, jobs)));
        }
        parts.join(", ")
    }

    /// The machine's busy share, and the part of it not spent by this process or its reaped children.
    fn machine(&self) -> String {
        let total = self.machine_total.max(1) as f64;
        let ours = (self.own_ticks() + self.children) as f64;
        format!(
            "machine busy {:.0}% (others {:.0}%)",
            100.0 * self.machine_busy as f64 / total,
            (100.0 * (self.machine_busy as f64 - ours) / total).max(0.0)
        )
    }
}

/// A `/proc/*/stat` line: the name, own ticks (utime + stime) and reaped children's ticks (cutime + cstime).
fn parse_stat(stat: &str) -> Option<(String, u64, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_string();
    // After the name: state is field 3; utime, stime, cutime, cstime are fields 14 to 17.
    let fields: Vec<u64> = stat[close + 1..].split_whitespace().skip(1).map(|f| f.parse().unwrap_or(0)).collect();
    let own = fields.get(10)? + fields.get(11)?;
    let children = fields.get(12)? + fields.get(13)?;
    Some((name, own, children))
}

/// Per process, per job: CPU and context switches by thread name, between two [`Processes::snapshots`].
fn spent_per_job(before: &[(String, CpuSnapshot)], after: &[(String, CpuSnapshot)], jobs: f64) -> String {
    after
        .iter()
        .map(|(name, later)| {
            let spent = before.iter().find(|(n, _)| n == name).map_or_else(CpuSnapshot::default, |(_, b)| b.clone());
            format!("\n      {name}: {}", spent.until(later).per_job(jobs))
        })
        .collect()
}

fn fmt_ticks_per(ticks: u64, jobs: f64) -> String {
    fmt_duration(Duration::from_secs_f64(ticks as f64 / TICKS_PER_SECOND / jobs.max(1.0)))
}

// ---------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------

/// The value of the sample `name` (with its labels, exactly as rendered) in a Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The upper bound of the bucket holding quantile `q` of histogram `name`: a coarse figure, as Prometheus gives.
fn histogram_quantile(text: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: BTreeMap<u64, (f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (bound, count) = rest.split_once("\"} ")?;
            let bound: f64 = if bound == "+Inf" { f64::INFINITY } else { bound.parse().ok()? };
            Some(((bound * 1e9).min(u64::MAX as f64) as u64, (bound, count.trim().parse().ok()?)))
        })
        .collect();
    let total = buckets.values().last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets.values().find(|(_, count)| *count >= q * total).map(|(bound, _)| *bound)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

fn percentile_i64(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

fn fmt_duration(d: Duration) -> String {
    fmt_signed_ns(d.as_nanos().min(i64::MAX as u128) as i64)
}

fn fmt_signed_ns(ns: i64) -> String {
    let abs = ns.unsigned_abs();
    let sign = if ns < 0 { "-" } else { "" };
    if abs >= 1_000_000_000 {
        format!("{sign}{:.2}s", abs as f64 / 1e9)
    } else if abs >= 1_000_000 {
        format!("{sign}{:.2}ms", abs as f64 / 1e6)
    } else {
        format!("{sign}{:.0}µs", abs as f64 / 1e3)
    }
}

fn fmt_seconds(s: Option<f64>) -> String {
    match s {
        Some(s) if s.is_finite() => fmt_signed_ns((s * 1e9) as i64),
        Some(_) => "+Inf".to_string(),
        None => "n/a".to_string(),
    }
}

fn fmt_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn summary(
    accept: Option<&AcceptFigures>,
    e2e: Option<&E2eFigures>,
    latency: Option<&LatencyFigures>,
    backlog: Option<&BacklogFigures>,
    limited: Option<&LimitedFigures>,
) {
    let mut rows: Vec<(String, String, String, &str)> = Vec::new();
    if let Some(a) = accept {
        for (server, run) in [("`jobz broker`", &a.process), ("in-process broker", &a.jobz)] {
            rows.push((
                format!("(1) {server} accepted starts/s"),
                format!("{:.0} (bare hyper {:.0}, ratio {:.2})", run.rate, a.bare.rate, run.rate / a.bare.rate),
                format!(">= {TARGET_ACCEPTED_PER_SECOND:.0}"),
                verdict(run.rate >= TARGET_ACCEPTED_PER_SECOND),
            ));
        }
        if let Some(tls) = &a.tls {
            rows.push((
                "(1) HTTPS (mTLS + token) / plain starts/s".into(),
                format!("{:.0} vs {:.0}, ratio {:.2}", tls.rate, a.jobz.rate, tls.rate / a.jobz.rate),
                format!(">= {TARGET_TLS_RATIO}"),
                verdict(tls.rate / a.jobz.rate >= TARGET_TLS_RATIO),
            ));
        }
    }
    if let Some(e) = e2e {
        rows.push((
            "(2) /bin/true jobs/s, mesh vs ceiling".into(),
            format!("{:.0} vs {:.0}, ratio {:.2}", e.mesh.rate, e.ceiling, e.mesh.rate / e.ceiling),
            format!(">= {TARGET_E2E_RATIO}"),
            verdict(e.mesh.rate / e.ceiling >= TARGET_E2E_RATIO),
        ));
    }
    if let Some(l) = latency {
        let (p50, p99) = (percentile_i64(&l.mesh, 50.0), percentile_i64(&l.mesh, 99.0));
        rows.push((
            "(3) 202 -> process start p50".into(),
            fmt_signed_ns(p50),
            format!("< {}", fmt_duration(TARGET_P50)),
            verdict(p50 < TARGET_P50.as_nanos() as i64),
        ));
        rows.push((
            "(3) 202 -> process start p99".into(),
            fmt_signed_ns(p99),
            format!("< {}", fmt_duration(TARGET_P99)),
            verdict(p99 < TARGET_P99.as_nanos() as i64),
        ));
    }
    if let Some(b) = backlog {
        if let Some(e) = e2e {
            rows.push((
                "(4) in-process backlog jobs/s vs (2)".into(),
                format!("{:.0} vs {:.0}, ratio {:.2}", b.in_process_rate, e.mesh.rate, b.in_process_rate / e.mesh.rate),
                format!(">= {TARGET_E2E_RATIO}"),
                verdict(b.in_process_rate / e.mesh.rate >= TARGET_E2E_RATIO),
            ));
        }
        rows.push((
            "(4) processes: backlog vs no backlog".into(),
            format!("{:.0} vs {:.0}, ratio {:.2}", b.rate, b.control_rate, b.rate / b.control_rate),
            format!(">= {TARGET_E2E_RATIO}"),
            verdict(b.rate / b.control_rate >= TARGET_E2E_RATIO),
        ));
        rows.push(("(4) broker VmRSS with the backlog".into(), fmt_kib(b.rss_backlog_kib), "-".into(), ""));
    }
    if let Some(l) = limited {
        rows.push((
            "(5) free jobs/s beside a limited name".into(),
            format!("{:.0} vs {:.0} alone, ratio {:.2}", l.rate, l.control_rate, l.rate / l.control_rate),
            format!(">= {TARGET_E2E_RATIO}"),
            verdict(l.rate / l.control_rate >= TARGET_E2E_RATIO && l.capped_running <= 2.0),
        ));
    }
    println!("    {:<40} {:<44} {:<10}", "figure", "measured", "target");
    for (name, value, target, verdict) in rows {
        println!("    {name:<40} {value:<44} {target:<10} {verdict}");
    }
}
