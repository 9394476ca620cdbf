//! The semaphore's session against a scripted broker on a real socket: it
//! speaks the protocol of `docs/PROTOCOL.md` ("Gates") with the broker's
//! rules (a fire is created once per gate, key and reason), keeps its record
//! across its own "restarts", and lets each test look at what the semaphore
//! sent. Every wait polls a condition under a deadline.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use jobz_core::gates;
use jobz_core::protocol::*;
use jobz_core::transport::{PeerId, Router, SocketOptions, TransportError};
use semaphore::{SemaphoreConfig, SemaphoreError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);

const FILE: &str = r#"
jobs:
  shard:
    command: "echo {date} {shard}"
    params:
      date: { required: true }
      shard: { required: true }
  merge:
    command: "echo {date}"
    params:
      date: { required: true }
  notify:
    command: "echo {what}"
    params:
      what: { required: true }
gates:
  shards_done:
    after: [ shard ]
    count: 10
    key: "{date}"
    then: { job: merge, params: { date: "{date}" } }
    timeout: 1h
    on_failure: { job: notify, params: { what: "gate {gate} {key} failed" } }
  quick:
    after: [ notify ]
    count: 2
    key: "{what}"
    then: { job: merge, params: { date: "{what}" } }
    timeout: 1s
    on_timeout: { job: notify, params: { what: "gate {gate} {key} timed out" } }
"#;

fn file() -> Arc<config::JobFile> {
    Arc::new(config::parse("session.yaml", FILE).unwrap_or_else(|e| panic!("{e}")))
}

/// What the scripted broker keeps, across its restarts, and what it saw.
#[derive(Default)]
struct Record {
    gates_digest: String,
    events: Vec<GateEvent>,
    /// The job of each (gate, key, reason) fired; the broker's idempotent record.
    fires: BTreeMap<(String, String, FireReason), String>,
    /// The fires that created a job, in order.
    created: Vec<Fire>,
    fire_messages: usize,
    /// Fires to leave unanswered, to see them resent.
    ignore_fires: usize,
    /// The `from` of every Subscribe, with the broker incarnation that got it.
    subscribes: Vec<(u32, u64)>,
    hellos: Vec<Hello>,
    goodbyes: usize,
    incarnation: u32,
}

impl Record {
    fn push_event(&mut self, kind: GateEventKind, job_name: &str, params: &[(&str, &str)], at: DateTime<Utc>) {
        let seq = self.events.last().map_or(0, |e| e.seq + 2); // numbers may be skipped
        self.events.push(GateEvent {
            seq,
            kind,
            job_id: format!("job-{seq}"),
            job_name: job_name.into(),
            params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            run_id: "run-1".into(),
            attempt: 1,
            at,
        });
    }

    fn next_seq(&self) -> u64 {
        self.events.last().map_or(0, |e| e.seq + 1)
    }

    fn subscribed_from(&self, from: u64) -> usize {
        self.subscribes.iter().filter(|(_, f)| *f == from).count()
    }
}

struct Broker {
    record: Arc<Mutex<Record>>,
    endpoint: String,
    ctx: zmq::Context,
    serving: Option<(CancellationToken, JoinHandle<Router>)>,
}

impl Broker {
    async fn start(ctx: &zmq::Context) -> Broker {
        let record = Record { gates_digest: gates::digest(&file()), ..Record::default() };
        let mut broker =
            Broker { record: Arc::new(Mutex::new(record)), endpoint: String::new(), ctx: ctx.clone(), serving: None };
        let router = within("bind", bind_free(ctx)).await;
        broker.endpoint = router.local_endpoint().to_string();
        broker.serve(router);
        broker
    }

    fn record(&self) -> MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn serve(&mut self, router: Router) {
        let stop = CancellationToken::new();
        let record = self.record.clone();
        record.lock().unwrap_or_else(|e| e.into_inner()).incarnation += 1;
        let task = tokio::spawn(serve(router, record, stop.clone()));
        self.serving = Some((stop, task));
    }

    /// Stops answering and closes the socket, keeping the record (a broker that died).
    async fn stop(&mut self) {
        if let Some((stop, task)) = self.serving.take() {
            stop.cancel();
            let router = within("the broker task", task).await.unwrap();
            within("router shutdown", tokio::task::spawn_blocking(move || router.shutdown())).await.unwrap().unwrap();
        }
    }

    /// Binds the same endpoint again, with the same record and no memory of its peers.
    async fn restart(&mut self) {
        self.stop().await;
        let router = within("rebind", async {
            loop {
                match Router::bind(&self.ctx, &self.endpoint, &options()) {
                    Ok(router) => break router,
                    Err(TransportError::Bind { .. }) => tokio::time::sleep(Duration::from_millis(10)).await,
                    Err(e) => panic!("{e}"),
                }
            }
        })
        .await;
        self.serve(router);
    }
}

async fn serve(router: Router, record: Arc<Mutex<Record>>, stop: CancellationToken) -> Router {
    let mut known: HashSet<PeerId> = HashSet::new();
    loop {
        let incoming = tokio::select! {
            _ = stop.cancelled() => return router,
            incoming = router.recv() => match incoming { Some(i) => i, None => return router },
        };
        let peer = incoming.peer;
        let Ok(message) = incoming.message else {
            let _ = router.send(&peer, &ToWorker::Error(ErrorReply { message: "bad message".into() }));
            continue;
        };
        let reply = {
            let mut r = record.lock().unwrap_or_else(|e| e.into_inner());
            match message {
                ToBroker::Hello(hello) => {
                    r.hellos.push(hello);
                    known.insert(peer.clone());
                    Some(ToWorker::Welcome(Welcome {
                        heartbeat_ms: 200,
                        lease_timeout_ms: 2000,
                        drift: vec![],
                        url: None,
                    }))
                }
                _ if !known.contains(&peer) => Some(ToWorker::Reconnect),
                ToBroker::Heartbeat => Some(ToWorker::Heartbeat),
                ToBroker::Goodbye(_) => {
                    r.goodbyes += 1;
                    None
                }
                ToBroker::Subscribe(Subscribe { gates_digest, from }) => {
                    let incarnation = r.incarnation;
                    r.subscribes.push((incarnation, from));
                    if gates_digest != r.gates_digest {
                        Some(ToWorker::Error(ErrorReply {
                            message: format!(
                                "the semaphore's gates (digest {gates_digest}) differ from the broker's ({})",
                                r.gates_digest
                            ),
                        }))
                    } else {
                        let events = r.events.iter().filter(|e| e.seq >= from).cloned();
                        Some(ToWorker::Events(Events::page(from, events).page))
                    }
                }
                ToBroker::Fire(fire) => {
                    r.fire_messages += 1;
                    if r.ignore_fires > 0 {
                        r.ignore_fires -= 1;
                        None
                    } else {
                        Some(ToWorker::Fired(fired(&mut r, fire)))
                    }
                }
                other => panic!("a semaphore sent {other:?}"),
            }
        };
        if let Some(reply) = reply {
            // The peer may have gone (a semaphore that stopped); that is its business.
            let _ = router.send(&peer, &reply);
        }
    }
}

/// The broker's rule: one job per (gate, key, reason); a fire that conflicts
/// with one recorded for the key gets that one's job.
fn fired(r: &mut Record, fire: Fire) -> Fired {
    let id = (fire.gate.clone(), fire.key.clone(), fire.reason);
    let answer = |job_id: String, created| Fired {
        gate: fire.gate.clone(),
        key: fire.key.clone(),
        reason: fire.reason,
        job_id,
        created,
        error: None,
    };
    if let Some(job_id) = r.fires.get(&id) {
        return answer(job_id.clone(), false);
    }
    let recorded: Vec<_> =
        r.fires.keys().filter(|(g, k, _)| *g == fire.gate && *k == fire.key).map(|(_, _, reason)| *reason).collect();
    let reasons: Vec<_> = recorded.iter().map(|r| (*r).into()).collect();
    if gates::fire_conflicts(&reasons, fire.reason.into()) {
        let winner = r.fires[&(fire.gate.clone(), fire.key.clone(), recorded[0])].clone();
        return answer(winner, false);
    }
    let job_id = format!("gate-job-{}", r.created.len() + 1);
    r.fires.insert(id, job_id.clone());
    r.created.push(fire.clone());
    answer(job_id, true)
}

fn options() -> SocketOptions {
    SocketOptions { linger: Duration::ZERO, ..SocketOptions::DEFAULT }
}

/// A router on a port below the ephemeral range: a dealer dialling a free
/// ephemeral port while nothing listens could connect to itself.
async fn bind_free(ctx: &zmq::Context) -> Router {
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut seed = (u64::from(std::process::id()) << 32) ^ clock.as_nanos() as u64 | 1;
    loop {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let endpoint = format!("tcp://127.0.0.1:{}", 20_000 + seed % 10_000);
        match Router::bind(ctx, &endpoint, &options()) {
            Ok(router) => return router,
            Err(TransportError::Bind { .. }) => tokio::task::yield_now().await,
            Err(e) => panic!("{e}"),
        }
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: nothing within {DEADLINE:?}"),
    }
}

/// Polls `cond` on the broker's record every 20 ms until it holds, or panics after `DEADLINE`.
async fn wait(broker: &Broker, what: &str, cond: impl Fn(&Record) -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond(&broker.record()) {
        if Instant::now() >= deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Running {
    stop: CancellationToken,
    task: JoinHandle<Result<(), SemaphoreError>>,
}

fn start(ctx: &zmq::Context, endpoint: &str, name: &str, file: Arc<config::JobFile>) -> Running {
    let config = SemaphoreConfig { broker: endpoint.to_string(), file, name: name.into(), curve: None, local: None };
    let stop = CancellationToken::new();
    let ctx = ctx.clone();
    let token = stop.clone();
    let task = tokio::spawn(async move { semaphore::run(config, &ctx, token).await });
    Running { stop, task }
}

impl Running {
    async fn stop(self) -> Result<(), SemaphoreError> {
        self.stop.cancel();
        within("the semaphore to stop", self.task).await.unwrap()
    }
}

fn shards(r: &mut Record, date: &str, range: std::ops::Range<u32>) {
    for i in range {
        r.push_event(GateEventKind::Succeeded, "shard", &[("date", date), ("shard", &i.to_string())], Utc::now());
    }
}

/// The semaphore has read every event there is, and asked again since.
async fn caught_up(broker: &Broker) {
    let next = broker.record().next_seq();
    wait(broker, &format!("the semaphore to poll from {next} twice"), |r| r.subscribed_from(next) >= 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_shards_fire_then_once_and_nine_never() {
    let ctx = zmq::Context::new();
    let broker = Broker::start(&ctx).await;
    shards(&mut broker.record(), "d1", 0..9);
    let semaphore = start(&ctx, &broker.endpoint, "s1", file());
    caught_up(&broker).await;
    {
        let r = broker.record();
        assert_eq!(r.fire_messages, 0, "nine of ten fire nothing");
        let hello = &r.hellos[0];
        assert_eq!((hello.role, hello.concurrency, hello.credit, hello.jobs.len()), (Role::Semaphore, 0, 0, 0));
        assert_eq!(r.subscribes[0], (1, 0), "a new semaphore reads from the first event");
    }

    shards(&mut broker.record(), "d1", 9..10);
    wait(&broker, "the gate to fire", |r| r.created.len() == 1).await;
    caught_up(&broker).await;
    {
        let r = broker.record();
        let fire = &r.created[0];
        assert_eq!((fire.gate.as_str(), fire.key.as_str(), fire.reason), ("shards_done", "d1", FireReason::Then));
        assert_eq!(fire.job_name, "merge");
        assert_eq!(fire.params, BTreeMap::from([("date".to_string(), "d1".to_string())]));
        assert_eq!(fire.run_id.as_deref(), Some("run-1"));
        assert_eq!(fire.parent_id.as_deref(), Some(r.events[9].job_id.as_str()));
        assert_eq!(r.fire_messages, 1, "answered at once, so sent once");
    }
    semaphore.stop().await.unwrap();
    wait(&broker, "a stopping semaphore to say goodbye", |r| r.goodbyes == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_fire_is_sent_again_until_the_broker_answers() {
    let ctx = zmq::Context::new();
    let broker = Broker::start(&ctx).await;
    {
        let mut r = broker.record();
        r.ignore_fires = 1;
        shards(&mut r, "d1", 0..10);
    }
    let semaphore = start(&ctx, &broker.endpoint, "s1", file());
    wait(&broker, "the fire to be sent again and answered", |r| r.created.len() == 1 && r.fire_messages == 2).await;
    semaphore.stop().await.unwrap();
    assert_eq!(broker.record().created.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gates_that_differ_from_the_brokers_are_refused_with_the_brokers_message() {
    let ctx = zmq::Context::new();
    let broker = Broker::start(&ctx).await;
    broker.record().gates_digest = "0000000000000000".into();
    let semaphore = start(&ctx, &broker.endpoint, "s1", file());
    match within("the semaphore to give up", semaphore.task).await.unwrap() {
        Err(SemaphoreError::Refused(message)) => {
            assert!(message.contains("differ from the broker's (0000000000000000)"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_is_down_at_start_is_waited_for() {
    let ctx = zmq::Context::new();
    let mut broker = Broker::start(&ctx).await;
    broker.stop().await;
    shards(&mut broker.record(), "d1", 0..10);
    let semaphore = start(&ctx, &broker.endpoint, "s1", file());
    // Not a wait for a condition: the scenario needs the semaphore to have found no broker for a while.
    tokio::time::sleep(semaphore::limits::BROKER_TIMEOUT + Duration::from_millis(500)).await;
    assert!(!semaphore.task.is_finished(), "a missing broker is not a reason to stop");
    broker.restart().await;
    wait(&broker, "the gate to fire", |r| r.created.len() == 1).await;
    semaphore.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_the_semaphore_resumes_where_it_was_and_fires_once() {
    let ctx = zmq::Context::new();
    let mut broker = Broker::start(&ctx).await;
    shards(&mut broker.record(), "d1", 0..5);
    let semaphore = start(&ctx, &broker.endpoint, "s1", file());
    caught_up(&broker).await;
    let resume_from = broker.record().next_seq();

    broker.restart().await;
    shards(&mut broker.record(), "d1", 5..10);
    wait(&broker, "the gate to fire", |r| r.created.len() == 1).await;
    caught_up(&broker).await;
    {
        let r = broker.record();
        let after_restart: Vec<u64> = r.subscribes.iter().filter(|(i, _)| *i == 2).map(|(_, f)| *f).collect();
        assert_eq!(after_restart.first(), Some(&resume_from), "resumed, not rebuilt: {after_restart:?}");
        assert!(r.hellos.len() >= 2, "registered again");
        assert_eq!(r.created.len(), 1);
    }
    semaphore.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_semaphore_rebuilds_from_the_first_event_and_fires_nothing_new() {
    let ctx = zmq::Context::new();
    let broker = Broker::start(&ctx).await;
    shards(&mut broker.record(), "d1", 0..10);
    shards(&mut broker.record(), "d2", 0..4);
    let first = start(&ctx, &broker.endpoint, "s1", file());
    wait(&broker, "the gate to fire", |r| r.created.len() == 1).await;
    first.stop().await.unwrap();

    let second = start(&ctx, &broker.endpoint, "s1", file());
    wait(&broker, "the rebuild to send its fire again", |r| r.fire_messages == 2).await;
    shards(&mut broker.record(), "d2", 4..10);
    wait(&broker, "d2 to fire", |r| r.created.len() == 2).await;
    caught_up(&broker).await;
    {
        let r = broker.record();
        assert_eq!(r.subscribed_from(0), 2, "each semaphore started from the first event");
        let keys: Vec<&str> = r.created.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(keys, ["d1", "d2"]);
    }
    second.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_semaphores_side_by_side_create_one_job() {
    let ctx = zmq::Context::new();
    let broker = Broker::start(&ctx).await;
    let a = start(&ctx, &broker.endpoint, "s1", file());
    let b = start(&ctx, &broker.endpoint, "s2", file());
    wait(&broker, "both semaphores to subscribe", |r| r.hellos.len() >= 2).await;
    shards(&mut broker.record(), "d1", 0..10);
    wait(&broker, "both semaphores to fire", |r| r.fire_messages >= 2).await;
    assert_eq!(broker.record().created.len(), 1);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incomplete_key_times_out_once_and_later_successes_do_not_fire_then() {
    let ctx = zmq::Context::new();
    let broker = Broker::start(&ctx).await;
    broker.record().push_event(GateEventKind::Succeeded, "notify", &[("what", "w")], Utc::now());
    let semaphore = start(&ctx, &broker.endpoint, "s1", file());
    wait(&broker, "the key to time out", |r| r.created.len() == 1).await;
    {
        let r = broker.record();
        let fire = &r.created[0];
        assert_eq!((fire.gate.as_str(), fire.key.as_str(), fire.reason), ("quick", "w", FireReason::Timeout));
        assert_eq!(fire.params["what"], "gate quick w timed out");
    }
    broker.record().push_event(GateEventKind::Succeeded, "notify", &[("what", "w")], Utc::now());
    caught_up(&broker).await;
    assert_eq!(broker.record().created.len(), 1, "a key given up never completes");
    semaphore.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_fails_for_good_fires_on_failure_once() {
    let ctx = zmq::Context::new();
    let broker = Broker::start(&ctx).await;
    {
        let mut r = broker.record();
        shards(&mut r, "d1", 0..3);
        r.push_event(GateEventKind::FailedForGood, "shard", &[("date", "d1"), ("shard", "3")], Utc::now());
        r.push_event(GateEventKind::FailedForGood, "shard", &[("date", "d1"), ("shard", "4")], Utc::now());
    }
    let semaphore = start(&ctx, &broker.endpoint, "s1", file());
    wait(&broker, "on_failure to fire", |r| r.created.len() == 1).await;
    caught_up(&broker).await;
    {
        let r = broker.record();
        assert_eq!(r.created.len(), 1);
        let fire = &r.created[0];
        assert_eq!((fire.key.as_str(), fire.reason, fire.job_name.as_str()), ("d1", FireReason::Failure, "notify"));
        assert_eq!(fire.params["what"], "gate shards_done d1 failed");
    }
    semaphore.stop().await.unwrap();
}
