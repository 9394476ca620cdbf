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
            eprintln!("jobz: {}", error_text(&err));
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}

/// `err` and its causes joined by ": ", as `{:#}` does, but without a cause
/// that the error before it already ends with: errors that name their source
/// in their own text (`cannot read F: No such file…`) would otherwise say it
/// twice, or three times over a chain of them.
fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut previous = String::new();
    for cause in err.chain() {
        let here = cause.to_string();
        if previous.is_empty() || !previous.ends_with(&here) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&here);
        }
        previous = here;
    }
    text
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

#[cfg(test)]
mod tests {
    use super::error_text;
    use anyhow::Context;

    /// An error that names its source in its own text, as the libraries' errors do.
    #[derive(Debug)]
    struct ReadError {
        path: String,
        source: std::io::Error,
    }

    impl std::fmt::Display for ReadError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "cannot read {}: {}", self.path, self.source)
        }
    }

    impl std::error::Error for ReadError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.source)
        }
    }

    #[test]
    fn a_cause_already_in_the_text_before_it_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory (os error 2)");
        let err = Err::<(), _>(ReadError { path: "keys/x".into(), source: io }).context("--curve-key").unwrap_err();
        assert_eq!(error_text(&err), "--curve-key: cannot read keys/x: No such file or directory (os error 2)");
    }

    #[test]
    fn causes_not_in_the_text_before_them_are_all_said() {
        let err = Err::<(), _>(anyhow::anyhow!("invalid socket address"))
            .context("cannot listen for HTTP on garbage")
            .context("starting the broker")
            .unwrap_err();
        assert_eq!(error_text(&err), "starting the broker: cannot listen for HTTP on garbage: invalid socket address");
    }
}
