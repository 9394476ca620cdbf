//! The front door's security against real processes on loopback: HTTPS with
//! client certificates made by `jobz certs` (and, for the refusals, by rcgen:
//! another CA, expired, not yet valid), bearer tokens with scopes, a job that
//! starts a job through TLS and a token inherited from its worker, the
//! broker's refusal of bad TLS files, and no token ever in the broker's log.
//! Each refusal is checked to have stored nothing.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::tls::{ca_of, client_leaf, other_ca, Https, Validity};
use support::{json, request, run_jobz, wait_until, Mesh};

/// `$DIR` is the test's temp dir; `@JOBZ@` the jobz binary under test; `@TOKENS@` a `tokens:` section.
const JOBS: &str = r#"
jobs:
  hello:
    command: "echo hello {who}"
    params:
      who: { default: world, pattern: '^[a-z]+$' }
  other:
    command: "true"
  slow:
    command: "sleep 30"
  caller:
    shell: true
    command: "@JOBZ@ progress 50 halfway && @JOBZ@ start child k=v > $DIR/child-id"
  child:
    shell: true
    command: "echo {k} >> $DIR/child-ran"
    params:
      k: { required: true }
@TOKENS@
"#;

const DEADLINE: Duration = Duration::from_secs(30);

const OPS: &str = "jobz_ops_0123456789abcdef0123456789abcdef";
const VIEWER: &str = "jobz_viewer_0123456789abcdef0123456789ab";
const CRON: &str = "jobz_cron_0123456789abcdef0123456789abcd";
const WORKER: &str = "jobz_worker_0123456789abcdef0123456789ab";

/// A job file with four tokens: everything; read only; start `hello` (and read); start `child`.
fn job_file_with_tokens() -> String {
    let entry = |name: &str, token: &str, scopes: &str| {
        let hash = broker_hash(token);
        format!("  {name}: {{ hash: \"{hash}\", scopes: {scopes} }}\n")
    };
    let tokens = format!(
        "tokens:\n{}{}{}{}",
        entry("ops", OPS, "[ start, read, admin ]"),
        entry("viewer", VIEWER, "[ read ]"),
        entry("cron", CRON, "[ { start: [ hello ] }, read ]"),
        entry("worker", WORKER, "[ { start: [ child ] } ]"),
    );
    JOBS.replace("@JOBZ@", env!("CARGO_BIN_EXE_jobz")).replace("@TOKENS@", &tokens)
}

/// `sha256:HEX` of a token, computed here independently of the broker's code.
fn broker_hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Runs `jobz certs` into `<test dir>/pki` with a client `alice`; returns the directory.
fn certs(mesh: &Mesh) -> PathBuf {
    let (code, out, err) =
        run_jobz(mesh.path(), &["certs", "--out", "pki", "--client", "alice"], &[], Duration::from_secs(30));
    assert_eq!(code, 0, "jobz certs: {out}{err}");
    mesh.path().join("pki")
}

fn path_text(path: &Path) -> String {
    path.display().to_string()
}

/// The broker with `--tls-cert`, `--tls-key`, `--client-ca` from `pki`, waiting until alice gets /healthz.
fn tls_broker(mesh: &Mesh, pki: &Path) -> support::Proc {
    let (cert, key, ca) =
        (path_text(&pki.join("server.pem")), path_text(&pki.join("server.key")), path_text(&pki.join("ca.pem")));
    let alice = alice(mesh, pki);
    mesh.broker_until(&["--tls-cert", &cert, "--tls-key", &key, "--client-ca", &ca], &[], || {
        alice.get("/healthz").is_ok_and(|(code, _)| code == 200)
    })
}

/// A client holding alice's certificate from `jobz certs`.
fn alice(mesh: &Mesh, pki: &Path) -> Https {
    let cert = std::fs::read_to_string(pki.join("alice.pem")).unwrap_or_default();
    let key = std::fs::read_to_string(pki.join("alice.key")).unwrap_or_default();
    Https::new(mesh.http_port, &pki.join("ca.pem"), Some((&cert, &key)))
}

fn https_url(mesh: &Mesh) -> String {
    format!("https://127.0.0.1:{}", mesh.http_port)
}

/// The jobs the store holds, read over HTTPS with alice's certificate (and a token when given).
fn jobs_over_tls(client: &Https) -> Vec<serde_json::Value> {
    let (code, body) = client.get("/jobs?limit=1000").unwrap_or_else(|e| panic!("GET /jobs: {e}"));
    assert_eq!(code, 200, "{body}");
    json(&body)["jobs"].as_array().cloned().unwrap_or_default()
}

#[test]
fn mutual_tls_refuses_bad_client_certificates_and_serves_the_right_one() {
    let mesh = Mesh::new(&JOBS.replace("@JOBZ@", env!("CARGO_BIN_EXE_jobz")).replace("@TOKENS@", ""));
    let pki = certs(&mesh);
    let _broker = tls_broker(&mesh, &pki);
    let _worker = mesh.worker("w1", 2);
    let ca_pem = pki.join("ca.pem");

    // Each bad client is refused at the handshake and the broker logs why.
    let ours = ca_of(&pki);
    let cases = [
        ("no client certificate", None),
        ("client certificate not signed by the --client-ca", Some(client_leaf(&other_ca(), "mallory", Validity::Now))),
        ("client certificate expired", Some(client_leaf(&ours, "old", Validity::Expired))),
        ("client certificate not yet valid", Some(client_leaf(&ours, "early", Validity::NotYet))),
    ];
    for (reason, leaf) in &cases {
        let client = Https::new(mesh.http_port, &ca_pem, leaf.as_ref().map(|l| (l.cert.as_str(), l.key.as_str())));
        let result = client.get("/job_start?job_name=hello");
        assert!(result.is_err(), "{reason}: served {result:?}");
        wait_until(DEADLINE, &format!("the broker to log {reason:?}"), || {
            mesh.log_lines_with("broker", "TLS handshake refused peer=127.0.0.1:") > 0
                && mesh.log_lines_with("broker", &format!("reason={reason} ")) > 0
        });
    }
    assert_eq!(mesh.log_lines_with("broker", "TLS handshake refused"), cases.len(), "{}", mesh.logs());

    // Plain HTTP to the HTTPS port: a clear 400, nothing stored.
    let (code, body) = request(&mesh.url(), "GET", "/job_start?job_name=hello", &[], b"");
    assert_eq!(code, 400, "{body}");
    assert!(json(&body)["error"].as_str().is_some_and(|e| e.contains("https://")), "{body}");

    // The client commands say which flag is wrong, exit 2 and change nothing.
    let url = https_url(&mesh);
    let (code, _, err) = run_jobz(mesh.path(), &["ls", "--url", &url, "--cacert", &path_text(&ca_pem)], &[], DEADLINE);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("requires a client certificate: pass --cert and --key"), "{err}");
    let server_pem = path_text(&pki.join("server.pem"));
    let (code, _, err) = run_jobz(mesh.path(), &["ls", "--url", &url, "--cacert", &server_pem], &[], DEADLINE);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("the server's certificate is not signed by --cacert {server_pem}")), "{err}");
    let (code, _, err) = run_jobz(mesh.path(), &["ls", "--url", &url], &[], DEADLINE);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--cacert FILE"), "{err}");

    let alice = alice(&mesh, &pki);
    assert!(jobs_over_tls(&alice).is_empty(), "a refused client stored a job");

    // The right certificate: `jobz start --wait` through the flags' environment variables…
    let env = [
        ("JOBZ_URL", url.as_str()),
        ("JOBZ_CACERT", "pki/ca.pem"),
        ("JOBZ_CERT", "pki/alice.pem"),
        ("JOBZ_KEY", "pki/alice.key"),
    ];
    let (code, out, err) = run_jobz(mesh.path(), &["start", "hello", "who=tls", "--wait"], &env, DEADLINE);
    assert_eq!(code, 0, "{out}{err}\n{}", mesh.logs());
    assert_eq!(out, "hello tls\n", "{err}");
    // …and a raw HTTPS client, as curl --cacert --cert --key would.
    let (code, body) = alice.get("/job_start?job_name=hello&who=curl&wait=20s").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["output"], "hello curl\n");
    assert_eq!(jobs_over_tls(&alice).len(), 2);
}

#[test]
fn tokens_refuse_without_a_token_with_a_wrong_one_and_out_of_scope_storing_nothing() {
    let mesh = Mesh::new(&job_file_with_tokens());
    let _broker = mesh.broker_until(&[], &[], || request(&mesh.url(), "GET", "/healthz", &[], b"").0 == 200);
    let _worker = mesh.worker("w1", 2);
    let url = mesh.url();
    let ops = format!("Bearer {OPS}");
    let stored = |name: &str| {
        let (code, body) = request(&url, "GET", &format!("/jobs?job_name={name}"), &[("Authorization", &ops)], b"");
        assert_eq!(code, 200, "{body}");
        json(&body)["jobs"].as_array().map_or(0, Vec::len)
    };
    let jobz = |args: &[&str], token: Option<&str>| {
        let mut env = vec![("JOBZ_URL", url.as_str())];
        if let Some(token) = token {
            env.push(("JOBZ_TOKEN", token));
        }
        run_jobz(mesh.path(), args, &env, DEADLINE)
    };

    let (code, body) = request(&url, "GET", "/job_start?job_name=hello", &[], b"");
    assert_eq!(code, 401, "{body}");
    let (code, _, err) = jobz(&["start", "hello"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs a token") && err.contains("(401)"), "{err}");
    let (code, _, err) = jobz(&["start", "hello"], Some("jobz_not_a_token"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the token is not known to this front door (401)"), "{err}");
    assert!(!err.contains("jobz_not_a_token"), "the token is echoed: {err}");
    let (code, _, err) = jobz(&["start", "hello"], Some(VIEWER));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("token `viewer` lacks the `start` scope needed for starting jobs (403)"), "{err}");
    let (code, _, err) = jobz(&["start", "other"], Some(CRON));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("token `cron` may start only hello, not `other` (403)"), "{err}");
    assert_eq!((stored("hello"), stored("other")), (0, 0), "a refused start stored a job");

    // The right scopes: cron starts hello and follows it (`read`), ops starts anything.
    let (code, out, err) = jobz(&["start", "hello", "who=cron", "--wait"], Some(CRON));
    assert_eq!((code, out.as_str()), (0, "hello cron\n"), "{err}");
    let (code, id, err) = jobz(&["start", "slow"], Some(OPS));
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();

    // Cancel and retry need admin.
    for action in ["cancel", "retry"] {
        let (code, _, err) = jobz(&[action, &id], Some(VIEWER));
        assert_eq!(code, 2, "{action}: {err}");
        assert!(err.contains("lacks the `admin` scope") && err.contains("(403)"), "{err}");
    }
    let (code, body) = request(&url, "GET", &format!("/jobs/{id}"), &[("Authorization", &ops)], b"");
    assert_eq!(code, 200);
    assert!(["queued", "running"].contains(&json(&body)["status"].as_str().unwrap_or("")), "{body}");
    let (code, out, err) = jobz(&["cancel", &id], Some(OPS));
    assert_eq!((code, out.trim()), (0, format!("{id} cancelled").as_str()), "{err}");
    assert_eq!((stored("hello"), stored("slow"), stored("other")), (1, 1, 0));
}

#[test]
fn a_job_starts_a_job_through_tls_with_its_workers_credentials() {
    let mesh = Mesh::new(&job_file_with_tokens());
    let pki = certs(&mesh);
    let _broker = tls_broker_with_tokens(&mesh, &pki);
    // The worker's environment is its jobs' environment: CA, certificate and a token that may start `child`.
    let env = [
        ("JOBZ_CACERT", path_text(&pki.join("ca.pem"))),
        ("JOBZ_CERT", path_text(&pki.join("alice.pem"))),
        ("JOBZ_KEY", path_text(&pki.join("alice.key"))),
        ("JOBZ_TOKEN", WORKER.to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _worker = mesh.worker_with_env("w1", 2, &env);
    let ops = alice(&mesh, &pki).with_token(OPS);
    let (code, body) = ops.get("/job_start?job_name=caller&wait=20s").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 200, "{body}\n{}", mesh.logs());
    let caller = json(&body);
    assert_eq!(caller["progress"]["percent"], 50.0, "{body}");
    let child_id = std::fs::read_to_string(mesh.path().join("child-id")).unwrap_or_default().trim().to_owned();
    wait_until(DEADLINE, "the child job to run", || mesh.path().join("child-ran").exists());
    let (code, body) = ops.get(&format!("/jobs/{child_id}")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 200, "{body}");
    let child = json(&body);
    assert_eq!(child["parent_id"], caller["id"], "{body}");
    assert_eq!(child["run_id"], caller["run_id"], "{body}");
    assert_eq!(mesh.log_lines_with("broker", "refused"), 0, "{}", mesh.logs());
}

/// The TLS broker of [`tls_broker`] whose job file also has tokens: ready when ops reads /healthz.
fn tls_broker_with_tokens(mesh: &Mesh, pki: &Path) -> support::Proc {
    let (cert, key, ca) =
        (path_text(&pki.join("server.pem")), path_text(&pki.join("server.key")), path_text(&pki.join("ca.pem")));
    let client = alice(mesh, pki);
    mesh.broker_until(&["--tls-cert", &cert, "--tls-key", &key, "--client-ca", &ca], &[("JOBZ_LOG", "debug")], || {
        client.get("/healthz").is_ok_and(|(code, _)| code == 200)
    })
}

#[test]
fn mutual_tls_and_a_token_are_both_needed_and_no_token_reaches_the_log() {
    let mesh = Mesh::new(&job_file_with_tokens());
    let pki = certs(&mesh);
    let _broker = tls_broker_with_tokens(&mesh, &pki);
    let _worker = mesh.worker("w1", 1);
    let without_token = alice(&mesh, &pki);
    let (code, body) = without_token.get("/job_start?job_name=hello").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 401, "a certificate alone: {body}");
    let token_without_certificate = Https::new(mesh.http_port, &pki.join("ca.pem"), None).with_token(OPS);
    assert!(token_without_certificate.get("/job_start?job_name=hello").is_err(), "a token alone was served");
    let wrong = "jobz_wrong_0123456789abcdef0123456789abcd";
    let (code, _) = alice(&mesh, &pki).with_token(wrong).get("/jobs").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 401);
    let (code, _) =
        alice(&mesh, &pki).with_token(VIEWER).get("/job_start?job_name=hello").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 403);
    let ops = alice(&mesh, &pki).with_token(OPS);
    let (code, body) = ops.get("/job_start?job_name=hello&who=both&wait=20s").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(jobs_over_tls(&ops).len(), 1, "only the allowed start stored a job");

    // The broker ran at debug level: refusals are logged by token name, never a token.
    wait_until(DEADLINE, "the refusals in the broker's log", || mesh.log_lines_with("broker", "refused:") >= 3);
    assert!(mesh.log_lines_with("broker", "token=viewer scope=start") > 0, "{}", mesh.logs());
    for token in [OPS, VIEWER, CRON, WORKER, wrong] {
        assert_eq!(mesh.log_lines_with("broker", token), 0, "{token} is in the broker's log");
        assert_eq!(mesh.log_lines_with("w1", token), 0, "{token} is in the worker's log");
    }
}

#[test]
fn the_broker_refuses_bad_tls_files_naming_them_and_changes_nothing() {
    let mesh = Mesh::new(&JOBS.replace("@JOBZ@", "true").replace("@TOKENS@", ""));
    let pki = certs(&mesh);
    let other = mesh.path().join("other");
    let (code, _, err) = run_jobz(mesh.path(), &["certs", "--out", "other"], &[], DEADLINE);
    assert_eq!(code, 0, "{err}");
    let http = format!("127.0.0.1:{}", mesh.http_port);
    let config = path_text(&mesh.config);
    let broker = |cert: &Path, key: &Path| {
        let args = [
            "broker",
            "--config",
            &config,
            "--http",
            &http,
            "--bind",
            &mesh.endpoint(),
            "--data",
            "data",
            "--tls-cert",
            &path_text(cert),
            "--tls-key",
            &path_text(key),
        ];
        run_jobz(mesh.path(), &args, &[], DEADLINE)
    };
    let missing = mesh.path().join("missing.pem");
    let (code, _, err) = broker(&missing, &pki.join("server.key"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("--tls-cert {}: cannot read it", missing.display())), "{err}");
    let (code, _, err) = broker(&pki.join("server.pem"), &other.join("server.key"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("does not belong to --tls-cert"), "{err}");
    let (code, _, err) = broker(&pki.join("server.pem"), &pki.join("server.pem"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("holds no PEM key"), "{err}");
    for (flags, needed) in [(&["--tls-cert", "a.pem"][..], "--tls-key"), (&["--client-ca", "ca.pem"][..], "--tls-cert")]
    {
        let mut args = vec!["broker", "--config", &config, "--http", &http, "--data", "data"];
        args.extend_from_slice(flags);
        let (code, _, err) = run_jobz(mesh.path(), &args, &[], DEADLINE);
        assert_eq!(code, 2, "{flags:?}: {err}");
        assert!(err.contains(needed), "{flags:?}: {err}");
    }
    assert!(!mesh.path().join("data").exists(), "a refused start created the data directory");

    // `jobz certs` never overwrites: a second run into the same directory writes nothing.
    let before = std::fs::read(pki.join("ca.key")).unwrap_or_default();
    let (code, _, err) = run_jobz(mesh.path(), &["certs", "--out", "pki"], &[], DEADLINE);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(pki.join("ca.key")).unwrap_or_default(), before);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(pki.join("alice.key")).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
    assert_eq!(mode, 0o600, "keys are readable by their owner only");
}

#[test]
fn a_token_made_by_jobz_token_opens_the_front_door_and_jobz_check_counts_it() {
    let mesh = Mesh::new("jobs:\n  hello: { command: \"true\" }\n");
    let (code, out, err) = run_jobz(mesh.path(), &["token", "--name", "cron", "--scope", "read"], &[], DEADLINE);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "the token, then its entry: {out}");
    let (token, entry) = (lines[0], lines[1]);
    assert!(token.starts_with("jobz_") && !entry.contains(token), "{out}");
    assert!(entry.starts_with("  cron: { hash: \"sha256:") && entry.ends_with("scopes: [ read ] }"), "{entry}");
    std::fs::write(&mesh.config, format!("jobs:\n  hello: {{ command: \"true\" }}\ntokens:\n{entry}\n"))
        .unwrap_or_else(|e| panic!("{e}"));
    let config = path_text(&mesh.config);
    let (code, out, err) = run_jobz(mesh.path(), &["check", "--config", &config], &[], DEADLINE);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("ok, 1 job(s), 0 gate(s), 1 token(s)\n"), "{out}");

    let _broker = mesh.broker(&[]);
    let bearer = format!("Bearer {token}");
    assert_eq!(request(&mesh.url(), "GET", "/jobs", &[], b"").0, 401);
    assert_eq!(request(&mesh.url(), "GET", "/jobs", &[("Authorization", &bearer)], b"").0, 200);
    let (code, body) = request(&mesh.url(), "GET", "/job_start?job_name=hello", &[("Authorization", &bearer)], b"");
    assert_eq!(code, 403, "{body}");
}
