//! [`HttpClient`]: the few HTTP calls the client commands make, with a
//! deadline on every one and errors a person can act on.
//!
//! It runs over hyper-util's pooled client with hyper-rustls's connector, so
//! `http://` and `https://` URLs both work; `https://` needs `--cacert` (and
//! `--cert`/`--key` for a front door that asks for a client certificate).
//! A bearer token (`--token` or `JOBZ_TOKEN`) goes with every request.

use std::fmt;
use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use broker::http::wire::ErrorBody;

use super::tls::{find_tls_error, ClientTls};

/// How long connecting to the front door may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take, answer body included (log downloads excepted).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A log download may pause this long between two pieces before it is given up.
pub const LOG_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest JSON answer read into memory (a list of 1000 jobs with their output tails fits).
pub const ANSWER_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Pooled connections are dropped after this long idle: shorter than the front door's
/// 10 s keep-alive, so a request never goes out on a connection the server is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call did not get the answer it wanted.
#[derive(Debug)]
pub enum Failure {
    /// The front door answered with an error: its code and JSON error body.
    Refused { status: StatusCode, body: ErrorBody },
    /// No connection could be made.
    Unreachable { url: String, reason: String },
    /// No answer in time.
    TimedOut { url: String, after: Duration },
    /// The TLS handshake (or the front door's verdict on our certificate) failed; nothing was done.
    Tls { url: String, reason: String },
    /// An answer that is not what the API promises.
    BadAnswer { url: String, reason: String },
    /// The command line asked for something impossible; nothing was sent.
    Usage(String),
    /// Writing our own output failed (e.g. a closed pipe).
    Output(std::io::Error),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused { status, body } => {
                write!(f, "{} ({})", body.error, status.as_u16())?;
                for (param, problem) in body.params.iter().flatten() {
                    write!(f, "\n  {param}: {problem}")?;
                }
                Ok(())
            }
            Failure::Unreachable { url, reason } => write!(
                f,
                "cannot reach the jobz front door at {url} ({reason}); is it running? \
                 `jobz up` starts one; --url or JOBZ_URL points elsewhere"
            ),
            Failure::TimedOut { url, after } => {
                write!(f, "the jobz front door at {url} did not answer within {}s", after.as_secs())
            }
            Failure::Tls { url, reason } => write!(f, "TLS with the jobz front door at {url}: {reason}"),
            Failure::BadAnswer { url, reason } => write!(f, "unexpected answer from {url}: {reason}"),
            Failure::Usage(message) => f.write_str(message),
            Failure::Output(e) => write!(f, "writing output: {e}"),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Output(e)
    }
}

/// A JSON answer: the raw bytes (printed unchanged by `--json`) and their parse.
pub struct JsonAnswer {
    pub raw: Bytes,
    pub value: serde_json::Value,
}

/// What a log download ended with.
pub struct LogPiece {
    /// Bytes written to the output.
    pub written: u64,
    /// `Jobz-Next-Offset`: where the next download continues.
    pub next_offset: Option<u64>,
    /// `Jobz-Job-Status`: the job's status before the log was read.
    pub status: Option<String>,
}

/// Where the front door is and how to get in: what every client command is given.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// `http://host:port` or `https://host:port`, optionally with a path prefix.
    pub url: String,
    pub tls: ClientTls,
    /// Sent as `Authorization: Bearer TOKEN`; never printed.
    pub token: Option<String>,
}

#[cfg(test)]
impl ClientOptions {
    /// Plain HTTP without a token.
    pub fn plain(url: &str) -> ClientOptions {
        ClientOptions { url: url.to_owned(), ..ClientOptions::default() }
    }
}

/// A client for one front door.
pub struct HttpClient<C = HttpsConnector<HttpConnector>> {
    client: Client<C, Full<Bytes>>,
    /// The URL without a trailing slash; paths are appended to it.
    base: String,
    /// The host of the URL, for messages about the server's certificate.
    host: String,
    token: Option<String>,
    tls: ClientTls,
    request_timeout: Duration,
}

impl HttpClient<HttpsConnector<HttpConnector>> {
    /// A client for the front door of `options`: TLS for an `https://` URL, the token on every request.
    pub fn new(options: &ClientOptions) -> Result<HttpClient<HttpsConnector<HttpConnector>>, Failure> {
        let url = options.url.as_str();
        let uri = parse_url(url)?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let builder = if uri.scheme_str() == Some("https") {
            HttpsConnectorBuilder::new().with_tls_config(options.tls.config(url)?).https_only()
        } else {
            // No TLS is spoken on an http:// URL; the configuration is never used.
            let unused = rustls::ClientConfig::builder_with_provider(broker::http::tls::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| Failure::Usage(format!("TLS: {e}")))?
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
            HttpsConnectorBuilder::new().with_tls_config(unused).https_or_http()
        };
        let connector = builder.enable_http1().wrap_connector(connector);
        let mut client = HttpClient::with_connector(url, connector)?;
        client.token = options.token.clone().filter(|t| !t.is_empty());
        client.tls = options.tls.clone();
        Ok(client)
    }
}

/// Checks a front door URL: `http` or `https`, no query string.
fn parse_url(url: &str) -> Result<Uri, Failure> {
    let uri: Uri = url.parse().map_err(|e| Failure::Usage(format!("{url:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(Failure::Usage(format!("{url:?} is not an http:// or https:// URL"))),
    }
    if uri.query().is_some() {
        return Err(Failure::Usage(format!("{url:?}: the front door URL takes no query string")));
    }
    Ok(uri)
}

impl<C: Connect + Clone + Send + Sync + 'static> HttpClient<C> {
    /// A client over any connector, without a token.
    pub fn with_connector(url: &str, connector: C) -> Result<HttpClient<C>, Failure> {
        let uri = parse_url(url)?;
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        Ok(HttpClient {
            client,
            base: url.trim_end_matches('/').to_owned(),
            host: uri.host().unwrap_or_default().to_owned(),
            token: None,
            tls: ClientTls::default(),
            request_timeout: REQUEST_TIMEOUT,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends one request and returns the answer's head; the body is still to be read.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(HeaderName, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>, Failure> {
        let url = format!("{}{path}", self.base);
        let mut request = Request::builder()
            .method(method)
            .uri(&url)
            .header(USER_AGENT, concat!("jobz/", env!("CARGO_PKG_VERSION")))
            .header(ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        for (name, value) in headers {
            let value = HeaderValue::from_str(value)
                .map_err(|_| Failure::Usage(format!("{value:?} cannot be sent as the {name} header")))?;
            request = request.header(name, value);
        }
        let request = match body {
            Some(body) => request.header(CONTENT_TYPE, "application/json").body(Full::new(Bytes::from(body))),
            None => request.body(Full::new(Bytes::new())),
        }
        .map_err(|e| Failure::Usage(format!("cannot build a request for {url}: {e}")))?;
        match tokio::time::timeout(self.request_timeout, self.client.request(request)).await {
            Err(_) => Err(Failure::TimedOut { url: self.base.clone(), after: self.request_timeout }),
            Ok(Ok(response)) => Ok(response),
            // A refused certificate shows at the handshake or, with TLS 1.3, at the first read.
            Ok(Err(e)) if find_tls_error(&e).is_some() => Err(Failure::Tls {
                url: self.base.clone(),
                reason: find_tls_error(&e).map(|tls| self.tls.explain(tls, &self.host)).unwrap_or_default(),
            }),
            Ok(Err(e)) if e.is_connect() => {
                Err(Failure::Unreachable { url: self.base.clone(), reason: root_cause(&e) })
            }
            Ok(Err(e)) => Err(Failure::BadAnswer { url: self.base.clone(), reason: root_cause(&e) }),
        }
    }

    /// A request whose answer is JSON. Any code outside 2xx is a [`Failure::Refused`]
    /// carrying the server's error message.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        headers: &[(HeaderName, String)],
        body: Option<Vec<u8>>,
    ) -> Result<JsonAnswer, Failure> {
        let response = self.send(method, path, headers, body).await?;
        let status = response.status();
        let raw = self.read_all(response).await?;
        if !status.is_success() {
            return Err(refused(status, &raw));
        }
        if status == StatusCode::NO_CONTENT {
            return Ok(JsonAnswer { raw, value: serde_json::Value::Null });
        }
        let value = serde_json::from_slice(&raw).map_err(|e| Failure::BadAnswer {
            url: self.base.clone(),
            reason: format!("the answer is not JSON: {e}"),
        })?;
        Ok(JsonAnswer { raw, value })
    }

    /// `GET /jobs/{id}/log?offset=N`, written to `out` piece by piece as it arrives.
    pub async fn log(&self, id: &str, offset: u64, out: &mut dyn Write) -> Result<LogPiece, Failure> {
        let path = format!("/jobs/{}/log?offset={offset}", encode(id));
        let response = self.send(Method::GET, &path, &[], None).await?;
        let status = response.status();
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let next_offset = header("jobz-next-offset").and_then(|v| v.parse().ok());
        let job_status = header("jobz-job-status");
        if !status.is_success() {
            let raw = self.read_all(response).await?;
            return Err(refused(status, &raw));
        }
        let mut body = response.into_body();
        let mut written = 0u64;
        loop {
            let frame = match tokio::time::timeout(LOG_IDLE_TIMEOUT, body.frame()).await {
                Err(_) => return Err(Failure::TimedOut { url: self.base.clone(), after: LOG_IDLE_TIMEOUT }),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(Failure::BadAnswer { url: self.base.clone(), reason: root_cause(&e) }),
                Ok(Some(Ok(frame))) => frame,
            };
            if let Ok(data) = frame.into_data() {
                out.write_all(&data)?;
                written += data.len() as u64;
            }
        }
        out.flush()?;
        Ok(LogPiece { written, next_offset, status: job_status })
    }

    /// The whole answer body, within the request timeout and [`ANSWER_BYTES_MAX`].
    async fn read_all(&self, response: Response<Incoming>) -> Result<Bytes, Failure> {
        let limited = http_body_util::Limited::new(response.into_body(), ANSWER_BYTES_MAX);
        match tokio::time::timeout(self.request_timeout, limited.collect()).await {
            Err(_) => Err(Failure::TimedOut { url: self.base.clone(), after: self.request_timeout }),
            Ok(Err(e)) => {
                Err(Failure::BadAnswer { url: self.base.clone(), reason: format!("reading the answer: {e}") })
            }
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }
}

/// The server's error, from its JSON body when there is one (a proxy's HTML page,
/// or an older front door's 431, have none).
fn refused(status: StatusCode, raw: &[u8]) -> Failure {
    let body = serde_json::from_slice::<ErrorBody>(raw).unwrap_or_else(|_| ErrorBody {
        error: format!("HTTP {status}"),
        param: None,
        params: None,
        scope: None,
    });
    Failure::Refused { status, body }
}

/// The innermost cause, which is the one a person understands ("Connection refused").
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// Percent-encodes a path segment or query value: everything but RFC 3986's unreserved characters.
pub fn encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_values_are_percent_encoded() {
        assert_eq!(encode("job-01_a.b~"), "job-01_a.b~");
        assert_eq!(encode("a/b?c=d&e f"), "a%2Fb%3Fc%3Dd%26e%20f");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn http_and_https_urls_are_taken_and_https_needs_a_ca() {
        assert!(HttpClient::new(&ClientOptions::plain("http://127.0.0.1:6769/")).is_ok());
        let https = HttpClient::new(&ClientOptions::plain("https://example.com"));
        assert!(matches!(https, Err(Failure::Usage(m)) if m.contains("--cacert")));
        assert!(matches!(HttpClient::new(&ClientOptions::plain("ftp://x")), Err(Failure::Usage(_))));
        assert!(matches!(HttpClient::new(&ClientOptions::plain("not a url")), Err(Failure::Usage(_))));
    }

    #[test]
    fn a_refusal_shows_the_servers_message_and_each_param() {
        let raw = br#"{"error":"bad params","params":{"who":"does not match"}}"#;
        let failure = refused(StatusCode::BAD_REQUEST, raw);
        assert_eq!(failure.to_string(), "bad params (400)\n  who: does not match");
        let failure = refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, b"");
        assert!(failure.to_string().starts_with("HTTP 431"), "{failure}");
    }
}
