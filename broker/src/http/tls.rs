//! HTTPS on the front door: the rustls configuration built from PEM files
//! (`--tls-cert`, `--tls-key`, `--client-ca`), and the handshake of one
//! connection with a plain reason when it fails.
//!
//! With a client CA, every client must present a certificate signed by it
//! (mutual TLS, rustls's `WebPkiClientVerifier`): a client without one, or
//! with one from another CA, expired or not yet valid, never reaches HTTP.
//! TLS 1.2 and 1.3 only, ALPN `http/1.1`, the `ring` provider.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::StatusCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::limits::PLAIN_REQUEST_BYTES_MAX;
use super::parse_errors::{answer, linger};

/// The PEM files of an HTTPS front door.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// When given, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

/// Why the TLS files could not be used; each names the file and the flag it came from.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {problem}")]
    File { flag: &'static str, path: PathBuf, problem: String },
    #[error("--tls-key {key} does not belong to --tls-cert {cert}: {problem}")]
    Mismatch { cert: PathBuf, key: PathBuf, problem: String },
}

/// The crypto provider of every TLS configuration of jobz.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the front door's TLS configuration from `files`, checking that the key
/// matches the certificate and that the client CA holds usable certificates.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs("--tls-cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_problem("--tls-key", &files.key, e, "key"))?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::File { flag: "--tls-cert", path: files.cert.clone(), problem: e.to_string() })?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs("--client-ca", path)? {
                roots.add(cert).map_err(|e| TlsError::File {
                    flag: "--client-ca",
                    path: path.clone(),
                    problem: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::File { flag: "--client-ca", path: path.clone(), problem: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            problem: "the key's public half is not the certificate's".to_owned(),
        },
        other => TlsError::File { flag: "--tls-key", path: files.key.clone(), problem: other.to_string() },
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Every certificate of a PEM file; none at all is an error.
pub fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_problem(flag, path, e, "certificate"))?;
    if certs.is_empty() {
        return Err(TlsError::File {
            flag,
            path: path.to_owned(),
            problem: "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_owned(),
        });
    }
    Ok(certs)
}

fn pem_problem(flag: &'static str, path: &Path, error: rustls::pki_types::pem::Error, what: &str) -> TlsError {
    use rustls::pki_types::pem::Error;
    let problem = match error {
        Error::Io(e) => format!("cannot read it: {e}"),
        Error::NoItemsFound => format!("holds no PEM {what}"),
        other => format!("is not valid PEM: {other}"),
    };
    TlsError::File { flag, path: path.to_owned(), problem }
}

/// Why a connection never got past TLS.
#[derive(Debug)]
pub enum Refusal {
    /// The client sent something that is not TLS: plain HTTP to the HTTPS port, most likely.
    /// It was answered with a 400 saying to use `https://`.
    NotTls,
    /// The client closed the connection before or during the handshake.
    Closed,
    /// rustls refused the handshake (or the client did).
    Tls(rustls::Error),
    /// Reading or writing the socket failed.
    Io(std::io::Error),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotTls => f.write_str("not TLS (plain HTTP to the HTTPS port?); answered 400"),
            Refusal::Closed => f.write_str("the client closed the connection during the handshake"),
            Refusal::Tls(e) => f.write_str(&tls_reason(e)),
            Refusal::Io(e) => write!(f, "{e}"),
        }
    }
}

/// A rustls error in words an operator acts on.
pub fn tls_reason(error: &rustls::Error) -> String {
    match error {
        rustls::Error::NoCertificatesPresented => "no client certificate".to_owned(),
        rustls::Error::InvalidCertificate(e) => match e {
            // Another CA that has the trusted CA's name fails on the signature instead.
            CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                "client certificate not signed by the --client-ca".to_owned()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "client certificate expired".to_owned()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "client certificate not yet valid".to_owned()
            }
            other => format!("bad client certificate: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => format!("the client ended the handshake (TLS alert {alert:?})"),
        rustls::Error::InvalidMessage(_) => "not a TLS handshake".to_owned(),
        other => other.to_string(),
    }
}

/// The reason given to a plain HTTP request on the HTTPS port, so that `curl http://` says what is wrong.
const PLAIN_HTTP_ERROR: &str = "this jobz front door speaks HTTPS only: use an https:// URL";

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Runs the server side of a TLS handshake on `stream`. A client that speaks plain
/// HTTP gets a short 400 saying to use `https://`. The caller bounds the time.
pub async fn handshake(acceptor: &TlsAcceptor, mut stream: TcpStream) -> Result<TlsStream<TcpStream>, Refusal> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(0) => return Err(Refusal::Closed),
        Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => {
            answer_plain(&mut stream).await;
            return Err(Refusal::NotTls);
        }
        Ok(_) => {}
        Err(e) => return Err(Refusal::Io(e)),
    }
    acceptor.accept(stream).await.map_err(|e| {
        let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).cloned();
        match tls {
            Some(tls) => Refusal::Tls(tls),
            None if e.kind() == std::io::ErrorKind::UnexpectedEof => Refusal::Closed,
            None => Refusal::Io(e),
        }
    })
}

/// Reads what the plain client sent, answers the 400 and closes, lingering so
/// that closing does not reset the connection under the answer. Failures only
/// mean the client left.
async fn answer_plain(stream: &mut TcpStream) {
    let mut request = vec![0u8; PLAIN_REQUEST_BYTES_MAX];
    // What was read is thrown away; an error means the client is gone, and the write below fails too.
    let _ = stream.read(&mut request).await;
    if stream.write_all(&answer(StatusCode::BAD_REQUEST, PLAIN_HTTP_ERROR)).await.is_ok() {
        linger(stream).await;
    }
}
