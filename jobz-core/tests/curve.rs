//! The transport with CURVE over real sockets on 127.0.0.1: an allowed key gets
//! in, every other peer is refused and counted, and the ZAP handler answers
//! whatever is sent to it. Every wait is under a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use jobz_core::curve::{AllowedKeys, KeyPair};
use jobz_core::protocol::*;
use jobz_core::transport::*;
use jobz_core::zap::ZAP_ENDPOINT;

const DEADLINE: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: nothing within {DEADLINE:?}"),
    }
}

fn options() -> SocketOptions {
    SocketOptions {
        linger: Duration::ZERO,
        reconnect_interval: Duration::from_millis(10),
        reconnect_interval_max: Duration::from_millis(100),
        ..SocketOptions::DEFAULT
    }
}

fn heartbeat() -> ToBroker {
    ToBroker::Heartbeat
}

fn key() -> KeyPair {
    KeyPair::generate().expect("libzmq with CURVE")
}

/// A broker-side router admitting `allowed`, with its key pair.
fn curve_router(ctx: &zmq::Context, allowed: &[&KeyPair]) -> (Router, KeyPair) {
    let server = key();
    let mut keys = AllowedKeys::default();
    for k in allowed {
        keys.insert(k.public, "test".into()).expect("insert");
    }
    let router =
        Router::bind_curve(ctx, "tcp://127.0.0.1:0", &options(), CurveServer { key: server.clone(), allowed: keys })
            .expect("bind_curve");
    assert!(router.is_encrypted());
    (router, server)
}

fn curve_dealer(ctx: &zmq::Context, router: &Router, own: &KeyPair, broker: &KeyPair, id: &[u8]) -> Dealer {
    let client = CurveClient { key: own.clone(), broker: broker.public };
    Dealer::connect_curve(ctx, router.local_endpoint(), &options(), Some(id.to_vec()), client).expect("connect_curve")
}

/// Waits (polling, under the deadline) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A refused peer's send either queues (its handshake has not failed yet) or
/// finds no pipe to queue on (libzmq drops a session whose handshake failed
/// with a protocol error, and with it the pipe): both are fine, the refusal is
/// what the test looks for, and it comes from the connection alone.
fn queue_or_refused(sent: Result<(), TransportError>) {
    match sent {
        Ok(()) | Err(TransportError::Full) => {}
        Err(e) => panic!("a refused peer's send failed otherwise: {e}"),
    }
}

/// The next message reaching the router must come from `id`: a refused peer
/// that had got in would have been first, since it sent before.
async fn next_is_from(router: &Router, id: &[u8]) {
    let incoming = within("router recv", router.recv()).await.expect("router open");
    assert_eq!(incoming.peer.as_bytes(), id, "a message from an unexpected peer: {:?}", incoming.message);
}

#[tokio::test]
async fn an_allowed_key_talks_both_ways_encrypted() {
    let ctx = zmq::Context::new();
    let worker = key();
    let (router, server) = curve_router(&ctx, &[&worker]);
    let dealer = curve_dealer(&ctx, &router, &worker, &server, b"w1");
    dealer.send(&heartbeat()).expect("send");
    let incoming = within("router recv", router.recv()).await.expect("router open");
    assert_eq!(incoming.peer.as_bytes(), b"w1");
    assert_eq!(incoming.message.expect("a good message"), heartbeat());
    router.send(&incoming.peer, &ToWorker::Heartbeat).expect("send back");
    let back = within("dealer recv", dealer.recv()).await.expect("dealer open").expect("good");
    assert_eq!(back, ToWorker::Heartbeat);
    // And again after a reconnect: the fresh socket has the keys too.
    dealer.reconnect().expect("reconnect");
    dealer.send(&heartbeat()).expect("send");
    next_is_from(&router, b"w1").await;
    assert_eq!(router.refusals().keys(), 0);
}

#[tokio::test]
async fn an_unknown_key_is_refused_and_counted() {
    let ctx = zmq::Context::new();
    let (allowed, stranger) = (key(), key());
    let (router, server) = curve_router(&ctx, &[&allowed]);
    let refused = curve_dealer(&ctx, &router, &stranger, &server, b"stranger");
    queue_or_refused(refused.send(&heartbeat()));
    let refusals = router.refusals();
    wait_until("the ZAP refusal", || refusals.keys() >= 1);
    let good = curve_dealer(&ctx, &router, &allowed, &server, b"good");
    good.send(&heartbeat()).expect("send");
    next_is_from(&router, b"good").await;
}

#[tokio::test]
async fn a_plain_text_peer_and_a_wrong_broker_key_are_refused() {
    let ctx = zmq::Context::new();
    let worker = key();
    let (router, server) = curve_router(&ctx, &[&worker]);
    let refusals = router.refusals();
    let plain = Dealer::connect(&ctx, router.local_endpoint(), &options(), Some(b"plain".to_vec())).expect("connect");
    queue_or_refused(plain.send(&heartbeat()));
    wait_until("the plain-text refusal", || refusals.handshakes() >= 1);
    // The right own key, but another broker's public key: the HELLO does not decrypt.
    let impostor = key();
    let lost = curve_dealer(&ctx, &router, &worker, &impostor, b"lost");
    queue_or_refused(lost.send(&heartbeat()));
    wait_until("the undecryptable handshake", || refusals.handshakes() >= 2);
    let good = curve_dealer(&ctx, &router, &worker, &server, b"good");
    good.send(&heartbeat()).expect("send");
    next_is_from(&router, b"good").await;
    assert_eq!(refusals.keys(), 0, "these never reached ZAP");
}

/// Whatever reaches the ZAP handler gets an answer, so no handshake waits on it.
#[tokio::test]
async fn the_zap_handler_answers_garbage_and_keeps_working() {
    let ctx = zmq::Context::new();
    let worker = key();
    let (router, server) = curve_router(&ctx, &[&worker]);
    let probe = ctx.socket(zmq::DEALER).expect("socket");
    probe.set_linger(0).expect("linger");
    probe.set_rcvtimeo(i32::try_from(DEADLINE.as_millis()).unwrap_or(i32::MAX)).expect("rcvtimeo");
    probe.connect(ZAP_ENDPOINT).expect("connect to the ZAP handler");
    let ask = |frames: Vec<Vec<u8>>| -> Vec<Vec<u8>> {
        probe.send_multipart(frames, 0).expect("send");
        probe.recv_multipart(0).expect("an answer within the deadline")
    };
    // No delimiter, one frame of garbage.
    let reply = ask(vec![b"\xff\x00garbage".to_vec()]);
    assert_eq!(reply.get(3).map(Vec::as_slice), Some(&b"500"[..]), "{reply:?}");
    // A delimiter and a wrong version.
    let reply =
        ask(vec![vec![], b"9.9".to_vec(), b"id".to_vec(), vec![], vec![], vec![], b"CURVE".to_vec(), vec![1; 32]]);
    assert_eq!(reply.get(2).map(Vec::as_slice), Some(&b"id"[..]), "the request id comes back: {reply:?}");
    assert_eq!(reply.get(3).map(Vec::as_slice), Some(&b"500"[..]), "{reply:?}");
    // Hundreds of frames, which are read and dropped.
    let reply = ask(std::iter::repeat_n(b"x".to_vec(), 500).collect());
    assert_eq!(reply.get(3).map(Vec::as_slice), Some(&b"500"[..]), "{reply:?}");
    // A well-formed request for the allowed key.
    let good = |id: &[u8], key: &[u8]| {
        vec![
            vec![],
            b"1.0".to_vec(),
            id.to_vec(),
            b"jobz".to_vec(),
            b"127.0.0.1".to_vec(),
            vec![],
            b"CURVE".to_vec(),
            key.to_vec(),
        ]
    };
    let reply = ask(good(b"7", worker.public.as_bytes()));
    assert_eq!(reply.get(3).map(Vec::as_slice), Some(&b"200"[..]), "{reply:?}");
    let reply = ask(good(b"8", key().public.as_bytes()));
    assert_eq!(reply.get(3).map(Vec::as_slice), Some(&b"400"[..]), "{reply:?}");
    // Real handshakes still go through.
    let dealer = curve_dealer(&ctx, &router, &worker, &server, b"after");
    dealer.send(&heartbeat()).expect("send");
    next_is_from(&router, b"after").await;
}

#[test]
fn one_encrypted_router_per_context() {
    let ctx = zmq::Context::new();
    let (_first, _) = curve_router(&ctx, &[]);
    let second = Router::bind_curve(
        &ctx,
        "tcp://127.0.0.1:0",
        &options(),
        CurveServer { key: key(), allowed: AllowedKeys::default() },
    );
    assert!(matches!(second, Err(TransportError::Zap { .. })), "{:?}", second.err());
}
