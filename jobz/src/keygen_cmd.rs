//! `jobz keygen [--out DIR]`: writes a CURVE key pair for a broker, worker or
//! semaphore (`jobz_core::curve::write_key_pair`) and prints its public key on
//! stdout, so `KEY=$(jobz keygen --out DIR)` works; what it wrote goes to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use jobz_core::curve::{write_key_pair, KeyPair};

pub fn keygen(out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let dir = out.unwrap_or_else(|| PathBuf::from("."));
    let pair = KeyPair::generate().context("jobz keygen")?;
    let written = format!("on {}", chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    let files = write_key_pair(&dir, &pair, &written).context("jobz keygen")?;
    eprintln!(
        "jobz keygen: wrote {} (secret, mode 0600: keep it on this machine) and {} (public: share it)",
        files.secret.display(),
        files.public.display()
    );
    println!("{}", pair.public);
    Ok(ExitCode::SUCCESS)
}
