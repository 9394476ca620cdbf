//! `jobz worker`: connects out to the broker, runs the jobs it is given from
//! its own job file, and reports their results until they are acknowledged.
//!
//! The worker holds every attempt it runs and every result the broker has not
//! acknowledged; when it loses the broker it keeps running, reconnects with
//! backoff (Paranoid Pirate), and registers again listing what it holds, so the
//! broker re-adopts those attempts instead of running them twice.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use config::JobFile;
use jobz_core::command;
use jobz_core::pipeline::JobFacts;
use jobz_core::protocol::{
    self, Dispatch, Goodbye, Held, Hello, LeaseRef, Outcome, ResultReport, Role, ServedJob, ToBroker, ToWorker,
};
use jobz_core::transport::{CurveClient, Link, LocalConnector, SocketOptions, TransportError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::limits;
use crate::runner::{self, Ended, JobSpec};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The broker's ZeroMQ endpoint, e.g. `tcp://broker:6770`.
    pub broker: String,
    pub file: Arc<JobFile>,
    pub name: String,
    pub host: String,
    /// Jobs run at once.
    pub concurrency: u32,
    /// Serve only these job names; empty serves every job of the file.
    pub topics: Vec<String>,
    pub kill_grace: Duration,
    /// On shutdown, running jobs get this long to finish before they are killed and handed back.
    pub drain_grace: Duration,
    /// Exit after this long with nothing to do.
    pub exit_when_idle: Option<Duration>,
    /// Keys for an encrypted broker (`--curve-key`, `--broker-key`); `None` speaks plain text.
    pub curve: Option<CurveClient>,
    /// A broker in this process (`jobz up`): the worker speaks to it through
    /// an in-process link instead of connecting to `broker` over ZeroMQ.
    pub local: Option<LocalConnector>,
}

impl WorkerConfig {
    pub fn new(broker: String, file: Arc<JobFile>, name: String, concurrency: u32) -> WorkerConfig {
        WorkerConfig {
            broker,
            file,
            name,
            host: hostname(),
            concurrency: concurrency.max(1),
            topics: Vec::new(),
            kill_grace: limits::DEFAULT_KILL_GRACE,
            drain_grace: limits::DRAIN_GRACE,
            exit_when_idle: None,
            curve: None,
            local: None,
        }
    }

    /// The job names this worker serves.
    pub fn served(&self) -> Vec<String> {
        self.file.jobs.keys().filter(|name| self.topics.is_empty() || self.topics.contains(name)).cloned().collect()
    }
}

/// This machine's host name, for `GET /workers`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot connect to the broker at {endpoint}: {source}")]
    Connect { endpoint: String, source: TransportError },
    #[error("--topics names jobs that are not in the job file: {0}")]
    UnknownTopics(String),
}

/// What an attempt's task tells the worker's loop.
enum AttemptEvent {
    Output { job_id: String, lease: u64, offset: u64, data: Vec<u8> },
    Finished(Box<ResultReport>),
}

struct Attempt {
    lease: u64,
    cancel: CancellationToken,
    /// When its process was started.
    started_at: chrono::DateTime<Utc>,
    /// Whether `Started` was sent. It goes out at the first tick the attempt
    /// is still running at: a job that ends before that says when it started
    /// in its `Result` alone, one message fewer per short job.
    announced: bool,
}

struct Worker {
    config: WorkerConfig,
    link: Link,
    digests: Vec<ServedJob>,
    running: HashMap<String, Attempt>,
    /// Results sent but not acknowledged, resent until they are.
    unacked: BTreeMap<(String, u64), ResultReport>,
    events_tx: mpsc::Sender<AttemptEvent>,
    url: Option<String>,
    registered: bool,
    draining: bool,
    heartbeat: Duration,
    broker_timeout: Duration,
    last_heard: Instant,
    last_sent: Instant,
    last_resend: Instant,
    reconnect_backoff: Duration,
    idle_since: Instant,
}

/// Runs a worker until `shutdown` (then drains) or until it has been idle for `exit_when_idle`.
pub async fn run(config: WorkerConfig, ctx: &zmq::Context, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let unknown: Vec<_> = config.topics.iter().filter(|t| !config.file.jobs.contains_key(*t)).cloned().collect();
    if !unknown.is_empty() {
        return Err(WorkerError::UnknownTopics(unknown.join(", ")));
    }
    let options = SocketOptions::default();
    let link = Link::connect(ctx, &config.broker, &options, config.curve.as_ref(), config.local.as_ref())
        .map_err(|source| WorkerError::Connect { endpoint: config.broker.clone(), source })?;
    let digests = config
        .served()
        .into_iter()
        .filter_map(|name| {
            config.file.jobs.get(&name).map(|def| ServedJob { digest: protocol::digest(&def.canonical), name })
        })
        .collect();
    let (events_tx, mut events_rx) = mpsc::channel(limits::ATTEMPT_EVENTS);
    let now = Instant::now();
    let mut worker = Worker {
        config,
        link,
        digests,
        running: HashMap::new(),
        unacked: BTreeMap::new(),
        events_tx,
        url: None,
        registered: false,
        draining: false,
        heartbeat: limits::HEARTBEAT_INTERVAL,
        broker_timeout: limits::BROKER_TIMEOUT,
        last_heard: now,
        last_sent: now,
        last_resend: now,
        reconnect_backoff: limits::RECONNECT_BACKOFF_MIN,
        idle_since: now,
    };
    let encrypted = worker.config.curve.is_some() && !worker.link.is_local();
    let broker = if worker.link.is_local() { "in this process" } else { worker.config.broker.as_str() };
    tracing::info!(worker = %worker.config.name, broker, jobs = worker.digests.len(), encrypted, "worker starting");
    worker.hello();
    let mut tick = tokio::time::interval(limits::WORKER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let drain_deadline = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Instant::now() + worker.config.drain_grace,
            Some(message) = worker.link.recv() => worker.on_message(message),
            Some(event) = events_rx.recv() => worker.on_attempt_event(event),
            _ = tick.tick() => {
                worker.on_tick();
                if worker.idle_expired() {
                    tracing::info!(worker = %worker.config.name, "idle long enough; exiting");
                    break Instant::now();
                }
            }
        }
    };
    worker.drain(&mut events_rx, drain_deadline).await;
    Ok(())
}

impl Worker {
    /// Queues `message` for the broker without waiting for the transport
    /// thread: every message here is either resent (Hello, Result) or harmless
    /// to lose, so a failure is only logged (by the transport, or here).
    fn send(&mut self, message: &ToBroker) {
        match self.link.send_nowait(message) {
            Ok(()) => self.last_sent = Instant::now(),
            // The broker is unreachable right now; heartbeats notice and reconnect, results are resent.
            Err(e) => tracing::debug!(error = %e, "send to the broker failed"),
        }
    }

    /// Registers (again), listing what this worker holds, with the credit it has.
    fn hello(&mut self) {
        let free = if self.draining { 0 } else { self.config.concurrency.saturating_sub(self.running.len() as u32) };
        // A draining worker registers with concurrency 0: the broker then gives
        // it no credit, not even for the results it still sends.
        let concurrency = if self.draining { 0 } else { self.config.concurrency };
        let mut holding: Vec<Held> =
            self.running.iter().map(|(id, a)| Held { job_id: id.clone(), lease: a.lease, done: false }).collect();
        holding.extend(self.unacked.keys().map(|(id, lease)| Held { job_id: id.clone(), lease: *lease, done: true }));
        let hello = ToBroker::Hello(Hello {
            role: Role::Worker,
            name: self.config.name.clone(),
            host: self.config.host.clone(),
            pid: std::process::id(),
            concurrency,
            credit: free,
            jobs: self.digests.clone(),
            holding,
        });
        self.send(&hello);
    }

    fn on_message(&mut self, message: Result<ToWorker, protocol::DecodeError>) {
        self.last_heard = Instant::now();
        self.reconnect_backoff = limits::RECONNECT_BACKOFF_MIN;
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "dropped a bad message from the broker");
                return;
            }
        };
        match message {
            ToWorker::Welcome(welcome) => {
                if !self.registered {
                    tracing::info!(worker = %self.config.name, "registered with the broker");
                }
                self.registered = true;
                self.heartbeat = Duration::from_millis(welcome.heartbeat_ms.max(1));
                // Give the broker a few heartbeats' grace before deciding it is gone.
                self.broker_timeout = (self.heartbeat * limits::HEARTBEAT_LIVENESS).max(limits::BROKER_TIMEOUT_MIN);
                self.url = welcome.url;
                if !welcome.drift.is_empty() {
                    tracing::warn!(jobs = ?welcome.drift, "these jobs differ from the broker's definition and are not dispatched here");
                }
                self.resend_results();
            }
            ToWorker::Dispatch(dispatch) => self.start_attempt(dispatch),
            ToWorker::ResultAck(LeaseRef { job_id, lease }) => {
                self.unacked.remove(&(job_id, lease));
            }
            ToWorker::Cancel(LeaseRef { job_id, lease }) => {
                if let Some(attempt) = self.running.get(&job_id).filter(|a| a.lease == lease) {
                    tracing::info!(job = %job_id, "cancelled by the broker");
                    attempt.cancel.cancel();
                }
            }
            ToWorker::Heartbeat => {}
            ToWorker::Reconnect => {
                self.registered = false;
                self.hello();
            }
            ToWorker::Error(e) => tracing::warn!(message = %e.message, "the broker refused a message"),
            // Gate traffic is between the broker and semaphores; a worker never asks for it.
            ToWorker::Events(_) | ToWorker::Fired(_) => tracing::debug!("ignored gate traffic meant for a semaphore"),
        }
    }

    fn start_attempt(&mut self, dispatch: Dispatch) {
        self.idle_since = Instant::now();
        let file = self.config.file.clone();
        let served = self.digests.iter().any(|d| d.name == dispatch.job_name);
        let def = file.jobs.get(&dispatch.job_name).filter(|_| served);
        let facts = JobFacts {
            id: dispatch.job_id.clone(),
            job_name: dispatch.job_name.clone(),
            params: dispatch.params.clone(),
            run_id: dispatch.run_id.clone(),
            attempt: dispatch.attempt,
        };
        let prepared = match def {
            None => Err(format!("job {:?} is not in this worker's job file", dispatch.job_name)),
            Some(def) => config::params::validate(def, &dispatch.params)
                .map_err(|errors| {
                    let reasons: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    format!("params refused by this worker: {}", reasons.join("; "))
                })
                .and_then(|_| command::prepare(def, &facts, self.url.as_deref()).map_err(|e| e.to_string()))
                .map(|p| (p, def)),
        };
        let (prepared, def) = match prepared {
            Ok(ok) => ok,
            Err(error) => {
                tracing::warn!(job = %dispatch.job_id, %error, "cannot run the job");
                let now = Utc::now();
                self.finish(ResultReport {
                    job_id: dispatch.job_id,
                    lease: dispatch.lease,
                    status: Outcome::Failed,
                    exit_code: None,
                    signal: None,
                    started_at: now,
                    finished_at: now,
                    error: Some(error.clone()),
                    output: format!("jobz: {error}\n").into_bytes(),
                });
                return;
            }
        };
        let spec = JobSpec {
            before: prepared.before,
            command: prepared.command,
            after: prepared.after,
            env: prepared.env,
            cwd: def.cwd.clone(),
            timeout: def.timeout,
            kill_grace: self.config.kill_grace,
            log_path: None,
        };
        let cancel = CancellationToken::new();
        let attempt =
            Attempt { lease: dispatch.lease, cancel: cancel.clone(), started_at: Utc::now(), announced: false };
        self.running.insert(dispatch.job_id.clone(), attempt);
        tokio::spawn(run_attempt(spec, dispatch.job_id, dispatch.lease, cancel, self.events_tx.clone()));
    }

    fn on_attempt_event(&mut self, event: AttemptEvent) {
        match event {
            AttemptEvent::Output { job_id, lease, offset, data } => {
                self.send(&ToBroker::Output(protocol::Output { job_id, lease, offset, data }));
            }
            AttemptEvent::Finished(report) => {
                if self.running.get(&report.job_id).is_some_and(|a| a.lease == report.lease) {
                    self.running.remove(&report.job_id);
                }
                self.finish(*report);
            }
        }
    }

    /// Records a result until it is acknowledged and sends it. The Result also
    /// gives the slot back: the broker adds one credit for the first Result of
    /// each attempt, so no `Credit` follows it.
    fn finish(&mut self, report: ResultReport) {
        self.idle_since = Instant::now();
        let message = ToBroker::Result(report.clone());
        self.unacked.insert((report.job_id.clone(), report.lease), report);
        while self.unacked.len() > limits::UNACKED_RESULTS_MAX {
            // Bounded memory: the oldest result is given up; the broker's lease hands that job to another worker.
            let _ = self.unacked.pop_first();
        }
        self.send(&message);
    }

    fn resend_results(&mut self) {
        self.last_resend = Instant::now();
        let results: Vec<ToBroker> = self.unacked.values().map(|r| ToBroker::Result(r.clone())).collect();
        for message in results {
            self.send(&message);
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_heard) > self.broker_timeout {
            // Paranoid Pirate: the broker is gone or restarted; a fresh socket, then Hello again.
            tracing::warn!(
                worker = %self.config.name,
                silent_ms = now.duration_since(self.last_heard).as_millis() as u64,
                retry_in_ms = self.reconnect_backoff.as_millis() as u64,
                "lost the broker; reconnecting"
            );
            self.registered = false;
            if let Err(e) = self.link.reconnect() {
                tracing::warn!(error = %e, "reconnect failed");
            }
            self.hello();
            self.last_heard = now + self.reconnect_backoff;
            self.reconnect_backoff = (self.reconnect_backoff * 2).min(limits::RECONNECT_BACKOFF_MAX);
            return;
        }
        self.announce_started();
        if now.duration_since(self.last_sent) >= self.heartbeat {
            self.send(&ToBroker::Heartbeat);
        }
        if self.registered && !self.unacked.is_empty() && now.duration_since(self.last_resend) >= limits::RESULT_RESEND
        {
            self.resend_results();
        }
        if !self.registered && now.duration_since(self.last_sent) >= limits::HELLO_RESEND {
            self.hello();
        }
    }

    /// Sends `Started` for the attempts that have been running since before this tick.
    fn announce_started(&mut self) {
        let unannounced: Vec<ToBroker> = self
            .running
            .iter_mut()
            .filter(|(_, a)| !a.announced)
            .map(|(job_id, a)| {
                a.announced = true;
                ToBroker::Started(protocol::Started { job_id: job_id.clone(), lease: a.lease, at: a.started_at })
            })
            .collect();
        for message in unannounced {
            self.send(&message);
        }
    }

    fn idle_expired(&self) -> bool {
        self.config
            .exit_when_idle
            .is_some_and(|idle| self.running.is_empty() && self.unacked.is_empty() && self.idle_since.elapsed() >= idle)
    }

    /// Stops taking jobs, lets running ones finish until `deadline`, then kills
    /// and hands back the rest, and waits (bounded) for results to be acknowledged.
    async fn drain(&mut self, events: &mut mpsc::Receiver<AttemptEvent>, deadline: Instant) {
        self.draining = true;
        // Hello with no credit tells the broker to send nothing more.
        self.hello();
        if !self.running.is_empty() {
            tracing::info!(running = self.running.len(), "draining: waiting for running jobs");
        }
        let mut tick = tokio::time::interval(limits::WORKER_TICK);
        while !self.running.is_empty() && Instant::now() < deadline {
            tokio::select! {
                Some(event) = events.recv() => self.on_attempt_event(event),
                Some(message) = self.link.recv() => self.on_message(message),
                _ = tick.tick() => self.on_tick(),
            }
        }
        if !self.running.is_empty() {
            let hand_back: Vec<LeaseRef> =
                self.running.iter().map(|(id, a)| LeaseRef { job_id: id.clone(), lease: a.lease }).collect();
            tracing::warn!(jobs = hand_back.len(), "grace period over: stopping running jobs and handing them back");
            for attempt in self.running.values() {
                attempt.cancel.cancel();
            }
            // Handed back only once their processes are gone (TERM, the kill grace, KILL),
            // so the broker never has the job run twice at once.
            let killed_by = Instant::now() + self.config.kill_grace + limits::KILL_WAIT_SLACK;
            let mut gone: HashSet<(String, u64)> = HashSet::new();
            let leases: HashSet<(String, u64)> = hand_back.iter().map(|l| (l.job_id.clone(), l.lease)).collect();
            while gone.len() < leases.len() && Instant::now() < killed_by {
                tokio::select! {
                    Some(event) = events.recv() => match event {
                        // Their results are stale once handed back: not reported.
                        AttemptEvent::Finished(report) if leases.contains(&(report.job_id.clone(), report.lease)) => {
                            gone.insert((report.job_id.clone(), report.lease));
                        }
                        other => self.on_attempt_event(other),
                    },
                    Some(message) = self.link.recv() => self.on_message(message),
                    _ = tick.tick() => self.on_tick(),
                }
            }
            if gone.len() < leases.len() {
                tracing::warn!(left = leases.len() - gone.len(), "some handed-back jobs did not stop in time");
            }
            self.running.clear();
            self.send(&ToBroker::Goodbye(Goodbye { hand_back }));
        } else {
            self.send(&ToBroker::Goodbye(Goodbye { hand_back: Vec::new() }));
        }
        let ack_deadline = Instant::now() + limits::RESULT_ACK_WAIT;
        while !self.unacked.is_empty() && Instant::now() < ack_deadline {
            tokio::select! {
                Some(message) = self.link.recv() => self.on_message(message),
                _ = tick.tick() => self.on_tick(),
            }
        }
        tracing::info!(worker = %self.config.name, unacknowledged = self.unacked.len(), "worker stopped");
    }
}

/// Runs one attempt and reports its start, output and end to the worker's loop.
async fn run_attempt(
    spec: JobSpec,
    job_id: String,
    lease: u64,
    cancel: CancellationToken,
    events: mpsc::Sender<AttemptEvent>,
) {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(limits::OUTPUT_CHANNEL_CAPACITY);
    let started_at = Utc::now();
    let running = runner::run(&spec, cancel, Some(tx));
    tokio::pin!(running);
    let mut offset = 0u64;
    let result = loop {
        tokio::select! {
            result = &mut running => break result,
            Some(data) = rx.recv() => {
                let len = data.len() as u64;
                let _ = events.send(AttemptEvent::Output { job_id: job_id.clone(), lease, offset, data }).await;
                offset += len;
            }
        }
    };
    while let Ok(data) = rx.try_recv() {
        let len = data.len() as u64;
        let _ = events.send(AttemptEvent::Output { job_id: job_id.clone(), lease, offset, data }).await;
        offset += len;
    }
    let report = match result {
        Ok(outcome) => ResultReport {
            job_id,
            lease,
            status: match outcome.status {
                Ended::Succeeded => Outcome::Succeeded,
                Ended::Failed => Outcome::Failed,
                Ended::TimedOut => Outcome::TimedOut,
                Ended::Cancelled => Outcome::Cancelled,
            },
            exit_code: outcome.exit_code,
            signal: outcome.signal,
            started_at: outcome.started_at.into(),
            finished_at: outcome.finished_at.into(),
            error: None,
            // The runner's tail is at most OUTPUT_TAIL_BYTES, well under the protocol's payload limit.
            output: outcome.tail.into_bytes(),
        },
        Err(e) => ResultReport {
            job_id,
            lease,
            status: Outcome::Failed,
            exit_code: None,
            signal: None,
            started_at,
            finished_at: Utc::now(),
            error: Some(e.to_string()),
            output: Vec::new(),
        },
    };
    let _ = events.send(AttemptEvent::Finished(Box::new(report))).await;
}

// A result's tail travels in one frame: it must fit the protocol's payload limit.
const _: () = assert!(limits::OUTPUT_TAIL_BYTES <= protocol::limits::PAYLOAD_MAX_BYTES);
