//! `jobz certs` and `jobz token`: credentials for trying the HTTPS front door
//! and its tokens, made with rcgen and ring, nothing from outside cargo.
//!
//! `jobz certs --out DIR` writes a CA (`ca.pem`, `ca.key`), a server
//! certificate for localhost, 127.0.0.1 and each `--host` (`server.pem`,
//! `server.key`) and a client certificate per `--client NAME` (`NAME.pem`,
//! `NAME.key`; `client` by default). Keys are written 0600. It refuses to
//! overwrite: if any of the files exists, nothing is written.
//!
//! `jobz token` prints a new random token on the first line of stdout and its
//! `tokens:` entry (the SHA-256, never the token) on the second.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use chrono::{Datelike, Days, NaiveDate, Utc};
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::cli::EXIT_ERROR;

/// The names every server certificate carries, so the local front door is reachable at once.
const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];
/// The client certificate's name when no `--client` is given.
const CLIENT_DEFAULT: &str = "client";
/// Names a client certificate cannot take: they are the CA's and the server's files.
const RESERVED_CLIENT_NAMES: [&str; 2] = ["ca", "server"];

/// One file to write: its name in the output directory, its text and its mode.
struct Output {
    name: String,
    text: String,
    mode: u32,
}

/// `jobz certs --out DIR [--host NAME ...] [--client NAME ...] [--days N]`.
pub fn certs(out: &Path, hosts: &[String], clients: &[String], days: u32) -> anyhow::Result<ExitCode> {
    let clients: Vec<String> = if clients.is_empty() { vec![CLIENT_DEFAULT.to_owned()] } else { clients.to_vec() };
    if let Err(problem) = check_names(hosts, &clients, days) {
        eprintln!("jobz certs: {problem}");
        return Ok(ExitCode::from(EXIT_ERROR));
    }
    let outputs = generate(hosts, &clients, days, Utc::now().date_naive())?;
    let existing: Vec<String> =
        outputs.iter().map(|o| out.join(&o.name)).filter(|p| p.exists()).map(|p| p.display().to_string()).collect();
    if !existing.is_empty() {
        eprintln!(
            "jobz certs: refusing to overwrite {}; nothing was written (choose another --out)",
            existing.join(", ")
        );
        return Ok(ExitCode::from(EXIT_ERROR));
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for output in &outputs {
        write_new(&out.join(&output.name), &output.text, output.mode)?;
    }
    let dir = out.display();
    let client = &clients[0];
    println!("jobz certs: wrote {} files to {dir} (keys are readable by you only)", outputs.len());
    println!(
        "  the broker:  jobz broker --tls-cert {dir}/server.pem --tls-key {dir}/server.key --client-ca {dir}/ca.pem"
    );
    println!("  a client:    jobz start NAME --url https://127.0.0.1:6769 --cacert {dir}/ca.pem --cert {dir}/{client}.pem --key {dir}/{client}.key");
    println!("  curl:        curl --cacert {dir}/ca.pem --cert {dir}/{client}.pem --key {dir}/{client}.key 'https://127.0.0.1:6769/jobs'");
    println!("  keep {dir}/ca.key offline: whoever holds it can make certificates the front door accepts");
    Ok(ExitCode::SUCCESS)
}

fn check_names(hosts: &[String], clients: &[String], days: u32) -> Result<(), String> {
    if days == 0 {
        return Err("--days must be at least 1".to_owned());
    }
    for host in hosts {
        let name_ok = !host.is_empty()
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*'))
            && !host.starts_with('-');
        if host.parse::<IpAddr>().is_err() && !name_ok {
            return Err(format!("--host {host:?} is neither a DNS name nor an IP address"));
        }
    }
    let mut seen = BTreeSet::new();
    for client in clients {
        let mut chars = client.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
            return Err(format!(
                "--client {client:?}: use letters, digits, `_`, `.` and `-`, starting with a letter, digit or `_`"
            ));
        }
        if RESERVED_CLIENT_NAMES.contains(&client.as_str()) {
            return Err(format!("--client {client:?} would overwrite the {client} files; choose another name"));
        }
        if !seen.insert(client.as_str()) {
            return Err(format!("--client {client:?} is given twice"));
        }
    }
    Ok(())
}

/// The CA, the server's certificate and the clients' certificates, valid from the day
/// before `today` (so a clock slightly behind accepts them) for `days` days.
fn generate(hosts: &[String], clients: &[String], days: u32, today: NaiveDate) -> anyhow::Result<Vec<Output>> {
    let (year, month, day) = ymd(today.checked_sub_days(Days::new(1)).unwrap_or(today));
    let not_before = date_time_ymd(year, month, day);
    let (year, month, day) =
        ymd(today.checked_add_days(Days::new(u64::from(days))).context("--days is too far ahead")?);
    let not_after = date_time_ymd(year, month, day);

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name.push(DnType::CommonName, "jobz CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?).context("making the CA")?;
    let mut outputs = vec![
        Output { name: "ca.pem".into(), text: ca.pem(), mode: 0o644 },
        Output { name: "ca.key".into(), text: ca.key().serialize_pem(), mode: 0o600 },
    ];

    let mut names: Vec<String> = SERVER_NAMES.iter().map(|s| (*s).to_owned()).collect();
    names.extend(hosts.iter().filter(|h| !SERVER_NAMES.contains(&h.as_str())).cloned());
    let leaf = |common_name: &str, names: Vec<String>, usage: ExtendedKeyUsagePurpose| -> anyhow::Result<_> {
        let mut params = CertificateParams::new(names).with_context(|| format!("the names of {common_name}"))?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca).with_context(|| format!("signing {common_name}"))?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (cert, key) = leaf("jobz front door", names, ExtendedKeyUsagePurpose::ServerAuth)?;
    outputs.push(Output { name: "server.pem".into(), text: cert, mode: 0o644 });
    outputs.push(Output { name: "server.key".into(), text: key, mode: 0o600 });
    for client in clients {
        let (cert, key) = leaf(client, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?;
        outputs.push(Output { name: format!("{client}.pem"), text: cert, mode: 0o644 });
        outputs.push(Output { name: format!("{client}.key"), text: key, mode: 0o600 });
    }
    Ok(outputs)
}

/// A date as rcgen's `date_time_ymd` takes it (month 1 to 12 and day 1 to 31 fit a byte).
fn ymd(date: NaiveDate) -> (i32, u8, u8) {
    (date.year(), u8::try_from(date.month()).unwrap_or(1), u8::try_from(date.day()).unwrap_or(1))
}

/// Writes a file that must not exist yet, with `mode` from its creation on.
fn write_new(path: &PathBuf, text: &str, mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    file.sync_all().with_context(|| format!("writing {}", path.display()))
}

/// `jobz token [--name NAME] [--scope S ...]`.
pub fn token(name: &str, scopes: &[String]) -> anyhow::Result<ExitCode> {
    let scopes = match scope_list(name, scopes) {
        Ok(scopes) => scopes,
        Err(problem) => {
            eprintln!("jobz token: {problem}");
            return Ok(ExitCode::from(EXIT_ERROR));
        }
    };
    let Ok(token) = broker::http::auth::generate_token() else {
        bail!("the system's random number generator failed");
    };
    let hash = broker::http::auth::hash_text(&broker::http::auth::hash_token(&token));
    eprintln!("jobz token: the token (first line) goes to the client, e.g. as JOBZ_TOKEN; it is stored nowhere.");
    eprintln!(
        "jobz token: the entry (second line) goes under `tokens:` in the job file; restart the broker to use it."
    );
    println!("{token}");
    println!("  {name}: {{ hash: \"{hash}\", scopes: [ {scopes} ] }}");
    Ok(ExitCode::SUCCESS)
}

/// `--scope` values as the YAML list of a `tokens:` entry.
fn scope_list(name: &str, scopes: &[String]) -> Result<String, String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(format!("--name {name:?}: use letters, digits, `_`, `.` and `-`"));
    }
    if scopes.is_empty() {
        return Ok("start, read".to_owned());
    }
    let mut items = Vec::new();
    for scope in scopes {
        let item = match scope.split_once('=') {
            None if matches!(scope.as_str(), "start" | "read" | "admin") => scope.clone(),
            Some(("start", jobs)) => {
                let jobs: Vec<&str> = jobs.split(',').map(str::trim).filter(|j| !j.is_empty()).collect();
                let bad = jobs.iter().find(|j| !j.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
                if jobs.is_empty() || bad.is_some() {
                    return Err(format!("--scope {scope:?}: write start=job_a,job_b with job names"));
                }
                format!("{{ start: [ {} ] }}", jobs.join(", "))
            }
            _ => return Err(format!("--scope {scope:?}: use start, start=job_a,job_b, read or admin")),
        };
        items.push(item);
    }
    Ok(items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_made_for_the_names_and_clients_asked() {
        let today = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
        let outputs = generate(&["jobz.example".into()], &["alice".into(), "bob".into()], 30, today).unwrap();
        let names: Vec<&str> = outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(
            names,
            ["ca.pem", "ca.key", "server.pem", "server.key", "alice.pem", "alice.key", "bob.pem", "bob.key"]
        );
        for output in &outputs {
            let is_key = output.name.ends_with(".key");
            assert_eq!(output.mode, if is_key { 0o600 } else { 0o644 }, "{}", output.name);
            let marker = if is_key { "PRIVATE KEY-----" } else { "-----BEGIN CERTIFICATE-----" };
            assert!(output.text.contains(marker), "{}: {}", output.name, output.text);
        }
    }

    #[test]
    fn bad_names_and_days_are_refused() {
        assert!(check_names(&[], &["client".into()], 1).is_ok());
        assert!(check_names(&["10.0.0.7".into(), "jobz.example".into()], &["a".into()], 1).is_ok());
        assert!(check_names(&[], &["client".into()], 0).unwrap_err().contains("--days"));
        assert!(check_names(&["bad host".into()], &["a".into()], 1).unwrap_err().contains("bad host"));
        assert!(check_names(&[], &["../x".into()], 1).unwrap_err().contains("--client"));
        assert!(check_names(&[], &["server".into()], 1).unwrap_err().contains("overwrite"));
        assert!(check_names(&[], &["a".into(), "a".into()], 1).unwrap_err().contains("twice"));
    }

    #[test]
    fn scopes_become_the_yaml_of_a_tokens_entry() {
        assert_eq!(scope_list("t", &[]).unwrap(), "start, read");
        let scopes = ["start=a,b".to_owned(), "read".to_owned(), "admin".to_owned()];
        assert_eq!(scope_list("t", &scopes).unwrap(), "{ start: [ a, b ] }, read, admin");
        assert!(scope_list("t", &["write".to_owned()]).unwrap_err().contains("--scope"));
        assert!(scope_list("t", &["start=".to_owned()]).is_err());
        assert!(scope_list("a b", &[]).unwrap_err().contains("--name"));
    }
}
