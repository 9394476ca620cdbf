//! The HTTP front door (SPEC "HTTP API"): turns requests into calls on the
//! broker and answers JSON.
//!
//! - [`serve`] drives hyper's HTTP/1.1 connections itself (one tracked task per
//!   connection) so that every limit is set explicitly: connections, header
//!   size and read time, body size and read time, broker call time (see
//!   [`limits`] and [`HttpOptions`]). Routing is an axum [`axum::Router`].
//! - Handlers are generic over [`Api`], the broker as the front door sees it;
//!   [`crate::handle::BrokerHandle`] implements it, and so does the in-memory
//!   [`memory::MemoryApi`] the tests and the client's tests run against.
//! - [`wire`] holds the JSON types; the `jobz` client commands read the same ones.
//! - With [`HttpOptions::tls`] the front door speaks only HTTPS ([`tls`]), with a
//!   client CA only to clients holding a certificate it signed; with
//!   [`HttpOptions::tokens`] every endpoint but `/healthz` needs a bearer token
//!   with the endpoint's scope ([`auth`]). Both together: both are needed.
//!
//! Extensions beyond SPEC: `GET /jobs/{id}/log?offset=N` with the response
//! headers `Jobz-Log-Size`, `Jobz-Next-Offset` and `Jobz-Job-Status` (so
//! `jobz logs --follow` can poll); the request header `Jobz-Parent-Id` on
//! `job_start` (a job starting a job joins its run); `priority=` on a start;
//! the extra job fields `signal, priority, progress, error, origin,
//! not_before, attempt_list, held_by, unique_key`; `GET /queues` (queued and
//! running per job name), `GET /auth` (what the caller's token allows) and the
//! dashboard's files under `/ui/`.

mod api;
pub mod auth;
mod dashboard;
pub mod limits;
mod log_body;
mod log_budget;
pub mod memory;
mod metrics;
mod parse_errors;
mod reject;
mod routes;
mod server;
pub mod tls;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

pub use api::Api;
pub use auth::Tokens;
pub use metrics::HttpMetrics;
pub use routes::{IDEMPOTENCY_KEY, JOB_STATUS, LOG_SIZE, NEXT_OFFSET, PARENT_ID};
pub use server::serve;

/// The front door's limits and shared counters. [`Default`] takes them from [`limits`].
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Connections served at once; past it, accepting pauses until one closes.
    pub connections_max: usize,
    /// A request head must arrive within this long; also how long an idle
    /// keep-alive connection is kept.
    pub header_read_timeout: Duration,
    /// The largest request head (request line and headers) in bytes; larger is a 413 (hyper refuses it; `http/parse_errors.rs` answers it as JSON).
    pub header_bytes_max: usize,
    /// The most header fields in one request; more is a 413 like an oversized head.
    pub headers_max: usize,
    /// The largest request body in bytes; larger is a 413.
    pub body_bytes_max: usize,
    /// A request body must arrive within this long; a 408 otherwise.
    pub body_read_timeout: Duration,
    /// The longest a call into the broker may take before a 503.
    pub request_timeout: Duration,
    /// The longest `wait=` a start may ask for.
    pub wait_max: Duration,
    /// How long in-flight requests may finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// Requests answered, by code; `GET /metrics` renders them.
    pub metrics: Arc<HttpMetrics>,
    /// HTTPS only, with this configuration ([`tls::server_config`]); `None` is plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The bearer tokens every endpoint but `/healthz` asks for; empty asks for none.
    pub tokens: Arc<Tokens>,
}

impl Default for HttpOptions {
    fn default() -> HttpOptions {
        HttpOptions {
            connections_max: limits::CONNECTIONS_MAX,
            header_read_timeout: limits::HEADER_READ_TIMEOUT,
            header_bytes_max: limits::HEADER_BYTES_MAX,
            headers_max: limits::HEADERS_MAX,
            body_bytes_max: limits::BODY_BYTES_MAX,
            body_read_timeout: limits::BODY_READ_TIMEOUT,
            request_timeout: limits::REQUEST_TIMEOUT,
            wait_max: limits::WAIT_MAX,
            shutdown_grace: limits::SHUTDOWN_GRACE,
            metrics: Arc::new(HttpMetrics::new()),
            tls: None,
            tokens: Arc::new(Tokens::default()),
        }
    }
}

/// Why [`serve`] stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// An option is out of range; nothing was served.
    #[error("bad HTTP option {option}: {problem}")]
    Options { option: &'static str, problem: String },
    /// The listening socket failed in a way that retrying cannot fix.
    #[error("accepting HTTP connections on {address}: {source}")]
    Accept { address: String, source: std::io::Error },
}
