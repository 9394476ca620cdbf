//! The `jobz` binary: command line, logging, signals and exit codes.
//!
//! Behaviour lives in the library crates; this file parses arguments, calls
//! them, and turns their results into output and an exit code (main → run →
//! exit code, as ripgrep does).

mod certs_cmd;
mod cli;
mod client;
mod eager_cmd;
mod eager_door;
mod keygen_cmd;
mod limits;
mod mesh_cmd;
mod semaphore_cmd;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's allocator: the broker's loop, the front door and
/// the store writer allocate and free small blocks for every job, and glibc's
/// `malloc` and `free` were a fifth of the loop thread's time (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    // `jobz run` prints its own account of the run; only warnings and errors are logged beside it.
    init_logging(if matches!(args.command, cli::Command::Run { .. }) { "warn" } else { "info" });
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            // A closed stdout (`jobz ls | head`) is not an error worth a message.
            if err
                .chain()
                .any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("jobz: {err:#}");
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}

/// Logs to stderr at `JOBZ_LOG`'s levels, or at `default`.
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("JOBZ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only on a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}
