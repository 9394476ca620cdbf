//! The HTTP front door over real sockets on 127.0.0.1, against the in-memory
//! `MemoryApi`: every endpoint's codes and JSON fields, the limits against
//! slow and greedy clients, keep-alive, and the shutdown order.
//!
//! Every wait is bounded: requests go through `send`, which has a deadline,
//! and conditions are polled under `eventually`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use broker::handle::{ServedJob, WorkerView};
use broker::http::memory::{MemoryApi, Refusal};
use broker::http::{serve, HttpError, HttpMetrics, HttpOptions};
use bytes::Bytes;
use chrono::Utc;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use jobz_core::Status;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest any single step of a test may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    api: MemoryApi,
    metrics: Arc<HttpMetrics>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), HttpError>>,
    _logs: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        Server::with(HttpOptions::default()).await
    }

    async fn with(options: HttpOptions) -> Server {
        let logs = tempfile::tempdir().unwrap();
        let api = MemoryApi::new(logs.path());
        api.declare("hello", &["who", "n", "flag"]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let metrics = options.metrics.clone();
        let task = tokio::spawn(serve(listener, api.clone(), options, shutdown.clone()));
        Server { addr, api, metrics, shutdown, task, _logs: logs }
    }

    async fn get(&self, path: &str) -> Answer {
        send(self.addr, Method::GET, path, &[], Bytes::new()).await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        let headers = [("content-type", "application/json")];
        send(self.addr, Method::POST, path, &headers, Bytes::from(body.to_string())).await
    }

    /// Starts a `hello` job and returns its id.
    async fn start_job(&self) -> String {
        let answer = self.get("/job_start?job_name=hello").await;
        assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
        answer.json()["id"].as_str().unwrap().to_owned()
    }

    /// Stops the server and checks that `serve` returns Ok within the deadline.
    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(DEADLINE, self.task).await.expect("serve returns after shutdown");
        result.unwrap().unwrap();
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("no {name} header"))
    }

    /// A JSON error answer with `status`; returns the body.
    fn error(&self, status: StatusCode) -> Value {
        assert_eq!(self.status, status, "{}", self.text());
        assert!(self.header("content-type").starts_with("application/json"));
        let body = self.json();
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()), "{body}");
        body
    }
}

/// One request on a fresh connection, bounded by [`DEADLINE`].
async fn send(addr: SocketAddr, method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Answer {
    tokio::time::timeout(DEADLINE, async {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        let request = build(method, path, headers, body);
        let response = sender.send_request(request).await.unwrap();
        read(response).await
    })
    .await
    .expect("the request is answered in time")
}

fn build(method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Request<Full<Bytes>> {
    let mut request = Request::builder().method(method).uri(path).header("host", "127.0.0.1");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Full::new(body)).unwrap()
}

async fn read(response: hyper::Response<hyper::body::Incoming>) -> Answer {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer { status: parts.status, headers: parts.headers, body }
}

/// Polls `condition` until it holds or [`DEADLINE`] passes.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !condition() {
        assert!(tokio::time::Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads from `stream` until the server closes it; the bytes received.
async fn read_until_closed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut received = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut received))
        .await
        .expect("the server closes the connection")?;
    Ok(received)
}

fn is_utc_time(value: &Value) -> bool {
    let Some(text) = value.as_str() else { return false };
    text.ends_with('Z') && chrono::DateTime::parse_from_rfc3339(text).is_ok()
}

const SPEC_JOB_FIELDS: [&str; 16] = [
    "id",
    "job_name",
    "params",
    "status",
    "attempts",
    "run_id",
    "parent_id",
    "worker",
    "exit_code",
    "created_at",
    "queued_at",
    "started_at",
    "finished_at",
    "cancelled_at",
    "output",
    "progress",
];

// ---- job_start ----

#[tokio::test]
async fn get_job_start_answers_202_with_id_name_status_and_run() {
    let server = Server::start().await;
    let answer = server.get("/job_start?job_name=hello&who=mesh&priority=5").await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
    let body = answer.json();
    for key in ["id", "job_name", "status", "run_id"] {
        assert!(body.get(key).is_some(), "202 lacks {key}: {body}");
    }
    assert_eq!(body["status"], "queued");
    assert_eq!(body["job_name"], "hello");
    assert_eq!(body["run_id"], body["id"]);
    let start = &server.api.starts()[0];
    assert_eq!(start.params.len(), 1, "job_name and priority are options, not params: {:?}", start.params);
    assert_eq!(start.params["who"], "mesh");
    assert_eq!(start.priority, Some(5));
    assert_eq!(start.idempotency_key, None);
    server.stop().await;
}

#[tokio::test]
async fn post_job_start_takes_a_json_body_and_stringifies_numbers_and_booleans() {
    let server = Server::start().await;
    let answer =
        server.post("/job_start", json!({"job_name": "hello", "params": {"who": "x y", "n": 3, "flag": true}})).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
    let params = &server.api.starts()[0].params;
    assert_eq!((params["who"].as_str(), params["n"].as_str(), params["flag"].as_str()), ("x y", "3", "true"));

    // Query params and body params together.
    let answer = server.post("/job_start?job_name=hello&who=q", json!({"params": {"n": 1.5}})).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
    let params = &server.api.starts()[1].params;
    assert_eq!((params["who"].as_str(), params["n"].as_str()), ("q", "1.5"));

    // An empty POST body is a start from the query string alone (what `curl -X POST` sends).
    let answer = send(server.addr, Method::POST, "/job_start?job_name=hello", &[], Bytes::new()).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
    server.stop().await;
}

#[tokio::test]
async fn post_job_start_takes_a_form_body_as_curl_d_sends_it() {
    let server = Server::start().await;
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let post_form = |path: &'static str, body: &'static str| {
        send(server.addr, Method::POST, path, &form, Bytes::from_static(body.as_bytes()))
    };
    let answer = post_form("/job_start", "job_name=hello&who=x+y%21&n=3&priority=5").await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
    let start = &server.api.starts()[0];
    assert_eq!((start.job_name.as_str(), start.priority), ("hello", Some(5)));
    assert_eq!((start.params["who"].as_str(), start.params["n"].as_str()), ("x y!", "3"));
    assert_eq!(start.params.len(), 2, "job_name and priority are options, not params: {:?}", start.params);

    // The query string and the form together; JSON sent as a form (`curl -d '{…}'`) is still JSON.
    let answer = post_form("/job_start?job_name=hello", "who=q").await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
    assert_eq!(server.api.starts()[1].params["who"], "q");
    let answer = post_form("/job_start", r#"{"job_name": "hello", "params": {"who": "j"}}"#).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
    assert_eq!(server.api.starts()[2].params["who"], "j");

    // A key twice in the form, or in both the query string and the form, names it; nothing is stored.
    for (path, body, param) in [
        ("/job_start?job_name=hello", "who=a&who=b", "who"),
        ("/job_start?job_name=hello&who=a", "who=b", "who"),
        ("/job_start?job_name=hello", "job_name=hello", "job_name"),
        ("/job_start?job_name=hello", "wait=soon", "wait"),
    ] {
        let error = post_form(path, body).await.error(StatusCode::BAD_REQUEST);
        assert_eq!(error["param"], param, "{path} {body}: {error}");
    }
    // Not declared a form and not JSON: the refusal says what the body may be.
    let answer = send(server.addr, Method::POST, "/job_start", &[], Bytes::from_static(b"who=a")).await;
    let error = answer.error(StatusCode::BAD_REQUEST)["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("JSON") && error.contains("form"), "{error}");
    assert_eq!(server.api.starts().len(), 3);
    server.stop().await;
}

#[tokio::test]
async fn bad_start_requests_are_400_naming_the_field_and_store_nothing() {
    let server = Server::start().await;
    let cases: [(&str, Option<Value>, &str); 8] = [
        ("/job_start?job_name=hello&who=a&who=b", None, "who"),
        ("/job_start?who=a", None, "job_name"),
        ("/job_start?job_name=", None, "job_name"),
        ("/job_start?job_name=hello&wait=soon", None, "wait"),
        ("/job_start?job_name=hello&wait=25h", None, "wait"),
        ("/job_start?job_name=hello&priority=high", None, "priority"),
        ("/job_start?job_name=hello", Some(json!({"params": {"who": ["a"]}})), "who"),
        ("/job_start?job_name=hello&who=a", Some(json!({"params": {"who": "b"}})), "who"),
    ];
    for (path, body, param) in cases {
        let answer = match body {
            None => server.get(path).await,
            Some(body) => server.post(path, body).await,
        };
        let error = answer.error(StatusCode::BAD_REQUEST);
        assert_eq!(error["param"], param, "{path}: {error}");
    }
    let answer = server.post("/job_start", json!({"job_name": "hello", "colour": "red"})).await;
    assert!(answer.error(StatusCode::BAD_REQUEST)["error"].as_str().unwrap().contains("colour"));
    let answer = send(server.addr, Method::POST, "/job_start", &[], Bytes::from_static(b"{not json")).await;
    answer.error(StatusCode::BAD_REQUEST);
    for body in [&b"[]"[..], b" [\"hello\", {}, null, 0]", b"\"hello\"", b"42"] {
        let answer = send(server.addr, Method::POST, "/job_start", &[], Bytes::copy_from_slice(body)).await;
        let error = answer.error(StatusCode::BAD_REQUEST)["error"].as_str().unwrap_or_default().to_string();
        assert!(error.contains("it must be a JSON object"), "{}: {error}", String::from_utf8_lossy(body));
    }
    let answer =
        send(server.addr, Method::GET, "/job_start?job_name=hello", &[("idempotency-key", "")], Bytes::new()).await;
    assert_eq!(answer.error(StatusCode::BAD_REQUEST)["param"], "idempotency-key");
    // Nothing got as far as the broker except well-formed requests (none of the above).
    assert!(server.api.starts().is_empty(), "{:?}", server.api.starts());
    server.stop().await;
}

#[tokio::test]
async fn bad_params_from_the_broker_are_400_naming_each_param() {
    let server = Server::start().await;
    let answer = server.get("/job_start?job_name=hello&colour=red&size=9").await;
    let error = answer.error(StatusCode::BAD_REQUEST);
    assert!(error["error"].as_str().unwrap().contains("colour"), "{error}");
    assert!(error["params"]["colour"].is_string(), "{error}");
    assert!(error["params"]["size"].is_string(), "{error}");
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_job_is_404_json() {
    let server = Server::start().await;
    server.get("/job_start?job_name=nope").await.error(StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_answers_200_with_the_first_job() {
    let server = Server::start().await;
    let headers = [("idempotency-key", "cron-2026-11-23")];
    let first = send(server.addr, Method::GET, "/job_start?job_name=hello", &headers, Bytes::new()).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let again = send(server.addr, Method::GET, "/job_start?job_name=hello", &headers, Bytes::new()).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text());
    let body = again.json();
    assert_eq!(body["deduplicated"], true);
    assert_eq!(body["id"], first.json()["id"]);
    for key in SPEC_JOB_FIELDS {
        assert!(body.get(key).is_some(), "the deduplicated answer lacks {key}");
    }
    assert_eq!(server.api.starts()[0].idempotency_key.as_deref(), Some("cron-2026-11-23"));
    server.stop().await;
}

#[tokio::test]
async fn jobz_parent_id_puts_the_new_job_in_the_callers_run() {
    let server = Server::start().await;
    let parent = server.start_job().await;
    let headers = [("jobz-parent-id", parent.as_str())];
    let answer = send(server.addr, Method::GET, "/job_start?job_name=hello", &headers, Bytes::new()).await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{}", answer.text());
    assert_eq!(answer.json()["run_id"], parent.as_str());
    let child = server.get(&format!("/jobs/{}", answer.json()["id"].as_str().unwrap())).await.json();
    assert_eq!(child["parent_id"], parent.as_str());
    server.stop().await;
}

#[tokio::test]
async fn wait_answers_200_when_the_job_succeeds_422_when_it_fails_and_504_when_still_open() {
    let server = Server::start().await;
    server.api.finish_after_start(Some((Status::Succeeded, Duration::from_millis(50))));
    let answer = server.get("/job_start?job_name=hello&wait=5s").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["status"], "succeeded");
    assert_eq!(body["output"], "succeeded\n");
    assert_eq!(body["attempt_list"][0]["status"], "succeeded");

    for status in [Status::Failed, Status::TimedOut] {
        server.api.finish_after_start(Some((status, Duration::from_millis(50))));
        let answer = server.post("/job_start?wait=5s", json!({"job_name": "hello"})).await;
        assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", answer.text());
        assert_eq!(answer.json()["status"], status.as_str());
    }

    server.api.finish_after_start(None);
    let answer = server.get("/job_start?job_name=hello&wait=100ms").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["status"], "queued");
    // The job was stored all the same.
    assert_eq!(server.get(&format!("/jobs/{}", body["id"].as_str().unwrap())).await.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn a_cancelled_job_waited_for_is_422() {
    let server = Server::start().await;
    server.api.finish_after_start(Some((Status::Cancelled, Duration::from_millis(10))));
    let answer = server.get("/job_start?job_name=hello&wait=5s").await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", answer.text());
    server.stop().await;
}

// ---- one job ----

#[tokio::test]
async fn a_job_shows_every_spec_field_with_utc_times_and_its_attempts() {
    let server = Server::start().await;
    let id = server.start_job().await;
    server.api.set_running(&id, "w1");
    server.api.finish(&id, Status::Succeeded, Some(0), "hello mesh\n");
    for path in [format!("/jobs/{id}"), format!("/job_status?id={id}")] {
        let answer = server.get(&path).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}: {}", answer.text());
        let job = answer.json();
        for key in SPEC_JOB_FIELDS.iter().chain(&["signal", "priority", "error", "origin", "attempt_list"]) {
            assert!(job.get(*key).is_some(), "{path} lacks {key}: {job}");
        }
        for key in ["created_at", "queued_at", "started_at", "finished_at"] {
            assert!(is_utc_time(&job[key]), "{key} is {}", job[key]);
        }
        assert_eq!(job["cancelled_at"], Value::Null);
        assert_eq!((job["status"].as_str(), job["exit_code"].as_i64()), (Some("succeeded"), Some(0)));
        assert_eq!(job["worker"], "w1");
        assert_eq!(job["output"], "hello mesh\n");
        assert_eq!(job["origin"]["kind"], "start");
        let attempt = &job["attempt_list"][0];
        assert_eq!((attempt["attempt"].as_u64(), attempt["worker"].as_str()), (Some(1), Some("w1")));
        assert!(is_utc_time(&attempt["started_at"]) && attempt["stale"] == false, "{attempt}");
    }
    server.stop().await;
}

#[tokio::test]
async fn unknown_ids_are_404_and_a_missing_id_is_400() {
    let server = Server::start().await;
    for path in ["/jobs/no-such-id", "/job_status?id=no-such-id", "/jobs/no-such-id/log"] {
        server.get(path).await.error(StatusCode::NOT_FOUND);
    }
    for path in ["/jobs/no-such-id/cancel", "/jobs/no-such-id/retry", "/runs/no-such-run/cancel"] {
        server.post(path, json!({})).await.error(StatusCode::NOT_FOUND);
    }
    assert_eq!(server.get("/job_status").await.error(StatusCode::BAD_REQUEST)["param"], "id");
    server.stop().await;
}

#[tokio::test]
async fn the_log_is_text_from_an_offset_with_the_next_offset_and_the_status() {
    let server = Server::start().await;
    let id = server.start_job().await;

    // No output yet: an empty log, not an error.
    let answer = server.get(&format!("/jobs/{id}/log")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!((answer.text().as_str(), answer.header("jobz-next-offset")), ("", "0"));
    assert_eq!(answer.header("jobz-job-status"), "queued");

    std::fs::write(server.api.log_file(&id), "hello\nworld\n").unwrap();
    let answer = server.get(&format!("/jobs/{id}/log")).await;
    assert_eq!(answer.text(), "hello\nworld\n");
    assert!(answer.header("content-type").starts_with("text/plain"));
    assert_eq!(answer.header("x-content-type-options"), "nosniff");
    assert_eq!((answer.header("jobz-log-size"), answer.header("jobz-next-offset")), ("12", "12"));

    let answer = server.get(&format!("/jobs/{id}/log?offset=6")).await;
    assert_eq!((answer.text().as_str(), answer.header("jobz-next-offset")), ("world\n", "12"));
    let answer = server.get(&format!("/jobs/{id}/log?offset=99")).await;
    assert_eq!((answer.status, answer.text().as_str(), answer.header("jobz-next-offset")), (StatusCode::OK, "", "12"));

    assert_eq!(
        server.get(&format!("/jobs/{id}/log?offset=-1")).await.error(StatusCode::BAD_REQUEST)["param"],
        "offset"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_large_log_streams_whole() {
    let server = Server::start().await;
    let id = server.start_job().await;
    let log: Vec<u8> = (0..1_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    std::fs::write(server.api.log_file(&id), &log).unwrap();
    let answer = server.get(&format!("/jobs/{id}/log")).await;
    assert_eq!(answer.body.len(), log.len());
    assert!(answer.body == log);
    assert_eq!(answer.header("content-length"), "1000000");
    server.stop().await;
}

#[tokio::test]
async fn cancel_and_retry_answer_the_job_or_409() {
    let server = Server::start().await;
    let id = server.start_job().await;
    let answer = server.post(&format!("/jobs/{id}/cancel"), json!({})).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["status"], "cancelled");
    assert!(is_utc_time(&answer.json()["cancelled_at"]));
    server.post(&format!("/jobs/{id}/cancel"), json!({})).await.error(StatusCode::CONFLICT);

    let answer = server.post(&format!("/jobs/{id}/retry"), json!({})).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    assert_eq!(answer.json()["status"], "queued");
    server.post(&format!("/jobs/{id}/retry"), json!({})).await.error(StatusCode::CONFLICT);
    server.stop().await;
}

#[tokio::test]
async fn progress_is_204_and_shows_in_the_job() {
    let server = Server::start().await;
    let id = server.start_job().await;
    server.api.set_running(&id, "w1");
    let answer = server.post(&format!("/jobs/{id}/progress"), json!({"percent": 42, "message": "copying"})).await;
    assert_eq!(answer.status, StatusCode::NO_CONTENT, "{}", answer.text());
    let job = server.get(&format!("/jobs/{id}")).await.json();
    assert_eq!(job["progress"], json!({"percent": 42.0, "message": "copying"}));

    let bad = server.post(&format!("/jobs/{id}/progress"), json!({"percent": 150})).await;
    assert_eq!(bad.error(StatusCode::BAD_REQUEST)["param"], "percent");
    let bad = server.post(&format!("/jobs/{id}/progress"), json!({"message": "no percent"})).await;
    bad.error(StatusCode::BAD_REQUEST);
    let bad = server.post(&format!("/jobs/{id}/progress"), json!([50, "by position"])).await;
    let error = bad.error(StatusCode::BAD_REQUEST)["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains("it must be a JSON object"), "{error}");
    let job = server.get(&format!("/jobs/{id}")).await.json();
    assert_eq!(job["progress"], json!({"percent": 42.0, "message": "copying"}), "unchanged");
    let long = "x".repeat(2000);
    let bad = server.post(&format!("/jobs/{id}/progress"), json!({"percent": 1, "message": long})).await;
    assert_eq!(bad.error(StatusCode::BAD_REQUEST)["param"], "message");
    server.post("/jobs/nope/progress", json!({"percent": 1})).await.error(StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn cancelling_a_run_answers_the_cancelled_jobs() {
    let server = Server::start().await;
    let parent = server.start_job().await;
    let headers = [("jobz-parent-id", parent.as_str())];
    send(server.addr, Method::GET, "/job_start?job_name=hello", &headers, Bytes::new()).await;
    let answer = server.post(&format!("/runs/{parent}/cancel"), json!({})).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text());
    let cancelled = answer.json()["cancelled"].as_array().unwrap().clone();
    assert_eq!(cancelled.len(), 2);
    assert!(cancelled.iter().all(|job| job["status"] == "cancelled" && job["run_id"] == parent.as_str()));
    server.stop().await;
}

// ---- lists and views ----

#[tokio::test]
async fn jobs_are_listed_newest_first_with_filters_and_a_bounded_limit() {
    let server = Server::start().await;
    let first = server.start_job().await;
    let second = server.start_job().await;
    server.api.finish(&first, Status::Failed, Some(1), "");
    let all = server.get("/jobs").await.json();
    let ids: Vec<&str> = all["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [second.as_str(), first.as_str()]);
    for key in SPEC_JOB_FIELDS {
        assert!(all["jobs"][0].get(key).is_some(), "list entries lack {key}");
    }
    assert!(all["jobs"][0].get("attempt_list").is_none(), "lists do not fetch attempts");

    let failed = server.get("/jobs?status=failed&job_name=hello").await.json();
    assert_eq!(failed["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(failed["jobs"][0]["id"], first.as_str());
    let run = server.get(&format!("/jobs?run_id={second}&status=&limit=")).await.json();
    assert_eq!(run["jobs"].as_array().unwrap().len(), 1, "empty values count as not given");
    assert_eq!(server.get("/jobs?limit=1").await.json()["jobs"].as_array().unwrap().len(), 1);

    for (path, param) in [
        ("/jobs?status=done", "status"),
        ("/jobs?limit=0", "limit"),
        ("/jobs?limit=1001", "limit"),
        ("/jobs?limit=ten", "limit"),
        ("/jobs?state=failed", "state"),
        ("/jobs?status=failed&status=queued", "status"),
    ] {
        assert_eq!(server.get(path).await.error(StatusCode::BAD_REQUEST)["param"], param, "{path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn workers_gates_schedules_metrics_and_health() {
    let server = Server::start().await;
    let now = Utc::now();
    server.api.set_workers(vec![WorkerView {
        name: "w1".into(),
        host: "box".into(),
        jobs: vec![ServedJob { name: "hello".into(), matches: false }],
        running: 1,
        concurrency: 4,
        last_heartbeat: now,
        connected_at: now,
    }]);
    let workers = server.get("/workers").await.json();
    let worker = &workers["workers"][0];
    for key in ["name", "host", "jobs", "running", "concurrency", "last_heartbeat", "connected_at"] {
        assert!(worker.get(key).is_some(), "a worker lacks {key}: {worker}");
    }
    assert_eq!(worker["jobs"][0], json!({"name": "hello", "matches": false}));
    assert!(is_utc_time(&worker["last_heartbeat"]));

    server.api.set_gates(json!([{"gate": "all_done", "open": []}]));
    assert_eq!(server.get("/gates").await.json(), json!({"gates": [{"gate": "all_done", "open": []}]}));
    server.api.set_schedules(json!({"schedules": [{"job": "nightly"}]}));
    assert_eq!(server.get("/schedules").await.json(), json!({"schedules": [{"job": "nightly"}]}));

    server.get("/healthz").await;
    let metrics = server.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.header("content-type").starts_with("text/plain; version=0.0.4"));
    let text = metrics.text();
    assert!(text.starts_with("# TYPE jobz_jobs gauge\njobz_jobs 0\n"), "{text}");
    assert!(text.contains("jobz_http_requests_total{code=\"200\"}"), "{text}");

    let health = server.get("/healthz").await;
    assert_eq!((health.status, health.json()), (StatusCode::OK, json!({"ok": true})));
    server.api.set_healthy(false);
    server.get("/healthz").await.error(StatusCode::SERVICE_UNAVAILABLE);
    server.stop().await;
}

#[tokio::test]
async fn requests_are_counted_by_code() {
    let server = Server::start().await;
    server.start_job().await;
    server.get("/jobs/nope").await;
    server.get("/jobs/nope").await;
    assert_eq!((server.metrics.count(202), server.metrics.count(404)), (1, 2));
    server.stop().await;
}

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary_with_a_strict_content_policy() {
    let server = Server::start().await;
    let answer = server.get("/").await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.header("content-type").starts_with("text/html"));
    assert!(answer.text().contains("ui/app.js") && answer.text().contains("ui/style.css"), "{}", answer.text());
    let policy = answer.header("content-security-policy");
    assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"), "{policy}");
    for (path, kind, needle) in
        [("/ui/app.js", "text/javascript", "textContent"), ("/ui/style.css", "text/css", "--ok")]
    {
        let asset = server.get(path).await;
        assert_eq!(asset.status, StatusCode::OK, "{path}");
        assert!(asset.header("content-type").starts_with(kind), "{path}: {:?}", asset.headers);
        assert!(asset.text().contains(needle), "{path}");
    }
    server.get("/ui/nope.js").await.error(StatusCode::NOT_FOUND);
    // The in-memory broker has no loop: no queues to show, and still a JSON answer.
    let queues = server.get("/queues").await;
    assert_eq!(queues.status, StatusCode::OK);
    assert_eq!(queues.json()["queues"], serde_json::json!([]));
    server.stop().await;
}

#[tokio::test]
async fn unknown_routes_are_404_json_and_wrong_methods_405_json_with_allow() {
    let server = Server::start().await;
    server.get("/nope").await.error(StatusCode::NOT_FOUND);
    server.get("/jobs/a/b/c").await.error(StatusCode::NOT_FOUND);
    let answer = send(server.addr, Method::DELETE, "/jobs/x", &[], Bytes::new()).await;
    answer.error(StatusCode::METHOD_NOT_ALLOWED);
    assert!(answer.header("allow").contains("GET"), "{:?}", answer.headers);
    let answer = server.get("/jobs/x/cancel").await;
    answer.error(StatusCode::METHOD_NOT_ALLOWED);
    assert!(answer.header("allow").contains("POST"));
    server.stop().await;
}

#[tokio::test]
async fn busy_is_429_and_a_store_down_is_503_with_retry_after() {
    let server = Server::start().await;
    let id = server.start_job().await;
    server.api.refuse(Some(Refusal::Busy));
    let answer = server.get("/job_start?job_name=hello").await;
    answer.error(StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.header("retry-after"), "1");
    server.api.refuse(Some(Refusal::Unavailable));
    server.get(&format!("/jobs/{id}")).await.error(StatusCode::SERVICE_UNAVAILABLE);
    server.get("/job_start?job_name=hello").await.error(StatusCode::SERVICE_UNAVAILABLE);
    server.stop().await;
}

#[tokio::test]
async fn a_broker_that_does_not_answer_is_503_after_the_request_timeout() {
    let options = HttpOptions { request_timeout: Duration::from_millis(100), ..HttpOptions::default() };
    let server = Server::with(options).await;
    server.api.delay(Some(Duration::from_secs(5)));
    let answer = server.get("/jobs/whatever").await;
    assert!(answer.error(StatusCode::SERVICE_UNAVAILABLE)["error"].as_str().unwrap().contains("100ms"));
    server.api.delay(None);
    server.stop().await;
}

// ---- limits ----

#[tokio::test]
async fn an_oversized_body_is_413_json() {
    let server = Server::start().await;
    let big = json!({"job_name": "hello", "params": {"who": "x".repeat(100 * 1024)}});
    let answer = server.post("/job_start", big).await;
    answer.error(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(answer.header("connection"), "close");

    // Chunked, without a Content-Length to refuse up front.
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let body = Chunks { left: 10, chunk: Bytes::from(vec![b' '; 10 * 1024]) };
    let request = Request::post("/jobs/x/progress").header("host", "h").body(body).unwrap();
    let response = tokio::time::timeout(DEADLINE, sender.send_request(request)).await.unwrap().unwrap();
    read(response).await.error(StatusCode::PAYLOAD_TOO_LARGE);
    assert!(server.api.starts().is_empty());
    server.stop().await;
}

/// A request body of `left` copies of `chunk` and no declared length, so it is sent chunked.
struct Chunks {
    left: usize,
    chunk: Bytes,
}

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.left == 0 {
            return std::task::Poll::Ready(None);
        }
        this.left -= 1;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(this.chunk.clone()))))
    }
}

/// The status and the JSON body of a whole answer read off a socket.
fn json_answer(received: &[u8]) -> (u16, serde_json::Value) {
    let text = String::from_utf8_lossy(received);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no whole head: {text}"));
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("{head}"));
    assert!(head.contains("content-type: application/json"), "{head}");
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}")))
}

#[tokio::test]
async fn a_head_over_the_limit_is_a_json_413_and_others_are_still_served() {
    let options = HttpOptions { header_bytes_max: 16 * 1024, ..HttpOptions::default() };
    let server = Server::with(options).await;
    // 20 KiB against 16 KiB, and far over (hyper's buffer fills first): both
    // answered whole, as JSON, while the client is still writing the far one.
    for size in [20 * 1024, 4 * 1024 * 1024] {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        let request = format!("GET /healthz HTTP/1.1\r\nhost: h\r\nx-big: {}\r\n\r\n", "a".repeat(size));
        stream.write_all(request.as_bytes()).await.unwrap();
        let received = read_until_closed(&mut stream).await.unwrap();
        let (status, body) = json_answer(&received);
        assert_eq!(status, 413, "{body}");
        assert!(body["error"].as_str().unwrap().contains("16384 bytes"), "{body}");
    }
    // A query string over the limit too.
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!("GET /job_start?job_name=hello&who={} HTTP/1.1\r\nhost: h\r\n\r\n", "a".repeat(100_000));
    stream.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(json_answer(&read_until_closed(&mut stream).await.unwrap()).0, 413);
    assert_eq!(server.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(server.metrics.count(413), 3);
    server.stop().await;
}

#[tokio::test]
async fn too_many_headers_are_a_json_413() {
    let server = Server::start().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let headers: String = (0..100).map(|i| format!("x-h{i}: v\r\n")).collect();
    stream.write_all(format!("GET /healthz HTTP/1.1\r\nhost: h\r\n{headers}\r\n").as_bytes()).await.unwrap();
    let (status, body) = json_answer(&read_until_closed(&mut stream).await.unwrap());
    assert_eq!(status, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("64 header fields"), "{body}");
    server.stop().await;
}

#[tokio::test]
async fn a_request_that_is_not_http_is_a_json_400_and_changes_nothing() {
    let server = Server::start().await;
    for garbage in [&b"GARBAGE\r\n\r\n"[..], b"GET /healthz HTTP/1.1\r\nno colon here\r\n\r\n", b"\x00\x01\x02\r\n\r\n"]
    {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(garbage).await.unwrap();
        let (status, body) = json_answer(&read_until_closed(&mut stream).await.unwrap());
        assert_eq!(status, 400, "{body}");
        assert!(body["error"].as_str().unwrap().contains("not valid HTTP"), "{body}");
    }
    assert_eq!(server.get("/healthz").await.status, StatusCode::OK);
    server.stop().await;
}

#[tokio::test]
async fn a_client_that_writes_a_whole_oversized_body_before_reading_gets_the_413() {
    let server = Server::start().await;
    // Declared far over the limit, so refused before any of it is read; the
    // client writes all 8 MiB anyway and only then reads.
    let body = vec![b'a'; 8 * 1024 * 1024];
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /job_start HTTP/1.1\r\nhost: h\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.expect("the front door reads what it refused rather than resetting");
    let (status, answer) = json_answer(&read_until_closed(&mut stream).await.unwrap());
    assert_eq!(status, 413, "{answer}");
    server.stop().await;
}

#[tokio::test]
async fn a_slow_client_is_disconnected_after_the_header_timeout_while_others_are_served() {
    let options = HttpOptions { header_read_timeout: Duration::from_millis(300), ..HttpOptions::default() };
    let server = Server::with(options).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /jobs HTT").await.unwrap();
    let started = tokio::time::Instant::now();
    // Others are served meanwhile.
    for _ in 0..3 {
        assert_eq!(server.get("/healthz").await.status, StatusCode::OK);
    }
    // hyper closes without an answer (no 408).
    let received = read_until_closed(&mut slow).await.unwrap_or_default();
    assert!(received.is_empty(), "{}", String::from_utf8_lossy(&received));
    assert!(started.elapsed() >= Duration::from_millis(250), "closed before the timeout: {:?}", started.elapsed());
    server.stop().await;
}

#[tokio::test]
async fn several_requests_share_one_keep_alive_connection() {
    let server = Server::start().await;
    let id = server.start_job().await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    let connection = tokio::spawn(connection);
    for path in ["/healthz".to_owned(), format!("/jobs/{id}"), "/jobs".to_owned(), "/nope".to_owned()] {
        let request = build(Method::GET, &path, &[], Bytes::new());
        let response = tokio::time::timeout(DEADLINE, sender.send_request(request)).await.unwrap();
        let answer = read(response.expect("the connection is still open")).await;
        assert!(answer.status == StatusCode::OK || answer.status == StatusCode::NOT_FOUND, "{path}");
    }
    assert!(!connection.is_finished());
    drop(sender);
    server.stop().await;
}

#[tokio::test]
async fn over_the_connection_limit_a_client_waits_until_a_connection_closes() {
    let options = HttpOptions { connections_max: 1, ..HttpOptions::default() };
    let server = Server::with(options).await;
    let first = TcpStream::connect(server.addr).await.unwrap();
    let (mut first_sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(first)).await.unwrap();
    let first_connection = tokio::spawn(connection);
    let answer =
        read(first_sender.send_request(build(Method::GET, "/healthz", &[], Bytes::new())).await.unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK);

    let second = tokio::spawn(send(server.addr, Method::GET, "/healthz", &[], Bytes::new()));
    // Bounded check that it is held back while the first connection is open.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished(), "a second connection was served over the limit of one");
    drop(first_sender);
    first_connection.await.unwrap().unwrap();
    let answer = tokio::time::timeout(DEADLINE, second).await.unwrap().unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    server.stop().await;
}

// ---- shutdown ----

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_then_stops_accepting_and_returns() {
    let server = Server::start().await;
    let id = server.start_job().await;
    let calls = server.api.calls();
    server.api.delay(Some(Duration::from_millis(300)));
    let (addr, path) = (server.addr, format!("/jobs/{id}"));
    let in_flight = tokio::spawn(async move { send(addr, Method::GET, &path, &[], Bytes::new()).await });
    let api = server.api.clone();
    eventually("the request to reach the broker", || api.calls() > calls).await;
    // An idle keep-alive connection must not hold shutdown up.
    let idle = TcpStream::connect(server.addr).await.unwrap();
    server.shutdown.cancel();
    let answer = tokio::time::timeout(DEADLINE, in_flight).await.unwrap().unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["id"], id.as_str());
    tokio::time::timeout(DEADLINE, server.task).await.expect("serve returns").unwrap().unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting after shutdown");
    drop(idle);
}

#[tokio::test]
async fn a_request_past_the_grace_is_dropped_and_serve_returns() {
    let options = HttpOptions { shutdown_grace: Duration::from_millis(200), ..HttpOptions::default() };
    let server = Server::with(options).await;
    server.api.delay(Some(Duration::from_secs(60)));
    let addr = server.addr;
    let stuck = tokio::spawn(async move {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        sender.send_request(build(Method::GET, "/jobs/x", &[], Bytes::new())).await
    });
    let api = server.api.clone();
    eventually("the request to reach the broker", || api.calls() > 0).await;
    let started = tokio::time::Instant::now();
    server.shutdown.cancel();
    tokio::time::timeout(DEADLINE, server.task).await.expect("serve returns").unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    let result = tokio::time::timeout(DEADLINE, stuck).await.unwrap().unwrap();
    assert!(result.is_err(), "the stuck request was answered instead of dropped");
}

#[tokio::test]
async fn a_held_wait_answers_504_at_once_on_shutdown() {
    let server = Server::start().await;
    let addr = server.addr;
    let waiting = tokio::spawn(send(addr, Method::GET, "/job_start?job_name=hello&wait=1h", &[], Bytes::new()));
    let api = server.api.clone();
    eventually("the job to be stored", || !api.starts().is_empty()).await;
    // The wait call itself must have begun too: start, then wait.
    eventually("the wait to begin", || api.calls() >= 2).await;
    let started = tokio::time::Instant::now();
    server.shutdown.cancel();
    let answer = tokio::time::timeout(DEADLINE, waiting).await.unwrap().unwrap();
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT, "{}", answer.text());
    assert_eq!(answer.json()["status"], "queued");
    assert!(started.elapsed() < Duration::from_secs(2));
    tokio::time::timeout(DEADLINE, server.task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn bad_options_are_refused_before_serving() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = MemoryApi::new(std::env::temp_dir());
    let options = HttpOptions { connections_max: 0, ..HttpOptions::default() };
    let result = serve(listener, api, options, CancellationToken::new()).await;
    assert!(matches!(result, Err(HttpError::Options { option: "connections_max", .. })), "{result:?}");
}
