//! HTTPS on the front door, over real TLS on 127.0.0.1 against the in-memory
//! `MemoryApi`, with certificates made here by rcgen: with a client CA, a
//! client without a certificate, with one from another CA, expired or not yet
//! valid never reaches HTTP (nothing starts) and the server goes on serving;
//! the right certificate is served; plain HTTP to the HTTPS port gets a JSON
//! 400 saying to use https; a client that stalls its handshake is dropped
//! after the header read timeout; bad TLS files are refused naming the file.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use broker::http::auth::{hash_text, hash_token};
use broker::http::memory::MemoryApi;
use broker::http::tls::{server_config, TlsError, TlsFiles};
use broker::http::{serve, HttpOptions, Tokens};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

/// The longest any single step of a test may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// A CA made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM.
struct Leaf {
    cert: String,
    key: String,
}

#[derive(Clone, Copy)]
enum Role {
    Server,
    Client,
}

/// When a leaf is valid.
#[derive(Clone, Copy)]
enum Validity {
    Now,
    Expired,
    NotYet,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Ca { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn leaf(&self, name: &str, role: Role, validity: Validity) -> Leaf {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![match role {
            Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Role::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        match validity {
            Validity::Now => {
                params.not_before = date_time_ymd(2000, 1, 1);
                params.not_after = date_time_ymd(2999, 1, 1);
            }
            Validity::Expired => {
                params.not_before = date_time_ymd(2000, 1, 1);
                params.not_after = date_time_ymd(2001, 1, 1);
            }
            Validity::NotYet => {
                params.not_before = date_time_ymd(2990, 1, 1);
                params.not_after = date_time_ymd(2999, 1, 1);
            }
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert: cert.pem(), key: key.serialize_pem() }
    }
}

/// The files of one test's PKI in its own temp dir.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files { dir: tempfile::tempdir().unwrap() }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

struct Server {
    addr: SocketAddr,
    api: MemoryApi,
    ca: Ca,
    shutdown: CancellationToken,
    _files: Files,
    _logs: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An HTTPS front door whose certificate is signed by a fresh CA; with `mutual`,
/// clients need a certificate from that CA too.
async fn server(mutual: bool, options: HttpOptions) -> Server {
    let ca = Ca::new("jobz test CA");
    let files = Files::new();
    let leaf = ca.leaf("jobz broker", Role::Server, Validity::Now);
    let tls = TlsFiles {
        cert: files.write("server.pem", &leaf.cert),
        key: files.write("server.key", &leaf.key),
        client_ca: mutual.then(|| files.write("ca.pem", &ca.pem())),
    };
    let config = server_config(&tls).unwrap_or_else(|e| panic!("{e}"));
    let logs = tempfile::tempdir().unwrap();
    let api = MemoryApi::new(logs.path());
    api.declare("hello", &["who"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let options = HttpOptions { tls: Some(config), ..options };
    tokio::spawn(serve(listener, api.clone(), options, shutdown.clone()));
    Server { addr, api, ca, shutdown, _files: files, _logs: logs }
}

/// A client trusting `trusted`, presenting `identity` when given.
fn client_config(trusted: &Ca, identity: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(trusted.pem().as_bytes()).unwrap()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(broker::http::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(leaf) => {
            let certs = vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()];
            let key = PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One HTTPS request on a fresh connection: the code and body, or why it failed.
async fn request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    token: Option<&str>,
) -> Result<(StatusCode, String), String> {
    tokio::time::timeout(DEADLINE, async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
        let tls = TlsConnector::from(config).connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let mut request = Request::builder().method(Method::GET).uri(path).header("host", "127.0.0.1");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| format!("request: {e:?}"))?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
    .await
    .unwrap_or_else(|_| Err("no answer in time".to_owned()))
}

/// The right certificate works: a start is accepted and the job reads back.
async fn assert_served(server: &Server, identity: &Leaf) {
    let config = client_config(&server.ca, Some(identity));
    let (status, body) = request(server.addr, config.clone(), "/job_start?job_name=hello&who=tls", None).await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = serde_json::from_str::<serde_json::Value>(&body).unwrap()["id"].as_str().unwrap().to_owned();
    let (status, body) = request(server.addr, config, &format!("/jobs/{id}"), None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn the_right_client_certificate_is_served() {
    let server = server(true, HttpOptions::default()).await;
    let alice = server.ca.leaf("alice", Role::Client, Validity::Now);
    assert_served(&server, &alice).await;
    assert_eq!(server.api.starts().len(), 1);
    assert_eq!(server.api.starts()[0].params["who"], "tls");
}

#[tokio::test]
async fn clients_without_a_good_certificate_never_reach_http_and_the_server_goes_on() {
    let server = server(true, HttpOptions::default()).await;
    let other = Ca::new("another CA");
    // Each refusal reaches the client as the TLS alert that says why.
    let cases = [
        ("no certificate", None, "CertificateRequired"),
        ("another CA", Some(other.leaf("mallory", Role::Client, Validity::Now)), "UnknownCA"),
        ("expired", Some(server.ca.leaf("old", Role::Client, Validity::Expired)), "CertificateExpired"),
        ("not yet valid", Some(server.ca.leaf("early", Role::Client, Validity::NotYet)), "CertificateExpired"),
    ];
    for (case, identity, alert) in &cases {
        let config = client_config(&server.ca, identity.as_ref());
        let result = request(server.addr, config, "/job_start?job_name=hello", None).await;
        let error = result.expect_err(case);
        assert!(error.contains(&format!("AlertReceived({alert})")), "{case}: {error}");
        assert!(server.api.starts().is_empty(), "{case}: a job was started");
    }
    assert_eq!(server.api.calls(), 0, "no refused client reached the broker");
    let alice = server.ca.leaf("alice", Role::Client, Validity::Now);
    assert_served(&server, &alice).await;
}

#[tokio::test]
async fn without_a_client_ca_any_tls_client_is_served() {
    let server = server(false, HttpOptions::default()).await;
    let (status, body) =
        request(server.addr, client_config(&server.ca, None), "/job_start?job_name=hello", None).await.unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_servers_ca_fails_its_handshake() {
    let server = server(false, HttpOptions::default()).await;
    let result = request(server.addr, client_config(&Ca::new("another CA"), None), "/healthz", None).await;
    let error = result.unwrap_err();
    assert!(error.contains("handshake") && error.contains("UnknownIssuer"), "{error}");
}

#[tokio::test]
async fn plain_http_to_the_https_port_gets_a_json_400_saying_https() {
    let server = server(true, HttpOptions::default()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(b"GET /job_start?job_name=hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{answer}");
    let body: serde_json::Value = serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert!(body["error"].as_str().unwrap().contains("https://"), "{body}");
    assert!(server.api.starts().is_empty());
    let alice = server.ca.leaf("alice", Role::Client, Validity::Now);
    assert_served(&server, &alice).await;
}

#[tokio::test]
async fn a_client_that_stalls_its_handshake_is_dropped_after_the_header_timeout() {
    let options = HttpOptions { header_read_timeout: Duration::from_millis(300), ..HttpOptions::default() };
    let server = server(true, options).await;
    for opening in [&b""[..], &[0x16, 0x03, 0x01][..]] {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(opening).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a stalled handshake ({opening:?}) is still open after {DEADLINE:?}");
    }
}

#[tokio::test]
async fn mutual_tls_and_tokens_are_both_needed() {
    let token = "both-token-0123456789";
    let yaml = format!(
        "jobs:\n  hello: {{ command: \"true\" }}\ntokens:\n  t: {{ hash: \"{}\", scopes: [start, read] }}\n",
        hash_text(&hash_token(token))
    );
    let tokens = Tokens::from_file(&config::parse("t.yaml", &yaml).unwrap_or_else(|e| panic!("{e}")));
    let server = server(true, HttpOptions { tokens: Arc::new(tokens), ..HttpOptions::default() }).await;
    let alice = server.ca.leaf("alice", Role::Client, Validity::Now);
    let (status, body) =
        request(server.addr, client_config(&server.ca, Some(&alice)), "/job_start?job_name=hello", None).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a certificate without a token: {body}");
    let refused = request(server.addr, client_config(&server.ca, None), "/job_start?job_name=hello", Some(token)).await;
    assert!(refused.is_err(), "a token without a certificate: {refused:?}");
    assert!(server.api.starts().is_empty());
    let (status, body) =
        request(server.addr, client_config(&server.ca, Some(&alice)), "/job_start?job_name=hello", Some(token))
            .await
            .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

// ---- bad files ----

fn refused(files: &TlsFiles) -> String {
    match server_config(files) {
        Ok(_) => panic!("{files:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_or_bad_files_are_refused_naming_the_file_and_flag() {
    let ca = Ca::new("jobz test CA");
    let files = Files::new();
    let leaf = ca.leaf("broker", Role::Server, Validity::Now);
    let cert = files.write("server.pem", &leaf.cert);
    let key = files.write("server.key", &leaf.key);
    let missing = files.dir.path().join("nope.pem");
    let garbage = files.write("garbage.pem", "hello\n");
    let tls = |cert: &Path, key: &Path, client_ca: Option<&Path>| TlsFiles {
        cert: cert.to_owned(),
        key: key.to_owned(),
        client_ca: client_ca.map(Path::to_owned),
    };

    let error = refused(&tls(&missing, &key, None));
    assert!(error.starts_with(&format!("--tls-cert {}: cannot read it", missing.display())), "{error}");
    let error = refused(&tls(&garbage, &key, None));
    assert!(error.starts_with(&format!("--tls-cert {}: holds no PEM certificate", garbage.display())), "{error}");
    let error = refused(&tls(&cert, &garbage, None));
    assert!(error.starts_with(&format!("--tls-key {}: holds no PEM key", garbage.display())), "{error}");
    let error = refused(&tls(&cert, &cert, None));
    assert!(error.contains("--tls-key") && error.contains("holds no PEM key"), "{error}");
    let error = refused(&tls(&cert, &key, Some(&missing)));
    assert!(error.starts_with(&format!("--client-ca {}", missing.display())), "{error}");
    let error = refused(&tls(&cert, &key, Some(&garbage)));
    assert!(error.starts_with(&format!("--client-ca {}: holds no PEM certificate", garbage.display())), "{error}");
    assert!(server_config(&tls(&cert, &key, None)).is_ok());
}

#[test]
fn a_key_that_is_not_the_certificates_is_refused() {
    let ca = Ca::new("jobz test CA");
    let files = Files::new();
    let one = ca.leaf("one", Role::Server, Validity::Now);
    let two = ca.leaf("two", Role::Server, Validity::Now);
    let cert = files.write("one.pem", &one.cert);
    let key = files.write("two.key", &two.key);
    let error = server_config(&TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: None }).err();
    assert!(matches!(error, Some(TlsError::Mismatch { .. })), "{error:?}");
    let text = error.map(|e| e.to_string()).unwrap_or_default();
    assert!(text.contains(&key.display().to_string()) && text.contains(&cert.display().to_string()), "{text}");
}
