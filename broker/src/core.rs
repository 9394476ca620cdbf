//! The broker's loop: queues per job name, dispatch to workers with credit,
//! fenced leases, results, retries and follow-ups.
//!
//! One task owns all dispatch state and handles one closed `Event` at a time
//! (every input is visible in one place). The store is the durable truth; the
//! loop's memory (queues, running attempts, workers) is rebuilt from it at
//! start. Starts from the front door are stored by the caller first, so a 202
//! never waits on this loop; results are acknowledged to workers only after
//! they are committed, so a worker holds a result until it is durable.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use config::{JobFile, Mode};
use jobz_core::gates::{GateBook, UpstreamEvent};
use jobz_core::pipeline::{self, AttemptEnd, Decision, GateReason, JobFacts, NewJob, Origin};
use jobz_core::protocol::{self, Dispatch, Held, Hello, LeaseRef, ResultReport, Role, ToBroker, ToWorker, Welcome};
use jobz_core::transport::{Incoming, PeerId, Router, TransportError};
use jobz_core::Status;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::clock::{Clock, SystemClock};
use crate::handle::{ApiError, BrokerHandle, CheckedStart, ServedJob, StartRequest, Started, Waited, WorkerView};
use crate::limits;
use crate::metrics::Metrics;
use crate::model::{
    Admission, AttemptRecord, Change, FireRecord, GateEventKind, GateEventRecord, GuardedInsert, IdempotencyClaim,
    JobFilter, JobRecord, Progress, ScheduleFireRecord,
};
use crate::scheduler::{FireRequest, Schedules};
use crate::store::{SqliteStore, Store, StoreError};
use crate::throttle::{Hold, NameCounts, Throttle};

/// How the broker runs.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub file: Arc<JobFile>,
    /// Holds `logs/` (each job's output); the store lives beside it.
    pub data_dir: PathBuf,
    /// Dispatch to workers whose definition of a job differs from the broker's.
    pub allow_drift: bool,
    /// The front door's URL, given to jobs as `JOBZ_URL`.
    pub url: Option<String>,
    /// How often the broker and workers send heartbeats.
    pub heartbeat: Duration,
    /// A worker silent for this long is gone; its attempts go to other workers.
    pub lease_timeout: Duration,
    /// Finished jobs and their logs are pruned after this long.
    pub retention: Duration,
    /// The scheduler's "now" (the system clock unless a test moves it).
    pub clock: Arc<dyn Clock>,
}

impl BrokerConfig {
    pub fn new(file: Arc<JobFile>, data_dir: PathBuf) -> BrokerConfig {
        BrokerConfig {
            file,
            data_dir,
            allow_drift: false,
            url: None,
            heartbeat: limits::HEARTBEAT_INTERVAL,
            lease_timeout: limits::LEASE_TIMEOUT,
            retention: limits::RETENTION,
            clock: Arc::new(SystemClock),
        }
    }
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot create {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("recovering jobs from the store: {0}")]
    Recover(#[source] StoreError),
}

/// State shared between the broker's loop and its handles.
pub struct Shared {
    pub(crate) config: BrokerConfig,
    pub(crate) store: SqliteStore,
    events: mpsc::Sender<Event>,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<()>>>>,
    snapshot: Mutex<Snapshot>,
    pub(crate) metrics: Metrics,
    bound: AtomicBool,
}

/// What the loop publishes for readers: workers and queue figures.
#[derive(Debug, Default, Clone)]
struct Snapshot {
    /// Connected workers. `GET /workers` asks the loop for their view
    /// instead: building it for every turn cost more than the turn's own work
    /// once a few dozen workers were connected.
    workers: usize,
    /// Queued and running jobs per job name.
    depth: BTreeMap<String, (u64, u64)>,
    /// Names whose queued jobs a limit holds back now, and which.
    holds: BTreeMap<String, Hold>,
}

/// Everything that can happen to the broker's loop.
enum Event {
    /// Jobs committed as queued (new starts, retries by hand): queue them.
    Enqueue(Vec<Queued>),
    /// A message (or garbage) from a worker.
    Net(Incoming),
    /// A batch the loop handed to the store is committed (or not), with the
    /// admissions of its guarded inserts.
    Committed {
        batch: Batch,
        result: Result<Vec<Admission>, StoreError>,
    },
    /// Cancel a queued or running job; the answer says whether the loop knew it.
    Cancel {
        id: String,
        reply: oneshot::Sender<bool>,
    },
    /// Whether the loop has handed the job to a worker. The store learns of a
    /// dispatch a moment later (it is recorded without waiting), so a job that
    /// has just started can still read as queued there.
    IsRunning {
        id: String,
        reply: oneshot::Sender<bool>,
    },
    /// Gate events read from the store for a semaphore's `Subscribe`.
    EventsRead {
        peer: PeerId,
        from: u64,
        through: u64,
        events: Result<Vec<GateEventRecord>, StoreError>,
    },
    /// `GET /gates`.
    Gates {
        reply: oneshot::Sender<serde_json::Value>,
    },
    /// `GET /schedules`.
    Schedules {
        reply: oneshot::Sender<serde_json::Value>,
    },
    /// `GET /workers`.
    Workers {
        reply: oneshot::Sender<Vec<WorkerView>>,
    },
    Tick,
    /// The time a rate limit held a name back is up.
    Wake,
}

/// A job waiting in a queue (or for its retry time).
#[derive(Debug, Clone)]
struct Queued {
    id: String,
    job_name: String,
    params: BTreeMap<String, String>,
    run_id: String,
    parent_id: Option<String>,
    /// Attempts started so far.
    attempts: u32,
    priority: i32,
    /// When it entered its queue, for the dispatch latency metric.
    queued_at: DateTime<Utc>,
    not_before: Option<DateTime<Utc>>,
}

impl Queued {
    fn from_record(r: &JobRecord) -> Queued {
        Queued {
            id: r.id.clone(),
            job_name: r.job_name.clone(),
            params: r.params.clone(),
            run_id: r.run_id.clone(),
            parent_id: r.parent_id.clone(),
            attempts: r.attempts,
            priority: r.priority,
            queued_at: r.queued_at.unwrap_or(r.created_at),
            not_before: r.not_before,
        }
    }
}

/// An attempt handed to a worker.
struct Running {
    job: Queued,
    lease: u64,
    worker: String,
    /// `None` while the worker is not connected (after a broker restart, until it says Hello).
    peer: Option<PeerId>,
    /// For attempts without a connected worker: when they go back to the queue.
    orphaned_until: Option<Instant>,
    /// Whether its start was counted in the metrics (by `Started`, or else by its `Result`).
    start_counted: bool,
    /// A broadcast job runs once on each worker serving it: one copy per
    /// worker, each under its own lease (the first is `lease`). Empty in queue mode.
    copies: Vec<Copy>,
}

/// One worker's run of a broadcast job.
struct Copy {
    lease: u64,
    worker: String,
    peer: Option<PeerId>,
    /// How it ended, once it has.
    ended: Option<(Status, Option<i32>)>,
}

impl Running {
    /// Whether `lease` is this attempt's, or one of its broadcast copies' that has not ended.
    fn holds(&self, lease: u64) -> bool {
        if self.copies.is_empty() {
            self.lease == lease
        } else {
            self.copies.iter().any(|c| c.lease == lease && c.ended.is_none())
        }
    }
}

/// Jobs waiting for their `not_before` (retries in their backoff), by time,
/// with an index by id for cancel and a count per job name for the published
/// queue depth. Every insert and removal goes through here, so the index and
/// the counts cannot drift from the map. The loop publishes after every turn:
/// counting the waiting jobs one by one there made 5,000 retries in backoff
/// cut the front door's starts to a third.
#[derive(Default)]
struct DelayedJobs {
    by_time: BTreeMap<(DateTime<Utc>, String), Queued>,
    at: BTreeMap<String, DateTime<Utc>>,
    per_name: NameCounts,
}

impl DelayedJobs {
    /// Holds `job` until `at`; a job already held waits for the new time only.
    fn insert(&mut self, at: DateTime<Utc>, job: Queued) {
        self.remove(&job.id);
        self.at.insert(job.id.clone(), at);
        self.per_name.add(&job.job_name);
        self.by_time.insert((at, job.id.clone()), job);
    }

    fn remove(&mut self, id: &str) -> Option<Queued> {
        let at = self.at.remove(id)?;
        let job = self.by_time.remove(&(at, id.to_string()))?;
        self.per_name.sub(&job.job_name);
        Some(job)
    }

    /// The job whose time came first, if it is at or before `now`.
    fn pop_due(&mut self, now: DateTime<Utc>) -> Option<Queued> {
        let entry = self.by_time.first_entry()?;
        if entry.key().0 > now {
            return None;
        }
        let ((_, id), job) = entry.remove_entry();
        self.at.remove(&id);
        self.per_name.sub(&job.job_name);
        Some(job)
    }

    /// How many jobs of each name wait, for names with any.
    fn per_name(&self) -> impl Iterator<Item = (&String, u32)> {
        self.per_name.iter()
    }
}

/// The attempts handed out, by job id, with a running count per job name that
/// the mesh-wide limits ([`Throttle`]) read. Every insert and removal goes
/// through here, so the counts cannot drift from the map.
struct RunningJobs {
    map: HashMap<String, Running>,
    throttle: Throttle,
}

impl RunningJobs {
    fn insert(&mut self, id: String, running: Running) {
        self.throttle.started(&running.job.job_name);
        if let Some(old) = self.map.insert(id, running) {
            self.throttle.ended(&old.job.job_name);
        }
    }

    fn remove(&mut self, id: &str) -> Option<Running> {
        let running = self.map.remove(id)?;
        self.throttle.ended(&running.job.job_name);
        Some(running)
    }

    fn get(&self, id: &str) -> Option<&Running> {
        self.map.get(id)
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut Running> {
        self.map.get_mut(id)
    }

    fn contains_key(&self, id: &str) -> bool {
        self.map.contains_key(id)
    }

    fn iter(&self) -> impl Iterator<Item = (&String, &Running)> {
        self.map.iter()
    }
}

/// The connected workers, with an index of who may be given each job name.
/// Every insert and removal goes through here, so the index cannot drift from
/// the map (a worker's `dispatchable` is fixed when it says hello).
#[derive(Default)]
struct Workers {
    map: HashMap<PeerId, Worker>,
    serving: HashMap<String, BTreeSet<PeerId>>,
}

impl Workers {
    fn insert(&mut self, peer: PeerId, worker: Worker) {
        self.remove(&peer);
        for name in &worker.dispatchable {
            self.serving.entry(name.clone()).or_default().insert(peer.clone());
        }
        self.map.insert(peer, worker);
    }

    fn remove(&mut self, peer: &PeerId) -> Option<Worker> {
        let worker = self.map.remove(peer)?;
        for name in &worker.dispatchable {
            if let Some(peers) = self.serving.get_mut(name) {
                peers.remove(peer);
                if peers.is_empty() {
                    self.serving.remove(name);
                }
            }
        }
        Some(worker)
    }

    /// The workers that may be given jobs of `name`.
    fn serving(&self, name: &str) -> impl Iterator<Item = &PeerId> {
        self.serving.get(name).into_iter().flatten()
    }

    /// How many workers may be given jobs of `name`.
    fn serving_count(&self, name: &str) -> usize {
        self.serving.get(name).map_or(0, BTreeSet::len)
    }

    fn get(&self, peer: &PeerId) -> Option<&Worker> {
        self.map.get(peer)
    }

    fn get_mut(&mut self, peer: &PeerId) -> Option<&mut Worker> {
        self.map.get_mut(peer)
    }

    fn contains_key(&self, peer: &PeerId) -> bool {
        self.map.contains_key(peer)
    }

    fn iter(&self) -> impl Iterator<Item = (&PeerId, &Worker)> {
        self.map.iter()
    }

    fn keys(&self) -> impl Iterator<Item = &PeerId> {
        self.map.keys()
    }

    fn values(&self) -> impl Iterator<Item = &Worker> {
        self.map.values()
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

struct Worker {
    name: String,
    host: String,
    concurrency: u32,
    credit: u32,
    /// Job names this worker may be given (known to the broker, same definition or drift allowed).
    dispatchable: Vec<String>,
    jobs: Vec<ServedJob>,
    running: HashSet<String>,
    /// Attempts (job, lease) this worker took a slot for (dispatched to it, or
    /// held running in its `Hello`) whose `Result` has not arrived. The first
    /// `Result` of each, current or stale, frees the slot: it adds one credit
    /// (Credit is folded into Result). Removing the entry makes a resend after
    /// a lost ack free nothing more.
    owed: HashSet<(String, u64)>,
    last_seen: Instant,
    last_heartbeat: DateTime<Utc>,
    connected_at: DateTime<Utc>,
}

/// A change set the loop is committing, with what to do once it is durable.
struct Batch {
    changes: Vec<Change>,
    /// Results to acknowledge to their workers.
    acks: Vec<(PeerId, String, u64)>,
    /// Jobs to queue (follow-ups, requeued attempts, retries at their time).
    enqueue: Vec<Queued>,
    /// Jobs that reached a final status: wake their waiters.
    finished: Vec<String>,
    /// Attempts to put back if the commit fails, so the worker's resend is not taken as stale.
    restore: Vec<Running>,
    /// Gate events in this batch: visible to semaphores once committed.
    events: Vec<GateEventRecord>,
    /// Fires in this batch and their answers to the semaphore that asked.
    fires: Vec<(Option<PeerId>, protocol::Fired)>,
    /// The schedule fire in this batch, if any: (schedule, instant).
    schedule_fire: Option<(String, DateTime<Utc>)>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            changes: Vec::new(),
            acks: Vec::new(),
            enqueue: Vec::new(),
            finished: Vec::new(),
            restore: Vec::new(),
            events: Vec::new(),
            fires: Vec::new(),
            schedule_fire: None,
        }
    }
}

/// Where a job sits in its queue: highest priority first, then first in, first out.
type QueueKey = (std::cmp::Reverse<i32>, u64);
type Queue = BTreeMap<QueueKey, Queued>;

struct State {
    shared: Arc<Shared>,
    router: Router,
    queues: HashMap<String, Queue>,
    /// Where each queued job sits, for cancel. A B-tree, not a hash map: it
    /// grows with the backlog, and a hash map doubles at once, rehashing every
    /// entry in the one call that crosses its capacity (60–70 ms at 229,376
    /// ids here), while the front door and every worker wait for the loop.
    /// Ids are time-ordered, so inserts land at the tree's right edge.
    queued_keys: BTreeMap<String, (String, QueueKey)>,
    /// Retries waiting for their time.
    delayed: DelayedJobs,
    running: RunningJobs,
    workers: Workers,
    /// Connections a newer one took the worker name from, oldest first, with
    /// what to tell them if they speak again (see `limits::SUPERSEDED_PEERS`).
    superseded: VecDeque<(PeerId, String)>,
    /// Such a connection speaks at every heartbeat: its warning is rate-limited apart from bad frames'.
    superseded_log: RateLimitedLog,
    /// Results already committed, so a resend (lost ack) is acknowledged again, not recorded as stale.
    recently_done: VecDeque<(String, u64)>,
    recently_done_set: HashSet<(String, u64)>,
    /// Jobs on their way back to a queue (requeued, retried, followed up) in a
    /// batch not committed yet: readers of the store may already see them
    /// queued while the loop holds them nowhere else.
    entering: HashSet<String>,
    /// Of those, the ones cancelled meanwhile: they are not queued once committed.
    cancelled_entering: HashSet<String>,
    /// The broker's digest of each job definition, for drift detection.
    digests: HashMap<String, String>,
    seq: u64,
    /// Which worker dispatch starts from, turning each time.
    dispatch_turn: usize,
    next_lease: u64,
    last_heartbeat_sent: Instant,
    last_prune: Instant,
    bad_frames: RateLimitedLog,
    gates: Gates,
    schedules: Schedules,
}

/// The broker's side of gates: it records upstream events durably for the
/// semaphores, serves them in order, and records each fire once. Its own
/// [`GateBook`] only shows progress (`GET /gates`); it fires nothing.
struct Gates {
    /// `jobz_core::gates::digest` of the broker's gates; a semaphore with another is refused.
    digest: String,
    /// Job names that some gate waits for: only their ends are recorded.
    upstream: HashSet<String>,
    next_seq: u64,
    /// Events handed to the store and not committed yet.
    pending: BTreeSet<u64>,
    /// Fires by (gate, key): each reason at most once.
    fires: HashMap<(String, String), Vec<FireRecord>>,
    book: GateBook,
    semaphores: HashMap<PeerId, (String, Instant)>,
}

impl Gates {
    /// Every event up to this `seq` is committed: semaphores may read up to here, so none
    /// ever reads past an event that commits later.
    fn watermark(&self) -> u64 {
        match self.pending.first() {
            Some(first) => first - 1,
            None => self.next_seq - 1,
        }
    }
}

/// Starts the broker's loop on `router` with the jobs recovered from `store`.
pub async fn start(
    config: BrokerConfig,
    store: SqliteStore,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(BrokerHandle, tokio::task::JoinHandle<()>), BrokerError> {
    let logs = config.data_dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|source| BrokerError::Io { path: logs.display().to_string(), source })?;
    let unfinished = store.unfinished().await.map_err(BrokerError::Recover)?;
    let gates = load_gates(&config.file, &store).await.map_err(BrokerError::Recover)?;
    let (schedules, first_seen) =
        Schedules::load(&config.file, &store, config.clock.now()).await.map_err(BrokerError::Recover)?;
    if !first_seen.is_empty() {
        // Durable before anything fires: a new schedule never fires for an instant before it was seen.
        store.commit(first_seen).await.map_err(BrokerError::Recover)?;
    }
    let (events, rx) = mpsc::channel(limits::EVENT_QUEUE);
    let shared = Arc::new(Shared {
        config,
        store,
        events,
        waiters: Mutex::new(HashMap::new()),
        snapshot: Mutex::new(Snapshot::default()),
        metrics: Metrics::with_refusals(router.refusals()),
        bound: AtomicBool::new(true),
    });
    let digests =
        shared.config.file.jobs.iter().map(|(name, def)| (name.clone(), protocol::digest(&def.canonical))).collect();
    let now = Instant::now();
    let mut state = State {
        shared: shared.clone(),
        router,
        queues: HashMap::new(),
        queued_keys: BTreeMap::new(),
        delayed: DelayedJobs::default(),
        running: RunningJobs { map: HashMap::new(), throttle: Throttle::new(&shared.config.file) },
        workers: Workers::default(),
        superseded: VecDeque::new(),
        superseded_log: RateLimitedLog::default(),
        recently_done: VecDeque::new(),
        recently_done_set: HashSet::new(),
        entering: HashSet::new(),
        cancelled_entering: HashSet::new(),
        digests,
        seq: 0,
        dispatch_turn: 0,
        next_lease: lease_seed(),
        last_heartbeat_sent: now,
        last_prune: now,
        bad_frames: RateLimitedLog::default(),
        gates,
        schedules,
    };
    state.recover(unfinished);
    let now = state.shared.config.clock.now();
    let catch_up = state.schedules.recover(now);
    state.fire_schedules(catch_up, now);
    state.publish();
    let handle = BrokerHandle { inner: shared };
    let task = tokio::spawn(state.run(rx, shutdown));
    Ok((handle, task))
}

/// Rebuilds the broker's gate state from the store: the fires, the last event
/// number, and the progress book replayed from every recorded event.
async fn load_gates(file: &JobFile, store: &SqliteStore) -> Result<Gates, StoreError> {
    let last = store.last_gate_event().await?;
    let mut fires: HashMap<(String, String), Vec<FireRecord>> = HashMap::new();
    for fire in store.gate_fires().await? {
        fires.entry((fire.gate.clone(), fire.key.clone())).or_default().push(fire);
    }
    let mut book = GateBook::new();
    let mut from = 1;
    while from <= last {
        let page = store.gate_events(from, last, limits::GATE_EVENTS_READ).await?;
        let Some(end) = page.last().map(|e| e.seq) else { break };
        for event in &page {
            book.observe(file, &upstream_event(event), event.at);
        }
        from = end + 1;
    }
    let upstream = file.gates.values().flat_map(|g| g.after.iter().cloned()).collect();
    Ok(Gates {
        digest: jobz_core::gates::digest(file),
        upstream,
        next_seq: last + 1,
        pending: BTreeSet::new(),
        fires,
        book,
        semaphores: HashMap::new(),
    })
}

fn upstream_event(event: &GateEventRecord) -> UpstreamEvent {
    let facts = JobFacts {
        id: event.job_id.clone(),
        job_name: event.job_name.clone(),
        params: event.params.clone(),
        run_id: event.run_id.clone(),
        attempt: event.attempt,
    };
    match event.kind {
        GateEventKind::Succeeded => UpstreamEvent::Succeeded(facts),
        GateEventKind::FailedForGood => UpstreamEvent::FailedForGood(facts),
    }
}

fn wire_event(event: &GateEventRecord) -> protocol::GateEvent {
    protocol::GateEvent {
        seq: event.seq,
        kind: match event.kind {
            GateEventKind::Succeeded => protocol::GateEventKind::Succeeded,
            GateEventKind::FailedForGood => protocol::GateEventKind::FailedForGood,
        },
        job_id: event.job_id.clone(),
        job_name: event.job_name.clone(),
        params: event.params.clone(),
        run_id: event.run_id.clone(),
        attempt: event.attempt,
        at: event.at,
    }
}

/// Leases only need to differ from every earlier lease of the same job, also
/// across restarts: start from the clock in microseconds and count up.
fn lease_seed() -> u64 {
    u64::try_from(Utc::now().timestamp_micros()).unwrap_or(1).max(1)
}

impl State {
    async fn run(mut self, mut events: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(limits::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.rate_wake();
            let event = tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(event) = events.recv() => event,
                Some(incoming) = self.router.recv() => Event::Net(incoming),
                _ = tick.tick() => Event::Tick,
                // A rate-limited name may dispatch again: nothing to handle, `dispatch` below does it.
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => Event::Wake,
            };
            self.handle(event);
            // What else is ready already is handled before dispatching and
            // publishing once for all of it: a burst of starts (or of results)
            // costs one dispatch pass and one snapshot, not one per event.
            for _ in 1..limits::EVENTS_PER_TURN {
                let ready = match events.try_recv() {
                    Ok(event) => event,
                    Err(_) => break,
                };
                self.handle(ready);
            }
            self.dispatch();
            self.publish();
        }
        self.shared.bound.store(false, Ordering::Relaxed);
        // SPEC: on shutdown the broker flushes its store.
        self.shared.store.close().await;
        tracing::info!("broker loop stopped; store flushed");
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Enqueue(jobs) => {
                for job in jobs {
                    self.enqueue(job);
                }
            }
            Event::Net(incoming) => self.on_net(incoming),
            Event::Committed { batch, result } => self.on_committed(batch, result),
            Event::Cancel { id, reply } => {
                let known = self.cancel(&id);
                // The caller may have gone away (client hung up); the cancel stands regardless.
                let _ = reply.send(known);
            }
            Event::IsRunning { id, reply } => {
                // The caller may have hung up; nothing to do then.
                let _ = reply.send(self.running.contains_key(&id));
            }
            Event::Tick => self.on_tick(),
            Event::Wake => {}
            Event::EventsRead { peer, from, through, events } => self.on_events_read(peer, from, through, events),
            Event::Gates { reply } => {
                // The caller may have hung up; nothing to do then.
                let _ = reply.send(self.gates_view());
            }
            Event::Schedules { reply } => {
                // The caller may have hung up; nothing to do then.
                let _ = reply.send(self.schedules.view(self.shared.config.clock.now()));
            }
            Event::Workers { reply } => {
                // The caller may have hung up; nothing to do then.
                let _ = reply.send(self.workers_view());
            }
        }
    }

    /// Rebuilds memory from the store: queued jobs go back in their queues,
    /// running ones wait one lease for their worker to come back and claim them.
    fn recover(&mut self, unfinished: Vec<JobRecord>) {
        let (mut queued, mut running) = (0usize, 0usize);
        let mut batch = Batch::new();
        let now = Utc::now();
        for record in unfinished {
            if !self.shared.config.file.jobs.contains_key(&record.job_name) {
                tracing::warn!(job = %record.id, name = %record.job_name, "job no longer in the job file; failed");
                batch.changes.push(Change::Fail {
                    id: record.id.clone(),
                    at: now,
                    error: format!("job {:?} is no longer in the broker's job file", record.job_name),
                });
                batch.finished.push(record.id.clone());
                continue;
            }
            match (record.status, record.lease) {
                (Status::Running, Some(lease)) => {
                    running += 1;
                    self.running.insert(
                        record.id.clone(),
                        Running {
                            job: Queued::from_record(&record),
                            lease,
                            worker: record.worker.clone().unwrap_or_default(),
                            peer: None,
                            orphaned_until: Some(Instant::now() + self.shared.config.lease_timeout),
                            copies: Vec::new(),
                            // Recovered: its start happened before this broker, and was counted by it.
                            start_counted: true,
                        },
                    );
                }
                _ => {
                    queued += 1;
                    self.enqueue(Queued::from_record(&record));
                }
            }
        }
        if !batch.changes.is_empty() {
            self.commit(batch);
        }
        tracing::info!(queued, running, "recovered unfinished jobs from the store");
    }

    fn enqueue(&mut self, job: Queued) {
        if let Some(at) = job.not_before.filter(|t| *t > Utc::now()) {
            self.delayed.insert(at, job);
            return;
        }
        self.seq += 1;
        let key = (std::cmp::Reverse(job.priority), self.seq);
        self.queued_keys.insert(job.id.clone(), (job.job_name.clone(), key));
        match self.queues.get_mut(&job.job_name) {
            Some(queue) => {
                queue.insert(key, job);
            }
            None => {
                self.queues.insert(job.job_name.clone(), Queue::from([(key, job)]));
            }
        }
    }

    fn pop(&mut self, name: &str) -> Option<Queued> {
        let (_, job) = self.queues.get_mut(name)?.pop_first()?;
        self.queued_keys.remove(&job.id);
        Some(job)
    }

    /// Hands queued jobs to workers that have credit, round-robin over the
    /// names each serves. Each hand-over is O(log n) in the backlog.
    /// A name held back by its `concurrency` or `rate` is skipped, so the
    /// names behind it keep flowing.
    ///
    /// Workers take turns, one job each per round, starting from a different
    /// worker each time, so jobs spread over the mesh instead of filling the
    /// first worker's slots.
    ///
    /// It runs after every turn of the loop, so it looks at as few workers as
    /// it can: either those that serve a name with jobs ready (and a limit that
    /// lets one go now), or those with credit, whichever are fewer. With jobs
    /// of a name no idle worker serves, or every worker busy, a turn costs a
    /// look at each queue and at each worker's credit, not every worker's names.
    fn dispatch(&mut self) {
        let now = Instant::now();
        let throttle = &self.running.throttle;
        let ready: Vec<&String> = self
            .queues
            .iter()
            .filter(|(name, q)| !q.is_empty() && throttle.admits(name, now).is_ok())
            .map(|(name, _)| name)
            .collect();
        if ready.is_empty() {
            return;
        }
        let with_credit = self.workers.values().filter(|w| w.credit > 0).count();
        let serving: usize = ready.iter().map(|name| self.workers.serving_count(name)).sum();
        let mut active: Vec<PeerId> = if serving <= with_credit {
            ready
                .iter()
                .flat_map(|name| self.workers.serving(name))
                .filter(|peer| self.workers.get(peer).is_some_and(|w| w.credit > 0))
                .cloned()
                .collect()
        } else {
            // Each finds its name, if any, in `next_name_for` below.
            self.workers.iter().filter(|(_, w)| w.credit > 0).map(|(peer, _)| peer.clone()).collect()
        };
        if active.is_empty() {
            return;
        }
        // A worker serving several ready names is one worker.
        active.sort_unstable();
        active.dedup();
        self.dispatch_turn = self.dispatch_turn.wrapping_add(1);
        let turn = self.dispatch_turn % active.len();
        active.rotate_left(turn);
        while !active.is_empty() {
            let mut again = Vec::with_capacity(active.len());
            for peer in active {
                let Some(name) = self.next_name_for(&peer, now) else { continue };
                let Some(job) = self.pop(&name) else { continue };
                let broadcast = self.shared.config.file.jobs.get(&name).is_some_and(|d| d.mode == Mode::Broadcast);
                let sent = if broadcast { self.broadcast_job(job) } else { self.send_job(&peer, job) };
                // A worker that could not be sent to sits out until the next event.
                if sent {
                    self.running.throttle.dispatched(&name, now);
                    again.push(peer);
                }
            }
            active = again;
        }
    }

    /// The name whose next job `peer` should run, if it has credit: of the
    /// names it serves that have jobs queued and whose limits let one go now,
    /// the one whose first job has the highest priority, and among equals the
    /// one queued first. So priorities and first-in, first-out hold across
    /// names too, and a held name is passed over.
    fn next_name_for(&self, peer: &PeerId, now: Instant) -> Option<String> {
        let worker = self.workers.get(peer)?;
        if worker.credit == 0 {
            return None;
        }
        let throttle = &self.running.throttle;
        worker
            .dispatchable
            .iter()
            .filter_map(|name| Some((self.queues.get(name)?.first_key_value()?.0, name)))
            .filter(|(_, name)| throttle.admits(name, now).is_ok())
            .min_by_key(|(key, _)| **key)
            .map(|(_, name)| name.clone())
    }

    /// When the loop must wake to dispatch a rate-limited name that has jobs waiting.
    fn rate_wake(&self) -> Option<Instant> {
        let throttle = &self.running.throttle;
        let waiting = throttle.rate_limited().filter(|name| self.queues.get(*name).is_some_and(|q| !q.is_empty()));
        throttle.next_wake(waiting, Instant::now())
    }

    /// Sends `job` to `peer` under a fresh lease; false (and the job back in
    /// its queue) when the worker cannot be reached.
    fn send_job(&mut self, peer: &PeerId, mut job: Queued) -> bool {
        let Some(worker) = self.workers.get_mut(peer) else {
            self.enqueue(job);
            return false;
        };
        self.next_lease += 1;
        let lease = self.next_lease;
        let now = Utc::now();
        let message = ToWorker::Dispatch(Dispatch {
            job_id: job.id.clone(),
            job_name: job.job_name.clone(),
            params: job.params.clone(),
            run_id: job.run_id.clone(),
            parent_id: job.parent_id.clone(),
            attempt: job.attempts + 1,
            lease,
        });
        // Not waiting for the transport: a worker that vanished is not learnt
        // of here. Its attempt then waits for the lease: the silent worker is
        // dropped after `lease_timeout` (or replaced by its own new Hello) and
        // the job is requeued. Only local failures (the transport's queue) show.
        if let Err(e) = self.router.send_nowait(peer, &message) {
            tracing::warn!(worker = %worker.name, error = %e, "cannot send to the worker; it gets no more jobs until it is heard from");
            worker.credit = 0;
            self.enqueue(job);
            return false;
        }
        job.attempts += 1;
        worker.credit -= 1;
        worker.running.insert(job.id.clone());
        worker.owed.insert((job.id.clone(), lease));
        let queued_for = (now - job.queued_at).to_std().unwrap_or_default();
        self.shared.metrics.dispatched(&job.job_name, queued_for);
        let change = Change::Dispatch {
            id: job.id.clone(),
            job_name: job.job_name.clone(),
            attempt: job.attempts,
            worker: worker.name.clone(),
            lease,
            at: now,
        };
        if let Err(e) = self.shared.store.commit_later(vec![change]) {
            tracing::warn!(error = %e, job = %job.id, "recording a dispatch failed; the job still runs");
        }
        let worker = worker.name.clone();
        self.running.insert(
            job.id.clone(),
            Running {
                job,
                lease,
                worker,
                peer: Some(peer.clone()),
                orphaned_until: None,
                copies: Vec::new(),
                start_counted: false,
            },
        );
        true
    }

    /// Sends a broadcast job to every connected worker that serves it, each
    /// under its own lease; the job ends when every copy has.
    fn broadcast_job(&mut self, mut job: Queued) -> bool {
        let now = Utc::now();
        let peers: Vec<PeerId> = self.workers.serving(&job.job_name).cloned().collect();
        let mut copies = Vec::new();
        let mut changes = Vec::new();
        // The copies are one attempt of the job, each on its own worker under its own lease.
        let attempt = job.attempts + 1;
        for peer in peers {
            let Some(worker) = self.workers.get_mut(&peer) else { continue };
            self.next_lease += 1;
            let lease = self.next_lease;
            let message = ToWorker::Dispatch(Dispatch {
                job_id: job.id.clone(),
                job_name: job.job_name.clone(),
                params: job.params.clone(),
                run_id: job.run_id.clone(),
                parent_id: job.parent_id.clone(),
                attempt,
                lease,
            });
            // Not waiting: a vanished worker's copy is lost with the worker (see `send_job`).
            if let Err(e) = self.router.send_nowait(&peer, &message) {
                tracing::warn!(worker = %worker.name, error = %e, "cannot send a broadcast to the worker");
                continue;
            }
            // A broadcast takes every serving worker at once, whatever its credit says.
            worker.credit = worker.credit.saturating_sub(1);
            worker.running.insert(job.id.clone());
            worker.owed.insert((job.id.clone(), lease));
            let name = worker.name.clone();
            changes.push(if copies.is_empty() {
                Change::Dispatch {
                    id: job.id.clone(),
                    job_name: job.job_name.clone(),
                    attempt,
                    worker: name.clone(),
                    lease,
                    at: now,
                }
            } else {
                Change::AttemptStart { id: job.id.clone(), attempt, worker: name.clone(), lease, at: now }
            });
            copies.push(Copy { lease, worker: name, peer: Some(peer), ended: None });
        }
        let Some(first) = copies.first() else {
            self.enqueue(job);
            return false;
        };
        let (lease, worker, peer) = (first.lease, first.worker.clone(), first.peer.clone());
        job.attempts = attempt;
        self.shared.metrics.dispatched(&job.job_name, (now - job.queued_at).to_std().unwrap_or_default());
        if let Err(e) = self.shared.store.commit_later(changes) {
            tracing::warn!(error = %e, job = %job.id, "recording a broadcast failed; the job still runs");
        }
        self.running.insert(
            job.id.clone(),
            Running { job, lease, worker, peer, orphaned_until: None, copies, start_counted: false },
        );
        true
    }

    fn on_net(&mut self, incoming: Incoming) {
        let peer = incoming.peer;
        let message = match incoming.message {
            Ok(m) => m,
            Err(e) => {
                self.shared.metrics.bad_frame();
                if self.bad_frames.allow() {
                    let suppressed = self.bad_frames.take_suppressed();
                    tracing::warn!(peer = ?peer, error = %e, suppressed, "dropped a bad message");
                }
                // Tell the peer where it can be told; a garbage sender may not listen, and that is fine.
                let _ = self.router.send(&peer, &ToWorker::Error(protocol::ErrorReply { message: e.to_string() }));
                return;
            }
        };
        if let Some(worker) = self.workers.get_mut(&peer) {
            worker.last_seen = Instant::now();
            worker.last_heartbeat = Utc::now();
        }
        if let Some((_, seen)) = self.gates.semaphores.get_mut(&peer) {
            *seen = Instant::now();
        }
        match message {
            ToBroker::Hello(hello) if hello.role == Role::Semaphore => self.on_semaphore_hello(peer, hello),
            ToBroker::Hello(hello) => self.on_hello(peer, hello),
            ToBroker::Subscribe(subscribe) if self.gates.semaphores.contains_key(&peer) => {
                self.on_subscribe(peer, subscribe)
            }
            ToBroker::Fire(fire) if self.gates.semaphores.contains_key(&peer) => self.on_fire(Some(peer), fire),
            ToBroker::Heartbeat if self.gates.semaphores.contains_key(&peer) => {}
            _ if !self.workers.contains_key(&peer) => {
                if let Some((_, why)) = self.superseded.iter().find(|(p, _)| *p == peer) {
                    // Asked to register, it would take the name back from the newer
                    // connection, which would then do the same, for as long as both run.
                    if self.superseded_log.allow() {
                        let suppressed = self.superseded_log.take_suppressed();
                        tracing::warn!(peer = ?peer, suppressed, "{why}");
                    }
                    let _ = self.router.send(&peer, &ToWorker::Error(protocol::ErrorReply { message: why.clone() }));
                } else {
                    // Typically a worker that outlived a broker restart: it must register again.
                    let _ = self.router.send(&peer, &ToWorker::Reconnect);
                }
            }
            // Results give their slot back themselves; Credit is for other grants.
            ToBroker::Credit(protocol::Credit { n }) => {
                if let Some(w) = self.workers.get_mut(&peer) {
                    let free = w.concurrency.saturating_sub(w.running.len() as u32);
                    w.credit = w.credit.saturating_add(n).min(free);
                }
            }
            ToBroker::Heartbeat => {}
            ToBroker::Started(protocol::Started { job_id, lease, at }) => {
                if let Some(r) = self.running.get_mut(&job_id).filter(|r| r.holds(lease) && !r.start_counted) {
                    r.start_counted = true;
                    let latency = (at - r.job.queued_at).to_std().unwrap_or_default();
                    self.shared.metrics.started(latency);
                }
            }
            ToBroker::Output(protocol::Output { job_id, lease, offset, data }) => {
                self.on_output(&job_id, lease, offset, &data)
            }
            ToBroker::Progress(protocol::Progress { job_id, lease, percent, message }) => {
                if self.running.get(&job_id).is_some_and(|r| r.holds(lease)) && (0.0..=100.0).contains(&percent) {
                    let change = Change::Progress { id: job_id, progress: Progress { percent, message } };
                    if let Err(e) = self.shared.store.commit_later(vec![change]) {
                        tracing::debug!(error = %e, "progress not recorded");
                    }
                }
            }
            ToBroker::Result(result) => self.on_result(peer, result),
            ToBroker::Goodbye(goodbye) => self.on_goodbye(&peer, goodbye.hand_back),
            ToBroker::Subscribe(_) | ToBroker::Fire(_) => {
                let message = "only a semaphore may subscribe to gate events or fire gates".to_string();
                let _ = self.router.send(&peer, &ToWorker::Error(protocol::ErrorReply { message }));
            }
        }
    }

    /// Answers a Hello of `name` with `welcome`; false when it could not be sent.
    fn welcome(&self, peer: &PeerId, name: &str, welcome: &ToWorker) -> bool {
        match self.router.send(peer, welcome) {
            Ok(()) => true,
            // A peer that said Hello on its way out (a draining worker's last Hello) and is gone.
            Err(TransportError::UnknownPeer { .. }) => {
                tracing::debug!(peer = name, "the peer left before its Welcome");
                false
            }
            Err(e) => {
                tracing::warn!(peer = name, error = %e, "cannot answer Hello");
                false
            }
        }
    }

    fn on_semaphore_hello(&mut self, peer: PeerId, hello: Hello) {
        let welcome = ToWorker::Welcome(Welcome {
            heartbeat_ms: self.shared.config.heartbeat.as_millis() as u64,
            lease_timeout_ms: self.shared.config.lease_timeout.as_millis() as u64,
            drift: Vec::new(),
            url: self.shared.config.url.clone(),
        });
        if !self.welcome(&peer, &hello.name, &welcome) {
            return;
        }
        if self.gates.semaphores.insert(peer, (hello.name.clone(), Instant::now())).is_none() {
            tracing::info!(semaphore = %hello.name, host = %hello.host, "semaphore joined");
        }
    }

    fn on_subscribe(&mut self, peer: PeerId, subscribe: protocol::Subscribe) {
        if subscribe.gates_digest != self.gates.digest {
            let name = self.gates.semaphores.remove(&peer).map(|(n, _)| n).unwrap_or_default();
            tracing::warn!(semaphore = %name, "refused a semaphore whose gates differ from the broker's");
            let message = "this semaphore's gates differ from the broker's: run it with the broker's job file".into();
            let _ = self.router.send(&peer, &ToWorker::Error(protocol::ErrorReply { message }));
            return;
        }
        let through = self.gates.watermark();
        if subscribe.from > through {
            let page = protocol::Events { from: subscribe.from, events: Vec::new(), next: subscribe.from };
            let _ = self.router.send(&peer, &ToWorker::Events(page));
            return;
        }
        let store = self.shared.store.clone();
        let events = self.shared.events.clone();
        let from = subscribe.from;
        tokio::spawn(async move {
            let read = store.gate_events(from, through, protocol::limits::EVENTS_PAGE_MAX).await;
            // The loop is gone only at shutdown; the semaphore asks again elsewhere.
            let _ = events.send(Event::EventsRead { peer, from, through, events: read }).await;
        });
    }

    fn on_events_read(
        &mut self,
        peer: PeerId,
        from: u64,
        through: u64,
        events: Result<Vec<GateEventRecord>, StoreError>,
    ) {
        let events = match events {
            Ok(events) => events,
            Err(e) => {
                // The semaphore asks again after its poll interval.
                tracing::warn!(error = %e, "cannot read gate events for a semaphore");
                return;
            }
        };
        let complete = events.len() < protocol::limits::EVENTS_PAGE_MAX;
        let built = protocol::Events::page(from, events.iter().map(wire_event));
        for seq in &built.skipped {
            tracing::error!(seq, "a gate event is too large to send to semaphores; it is skipped");
        }
        let mut page = built.page;
        if complete && page.events.len() == events.len() {
            // Everything up to `through` was read: numbers skipped by failed commits are passed too.
            page.next = page.next.max(through + 1);
        }
        let _ = self.router.send(&peer, &ToWorker::Events(page));
    }

    /// A semaphore asks to start a gate's job for a key: done at most once per
    /// (gate, key, reason), whoever asks and however often.
    fn on_fire(&mut self, peer: Option<PeerId>, fire: protocol::Fire) {
        let reason = GateReason::from(fire.reason);
        let slot = (fire.gate.clone(), fire.key.clone());
        let recorded = self.gates.fires.get(&slot).cloned().unwrap_or_default();
        let answer = |job_id: Option<String>, created: bool, error: Option<String>| protocol::Fired {
            gate: fire.gate.clone(),
            key: fire.key.clone(),
            reason: fire.reason,
            job_id: job_id.unwrap_or_default(),
            created,
            error,
        };
        if let Some(done) = recorded.iter().find(|f| f.reason == reason) {
            let reply = answer(done.job_id.clone(), false, done.error.clone());
            self.reply_fired(peer.as_ref(), reply);
            return;
        }
        let reasons: Vec<GateReason> = recorded.iter().map(|f| f.reason).collect();
        if jobz_core::gates::fire_conflicts(&reasons, reason) {
            let first = recorded.first().and_then(|f| f.job_id.clone());
            self.reply_fired(peer.as_ref(), answer(first, false, None));
            return;
        }
        let now = Utc::now();
        let file = self.shared.config.file.clone();
        let checked = match (file.gates.get(&fire.gate), file.jobs.get(&fire.job_name)) {
            (None, _) => Err(format!("no gate named {:?} in the broker's job file", fire.gate)),
            (_, None) => Err(format!("no job named {:?} in the broker's job file", fire.job_name)),
            (Some(_), Some(def)) => config::params::validate(def, &fire.params).map_err(|errors| {
                let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
                format!("the gate's job refuses its params: {}", reasons.join("; "))
            }),
        };
        let mut batch = Batch::new();
        let record = match checked {
            Ok(params) => {
                let new = NewJob {
                    job_name: fire.job_name.clone(),
                    params,
                    run_id: fire.run_id.clone(),
                    parent_id: fire.parent_id.clone(),
                    origin: Origin::Gate { gate: fire.gate.clone(), key: fire.key.clone(), reason },
                };
                let job = new_record(&new, now, None, &file);
                let fire_record = FireRecord {
                    gate: fire.gate.clone(),
                    key: fire.key.clone(),
                    reason,
                    job_id: Some(job.id.clone()),
                    error: None,
                    at: now,
                };
                tracing::info!(gate = %fire.gate, key = %fire.key, ?reason, job = %job.id, "gate fired");
                batch.fires.push((peer, answer(Some(job.id.clone()), true, None)));
                batch.enqueue.push(Queued::from_record(&job));
                // The job first: if another job holds its unique key, the store
                // records the fire with that job (see `drop_held`).
                let change = insert_change(job, &file, now, None);
                let guarded = matches!(change, Change::InsertUnlessHeld(_));
                batch.changes.push(change);
                batch.changes.push(Change::Fire(fire_record.clone()));
                // Which job answers a guarded fire is known once it is committed
                // (`settle_fires`); until then `GET /gates` shows no job for it.
                FireRecord { job_id: fire_record.job_id.filter(|_| !guarded), ..fire_record }
            }
            Err(error) => {
                tracing::warn!(gate = %fire.gate, key = %fire.key, %error, "gate fire refused");
                let fire_record = FireRecord {
                    gate: fire.gate.clone(),
                    key: fire.key.clone(),
                    reason,
                    job_id: None,
                    error: Some(error.clone()),
                    at: now,
                };
                batch.fires.push((peer, answer(None, false, Some(error))));
                batch.changes.push(Change::Fire(fire_record.clone()));
                fire_record
            }
        };
        // Recorded in memory at once, so a second semaphore's fire is answered from here.
        self.gates.fires.entry(slot).or_default().push(record);
        self.commit(batch);
    }

    fn reply_fired(&self, peer: Option<&PeerId>, fired: protocol::Fired) {
        if let Some(peer) = peer {
            // A semaphore that went away asks again after it reconnects.
            let _ = self.router.send(peer, &ToWorker::Fired(fired));
        }
    }

    /// Starts one job per scheduled instant, each committed with its fire
    /// record in a batch of its own (so a refused duplicate takes nothing else
    /// with it). A schedule whose params its job refuses records the refusal.
    fn fire_schedules(&mut self, requests: Vec<FireRequest>, now: DateTime<Utc>) {
        let file = self.shared.config.file.clone();
        for request in requests {
            let checked = match file.jobs.get(&request.job_name) {
                None => Err(format!("no job named {:?} in the broker's job file", request.job_name)),
                Some(def) => config::params::validate(def, &request.params).map_err(|errors| {
                    let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    format!("the job refuses the schedule's params: {}", reasons.join("; "))
                }),
            };
            let mut batch = Batch::new();
            let mut fire = ScheduleFireRecord {
                schedule: request.id.clone(),
                instant: request.instant,
                job_id: None,
                error: None,
                at: crate::store::to_store_precision(now),
            };
            match checked {
                Ok(params) => {
                    let new = NewJob {
                        job_name: request.job_name.clone(),
                        params,
                        run_id: None,
                        parent_id: None,
                        origin: Origin::Schedule,
                    };
                    let now = Utc::now();
                    let job = new_record(&new, now, None, &file);
                    tracing::info!(job_name = %request.job_name, instant = %request.instant, job = %job.id, "schedule fired");
                    fire.job_id = Some(job.id.clone());
                    batch.enqueue.push(Queued::from_record(&job));
                    // The job first: a fire naming a job that another held the unique key for records the holder.
                    batch.changes.push(insert_change(job, &file, now, None));
                    batch.changes.push(Change::ScheduleFire(fire.clone()));
                }
                Err(error) => {
                    tracing::warn!(job_name = %request.job_name, instant = %request.instant, %error, "schedule fire refused");
                    fire.error = Some(error);
                    batch.changes.push(Change::ScheduleFire(fire.clone()));
                }
            }
            batch.schedule_fire = Some((request.id, request.instant));
            self.schedules.fired(fire);
            self.commit(batch);
        }
    }

    /// `GET /gates`: each gate's open keys with progress, fired keys with their
    /// job, timed-out and failed keys.
    fn gates_view(&self) -> serde_json::Value {
        let file = &self.shared.config.file;
        let mut gates = Vec::new();
        for (name, gate) in &file.gates {
            let mut open = Vec::new();
            let mut fired = Vec::new();
            let mut timed_out = Vec::new();
            let mut failed = Vec::new();
            let keys = self.gates.book.keys(name);
            let mut all_keys: BTreeSet<&String> = keys.map(|k| k.keys().collect()).unwrap_or_default();
            let recorded: Vec<&FireRecord> =
                self.gates.fires.iter().filter(|((g, _), _)| g == name).flat_map(|(_, f)| f.iter()).collect();
            all_keys.extend(recorded.iter().map(|f| &f.key));
            for key in all_keys {
                let state = keys.and_then(|k| k.get(key));
                let progress = state.map(|s| {
                    let need = gate.count.unwrap_or(1);
                    let parts: Vec<String> = gate
                        .after
                        .iter()
                        .map(|a| {
                            let done = s.succeeded.get(a).map_or(0, |ids| ids.len() as u32).min(need);
                            format!("{done}/{need} {a}")
                        })
                        .collect();
                    let (done, needed) = s.progress(gate);
                    serde_json::json!({ "progress": parts.join(", "), "done": done, "needed": needed, "opened_at": rfc3339(s.opened_at), "run_id": s.run_id })
                });
                let fires: Vec<&&FireRecord> = recorded.iter().filter(|f| &f.key == key).collect();
                let entry = |reason: GateReason| {
                    fires.iter().find(|f| f.reason == reason).map(|f| {
                        serde_json::json!({ "key": key, "job_id": f.job_id, "error": f.error, "at": rfc3339(f.at) })
                    })
                };
                if let Some(e) = entry(GateReason::Then) {
                    fired.push(e);
                }
                if let Some(e) = entry(GateReason::Timeout) {
                    timed_out.push(e);
                }
                let failure = entry(GateReason::Failure);
                if let Some(e) = failure.clone() {
                    failed.push(e);
                }
                let settled = fires.iter().any(|f| matches!(f.reason, GateReason::Then | GateReason::Timeout));
                if !settled {
                    if let Some(mut p) = progress {
                        p["key"] = serde_json::json!(key);
                        p["failed"] = serde_json::json!(failure.is_some() || state.is_some_and(|s| s.failed));
                        open.push(p);
                    }
                }
            }
            gates.push(serde_json::json!({
                "name": name,
                "after": gate.after,
                "count": gate.count.unwrap_or(1),
                "then": gate.then.job,
                "timeout": gate.timeout.map(|t| t.as_secs()),
                "open": open,
                "fired": fired,
                "timed_out": timed_out,
                "failed": failed,
            }));
        }
        serde_json::Value::Array(gates)
    }

    fn on_hello(&mut self, peer: PeerId, hello: Hello) {
        let Hello { role: _, name, host, pid, concurrency, credit, jobs, holding } = hello;
        // The same worker under a new connection (or a restarted process) replaces the old entry;
        // what it no longer holds goes back to the queue.
        let previous: Vec<PeerId> =
            self.workers.iter().filter(|(p, w)| w.name == name && **p != peer).map(|(p, _)| p.clone()).collect();
        for old in previous {
            self.drop_worker(&old, "reconnected under a new connection", &holding);
            // If it was the same worker, its old connection is gone and never speaks again.
            // If it was another process under the same name, it is told so when it does.
            let why = format!(
                "the worker name {name:?} was taken by a newer connection (host {host}, pid {pid}); \
                 this connection is no longer served: if two workers share the name, give each its own --name"
            );
            self.superseded.retain(|(p, _)| *p != old && *p != peer);
            self.superseded.push_back((old, why));
            if self.superseded.len() > limits::SUPERSEDED_PEERS {
                self.superseded.pop_front();
            }
        }
        let file = self.shared.config.file.clone();
        let mut served = Vec::new();
        let mut dispatchable = Vec::new();
        let mut drift = Vec::new();
        for job in jobs {
            let matches = self.digests.get(&job.name).is_some_and(|d| *d == job.digest);
            if file.jobs.contains_key(&job.name) && (matches || self.shared.config.allow_drift) {
                dispatchable.push(job.name.clone());
            }
            if !matches {
                drift.push(job.name.clone());
            }
            served.push(ServedJob { name: job.name, matches });
        }
        if !drift.is_empty() {
            tracing::warn!(worker = %name, jobs = ?drift, allow_drift = self.shared.config.allow_drift, "the worker's job definitions differ from the broker's");
        }
        let mut running = self.workers.get(&peer).map(|w| w.running.clone()).unwrap_or_default();
        for held in &holding {
            self.adopt(&peer, &name, held, &mut running);
        }
        let welcome = ToWorker::Welcome(Welcome {
            heartbeat_ms: self.shared.config.heartbeat.as_millis() as u64,
            lease_timeout_ms: self.shared.config.lease_timeout.as_millis() as u64,
            drift,
            url: self.shared.config.url.clone(),
        });
        if !self.welcome(&peer, &name, &welcome) {
            return;
        }
        let now = Utc::now();
        let rejoined = self.workers.contains_key(&peer);
        if !rejoined {
            tracing::info!(worker = %name, host = %host, concurrency, jobs = served.len(), holding = holding.len(), "worker joined");
        }
        let connected_at = self.workers.get(&peer).map(|w| w.connected_at).unwrap_or(now);
        let credit = credit.min(concurrency.saturating_sub(running.len() as u32));
        // `credit` counts the slots free now: a result the worker holds (`done`)
        // freed its slot already; a running attempt frees its slot with its Result.
        // The same connection keeps what it owed (a dispatch may have crossed this Hello).
        let mut owed = self.workers.get(&peer).map(|w| w.owed.clone()).unwrap_or_default();
        for held in &holding {
            let key = (held.job_id.clone(), held.lease);
            if held.done {
                owed.remove(&key);
            } else {
                owed.insert(key);
            }
        }
        self.workers.insert(
            peer,
            Worker {
                name,
                host,
                concurrency,
                credit,
                dispatchable,
                jobs: served,
                running,
                owed,
                last_seen: Instant::now(),
                last_heartbeat: now,
                connected_at,
            },
        );
    }

    /// A registering worker claims an attempt it holds: it keeps it if the
    /// lease is current; otherwise the attempt was superseded or cancelled and
    /// the worker must stop it (its result will be recorded as stale).
    fn adopt(&mut self, peer: &PeerId, name: &str, held: &Held, running: &mut HashSet<String>) {
        match self.running.get_mut(&held.job_id) {
            Some(r) if r.holds(held.lease) => {
                if let Some(copy) = r.copies.iter_mut().find(|c| c.lease == held.lease) {
                    copy.peer = Some(peer.clone());
                }
                if r.lease == held.lease {
                    r.peer = Some(peer.clone());
                    r.worker = name.to_string();
                    r.orphaned_until = None;
                }
                running.insert(held.job_id.clone());
            }
            _ if held.done => {}
            _ => {
                let cancel = ToWorker::Cancel(LeaseRef { job_id: held.job_id.clone(), lease: held.lease });
                let _ = self.router.send(peer, &cancel);
            }
        }
    }

    /// Forgets a worker; its attempts go back to the queue unless `holding`
    /// (the same worker's new connection) claims them.
    fn drop_worker(&mut self, peer: &PeerId, why: &str, holding: &[Held]) {
        let Some(worker) = self.workers.remove(peer) else { return };
        tracing::warn!(worker = %worker.name, why, running = worker.running.len(), "worker left");
        let mut batch = Batch::new();
        let now = Utc::now();
        for job_id in worker.running {
            if holding.iter().any(|h| h.job_id == job_id) {
                continue;
            }
            if self.running.get(&job_id).is_some_and(|r| !r.copies.is_empty()) {
                self.lose_copy(&job_id, peer);
                continue;
            }
            if let Some(r) = self.running.remove(&job_id) {
                requeue(&mut batch, r, now);
            }
        }
        if !batch.changes.is_empty() {
            self.commit(batch);
        }
    }

    /// A worker running a copy of a broadcast is gone: that copy failed; the
    /// broadcast ends if it was the last one running.
    fn lose_copy(&mut self, job_id: &str, peer: &PeerId) {
        let Some(running) = self.running.get_mut(job_id) else { return };
        let mut batch = Batch::new();
        for copy in running.copies.iter_mut().filter(|c| c.peer.as_ref() == Some(peer) && c.ended.is_none()) {
            copy.ended = Some((Status::Failed, None));
            batch.changes.push(Change::AttemptEnd {
                id: job_id.to_string(),
                lease: copy.lease,
                status: Status::Failed,
                exit_code: None,
                at: Utc::now(),
            });
        }
        if running.copies.iter().any(|c| c.ended.is_none()) {
            self.commit(batch);
            return;
        }
        let status = broadcast_status(&running.copies);
        let Some(running) = self.running.remove(job_id) else { return };
        let error = Some("a worker running a copy of this broadcast was lost".to_string());
        let ending = Ending {
            status,
            exit_code: None,
            signal: None,
            output_tail: String::new(),
            error,
            run_time: Duration::ZERO,
        };
        self.conclude(running, ending, batch);
    }

    fn on_output(&mut self, job_id: &str, lease: u64, offset: u64, data: &[u8]) {
        let Some(running) = self.running.get(job_id).filter(|r| valid_id(job_id) && r.holds(lease)) else { return };
        let path = self.shared.config.data_dir.join("logs").join(format!("{job_id}.log"));
        // Copies of a broadcast share one log, so offsets (which are per copy) cannot place their bytes.
        let offset = if running.copies.is_empty() { Some(offset) } else { None };
        if let Err(e) = append_at(&path, offset, data) {
            tracing::warn!(job = job_id, error = %e, "cannot write the job's log");
        }
    }

    fn on_result(&mut self, peer: PeerId, result: ResultReport) {
        let key = (result.job_id.clone(), result.lease);
        // The worker's slot for this attempt is free: the first Result of an
        // attempt, whatever becomes of it, gives its credit back.
        let frees = self.workers.get_mut(&peer).is_some_and(|w| w.owed.remove(&key));
        if self.recently_done_set.contains(&key) {
            // A resend after a lost ack: already durable, acknowledge again.
            self.return_credit(&peer, frees);
            let ack = ToWorker::ResultAck(LeaseRef { job_id: result.job_id, lease: result.lease });
            let _ = self.router.send_nowait(&peer, &ack);
            return;
        }
        if !self.running.get(&result.job_id).is_some_and(|r| r.holds(result.lease)) {
            self.return_credit(&peer, frees);
            self.record_stale(peer, result);
            return;
        }
        if let Some(w) = self.workers.get_mut(&peer) {
            w.running.remove(&result.job_id);
        }
        self.return_credit(&peer, frees);
        let mut status = Status::from(result.status);
        let now = Utc::now();
        let mut batch = Batch::new();
        if let Some(running) = self.running.get_mut(&result.job_id).filter(|r| !r.copies.is_empty()) {
            // One copy of a broadcast ended: record it on its attempt; the job ends with its last copy.
            if let Some(copy) = running.copies.iter_mut().find(|c| c.lease == result.lease) {
                copy.ended = Some((status, result.exit_code));
            }
            batch.changes.push(Change::AttemptEnd {
                id: result.job_id.clone(),
                lease: result.lease,
                status,
                exit_code: result.exit_code,
                at: now,
            });
            batch.acks.push((peer.clone(), result.job_id.clone(), result.lease));
            if running.copies.iter().any(|c| c.ended.is_none()) {
                self.commit(batch);
                return;
            }
            status = broadcast_status(&running.copies);
        }
        let Some(running) = self.running.remove(&result.job_id) else { return };
        if !running.start_counted {
            // A short job says when it started in its result alone.
            let latency = (result.started_at - running.job.queued_at).to_std().unwrap_or_default();
            self.shared.metrics.started(latency);
        }
        if running.copies.is_empty() {
            batch.acks.push((peer, result.job_id.clone(), result.lease));
        }
        let ending = Ending {
            status,
            exit_code: result.exit_code,
            signal: result.signal,
            output_tail: String::from_utf8_lossy(&result.output).into_owned(),
            error: result.error,
            run_time: (result.finished_at - result.started_at).to_std().unwrap_or_default(),
        };
        self.conclude(running, ending, batch);
    }

    /// One credit back to `peer` for a freed slot, within `concurrency − running`.
    fn return_credit(&mut self, peer: &PeerId, frees: bool) {
        if let Some(w) = self.workers.get_mut(peer).filter(|_| frees) {
            let free = w.concurrency.saturating_sub(w.running.len() as u32);
            w.credit = w.credit.saturating_add(1).min(free);
        }
    }

    /// Ends `running` for good or for a retry, as the pipeline decides, and commits it with `batch`.
    fn conclude(&mut self, running: Running, ending: Ending, mut batch: Batch) {
        let now = Utc::now();
        let status = ending.status;
        self.shared.metrics.finished(&running.job.job_name, status, ending.run_time);
        batch.changes.push(Change::Finish {
            id: running.job.id.clone(),
            job_name: running.job.job_name.clone(),
            lease: running.lease,
            status,
            exit_code: ending.exit_code,
            signal: ending.signal,
            at: now,
            output_tail: ending.output_tail,
            error: ending.error,
        });
        let file = self.shared.config.file.clone();
        let facts = JobFacts {
            id: running.job.id.clone(),
            job_name: running.job.job_name.clone(),
            params: running.job.params.clone(),
            run_id: running.job.run_id.clone(),
            attempt: running.job.attempts,
        };
        match file.jobs.get(&facts.job_name) {
            Some(def) => {
                let end = AttemptEnd { status, exit_code: ending.exit_code };
                let decision = if running.copies.is_empty() {
                    pipeline::decide(&file, def, &facts, end, jobz_core::ids::jitter(&facts))
                } else {
                    // A broadcast is not retried as a whole: each worker ran it once.
                    let (follow_ups, rejected) = pipeline::follow_ups(&file, def, &facts, end);
                    Decision::Finish { status, follow_ups, rejected }
                };
                match decision {
                    Decision::Retry { delay, .. } => {
                        let not_before = now + chrono::Duration::from_std(delay).unwrap_or_default();
                        batch.changes.push(Change::Retry {
                            id: facts.id.clone(),
                            at: now,
                            not_before: Some(not_before),
                        });
                        let mut job = running.job.clone();
                        job.not_before = Some(not_before);
                        job.queued_at = now;
                        batch.enqueue.push(job);
                    }
                    Decision::Finish { follow_ups, rejected, .. } => {
                        for e in rejected {
                            tracing::warn!(job = %facts.id, error = %e, "follow-up not started");
                        }
                        self.record_gate_event(&facts, status, now, &mut batch);
                        for new in follow_ups {
                            let record = new_record(&new, now, None, &file);
                            batch.enqueue.push(Queued::from_record(&record));
                            batch.changes.push(insert_change(record, &file, now, None));
                        }
                        batch.finished.push(facts.id.clone());
                    }
                }
            }
            None => batch.finished.push(facts.id.clone()),
        }
        batch.restore.push(running);
        self.commit(batch);
    }

    /// The end of an upstream job of a gate, recorded in the same batch as the
    /// end itself, so semaphores see exactly the jobs that ended.
    fn record_gate_event(&mut self, job: &JobFacts, status: Status, at: DateTime<Utc>, batch: &mut Batch) {
        if !self.gates.upstream.contains(&job.job_name) {
            return;
        }
        let kind = match status {
            Status::Succeeded => GateEventKind::Succeeded,
            Status::Failed | Status::TimedOut => GateEventKind::FailedForGood,
            Status::Cancelled | Status::Queued | Status::Running => return,
        };
        let seq = self.gates.next_seq;
        self.gates.next_seq += 1;
        self.gates.pending.insert(seq);
        let event = GateEventRecord {
            seq,
            kind,
            job_id: job.id.clone(),
            job_name: job.job_name.clone(),
            params: job.params.clone(),
            run_id: job.run_id.clone(),
            attempt: job.attempt,
            at,
        };
        batch.changes.push(Change::GateEvent(event.clone()));
        batch.events.push(event);
    }

    fn record_stale(&mut self, peer: PeerId, result: ResultReport) {
        let worker = self.workers.get(&peer).map(|w| w.name.clone()).unwrap_or_default();
        tracing::info!(job = %result.job_id, lease = result.lease, worker = %worker, "stale result recorded; it changes nothing");
        self.shared.metrics.stale();
        let mut batch = Batch::new();
        batch.changes.push(Change::Stale {
            id: result.job_id.clone(),
            lease: result.lease,
            worker,
            status: Status::from(result.status),
            exit_code: result.exit_code,
            at: Utc::now(),
        });
        batch.acks.push((peer, result.job_id, result.lease));
        self.commit(batch);
    }

    fn on_goodbye(&mut self, peer: &PeerId, hand_back: Vec<LeaseRef>) {
        if !hand_back.is_empty() {
            tracing::info!(jobs = hand_back.len(), "a draining worker handed jobs back");
        }
        // Everything the worker still ran is handed back: drop_worker requeues it all.
        self.drop_worker(peer, "said goodbye", &[]);
    }

    /// Sends `batch` to the store; the loop goes on and learns the outcome as an event.
    fn commit(&mut self, batch: Batch) {
        self.entering.extend(batch.enqueue.iter().map(|job| job.id.clone()));
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let asked = Instant::now();
            let result = shared.store.commit_grouped(batch.changes.clone()).await;
            shared.metrics.committed(asked.elapsed());
            let events = &shared.events;
            // The loop is gone only at shutdown, when nothing is left to acknowledge.
            let _ = events.send(Event::Committed { batch, result }).await;
        });
    }

    fn on_committed(&mut self, mut batch: Batch, result: Result<Vec<Admission>, StoreError>) {
        for event in &batch.events {
            self.gates.pending.remove(&event.seq);
        }
        let admissions = match result {
            Ok(admissions) => admissions,
            Err(e) => {
                self.on_commit_failed(batch, e);
                return;
            }
        };
        // The batch's jobs are in the store now; those cancelled on their way are not queued.
        let cancelled = self.arrived(&batch);
        self.drop_held(&mut batch, admissions);
        self.settle_fires(&batch);
        for event in &batch.events {
            self.gates.book.observe(&self.shared.config.file, &upstream_event(event), event.at);
        }
        for (peer, fired) in batch.fires {
            self.reply_fired(peer.as_ref(), fired);
        }
        for (peer, job_id, lease) in batch.acks {
            self.remember_done(job_id.clone(), lease);
            // Not waiting: a lost ack is asked for again by the worker's resend.
            let _ = self.router.send_nowait(&peer, &ToWorker::ResultAck(LeaseRef { job_id, lease }));
        }
        for job in batch.enqueue {
            if !cancelled.contains(&job.id) {
                self.enqueue(job);
            }
        }
        self.shared.wake(&batch.finished);
    }

    /// The store has answered for `batch`: its jobs are no longer on their way
    /// to a queue. Returns those cancelled meanwhile.
    fn arrived(&mut self, batch: &Batch) -> HashSet<String> {
        let mut cancelled = HashSet::new();
        for job in &batch.enqueue {
            self.entering.remove(&job.id);
            if self.cancelled_entering.remove(&job.id) {
                cancelled.insert(job.id.clone());
            }
        }
        cancelled
    }

    fn on_commit_failed(&mut self, batch: Batch, e: StoreError) {
        tracing::error!(error = %e, "store commit failed; the results stay unacknowledged and will be resent");
        let cancelled = self.arrived(&batch);
        for r in batch.restore {
            // A job cancelled on its way back to the queue stays cancelled (its Cancel commits on its own).
            if !cancelled.contains(&r.job.id) {
                self.running.insert(r.job.id.clone(), r);
            }
        }
        // The fires were not recorded: the semaphores ask again.
        for (_, fired) in &batch.fires {
            if let Some(list) = self.gates.fires.get_mut(&(fired.gate.clone(), fired.key.clone())) {
                list.retain(|f| f.reason != GateReason::from(fired.reason));
            }
        }
        // Nothing of a schedule's fire was stored: it fires again at the next tick, unless
        // the store refused it as a duplicate (that instant is recorded already).
        if let Some((id, instant)) = &batch.schedule_fire {
            let again = !matches!(e, StoreError::Rejected { .. });
            self.schedules.failed(id, *instant, again);
        }
    }

    /// Takes the jobs the store did not insert, because another job held their
    /// unique key, out of `batch`: they are not queued, and a gate's fire names
    /// the holder instead (the store recorded it so).
    fn drop_held(&mut self, batch: &mut Batch, admissions: Vec<Admission>) {
        let guarded = batch.changes.iter().filter_map(|c| match c {
            Change::InsertUnlessHeld(guarded) => Some(&guarded.job),
            _ => None,
        });
        let mut stood_for: HashMap<String, String> = HashMap::new();
        let mut dropped: HashSet<String> = HashSet::new();
        for (job, admission) in guarded.zip(admissions) {
            match admission {
                Admission::Inserted => {}
                Admission::Existing(holder) => {
                    tracing::info!(
                        job_name = %job.job_name, unique_key = ?job.unique_key, holder = %holder.id,
                        "not started: a job holds its unique key"
                    );
                    dropped.insert(job.id.clone());
                    stood_for.insert(job.id.clone(), holder.id);
                }
                // The loop gives no idempotency keys; the store said no all the same.
                Admission::KeyReused { .. } => {
                    tracing::warn!(job = %job.id, "not started: its idempotency key was given to another start");
                    dropped.insert(job.id.clone());
                }
            }
        }
        if dropped.is_empty() {
            return;
        }
        batch.enqueue.retain(|q| !dropped.contains(&q.id));
        for (_, fired) in &mut batch.fires {
            if let Some(holder) = stood_for.get(&fired.job_id) {
                fired.job_id = holder.clone();
                fired.created = false;
            }
        }
    }

    /// Gives the committed fires of `batch` whose job was still open (guarded
    /// inserts) the job that answers them: the gate's own or a holder's.
    fn settle_fires(&mut self, batch: &Batch) {
        for (_, fired) in batch.fires.iter().filter(|(_, f)| !f.job_id.is_empty()) {
            let Some(list) = self.gates.fires.get_mut(&(fired.gate.clone(), fired.key.clone())) else { continue };
            let reason = GateReason::from(fired.reason);
            for fire in list.iter_mut().filter(|f| f.reason == reason && f.job_id.is_none() && f.error.is_none()) {
                fire.job_id = Some(fired.job_id.clone());
            }
        }
    }

    fn remember_done(&mut self, job_id: String, lease: u64) {
        if self.recently_done_set.insert((job_id.clone(), lease)) {
            self.recently_done.push_back((job_id, lease));
        }
        while self.recently_done.len() > limits::RECENT_RESULTS {
            if let Some(old) = self.recently_done.pop_front() {
                self.recently_done_set.remove(&old);
            }
        }
    }

    /// Takes a queued, waiting or running job out of the loop and records the
    /// cancel; false when the loop does not know the job (it has ended).
    fn cancel(&mut self, id: &str) -> bool {
        if let Some((name, key)) = self.queued_keys.remove(id) {
            if let Some(q) = self.queues.get_mut(&name) {
                q.remove(&key);
            }
        } else if self.delayed.remove(id).is_some() {
            // Out of its backoff and of the published depth; the Cancel below records it.
        } else if let Some(r) = self.running.remove(id) {
            for copy in r.copies.iter().filter(|c| c.ended.is_none() && c.lease != r.lease) {
                if let Some(peer) = &copy.peer {
                    let _ = self
                        .router
                        .send(peer, &ToWorker::Cancel(LeaseRef { job_id: id.to_string(), lease: copy.lease }));
                    if let Some(w) = self.workers.get_mut(peer) {
                        w.running.remove(id);
                    }
                }
                self.remember_done(id.to_string(), copy.lease);
            }
            if let Some(peer) = &r.peer {
                let _ = self.router.send(peer, &ToWorker::Cancel(LeaseRef { job_id: id.to_string(), lease: r.lease }));
                if let Some(w) = self.workers.get_mut(peer) {
                    w.running.remove(id);
                }
            }
            // The worker's result for this attempt comes back as cancelled; acknowledge it quietly.
            // A worker that is away now gets the Cancel when it registers again holding this lease.
            self.remember_done(id.to_string(), r.lease);
        } else if self.entering.contains(id) {
            // Committed after the batch that requeues it (the store applies in order), so the
            // Cancel finds it queued; the loop leaves it out of the queue once that batch is in.
            self.cancelled_entering.insert(id.to_string());
        } else {
            return false;
        }
        let mut batch = Batch::new();
        batch.changes.push(Change::Cancel { id: id.to_string(), at: Utc::now() });
        batch.finished.push(id.to_string());
        self.commit(batch);
        true
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let lease_timeout = self.shared.config.lease_timeout;
        let silent: Vec<PeerId> = self
            .workers
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_seen) > lease_timeout)
            .map(|(p, _)| p.clone())
            .collect();
        for peer in silent {
            self.drop_worker(&peer, "silent past its lease", &[]);
        }
        self.gates.semaphores.retain(|_, (name, seen)| {
            let alive = now.duration_since(*seen) <= lease_timeout;
            if !alive {
                tracing::warn!(semaphore = %name, "semaphore silent past its lease; forgotten");
            }
            alive
        });
        let orphans: Vec<String> = self
            .running
            .iter()
            .filter(|(_, r)| r.orphaned_until.is_some_and(|t| now >= t))
            .map(|(id, _)| id.clone())
            .collect();
        if !orphans.is_empty() {
            let mut batch = Batch::new();
            let at = Utc::now();
            for id in orphans {
                if let Some(r) = self.running.remove(&id) {
                    tracing::warn!(job = %id, worker = %r.worker, "no worker claimed the attempt after the restart; queued again");
                    requeue(&mut batch, r, at);
                }
            }
            self.commit(batch);
        }
        let wall = Utc::now();
        while let Some(mut job) = self.delayed.pop_due(wall) {
            job.not_before = None;
            self.enqueue(job);
        }
        if now.duration_since(self.last_heartbeat_sent) >= self.shared.config.heartbeat {
            self.last_heartbeat_sent = now;
            for peer in self.workers.keys().chain(self.gates.semaphores.keys()) {
                // A worker that cannot be reached is dropped by its lease, not here.
                let _ = self.router.send_nowait(peer, &ToWorker::Heartbeat);
            }
        }
        let clock_now = self.shared.config.clock.now();
        let due = self.schedules.due(clock_now);
        self.fire_schedules(due, clock_now);
        if now.duration_since(self.last_prune) >= limits::PRUNE_INTERVAL {
            self.last_prune = now;
            self.prune();
        }
    }

    fn prune(&self) {
        let Ok(retention) = chrono::Duration::from_std(self.shared.config.retention) else { return };
        let cutoff = Utc::now() - retention;
        let store = self.shared.store.clone();
        let logs = self.shared.config.data_dir.join("logs");
        let keys_cutoff = before(Utc::now(), limits::IDEMPOTENCY_KEY_TTL);
        tokio::spawn(async move {
            match store.prune_idempotency_keys(keys_cutoff, limits::PRUNE_BATCH).await {
                Ok(0) => {}
                Ok(keys) => tracing::info!(keys, "forgot idempotency keys past their time"),
                Err(e) => tracing::warn!(error = %e, "pruning idempotency keys failed"),
            }
            match store.prune(cutoff, limits::PRUNE_BATCH).await {
                Ok(ids) => {
                    for id in &ids {
                        // A job without output has no log file; nothing to remove then.
                        let _ = std::fs::remove_file(logs.join(format!("{id}.log")));
                    }
                    if !ids.is_empty() {
                        tracing::info!(pruned = ids.len(), "pruned finished jobs past their retention");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "pruning failed"),
            }
        });
    }

    fn workers_view(&self) -> Vec<WorkerView> {
        self.workers
            .values()
            .map(|w| WorkerView {
                name: w.name.clone(),
                host: w.host.clone(),
                jobs: w.jobs.clone(),
                running: w.running.len(),
                concurrency: w.concurrency as usize,
                last_heartbeat: w.last_heartbeat,
                connected_at: w.connected_at,
            })
            .collect()
    }

    /// Publishes what readers (front door, metrics) need, without sharing the
    /// loop's state. It runs after every turn, so it costs no more than the
    /// job names: nothing here walks the jobs or the workers.
    fn publish(&self) {
        let mut depth: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (name, q) in &self.queues {
            depth.entry(name.clone()).or_default().0 += q.len() as u64;
        }
        for (name, waiting) in self.delayed.per_name() {
            depth.entry(name.clone()).or_default().0 += u64::from(waiting);
        }
        for (name, running) in self.running.throttle.running_per_name() {
            depth.entry(name.clone()).or_default().1 += u64::from(running);
        }
        let workers = self.workers.len();
        let now = Instant::now();
        let throttle = &self.running.throttle;
        let holds = self
            .queues
            .iter()
            .filter(|(name, q)| !q.is_empty() && throttle.limits(name))
            .filter_map(|(name, _)| Some((name.clone(), throttle.admits(name, now).err()?)))
            .collect();
        if let Ok(mut snapshot) = self.shared.snapshot.lock() {
            *snapshot = Snapshot { workers, depth, holds };
        }
    }
}

/// Puts an attempt whose worker is gone back in its queue at `at`: recorded as a
/// `Requeue`, queued again once that is committed.
fn requeue(batch: &mut Batch, running: Running, at: DateTime<Utc>) {
    let mut job = running.job;
    batch.changes.push(Change::Requeue { id: job.id.clone(), job_name: job.job_name.clone(), at, not_before: None });
    job.queued_at = at;
    job.not_before = None;
    batch.enqueue.push(job);
}

/// Appends `data` to the log; with an `offset`, skips what the file already holds there (a resend).
fn append_at(path: &std::path::Path, offset: Option<u64>, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let skip = match offset {
        Some(offset) => file.metadata()?.len().saturating_sub(offset).min(data.len() as u64) as usize,
        None => 0,
    };
    file.write_all(&data[skip..])
}

/// Job ids become file names: only the characters of a UUID are allowed.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The record of a new job about to be stored as queued, with its unique key filled.
fn new_record(new: &NewJob, now: DateTime<Utc>, priority: Option<i32>, file: &JobFile) -> JobRecord {
    // The store keeps microseconds: the 202's times are the ones every later read shows.
    let now = crate::store::to_store_precision(now);
    let def = file.jobs.get(&new.job_name);
    let priority = priority.or_else(|| def.map(|d| d.priority)).unwrap_or(0);
    let mut record = JobRecord::queued(jobz_core::ids::new_id(), new, priority, now);
    if let Some(def) = def {
        match pipeline::unique_key(def, &record.params, &record.run_id) {
            Ok(key) => record.unique_key = key,
            // `jobz check` allows only placeholders a start can fill, so this is a bug; the job still runs.
            Err(e) => {
                tracing::error!(job_name = %def.name, error = %e, "cannot fill the unique key; started without one")
            }
        }
    }
    record
}

/// The change that stores `record`, made at `now`: guarded when it has a unique
/// key or an idempotency key (the store then decides whether another job
/// stands for it), a plain insert otherwise, so starts without keys pay nothing.
fn insert_change(
    record: JobRecord,
    file: &JobFile,
    now: DateTime<Utc>,
    idempotency: Option<IdempotencyClaim>,
) -> Change {
    if record.unique_key.is_none() && idempotency.is_none() {
        return Change::Insert(record);
    }
    let ttl = file.jobs.get(&record.job_name).and_then(|d| d.unique.as_ref()).map(|u| u.ttl).unwrap_or_default();
    Change::InsertUnlessHeld(Box::new(GuardedInsert { succeeded_since: before(now, ttl), job: record, idempotency }))
}

/// The instant `span` before `now`, or the earliest instant when that is out of range.
fn before(now: DateTime<Utc>, span: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(span).ok().and_then(|d| now.checked_sub_signed(d)).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl Shared {
    fn wake(&self, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let Ok(mut waiters) = self.waiters.lock() else { return };
        for id in ids {
            for tx in waiters.remove(id).unwrap_or_default() {
                // A waiter that gave up has dropped its receiver; nothing to tell it.
                let _ = tx.send(());
            }
        }
    }
}

/// Logs at most one line per second for a noisy source, counting the rest.
#[derive(Default)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(1)) {
            self.suppressed += 1;
            return false;
        }
        self.last = Some(now);
        true
    }

    fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Busy => ApiError::Busy,
        other => ApiError::Unavailable(other.to_string()),
    }
}

pub(crate) async fn start_job(b: &BrokerHandle, request: StartRequest) -> Result<Started, ApiError> {
    let shared = &b.inner;
    let file = &shared.config.file;
    let CheckedStart { params, priority } = request.check(file)?;
    let (run_id, parent_id) = match &request.parent_id {
        Some(parent) => {
            let record = shared
                .store
                .job(parent)
                .await
                .map_err(store_error)?
                .ok_or_else(|| ApiError::BadRequest(format!("parent job {parent:?} does not exist")))?;
            (Some(record.run_id), Some(record.id))
        }
        None => (None, None),
    };
    let new = NewJob { job_name: request.job_name.clone(), params, run_id, parent_id, origin: Origin::Start };
    let now = Utc::now();
    let record = new_record(&new, now, Some(priority), file);
    let idempotency =
        request.idempotency_key.map(|key| IdempotencyClaim { key, since: before(now, limits::IDEMPOTENCY_KEY_TTL) });
    let asked = Instant::now();
    match insert_change(record.clone(), file, now, idempotency) {
        change @ Change::Insert(_) => {
            shared.store.commit(vec![change]).await.map_err(store_error)?;
            shared.metrics.committed(asked.elapsed());
        }
        guarded => {
            let admissions = shared.store.commit_admitting(vec![guarded]).await.map_err(store_error)?;
            shared.metrics.committed(asked.elapsed());
            match admissions.into_iter().next() {
                Some(Admission::Inserted) => {}
                Some(Admission::Existing(job)) => return Ok(Started { job: *job, deduplicated: true }),
                Some(Admission::KeyReused { job_id, job_name, params }) => {
                    return Err(ApiError::Conflict(format!(
                        "this Idempotency-Key was first given to start {job_name:?} with params {params:?} \
                         (job {job_id}); a repeat must be the same start, a different start needs a new key"
                    )))
                }
                None => return Err(ApiError::Unavailable("the store did not answer for the start".into())),
            }
        }
    }
    shared.metrics.accepted();
    // Stored: from here on the job is safe. If the loop is gone (shutdown), the next start recovers it.
    let _ = shared.events.send(Event::Enqueue(vec![Queued::from_record(&record)])).await;
    Ok(Started { job: record, deduplicated: false })
}

pub(crate) async fn job(b: &BrokerHandle, id: &str) -> Result<JobRecord, ApiError> {
    b.inner
        .store
        .job(id)
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::NotFound(format!("no job with id {id:?}")))
}

pub(crate) async fn attempts(b: &BrokerHandle, id: &str) -> Result<Vec<AttemptRecord>, ApiError> {
    job(b, id).await?;
    b.inner.store.attempts(id).await.map_err(store_error)
}

pub(crate) async fn jobs(b: &BrokerHandle, filter: JobFilter) -> Result<Vec<JobRecord>, ApiError> {
    b.inner.store.jobs(filter).await.map_err(store_error)
}

pub(crate) async fn wait(b: &BrokerHandle, id: &str, limit: Duration) -> Result<Waited, ApiError> {
    let (tx, rx) = oneshot::channel();
    if let Ok(mut waiters) = b.inner.waiters.lock() {
        waiters.entry(id.to_string()).or_default().push(tx);
    }
    // Registered before reading, so an end between the read and the wait is not missed.
    let record = job(b, id).await?;
    if record.status.is_final() {
        return Ok(Waited::Ended(record));
    }
    // Either the job ended or the time is up; both end in reading the job again.
    let _ = tokio::time::timeout(limit, rx).await;
    let record = job(b, id).await?;
    Ok(if record.status.is_final() { Waited::Ended(record) } else { Waited::StillOpen(record) })
}

pub(crate) async fn log_path(b: &BrokerHandle, id: &str) -> Result<PathBuf, ApiError> {
    job(b, id).await?;
    if !valid_id(id) {
        return Err(ApiError::NotFound(format!("no job with id {id:?}")));
    }
    Ok(b.inner.config.data_dir.join("logs").join(format!("{id}.log")))
}

pub(crate) async fn cancel(b: &BrokerHandle, id: &str) -> Result<JobRecord, ApiError> {
    let record = job(b, id).await?;
    if record.status.is_final() {
        return Err(ApiError::Conflict(format!("job {id} is already {}", record.status)));
    }
    let known = ask(b, |reply| Event::Cancel { id: id.to_string(), reply }).await;
    if !known.ok_or_else(|| ApiError::Unavailable("the broker is shutting down".into()))? {
        let record = job(b, id).await?;
        return Err(ApiError::Conflict(format!("job {id} is already {}", record.status)));
    }
    match wait(b, id, limits::CANCEL_COMMIT_WAIT).await? {
        Waited::Ended(r) | Waited::StillOpen(r) => Ok(r),
    }
}

pub(crate) async fn cancel_run(b: &BrokerHandle, run_id: &str) -> Result<Vec<JobRecord>, ApiError> {
    let filter = JobFilter { run_id: Some(run_id.to_string()), limit: limits::RUN_JOBS_MAX, ..JobFilter::default() };
    let jobs = jobs(b, filter).await?;
    if jobs.is_empty() {
        return Err(ApiError::NotFound(format!("no run with id {run_id:?}")));
    }
    let mut cancelled = Vec::new();
    for j in jobs.into_iter().filter(|j| !j.status.is_final()) {
        match cancel(b, &j.id).await {
            Ok(r) => cancelled.push(r),
            // It ended meanwhile: nothing to cancel.
            Err(ApiError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(cancelled)
}

pub(crate) async fn retry(b: &BrokerHandle, id: &str) -> Result<JobRecord, ApiError> {
    let record = job(b, id).await?;
    if !matches!(record.status, Status::Failed | Status::TimedOut | Status::Cancelled) {
        return Err(ApiError::Conflict(format!(
            "job {id} is {}; only failed, timed-out or cancelled jobs can be retried",
            record.status
        )));
    }
    let change = Change::Retry { id: id.to_string(), at: Utc::now(), not_before: None };
    b.inner.store.commit(vec![change]).await.map_err(store_error)?;
    let record = job(b, id).await?;
    // Stored as queued: if the loop is gone (shutdown), recovery queues it at the next start.
    let _ = b.inner.events.send(Event::Enqueue(vec![Queued::from_record(&record)])).await;
    Ok(record)
}

pub(crate) async fn progress(
    b: &BrokerHandle,
    id: &str,
    percent: f64,
    message: Option<String>,
) -> Result<(), ApiError> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(ApiError::BadRequest(format!("percent {percent} is not between 0 and 100")));
    }
    let record = job(b, id).await?;
    let not_running = |status: Status| ApiError::Conflict(format!("job {id} is {status}, not running"));
    if record.status.is_final() {
        return Err(not_running(record.status));
    }
    // A job reporting progress as soon as it starts can be ahead of its
    // dispatch in the store (recorded without waiting): the loop knows. Asked
    // after the dispatch was queued to the store's writer, so the progress
    // change below is applied after it.
    let known = ask(b, |reply| Event::IsRunning { id: id.to_string(), reply }).await;
    if !known.ok_or_else(|| ApiError::Unavailable("the broker is shutting down".into()))? {
        let record = job(b, id).await?;
        return Err(not_running(record.status));
    }
    let change = Change::Progress { id: id.to_string(), progress: Progress { percent, message } };
    b.inner.store.commit(vec![change]).await.map_err(store_error)
}

/// Queued and running jobs per name, with what holds each back, as last published by the loop.
pub(crate) fn queues(b: &BrokerHandle) -> Vec<(String, u64, u64, Option<Hold>)> {
    let Ok(snapshot) = b.inner.snapshot.lock() else { return Vec::new() };
    // Every name of the job file, idle ones too, and any name the loop still holds jobs of.
    let names: BTreeSet<&String> = b.inner.config.file.jobs.keys().chain(snapshot.depth.keys()).collect();
    names
        .into_iter()
        .map(|name| {
            let (queued, running) = snapshot.depth.get(name).copied().unwrap_or_default();
            (name.clone(), queued, running, snapshot.holds.get(name).cloned())
        })
        .collect()
}

/// What holds the queued jobs of `job_name` back now, if a limit does.
pub(crate) fn hold(b: &BrokerHandle, job_name: &str) -> Option<Hold> {
    b.inner.snapshot.lock().ok()?.holds.get(job_name).cloned()
}

/// Asks the loop a question and waits for its answer; `None` when the loop has stopped.
async fn ask<T>(b: &BrokerHandle, question: impl FnOnce(oneshot::Sender<T>) -> Event) -> Option<T> {
    let (reply, answer) = oneshot::channel();
    b.inner.events.send(question(reply)).await.ok()?;
    answer.await.ok()
}

pub(crate) async fn workers(b: &BrokerHandle) -> Vec<WorkerView> {
    // The loop has stopped (shutdown): no worker is served any more.
    ask(b, |reply| Event::Workers { reply }).await.unwrap_or_default()
}

pub(crate) async fn metrics(b: &BrokerHandle) -> String {
    let snapshot = b.inner.snapshot.lock().map(|s| s.clone()).unwrap_or_default();
    let counts = b.inner.store.counts().await.unwrap_or_default();
    b.inner.metrics.render(&counts, &snapshot.depth, snapshot.workers)
}

pub(crate) async fn healthy(b: &BrokerHandle) -> bool {
    b.inner.bound.load(Ordering::Relaxed) && b.inner.store.ping().await
}

pub(crate) async fn gates(b: &BrokerHandle) -> serde_json::Value {
    if let Some(view) = ask(b, |reply| Event::Gates { reply }).await {
        return view;
    }
    // The loop has stopped (shutdown): the gates as configured, without their keys.
    let gates: Vec<serde_json::Value> = b
        .inner
        .config
        .file
        .gates
        .values()
        .map(|g| {
            serde_json::json!({
                "name": g.name, "after": g.after, "then": g.then.job,
                "open": [], "fired": [], "timed_out": [], "failed": []
            })
        })
        .collect();
    serde_json::Value::Array(gates)
}

pub(crate) async fn schedules(b: &BrokerHandle) -> serde_json::Value {
    if let Some(view) = ask(b, |reply| Event::Schedules { reply }).await {
        return view;
    }
    // The loop has stopped (shutdown): the schedules as configured, without their fires.
    let mut list = Vec::new();
    for (name, def) in &b.inner.config.file.jobs {
        for s in &def.schedules {
            list.push(serde_json::json!({
                "job_name": name, "cron": s.cron.source, "timezone": s.timezone.name(), "params": s.params,
                "catch_up": jobz_core::schedule::catch_up_name(s.catch_up),
                "next": null, "last_fired": null, "last_job_id": null, "fired": []
            }));
        }
    }
    serde_json::Value::Array(list)
}

/// How an attempt (or the last copy of a broadcast) ended, for [`State::conclude`].
struct Ending {
    status: Status,
    exit_code: Option<i32>,
    signal: Option<i32>,
    output_tail: String,
    error: Option<String>,
    run_time: Duration,
}

/// A broadcast succeeded when every copy did; otherwise it failed (timed out when that was the only trouble).
fn broadcast_status(copies: &[Copy]) -> Status {
    let mut worst = Status::Succeeded;
    for (status, _) in copies.iter().filter_map(|c| c.ended) {
        worst = match (worst, status) {
            (Status::Failed, _) | (_, Status::Failed | Status::Cancelled) => Status::Failed,
            (Status::TimedOut, _) | (_, Status::TimedOut) => Status::TimedOut,
            _ => Status::Succeeded,
        };
    }
    worst
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
