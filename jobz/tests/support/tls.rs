//! HTTPS for tests of real processes: a blocking rustls client (what `curl
//! --cacert --cert --key` does) and rcgen certificates that `jobz certs` does
//! not make: signed by another CA, expired, not yet valid.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A client certificate and key, as PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

/// When a certificate is valid.
#[derive(Clone, Copy)]
pub enum Validity {
    Now,
    Expired,
    NotYet,
}

/// The CA `jobz certs` wrote to `dir` (`ca.key`; its name is `jobz CA`), to sign more certificates.
pub fn ca_of(dir: &Path) -> Issuer<'static, KeyPair> {
    let key = std::fs::read_to_string(dir.join("ca.key")).unwrap_or_else(|e| panic!("ca.key: {e}"));
    let key = KeyPair::from_pem(&key).unwrap_or_else(|e| panic!("ca.key: {e}"));
    Issuer::new(ca_params("jobz CA"), key)
}

/// A CA nobody trusts, with a name of its own.
pub fn other_ca() -> Issuer<'static, KeyPair> {
    Issuer::new(ca_params("another CA"), KeyPair::generate().unwrap_or_else(|e| panic!("{e}")))
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A client certificate signed by `ca`.
pub fn client_leaf(ca: &Issuer<'static, KeyPair>, name: &str, validity: Validity) -> Leaf {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let (from, to) = match validity {
        Validity::Now => ((2000, 1, 1), (2999, 1, 1)),
        Validity::Expired => ((2000, 1, 1), (2001, 1, 1)),
        Validity::NotYet => ((2990, 1, 1), (2999, 1, 1)),
    };
    params.not_before = date_time_ymd(from.0, from.1, from.2);
    params.not_after = date_time_ymd(to.0, to.1, to.2);
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let cert = params.signed_by(&key, ca).unwrap_or_else(|e| panic!("{e}"));
    Leaf { cert: cert.pem(), key: key.serialize_pem() }
}

/// A blocking HTTPS client for one front door: the CA it trusts, maybe a client
/// certificate, maybe a bearer token.
pub struct Https {
    pub port: u16,
    config: Arc<rustls::ClientConfig>,
    pub token: Option<String>,
}

impl Https {
    /// Trusts the PEM CA at `ca`; presents `identity` (certificate and key PEM text) when given.
    pub fn new(port: u16, ca: &Path, identity: Option<(&str, &str)>) -> Https {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).unwrap_or_else(|e| panic!("{e}")) {
            roots.add(cert.unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("{e}"))
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap_or_else(|e| panic!("{e}"))];
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
                builder.with_client_auth_cert(chain, key).unwrap_or_else(|e| panic!("{e}"))
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Https { port, config: Arc::new(config), token: None }
    }

    pub fn with_token(mut self, token: &str) -> Https {
        self.token = Some(token.to_owned());
        self
    }

    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        self.request("GET", path, "")
    }

    /// One HTTP/1.1 request over TLS on a fresh connection: the code and body, or why it failed.
    pub fn request(&self, method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
        let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
        let connection = rustls::ClientConnection::new(self.config.clone(), name).map_err(|e| e.to_string())?;
        let tcp = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        tcp.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| e.to_string())?;
        let mut stream = rustls::StreamOwned::new(connection, tcp);
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            head.push_str("Content-Type: application/json\r\n");
        }
        if let Some(token) = &self.token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).map_err(|e| format!("write: {e}"))?;
        stream.write_all(body.as_bytes()).map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| format!("no answer: {text:?}"))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((code, body))
    }
}
