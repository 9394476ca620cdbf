//! [`serve`]: the accept loop, one tracked task per connection, and the
//! shutdown order (stop accepting, let in-flight requests finish within the
//! grace, then drop what is left).
//!
//! Connections are driven with hyper's `http1::Builder` directly rather than
//! `axum::serve`, because the limits against slow and greedy clients (header
//! read timeout, head size, header count) are only reachable there.
//!
//! With TLS, each connection's handshake comes first, within the header read
//! timeout (a client that opens TLS and stalls is dropped like one that
//! stalls its request head); a failed handshake is logged, rate-limited, with
//! the peer and the reason, and closes only that connection.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::api::Api;
use super::limits::{
    ACCEPT_ERROR_PAUSE, READ_BUFFER_BYTES_MIN, REFUSALS_LOGGED_PER_WINDOW, REFUSAL_LOG_WINDOW, SHUTDOWN_ABORT_WAIT,
};
use super::log_budget::LogBudget;
use super::parse_errors::{self, Answers, JsonErrors};
use super::routes::{self, Peer, Shared};
use super::tls;
use super::{HttpError, HttpOptions};

/// Consecutive accept errors (one per [`ACCEPT_ERROR_PAUSE`], so about a minute)
/// after which the listener is taken to be broken for good and `serve` returns.
const ACCEPT_ERRORS_MAX: u32 = 600;

/// Serves the HTTP API on `listener` until `shutdown` is cancelled, then stops
/// accepting, lets in-flight requests finish within `options.shutdown_grace`
/// (held `wait=` answers return at once with the job as it stands), drops the
/// connections still open and returns.
///
/// Returns an error only for bad options or a listener that keeps failing; a
/// failing connection is logged and closed, never fatal.
pub async fn serve<A: Api>(
    listener: TcpListener,
    api: A,
    options: HttpOptions,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    check(&options)?;
    let address = listener.local_addr().map_or_else(|_| "an unknown address".to_owned(), |a| a.to_string());
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .keep_alive(true)
        .half_close(false)
        .header_read_timeout(options.header_read_timeout)
        .max_header_size(options.header_bytes_max)
        .max_buf_size(read_buffer_bytes(options.header_bytes_max))
        .max_headers(options.headers_max);
    // `stop` rather than `shutdown` itself, so that a broken listener also winds the connections down.
    let stop = shutdown.child_token();
    let grace = options.shutdown_grace;
    let permits = Arc::new(Semaphore::new(options.connections_max));
    let tls = options.tls.clone().map(|config| Handshakes {
        acceptor: TlsAcceptor::from(config),
        timeout: options.header_read_timeout,
        log: LogBudget::new(REFUSALS_LOGGED_PER_WINDOW, REFUSAL_LOG_WINDOW),
    });
    let answers = Arc::new(Answers::new(&options));
    let scheme = if tls.is_some() { "https" } else { "http" };
    let tokens = if options.tokens.is_empty() { "no tokens" } else { "bearer tokens" };
    let router = routes::router(Arc::new(Shared { api, options, shutdown: stop.clone() }));
    let connections = Connections {
        builder: Arc::new(builder),
        router,
        answers,
        tls: tls.map(Arc::new),
        stop: stop.clone(),
        abort: CancellationToken::new(),
    };
    let tracker = TaskTracker::new();
    tracing::info!(%address, scheme, tokens, "HTTP front door listening");

    let result = accept_loop(&listener, &address, &permits, &tracker, &connections).await;

    // Stop accepting first: new clients are refused by the kernel, not left hanging.
    drop(listener);
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            connections = tracker.len(),
            "HTTP requests still in flight after the shutdown grace; dropping them"
        );
        connections.abort.cancel();
        if tokio::time::timeout(SHUTDOWN_ABORT_WAIT, tracker.wait()).await.is_err() {
            tracing::warn!(connections = tracker.len(), "HTTP connections did not unwind; leaving them");
        }
    }
    tracing::info!(%address, "HTTP front door stopped");
    result
}

/// hyper's read buffer: twice the head limit. A head over the limit is refused once the
/// buffer holds more than the limit without the head's end; hyper's answer becomes a
/// JSON 413 (`parse_errors.rs`), and the rest of the head is drained before the close.
fn read_buffer_bytes(header_bytes_max: usize) -> usize {
    header_bytes_max.saturating_mul(2).max(READ_BUFFER_BYTES_MIN)
}

fn check(options: &HttpOptions) -> Result<(), HttpError> {
    let bad = |option, problem: &str| Err(HttpError::Options { option, problem: problem.to_owned() });
    if options.connections_max == 0 || options.connections_max > Semaphore::MAX_PERMITS {
        return bad("connections_max", "must be at least 1 and fit a semaphore");
    }
    if options.header_bytes_max < 1024 {
        return bad("header_bytes_max", "must be at least 1024 bytes");
    }
    if options.headers_max == 0 {
        return bad("headers_max", "must be at least 1");
    }
    if options.header_read_timeout.is_zero() || options.body_read_timeout.is_zero() || options.request_timeout.is_zero()
    {
        return bad("timeouts", "header_read_timeout, body_read_timeout and request_timeout must be above zero");
    }
    Ok(())
}

/// The TLS side of the front door, shared by every connection.
struct Handshakes {
    acceptor: TlsAcceptor,
    /// The header read timeout: a handshake must be done within it too.
    timeout: std::time::Duration,
    /// Failed handshakes are logged within this budget.
    log: LogBudget,
}

/// What every connection task needs.
struct Connections {
    builder: Arc<http1::Builder>,
    router: axum::Router,
    /// The JSON answers that replace hyper's own to requests it cannot parse.
    answers: Arc<Answers>,
    tls: Option<Arc<Handshakes>>,
    /// Cancelled when shutdown begins: finish the request in flight, then close.
    stop: CancellationToken,
    /// Cancelled when the grace has passed: drop the connection now.
    abort: CancellationToken,
}

/// Accepts until `stop` is cancelled or the listener is broken for good.
async fn accept_loop(
    listener: &TcpListener,
    address: &str,
    permits: &Arc<Semaphore>,
    tracker: &TaskTracker,
    connections: &Connections,
) -> Result<(), HttpError> {
    let mut errors_in_a_row = 0u32;
    loop {
        // Waiting for a permit before accepting leaves clients over the limit in the
        // kernel's backlog, where they are served as soon as a connection closes.
        let permit = tokio::select! {
            biased;
            () = connections.stop.cancelled() => return Ok(()),
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed; if it were, no connection could be served.
                Err(_) => return Ok(()),
            },
        };
        let accepted = tokio::select! {
            biased;
            () = connections.stop.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                errors_in_a_row = 0;
                tracker.spawn(connection(stream, peer, permit, connections.task_parts()));
            }
            Err(e) => {
                // Mostly transient: a peer that reset before we accepted, or out of file
                // descriptors until a connection closes. Pause rather than spin.
                errors_in_a_row += 1;
                tracing::warn!(%address, error = %e, "accepting an HTTP connection failed");
                if errors_in_a_row >= ACCEPT_ERRORS_MAX {
                    return Err(HttpError::Accept { address: address.to_owned(), source: e });
                }
                tokio::select! {
                    () = connections.stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => {}
                }
            }
        }
    }
}

/// The owned parts one connection task takes with it.
struct TaskParts {
    builder: Arc<http1::Builder>,
    router: axum::Router,
    answers: Arc<Answers>,
    tls: Option<Arc<Handshakes>>,
    stop: CancellationToken,
    abort: CancellationToken,
}

impl Connections {
    fn task_parts(&self) -> TaskParts {
        TaskParts {
            builder: self.builder.clone(),
            router: self.router.clone(),
            answers: self.answers.clone(),
            tls: self.tls.clone(),
            stop: self.stop.clone(),
            abort: self.abort.clone(),
        }
    }
}

/// Serves one connection: the TLS handshake first when the front door has TLS, then
/// requests one after another (keep-alive) until the client closes, a limit is hit, or
/// shutdown. The permit is held until the task ends.
async fn connection(stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit, parts: TaskParts) {
    let _permit = permit;
    // Answers are small and written whole; don't let Nagle delay them.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
    }
    let Some(handshakes) = parts.tls.clone() else {
        return serve_requests(stream, peer, parts).await;
    };
    let handshake = tokio::select! {
        handshake = tokio::time::timeout(handshakes.timeout, tls::handshake(&handshakes.acceptor, stream)) => handshake,
        () = parts.stop.cancelled() => return,
    };
    let refusal = match handshake {
        Ok(Ok(stream)) => return serve_requests(stream, peer, parts).await,
        Ok(Err(tls::Refusal::Closed)) => {
            // A TCP probe (a load balancer's health check, a port scan) looks like this; not worth a warning.
            tracing::debug!(%peer, "connection closed before or during the TLS handshake");
            return;
        }
        Ok(Err(refusal)) => refusal.to_string(),
        Err(_) => format!("no TLS handshake within {}", super::routes::human(handshakes.timeout)),
    };
    if let Some(left_out) = handshakes.log.admit() {
        tracing::warn!(%peer, reason = %refusal, left_out, "TLS handshake refused");
    }
}

/// Serves HTTP/1.1 requests on one connection (plain or TLS).
async fn serve_requests<S>(stream: S, peer: SocketAddr, parts: TaskParts)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let router = parts.router;
    // Each request carries its peer's address, for the log lines of refused requests.
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(Peer(peer));
        let mut router = router.clone();
        // axum's Router is always ready, so `call` needs no `poll_ready` first.
        async move { tower_service::Service::call(&mut router, request).await }
    });
    let io = TokioIo::new(JsonErrors::new(stream, parts.answers));
    let mut conn = parts.builder.serve_connection(io, service);
    let result = tokio::select! {
        result = &mut conn => result,
        () = parts.stop.cancelled() => {
            // Finish the request in flight (if any), then close; an idle connection closes now.
            std::pin::Pin::new(&mut conn).graceful_shutdown();
            tokio::select! {
                result = &mut conn => result,
                () = parts.abort.cancelled() => {
                    tracing::debug!(%peer, "HTTP connection dropped at the end of the shutdown grace");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        // Slow or vanished clients end up here; they are the client's problem, not ours.
        tracing::debug!(%peer, error = %e, timeout = e.is_timeout(), "HTTP connection ended with an error");
    }
    // The client may still be sending: a refused head or body, unread.
    let io = conn.into_parts().io.into_inner().into_inner();
    tokio::select! {
        () = parse_errors::linger(io) => {}
        // At shutdown, nothing lingers.
        () = parts.stop.cancelled() => {}
    }
}
