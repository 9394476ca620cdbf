//! The subcommands of SPEC "Processes" and their flags.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use crate::mesh_cmd::{BrokerArgs, WorkerArgs};

/// A job or command did not succeed.
pub const EXIT_FAILURE: u8 = 1;
/// Bad usage, a bad job file or a bad param: nothing ran.
pub const EXIT_ERROR: u8 = 2;

#[derive(Debug, Parser)]
#[command(name = "jobz", version, about = "Runs named shell jobs across a mesh of machines.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct ConfigArg {
    /// The job file [default: ./jobz.yaml]
    #[arg(long, env = "JOBZ_CONFIG", value_name = "F")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// The front door's URL (https:// for a front door with TLS)
    #[arg(long, env = "JOBZ_URL", default_value = "http://127.0.0.1:6769")]
    pub url: String,
    /// Machine-readable JSON output
    #[arg(long)]
    pub json: bool,
    /// For https://: the CA certificate (PEM) that signed the front door's certificate
    #[arg(long, env = "JOBZ_CACERT", value_name = "FILE")]
    pub cacert: Option<PathBuf>,
    /// For a front door with --client-ca: this client's certificate (PEM)
    #[arg(long, env = "JOBZ_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert
    #[arg(long, env = "JOBZ_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// A bearer token for a front door with `tokens:` (prefer JOBZ_TOKEN: a flag shows in `ps`)
    #[arg(long, env = "JOBZ_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,
}

impl ClientArgs {
    pub fn front(&self) -> crate::client::ClientOptions {
        crate::client::ClientOptions {
            url: self.url.clone(),
            tls: crate::client::ClientTls {
                cacert: self.cacert.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
            },
            token: self.token.clone(),
        }
    }
}

/// HTTPS on the front door (`jobz broker`, `jobz up`).
#[derive(Debug, Args, Clone)]
pub struct TlsArgs {
    /// Serve HTTPS only, with this certificate chain (PEM); needs --tls-key
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS; needs --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
}

/// Broker settings beyond SPEC's flags, with safe defaults.
#[derive(Debug, Args, Clone)]
pub struct BrokerTuning {
    /// A worker silent this long loses its jobs to other workers
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub lease_timeout: String,
    /// Finished jobs and their logs are kept this long
    #[arg(long, default_value = "7d", value_name = "DURATION")]
    pub retention: String,
}

/// CURVE for a broker (`jobz broker`, `jobz up`): with a key, the ZeroMQ port
/// is encrypted and admits only the allowed public keys.
#[derive(Debug, Args, Clone, Default)]
pub struct BrokerCurveArgs {
    /// Encrypt the mesh with CURVE: the broker's secret key file (`jobz keygen` writes one)
    #[arg(long, env = "JOBZ_CURVE_KEY", value_name = "FILE")]
    pub curve_key: Option<PathBuf>,
    /// Public keys of the workers and semaphores that may connect: a directory of *.pub files, or a file with one key a line (repeatable)
    #[arg(long, value_name = "DIR_OR_FILE", requires = "curve_key")]
    pub allowed_keys: Vec<PathBuf>,
}

/// CURVE for a worker or semaphore: both flags or neither.
#[derive(Debug, Args, Clone, Default)]
pub struct ClientCurveArgs {
    /// This process's secret key file (`jobz keygen` writes one); the broker must allow its public key
    #[arg(long, env = "JOBZ_CURVE_KEY", value_name = "FILE", requires = "broker_key")]
    pub curve_key: Option<PathBuf>,
    /// The broker's public key: its jobz.pub file, or the 40-character Z85 key itself
    #[arg(long, env = "JOBZ_BROKER_KEY", value_name = "FILE_OR_Z85", requires = "curve_key")]
    pub broker_key: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Broker, HTTP front door, N local workers and a semaphore in one process
    Up {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, default_value = "127.0.0.1:6769", value_name = "ADDR")]
        http: String,
        #[arg(long, default_value = "tcp://127.0.0.1:6770", value_name = "ENDPOINT")]
        bind: String,
        #[arg(long, default_value = "./jobz-data", value_name = "DIR")]
        data: PathBuf,
        /// Local workers [default: number of cores]; 0 runs none, for workers that connect from elsewhere
        #[arg(long, value_name = "N")]
        workers: Option<usize>,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        tuning: BrokerTuning,
        #[command(flatten)]
        curve: BrokerCurveArgs,
    },
    /// Broker, HTTP front door, durable store and scheduler
    Broker {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, default_value = "127.0.0.1:6769", value_name = "ADDR")]
        http: String,
        #[arg(long, default_value = "tcp://127.0.0.1:6770", value_name = "ENDPOINT")]
        bind: String,
        #[arg(long, default_value = "./jobz-data", value_name = "DIR")]
        data: PathBuf,
        /// Dispatch to workers whose definition of a job differs from the broker's
        #[arg(long)]
        allow_drift: bool,
        #[command(flatten)]
        tls: TlsArgs,
        #[command(flatten)]
        tuning: BrokerTuning,
        #[command(flatten)]
        curve: BrokerCurveArgs,
    },
    /// Connects out to the broker and runs the jobs it serves
    Worker {
        #[arg(long, env = "JOBZ_BROKER", value_name = "ENDPOINT")]
        broker: String,
        #[command(flatten)]
        config: ConfigArg,
        /// Serve only these job names (comma-separated)
        #[arg(long, value_delimiter = ',', value_name = "a,b")]
        topics: Vec<String>,
        /// Jobs run at once [default: number of cores]
        #[arg(long, value_name = "N")]
        concurrency: Option<usize>,
        /// The worker's name [default: host name and process id]
        #[arg(long)]
        name: Option<String>,
        /// Exit after this long without a job (e.g. 30s)
        #[arg(long, value_name = "DURATION")]
        exit_when_idle: Option<String>,
        /// On SIGTERM/SIGINT, how long running jobs may finish before they are stopped and handed back [default: 30s]
        #[arg(long, value_name = "DURATION")]
        grace: Option<String>,
        #[command(flatten)]
        curve: ClientCurveArgs,
    },
    /// Evaluates the gates of the job file
    Semaphore {
        #[arg(long, env = "JOBZ_BROKER", value_name = "ENDPOINT")]
        broker: String,
        #[command(flatten)]
        config: ConfigArg,
        #[command(flatten)]
        curve: ClientCurveArgs,
    },
    /// Starts a job and prints its id
    Start {
        name: String,
        /// Params as k=v
        params: Vec<String>,
        /// Follow the job to its end; exit 0 only if it succeeded
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Shows a job
    Status {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Prints a job's captured output
    Logs {
        id: String,
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancels a queued or running job
    Cancel {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Starts a failed job again
    Retry {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lists jobs, newest first
    Ls {
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lists connected workers
    Workers {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lists gates and their keys
    Gates {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Lists schedules and their next fire times
    Schedules {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Inside a job: reports its progress
    Progress {
        percent: f64,
        message: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Writes a CURVE key pair: DIR/jobz.key (secret) and DIR/jobz.pub (public); prints the public key
    Keygen {
        /// Where to write the key files [default: the current directory]
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Writes a CA, a server certificate and client certificates for trying HTTPS
    Certs {
        /// The directory to write to (created if missing; existing files are never overwritten)
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// More names or addresses of the front door, besides localhost and 127.0.0.1
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// A client certificate NAME.pem + NAME.key for each [default: client]
        #[arg(long = "client", value_name = "NAME")]
        clients: Vec<String>,
        /// Days the certificates are valid
        #[arg(long, default_value_t = 365, value_name = "N")]
        days: u32,
    },
    /// Makes a random token for the front door and prints it with its `tokens:` entry
    Token {
        /// The entry's name in `tokens:` (shown in logs and 403 answers)
        #[arg(long, default_value = "client")]
        name: String,
        /// A scope: start, start=job_a,job_b, read or admin [default: start and read]
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
    },
    /// Eager mode: runs the job, its follow-ups and gates locally and synchronously
    Run {
        name: String,
        /// Params as k=v
        params: Vec<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validates a job file
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { name, params, config } => crate::eager_cmd::run(&config, &name, &params),
        Command::Up { config, http, bind, data, workers, tls, tuning, curve } => crate::mesh_cmd::up(
            BrokerArgs { config, http, bind, data, allow_drift: false, tls, tuning, curve },
            workers,
        ),
        Command::Broker { config, http, bind, data, allow_drift, tls, tuning, curve } => {
            crate::mesh_cmd::broker(BrokerArgs { config, http, bind, data, allow_drift, tls, tuning, curve })
        }
        Command::Worker { broker, config, topics, concurrency, name, exit_when_idle, grace, curve } => {
            crate::mesh_cmd::worker(WorkerArgs {
                broker,
                config,
                topics,
                concurrency,
                name,
                exit_when_idle,
                grace,
                curve,
            })
        }
        Command::Semaphore { broker, config, curve } => crate::semaphore_cmd::semaphore(broker, config, curve),
        Command::Start { name, params, wait, client } => {
            crate::client::start(&client.front(), &name, &params, wait, client.json)
        }
        Command::Status { id, client } => crate::client::status(&client.front(), &id, client.json),
        Command::Logs { id, follow, client } => crate::client::logs(&client.front(), &id, follow),
        Command::Cancel { id, client } => crate::client::cancel(&client.front(), &id, client.json),
        Command::Retry { id, client } => crate::client::retry(&client.front(), &id, client.json),
        Command::Ls { status, job, client } => {
            crate::client::ls(&client.front(), status.as_deref(), job.as_deref(), client.json)
        }
        Command::Workers { client } => crate::client::workers(&client.front(), client.json),
        Command::Gates { client } => crate::client::gates(&client.front(), client.json),
        Command::Schedules { client } => crate::client::schedules(&client.front(), client.json),
        Command::Progress { percent, message, client } => {
            crate::client::progress(&client.front(), percent, message.as_deref())
        }
        Command::Keygen { out } => crate::keygen_cmd::keygen(out),
        Command::Certs { out, hosts, clients, days } => crate::certs_cmd::certs(&out, &hosts, &clients, days),
        Command::Token { name, scopes } => crate::certs_cmd::token(&name, &scopes),
    }
}

/// Where the job file comes from: `--config`/`$JOBZ_CONFIG`, else `./jobz.yaml`.
pub enum ConfigSource {
    File(PathBuf),
    /// No file was named and `./jobz.yaml` does not exist.
    Missing,
}

pub fn config_source(arg: &ConfigArg) -> ConfigSource {
    match &arg.config {
        Some(path) => ConfigSource::File(path.clone()),
        None if Path::new("jobz.yaml").exists() => ConfigSource::File(PathBuf::from("jobz.yaml")),
        None => ConfigSource::Missing,
    }
}

/// Loads the job file; with no file at all, the built-in example when `embedded_fallback` allows it.
pub fn load_config(arg: &ConfigArg, embedded_fallback: bool) -> anyhow::Result<Result<config::JobFile, ExitCode>> {
    match config_source(arg) {
        ConfigSource::File(path) => match config::load(&path) {
            Ok(file) => Ok(Ok(file)),
            Err(config::LoadError::Invalid(diagnostics)) => {
                eprintln!("{diagnostics}");
                eprintln!("jobz: {} problem(s) in {}", diagnostics.problems.len(), path.display());
                Ok(Err(ExitCode::from(EXIT_ERROR)))
            }
            Err(e) => Err(e).context("loading the job file"),
        },
        ConfigSource::Missing if embedded_fallback => {
            eprintln!(
                "jobz: no jobz.yaml here; using the built-in example job file (`jobz check --config F` to use yours)"
            );
            match config::parse("<built-in example>", config::EXAMPLE_YAML) {
                Ok(file) => Ok(Ok(file)),
                Err(d) => bail!("the built-in example job file is invalid:\n{d}"),
            }
        }
        ConfigSource::Missing => bail!("no job file: ./jobz.yaml does not exist; pass --config F or set JOBZ_CONFIG"),
    }
}

fn check(arg: &ConfigArg) -> anyhow::Result<ExitCode> {
    let file = match load_config(arg, false)? {
        Ok(file) => file,
        Err(code) => return Ok(code),
    };
    let tokens = if file.tokens.is_empty() { String::new() } else { format!(", {} token(s)", file.tokens.len()) };
    println!("{}: ok, {} job(s), {} gate(s){tokens}", file.origin, file.jobs.len(), file.gates.len());
    Ok(ExitCode::SUCCESS)
}
