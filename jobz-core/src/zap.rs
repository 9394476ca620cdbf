//! Who may connect to an encrypted broker: the ZAP handler, and what failed
//! handshakes are told.
//!
//! A CURVE server in libzmq encrypts every connection, but admits any client
//! that knows the server's public key unless a ZAP handler (ZeroMQ RFC 27)
//! answers for it. libzmq asks the handler over `inproc://zeromq.zap.01` in
//! the socket's own context, once per handshake, with the client's address and
//! public key. So the broker binds the handler there *before* its ROUTER binds
//! (see `Router::bind_curve`), and the handler answers every request, even a
//! malformed one: a request left unanswered stalls that handshake until the
//! handshake timeout.
//!
//! The handler's thread, the `Gatekeeper`, also reads the ROUTER's monitor
//! events, so handshakes that fail before ZAP is asked (a plain-text peer, a
//! broken CURVE handshake, a peer that stalls) are logged too. libzmq says
//! nothing about bytes that are not ZeroMQ at all: it closes such a connection
//! before any handshake starts, and its monitor gives no event for it.
//!
//! [`answer`] and the `describe_*` functions are pure; the thread is their I/O.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::curve::{AllowedKeys, PublicKey};
use crate::limits::{REFUSAL_LOG_INTERVAL, ZAP_REQUEST_FRAMES_MAX, ZAP_STOP_CHECK};
use crate::transport::{receive_message, TransportError};

/// Where libzmq looks for the ZAP handler of a context (RFC 27).
pub const ZAP_ENDPOINT: &str = "inproc://zeromq.zap.01";
/// The ZAP domain of the broker's socket, shown in ZAP requests.
pub const ZAP_DOMAIN: &str = "jobz";

/// The peer's address is shown at most this long in a log line (libzmq gives an
/// IP address; anything longer is not one).
const ADDRESS_MAX_CHARS: usize = 64;

/// What the broker refused, for `/metrics`.
#[derive(Debug, Default)]
pub struct Refusals {
    keys: AtomicU64,
    handshakes: AtomicU64,
}

impl Refusals {
    /// Peers whose CURVE key is not allowed (or that offered no CURVE key).
    pub fn keys(&self) -> u64 {
        self.keys.load(Ordering::Relaxed)
    }

    /// Connections whose handshake failed before ZAP was asked: plain text,
    /// a malformed or undecryptable CURVE handshake, a stall past the handshake timeout.
    pub fn handshakes(&self) -> u64 {
        self.handshakes.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------
// ZAP requests and replies (pure)
// ---------------------------------------------------------------------------

/// What the handler decided about one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZapOutcome {
    /// 200: the key is allowed; `origin` is where it was allowed from.
    Allowed { address: String, key: PublicKey, origin: String },
    /// 400: a well-formed CURVE request with a key that is not allowed.
    Refused { address: String, key: PublicKey },
    /// 400: a mechanism other than CURVE (the broker's socket never asks this, but the answer is no).
    NotCurve { address: String, mechanism: String },
    /// 500: not a request the handler can judge; answered anyway.
    Malformed { reason: String },
}

/// The reply to a ZAP request (its frames after the envelope) and what was decided.
pub fn answer(request: &[Vec<u8>], allowed: &AllowedKeys) -> (Vec<Vec<u8>>, ZapOutcome) {
    let request_id = request.get(1).cloned().unwrap_or_default();
    let reply = |status: &str, text: &str, user_id: &[u8]| -> Vec<Vec<u8>> {
        vec![b"1.0".to_vec(), request_id.clone(), status.into(), text.into(), user_id.to_vec(), Vec::new()]
    };
    let malformed = |reason: String| (reply("500", "malformed ZAP request", b""), ZapOutcome::Malformed { reason });
    if request.len() < 6 {
        return malformed(format!("{} frames, a ZAP request has at least 6", request.len()));
    }
    if request[0] != b"1.0" {
        return malformed(format!("ZAP version {:?}, expected 1.0", printable(&request[0])));
    }
    let address = printable(&request[3]);
    let mechanism = &request[5];
    if mechanism != b"CURVE" {
        let mechanism = printable(mechanism);
        return (reply("400", "CURVE is required", b""), ZapOutcome::NotCurve { address, mechanism });
    }
    let key = match request {
        [_, _, _, _, _, _, credential] => <[u8; 32]>::try_from(credential.as_slice()).ok().map(PublicKey::from_bytes),
        _ => None,
    };
    let Some(key) = key else {
        return malformed("a CURVE request carries exactly one 32-byte key".to_string());
    };
    match allowed.origin(&key) {
        Some(origin) => {
            let user_id = key.to_z85();
            (reply("200", "OK", user_id.as_bytes()), ZapOutcome::Allowed { address, key, origin: origin.to_string() })
        }
        None => (reply("400", "key not allowed", b""), ZapOutcome::Refused { address, key }),
    }
}

/// Untrusted bytes as a short printable string for a log line.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).chars().filter(|c| !c.is_control()).take(ADDRESS_MAX_CHARS).collect()
}

// ---------------------------------------------------------------------------
// Handshake failures (pure)
// ---------------------------------------------------------------------------

// libzmq's protocol error codes (zmq.h), carried by ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL.
const PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: u32 = 0x1100_0001;
const PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: u32 = 0x1100_0002;

fn protocol_error_name(code: u32) -> &'static str {
    match code {
        0x1000_0000 => "unspecified ZMTP error",
        0x1000_0001 => "unexpected command",
        0x1000_0002 => "commands out of sequence",
        0x1000_0003 => "failed key exchange",
        0x1000_0011..=0x1000_0017 => "malformed handshake command",
        0x1000_0018 => "invalid metadata",
        PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC => "a message that does not decrypt",
        PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH => "a security mechanism other than ours",
        0x2000_0000..=0x2000_0005 => "a bad answer from the ZAP handler",
        _ => "an unknown protocol error",
    }
}

fn errno_text(value: u32) -> String {
    match i32::try_from(value) {
        Ok(0) | Err(_) => "no detail".to_string(),
        Ok(errno) => std::io::Error::from_raw_os_error(errno).to_string(),
    }
}

/// The broker's log line for a failed handshake seen by its monitor; `None` for
/// events that are not a refusal to log here (a ZAP refusal is logged when it is
/// answered, with the peer's address).
pub fn describe_server_failure(event: u16, value: u32) -> Option<String> {
    if event == zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL.to_raw() {
        return Some(match value {
            PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH => "refused a connection that does not speak CURVE: a plain-text \
                 worker or semaphore (it needs --curve-key and --broker-key) or not a jobz peer"
                .to_string(),
            PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC => "refused a connection whose CURVE handshake does not decrypt: \
                 the peer was given another broker's public key (--broker-key), or sent garbage"
                .to_string(),
            code => format!(
                "refused a connection: its handshake broke the protocol ({}, code {code:#x})",
                protocol_error_name(code)
            ),
        });
    }
    if event == zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL.to_raw() {
        return Some(format!(
            "a connection ended before its handshake finished ({}): a peer that closed early, stalled past the \
             handshake timeout, or sent something that is not ZeroMQ",
            errno_text(value)
        ));
    }
    None
}

/// How loud a worker's or semaphore's handshake failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The peer will never get in as it is configured.
    Error,
    /// Perhaps passing (the broker restarted mid-handshake).
    Warn,
}

/// A worker's or semaphore's log line for a failed handshake with the broker
/// at `endpoint`; `own_key` is its public key when it speaks CURVE.
pub fn describe_client_failure(
    event: u16,
    value: u32,
    endpoint: &str,
    own_key: Option<&PublicKey>,
) -> Option<(Severity, String)> {
    if event == zmq::SocketEvent::HANDSHAKE_FAILED_AUTH.to_raw() {
        let key = own_key.map(|k| k.to_z85()).unwrap_or_default();
        return Some((
            Severity::Error,
            format!(
                "the broker at {endpoint} refused our key (ZAP status {value}): check that our public key {key} \
                 is in the broker's --allowed-keys, and that --broker-key is that broker's public key"
            ),
        ));
    }
    if event == zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL.to_raw() {
        let text = match (value, own_key) {
            (PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH, Some(_)) => format!(
                "the broker at {endpoint} does not speak CURVE: it runs without --curve-key, or it is not a jobz broker"
            ),
            (PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH, None) => format!(
                "the broker at {endpoint} requires CURVE: give this process --curve-key (its own key pair) and \
                 --broker-key (the broker's public key)"
            ),
            (code, _) => format!(
                "the handshake with the broker at {endpoint} broke the protocol ({}, code {code:#x})",
                protocol_error_name(code)
            ),
        };
        return Some((Severity::Error, text));
    }
    if event == zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL.to_raw() {
        let text = match own_key {
            Some(_) => format!(
                "the broker at {endpoint} closed the connection during the CURVE handshake ({}): most likely \
                 --broker-key is not that broker's public key, or the broker restarted",
                errno_text(value)
            ),
            None => format!(
                "the connection to the broker at {endpoint} failed during the handshake ({}): a broker that \
                 requires CURVE closes plain-text connections; then give this process --curve-key and --broker-key",
                errno_text(value)
            ),
        };
        return Some((Severity::Warn, text));
    }
    None
}

/// The monitor events that mean a failed handshake.
pub(crate) fn handshake_failure_events() -> i32 {
    i32::from(
        zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL.to_raw()
            | zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL.to_raw()
            | zmq::SocketEvent::HANDSHAKE_FAILED_AUTH.to_raw(),
    )
}

/// A monitor event's number and value (libzmq's v1 format: a 6-byte first
/// frame, the event as u16 and its value as u32, in native byte order).
pub(crate) fn parse_event(frames: &[Vec<u8>]) -> Option<(u16, u32)> {
    let first = frames.first()?;
    let event = u16::from_ne_bytes(first.get(0..2)?.try_into().ok()?);
    let value = u32::from_ne_bytes(first.get(2..6)?.try_into().ok()?);
    Some((event, value))
}

static NEXT_MONITOR: AtomicU64 = AtomicU64::new(0);

/// Watches `socket`'s failed handshakes: a PAIR socket that receives them.
/// Call it before the socket binds or connects, so no event is missed.
pub(crate) fn watch_handshakes(ctx: &zmq::Context, socket: &zmq::Socket) -> zmq::Result<zmq::Socket> {
    let address = format!("inproc://jobz-handshakes-{}", NEXT_MONITOR.fetch_add(1, Ordering::Relaxed));
    socket.monitor(&address, handshake_failure_events())?;
    let watch = ctx.socket(zmq::PAIR)?;
    watch.set_linger(0)?;
    watch.set_rcvtimeo(0)?;
    watch.connect(&address)?;
    Ok(watch)
}

/// One log line per interval for a noisy source; the rest are counted.
#[derive(Debug)]
pub(crate) struct LogLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    pub(crate) fn new(interval: Duration) -> LogLimit {
        LogLimit { interval, last: None, suppressed: 0 }
    }

    /// `Some(lines suppressed since the last one)` when a line may be logged now.
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now.duration_since(t) < self.interval) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

// ---------------------------------------------------------------------------
// The thread
// ---------------------------------------------------------------------------

/// The ZAP handler and the ROUTER's handshake monitor, on a thread of their
/// own. Stops (and joins) when dropped.
pub(crate) struct Gatekeeper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Gatekeeper {
    /// Binds the ZAP handler in `ctx` and starts watching `router`'s
    /// handshakes. Call it after `router` has its CURVE options and before it
    /// binds: from the moment it binds, every handshake is asked about.
    pub(crate) fn start(
        ctx: &zmq::Context,
        router: &zmq::Socket,
        allowed: AllowedKeys,
        refusals: Arc<Refusals>,
    ) -> Result<Gatekeeper, TransportError> {
        // A ROUTER rather than REP: it has no send/receive lockstep to get
        // stuck in if one reply cannot be sent.
        let zap = ctx.socket(zmq::ROUTER).map_err(|source| TransportError::Socket { source })?;
        let option = |option: &'static str, result: zmq::Result<()>| {
            result.map_err(|source| TransportError::Option { option, source })
        };
        option("ZMQ_LINGER", zap.set_linger(0))?;
        option("ZMQ_SNDTIMEO", zap.set_sndtimeo(0))?;
        option("ZMQ_RCVTIMEO", zap.set_rcvtimeo(0))?;
        zap.bind(ZAP_ENDPOINT).map_err(|source| TransportError::Zap { source })?;
        let monitor = watch_handshakes(ctx, router).map_err(|source| TransportError::Monitor { source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let keeper = Keeper {
            zap,
            monitor,
            allowed,
            refusals,
            stop: Arc::clone(&stop),
            refused_log: LogLimit::new(REFUSAL_LOG_INTERVAL),
            handshake_log: LogLimit::new(REFUSAL_LOG_INTERVAL),
            malformed_log: LogLimit::new(REFUSAL_LOG_INTERVAL),
        };
        let thread = std::thread::Builder::new()
            .name("jobz-zap".into())
            .spawn(move || keeper.run())
            .map_err(|source| TransportError::Thread { source })?;
        Ok(Gatekeeper { stop, thread: Some(thread) })
    }
}

impl Drop for Gatekeeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // The thread checks the flag at least every ZAP_STOP_CHECK and never blocks otherwise.
            if thread.join().is_err() {
                tracing::error!("the ZAP handler's thread panicked");
            }
        }
    }
}

struct Keeper {
    zap: zmq::Socket,
    monitor: zmq::Socket,
    allowed: AllowedKeys,
    refusals: Arc<Refusals>,
    stop: Arc<AtomicBool>,
    refused_log: LogLimit,
    handshake_log: LogLimit,
    malformed_log: LogLimit,
}

impl Keeper {
    fn run(mut self) {
        tracing::debug!(allowed = self.allowed.len(), "ZAP handler started");
        let wait = i64::try_from(ZAP_STOP_CHECK.as_millis()).unwrap_or(i64::MAX);
        while !self.stop.load(Ordering::SeqCst) {
            let (requests, events) = {
                let mut items = [self.zap.as_poll_item(zmq::POLLIN), self.monitor.as_poll_item(zmq::POLLIN)];
                match zmq::poll(&mut items, wait) {
                    Ok(_) => (items[0].is_readable(), items[1].is_readable()),
                    Err(zmq::Error::EINTR) => continue,
                    Err(e) => {
                        // Without the handler every CURVE handshake stalls and fails: loud.
                        tracing::error!(error = %e, "the ZAP handler cannot poll; no worker can connect from now on");
                        return;
                    }
                }
            };
            if requests {
                self.requests();
            }
            if events {
                self.events();
            }
        }
        tracing::debug!("ZAP handler stopped");
    }

    /// Answers every waiting request.
    fn requests(&mut self) {
        loop {
            let frames = match receive_message(&self.zap, ZAP_REQUEST_FRAMES_MAX) {
                Ok(Some(frames)) => frames,
                Ok(None) | Err(zmq::Error::EINTR) => return,
                Err(e) => {
                    tracing::error!(error = %e, "the ZAP handler cannot read a request");
                    return;
                }
            };
            let Some((peer, rest)) = frames.split_first() else { continue };
            // libzmq's requests start with an empty delimiter; answer one without it too.
            let request = match rest.split_first() {
                Some((delimiter, request)) if delimiter.is_empty() => request,
                _ => rest,
            };
            let (reply, outcome) = answer(request, &self.allowed);
            let envelope = [peer.clone(), Vec::new()];
            if let Err(e) = self.zap.send_multipart(envelope.into_iter().chain(reply), zmq::DONTWAIT) {
                tracing::warn!(error = %e, "could not send a ZAP reply; that handshake fails at its timeout");
            }
            self.log(outcome);
        }
    }

    fn log(&mut self, outcome: ZapOutcome) {
        let now = Instant::now();
        match outcome {
            ZapOutcome::Allowed { address, key, origin } => {
                tracing::info!(%address, %key, allowed_by = %origin, "admitted a peer with an allowed CURVE key");
            }
            ZapOutcome::Refused { address, key } => {
                self.refusals.keys.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.refused_log.allow(now) {
                    tracing::warn!(%address, %key, suppressed, "refused a peer: its CURVE public key is not in --allowed-keys");
                }
            }
            ZapOutcome::NotCurve { address, mechanism } => {
                self.refusals.keys.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = self.refused_log.allow(now) {
                    tracing::warn!(%address, %mechanism, suppressed, "refused a peer: it does not use CURVE");
                }
            }
            ZapOutcome::Malformed { reason } => {
                if let Some(suppressed) = self.malformed_log.allow(now) {
                    tracing::warn!(%reason, suppressed, "answered a malformed ZAP request with 500");
                }
            }
        }
    }

    fn events(&mut self) {
        loop {
            let frames = match receive_message(&self.monitor, 2) {
                Ok(Some(frames)) => frames,
                Ok(None) | Err(zmq::Error::EINTR) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the broker socket's handshake events");
                    return;
                }
            };
            let Some((event, value)) = parse_event(&frames) else { continue };
            let Some(text) = describe_server_failure(event, value) else { continue };
            self.refusals.handshakes.fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.handshake_log.allow(Instant::now()) {
                tracing::warn!(suppressed, "{text}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curve::KeyPair;

    fn request(key: &[u8]) -> Vec<Vec<u8>> {
        vec![
            b"1.0".to_vec(),
            b"7".to_vec(),
            ZAP_DOMAIN.into(),
            b"10.1.2.3".to_vec(),
            Vec::new(),
            b"CURVE".to_vec(),
            key.to_vec(),
        ]
    }

    #[test]
    fn an_allowed_key_gets_200_and_others_400() {
        let (ok, other) = (KeyPair::generate().expect("a"), KeyPair::generate().expect("b"));
        let mut allowed = AllowedKeys::default();
        allowed.insert(ok.public, "w1.pub".into()).expect("insert");
        let (reply, outcome) = answer(&request(ok.public.as_bytes()), &allowed);
        assert_eq!(reply[0], b"1.0");
        assert_eq!(reply[1], b"7");
        assert_eq!(reply[2], b"200");
        assert_eq!(reply.len(), 6);
        assert!(matches!(outcome, ZapOutcome::Allowed { ref origin, .. } if origin == "w1.pub"), "{outcome:?}");
        let (reply, outcome) = answer(&request(other.public.as_bytes()), &allowed);
        assert_eq!(reply[2], b"400");
        assert_eq!(outcome, ZapOutcome::Refused { address: "10.1.2.3".into(), key: other.public });
    }

    #[test]
    fn malformed_requests_are_answered_too() {
        let allowed = AllowedKeys::default();
        for bad in [
            vec![],
            vec![b"1.0".to_vec()],
            vec![b"2.0".to_vec(), b"9".to_vec(), vec![], vec![], vec![], b"CURVE".to_vec(), vec![0; 32]],
            request(&[0; 31]),
            {
                let mut r = request(&[0; 32]);
                r.push(b"extra".to_vec());
                r
            },
        ] {
            let (reply, outcome) = answer(&bad, &allowed);
            assert_eq!(reply.len(), 6, "{bad:?}");
            assert_eq!(reply[2], b"500", "{bad:?}");
            assert!(matches!(outcome, ZapOutcome::Malformed { .. }), "{outcome:?}");
        }
        let mut plain = request(&[]);
        plain[5] = b"NULL".to_vec();
        plain.pop();
        let (reply, outcome) = answer(&plain, &allowed);
        assert_eq!(reply[2], b"400");
        assert!(matches!(outcome, ZapOutcome::NotCurve { .. }), "{outcome:?}");
    }

    #[test]
    fn monitor_events_parse() {
        let mut first = zmq::SocketEvent::HANDSHAKE_FAILED_AUTH.to_raw().to_ne_bytes().to_vec();
        first.extend_from_slice(&400u32.to_ne_bytes());
        assert_eq!(
            parse_event(&[first, b"tcp://x".to_vec()]),
            Some((zmq::SocketEvent::HANDSHAKE_FAILED_AUTH.to_raw(), 400))
        );
        assert_eq!(parse_event(&[vec![1, 2, 3]]), None);
        assert_eq!(parse_event(&[]), None);
    }

    #[test]
    fn log_limit_counts_what_it_holds_back() {
        let mut limit = LogLimit::new(Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(limit.allow(t), Some(0));
        assert_eq!(limit.allow(t + Duration::from_millis(10)), None);
        assert_eq!(limit.allow(t + Duration::from_millis(20)), None);
        assert_eq!(limit.allow(t + Duration::from_secs(2)), Some(2));
    }
}
