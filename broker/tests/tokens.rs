//! Bearer tokens on the front door, over real sockets on 127.0.0.1 against the
//! in-memory `MemoryApi`: no token and unknown tokens are 401 with
//! `WWW-Authenticate: Bearer`, a token out of scope is 403 naming the scope,
//! the right scopes pass, `/healthz` stays open, and no refusal reaches the
//! broker (nothing is started, cancelled or retried).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use broker::http::auth::{hash_text, hash_token};
use broker::http::memory::MemoryApi;
use broker::http::{serve, HttpOptions, Tokens};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use jobz_core::Status;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The longest any single step of a test may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

const ADMIN: &str = "admin-token-0123456789";
const READER: &str = "read-token-0123456789";
const STARTER_A: &str = "start-a-token-0123456789";
const STARTER: &str = "start-token-0123456789";

/// Four tokens: everything, read only, start `a` only (and read), start anything.
fn tokens() -> Tokens {
    let yaml = format!(
        r#"jobs:
  a: {{ command: "true" }}
  b: {{ command: "true" }}
tokens:
  ops: {{ hash: "{}", scopes: [ start, read, admin ] }}
  viewer: {{ hash: "{}", scopes: [ read ] }}
  cron_a: {{ hash: "{}", scopes: [ {{ start: [ a ] }}, read ] }}
  worker: {{ hash: "{}", scopes: start }}
"#,
        hash_text(&hash_token(ADMIN)),
        hash_text(&hash_token(READER)),
        hash_text(&hash_token(STARTER_A)),
        hash_text(&hash_token(STARTER)),
    );
    let file = config::parse("tokens.yaml", &yaml).unwrap_or_else(|e| panic!("{e}"));
    Tokens::from_file(&file)
}

struct Server {
    addr: SocketAddr,
    api: MemoryApi,
    shutdown: CancellationToken,
    _logs: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn server() -> Server {
    let logs = tempfile::tempdir().unwrap();
    let api = MemoryApi::new(logs.path());
    api.declare("a", &["who"]);
    api.declare("b", &[]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let options = HttpOptions { tokens: Arc::new(tokens()), ..HttpOptions::default() };
    tokio::spawn(serve(listener, api.clone(), options, shutdown.clone()));
    Server { addr, api, shutdown, _logs: logs }
}

struct Answer {
    status: StatusCode,
    www_authenticate: Option<String>,
    body: Value,
}

/// One request on a fresh connection with `token` as a bearer token (or `authorization` as is).
async fn call(addr: SocketAddr, method: Method, path: &str, authorization: Option<String>) -> Answer {
    tokio::time::timeout(DEADLINE, async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        let mut request = Request::builder().method(method).uri(path).header("host", "127.0.0.1");
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = sender.send_request(request.body(Full::new(Bytes::new())).unwrap()).await.unwrap();
        let status = response.status();
        let www_authenticate =
            response.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or_default().to_owned());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Answer { status, www_authenticate, body }
    })
    .await
    .expect("the request is answered in time")
}

fn bearer(token: &str) -> Option<String> {
    Some(format!("Bearer {token}"))
}

/// A JSON 401 that asks for a bearer token and does not echo what was sent.
fn assert_401(answer: &Answer, sent: &str) {
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.body);
    assert_eq!(answer.www_authenticate.as_deref(), Some("Bearer realm=\"jobz\""));
    let error = answer.body["error"].as_str().unwrap_or_default();
    assert!(!error.is_empty(), "{}", answer.body);
    assert!(sent.is_empty() || !answer.body.to_string().contains(sent), "the token is echoed: {}", answer.body);
}

#[tokio::test]
async fn without_a_token_every_endpoint_but_healthz_is_401_and_nothing_starts() {
    let server = server().await;
    let answer = call(server.addr, Method::GET, "/job_start?job_name=a", None).await;
    assert_401(&answer, "");
    assert!(answer.body["error"].as_str().unwrap().contains("Authorization: Bearer TOKEN"), "{}", answer.body);
    for (method, path) in [
        (Method::POST, "/job_start?job_name=a"),
        (Method::GET, "/jobs"),
        (Method::GET, "/jobs/x"),
        (Method::GET, "/jobs/x/log"),
        (Method::POST, "/jobs/x/cancel"),
        (Method::POST, "/jobs/x/retry"),
        (Method::POST, "/jobs/x/progress"),
        (Method::POST, "/runs/x/cancel"),
        (Method::GET, "/workers"),
        (Method::GET, "/gates"),
        (Method::GET, "/schedules"),
        (Method::GET, "/metrics"),
        (Method::GET, "/queues"),
        (Method::GET, "/auth"),
    ] {
        let answer = call(server.addr, method.clone(), path, None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{method} {path}: {}", answer.body);
    }
    assert_eq!(call(server.addr, Method::GET, "/healthz", None).await.status, StatusCode::OK);
    assert!(server.api.starts().is_empty());
    assert_eq!(server.api.calls(), 1, "only /healthz reached the broker");
}

#[tokio::test]
async fn a_wrong_or_malformed_token_is_401_and_never_echoed() {
    let server = server().await;
    let wrong = "not-a-known-token-4242";
    let answer = call(server.addr, Method::GET, "/job_start?job_name=a", bearer(wrong)).await;
    assert_401(&answer, wrong);
    assert_eq!(answer.body["error"], "the token is not known to this front door");
    // One byte off a real token.
    let almost = format!("{}X", &ADMIN[..ADMIN.len() - 1]);
    assert_401(&call(server.addr, Method::GET, "/jobs", bearer(&almost)).await, &almost);
    let answer = call(server.addr, Method::GET, "/jobs", Some(format!("Basic {ADMIN}"))).await;
    assert_401(&answer, ADMIN);
    assert!(answer.body["error"].as_str().unwrap().contains("Bearer TOKEN"), "{}", answer.body);
    assert_401(&call(server.addr, Method::GET, "/jobs", Some("Bearer ".to_owned())).await, "");
    assert!(server.api.starts().is_empty());
    assert_eq!(server.api.calls(), 0);
}

#[tokio::test]
async fn a_read_token_cannot_start_cancel_or_retry() {
    let server = server().await;
    let answer = call(server.addr, Method::GET, "/job_start?job_name=a", bearer(READER)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.body);
    assert_eq!(answer.body["scope"], "start");
    assert_eq!(answer.body["error"], "token `viewer` lacks the `start` scope needed for starting jobs");
    assert!(server.api.starts().is_empty());

    let started = call(server.addr, Method::GET, "/job_start?job_name=a", bearer(ADMIN)).await;
    assert_eq!(started.status, StatusCode::ACCEPTED, "{}", started.body);
    let id = started.body["id"].as_str().unwrap().to_owned();
    for action in ["cancel", "retry"] {
        let answer = call(server.addr, Method::POST, &format!("/jobs/{id}/{action}"), bearer(READER)).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{action}: {}", answer.body);
        assert_eq!(answer.body["scope"], "admin");
        assert!(answer.body["error"].as_str().unwrap().contains("cancelling and retrying"), "{}", answer.body);
    }
    let answer = call(server.addr, Method::POST, &format!("/runs/{id}/cancel"), bearer(STARTER)).await;
    assert_eq!((answer.status, &answer.body["scope"]), (StatusCode::FORBIDDEN, &Value::from("admin")));
    assert_eq!(server.api.get(&id).unwrap().status, Status::Queued, "the refusals changed nothing");

    let read = call(server.addr, Method::GET, &format!("/jobs/{id}"), bearer(READER)).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    let listed = call(server.addr, Method::GET, "/jobs", bearer(READER)).await;
    assert_eq!(listed.body["jobs"].as_array().map(Vec::len), Some(1), "{}", listed.body);
    let answer = call(server.addr, Method::GET, "/jobs", bearer(STARTER)).await;
    assert_eq!((answer.status, &answer.body["scope"]), (StatusCode::FORBIDDEN, &Value::from("read")));

    let cancelled = call(server.addr, Method::POST, &format!("/jobs/{id}/cancel"), bearer(ADMIN)).await;
    assert_eq!(cancelled.status, StatusCode::OK, "{}", cancelled.body);
    assert_eq!(server.api.get(&id).unwrap().status, Status::Cancelled);
}

#[tokio::test]
async fn a_start_limited_to_a_cannot_start_b() {
    let server = server().await;
    let answer = call(server.addr, Method::GET, "/job_start?job_name=b", bearer(STARTER_A)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.body);
    assert_eq!(answer.body["scope"], "start");
    assert_eq!(answer.body["error"], "token `cron_a` may start only a, not `b`");
    assert!(server.api.starts().is_empty());
    let listed = call(server.addr, Method::GET, "/jobs", bearer(ADMIN)).await;
    assert_eq!(listed.body["jobs"].as_array().map(Vec::len), Some(0), "{}", listed.body);

    let answer = call(server.addr, Method::GET, "/job_start?job_name=a&who=x", bearer(STARTER_A)).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    let answer = call(server.addr, Method::POST, "/job_start?job_name=b", bearer(STARTER)).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "an unlimited start token starts b: {}", answer.body);
    assert_eq!(server.api.starts().len(), 2);
}

#[tokio::test]
async fn a_start_token_reports_progress_and_scheme_case_does_not_matter() {
    let server = server().await;
    let answer = call(server.addr, Method::GET, "/job_start?job_name=a", Some(format!("bearer {STARTER}"))).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.body);
    let id = answer.body["id"].as_str().unwrap().to_owned();
    server.api.set_running(&id, "w1");
    let answer = tokio::time::timeout(DEADLINE, async {
        let stream = TcpStream::connect(server.addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        let request = Request::post(format!("/jobs/{id}/progress"))
            .header("host", "127.0.0.1")
            .header("authorization", format!("Bearer {STARTER}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(br#"{"percent": 40}"#)))
            .unwrap();
        sender.send_request(request).await.unwrap().status()
    })
    .await
    .unwrap();
    assert_eq!(answer, StatusCode::NO_CONTENT);
    assert_eq!(server.api.get(&id).unwrap().progress.map(|p| p.percent), Some(40.0));
    let answer = call(server.addr, Method::POST, &format!("/jobs/{id}/progress"), bearer(READER)).await;
    assert_eq!((answer.status, &answer.body["scope"]), (StatusCode::FORBIDDEN, &Value::from("start")));
}

#[tokio::test]
async fn metrics_need_read() {
    let server = server().await;
    server.api.set_metrics("jobz_up 1\n");
    let answer = call(server.addr, Method::GET, "/metrics", bearer(STARTER_A)).await;
    assert_eq!(answer.status, StatusCode::OK);
    let answer = call(server.addr, Method::GET, "/metrics", bearer(STARTER)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_dashboard_page_is_open_and_auth_tells_it_what_the_token_may_do() {
    let server = server().await;
    // The page and its files hold no data: a browser loads them before it has a token.
    for path in ["/", "/ui/app.js", "/ui/style.css"] {
        let answer = call(server.addr, Method::GET, path, None).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
    }
    assert_401(&call(server.addr, Method::GET, "/auth", None).await, "");
    let viewer = call(server.addr, Method::GET, "/auth", bearer(READER)).await;
    assert_eq!(viewer.status, StatusCode::OK);
    assert_eq!(
        viewer.body,
        serde_json::json!({"tokens": true, "token": "viewer", "read": true, "start": false, "admin": false})
    );
    let limited = call(server.addr, Method::GET, "/auth", bearer(STARTER_A)).await;
    assert_eq!(limited.body["start"], serde_json::json!(["a"]));
    assert_eq!(limited.body["admin"], false);
    let ops = call(server.addr, Method::GET, "/auth", bearer(ADMIN)).await;
    assert_eq!(
        (ops.body["token"].as_str(), ops.body["start"].as_bool(), ops.body["admin"].as_bool()),
        (Some("ops"), Some(true), Some(true))
    );
    assert!(!ops.body.to_string().contains(ADMIN), "the token is echoed: {}", ops.body);
}
