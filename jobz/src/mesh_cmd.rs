//! `jobz broker`, `jobz worker` and `jobz up`: the long-running processes.
//! Each stops cleanly on SIGTERM or SIGINT: the front door stops accepting, the
//! workers drain, the broker's store flushes.
//!
//! CURVE keys are read and checked before anything else happens, so a bad key
//! file stops the start with nothing changed. `jobz up` with `--curve-key`
//! encrypts its ZeroMQ socket for remote peers; its own workers and semaphore
//! reach the broker through in-process links, which never leave the process.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use broker::clock::ShiftedClock;
use broker::core::BrokerConfig;
use broker::http::tls::TlsFiles;
use broker::http::{HttpOptions, Tokens};
use broker::store::{SqliteStore, StoreOptions};
use jobz_core::curve::{self, AllowedKeys};
use jobz_core::transport::{require_curve, CurveClient, CurveServer, LocalConnector, Router, SocketOptions};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use worker::mesh::WorkerConfig;

use crate::cli::{load_config, BrokerCurveArgs, ClientCurveArgs, ConfigArg};

/// What `jobz broker` and `jobz up` share.
pub struct BrokerArgs {
    pub config: ConfigArg,
    pub http: String,
    pub bind: String,
    pub data: PathBuf,
    pub allow_drift: bool,
    pub tls: crate::cli::TlsArgs,
    pub tuning: crate::cli::BrokerTuning,
    pub curve: BrokerCurveArgs,
}

pub struct WorkerArgs {
    pub broker: String,
    pub config: ConfigArg,
    pub topics: Vec<String>,
    pub concurrency: Option<usize>,
    pub name: Option<String>,
    pub exit_when_idle: Option<String>,
    pub grace: Option<String>,
    pub curve: ClientCurveArgs,
}

/// The broker's CURVE settings from its flags: its key pair and the allowed
/// public keys, or `None` for plain text. With `local_peers` (`jobz up`, whose
/// own workers and semaphore need no key) no allowed key is needed: remote
/// peers are then all refused.
fn broker_curve(args: &BrokerCurveArgs, local_peers: bool) -> anyhow::Result<Option<CurveServer>> {
    let Some(path) = &args.curve_key else { return Ok(None) };
    require_curve().context("--curve-key")?;
    let key = curve::read_key_pair(path).context("--curve-key")?;
    let allowed = AllowedKeys::load(&args.allowed_keys).context("--allowed-keys")?;
    if allowed.is_empty() && !local_peers {
        bail!(
            "--curve-key needs --allowed-keys DIR_OR_FILE: the public keys of the workers and semaphores \
             that may connect (without any, every one would be refused)"
        );
    }
    Ok(Some(CurveServer { key, allowed }))
}

/// Which end of a ZeroMQ connection an endpoint is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The broker's `--bind`.
    Bind,
    /// A worker's or semaphore's `--broker`.
    Connect,
}

impl Side {
    /// The flag that gives an endpoint for this side.
    fn flag(self) -> &'static str {
        match self {
            Side::Bind => "--bind",
            Side::Connect => "--broker",
        }
    }
}

/// Refuses an endpoint ZeroMQ could not use, before anything is opened, with
/// what the flag takes: `tcp://HOST:PORT`, `ipc://PATH` or `inproc://NAME`.
/// (ZeroMQ itself says only "Invalid argument".) An endpoint to bind may also
/// use `*` or 0 for the port (any free one); one to connect to needs a real port.
pub(crate) fn check_endpoint(endpoint: &str, side: Side) -> anyhow::Result<()> {
    let binding = side == Side::Bind;
    let ok = if let Some(address) = endpoint.strip_prefix("tcp://") {
        match address.rsplit_once(':') {
            Some((host, port)) => {
                !host.is_empty()
                    && !host.contains('/')
                    && (port.parse::<u16>().is_ok_and(|p| p > 0 || binding) || (binding && port == "*"))
            }
            None => false,
        }
    } else if let Some(rest) = endpoint.strip_prefix("ipc://").or_else(|| endpoint.strip_prefix("inproc://")) {
        !rest.is_empty()
    } else {
        false
    };
    if !ok {
        bail!("{}: `{endpoint}` is not a ZeroMQ endpoint; use tcp://HOST:PORT (or ipc://PATH)", side.flag());
    }
    Ok(())
}

/// A worker's or semaphore's CURVE settings from its flags, or `None` for plain text.
pub(crate) fn client_curve(args: &ClientCurveArgs, broker: &str) -> anyhow::Result<Option<CurveClient>> {
    match (&args.curve_key, &args.broker_key) {
        (None, None) => {
            if !curve::is_loopback_endpoint(broker) {
                tracing::warn!(
                    broker,
                    "connecting to a broker off this machine in plain text: anyone on the way can read and \
                     change jobs; use --curve-key and --broker-key"
                );
            }
            Ok(None)
        }
        (Some(path), Some(broker_key)) => {
            require_curve().context("--curve-key")?;
            let key = curve::read_key_pair(path).context("--curve-key")?;
            let broker = curve::public_key_from_arg(broker_key).context("--broker-key")?;
            tracing::info!(public_key = %key.public, broker_key = %broker, "the mesh is encrypted (CURVE)");
            Ok(Some(CurveClient { key, broker }))
        }
        (Some(_), None) => bail!("--curve-key needs --broker-key (the broker's public key)"),
        (None, Some(_)) => bail!("--broker-key needs --curve-key (this process's own key pair)"),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::limits::RUNTIME_WORKER_THREADS)
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// Cancels the returned token on the first SIGTERM or SIGINT.
pub(crate) fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// A running broker: its front door's address and the tasks to wait for.
struct RunningBroker {
    /// The front door's URL (`https://` with TLS), as jobs get it in `JOBZ_URL`.
    url: String,
    endpoint: String,
    /// Links for workers in this process (`jobz up`), beside the ZeroMQ endpoint.
    local: LocalConnector,
    tasks: TaskTracker,
}

async fn start_broker(
    file: Arc<config::JobFile>,
    args: &BrokerArgs,
    curve: Option<CurveServer>,
    ctx: &zmq::Context,
    http_shutdown: CancellationToken,
    loop_shutdown: CancellationToken,
) -> anyhow::Result<RunningBroker> {
    let test_clock = test_clock()?;
    // The TLS files are checked before anything is opened or bound: a bad file changes nothing.
    let tls = front_door_tls(&args.tls)?;
    let tokens = Arc::new(Tokens::from_file(&file));
    // Both ports before the data directory: a bad --http or --bind creates nothing.
    check_endpoint(&args.bind, Side::Bind)?;
    let listener = tokio::net::TcpListener::bind(&args.http)
        .await
        .with_context(|| format!("cannot listen for HTTP on {} (--http takes HOST:PORT)", args.http))?;
    let http_addr = listener.local_addr().context("reading the HTTP address")?;
    let options = SocketOptions::default();
    let encryption = curve.as_ref().map(|server| (server.key.public, server.allowed.len()));
    let router = match curve {
        Some(server) => Router::bind_curve(ctx, &args.bind, &options, server),
        None => Router::bind(ctx, &args.bind, &options),
    }
    .with_context(|| format!("cannot bind the ZeroMQ endpoint {}", args.bind))?;
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("creating the data directory {}", args.data.display()))?;
    let store = SqliteStore::open(&args.data, StoreOptions::default())
        .with_context(|| format!("opening the store in {}", args.data.display()))?;
    let endpoint = router.local_endpoint().to_string();
    let local = router.local_connector();
    match encryption {
        Some((public_key, allowed)) => tracing::info!(
            endpoint,
            %public_key,
            allowed,
            "the mesh is encrypted and authenticated (CURVE): only allowed keys get in"
        ),
        None => warn_if_plain_text(&endpoint),
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{http_addr}");
    warn_if_open(&http_addr, tls.is_some(), args.tls.client_ca.is_some(), tokens.len());
    let mut config = BrokerConfig::new(file, args.data.clone());
    config.allow_drift = args.allow_drift;
    config.url = Some(url.clone());
    config.lease_timeout = duration_flag("--lease-timeout", &args.tuning.lease_timeout)?;
    config.retention = duration_flag("--retention", &args.tuning.retention)?;
    if let Some(clock) = test_clock {
        config.clock = Arc::new(clock);
    }
    let (handle, loop_task) =
        broker::core::start(config, store, router, loop_shutdown).await.context("starting the broker")?;
    let tasks = TaskTracker::new();
    tasks.spawn(async move {
        // The loop only ends at shutdown; a panic inside it is logged by the runtime.
        let _ = loop_task.await;
    });
    let options = HttpOptions { tls, tokens, ..HttpOptions::default() };
    tasks.spawn(async move {
        if let Err(e) = broker::http::serve(listener, handle, options, http_shutdown).await {
            tracing::error!(error = %e, "the front door stopped");
        }
    });
    tasks.close();
    tracing::info!(http = %url, zmq = %endpoint, "broker listening");
    Ok(RunningBroker { url, endpoint, local, tasks })
}

/// The front door's TLS configuration from `--tls-cert`, `--tls-key` and `--client-ca`, if given.
fn front_door_tls(args: &crate::cli::TlsArgs) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        // clap refuses one without the other, so neither was given.
        return Ok(None);
    };
    let files = TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: args.client_ca.clone() };
    let config = broker::http::tls::server_config(&files).context("cannot serve HTTPS")?;
    match &files.client_ca {
        Some(ca) => tracing::info!(client_ca = %ca.display(), "HTTPS with client certificates (mutual TLS)"),
        None => tracing::info!("HTTPS; clients are not asked for certificates (--client-ca asks)"),
    }
    Ok(Some(config))
}

/// Warns when a front door that others can reach lets anyone in, or sends tokens in clear text.
fn warn_if_open(addr: &std::net::SocketAddr, tls: bool, client_ca: bool, tokens: usize) {
    if tokens > 0 {
        tracing::info!(tokens, "the front door asks for a bearer token");
    }
    if addr.ip().is_loopback() {
        return;
    }
    if !client_ca && tokens == 0 {
        tracing::warn!(
            %addr,
            "the front door is NOT loopback and asks for no client certificate nor token: anyone who reaches it can start jobs"
        );
    }
    if !tls {
        tracing::warn!(%addr, "the front door is NOT loopback and NOT encrypted: tokens and job params travel in clear text");
    }
}

/// The environment variable that gives the scheduler a test clock.
const TEST_CLOCK_VAR: &str = "JOBZ_TEST_CLOCK";

/// `JOBZ_TEST_CLOCK=TIME[@SPEEDx]` (a testing aid): the scheduler's clock
/// starts at TIME now and runs SPEED times faster than real time. Anything but
/// a valid value stops the start, so a typo never runs a broker on a wrong clock.
fn test_clock() -> anyhow::Result<Option<ShiftedClock>> {
    let text = match std::env::var(TEST_CLOCK_VAR) {
        Err(std::env::VarError::NotPresent) => return Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("{TEST_CLOCK_VAR} is not valid UTF-8"),
        Ok(text) => text,
    };
    let clock = ShiftedClock::parse(&text).map_err(|e| anyhow::anyhow!("{TEST_CLOCK_VAR}: {e}"))?;
    tracing::warn!(clock = %text, "the scheduler runs on a test clock ({TEST_CLOCK_VAR}); schedules fire by it, not by the system clock");
    Ok(Some(clock))
}

fn duration_flag(flag: &str, value: &str) -> anyhow::Result<std::time::Duration> {
    config::duration::parse_duration(value).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

/// The broker says loudly when its plain-text endpoint can be reached from the network.
fn warn_if_plain_text(endpoint: &str) {
    if !curve::is_loopback_endpoint(endpoint) {
        tracing::warn!(
            endpoint,
            "the ZeroMQ endpoint is NOT loopback and NOT encrypted: anyone who reaches it can pose as a worker \
             (take jobs and their params, report results) or a semaphore, and read the traffic; \
             use --curve-key and --allowed-keys"
        );
    }
}

pub fn broker(args: BrokerArgs) -> anyhow::Result<ExitCode> {
    let file = match load_config(&args.config, false)? {
        Ok(f) => Arc::new(f),
        Err(code) => return Ok(code),
    };
    let curve = broker_curve(&args.curve, false)?;
    runtime()?.block_on(async {
        let shutdown = shutdown_on_signals()?;
        let ctx = zmq::Context::new();
        let running = start_broker(file, &args, curve, &ctx, shutdown.clone(), shutdown.clone()).await?;
        println!("jobz broker: front door {} , workers connect to {}", running.url, running.endpoint);
        shutdown.cancelled().await;
        wait_stopped(&running.tasks).await;
        Ok(ExitCode::SUCCESS)
    })
}

async fn wait_stopped(tasks: &TaskTracker) {
    if tokio::time::timeout(crate::limits::SHUTDOWN_WAIT, tasks.wait()).await.is_err() {
        tracing::warn!("some tasks did not stop in time");
    }
}

fn worker_config(
    args: &WorkerArgs,
    file: Arc<config::JobFile>,
    broker: String,
    name: String,
) -> anyhow::Result<WorkerConfig> {
    let concurrency = args.concurrency.unwrap_or_else(cores);
    if concurrency == 0 {
        bail!("--concurrency must be at least 1: a worker with no slots never runs a job");
    }
    let mut config = WorkerConfig::new(broker, file, name, u32::try_from(concurrency).unwrap_or(u32::MAX));
    config.topics = args.topics.clone();
    if let Some(idle) = &args.exit_when_idle {
        config.exit_when_idle = Some(duration_flag("--exit-when-idle", idle)?);
    }
    if let Some(grace) = &args.grace {
        config.drain_grace = duration_flag("--grace", grace)?;
    }
    Ok(config)
}

pub fn worker(args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let file = match load_config(&args.config, false)? {
        Ok(f) => Arc::new(f),
        Err(code) => return Ok(code),
    };
    check_endpoint(&args.broker, Side::Connect)?;
    let name = args.name.clone().unwrap_or_else(|| format!("{}-{}", worker::mesh::hostname(), std::process::id()));
    let mut config = worker_config(&args, file, args.broker.clone(), name)?;
    config.curve = client_curve(&args.curve, &args.broker)?;
    runtime()?.block_on(async {
        let shutdown = shutdown_on_signals()?;
        let ctx = zmq::Context::new();
        worker::mesh::run(config, &ctx, shutdown).await.context("worker")?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn up(args: BrokerArgs, workers: Option<usize>) -> anyhow::Result<ExitCode> {
    let file = match load_config(&args.config, true)? {
        Ok(f) => Arc::new(f),
        Err(code) => return Ok(code),
    };
    // 0 is allowed: the broker, front door and semaphore in one process, and
    // every job run by workers that connect to it.
    let count = workers.unwrap_or_else(cores);
    let curve = broker_curve(&args.curve, true)?;
    runtime()?.block_on(async {
        let shutdown = shutdown_on_signals()?;
        let ctx = zmq::Context::new();
        // The broker's loop outlives the local workers, so they can drain and hand back through it.
        let loop_shutdown = CancellationToken::new();
        let running = start_broker(file.clone(), &args, curve, &ctx, shutdown.clone(), loop_shutdown.clone()).await?;
        let worker_tasks = TaskTracker::new();
        for i in 1..=count {
            let name = format!("{}-up-{i}", worker::mesh::hostname());
            let wargs = WorkerArgs {
                broker: running.endpoint.clone(),
                config: args.config.clone(),
                topics: Vec::new(),
                concurrency: Some(1),
                name: Some(name.clone()),
                exit_when_idle: None,
                grace: None,
                curve: ClientCurveArgs::default(),
            };
            let mut config = worker_config(&wargs, file.clone(), running.endpoint.clone(), name)?;
            // In the broker's own process: an in-process link, no ZeroMQ and nothing to encrypt.
            config.local = Some(running.local.clone());
            let ctx = ctx.clone();
            let stop = shutdown.clone();
            worker_tasks.spawn(async move {
                if let Err(e) = worker::mesh::run(config, &ctx, stop).await {
                    tracing::error!(error = %e, "a local worker stopped");
                }
            });
        }
        let semaphore = semaphore::SemaphoreConfig {
            broker: running.endpoint.clone(),
            file: file.clone(),
            name: format!("{}-up-semaphore", worker::mesh::hostname()),
            curve: None,
            local: Some(running.local.clone()),
        };
        let (ctx2, stop) = (ctx.clone(), shutdown.clone());
        worker_tasks.spawn(async move {
            if let Err(e) = semaphore::run(semaphore, &ctx2, stop).await {
                tracing::error!(error = %e, "the local semaphore stopped");
            }
        });
        worker_tasks.close();
        let url = &running.url;
        println!(
            "jobz is up: front door {url}, {count} local worker(s) and a semaphore, data in {}",
            args.data.display()
        );
        if count == 0 {
            println!(
                "no local workers: jobs wait for a worker to connect, e.g. `jobz worker --broker {}`",
                running.endpoint
            );
        }
        // With TLS (and tokens), the curl lines need the flags of README's "HTTPS and tokens".
        let curl = if args.tls.tls_cert.is_some() {
            "curl --cacert ca.pem --cert client.pem --key client.key"
        } else {
            "curl"
        };
        println!("try:  {curl} '{url}/job_start?job_name=hello&who=alice&wait=10s'");
        println!("      {curl} '{url}/jobs'      (Ctrl-C stops jobz)");
        shutdown.cancelled().await;
        wait_stopped(&worker_tasks).await;
        loop_shutdown.cancel();
        wait_stopped(&running.tasks).await;
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::{check_endpoint, Side};

    #[test]
    fn endpoints_are_checked_for_their_side() {
        for good in ["tcp://127.0.0.1:6770", "tcp://broker.example:6770", "ipc:///run/jobz.sock", "inproc://mesh"] {
            assert!(check_endpoint(good, Side::Connect).is_ok(), "{good}");
            assert!(check_endpoint(good, Side::Bind).is_ok(), "{good}");
        }
        // Any port is for binding only.
        for any in ["tcp://*:*", "tcp://127.0.0.1:0", "tcp://0.0.0.0:*"] {
            assert!(check_endpoint(any, Side::Bind).is_ok(), "{any}");
            assert!(check_endpoint(any, Side::Connect).is_err(), "{any}");
        }
        for bad in ["garbage", "127.0.0.1:6770", "tcp://", "tcp://host", "tcp://:6770", "tcp://h:99999", "ipc://"] {
            let error = check_endpoint(bad, Side::Connect).expect_err(bad).to_string();
            assert!(error.starts_with(&format!("--broker: `{bad}`")), "{error}");
            assert!(check_endpoint(bad, Side::Bind).is_err(), "{bad}");
        }
    }
}
