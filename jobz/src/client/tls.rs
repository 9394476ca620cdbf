//! The client side of HTTPS: the rustls configuration from `--cacert`,
//! `--cert` and `--key` (or `JOBZ_CACERT`, `JOBZ_CERT`, `JOBZ_KEY`), and TLS
//! failures told in terms of those flags.

use std::path::{Path, PathBuf};

use broker::http::tls::{provider, read_certs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};

use super::http::Failure;

/// The TLS files of a client command.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// The CA that signed the front door's certificate.
    pub cacert: Option<PathBuf>,
    /// The client's certificate, for a front door that asks for one (`--client-ca`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// The rustls configuration for an `https://` front door.
    pub fn config(&self, url: &str) -> Result<ClientConfig, Failure> {
        let Some(cacert) = &self.cacert else {
            return Err(Failure::Usage(format!(
                "{url} is HTTPS: pass --cacert FILE (or set JOBZ_CACERT), the CA certificate that signed the front \
                 door's certificate (`jobz certs` writes ca.pem; for a public CA, the system bundle such as \
                 /etc/ssl/certs/ca-certificates.crt)"
            )));
        };
        let mut roots = RootCertStore::empty();
        let certs = read_certs("--cacert", cacert).map_err(|e| Failure::Usage(e.to_string()))?;
        let (added, _ignored) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(Failure::Usage(format!("--cacert {}: holds no usable CA certificate", cacert.display())));
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| Failure::Usage(format!("TLS: {e}")))?
            .with_root_certificates(roots);
        // hyper-rustls sets ALPN (`http/1.1`) itself and refuses a configuration that has it already.
        let config = match (&self.cert, &self.key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = read_certs("--cert", cert).map_err(|e| Failure::Usage(e.to_string()))?;
                let key_der = read_key(key)?;
                builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                    Failure::Usage(format!("--key {} does not fit --cert {}: {e}", key.display(), cert.display()))
                })?
            }
            (Some(_), None) => return Err(Failure::Usage("--cert needs --key (or JOBZ_KEY) too".to_owned())),
            (None, Some(_)) => return Err(Failure::Usage("--key needs --cert (or JOBZ_CERT) too".to_owned())),
        };
        Ok(config)
    }

    /// A TLS failure of a request, in words that point at the flag to change.
    pub fn explain(&self, error: &rustls::Error, host: &str) -> String {
        let cacert = shown(self.cacert.as_deref());
        let cert = shown(self.cert.as_deref());
        match error {
            rustls::Error::InvalidCertificate(e) => match e {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    format!("the server's certificate is not signed by --cacert {cacert}")
                }
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => format!(
                    "the server's certificate is not valid for {host} (`jobz certs --host {host}` makes one that is)"
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    "the server's certificate has expired".to_owned()
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "the server's certificate is not valid yet (are the clocks right?)".to_owned()
                }
                other => format!("the server's certificate is refused: {other:?}"),
            },
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
                "the front door requires a client certificate: pass --cert and --key (or JOBZ_CERT and JOBZ_KEY)"
                    .to_owned()
            }
            // A certificate from another CA whose name is the trusted CA's fails on its signature.
            rustls::Error::AlertReceived(
                AlertDescription::UnknownCA | AlertDescription::BadCertificate | AlertDescription::DecryptError,
            ) => {
                format!("the front door refused the client certificate --cert {cert}: it is not signed by the CA the front door trusts")
            }
            rustls::Error::AlertReceived(AlertDescription::CertificateExpired) => {
                format!(
                    "the front door refused the client certificate --cert {cert}: it has expired or is not valid yet"
                )
            }
            rustls::Error::InvalidMessage(_) => {
                "the front door does not speak TLS; is it plain HTTP? (then use an http:// URL)".to_owned()
            }
            other => format!("TLS failed: {other}"),
        }
    }
}

fn shown(path: Option<&Path>) -> String {
    path.map_or_else(|| "(none)".to_owned(), |p| p.display().to_string())
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Failure> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        let problem = match e {
            rustls::pki_types::pem::Error::Io(e) => format!("cannot read it: {e}"),
            rustls::pki_types::pem::Error::NoItemsFound => "holds no PEM key".to_owned(),
            other => format!("is not valid PEM: {other}"),
        };
        Failure::Usage(format!("--key {}: {problem}", path.display()))
    })
}

/// The rustls error somewhere in `error`'s chain. An I/O error is looked into through the
/// error it wraps (`get_ref`): its `source` skips that error, and hyper-rustls wraps
/// tokio-rustls's I/O error, which wraps the rustls error, in another.
pub fn find_tls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    /// Chains are short; this only guards against a cycle.
    const DEPTH_MAX: usize = 32;
    let mut cause = Some(error);
    for _ in 0..DEPTH_MAX {
        let current = cause?;
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        cause = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => current.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rustls_error_is_found_under_nested_io_errors() {
        let tls = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let inner = std::io::Error::new(std::io::ErrorKind::InvalidData, tls.clone());
        let outer = std::io::Error::other(inner);
        assert_eq!(find_tls_error(&outer), Some(&tls));
        assert_eq!(find_tls_error(&std::io::Error::other("plain")), None);
        let files = ClientTls { cacert: Some("ca.pem".into()), ..ClientTls::default() };
        assert_eq!(files.explain(&tls, "127.0.0.1"), "the server's certificate is not signed by --cacert ca.pem");
    }
}
