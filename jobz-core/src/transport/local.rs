//! In-process peers of a [`Router`](super::Router): workers that live in the
//! broker's own process (`jobz up`) and speak the same messages without
//! ZeroMQ.
//!
//! A network peer's message costs several thread hops each way (the tokio
//! task, its socket's pump thread, libzmq's I/O thread, the kernel, and the
//! same again on the other side) plus encoding and decoding. A peer in the
//! same process needs none of that: a [`LocalLink`] puts its messages, as
//! values, straight into the router's incoming channel beside the pump's, and
//! the router hands messages for it to the link's own bounded channel. The
//! broker's loop cannot tell the two kinds of peer apart except by their
//! [`PeerId`], so the protocol (registration, credit, leases, heartbeats,
//! results resent until acknowledged) is the same for both.
//!
//! A local peer's id starts with a zero byte and is longer than the five bytes
//! of libzmq's generated routing ids; a network peer can choose neither (libzmq
//! refuses identities that start with a zero byte), so the two never collide.
//! Nothing travels over a network, so a local link has no encryption and no
//! size limits beyond the channels' bounds.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;

use super::{Incoming, PeerId, TransportError};
use crate::protocol::{DecodeError, ToBroker, ToWorker};

/// The prefix of every local peer's id; see the module docs.
const LOCAL_ID_PREFIX: &[u8] = b"\0local-";

/// The router's side: where local peers' messages go and how to reach each peer.
pub(super) struct LocalPeers {
    /// Into the router's incoming channel, beside the pump's messages.
    incoming: mpsc::Sender<Incoming>,
    /// Each connected link's channel, by its peer id.
    links: Mutex<HashMap<PeerId, mpsc::Sender<ToWorker>>>,
    next: AtomicU64,
    /// Messages waiting for one link (the router's `ZMQ_SNDHWM` per peer).
    capacity: usize,
}

impl LocalPeers {
    pub(super) fn new(incoming: mpsc::Sender<Incoming>, capacity: usize) -> LocalPeers {
        LocalPeers { incoming, links: Mutex::new(HashMap::new()), next: AtomicU64::new(1), capacity: capacity.max(1) }
    }

    /// Whether `peer` is a local peer's id (connected or not).
    pub(super) fn is_local(peer: &PeerId) -> bool {
        peer.as_bytes().starts_with(LOCAL_ID_PREFIX)
    }

    /// Hands `message` to the local peer `peer`: [`TransportError::UnknownPeer`]
    /// when it is gone, [`TransportError::Full`] when it is behind by a whole
    /// queue (as ZeroMQ's high-water mark would be).
    pub(super) fn send(&self, peer: &PeerId, message: &ToWorker) -> Result<(), TransportError> {
        let links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(link) = links.get(peer) else {
            return Err(TransportError::UnknownPeer { peer: peer.clone() });
        };
        link.try_send(message.clone()).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TransportError::Full,
            mpsc::error::TrySendError::Closed(_) => TransportError::UnknownPeer { peer: peer.clone() },
        })
    }

    fn forget(&self, peer: &PeerId) {
        self.links.lock().unwrap_or_else(PoisonError::into_inner).remove(peer);
    }
}

/// Makes [`LocalLink`]s to one router; cheap to clone, one per local worker.
#[derive(Clone)]
pub struct LocalConnector {
    peers: Arc<LocalPeers>,
}

impl fmt::Debug for LocalConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LocalConnector")
    }
}

impl LocalConnector {
    pub(super) fn new(peers: Arc<LocalPeers>) -> LocalConnector {
        LocalConnector { peers }
    }

    /// A new peer of the router, with an id of its own.
    pub fn connect(&self) -> LocalLink {
        let n = self.peers.next.fetch_add(1, Ordering::Relaxed);
        let mut id = LOCAL_ID_PREFIX.to_vec();
        id.extend_from_slice(n.to_string().as_bytes());
        let peer = PeerId::from(id);
        let (tx, rx) = mpsc::channel(self.peers.capacity);
        self.peers.links.lock().unwrap_or_else(PoisonError::into_inner).insert(peer.clone(), tx);
        LocalLink { peer, peers: Arc::clone(&self.peers), from_router: tokio::sync::Mutex::new(rx) }
    }
}

/// A worker's connection to a router in the same process, with the calls of a
/// [`Dealer`](super::Dealer). Dropping it disconnects: the router's sends to it
/// then fail as they would for a vanished network peer.
pub struct LocalLink {
    peer: PeerId,
    peers: Arc<LocalPeers>,
    from_router: tokio::sync::Mutex<mpsc::Receiver<ToWorker>>,
}

impl LocalLink {
    pub fn peer(&self) -> &PeerId {
        &self.peer
    }

    /// Queues `message` for the router without waiting; a router that is
    /// behind by a whole incoming queue is [`TransportError::Busy`], a router
    /// that is gone [`TransportError::Stopped`].
    pub fn send_nowait(&self, message: &ToBroker) -> Result<(), TransportError> {
        let incoming = Incoming { peer: self.peer.clone(), message: Ok(message.clone()) };
        self.peers.incoming.try_send(incoming).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => TransportError::Busy,
            mpsc::error::TrySendError::Closed(_) => TransportError::Stopped,
        })
    }

    /// The next message from the router; `None` once the link is closed. Cancel-safe.
    pub async fn recv(&self) -> Option<Result<ToWorker, DecodeError>> {
        self.from_router.lock().await.recv().await.map(Ok)
    }
}

impl Drop for LocalLink {
    fn drop(&mut self) {
        self.peers.forget(&self.peer);
    }
}
