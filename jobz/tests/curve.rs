//! The mesh encrypted and authenticated with ZeroMQ CURVE, with real
//! processes on loopback: `jobz keygen`, a broker with `--curve-key` and
//! `--allowed-keys`, workers and semaphores with their own keys, and every way
//! a peer can be refused. A libzmq without CURVE fails these tests; nothing here
//! is skipped. Every wait has a deadline; processes are killed by PID.

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{get, id_of, run_jobz, wait_for, wait_until, Mesh, Proc};

const JOBS: &str = r#"
jobs:
  hello:
    shell: true
    command: "echo hello {who} >> $DIR/hello.out"
    params:
      who: { required: true, pattern: '^[a-z]+$' }
  part:
    shell: true
    command: "echo {batch} >> $DIR/parts"
    params:
      batch: { required: true, pattern: '^[a-z0-9]+$' }
  notify:
    shell: true
    command: "echo {what} >> $DIR/notified"
    params:
      what: { required: true }
gates:
  parts_done:
    after: [ part ]
    count: 1
    key: "{batch}"
    then: { job: notify, params: { what: "parts {key} done" } }
"#;

const WAIT: Duration = Duration::from_secs(60);
const QUICK: Duration = Duration::from_secs(30);

/// The workspace's own zmq-sys (`zmq-sys/`, patched in by the top-level
/// Cargo.toml) builds libzmq with libsodium. Without it the published zmq-sys
/// builds libzmq without CURVE, and the mesh cannot be encrypted.
#[test]
fn libzmq_has_curve() {
    assert_eq!(zmq::has("curve"), Some(true), "libzmq was built without CURVE: is zmq-sys/ patched in?");
    let pair = zmq::CurveKeyPair::new();
    assert!(pair.is_ok(), "cannot make a CURVE key pair: {:?}", pair.err());
}

/// A key pair written by `jobz keygen --out DIR/NAME`.
struct Keys {
    secret: PathBuf,
    public: PathBuf,
    /// The public key as printed by keygen.
    z85: String,
}

impl Keys {
    fn secret(&self) -> String {
        self.secret.display().to_string()
    }

    fn public(&self) -> String {
        self.public.display().to_string()
    }
}

fn keygen(dir: &Path, name: &str) -> Keys {
    let out = dir.join(name);
    let out_text = out.display().to_string();
    let (code, stdout, stderr) = run_jobz(dir, &["keygen", "--out", &out_text], &[], QUICK);
    assert_eq!(code, 0, "jobz keygen --out {out_text}: {stderr}");
    Keys { secret: out.join("jobz.key"), public: out.join("jobz.pub"), z85: stdout.trim().to_string() }
}

/// A broker's key pair and a directory of allowed public keys holding `allowed`.
fn allow(mesh: &Mesh, allowed: &[&Keys]) -> PathBuf {
    let dir = mesh.path().join("allowed");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("mkdir {}: {e}", dir.display());
    }
    for (i, keys) in allowed.iter().enumerate() {
        if let Err(e) = std::fs::copy(&keys.public, dir.join(format!("peer{i}.pub"))) {
            panic!("copy {}: {e}", keys.public.display());
        }
    }
    dir
}

fn curve_broker(mesh: &Mesh, broker: &Keys, allowed: &Path) -> Proc {
    let allowed = allowed.display().to_string();
    mesh.broker(&["--curve-key", &broker.secret(), "--allowed-keys", &allowed])
}

fn curve_worker(mesh: &Mesh, name: &str, own: &Keys, broker: &Keys) -> Proc {
    mesh.worker_with(name, 2, &["--curve-key", &own.secret(), "--broker-key", &broker.public()])
}

fn workers(mesh: &Mesh) -> Vec<serde_json::Value> {
    support::json(&get(&mesh.url(), "/workers").1)["workers"].as_array().cloned().unwrap_or_default()
}

fn wait_log(mesh: &Mesh, process: &str, needle: &str) {
    if wait_for(WAIT, || (mesh.log_lines_with(process, needle) > 0).then_some(())).is_none() {
        panic!("{process}'s log never said {needle:?} within {WAIT:?}\n{}", mesh.logs());
    }
}

/// Starts `hello who=NAME` and waits until it succeeded.
fn hello_runs(mesh: &Mesh, who: &str) {
    let id = id_of(&mesh.start(&format!("job_name=hello&who={who}")));
    let job = mesh.wait_final(&id, WAIT);
    assert_eq!(job["status"], "succeeded", "{job:#}\n{}", mesh.logs());
    let out = std::fs::read_to_string(mesh.path().join("hello.out")).unwrap_or_default();
    assert!(out.lines().any(|l| l == format!("hello {who}")), "the job ran: {out:?}");
}

#[test]
fn keygen_writes_a_private_key_pair_and_never_overwrites_one() {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let keys = keygen(dir.path(), "k");
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
    assert_eq!(mode(&keys.secret), 0o600, "the secret key file is private");
    assert_eq!(mode(&keys.public), 0o644);
    assert_eq!(keys.z85.len(), 40, "keygen prints the public key: {:?}", keys.z85);
    let public = std::fs::read_to_string(&keys.public).unwrap_or_default();
    assert!(public.contains(&format!("public-key = \"{}\"", keys.z85)), "{public}");
    assert!(!public.contains("secret-key"), "{public}");
    let secret = std::fs::read_to_string(&keys.secret).unwrap_or_default();
    assert!(secret.contains("secret-key = \"") && secret.contains(&keys.z85), "{secret}");

    // A second run into the same directory is refused and changes nothing.
    let out = dir.path().join("k").display().to_string();
    let (code, stdout, stderr) = run_jobz(dir.path(), &["keygen", "--out", &out], &[], QUICK);
    assert_eq!(code, 2, "refused: {stdout} {stderr}");
    assert!(stderr.contains("already exists") && stderr.contains("never overwrites"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&keys.secret).unwrap_or_default(), secret, "the secret key is untouched");
    assert_eq!(std::fs::read_to_string(&keys.public).unwrap_or_default(), public);
    // Also when only the public key is in the way.
    if let Err(e) = std::fs::remove_file(&keys.secret) {
        panic!("rm: {e}");
    }
    let (code, _, stderr) = run_jobz(dir.path(), &["keygen", "--out", &out], &[], QUICK);
    assert_eq!(code, 2, "{stderr}");
    assert!(!keys.secret.exists(), "no secret key without its public key");
}

/// The broker binds every interface with a key: encrypted, so no plain-text
/// warning; workers with allowed keys, given the broker's key as a file or as
/// Z85 through the environment, register and run jobs.
#[test]
fn workers_with_allowed_keys_run_jobs_over_curve() {
    let mesh = Mesh::new(JOBS);
    let (broker_keys, w1, w2) = (keygen(mesh.path(), "broker"), keygen(mesh.path(), "w1"), keygen(mesh.path(), "w2"));
    let allowed = allow(&mesh, &[&w1, &w2]);
    let bind = format!("tcp://0.0.0.0:{}", mesh.zmq_port);
    let (http, data, config) = (
        format!("127.0.0.1:{}", mesh.http_port),
        mesh.path().join("data").display().to_string(),
        mesh.config.display().to_string(),
    );
    let allowed_text = allowed.display().to_string();
    let args = [
        "broker",
        "--config",
        &config,
        "--http",
        &http,
        "--bind",
        &bind,
        "--data",
        &data,
        "--curve-key",
        &broker_keys.secret(),
        "--allowed-keys",
        &allowed_text,
    ];
    let _broker = mesh.spawn("broker", &args);
    wait_until(QUICK, "the broker's /healthz", || get(&mesh.url(), "/healthz").0 == 200);
    let _w1 = curve_worker(&mesh, "w1", &w1, &broker_keys);
    let endpoint = mesh.endpoint();
    let w2_secret = w2.secret();
    let env = [("JOBZ_CURVE_KEY", w2_secret.as_str()), ("JOBZ_BROKER_KEY", broker_keys.z85.as_str())];
    let _w2 = mesh.spawn_with_env("w2", &["worker", "--broker", &endpoint, "--config", &config, "--name", "w2"], &env);
    mesh.wait_workers(2);
    for who in ["alice", "bob", "carol", "dave"] {
        hello_runs(&mesh, who);
    }
    wait_log(&mesh, "broker", "the mesh is encrypted and authenticated (CURVE)");
    wait_log(&mesh, "broker", "admitted a peer with an allowed CURVE key");
    assert_eq!(mesh.log_lines_with("broker", "NOT encrypted"), 0, "no plain-text warning with a key");
    assert_eq!(mesh.metric("jobz_mesh_refused_total{reason=\"key\"}"), Some(0.0));
}

#[test]
fn a_worker_with_an_unknown_key_is_refused_and_its_address_logged() {
    let mesh = Mesh::new(JOBS);
    let (broker_keys, known, stranger) =
        (keygen(mesh.path(), "broker"), keygen(mesh.path(), "known"), keygen(mesh.path(), "stranger"));
    let allowed = allow(&mesh, &[&known]);
    let _broker = curve_broker(&mesh, &broker_keys, &allowed);
    let id = id_of(&mesh.start("job_name=hello&who=waiting"));
    let _stranger = curve_worker(&mesh, "stranger", &stranger, &broker_keys);

    wait_log(&mesh, "broker", "refused a peer: its CURVE public key is not in --allowed-keys");
    let line = std::fs::read_to_string(mesh.path().join("broker.log"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("not in --allowed-keys"))
        .map(String::from)
        .unwrap_or_default();
    assert!(line.contains("127.0.0.1"), "the refusal names the peer's address: {line}");
    assert!(line.contains(&stranger.z85), "and its key: {line}");
    wait_log(&mesh, "stranger", "refused our key");
    assert!(workers(&mesh).is_empty(), "a refused worker is never registered: {:?}", workers(&mesh));
    assert_eq!(mesh.job(&id)["status"], "queued", "nothing ran the job");
    assert!(mesh.metric("jobz_mesh_refused_total{reason=\"key\"}").is_some_and(|n| n >= 1.0));

    // The broker goes on serving: an allowed worker runs the waiting job.
    let _known = curve_worker(&mesh, "known", &known, &broker_keys);
    let job = mesh.wait_final(&id, WAIT);
    assert_eq!(job["status"], "succeeded", "{job:#}");
    assert_eq!(job["worker"], "known", "{job:#}");
    assert_eq!(workers(&mesh).len(), 1, "still only the allowed worker: {:?}", workers(&mesh));
}

#[test]
fn a_plain_text_worker_is_refused_by_a_curve_broker() {
    let mesh = Mesh::new(JOBS);
    let (broker_keys, known) = (keygen(mesh.path(), "broker"), keygen(mesh.path(), "known"));
    let allowed = allow(&mesh, &[&known]);
    let _broker = curve_broker(&mesh, &broker_keys, &allowed);
    let id = id_of(&mesh.start("job_name=hello&who=plain"));
    let _plain = mesh.worker("plain", 1);

    wait_log(&mesh, "broker", "refused a connection that does not speak CURVE");
    wait_log(&mesh, "plain", "requires CURVE");
    assert!(workers(&mesh).is_empty(), "{:?}", workers(&mesh));
    assert_eq!(mesh.job(&id)["status"], "queued");
    assert!(mesh.metric("jobz_mesh_refused_total{reason=\"handshake\"}").is_some_and(|n| n >= 1.0));

    let _known = curve_worker(&mesh, "known", &known, &broker_keys);
    assert_eq!(mesh.wait_final(&id, WAIT)["status"], "succeeded");
}

/// A ZMTP 3.0 greeting offering `mechanism`, as a client.
fn greeting(mechanism: &[u8]) -> Vec<u8> {
    let mut g = vec![0xFF, 0, 0, 0, 0, 0, 0, 0, 0, 0x7F, 3, 0];
    let mut name = [0u8; 20];
    name[..mechanism.len()].copy_from_slice(mechanism);
    g.extend_from_slice(&name);
    g.push(0); // as-server: no
    g.extend_from_slice(&[0; 31]);
    g
}

fn raw_connect(mesh: &Mesh) -> TcpStream {
    let stream = match TcpStream::connect(("127.0.0.1", mesh.zmq_port)) {
        Ok(s) => s,
        Err(e) => panic!("connect to the ZeroMQ port: {e}"),
    };
    if let Err(e) = stream.set_write_timeout(Some(QUICK)) {
        panic!("write timeout: {e}");
    }
    stream
}

/// Bytes the broker must not choke on, written to the CURVE port. A write may
/// fail once the broker has closed the connection; that is a refusal too.
fn send_raw(stream: &mut TcpStream, bytes: &[u8]) {
    // The broker may close the connection before we are done: that is it refusing.
    let _ = stream.write_all(bytes).and_then(|()| stream.flush());
}

#[test]
fn garbage_on_the_curve_port_changes_nothing_and_stalls_no_handshake() {
    let mesh = Mesh::new(JOBS);
    let (broker_keys, known) = (keygen(mesh.path(), "broker"), keygen(mesh.path(), "known"));
    let allowed = allow(&mesh, &[&known]);
    let _broker = curve_broker(&mesh, &broker_keys, &allowed);

    // Random bytes (not ZeroMQ at all: libzmq drops the connection without a word).
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    let mut junk = raw_connect(&mesh);
    send_raw(&mut junk, &random);
    drop(junk);

    // A CURVE greeting, then a HELLO command of the wrong size: a protocol error.
    let mut broken = raw_connect(&mesh);
    let mut bytes = greeting(b"CURVE");
    bytes.extend_from_slice(&[0x04, 16, 5]);
    bytes.extend_from_slice(b"HELLO");
    bytes.extend_from_slice(&[0xAB; 10]);
    send_raw(&mut broken, &bytes);
    wait_log(&mesh, "broker", "its handshake broke the protocol");

    // A command frame that announces a terabyte: refused by the size limit, nothing allocated.
    let mut huge = raw_connect(&mesh);
    let mut bytes = greeting(b"CURVE");
    bytes.push(0x06);
    bytes.extend_from_slice(&(1u64 << 40).to_be_bytes());
    bytes.extend_from_slice(&[0; 64]);
    send_raw(&mut huge, &bytes);

    // Half a greeting, and then silence, held open while a worker connects.
    let mut stalled = raw_connect(&mesh);
    send_raw(&mut stalled, &greeting(b"CURVE")[..11]);

    let _known = curve_worker(&mesh, "known", &known, &broker_keys);
    mesh.wait_workers(1);
    hello_runs(&mesh, "afterwards");
    // The stalled connection is dropped at the handshake timeout, and said so.
    wait_log(&mesh, "broker", "ended before its handshake finished");
    assert_eq!(get(&mesh.url(), "/healthz").0, 200, "the broker is fine");
    hello_runs(&mesh, "again");
    drop((broken, huge, stalled));
}

/// A broker refuses to start on a bad key (exit 2, a message naming the
/// problem) and creates nothing, not even its data directory.
#[test]
fn a_broker_with_a_bad_key_refuses_to_start() {
    let mesh = Mesh::new(JOBS);
    let (broker_keys, w1) = (keygen(mesh.path(), "broker"), keygen(mesh.path(), "w1"));
    let allowed = allow(&mesh, &[&w1]).display().to_string();
    let garbage = mesh.path().join("garbage.key");
    if let Err(e) = std::fs::write(&garbage, "public-key = \"short\"\nsecret-key = \"also short\"\n") {
        panic!("write: {e}");
    }
    let empty = mesh.path().join("empty");
    if let Err(e) = std::fs::create_dir(&empty) {
        panic!("mkdir: {e}");
    }
    let (config, http, bind) =
        (mesh.config.display().to_string(), format!("127.0.0.1:{}", mesh.http_port), mesh.endpoint());
    let data = mesh.path().join("data");
    let data_text = data.display().to_string();
    let missing = mesh.path().join("missing.key").display().to_string();
    let (garbage, empty, public) = (garbage.display().to_string(), empty.display().to_string(), broker_keys.public());
    let cases: [(&[&str], &str); 7] = [
        (&["--allowed-keys", &allowed], "--curve-key"),
        (&["--curve-key", &missing, "--allowed-keys", &allowed], "--curve-key: cannot read"),
        (&["--curve-key", &garbage, "--allowed-keys", &allowed], "garbage.key:1: public-key: a key is 40 characters"),
        (&["--curve-key", &public, "--allowed-keys", &allowed], "has no secret-key: this is a public key file"),
        (&["--curve-key", &broker_keys.secret()], "--curve-key needs --allowed-keys"),
        (&["--curve-key", &broker_keys.secret(), "--allowed-keys", &empty], "holds no *.pub file"),
        (&["--curve-key", &broker_keys.secret(), "--allowed-keys", &broker_keys.secret()], "holds a secret-key"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["broker", "--config", &config, "--http", &http, "--bind", &bind, "--data", &data_text];
        args.extend_from_slice(extra);
        let (code, stdout, stderr) = run_jobz(mesh.path(), &args, &[], QUICK);
        assert_eq!(code, 2, "{extra:?}: {stdout} {stderr}");
        assert!(stderr.contains(expected), "{extra:?}: expected {expected:?} in:\n{stderr}");
        assert!(!data.exists(), "{extra:?}: the data directory was created");
        assert!(!stderr.contains("secret-key = "), "no secret in the message: {stderr}");
    }
    // A worker's keys go in pairs, and a broker key must be a key.
    let w1_secret = w1.secret();
    for (extra, expected) in [
        (vec!["--curve-key", w1_secret.as_str()], "--broker-key"),
        (vec!["--curve-key", w1_secret.as_str(), "--broker-key", "not-a-key"], "neither a key file nor"),
    ] {
        let mut args = vec!["worker", "--broker", &bind, "--config", &config];
        args.extend_from_slice(&extra);
        let (code, stdout, stderr) = run_jobz(mesh.path(), &args, &[], QUICK);
        assert_eq!(code, 2, "{extra:?}: {stdout} {stderr}");
        assert!(stderr.contains(expected), "{extra:?}: expected {expected:?} in:\n{stderr}");
    }
}

#[test]
fn a_plain_text_broker_on_every_interface_says_so_loudly() {
    let mesh = Mesh::new(JOBS);
    let bind = format!("tcp://0.0.0.0:{}", mesh.zmq_port);
    let (config, http, data) = (
        mesh.config.display().to_string(),
        format!("127.0.0.1:{}", mesh.http_port),
        mesh.path().join("data").display().to_string(),
    );
    let _broker =
        mesh.spawn("broker", &["broker", "--config", &config, "--http", &http, "--bind", &bind, "--data", &data]);
    wait_until(QUICK, "the broker's /healthz", || get(&mesh.url(), "/healthz").0 == 200);
    wait_log(&mesh, "broker", "NOT loopback and NOT encrypted: anyone who reaches it can pose as a worker");
    let line = std::fs::read_to_string(mesh.path().join("broker.log"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("NOT encrypted"))
        .map(String::from)
        .unwrap_or_default();
    assert!(line.contains("WARN"), "a warning: {line}");
}

#[test]
fn a_semaphore_with_an_allowed_key_fires_a_gate() {
    let mesh = Mesh::new(JOBS);
    let (broker_keys, w1, s1) = (keygen(mesh.path(), "broker"), keygen(mesh.path(), "w1"), keygen(mesh.path(), "s1"));
    let allowed = allow(&mesh, &[&w1, &s1]);
    let _broker = curve_broker(&mesh, &broker_keys, &allowed);
    let _w1 = curve_worker(&mesh, "w1", &w1, &broker_keys);
    let (endpoint, config) = (mesh.endpoint(), mesh.config.display().to_string());
    let (s1_secret, broker_public) = (s1.secret(), broker_keys.public());
    let _s1 = mesh.spawn(
        "s1",
        &[
            "semaphore",
            "--broker",
            &endpoint,
            "--config",
            &config,
            "--curve-key",
            &s1_secret,
            "--broker-key",
            &broker_public,
        ],
    );
    wait_log(&mesh, "s1", "caught up: every gate event counted");
    let id = id_of(&mesh.start("job_name=part&batch=b1"));
    assert_eq!(mesh.wait_final(&id, WAIT)["status"], "succeeded");
    let fired = wait_for(WAIT, || {
        mesh.jobs_named("notify")
            .into_iter()
            .find(|j| j["params"]["what"] == "parts b1 done" && j["status"] == "succeeded")
    });
    assert!(fired.is_some(), "the gate fired through the encrypted semaphore\n{}", mesh.logs());
}

/// `jobz up --curve-key`: the local workers and semaphore use the broker's own key.
#[test]
fn jobz_up_with_a_key_runs_jobs_on_its_local_workers() {
    let mesh = Mesh::new(JOBS);
    let keys = keygen(mesh.path(), "up");
    let (config, http, bind, data) = (
        mesh.config.display().to_string(),
        format!("127.0.0.1:{}", mesh.http_port),
        mesh.endpoint(),
        mesh.path().join("data").display().to_string(),
    );
    let secret = keys.secret();
    let _up = mesh.spawn(
        "up",
        &[
            "up",
            "--config",
            &config,
            "--http",
            &http,
            "--bind",
            &bind,
            "--data",
            &data,
            "--workers",
            "1",
            "--curve-key",
            &secret,
        ],
    );
    wait_until(QUICK, "jobz up's /healthz", || get(&mesh.url(), "/healthz").0 == 200);
    mesh.wait_workers(1);
    hello_runs(&mesh, "local");
    wait_log(&mesh, "up", "the mesh is encrypted and authenticated (CURVE)");
    let id = id_of(&mesh.start("job_name=part&batch=up1"));
    assert_eq!(mesh.wait_final(&id, WAIT)["status"], "succeeded");
    let fired = wait_for(WAIT, || mesh.jobs_named("notify").into_iter().find(|j| j["status"] == "succeeded"));
    assert!(fired.is_some(), "the local semaphore fired the gate\n{}", mesh.logs());
}
