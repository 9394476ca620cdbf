//! The endpoints of SPEC "HTTP API": request parsing, the calls into [`Api`],
//! and the answers. No business logic lives here; each handler checks its
//! input, makes one or two calls and converts the records to [`super::wire`].

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::SeekFrom;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use jobz_core::Status;
use serde::Deserialize;
use tokio::io::AsyncSeekExt;
use tokio_util::sync::CancellationToken;

use super::api::Api;
use super::auth::{self, Grant, Need};
use super::limits::{
    BODY_DRAIN_BYTES_MAX, ID_HEADER_BYTES_MAX, LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX, PROGRESS_MESSAGE_BYTES_MAX,
};
use super::log_body::LogBody;
use super::metrics::HttpMetrics;
use super::reject::Reject;
use super::wire::{
    CancelledList, HoldView, JobList, JobView, ProgressReport, QueueList, StartedView, WorkerEntry, WorkerList,
};
use super::HttpOptions;
use crate::handle::{StartRequest, Waited};
use crate::model::{JobFilter, JobRecord};

/// `Idempotency-Key`: a repeated start with the same key returns the first job (SPEC).
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// `Jobz-Parent-Id`: set by `jobz start` inside a job, so the new job joins the caller's run.
pub const PARENT_ID: HeaderName = HeaderName::from_static("jobz-parent-id");
/// On `GET /jobs/{id}/log`: the log file's size when the request came in.
pub const LOG_SIZE: HeaderName = HeaderName::from_static("jobz-log-size");
/// On `GET /jobs/{id}/log`: the `offset=` that continues where this answer ends.
pub const NEXT_OFFSET: HeaderName = HeaderName::from_static("jobz-next-offset");
/// On `GET /jobs/{id}/log`: the job's status, read *before* the log. When it is
/// final, the answer holds the whole rest of the log.
pub const JOB_STATUS: HeaderName = HeaderName::from_static("jobz-job-status");

/// The client's address, set on every request by the connection that carries it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub std::net::SocketAddr);

/// What every handler shares.
pub(crate) struct Shared<A> {
    pub api: A,
    pub options: HttpOptions,
    /// Cancelled when the server begins to shut down: held `wait=` answers return early.
    pub shutdown: CancellationToken,
}

type AppState<A> = State<Arc<Shared<A>>>;

impl<A: Api> Shared<A> {
    /// One call into the broker, bounded by `request_timeout`.
    async fn call<T>(&self, call: impl Future<Output = Result<T, crate::handle::ApiError>>) -> Result<T, Reject> {
        self.bounded(call).await?.map_err(Reject::from)
    }

    /// A call that cannot fail, bounded by `request_timeout`.
    async fn bounded<T>(&self, call: impl Future<Output = T>) -> Result<T, Reject> {
        tokio::time::timeout(self.options.request_timeout, call).await.map_err(|_| {
            Reject::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the broker did not answer within {}", human(self.options.request_timeout)),
            )
        })
    }

    /// A single job's view, with its attempts.
    async fn full_view(&self, job: &JobRecord) -> Result<JobView, Reject> {
        let attempts = self.call(self.api.attempts(&job.id)).await?;
        Ok(self.held(JobView::with_attempts(job, &attempts)))
    }

    /// A job's view in a list.
    fn view(&self, job: &JobRecord) -> JobView {
        self.held(JobView::new(job))
    }

    /// Says which limit holds a queued job back (not one waiting for its retry time).
    fn held(&self, mut view: JobView) -> JobView {
        let waiting_for_retry = view.not_before.is_some_and(|t| t > chrono::Utc::now());
        if view.status == jobz_core::Status::Queued && !waiting_for_retry {
            view.held_by = self.api.hold(&view.job_name).as_ref().map(HoldView::new);
        }
        view
    }
}

/// The router over every endpoint, with JSON answers for unknown routes and methods.
/// Each route but `/healthz` says which token scope it needs ([`Need`]); with no
/// tokens configured the guard lets everything through.
pub(crate) fn router<A: Api>(shared: Arc<Shared<A>>) -> Router {
    let metrics = shared.options.metrics.clone();
    let tokens = shared.options.tokens.clone();
    let guard = |need: Need| middleware::from_fn_with_state((tokens.clone(), need), auth::authorize);
    Router::new()
        // Open: the page and its files hold no data; the page asks the API (below) with the caller's token.
        .route("/", get(super::dashboard::index))
        .route("/ui/app.js", get(super::dashboard::app_js))
        .route("/ui/style.css", get(super::dashboard::style_css))
        .route("/queues", get(queues::<A>).route_layer(guard(Need::Read)))
        .route("/auth", get(whoami).route_layer(guard(Need::Read)))
        .route("/job_start", get(start::<A>).post(start::<A>).route_layer(guard(Need::Start)))
        .route("/job_status", get(job_status::<A>).route_layer(guard(Need::Read)))
        .route("/jobs", get(list::<A>).route_layer(guard(Need::Read)))
        .route("/jobs/{id}", get(job::<A>).route_layer(guard(Need::Read)))
        .route("/jobs/{id}/log", get(log::<A>).route_layer(guard(Need::Read)))
        .route("/jobs/{id}/cancel", post(cancel::<A>).route_layer(guard(Need::Admin)))
        .route("/jobs/{id}/retry", post(retry::<A>).route_layer(guard(Need::Admin)))
        .route("/jobs/{id}/progress", post(progress::<A>).route_layer(guard(Need::Progress)))
        .route("/runs/{run_id}/cancel", post(cancel_run::<A>).route_layer(guard(Need::Admin)))
        .route("/workers", get(workers::<A>).route_layer(guard(Need::Read)))
        .route("/gates", get(gates::<A>).route_layer(guard(Need::Read)))
        .route("/schedules", get(schedules::<A>).route_layer(guard(Need::Read)))
        .route("/metrics", get(metrics_text::<A>).route_layer(guard(Need::Read)))
        // Open: load balancers and monitors probe it without credentials; it tells only up or down.
        .route("/healthz", get(healthz::<A>))
        .fallback(unknown_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(metrics, count))
        .with_state(shared)
}

/// Counts every answer by code and logs it.
async fn count(State(metrics): State<Arc<HttpMetrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    metrics.record(response.status());
    let status = response.status().as_u16();
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    tracing::debug!(%method, path, status, elapsed_ms, "http");
    response
}

async fn unknown_route(method: Method, uri: Uri) -> Reject {
    Reject::not_found(format!("no endpoint {method} {}; GET / lists them", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Reject {
    // axum adds the `Allow` header listing the methods the path takes.
    Reject::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} does not take {method}", uri.path()))
}

/// The body of `POST /job_start`: `{"job_name": …, "params": {…}}`, plus the
/// start options the query string also takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    job_name: Option<String>,
    #[serde(default)]
    params: serde_json::Map<String, serde_json::Value>,
    wait: Option<String>,
    priority: Option<i32>,
}

/// A request body read as `T`, which must be a JSON object (serde would
/// also take a struct from an array, and then speak of its fields by
/// position); a 400 naming `what` and showing `example` otherwise.
fn json_object<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str, example: &str) -> Result<T, Reject> {
    let refuse = |why: String| {
        Reject::new(StatusCode::BAD_REQUEST, format!("the body is not {what}: {why}; send JSON like {example}"))
    };
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(refuse("it must be a JSON object".into()));
    }
    serde_json::from_slice(bytes).map_err(|e| refuse(e.to_string()))
}

/// `GET|POST /job_start?job_name=NAME&k=v…[&wait=D][&priority=N]`.
async fn start<A: Api>(
    State(shared): AppState<A>,
    Extension(grant): Extension<Grant>,
    method: Method,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Result<Response, Reject> {
    let wait_max = shared.options.wait_max;
    let mut fields = StartFields::default();
    for (key, value) in unique_pairs(&uri)? {
        fields.take_pair(key, value, wait_max)?;
    }
    if method == Method::POST {
        let bytes = read_body(body, &headers, &shared.options).await?;
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some() && first != Some(&b'{') && is_form(&headers) {
            // `curl -d job_name=NAME -d k=v`: the same pairs as the query string takes.
            for (key, value) in unique_form_pairs(&bytes)? {
                fields.take_pair(key, value, wait_max)?;
            }
        } else if first.is_some() {
            let body: StartBody = json_object(
                &bytes,
                "a start request",
                r#"{"job_name": "NAME", "params": {"k": "v"}} (or a form: job_name=NAME&k=v)"#,
            )?;
            merge_once("job_name", &mut fields.job_name, body.job_name)?;
            merge_once("priority", &mut fields.priority, body.priority)?;
            let body_wait = body.wait.map(|w| parse_wait(&w, wait_max)).transpose()?;
            merge_once("wait", &mut fields.wait, body_wait)?;
            for (key, value) in body.params {
                let value = param_text(&key, value)?;
                fields.insert_param(key, value)?;
            }
        }
    }
    let StartFields { job_name, wait, priority, params } = fields;
    let job_name = job_name
        .filter(|name| !name.is_empty())
        .ok_or_else(|| Reject::param("job_name", "job_name is required: /job_start?job_name=NAME&k=v"))?;
    grant.may_start(&job_name, &shared.options.tokens)?;
    let request = StartRequest {
        job_name,
        params,
        idempotency_key: id_header(&headers, &IDEMPOTENCY_KEY)?,
        priority,
        parent_id: id_header(&headers, &PARENT_ID)?,
    };
    let started = shared.call(shared.api.start(request)).await?;
    let deduplicated = started.deduplicated;
    let Some(limit) = wait else {
        return Ok(if deduplicated {
            let mut view = shared.full_view(&started.job).await?;
            view.deduplicated = Some(true);
            (StatusCode::OK, Json(view)).into_response()
        } else {
            let job = &started.job;
            let view = StartedView {
                id: job.id.clone(),
                job_name: job.job_name.clone(),
                status: job.status,
                run_id: job.run_id.clone(),
            };
            (StatusCode::ACCEPTED, Json(view)).into_response()
        });
    };
    // The job is stored: from here on, errors must not suggest it was not.
    let job = wait_for(&shared, &started.job.id, limit).await?;
    let code = match job.status {
        Status::Succeeded => StatusCode::OK,
        status if status.is_final() => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::GATEWAY_TIMEOUT,
    };
    let mut view = shared.full_view(&job).await?;
    if deduplicated {
        view.deduplicated = Some(true);
    }
    Ok((code, Json(view)).into_response())
}

/// Holds until job `id` ends, `limit` passes or the server shuts down; then the job as it stands.
async fn wait_for<A: Api>(shared: &Shared<A>, id: &str, limit: Duration) -> Result<JobRecord, Reject> {
    let bound = limit.saturating_add(shared.options.request_timeout);
    tokio::select! {
        waited = tokio::time::timeout(bound, shared.api.wait(id, limit)) => match waited {
            Ok(Ok(Waited::Ended(job) | Waited::StillOpen(job))) => Ok(job),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                let error = format!("the broker did not answer the wait within {}", human(bound));
                Err(Reject::new(StatusCode::SERVICE_UNAVAILABLE, error))
            }
        },
        // Shutting down: answer now (504, still open) rather than be cut off after the grace.
        () = shared.shutdown.cancelled() => shared.call(shared.api.job(id)).await,
    }
}

/// What a start asks for, from its query string and its body.
#[derive(Debug, Default)]
struct StartFields {
    job_name: Option<String>,
    wait: Option<Duration>,
    priority: Option<i32>,
    params: BTreeMap<String, String>,
}

impl StartFields {
    /// One `key=value` of the query string or of a form body: a start option
    /// (`job_name`, `wait`, `priority`) or a param. Read from the body, a key
    /// the query string gave too is a 400.
    fn take_pair(&mut self, key: String, value: String, wait_max: Duration) -> Result<(), Reject> {
        match key.as_str() {
            "job_name" => merge_once("job_name", &mut self.job_name, Some(value)),
            "wait" => merge_once("wait", &mut self.wait, Some(parse_wait(&value, wait_max)?)),
            "priority" => merge_once("priority", &mut self.priority, Some(parse_priority(&value)?)),
            _ => self.insert_param(key, value),
        }
    }

    /// Adds a param. Each part of a start gives a key once (a query string or
    /// form that repeats one is refused, a JSON object's params are a map), so
    /// one given already came from the query string: a 400.
    fn insert_param(&mut self, key: String, value: String) -> Result<(), Reject> {
        if self.params.contains_key(&key) {
            return Err(Reject::param(&key, format!("param {key:?} is given in both the query string and the body")));
        }
        self.params.insert(key, value);
        Ok(())
    }
}

/// Whether the body is declared a form (`Content-Type: application/x-www-form-urlencoded`,
/// what `curl -d` sends).
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
}

/// A form body's pairs, refusing a key given twice, as in the query string.
fn unique_form_pairs(bytes: &[u8]) -> Result<Vec<(String, String)>, Reject> {
    let pairs = form_urlencoded::parse(bytes).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
    given_once(pairs, "in the body")
}

/// Sets a start option once; a second value from the body is a 400.
fn merge_once<T>(name: &str, slot: &mut Option<T>, from_body: Option<T>) -> Result<(), Reject> {
    match (slot.is_some(), from_body) {
        (true, Some(_)) => Err(Reject::param(name, format!("{name} is given in both the query string and the body"))),
        (_, Some(value)) => {
            *slot = Some(value);
            Ok(())
        }
        (_, None) => Ok(()),
    }
}

/// A JSON param value as the string the job sees: strings as they are, numbers and booleans
/// in their JSON form; anything else is a 400.
fn param_text(key: &str, value: serde_json::Value) -> Result<String, Reject> {
    match value {
        serde_json::Value::String(text) => Ok(text),
        serde_json::Value::Number(number) => Ok(number.to_string()),
        serde_json::Value::Bool(flag) => Ok(flag.to_string()),
        other => Err(Reject::param(
            key,
            format!("param {key:?} must be a string, number or boolean, not {}", json_kind(&other)),
        )),
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn parse_wait(text: &str, max: Duration) -> Result<Duration, Reject> {
    let wait = config::parse_duration(text).map_err(|e| Reject::param("wait", format!("wait: {e}")))?;
    if wait > max {
        return Err(Reject::param("wait", format!("wait is at most {}; poll GET /jobs/{{id}} for longer", human(max))));
    }
    Ok(wait)
}

fn parse_priority(text: &str) -> Result<i32, Reject> {
    text.parse().map_err(|_| Reject::param("priority", format!("priority must be a whole number, not {text:?}")))
}

/// An id-like header (`Idempotency-Key`, `Jobz-Parent-Id`): at most one, visible ASCII, bounded.
fn id_header(headers: &HeaderMap, name: &HeaderName) -> Result<Option<String>, Reject> {
    let mut values = headers.get_all(name).iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(Reject::param(name.as_str(), format!("the {name} header is given more than once")));
    }
    let text = value.to_str().map(str::trim).unwrap_or("");
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Reject::param(name.as_str(), format!("the {name} header must be visible ASCII without spaces")));
    }
    if text.len() > ID_HEADER_BYTES_MAX {
        return Err(Reject::param(
            name.as_str(),
            format!("the {name} header is {} bytes long, more than {ID_HEADER_BYTES_MAX}", text.len()),
        ));
    }
    Ok(Some(text.to_owned()))
}

/// The query string's pairs, refusing a key given twice.
fn unique_pairs(uri: &Uri) -> Result<Vec<(String, String)>, Reject> {
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri).map_err(|e| {
        Reject::new(StatusCode::BAD_REQUEST, format!("the query string is malformed: {}", e.body_text()))
    })?;
    given_once(pairs, "in the query string")
}

/// `pairs`, unless a key is given twice (`place` says where): which one would win is a guess.
fn given_once(pairs: Vec<(String, String)>, place: &str) -> Result<Vec<(String, String)>, Reject> {
    let mut seen = BTreeSet::new();
    for (key, _) in &pairs {
        if !seen.insert(key.as_str()) {
            return Err(Reject::param(key, format!("{key:?} is given more than once {place}")));
        }
    }
    Ok(pairs)
}

/// The query string as a map of the `allowed` keys; an unknown key is a 400, so that a
/// typo (`?state=failed`) is not silently ignored. Empty values count as not given.
fn strict_query(uri: &Uri, allowed: &[&str]) -> Result<BTreeMap<String, String>, Reject> {
    let mut query = BTreeMap::new();
    for (key, value) in unique_pairs(uri)? {
        if !allowed.contains(&key.as_str()) {
            return Err(Reject::param(
                &key,
                format!("unknown query parameter {key:?}; this endpoint takes {}", allowed.join(", ")),
            ));
        }
        if !value.is_empty() {
            query.insert(key, value);
        }
    }
    Ok(query)
}

fn path_id(path: Result<Path<String>, PathRejection>) -> Result<String, Reject> {
    path.map(|Path(id)| id).map_err(|e| Reject::new(StatusCode::BAD_REQUEST, format!("bad path: {}", e.body_text())))
}

/// Reads a request body up to `body_bytes_max` within `body_read_timeout`. An oversized body
/// is a 413; it is drained up to [`BODY_DRAIN_BYTES_MAX`] first so the client, still writing,
/// can read the answer.
async fn read_body(body: Body, headers: &HeaderMap, options: &HttpOptions) -> Result<Bytes, Reject> {
    let max = options.body_bytes_max;
    let too_large =
        || Reject::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is larger than {max} bytes")).closing();
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > (max + BODY_DRAIN_BYTES_MAX) as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut body = body;
        let mut kept = BytesMut::new();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| Reject::new(StatusCode::BAD_REQUEST, format!("could not read the request body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                seen = seen.saturating_add(data.len());
                if seen > max + BODY_DRAIN_BYTES_MAX {
                    break;
                }
                if seen <= max {
                    kept.extend_from_slice(&data);
                }
            }
        }
        if seen > max {
            return Err(too_large());
        }
        Ok(kept.freeze())
    };
    tokio::time::timeout(options.body_read_timeout, read).await.unwrap_or_else(|_| {
        Err(Reject::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body did not arrive within {}", human(options.body_read_timeout)),
        )
        .closing())
    })
}

/// `GET /jobs/{id}`.
async fn job<A: Api>(
    State(shared): AppState<A>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<JobView>, Reject> {
    let id = path_id(path)?;
    let job = shared.call(shared.api.job(&id)).await?;
    Ok(Json(shared.full_view(&job).await?))
}

/// `GET /job_status?id=`: the same as `GET /jobs/{id}`.
async fn job_status<A: Api>(State(shared): AppState<A>, uri: Uri) -> Result<Json<JobView>, Reject> {
    let query = strict_query(&uri, &["id"])?;
    let id = query.get("id").ok_or_else(|| Reject::param("id", "id is required: /job_status?id=ID"))?;
    let job = shared.call(shared.api.job(id)).await?;
    Ok(Json(shared.full_view(&job).await?))
}

/// `GET /jobs?status=&job_name=&run_id=&limit=`, newest first.
async fn list<A: Api>(State(shared): AppState<A>, uri: Uri) -> Result<Json<JobList>, Reject> {
    let mut query = strict_query(&uri, &["status", "job_name", "run_id", "limit"])?;
    let status = match query.remove("status") {
        None => None,
        Some(text) => Some(text.parse::<Status>().map_err(|e| Reject::param("status", e.to_string()))?),
    };
    let limit = match query.remove("limit") {
        None => LIST_LIMIT_DEFAULT,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=LIST_LIMIT_MAX).contains(&n) => n,
            _ => {
                return Err(Reject::param(
                    "limit",
                    format!("limit must be a whole number from 1 to {LIST_LIMIT_MAX}, not {text:?}"),
                ))
            }
        },
    };
    let filter = JobFilter { status, job_name: query.remove("job_name"), run_id: query.remove("run_id"), limit };
    let jobs = shared.call(shared.api.jobs(filter)).await?;
    Ok(Json(JobList { jobs: jobs.iter().map(|j| shared.view(j)).collect() }))
}

/// `GET /auth`: what the caller's token allows, so the dashboard offers only what it may do.
async fn whoami(Extension(grant): Extension<Grant>) -> Json<serde_json::Value> {
    Json(match grant {
        Grant::Open => {
            serde_json::json!({ "tokens": false, "token": null, "read": true, "start": true, "admin": true })
        }
        Grant::Token { name, scopes } => {
            let start = match &scopes.start {
                None => serde_json::json!(false),
                Some(config::StartScope::Any) => serde_json::json!(true),
                Some(config::StartScope::Only(names)) => serde_json::json!(names),
            };
            serde_json::json!({ "tokens": true, "token": name, "read": scopes.read, "start": start, "admin": scopes.admin })
        }
    })
}

/// `GET /queues`: queued and running jobs per job name, and what holds a name back.
async fn queues<A: Api>(State(shared): AppState<A>) -> Result<Json<QueueList>, Reject> {
    let queues = shared.bounded(shared.api.queues()).await?;
    Ok(Json(QueueList { queues }))
}

/// `GET /jobs/{id}/log[?offset=N]`: the log from byte N to its size now, as text/plain.
async fn log<A: Api>(
    State(shared): AppState<A>,
    path: Result<Path<String>, PathRejection>,
    uri: Uri,
) -> Result<Response, Reject> {
    let id = path_id(path)?;
    let query = strict_query(&uri, &["offset"])?;
    let offset = match query.get("offset") {
        None => 0,
        Some(text) => text
            .parse::<u64>()
            .map_err(|_| Reject::param("offset", format!("offset must be a byte count, not {text:?}")))?,
    };
    // The status is read before the file: if it is final, the file read after it is complete.
    let job = shared.call(shared.api.job(&id)).await?;
    let log_path = shared.call(shared.api.log_path(&id)).await?;
    let unreadable = |e: std::io::Error| {
        tracing::warn!(job = %id, path = %log_path.display(), error = %e, "cannot read a job's log");
        Reject::new(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the log of job {id}: {e}"))
    };
    let (file, size) = match tokio::fs::File::open(&log_path).await {
        Ok(file) => {
            let size = file.metadata().await.map_err(unreadable)?.len();
            (Some(file), size)
        }
        // No output yet (or none kept): an empty log, not an error.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, 0),
        Err(e) => return Err(unreadable(e)),
    };
    let from = offset.min(size);
    let length = size - from;
    let body = match file {
        Some(mut file) if length > 0 => {
            file.seek(SeekFrom::Start(from)).await.map_err(unreadable)?;
            Body::new(LogBody::new(file, length))
        }
        _ => Body::empty(),
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    // A log is whatever a job printed: never let a browser sniff it into HTML.
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(LOG_SIZE, HeaderValue::from(size));
    headers.insert(NEXT_OFFSET, HeaderValue::from(size));
    headers.insert(JOB_STATUS, HeaderValue::from_static(job.status.as_str()));
    Ok(response)
}

/// `POST /jobs/{id}/cancel`.
async fn cancel<A: Api>(
    State(shared): AppState<A>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<JobView>, Reject> {
    let id = path_id(path)?;
    let job = shared.call(shared.api.cancel(&id)).await?;
    Ok(Json(shared.full_view(&job).await?))
}

/// `POST /jobs/{id}/retry`.
async fn retry<A: Api>(
    State(shared): AppState<A>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<JobView>, Reject> {
    let id = path_id(path)?;
    let job = shared.call(shared.api.retry(&id)).await?;
    Ok(Json(shared.full_view(&job).await?))
}

/// `POST /jobs/{id}/progress` with `{"percent": 0..100, "message": "..."}`: 204.
async fn progress<A: Api>(
    State(shared): AppState<A>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, Reject> {
    let id = path_id(path)?;
    let bytes = read_body(body, &headers, &shared.options).await?;
    let report: ProgressReport = json_object(&bytes, "a progress report", r#"{"percent": 42, "message": "copying"}"#)?;
    if !(0.0..=100.0).contains(&report.percent) {
        return Err(Reject::param("percent", format!("percent must be from 0 to 100, not {}", report.percent)));
    }
    if let Some(message) = &report.message {
        if message.len() > PROGRESS_MESSAGE_BYTES_MAX {
            return Err(Reject::param(
                "message",
                format!("the message is {} bytes long, more than {PROGRESS_MESSAGE_BYTES_MAX}", message.len()),
            ));
        }
    }
    shared.call(shared.api.progress(&id, report.percent, report.message)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /runs/{run_id}/cancel`: `{"cancelled": [jobs]}`.
async fn cancel_run<A: Api>(
    State(shared): AppState<A>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CancelledList>, Reject> {
    let run_id = path_id(path)?;
    let jobs = shared.call(shared.api.cancel_run(&run_id)).await?;
    Ok(Json(CancelledList { cancelled: jobs.iter().map(JobView::new).collect() }))
}

/// `GET /workers`.
async fn workers<A: Api>(State(shared): AppState<A>) -> Result<Json<WorkerList>, Reject> {
    let workers = shared.bounded(shared.api.workers()).await?;
    Ok(Json(WorkerList { workers: workers.iter().map(WorkerEntry::new).collect() }))
}

/// `GET /gates`: the broker's view, wrapped as `{"gates": [...]}` when it is a bare list.
async fn gates<A: Api>(State(shared): AppState<A>) -> Result<Json<serde_json::Value>, Reject> {
    Ok(Json(wrap_list("gates", shared.bounded(shared.api.gates()).await?)))
}

/// `GET /schedules`: like `/gates`.
async fn schedules<A: Api>(State(shared): AppState<A>) -> Result<Json<serde_json::Value>, Reject> {
    Ok(Json(wrap_list("schedules", shared.bounded(shared.api.schedules()).await?)))
}

fn wrap_list(key: &str, value: serde_json::Value) -> serde_json::Value {
    match value {
        list @ serde_json::Value::Array(_) => serde_json::json!({ key: list }),
        other => other,
    }
}

/// `GET /metrics`: the broker's series, then the front door's request counters.
async fn metrics_text<A: Api>(State(shared): AppState<A>) -> Result<Response, Reject> {
    let mut text = shared.bounded(shared.api.metrics()).await?;
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&shared.options.metrics.render());
    let content_type = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

/// `GET /healthz`: 200 `{"ok": true}` when the store and the ZeroMQ endpoint are up, else 503.
async fn healthz<A: Api>(State(shared): AppState<A>) -> Response {
    match shared.bounded(shared.api.healthy()).await {
        Ok(true) => Json(serde_json::json!({ "ok": true })).into_response(),
        Ok(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ok": false, "error": "the store or the ZeroMQ endpoint is down" })),
        )
            .into_response(),
        Err(reject) => reject.into_response(),
    }
}

/// A duration as users write it (`1h`, `30s`, `1500ms`), for messages.
pub(crate) fn human(duration: Duration) -> String {
    let ms = duration.as_millis();
    match ms {
        0 => "0s".to_owned(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1000 == 0 => format!("{}s", ms / 1000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_back_as_written() {
        assert_eq!(human(Duration::from_secs(3600)), "1h");
        assert_eq!(human(Duration::from_secs(90 * 60)), "90m");
        assert_eq!(human(Duration::from_secs(30)), "30s");
        assert_eq!(human(Duration::from_millis(1500)), "1500ms");
        assert_eq!(human(Duration::ZERO), "0s");
    }

    #[test]
    fn json_param_values_become_strings_and_others_are_refused() {
        assert_eq!(param_text("n", serde_json::json!(3)).unwrap(), "3");
        assert_eq!(param_text("n", serde_json::json!(1.5)).unwrap(), "1.5");
        assert_eq!(param_text("b", serde_json::json!(true)).unwrap(), "true");
        assert_eq!(param_text("s", serde_json::json!("x y")).unwrap(), "x y");
        let reject = param_text("l", serde_json::json!([1])).unwrap_err();
        assert_eq!(reject.status, StatusCode::BAD_REQUEST);
        assert_eq!(reject.body.param.as_deref(), Some("l"));
        assert!(param_text("z", serde_json::Value::Null).is_err());
    }

    #[test]
    fn a_query_key_given_twice_is_refused_by_name() {
        let uri: Uri = "/job_start?job_name=a&x=1&x=2".parse().unwrap();
        let reject = unique_pairs(&uri).unwrap_err();
        assert_eq!(reject.body.param.as_deref(), Some("x"));
        let uri: Uri = "/jobs?state=failed".parse().unwrap();
        assert_eq!(strict_query(&uri, &["status"]).unwrap_err().body.param.as_deref(), Some("state"));
    }

    #[test]
    fn wait_is_parsed_and_capped() {
        assert_eq!(parse_wait("1h30m", Duration::from_secs(7200)).unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_wait("500ms", Duration::from_secs(1)).unwrap(), Duration::from_millis(500));
        assert!(parse_wait("2h", Duration::from_secs(3600)).unwrap_err().body.error.contains("at most 1h"));
        assert_eq!(parse_wait("soon", Duration::from_secs(3600)).unwrap_err().body.param.as_deref(), Some("wait"));
    }
}
