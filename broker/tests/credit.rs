//! Credit folded into Result, against the real broker loop and a hand-driven
//! worker (a bare `Dealer`): the first Result of an attempt gives its slot
//! back, a resend after a lost ack does not, and no `Credit` message is needed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use broker::core::BrokerConfig;
use broker::handle::StartRequest;
use broker::store::{SqliteStore, StoreOptions};
use chrono::Utc;
use jobz_core::protocol::*;
use jobz_core::transport::{Dealer, Router, SocketOptions};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is watched for.
const QUIET: Duration = Duration::from_millis(500);
const JOB_FILE: &str = "jobs:\n  noop: { command: \"/bin/true\" }\n";

async fn next(dealer: &Dealer, within: Duration) -> Option<ToWorker> {
    loop {
        match tokio::time::timeout(within, dealer.recv()).await {
            Err(_) => return None,
            Ok(message) => match message.expect("dealer open").expect("a good message") {
                ToWorker::Heartbeat => continue,
                message => return Some(message),
            },
        }
    }
}

async fn dispatch(dealer: &Dealer) -> Dispatch {
    match next(dealer, DEADLINE).await {
        Some(ToWorker::Dispatch(d)) => d,
        other => panic!("expected a dispatch, got {other:?}"),
    }
}

fn result(d: &Dispatch) -> ToBroker {
    let now = Utc::now();
    ToBroker::Result(ResultReport {
        job_id: d.job_id.clone(),
        lease: d.lease,
        status: Outcome::Succeeded,
        exit_code: Some(0),
        signal: None,
        started_at: now,
        finished_at: now,
        error: None,
        output: Vec::new(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_gives_its_slot_back_once_and_a_resend_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let file = Arc::new(config::parse("credit.yaml", JOB_FILE).expect("job file"));
    let ctx = zmq::Context::new();
    let store = SqliteStore::open(dir.path(), StoreOptions::default()).unwrap();
    let router = Router::bind(&ctx, "tcp://127.0.0.1:0", &SocketOptions::default()).unwrap();
    let endpoint = router.local_endpoint().to_string();
    let stop = CancellationToken::new();
    let config = BrokerConfig::new(file.clone(), dir.path().to_path_buf());
    let (handle, task) = broker::core::start(config, store, router, stop.clone()).await.unwrap();

    let dealer = Dealer::connect(&ctx, &endpoint, &SocketOptions::default(), None).unwrap();
    // Two slots, one free: the cap (concurrency − running) never hides a credit counted twice.
    dealer
        .send(&ToBroker::Hello(Hello {
            role: Role::Worker,
            name: "hand".into(),
            host: "localhost".into(),
            pid: std::process::id(),
            concurrency: 2,
            credit: 1,
            jobs: vec![ServedJob { name: "noop".into(), digest: digest(&file.jobs["noop"].canonical) }],
            holding: vec![],
        }))
        .unwrap();
    assert!(matches!(next(&dealer, DEADLINE).await, Some(ToWorker::Welcome(_))));
    for _ in 0..4 {
        let request = StartRequest {
            job_name: "noop".into(),
            params: BTreeMap::new(),
            idempotency_key: None,
            priority: None,
            parent_id: None,
        };
        handle.start(request).await.expect("started");
    }

    let first = dispatch(&dealer).await;
    assert_eq!(next(&dealer, QUIET).await, None, "one credit, one dispatch");

    // The Result alone frees the slot: an ack and the next job, no Credit sent.
    dealer.send(&result(&first)).unwrap();
    let mut second = None;
    let mut acked = false;
    while second.is_none() || !acked {
        match next(&dealer, DEADLINE).await {
            Some(ToWorker::ResultAck(LeaseRef { lease, .. })) if lease == first.lease => acked = true,
            Some(ToWorker::Dispatch(d)) if second.is_none() => second = Some(d),
            other => panic!("unexpected {other:?}"),
        }
    }

    // A resend (as after a lost ack) is acknowledged again and frees nothing more.
    dealer.send(&result(&first)).unwrap();
    match next(&dealer, DEADLINE).await {
        Some(ToWorker::ResultAck(LeaseRef { lease, .. })) => assert_eq!(lease, first.lease),
        other => panic!("expected the ack again, got {other:?}"),
    }
    assert_eq!(next(&dealer, QUIET).await, None, "a resend adds no credit");

    // An explicit Credit still grants a slot.
    dealer.send(&ToBroker::Credit(Credit { n: 1 })).unwrap();
    let third = dispatch(&dealer).await;
    assert_ne!(third.job_id, second.as_ref().unwrap().job_id);

    stop.cancel();
    tokio::time::timeout(DEADLINE, task).await.expect("loop stops").unwrap();
}
