//! ZeroMQ sockets on their own threads, bridged to tokio.
//!
//! The broker binds a [`Router`]; workers and semaphores connect out with a
//! [`Dealer`], so a peer behind a firewall needs no inbound port. Both carry the
//! messages of [`crate::protocol`], already decoded.
//!
//! A zmq socket is not thread-safe and its calls block, so each network socket
//! belongs to one thread, its *pump*. The pump waits in `zmq::poll` on two
//! sockets at once: the network socket and an `inproc://` PULL socket. Tokio code
//! sends through the matching PUSH socket, guarded by a `std::sync::Mutex` (a
//! zmq socket may move between threads given a full memory barrier, which the
//! mutex provides), so an outgoing message wakes the pump at once and nothing
//! ever busy-polls. A `send` waits for the pump's answer, so a send to a
//! vanished peer (`ZMQ_ROUTER_MANDATORY`) or into a full queue is an error the
//! caller sees, never a silent drop or a hang. The pump never blocks on the
//! network (it sends and receives with `DONTWAIT` after polling), so that
//! answer comes within microseconds, but waiting for it costs two thread
//! switches per message. `send_nowait` skips the wait: it only queues the
//! message for the pump, which logs (and otherwise drops) a send that fails.
//! It is for messages the protocol already recovers from losing (resent
//! results, leased dispatches, heartbeats, acks that a resend asks for again).
//! Both kinds of send go through the same queue, so they keep their order.
//!
//! Incoming messages are decoded on the pump and go to a bounded tokio channel.
//! When the channel is full the pump stops reading the network, so back-pressure
//! reaches ZeroMQ's high-water mark, and the consumer's next `recv` wakes it.
//!
//! Each process has one `zmq::Context`, passed in by the caller, so the CURVE
//! ZAP handler is bound in the same context as the broker's socket.
//!
//! Encryption is optional per socket: [`Router::bind_curve`] makes the broker's
//! socket a CURVE server that admits only allowed public keys (the ZAP handler
//! of `crate::zap`), [`Dealer::connect_curve`] makes a worker's or semaphore's
//! socket its client. Plain [`Router::bind`] and [`Dealer::connect`] stay for
//! loopback and tests. A dealer's failed handshakes (a refused key, a broker
//! that speaks CURVE when we do not, or the other way round) are read from the
//! socket's monitor by its pump and logged as errors that say what to fix.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::curve::{AllowedKeys, KeyPair, PublicKey};
use crate::protocol::{self, limits, DecodeError, EncodeError, ToBroker, ToWorker};
use crate::zap::{self, Gatekeeper, LogLimit, Refusals, Severity};

mod local;

use local::LocalPeers;
pub use local::{LocalConnector, LocalLink};

/// Socket settings, each set explicitly on every network socket: ZeroMQ's own
/// defaults (infinite linger, no size limit, no heartbeats) suit none of our peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOptions {
    /// `ZMQ_LINGER`: how long unsent messages may delay closing the context.
    /// Short, because nothing depends on it: results are resent until
    /// acknowledged and a lost dispatch is recovered by its lease. `reconnect()`
    /// closes the old socket with linger 0 regardless.
    pub linger: Duration,
    /// `ZMQ_SNDHWM`, in messages per peer: a full queue makes `send` fail with [`TransportError::Full`].
    pub send_high_water_mark: i32,
    /// `ZMQ_RCVHWM`, in messages per peer: where back-pressure stops a fast sender.
    pub receive_high_water_mark: i32,
    /// `ZMQ_MAXMSGSIZE`. libzmq checks it per frame and disconnects a peer that
    /// exceeds it without telling anyone; it is set above the protocol's frame
    /// limits so a slightly oversized frame reaches the decoder and is answered
    /// with a clear error instead.
    pub message_max_bytes: i64,
    /// `ZMQ_HEARTBEAT_IVL`: ZMTP pings on an idle connection. These detect a dead
    /// TCP connection (a pulled cable, a NAT that forgot us) so a dealer
    /// reconnects and a router frees the peer; the protocol's own heartbeats
    /// decide about leases.
    pub heartbeat_interval: Duration,
    /// `ZMQ_HEARTBEAT_TIMEOUT`: silence after which this side drops the connection.
    pub heartbeat_timeout: Duration,
    /// `ZMQ_HEARTBEAT_TTL`: asks the other side to drop the connection after this much silence.
    pub heartbeat_ttl: Duration,
    /// `ZMQ_RECONNECT_IVL`: first wait before a dealer reconnects by itself.
    pub reconnect_interval: Duration,
    /// `ZMQ_RECONNECT_IVL_MAX`: the wait doubles up to this, so a fleet of
    /// workers does not hammer a broker that is down.
    pub reconnect_interval_max: Duration,
    /// `ZMQ_HANDSHAKE_IVL`: a connection must finish the ZMTP handshake within
    /// this, so a peer that connects and says nothing does not hold a slot.
    pub handshake_timeout: Duration,
    /// `ZMQ_CONNECT_TIMEOUT`: one TCP connect attempt gives up after this, then
    /// the reconnect interval applies.
    pub connect_timeout: Duration,
    /// `ZMQ_TCP_KEEPALIVE_IDLE` (whole seconds); `None` turns TCP keepalive off.
    /// Keeps firewall and NAT state alive on connections that only heartbeat.
    pub tcp_keepalive_idle: Option<Duration>,
    /// `ZMQ_TCP_KEEPALIVE_INTVL` (whole seconds).
    pub tcp_keepalive_interval: Duration,
    /// `ZMQ_TCP_KEEPALIVE_CNT`.
    pub tcp_keepalive_count: i32,
    /// Decoded messages waiting for the tokio side; beyond this the pump stops reading.
    pub incoming_capacity: usize,
    /// How long a `send` or `reconnect` waits for the pump's answer.
    pub command_timeout: Duration,
    /// How long `shutdown` (or drop) waits for the pump thread to end.
    pub shutdown_timeout: Duration,
}

impl SocketOptions {
    pub const DEFAULT: SocketOptions = SocketOptions {
        linger: Duration::from_secs(1),
        send_high_water_mark: 1000,
        receive_high_water_mark: 1000,
        message_max_bytes: (limits::FRAME_MAX_BYTES + limits::PAYLOAD_MAX_BYTES + 64 * 1024) as i64,
        heartbeat_interval: Duration::from_secs(2),
        heartbeat_timeout: Duration::from_secs(10),
        heartbeat_ttl: Duration::from_secs(10),
        reconnect_interval: Duration::from_millis(100),
        reconnect_interval_max: Duration::from_secs(5),
        handshake_timeout: crate::limits::HANDSHAKE_TIMEOUT,
        connect_timeout: Duration::from_secs(5),
        tcp_keepalive_idle: Some(Duration::from_secs(60)),
        tcp_keepalive_interval: Duration::from_secs(10),
        tcp_keepalive_count: 6,
        incoming_capacity: 1024,
        command_timeout: Duration::from_secs(5),
        shutdown_timeout: Duration::from_secs(5),
    };
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions::DEFAULT
    }
}

/// Commands queued on the inproc socket, plus wake-ups: room for a burst of
/// `send_nowait` messages (a commit's acks, a dispatch round) while the pump
/// catches up; beyond it `send_nowait` is [`TransportError::Busy`].
const COMMAND_QUEUE_MAX: i32 = 1024;
/// Answers waiting for a caller (a caller that timed out leaves one behind).
const REPLIES_MAX: usize = 16;
/// Messages the pump takes from one socket before it looks at the other.
const BATCH_MAX: usize = 256;
/// While the consumer is behind, the pump rechecks this often, in case a
/// wake-up was missed; otherwise it sleeps until something happens.
const STALLED_RECHECK_MS: i64 = 50;
/// Frames kept of one incoming message: the router's peer-id frame, the
/// protocol's frames, and one more so the decoder sees that there were too
/// many. The rest are read and dropped, so a peer sending thousands of frames
/// costs us nothing.
const ROUTER_KEEP_FRAMES: usize = 1 + limits::FRAMES_MAX + 1;
const DEALER_KEEP_FRAMES: usize = limits::FRAMES_MAX + 1;

/// A peer of the router: the routing id ZeroMQ gave its connection, or the
/// identity the dealer chose.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(Vec<u8>);

impl PeerId {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for PeerId {
    fn from(bytes: Vec<u8>) -> Self {
        PeerId(bytes)
    }
}

impl From<&[u8]> for PeerId {
    fn from(bytes: &[u8]) -> Self {
        PeerId(bytes.to_vec())
    }
}

impl fmt::Display for PeerId {
    /// Printable identities (worker names) as text, local peers as `local-N`, generated ones as hex.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if LocalPeers::is_local(self) {
            return f.write_str(&String::from_utf8_lossy(&self.0[1..]));
        }
        if !self.0.is_empty() && self.0.iter().all(|b| b.is_ascii_graphic()) {
            f.write_str(&String::from_utf8_lossy(&self.0))
        } else {
            f.write_str("0x")?;
            self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
        }
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

/// A message that reached the router: garbage arrives as an `Err`, for the
/// broker to log (rate-limited) and perhaps answer with `ToWorker::Error`.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub peer: PeerId,
    pub message: Result<ToBroker, DecodeError>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot create a ZeroMQ socket: {source}")]
    Socket { source: zmq::Error },
    #[error("cannot set socket option {option}: {source}")]
    Option { option: &'static str, source: zmq::Error },
    #[error("cannot bind {endpoint}: {source}")]
    Bind { endpoint: String, source: zmq::Error },
    #[error("cannot connect to {endpoint}: {source}")]
    Connect { endpoint: String, source: zmq::Error },
    #[error("invalid dealer identity: {reason}")]
    Identity { reason: &'static str },
    #[error("no connected peer {peer}")]
    UnknownPeer { peer: PeerId },
    #[error("the send queue is full (high-water mark reached)")]
    Full,
    #[error("the transport thread's command queue is full")]
    Busy,
    #[error("cannot send: {source}")]
    Send { source: zmq::Error },
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error("the transport thread has stopped")]
    Stopped,
    #[error("the transport thread did not answer within {waited:?}")]
    Timeout { waited: Duration },
    #[error("cannot start the transport thread: {source}")]
    Thread { source: std::io::Error },
    #[error("the transport thread panicked")]
    Panicked,
    #[error(
        "this libzmq was built without CURVE (zmq::has(\"curve\") is false), so the mesh cannot be encrypted: \
         build jobz from its workspace, whose zmq-sys/ builds libzmq with libsodium"
    )]
    NoCurve,
    #[error(
        "cannot bind the ZAP handler on {}: {source} (is another encrypted broker socket in this process?)",
        zap::ZAP_ENDPOINT
    )]
    Zap { source: zmq::Error },
    #[error("cannot watch the socket's handshakes: {source}")]
    Monitor { source: zmq::Error },
}

/// The broker's side of CURVE: its own key pair, and the public keys of the
/// workers and semaphores it admits.
#[derive(Debug, Clone)]
pub struct CurveServer {
    pub key: KeyPair,
    pub allowed: AllowedKeys,
}

/// A worker's or semaphore's side of CURVE: its own key pair, and the broker's public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurveClient {
    pub key: KeyPair,
    pub broker: PublicKey,
}

/// Refuses to go on without CURVE in libzmq: an "encrypted" socket must never
/// quietly be plain text. Callers may ask early, before they change anything.
pub fn require_curve() -> Result<(), TransportError> {
    match zmq::has("curve") {
        Some(true) => Ok(()),
        _ => Err(TransportError::NoCurve),
    }
}

// ---------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------

/// The broker's socket: a ROUTER bound to an endpoint, serving many peers.
pub struct Router {
    pump: Pump<Incoming>,
    /// Peers in this process ([`Router::local_connector`]), beside the network's.
    local: Arc<LocalPeers>,
    endpoint: String,
    /// The ZAP handler of an encrypted router; after `pump`, so it outlives the
    /// socket it answers for.
    _gatekeeper: Option<Gatekeeper>,
    refusals: Arc<Refusals>,
}

impl Router {
    /// Binds `endpoint` in plain text; `tcp://127.0.0.1:0` picks a free port
    /// (see [`Router::local_endpoint`]).
    pub fn bind(ctx: &zmq::Context, endpoint: &str, options: &SocketOptions) -> Result<Router, TransportError> {
        Router::bind_with(ctx, endpoint, options, None)
    }

    /// Binds `endpoint` as a CURVE server: every connection is encrypted, and
    /// only peers whose public key is in `server.allowed` get in. The ZAP
    /// handler that decides is bound in `ctx` before the socket binds (so no
    /// handshake is ever decided without it), and only one encrypted router
    /// can live in a context. Refused with [`TransportError::NoCurve`] when
    /// libzmq has no CURVE.
    pub fn bind_curve(
        ctx: &zmq::Context,
        endpoint: &str,
        options: &SocketOptions,
        server: CurveServer,
    ) -> Result<Router, TransportError> {
        require_curve()?;
        Router::bind_with(ctx, endpoint, options, Some(server))
    }

    fn bind_with(
        ctx: &zmq::Context,
        endpoint: &str,
        options: &SocketOptions,
        curve: Option<CurveServer>,
    ) -> Result<Router, TransportError> {
        let net = ctx.socket(zmq::ROUTER).map_err(|source| TransportError::Socket { source })?;
        configure(&net, options)?;
        // A send to a peer that is gone must be an error the broker sees, not a silent drop.
        set("ZMQ_ROUTER_MANDATORY", net.set_router_mandatory(true))?;
        // A worker that reconnects with the same identity takes over its old
        // connection, even before the heartbeat has declared the old one dead.
        set("ZMQ_ROUTER_HANDOVER", net.set_router_handover(true))?;
        let refusals = Arc::new(Refusals::default());
        let gatekeeper = match curve {
            None => None,
            Some(server) => {
                set("ZMQ_CURVE_SERVER", net.set_curve_server(true))?;
                set("ZMQ_CURVE_SECRETKEY", net.set_curve_secretkey(server.key.secret().as_bytes()))?;
                set("ZMQ_ZAP_DOMAIN", net.set_zap_domain(zap::ZAP_DOMAIN))?;
                Some(Gatekeeper::start(ctx, &net, server.allowed, Arc::clone(&refusals))?)
            }
        };
        net.bind(endpoint).map_err(|source| TransportError::Bind { endpoint: endpoint.to_owned(), source })?;
        let local = match net.get_last_endpoint() {
            Ok(Ok(local)) => local,
            _ => endpoint.to_owned(),
        };
        let (pump, incoming) =
            Pump::start(ctx, "jobz-router", net, options, ROUTER_KEEP_FRAMES, router_incoming, None)?;
        let peers = Arc::new(LocalPeers::new(incoming, usize::try_from(options.send_high_water_mark).unwrap_or(1)));
        Ok(Router { pump, local: peers, endpoint: local, _gatekeeper: gatekeeper, refusals })
    }

    /// Whether this router is a CURVE server.
    pub fn is_encrypted(&self) -> bool {
        self._gatekeeper.is_some()
    }

    /// What the ZAP handler and the handshake monitor refused so far (zeros for a plain router).
    pub fn refusals(&self) -> Arc<Refusals> {
        Arc::clone(&self.refusals)
    }

    /// The endpoint actually bound: with port 0, the port the system chose.
    pub fn local_endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Makes links for peers in this process (`jobz up`'s workers): they
    /// reach the broker's loop through this router without ZeroMQ, and the
    /// loop answers them through it like any peer (see `transport::local`).
    pub fn local_connector(&self) -> LocalConnector {
        LocalConnector::new(Arc::clone(&self.local))
    }

    /// Sends `message` to `peer`; an unknown or vanished peer is
    /// [`TransportError::UnknownPeer`], a peer whose queue is full is [`TransportError::Full`].
    pub fn send(&self, peer: &PeerId, message: &ToWorker) -> Result<(), TransportError> {
        if LocalPeers::is_local(peer) {
            return self.local.send(peer, message);
        }
        let frames = protocol::try_encode(message)?;
        let mut command = Vec::with_capacity(1 + frames.len());
        command.push(peer.0.clone());
        command.extend(frames);
        self.pump.call(Tag::Send, command).map_err(|e| match e {
            // ROUTER_MANDATORY: the peer is not (or no longer) connected.
            TransportError::Send { source: zmq::Error::EHOSTUNREACH } => {
                TransportError::UnknownPeer { peer: peer.clone() }
            }
            e => e,
        })
    }

    /// Queues `message` for `peer` without waiting for the pump: an unknown
    /// peer or a full queue is not reported, only logged by the pump (and
    /// counted in [`Router::failed_sends`]). Errors here are local: the message
    /// does not encode, the pump has stopped, or its command queue is full
    /// ([`TransportError::Busy`]).
    pub fn send_nowait(&self, peer: &PeerId, message: &ToWorker) -> Result<(), TransportError> {
        if LocalPeers::is_local(peer) {
            // Never waits either way; a local peer that is gone or behind is only logged, like a network one.
            if let Err(e) = self.local.send(peer, message) {
                self.pump.failed_posts.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, error = %e, "a message to a local peer was dropped");
            }
            return Ok(());
        }
        let frames = protocol::try_encode(message)?;
        let mut command = Vec::with_capacity(1 + frames.len());
        command.push(peer.0.clone());
        command.extend(frames);
        self.pump.post(command)
    }

    /// How many `send_nowait` messages the pump could not send so far.
    pub fn failed_sends(&self) -> u64 {
        self.pump.failed_posts.load(Ordering::Relaxed)
    }

    /// The next message from any peer; `None` once the transport has stopped. Cancel-safe.
    pub async fn recv(&self) -> Option<Incoming> {
        self.pump.recv().await
    }

    /// Stops the pump thread and joins it (within `shutdown_timeout`). Dropping does the same.
    pub fn shutdown(mut self) -> Result<(), TransportError> {
        self.pump.stop()
    }
}

fn router_incoming(frames: Vec<Vec<u8>>) -> Incoming {
    let mut frames = frames.into_iter();
    // A ROUTER always prepends the peer's routing id, so it is never missing.
    let peer = PeerId(frames.next().unwrap_or_default());
    let rest: Vec<Vec<u8>> = frames.collect();
    Incoming { peer, message: protocol::decode_to_broker(&rest) }
}

// ---------------------------------------------------------------------------
// Dealer
// ---------------------------------------------------------------------------

/// A worker's or semaphore's socket: a DEALER connected out to the broker.
pub struct Dealer {
    pump: Pump<Result<ToWorker, DecodeError>>,
    endpoint: String,
}

impl Dealer {
    /// Connects to `endpoint`. ZeroMQ connects in the background and keeps
    /// reconnecting, so this succeeds while the broker is down; messages sent
    /// meanwhile wait in the queue (up to the high-water mark).
    ///
    /// `identity` (1 to 255 bytes, not starting with a zero byte) gives the
    /// broker a stable [`PeerId`] across reconnects; without it ZeroMQ makes up
    /// a new one per connection.
    pub fn connect(
        ctx: &zmq::Context,
        endpoint: &str,
        options: &SocketOptions,
        identity: Option<Vec<u8>>,
    ) -> Result<Dealer, TransportError> {
        Dealer::connect_with(ctx, endpoint, options, identity, None)
    }

    /// [`Dealer::connect`] as a CURVE client of the broker whose public key is
    /// `client.broker`, known by our key pair `client.key`. Every socket it
    /// makes (also on [`Dealer::reconnect`]) has these keys before it connects.
    /// Refused with [`TransportError::NoCurve`] when libzmq has no CURVE.
    pub fn connect_curve(
        ctx: &zmq::Context,
        endpoint: &str,
        options: &SocketOptions,
        identity: Option<Vec<u8>>,
        client: CurveClient,
    ) -> Result<Dealer, TransportError> {
        require_curve()?;
        Dealer::connect_with(ctx, endpoint, options, identity, Some(client))
    }

    fn connect_with(
        ctx: &zmq::Context,
        endpoint: &str,
        options: &SocketOptions,
        identity: Option<Vec<u8>>,
        curve: Option<CurveClient>,
    ) -> Result<Dealer, TransportError> {
        match identity.as_deref() {
            Some([]) => return Err(TransportError::Identity { reason: "empty" }),
            Some([0, ..]) => return Err(TransportError::Identity { reason: "starts with a zero byte" }),
            Some(id) if id.len() > 255 => return Err(TransportError::Identity { reason: "longer than 255 bytes" }),
            _ => {}
        }
        let redial =
            Redial { ctx: ctx.clone(), endpoint: endpoint.to_owned(), options: options.clone(), identity, curve };
        let net = redial.socket()?;
        let monitor = redial.watch(&net);
        redial.connect(&net)?;
        let (pump, _) = Pump::start(
            ctx,
            "jobz-dealer",
            net,
            options,
            DEALER_KEEP_FRAMES,
            dealer_incoming,
            Some(Dialer { redial, monitor, handshake_logs: BTreeMap::new(), refused: false }),
        )?;
        Ok(Dealer { pump, endpoint: endpoint.to_owned() })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Queues `message` for the broker; a full queue is [`TransportError::Full`].
    pub fn send(&self, message: &ToBroker) -> Result<(), TransportError> {
        let frames = protocol::try_encode(message)?;
        self.pump.call(Tag::Send, frames)
    }

    /// Queues `message` for the broker without waiting for the pump: a full
    /// queue is not reported, only logged by the pump (and counted in
    /// [`Dealer::failed_sends`]). Errors here are local: the message does not
    /// encode, the pump has stopped, or its command queue is full ([`TransportError::Busy`]).
    pub fn send_nowait(&self, message: &ToBroker) -> Result<(), TransportError> {
        self.pump.post(protocol::try_encode(message)?)
    }

    /// How many `send_nowait` messages the pump could not send so far.
    pub fn failed_sends(&self) -> u64 {
        self.pump.failed_posts.load(Ordering::Relaxed)
    }

    /// The next message from the broker; `None` once the transport has stopped. Cancel-safe.
    pub async fn recv(&self) -> Option<Result<ToWorker, DecodeError>> {
        self.pump.recv().await
    }

    /// Closes the socket and connects a fresh one (Paranoid Pirate: after a
    /// heartbeat timeout, frames queued on the old socket are stale, so they are
    /// dropped rather than delivered late). Messages already received stay in
    /// the channel for `recv`. Send `Hello` again afterwards.
    pub fn reconnect(&self) -> Result<(), TransportError> {
        self.pump.call(Tag::Reconnect, Vec::new())
    }

    /// Stops the pump thread and joins it (within `shutdown_timeout`). Dropping does the same.
    pub fn shutdown(mut self) -> Result<(), TransportError> {
        self.pump.stop()
    }
}

/// How a worker or semaphore reaches its broker: a [`Dealer`] over ZeroMQ,
/// or a [`LocalLink`] to a broker in the same process (`jobz up`). Both carry
/// the same messages with the same calls.
pub enum Link {
    Net(Dealer),
    Local(LocalLink),
}

impl Link {
    /// A worker's or semaphore's link to its broker: in-process through
    /// `local` when the broker lives in this process, else a dealer connected
    /// to `endpoint`, as a CURVE client when `curve` is given.
    pub fn connect(
        ctx: &zmq::Context,
        endpoint: &str,
        options: &SocketOptions,
        curve: Option<&CurveClient>,
        local: Option<&LocalConnector>,
    ) -> Result<Link, TransportError> {
        Ok(match (local, curve) {
            (Some(local), _) => Link::Local(local.connect()),
            (None, Some(curve)) => Link::Net(Dealer::connect_curve(ctx, endpoint, options, None, curve.clone())?),
            (None, None) => Link::Net(Dealer::connect(ctx, endpoint, options, None)?),
        })
    }

    /// Queues `message` and waits for the transport's answer (a local link answers at once).
    pub fn send(&self, message: &ToBroker) -> Result<(), TransportError> {
        match self {
            Link::Net(dealer) => dealer.send(message),
            Link::Local(link) => link.send_nowait(message),
        }
    }

    /// Queues `message` without waiting; see [`Dealer::send_nowait`].
    pub fn send_nowait(&self, message: &ToBroker) -> Result<(), TransportError> {
        match self {
            Link::Net(dealer) => dealer.send_nowait(message),
            Link::Local(link) => link.send_nowait(message),
        }
    }

    /// The next message from the broker. Cancel-safe.
    pub async fn recv(&self) -> Option<Result<ToWorker, DecodeError>> {
        match self {
            Link::Net(dealer) => dealer.recv().await,
            Link::Local(link) => link.recv().await,
        }
    }

    /// A fresh connection (Paranoid Pirate). A local link has no connection
    /// to lose: the Hello that follows is all it needs.
    pub fn reconnect(&self) -> Result<(), TransportError> {
        match self {
            Link::Net(dealer) => dealer.reconnect(),
            Link::Local(_) => Ok(()),
        }
    }

    /// Whether this link stays in the process.
    pub fn is_local(&self) -> bool {
        matches!(self, Link::Local(_))
    }
}

/// A dealer's pump's own state: how to make its socket again, and the monitor
/// of the current socket's handshakes.
struct Dialer {
    redial: Redial,
    monitor: Option<zmq::Socket>,
    /// Failed handshakes repeat on every reconnect; each kind is logged once per
    /// interval, so a new kind of failure shows at once.
    handshake_logs: BTreeMap<(u16, u32), LogLimit>,
    /// The broker refused this socket for good (a key or mechanism it will not
    /// take): libzmq stops trying, so sends fail until the next reconnect, and
    /// their failures are no news.
    refused: bool,
}

/// Kinds of handshake failure remembered for rate-limiting (there are a handful).
const HANDSHAKE_LOG_KINDS_MAX: usize = 16;

impl Dialer {
    /// Logs a failed handshake seen by the monitor, at most once per interval per kind.
    fn explain(&mut self, frames: &[Vec<u8>]) {
        let Some((event, value)) = zap::parse_event(frames) else { return };
        let redial = &self.redial;
        let own_key = redial.curve.as_ref().map(|c| &c.key.public);
        let Some((severity, text)) = zap::describe_client_failure(event, value, &redial.endpoint, own_key) else {
            return;
        };
        if severity == Severity::Error {
            self.refused = true;
        }
        // Protocol errors differ by code; other events by event alone (their value is an errno).
        let kind =
            if event == zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL.to_raw() { (event, value) } else { (event, 0) };
        if self.handshake_logs.len() >= HANDSHAKE_LOG_KINDS_MAX && !self.handshake_logs.contains_key(&kind) {
            self.handshake_logs.clear();
        }
        let log = self
            .handshake_logs
            .entry(kind)
            .or_insert_with(|| LogLimit::new(crate::limits::HANDSHAKE_FAILURE_LOG_INTERVAL));
        let Some(suppressed) = log.allow(Instant::now()) else { return };
        match severity {
            Severity::Error => tracing::error!(suppressed, "{text}"),
            Severity::Warn => tracing::warn!(suppressed, "{text}"),
        }
    }
}

/// What it takes to make a dealer's socket again.
struct Redial {
    ctx: zmq::Context,
    endpoint: String,
    options: SocketOptions,
    identity: Option<Vec<u8>>,
    curve: Option<CurveClient>,
}

impl Redial {
    fn socket(&self) -> Result<zmq::Socket, TransportError> {
        let net = self.ctx.socket(zmq::DEALER).map_err(|source| TransportError::Socket { source })?;
        configure(&net, &self.options)?;
        // Queue while the broker is unreachable, so a Hello sent right after
        // connecting is delivered once the connection is up.
        set("ZMQ_IMMEDIATE", net.set_immediate(false))?;
        if let Some(id) = &self.identity {
            set("ZMQ_ROUTING_ID", net.set_identity(id))?;
        }
        if let Some(curve) = &self.curve {
            set("ZMQ_CURVE_SERVERKEY", net.set_curve_serverkey(curve.broker.as_bytes()))?;
            set("ZMQ_CURVE_PUBLICKEY", net.set_curve_publickey(curve.key.public.as_bytes()))?;
            set("ZMQ_CURVE_SECRETKEY", net.set_curve_secretkey(curve.key.secret().as_bytes()))?;
        }
        Ok(net)
    }

    /// A monitor of `net`'s failed handshakes, for the pump to explain them.
    /// Without one the dealer still works; it only cannot say why it is refused.
    fn watch(&self, net: &zmq::Socket) -> Option<zmq::Socket> {
        match zap::watch_handshakes(&self.ctx, net) {
            Ok(watch) => Some(watch),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the connection's handshakes; a refusal will not be explained");
                None
            }
        }
    }

    fn connect(&self, net: &zmq::Socket) -> Result<(), TransportError> {
        let endpoint = &self.endpoint;
        net.connect(endpoint).map_err(|source| TransportError::Connect { endpoint: endpoint.clone(), source })
    }

    /// Closes `old` and waits (at most `wait`) until libzmq has really destroyed
    /// it. zmq_close only hands a socket to the reaper thread; until the reaper
    /// is done, the old socket's session may still reconnect and deliver stale
    /// frames, or, with the same identity, take the identity over from the new
    /// connection at the router and lose what the new one sent. libzmq reports
    /// `MONITOR_STOPPED` when it destroys the socket, after its sessions ended.
    fn close(&self, old: zmq::Socket, wait: Duration) {
        let address = format!("inproc://jobz-close-{}", NEXT_PUMP.fetch_add(1, Ordering::Relaxed));
        let stopped = zmq::SocketEvent::MONITOR_STOPPED.to_raw();
        let watch = old.monitor(&address, i32::from(stopped)).and_then(|()| {
            let watch = self.ctx.socket(zmq::PAIR)?;
            watch.set_linger(0)?;
            watch.set_rcvtimeo(ms(wait))?;
            watch.connect(&address)?;
            Ok(watch)
        });
        // Frames still queued on the old socket are stale: drop them now.
        if let Err(e) = old.set_linger(0) {
            tracing::debug!(error = %e, "could not shorten linger on the old socket");
        }
        drop(old);
        let watch = match watch {
            Ok(watch) => watch,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the old socket close; not waiting for it");
                return;
            }
        };
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match watch.recv_multipart(0) {
                Ok(event) if event.first().is_some_and(|f| f.get(..2) == Some(&stopped.to_ne_bytes()[..])) => return,
                Ok(_) | Err(zmq::Error::EINTR) => continue,
                Err(_) => break,
            }
        }
        tracing::warn!(?wait, "the old socket did not close in time; reconnecting anyway");
    }
}

fn dealer_incoming(frames: Vec<Vec<u8>>) -> Result<ToWorker, DecodeError> {
    protocol::decode_to_worker(&frames)
}

// ---------------------------------------------------------------------------
// Socket options
// ---------------------------------------------------------------------------

fn set(option: &'static str, result: zmq::Result<()>) -> Result<(), TransportError> {
    result.map_err(|source| TransportError::Option { option, source })
}

/// Milliseconds for a zmq option, saturating rather than wrapping.
fn ms(duration: Duration) -> i32 {
    i32::try_from(duration.as_millis()).unwrap_or(i32::MAX)
}

fn secs(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX)
}

fn configure(socket: &zmq::Socket, o: &SocketOptions) -> Result<(), TransportError> {
    set("ZMQ_LINGER", socket.set_linger(ms(o.linger)))?;
    set("ZMQ_SNDHWM", socket.set_sndhwm(o.send_high_water_mark))?;
    set("ZMQ_RCVHWM", socket.set_rcvhwm(o.receive_high_water_mark))?;
    set("ZMQ_MAXMSGSIZE", socket.set_maxmsgsize(o.message_max_bytes))?;
    // The pump only calls send and recv after zmq::poll said it may, with
    // DONTWAIT; a zero timeout makes that explicit.
    set("ZMQ_SNDTIMEO", socket.set_sndtimeo(0))?;
    set("ZMQ_RCVTIMEO", socket.set_rcvtimeo(0))?;
    set("ZMQ_HEARTBEAT_IVL", socket.set_heartbeat_ivl(ms(o.heartbeat_interval)))?;
    set("ZMQ_HEARTBEAT_TIMEOUT", socket.set_heartbeat_timeout(ms(o.heartbeat_timeout)))?;
    set("ZMQ_HEARTBEAT_TTL", socket.set_heartbeat_ttl(ms(o.heartbeat_ttl)))?;
    set("ZMQ_RECONNECT_IVL", socket.set_reconnect_ivl(ms(o.reconnect_interval)))?;
    set("ZMQ_RECONNECT_IVL_MAX", socket.set_reconnect_ivl_max(ms(o.reconnect_interval_max)))?;
    set("ZMQ_HANDSHAKE_IVL", socket.set_handshake_ivl(ms(o.handshake_timeout)))?;
    set("ZMQ_CONNECT_TIMEOUT", socket.set_connect_timeout(ms(o.connect_timeout)))?;
    match o.tcp_keepalive_idle {
        Some(idle) => {
            set("ZMQ_TCP_KEEPALIVE", socket.set_tcp_keepalive(1))?;
            set("ZMQ_TCP_KEEPALIVE_IDLE", socket.set_tcp_keepalive_idle(secs(idle)))?;
            set("ZMQ_TCP_KEEPALIVE_INTVL", socket.set_tcp_keepalive_intvl(secs(o.tcp_keepalive_interval)))?;
            set("ZMQ_TCP_KEEPALIVE_CNT", socket.set_tcp_keepalive_cnt(o.tcp_keepalive_count))?;
        }
        None => set("ZMQ_TCP_KEEPALIVE", socket.set_tcp_keepalive(0))?,
    }
    Ok(())
}

/// The inproc pair between tokio and the pump: process-local, so no heartbeats
/// or size limits; linger 0 because the pump reads until it is told to stop.
fn configure_inproc(socket: &zmq::Socket) -> Result<(), TransportError> {
    set("ZMQ_LINGER", socket.set_linger(0))?;
    set("ZMQ_SNDHWM", socket.set_sndhwm(COMMAND_QUEUE_MAX))?;
    set("ZMQ_RCVHWM", socket.set_rcvhwm(COMMAND_QUEUE_MAX))?;
    set("ZMQ_SNDTIMEO", socket.set_sndtimeo(0))?;
    set("ZMQ_RCVTIMEO", socket.set_rcvtimeo(0))
}

// ---------------------------------------------------------------------------
// The pump: one thread per network socket
// ---------------------------------------------------------------------------

/// What tokio asks of the pump. The first frame of a command is the tag and
/// an 8-byte sequence number that its answer carries back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    /// The remaining frames go to the network as one message.
    Send = 1,
    /// Replace the dealer's socket with a fresh one.
    Reconnect = 2,
    /// The consumer made room in the incoming channel.
    Wake = 3,
    Stop = 4,
    /// Like `Send`, but nobody waits for the answer: a failure is logged and counted.
    Post = 5,
}

type Reply = (u64, Result<(), TransportError>);

/// The tokio side of the inproc pair, with the pump's answers.
struct Commander {
    push: zmq::Socket,
    replies: std_mpsc::Receiver<Reply>,
    sequence: u64,
}

struct Pump<In> {
    commander: Mutex<Commander>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<In>>,
    /// Set by the pump when the incoming channel was full; the consumer wakes it.
    stalled: Arc<AtomicBool>,
    /// Set by `stop` when its `Stop` command found the command queue full;
    /// checked by the pump on every turn, so that stop is not lost.
    stopping: Arc<AtomicBool>,
    /// `Post` commands the pump could not send.
    failed_posts: Arc<AtomicU64>,
    /// The pump thread and what tells of its end; in a mutex only because a
    /// `Receiver` is not `Sync` and a `Router` is shared between tasks.
    thread: Mutex<Option<(JoinHandle<()>, std_mpsc::Receiver<()>)>>,
    command_timeout: Duration,
    shutdown_timeout: Duration,
}

static NEXT_PUMP: AtomicU64 = AtomicU64::new(0);

impl<In: Send + 'static> Pump<In> {
    /// Starts the pump thread on `net`. Also returns a sender into the
    /// incoming channel, for messages that arrive beside the network's (a
    /// router's local peers); dropping it leaves the channel to the pump.
    fn start(
        ctx: &zmq::Context,
        thread_name: &str,
        net: zmq::Socket,
        options: &SocketOptions,
        keep_frames: usize,
        decode: fn(Vec<Vec<u8>>) -> In,
        dialer: Option<Dialer>,
    ) -> Result<(Pump<In>, mpsc::Sender<In>), TransportError> {
        let address = format!("inproc://jobz-pump-{}", NEXT_PUMP.fetch_add(1, Ordering::Relaxed));
        let pull = ctx.socket(zmq::PULL).map_err(|source| TransportError::Socket { source })?;
        configure_inproc(&pull)?;
        pull.bind(&address).map_err(|source| TransportError::Bind { endpoint: address.clone(), source })?;
        let push = ctx.socket(zmq::PUSH).map_err(|source| TransportError::Socket { source })?;
        configure_inproc(&push)?;
        push.connect(&address).map_err(|source| TransportError::Connect { endpoint: address.clone(), source })?;

        let (incoming_tx, incoming_rx) = mpsc::channel(options.incoming_capacity.max(1));
        let beside = incoming_tx.clone();
        let (reply_tx, reply_rx) = std_mpsc::sync_channel(REPLIES_MAX);
        // Never sent on: the pump drops it when it ends, which is what `stop` waits for.
        let (exited_tx, exited_rx) = std_mpsc::sync_channel(0);
        let stalled = Arc::new(AtomicBool::new(false));
        let stopping = Arc::new(AtomicBool::new(false));
        let failed_posts = Arc::new(AtomicU64::new(0));
        let owner = Owner {
            stopping: Arc::clone(&stopping),
            failed_posts: Arc::clone(&failed_posts),
            net,
            pull,
            incoming: incoming_tx,
            replies: reply_tx,
            stalled: Arc::clone(&stalled),
            pending: None,
            keep_frames,
            decode,
            dialer,
            close_wait: options.command_timeout / 2,
            _exited: exited_tx,
        };
        let handle = std::thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn(move || owner.run())
            .map_err(|source| TransportError::Thread { source })?;
        let pump = Pump {
            commander: Mutex::new(Commander { push, replies: reply_rx, sequence: 0 }),
            incoming: tokio::sync::Mutex::new(incoming_rx),
            stalled,
            stopping,
            failed_posts,
            thread: Mutex::new(Some((handle, exited_rx))),
            command_timeout: options.command_timeout,
            shutdown_timeout: options.shutdown_timeout,
        };
        Ok((pump, beside))
    }
}

impl<In> Pump<In> {
    /// Runs one command on the pump and waits (at most `command_timeout`) for its answer.
    fn call(&self, tag: Tag, frames: Vec<Vec<u8>>) -> Result<(), TransportError> {
        // A panic elsewhere while holding the lock leaves the commander intact: recover it.
        let mut commander = self.commander.lock().unwrap_or_else(PoisonError::into_inner);
        commander.sequence += 1;
        let sequence = commander.sequence;
        // Answers to calls that timed out are stale now.
        while commander.replies.try_recv().is_ok() {}
        let head = command_head(tag, sequence);
        refresh(&commander.push);
        // EAGAIN here means the pump is gone or not reading commands.
        commander
            .push
            .send_multipart(std::iter::once(head).chain(frames), zmq::DONTWAIT)
            .map_err(|_| TransportError::Stopped)?;
        let deadline = Instant::now() + self.command_timeout;
        loop {
            match commander.replies.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok((answered, result)) if answered == sequence => return result,
                Ok(_) => continue,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    return Err(TransportError::Timeout { waited: self.command_timeout })
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return Err(TransportError::Stopped),
            }
        }
    }

    /// Queues a `Post` command: the frames go to the network, nobody waits.
    fn post(&self, frames: Vec<Vec<u8>>) -> Result<(), TransportError> {
        let queued = {
            let commander = self.commander.lock().unwrap_or_else(PoisonError::into_inner);
            send_refreshing(&commander.push, std::iter::once(command_head(Tag::Post, 0)).chain(frames).collect())
        };
        match queued {
            Ok(()) => Ok(()),
            Err(_) if self.running() => Err(TransportError::Busy),
            Err(_) => Err(TransportError::Stopped),
        }
    }

    /// Whether the pump thread is still there.
    fn running(&self) -> bool {
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner);
        thread.as_ref().is_some_and(|(_, exited)| matches!(exited.try_recv(), Err(std_mpsc::TryRecvError::Empty)))
    }

    /// A command without an answer. Failing to queue it is fine: it means the
    /// pump is gone (nothing to wake or stop) or already has commands queued
    /// (it is awake).
    fn signal(&self, tag: Tag) -> bool {
        let commander = self.commander.lock().unwrap_or_else(PoisonError::into_inner);
        refresh(&commander.push);
        match commander.push.send(command_head(tag, 0), zmq::DONTWAIT) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(?tag, error = %e, "transport signal not queued");
                false
            }
        }
    }

    async fn recv(&self) -> Option<In> {
        let item = self.incoming.lock().await.recv().await;
        // Pairs with the fence in `Owner::deliver`: either the pump sees the
        // room this recv made, or this load sees that the pump stalled.
        fence(Ordering::SeqCst);
        if item.is_some() && self.stalled.swap(false, Ordering::SeqCst) {
            self.signal(Tag::Wake);
        }
        item
    }

    fn stop(&mut self) -> Result<(), TransportError> {
        let thread = self.thread.get_mut().unwrap_or_else(PoisonError::into_inner).take();
        let Some((handle, exited)) = thread else {
            return Ok(());
        };
        // Normally the Stop command queues behind the sends before it, which go out first.
        if !self.signal(Tag::Stop) {
            self.stopping.store(true, Ordering::SeqCst);
        }
        match exited.recv_timeout(self.shutdown_timeout) {
            Ok(()) | Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                handle.join().map_err(|_| TransportError::Panicked)
            }
            // The thread is left running, detached; better than hanging the caller.
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(TransportError::Timeout { waited: self.shutdown_timeout }),
        }
    }
}

impl<In> Drop for Pump<In> {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "transport thread did not stop cleanly");
        }
    }
}

/// Makes `socket` process its pending internal commands before a `DONTWAIT`
/// send. libzmq learns that the reader made room in a pipe through such
/// commands, but a send processes them at most once a millisecond; in a burst
/// of sends the socket would see a full pipe that is in fact empty, and a
/// send would fail with EAGAIN for nothing. Reading `ZMQ_EVENTS` processes them
/// at once (it is cheap: a non-blocking look at the socket's mailbox).
fn refresh(socket: &zmq::Socket) {
    if let Err(e) = socket.get_events() {
        tracing::debug!(error = %e, "could not refresh the socket's state");
    }
}

/// A `DONTWAIT` send that refreshes the socket's state (see [`refresh`]) only
/// when the pipe looks full: refreshing costs a system call, and the pipe is
/// almost never full. A message that fails with EAGAIN was not queued, so the
/// retry cannot send it twice.
fn send_refreshing(socket: &zmq::Socket, frames: Vec<Vec<u8>>) -> zmq::Result<()> {
    if frames.is_empty() {
        return Ok(());
    }
    let last = frames.len() - 1;
    // Frame by frame, so that the frames survive a first EAGAIN, which can only
    // come on the first frame (the rest of a message always follows).
    for (i, frame) in frames.iter().enumerate() {
        let flags = if i < last { zmq::DONTWAIT | zmq::SNDMORE } else { zmq::DONTWAIT };
        match socket.send(&frame[..], flags) {
            Ok(()) => {}
            Err(zmq::Error::EAGAIN) if i == 0 => {
                refresh(socket);
                socket.send(&frame[..], flags)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn command_head(tag: Tag, sequence: u64) -> Vec<u8> {
    let mut head = Vec::with_capacity(9);
    head.push(tag as u8);
    head.extend_from_slice(&sequence.to_le_bytes());
    head
}

fn parse_head(head: &[u8]) -> Option<(Tag, u64)> {
    let (&tag, sequence) = head.split_first()?;
    let tag = match tag {
        1 => Tag::Send,
        2 => Tag::Reconnect,
        3 => Tag::Wake,
        4 => Tag::Stop,
        5 => Tag::Post,
        _ => return None,
    };
    Some((tag, u64::from_le_bytes(sequence.try_into().ok()?)))
}

/// The pump thread's state: it alone touches `net` and `pull`.
struct Owner<In> {
    net: zmq::Socket,
    pull: zmq::Socket,
    incoming: mpsc::Sender<In>,
    replies: std_mpsc::SyncSender<Reply>,
    stalled: Arc<AtomicBool>,
    stopping: Arc<AtomicBool>,
    failed_posts: Arc<AtomicU64>,
    /// A decoded message the full channel did not take yet; while it waits, the
    /// network is not read.
    pending: Option<In>,
    keep_frames: usize,
    decode: fn(Vec<Vec<u8>>) -> In,
    /// Makes a fresh network socket and explains failed handshakes (dealers only).
    dialer: Option<Dialer>,
    /// How long `reconnect` waits for the old socket to be destroyed; half the
    /// caller's wait, so the caller still gets an answer.
    close_wait: Duration,
    _exited: std_mpsc::SyncSender<()>,
}

impl<In> Owner<In> {
    fn run(mut self) {
        tracing::debug!("transport pump started");
        loop {
            if self.stopping.load(Ordering::SeqCst) || !self.deliver() {
                break;
            }
            let listening = self.pending.is_none();
            let monitor = self.dialer.as_ref().and_then(|d| d.monitor.as_ref());
            let (commands, network, handshakes) = {
                let network_events = if listening { zmq::POLLIN } else { zmq::PollEvents::empty() };
                let mut items = vec![self.pull.as_poll_item(zmq::POLLIN), self.net.as_poll_item(network_events)];
                if let Some(monitor) = monitor {
                    items.push(monitor.as_poll_item(zmq::POLLIN));
                }
                match zmq::poll(&mut items, if listening { -1 } else { STALLED_RECHECK_MS }) {
                    Ok(_) => {
                        (items[0].is_readable(), items[1].is_readable(), items.get(2).is_some_and(|i| i.is_readable()))
                    }
                    Err(zmq::Error::EINTR) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "transport poll failed; stopping");
                        break;
                    }
                }
            };
            if commands && !self.commands() {
                break;
            }
            if network && !self.receive() {
                break;
            }
            if handshakes {
                self.handshake_events();
            }
        }
        tracing::debug!("transport pump stopped");
    }

    /// Hands the pending message to tokio if there is room. False once nobody listens.
    fn deliver(&mut self) -> bool {
        let Some(item) = self.pending.take() else {
            return true;
        };
        let item = match self.incoming.try_send(item) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(item)) => item,
        };
        // Announce the stall, then look again: the consumer may have made room
        // before it could see the flag (see the fence in `Pump::recv`).
        self.stalled.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        match self.incoming.try_send(item) {
            Ok(()) => {
                self.stalled.store(false, Ordering::SeqCst);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(item)) => {
                self.pending = Some(item);
                true
            }
        }
    }

    /// Runs queued commands. False on Stop or when the inproc socket fails.
    fn commands(&mut self) -> bool {
        for _ in 0..BATCH_MAX {
            let mut frames = match self.pull.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => frames,
                Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR) => return true,
                Err(e) => {
                    tracing::error!(error = %e, "transport command socket failed; stopping");
                    return false;
                }
            };
            if frames.is_empty() {
                continue;
            }
            let Some((tag, sequence)) = parse_head(&frames.remove(0)) else {
                tracing::error!("malformed transport command ignored (a bug)");
                continue;
            };
            let result = match tag {
                Tag::Stop => return false,
                Tag::Wake => continue, // `deliver` at the top of the loop does the work
                Tag::Send => self.send(frames),
                Tag::Reconnect => self.reconnect(),
                Tag::Post => {
                    if let Err(e) = self.send(frames) {
                        self.failed_posts.fetch_add(1, Ordering::Relaxed);
                        // Unknown peers are routine (heartbeats to a worker that just left).
                        let refused = self.dialer.as_ref().is_some_and(|d| d.refused);
                        match e {
                            // A refused connection (logged as an error already) takes nothing until the reconnect.
                            TransportError::Full if refused => {
                                tracing::debug!("a message was dropped: the broker refused this connection")
                            }
                            TransportError::Full => tracing::warn!("a message was dropped: the send queue is full"),
                            e => tracing::debug!(error = %e, "a message was dropped"),
                        }
                    }
                    continue;
                }
            };
            // A full reply queue means callers gave up on their answers long ago.
            if self.replies.try_send((sequence, result)).is_err() {
                tracing::debug!(sequence, "transport answer dropped; its caller timed out");
            }
        }
        true
    }

    fn send(&self, frames: Vec<Vec<u8>>) -> Result<(), TransportError> {
        send_refreshing(&self.net, frames).map_err(|source| match source {
            zmq::Error::EAGAIN => TransportError::Full,
            source => TransportError::Send { source },
        })
    }

    /// Paranoid Pirate: after a heartbeat timeout, a fresh socket. The old one
    /// is destroyed before the new one connects, so nothing of it survives.
    fn reconnect(&mut self) -> Result<(), TransportError> {
        let Some(dialer) = &mut self.dialer else {
            return Err(TransportError::Send { source: zmq::Error::ENOTSUP });
        };
        let fresh = dialer.redial.socket()?;
        // Watched before it connects, so its first handshake is seen too.
        let monitor = dialer.redial.watch(&fresh);
        dialer.redial.close(std::mem::replace(&mut self.net, fresh), self.close_wait);
        dialer.monitor = monitor;
        dialer.refused = false;
        dialer.redial.connect(&self.net)
    }

    /// Explains the failed handshakes the dealer's monitor reports.
    fn handshake_events(&mut self) {
        let Some(dialer) = &mut self.dialer else { return };
        for _ in 0..BATCH_MAX {
            let Some(monitor) = &dialer.monitor else { return };
            match receive_message(monitor, 2) {
                Ok(Some(frames)) => dialer.explain(&frames),
                Ok(None) | Err(zmq::Error::EINTR) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read handshake events");
                    return;
                }
            }
        }
    }

    /// Reads what the network has, up to a batch. False once nobody listens or the socket failed.
    fn receive(&mut self) -> bool {
        for _ in 0..BATCH_MAX {
            match receive_message(&self.net, self.keep_frames) {
                Ok(Some(frames)) => {
                    self.pending = Some((self.decode)(frames));
                    if !self.deliver() {
                        return false;
                    }
                    if self.pending.is_some() {
                        return true; // the consumer is behind: stop reading
                    }
                }
                Ok(None) | Err(zmq::Error::EINTR) => return true,
                Err(e) => {
                    tracing::error!(error = %e, "transport receive failed; stopping");
                    return false;
                }
            }
        }
        true
    }
}

/// One message, of which at most `keep` frames are kept; `None` if none is waiting.
pub(crate) fn receive_message(socket: &zmq::Socket, keep: usize) -> Result<Option<Vec<Vec<u8>>>, zmq::Error> {
    let mut frames = Vec::with_capacity(keep);
    loop {
        let message = match socket.recv_msg(zmq::DONTWAIT) {
            Ok(message) => message,
            // The frames of one message arrive together, so only the first can be missing.
            Err(zmq::Error::EAGAIN) if frames.is_empty() => return Ok(None),
            Err(e) => return Err(e),
        };
        if frames.len() < keep {
            frames.push(message.to_vec());
        }
        if !message.get_more() {
            return Ok(Some(frames));
        }
    }
}
