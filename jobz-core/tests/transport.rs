//! The transport over real sockets on 127.0.0.1, every wait under a deadline.

use std::future::Future;
use std::time::{Duration, Instant};

use jobz_core::protocol::*;
use jobz_core::transport::*;

const DEADLINE: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: nothing within {DEADLINE:?}"),
    }
}

/// Fast reconnects so the tests do not wait on backoff; no linger so contexts close at once.
fn options() -> SocketOptions {
    SocketOptions {
        linger: Duration::ZERO,
        reconnect_interval: Duration::from_millis(10),
        reconnect_interval_max: Duration::from_millis(100),
        ..SocketOptions::DEFAULT
    }
}

fn hello(name: &str) -> ToBroker {
    ToBroker::Hello(Hello {
        role: Role::Worker,
        name: name.into(),
        host: "localhost".into(),
        pid: std::process::id(),
        concurrency: 4,
        credit: 4,
        jobs: vec![ServedJob { name: "build".into(), digest: digest("build: make") }],
        holding: vec![],
    })
}

fn welcome() -> ToWorker {
    ToWorker::Welcome(Welcome { heartbeat_ms: 1000, lease_timeout_ms: 10_000, drift: vec![], url: None })
}

fn bind(ctx: &zmq::Context) -> Router {
    let router = Router::bind(ctx, "tcp://127.0.0.1:0", &options()).expect("bind");
    assert!(!router.local_endpoint().ends_with(":0"), "a real port: {}", router.local_endpoint());
    router
}

/// The next message the router gets, which must decode.
async fn next_good(router: &Router) -> (PeerId, ToBroker) {
    let incoming =
        within(&format!("router {} recv", router.local_endpoint()), router.recv()).await.expect("router open");
    (incoming.peer, incoming.message.expect("a good message"))
}

async fn next_from_broker(dealer: &Dealer) -> ToWorker {
    within(&format!("dealer of {} recv", dealer.endpoint()), dealer.recv())
        .await
        .expect("dealer open")
        .expect("a good message")
}

#[test]
fn handles_can_be_shared_between_tasks() {
    fn shared<T: Send + Sync>() {}
    shared::<Router>();
    shared::<Dealer>();
}

#[tokio::test]
async fn a_dealer_says_hello_and_gets_a_welcome() {
    let ctx = zmq::Context::new();
    let router = bind(&ctx);
    let dealer = Dealer::connect(&ctx, router.local_endpoint(), &options(), Some(b"worker-1".to_vec())).unwrap();
    dealer.send(&hello("worker-1")).unwrap();

    let (peer, message) = next_good(&router).await;
    assert_eq!(message, hello("worker-1"));
    assert_eq!(peer.as_bytes(), b"worker-1", "the identity is the peer id");
    router.send(&peer, &welcome()).unwrap();
    assert_eq!(next_from_broker(&dealer).await, welcome());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_messages_arrive_in_order_both_ways_through_back_pressure() {
    const COUNT: u64 = 3000;
    let ctx = zmq::Context::new();
    // A tiny channel makes the router's pump stall and be woken again and again.
    let router = Router::bind(&ctx, "tcp://127.0.0.1:0", &SocketOptions { incoming_capacity: 4, ..options() }).unwrap();
    let dealer = std::sync::Arc::new(Dealer::connect(&ctx, router.local_endpoint(), &options(), None).unwrap());

    let sender = std::sync::Arc::clone(&dealer);
    let sending = tokio::task::spawn_blocking(move || {
        for offset in 0..COUNT {
            let chunk =
                ToBroker::Output(Output { job_id: "j".into(), lease: 1, offset, data: offset.to_le_bytes().to_vec() });
            // A full queue is back-pressure: try again until the deadline.
            let started = Instant::now();
            loop {
                match sender.send(&chunk) {
                    Ok(()) => break,
                    Err(TransportError::Full) if started.elapsed() < DEADLINE => std::thread::yield_now(),
                    Err(e) => panic!("send {offset}: {e}"),
                }
            }
        }
    });
    let mut peer = None;
    for expected in 0..COUNT {
        let (from, message) = next_good(&router).await;
        match message {
            ToBroker::Output(Output { offset, data, .. }) => {
                assert_eq!((offset, data), (expected, expected.to_le_bytes().to_vec()));
            }
            other => panic!("unexpected {other:?}"),
        }
        peer = Some(from);
    }
    within("sender", sending).await.unwrap();

    let peer = peer.unwrap();
    for lease in 0..COUNT {
        if let Err(e) = router.send(&peer, &ToWorker::ResultAck(LeaseRef { job_id: "j".into(), lease })) {
            panic!("send {lease}: {e:?}")
        }
        if lease % 500 == 499 {
            // Drain as we go so the router's queue to this peer never fills.
            for expected in lease - 499..=lease {
                assert_eq!(
                    next_from_broker(&dealer).await,
                    ToWorker::ResultAck(LeaseRef { job_id: "j".into(), lease: expected })
                );
            }
        }
    }
}

/// A deterministic byte generator (xorshift), so a failure replays.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = (self.next() as usize) % (max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_errors_and_the_router_keeps_serving() {
    let ctx = zmq::Context::new();
    let router = bind(&ctx);
    let raw = ctx.socket(zmq::DEALER).unwrap();
    raw.set_linger(0).unwrap();
    raw.set_rcvtimeo(DEADLINE.as_millis() as i32).unwrap();
    raw.connect(router.local_endpoint()).unwrap();

    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let mut garbage: Vec<Vec<Vec<u8>>> = (0..200)
        .map(|_| {
            let frames = 1 + (noise.next() % 4) as usize;
            (0..frames).map(|_| noise.bytes(64)).collect()
        })
        .collect();
    // A real header of a version we do not speak, a valid header with a broken body,
    // and a frame over the protocol's limit (but under ZeroMQ's).
    garbage.push(vec![b"JZ\x02\x01{}".to_vec()]);
    garbage.push(vec![b"JZ\x01\x01{\"role\":".to_vec()]);
    garbage.push(vec![[b"JZ\x01\x03".as_slice(), &vec![b' '; limits::FRAME_MAX_BYTES]].concat()]);
    for frames in &garbage {
        raw.send_multipart(frames, 0).unwrap();
    }

    let mut garbage_peer = None;
    let mut refused = 0;
    for frames in &garbage {
        let incoming = within("garbage", router.recv()).await.unwrap();
        match (&incoming.message, frames.as_slice()) {
            (Err(_), _) => refused += 1,
            // Random bytes can, rarely, be a valid heartbeat; then they must be exactly that.
            (Ok(message), _) => assert_eq!(decode_to_broker(frames).as_ref(), Ok(message)),
        }
        assert_eq!(garbage_peer.get_or_insert(incoming.peer.clone()), &incoming.peer);
        if frames[0].starts_with(b"JZ\x02") {
            assert_eq!(incoming.message, Err(DecodeError::Version { got: 2 }));
            // The broker can tell such a peer what is wrong, in the version-1 Error message.
            let reply = ToWorker::Error(ErrorReply { message: "version 2 is not spoken here".into() });
            router.send(&incoming.peer, &reply).unwrap();
            let answer = tokio::task::block_in_place(|| raw.recv_multipart(0)).unwrap();
            assert_eq!(decode_to_worker(&answer), Ok(reply));
        }
    }
    assert!(refused >= garbage.len() - 5, "only {refused} of {} refused", garbage.len());

    // A frame over ZeroMQ's own limit: libzmq drops that connection, silently.
    let huge = ctx.socket(zmq::DEALER).unwrap();
    huge.set_linger(0).unwrap();
    huge.connect(router.local_endpoint()).unwrap();
    huge.send(vec![0u8; options().message_max_bytes as usize + 1], 0).unwrap();

    // And a good dealer is served as if nothing happened.
    let dealer = Dealer::connect(&ctx, router.local_endpoint(), &options(), None).unwrap();
    dealer.send(&hello("good")).unwrap();
    let (peer, message) = next_good(&router).await;
    assert_eq!(message, hello("good"));
    router.send(&peer, &welcome()).unwrap();
    assert_eq!(next_from_broker(&dealer).await, welcome());
}

#[tokio::test]
async fn sending_to_an_unknown_or_vanished_peer_is_an_error() {
    let ctx = zmq::Context::new();
    let router = bind(&ctx);
    let started = Instant::now();
    let result = router.send(&PeerId::from(b"nobody".as_slice()), &ToWorker::Heartbeat);
    assert!(
        matches!(result, Err(TransportError::UnknownPeer { ref peer }) if peer.as_bytes() == b"nobody"),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(1), "answered at once, not after a timeout");

    // A peer that was there and left.
    let dealer = Dealer::connect(&ctx, router.local_endpoint(), &options(), Some(b"leaver".to_vec())).unwrap();
    dealer.send(&hello("leaver")).unwrap();
    let (peer, _) = next_good(&router).await;
    router.send(&peer, &ToWorker::Heartbeat).unwrap();
    dealer.shutdown().unwrap();
    // The router notices the closed connection shortly; poll for it under the deadline.
    within("vanished peer", async {
        loop {
            match router.send(&peer, &ToWorker::Heartbeat) {
                Err(TransportError::UnknownPeer { .. }) => break,
                Ok(()) => tokio::task::yield_now().await,
                Err(e) => panic!("unexpected {e}"),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn the_sender_refuses_a_message_the_peer_would_refuse() {
    let ctx = zmq::Context::new();
    let router = bind(&ctx);
    let dealer = Dealer::connect(&ctx, router.local_endpoint(), &options(), None).unwrap();
    let bad = ToBroker::Progress(Progress { job_id: "j".into(), lease: 1, percent: f64::NAN, message: None });
    assert!(matches!(dealer.send(&bad), Err(TransportError::Encode(_))));
    assert!(matches!(
        Dealer::connect(&ctx, router.local_endpoint(), &options(), Some(vec![0, 1])),
        Err(TransportError::Identity { .. })
    ));
}

#[tokio::test]
async fn shutdown_joins_the_threads_within_a_deadline() {
    let ctx = zmq::Context::new();
    let router = bind(&ctx);
    let dealer = Dealer::connect(&ctx, router.local_endpoint(), &options(), None).unwrap();
    dealer.send(&hello("w")).unwrap();
    let (peer, _) = next_good(&router).await;
    // Leave messages unread on both sides: shutdown must not wait for a consumer.
    for _ in 0..10 {
        router.send(&peer, &ToWorker::Heartbeat).unwrap();
        dealer.send(&ToBroker::Heartbeat).unwrap();
    }
    let stopped = within("shutdown", tokio::task::spawn_blocking(move || (dealer.shutdown(), router.shutdown()))).await;
    let (dealer_stopped, router_stopped) = stopped.unwrap();
    dealer_stopped.unwrap();
    router_stopped.unwrap();
    // All sockets are closed, so the context terminates instead of hanging.
    within("context", tokio::task::spawn_blocking(move || drop(ctx))).await.unwrap();
}

#[tokio::test]
async fn a_stalled_pump_still_stops_when_dropped() {
    let ctx = zmq::Context::new();
    let router = Router::bind(&ctx, "tcp://127.0.0.1:0", &SocketOptions { incoming_capacity: 1, ..options() }).unwrap();
    let dealer = Dealer::connect(&ctx, router.local_endpoint(), &options(), None).unwrap();
    for _ in 0..50 {
        dealer.send(&ToBroker::Heartbeat).unwrap();
    }
    // One message in the channel means the pump is certainly connected and soon stalled.
    within("first", router.recv()).await.unwrap();
    within("drop", tokio::task::spawn_blocking(move || drop(router))).await.unwrap();
}

#[tokio::test]
async fn reconnect_works_after_the_router_restarts_on_the_same_port() {
    let ctx = zmq::Context::new();
    // A port below the usual ephemeral range (32768-60999): while nothing listens
    // on a free ephemeral port, a local connect to it can get that very port as
    // its source and connect to itself (TCP self-connect), and the dealer would
    // talk to itself. Real brokers listen on 6770, outside the range.
    let mut noise = Noise(u64::from(std::process::id()) | 1);
    let first = within("first bind", async {
        loop {
            let endpoint = format!("tcp://127.0.0.1:{}", 20_000 + noise.next() % 10_000);
            match Router::bind(&ctx, &endpoint, &options()) {
                Ok(router) => break router,
                Err(TransportError::Bind { .. }) => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    let endpoint = first.local_endpoint().to_owned();
    let dealer = Dealer::connect(&ctx, &endpoint, &options(), Some(b"phoenix".to_vec())).unwrap();
    dealer.send(&hello("phoenix")).unwrap();
    let (peer, _) = next_good(&first).await;
    first.send(&peer, &welcome()).unwrap();
    assert_eq!(next_from_broker(&dealer).await, welcome());

    within("first shutdown", tokio::task::spawn_blocking(move || first.shutdown())).await.unwrap().unwrap();
    // Queued while the broker is down, then made stale by reconnect().
    dealer.send(&ToBroker::Credit(Credit { n: 1 })).unwrap();
    dealer.reconnect().unwrap();

    // ZeroMQ closes the old listener in its I/O thread: retry the bind until the port is free.
    let second = within("rebind", async {
        loop {
            match Router::bind(&ctx, &endpoint, &options()) {
                Ok(router) => break router,
                Err(TransportError::Bind { .. }) => tokio::task::yield_now().await,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    dealer.send(&hello("phoenix")).unwrap();
    let (peer, message) = next_good(&second).await;
    assert_eq!(message, hello("phoenix"), "the stale Credit was dropped with the old socket");
    assert_eq!(peer.as_bytes(), b"phoenix");
    second.send(&peer, &welcome()).unwrap();
    assert_eq!(next_from_broker(&dealer).await, welcome());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nowait_sends_keep_their_order_with_waiting_sends_both_ways() {
    const COUNT: u64 = 500;
    let ctx = zmq::Context::new();
    let router = bind(&ctx);
    let dealer = Dealer::connect(&ctx, router.local_endpoint(), &options(), Some(b"mixer".to_vec())).unwrap();
    dealer.send_nowait(&hello("mixer")).unwrap();
    let (peer, message) = next_good(&router).await;
    assert_eq!(message, hello("mixer"));
    let chunk = |offset: u64| ToBroker::Output(Output { job_id: "j".into(), lease: 1, offset, data: vec![1] });
    let ack = |lease: u64| ToWorker::ResultAck(LeaseRef { job_id: "j".into(), lease });
    for i in 0..COUNT {
        // Every third message waits for the pump; the rest only queue.
        if i % 3 == 0 {
            dealer.send(&chunk(i)).unwrap();
            router.send(&peer, &ack(i)).unwrap();
        } else {
            dealer.send_nowait(&chunk(i)).unwrap();
            router.send_nowait(&peer, &ack(i)).unwrap();
        }
    }
    for i in 0..COUNT {
        let (_, message) = next_good(&router).await;
        assert_eq!(message, chunk(i));
        assert_eq!(next_from_broker(&dealer).await, ack(i));
    }
    assert_eq!((router.failed_sends(), dealer.failed_sends()), (0, 0));
}

#[tokio::test]
async fn a_nowait_send_to_an_unknown_peer_is_counted_not_reported() {
    let ctx = zmq::Context::new();
    let router = bind(&ctx);
    let nobody = PeerId::from(b"nobody".as_slice());
    router.send_nowait(&nobody, &ToWorker::Heartbeat).expect("queued; the pump finds out");
    // The waiting send queues behind it, so once it answers the nowait one was tried.
    assert!(matches!(router.send(&nobody, &ToWorker::Heartbeat), Err(TransportError::UnknownPeer { .. })));
    assert_eq!(router.failed_sends(), 1);
    // Local problems are still errors at once.
    let dealer = Dealer::connect(&ctx, router.local_endpoint(), &options(), None).unwrap();
    let bad = ToBroker::Progress(Progress { job_id: "j".into(), lease: 1, percent: f64::NAN, message: None });
    assert!(matches!(dealer.send_nowait(&bad), Err(TransportError::Encode(_))));
}

#[tokio::test]
async fn nowait_sends_queued_before_shutdown_still_go_out() {
    let ctx = zmq::Context::new();
    let router = bind(&ctx);
    let options = SocketOptions { linger: Duration::from_secs(2), ..options() };
    let dealer = Dealer::connect(&ctx, router.local_endpoint(), &options, Some(b"goer".to_vec())).unwrap();
    dealer.send_nowait(&hello("goer")).unwrap();
    let goodbye = ToBroker::Goodbye(Goodbye { hand_back: vec![LeaseRef { job_id: "j".into(), lease: 3 }] });
    dealer.send_nowait(&goodbye).unwrap();
    dealer.shutdown().unwrap();
    assert_eq!(next_good(&router).await.1, hello("goer"));
    assert_eq!(next_good(&router).await.1, goodbye);
}

// ---- In-process links ----

#[tokio::test]
async fn a_local_link_and_a_network_dealer_share_one_router() {
    let ctx = zmq::Context::new();
    let router = bind(&ctx);
    let local = router.local_connector().connect();
    let remote = Dealer::connect(&ctx, router.local_endpoint(), &options(), None).expect("connect");
    local.send_nowait(&hello("in-process")).expect("queued");
    remote.send(&hello("remote")).expect("queued");
    let mut peers = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let (peer, message) = next_good(&router).await;
        let ToBroker::Hello(hello) = message else { panic!("not a Hello: {message:?}") };
        peers.insert(hello.name, peer);
    }
    let local_peer = &peers["in-process"];
    assert_eq!(local_peer, local.peer());
    assert_ne!(local_peer, &peers["remote"]);
    assert_eq!(local_peer.to_string(), "local-1", "local peers print readably");
    // The router answers each over its own way, with the same calls.
    router.send(local_peer, &welcome()).expect("sent to the local peer");
    router.send_nowait(&peers["remote"], &welcome()).expect("queued for the remote peer");
    assert_eq!(within("local recv", local.recv()).await.expect("open").expect("good"), welcome());
    assert_eq!(next_from_broker(&remote).await, welcome());
}

#[tokio::test]
async fn a_dropped_or_full_local_link_is_an_error_for_send_and_a_count_for_send_nowait() {
    let ctx = zmq::Context::new();
    let router = bind(&ctx);
    let connector = router.local_connector();
    let (first, second) = (connector.connect(), connector.connect());
    assert_ne!(first.peer(), second.peer());
    let gone = second.peer().clone();
    drop(second);
    assert!(matches!(router.send(&gone, &welcome()), Err(TransportError::UnknownPeer { .. })));
    // A local peer's id that was never connected is unknown too, not sent over the network.
    let never = PeerId::from(b"\0local-999".to_vec());
    assert!(matches!(router.send(&never, &welcome()), Err(TransportError::UnknownPeer { .. })));
    let failed = router.failed_sends();
    router.send_nowait(&gone, &ToWorker::Heartbeat).expect("not reported");
    assert_eq!(router.failed_sends(), failed + 1);
    // A link that does not read fills up at the high-water mark, as a network peer would.
    let limit = options().send_high_water_mark as usize;
    for _ in 0..limit {
        router.send(first.peer(), &ToWorker::Heartbeat).expect("room");
    }
    assert!(matches!(router.send(first.peer(), &ToWorker::Heartbeat), Err(TransportError::Full)));
    assert_eq!(within("local recv", first.recv()).await.expect("open").expect("good"), ToWorker::Heartbeat);
    router.send(first.peer(), &ToWorker::Heartbeat).expect("room again after a read");
}

#[tokio::test]
async fn a_local_link_to_a_router_that_is_gone_says_so() {
    let ctx = zmq::Context::new();
    let router = bind(&ctx);
    let link = router.local_connector().connect();
    router.shutdown().expect("stopped");
    // The router's incoming queue went with it: nothing can take the message.
    assert!(matches!(link.send_nowait(&ToBroker::Heartbeat), Err(TransportError::Stopped)));
}
