//! The semaphore's session with the broker.
//!
//! One loop owns the socket and the counts. It registers (`Hello` with no jobs
//! and no credit, so the broker never dispatches to it), then pulls the gate
//! events page by page (`Subscribe` from where it stands; a page answered with
//! no events means "caught up", and it asks again every [`EVENTS_POLL`]),
//! counts each one with [`Counter`], and sends a `Fire` for each job a gate
//! wants started, resending it until `Fired` comes back. Keys past their
//! deadline are given up only at a time the semaphore knows it had seen every
//! event of (the last empty page), so a semaphore that is still rebuilding or
//! cut off from the broker never times out a key that in fact completed.
//!
//! Heartbeats and reconnection follow the worker (Paranoid Pirate): after
//! silence the socket is replaced, `Hello` sent again with doubling backoff,
//! and after `Welcome` the semaphore subscribes from its current position and
//! sends its unanswered fires again; it keeps its counts.
//!
//! [`EVENTS_POLL`]: crate::limits::EVENTS_POLL

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use jobz_core::gates::GateEffect;
use jobz_core::protocol::{self, Events, Fire, FireReason, Fired, Goodbye, Hello, Role, Subscribe, ToBroker, ToWorker};
use jobz_core::transport::{Link, SocketOptions, TransportError};
use tokio_util::sync::CancellationToken;

use crate::count::Counter;
use crate::limits::*;
use crate::{SemaphoreConfig, SemaphoreError};

/// A gate's fire is known by its gate, key and reason: the broker starts one job for each.
type FireId = (String, String, FireReason);

/// A fire waiting for its `Fired`.
struct Pending {
    fire: Fire,
    /// When it was last sent; `None` while it waits for a free in-flight slot.
    sent: Option<Instant>,
}

/// Runs a semaphore until `shutdown`, or until the broker refuses it.
///
/// A broker that is down at start is not an error: the semaphore says so in
/// the log and keeps trying with backoff.
pub async fn run(
    config: SemaphoreConfig,
    ctx: &zmq::Context,
    shutdown: CancellationToken,
) -> Result<(), SemaphoreError> {
    let options = SocketOptions::default();
    let link = Link::connect(ctx, &config.broker, &options, config.curve.as_ref(), config.local.as_ref())
        .map_err(|source| SemaphoreError::Connect { endpoint: config.broker.clone(), source })?;
    let gates_digest = jobz_core::gates::digest(&config.file);
    tracing::info!(
        semaphore = %config.name,
        broker = if link.is_local() { "in this process" } else { config.broker.as_str() },
        gates = config.file.gates.len(),
        gates_digest = %gates_digest,
        encrypted = config.curve.is_some() && !link.is_local(),
        "semaphore starting"
    );
    if config.file.gates.is_empty() {
        tracing::warn!(file = %config.file.origin, "the job file has no gates: this semaphore will never fire anything");
    }
    let now = Instant::now();
    let mut session = Session {
        host: crate::hostname(),
        config,
        link,
        gates_digest,
        counter: Counter::new(),
        next: 0,
        events_counted: 0,
        registered: false,
        ever_registered: false,
        subscribed: false,
        awaiting: None,
        poll_at: now,
        caught_up_at: None,
        reported_caught_up: false,
        last_expire: now,
        unacked: BTreeMap::new(),
        in_flight: 0,
        refused: None,
        stopping: false,
        heartbeat: HEARTBEAT_INTERVAL,
        broker_timeout: BROKER_TIMEOUT,
        last_heard: now,
        last_sent: now,
        reconnect_backoff: RECONNECT_BACKOFF_MIN,
        warnings: Warnings::new(now),
    };
    session.hello();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(message) = session.link.recv() => session.on_message(message),
            _ = tick.tick() => session.on_tick(),
        }
        if let Some(message) = session.refused.take() {
            tracing::error!(semaphore = %session.config.name, broker = %session.config.broker, reason = %message, "the broker refused this semaphore; stopping");
            session.send(&ToBroker::Goodbye(Goodbye { hand_back: Vec::new() }));
            return Err(SemaphoreError::Refused(message));
        }
    }
    session.stop().await;
    Ok(())
}

struct Session {
    config: SemaphoreConfig,
    host: String,
    link: Link,
    gates_digest: String,
    counter: Counter,
    /// Every event with a smaller seq is counted.
    next: u64,
    events_counted: u64,
    /// Welcomed on the current connection.
    registered: bool,
    ever_registered: bool,
    /// An `Events` page arrived since the last `Welcome`: from then on, an
    /// `Error` is about one message, not about this semaphore as a whole.
    subscribed: bool,
    /// The `from` of the `Subscribe` in flight, and when it was sent.
    awaiting: Option<(u64, Instant)>,
    /// When to ask for events again, once caught up.
    poll_at: Instant,
    /// When an empty page last told us we had every event: keys are given up as of then.
    caught_up_at: Option<DateTime<Utc>>,
    reported_caught_up: bool,
    last_expire: Instant,
    /// Fires not yet answered with `Fired`.
    unacked: BTreeMap<FireId, Pending>,
    /// How many of them are sent and not answered.
    in_flight: usize,
    refused: Option<String>,
    stopping: bool,
    heartbeat: Duration,
    broker_timeout: Duration,
    last_heard: Instant,
    last_sent: Instant,
    reconnect_backoff: Duration,
    warnings: Warnings,
}

impl Session {
    /// Sends `message`; whether it left. A message the broker would refuse is
    /// logged here (it is this semaphore's bug or its data's, and resending
    /// would not help).
    fn send(&mut self, message: &ToBroker) -> bool {
        match self.link.send(message) {
            Ok(()) => {
                self.last_sent = Instant::now();
                true
            }
            Err(TransportError::Encode(e)) => {
                tracing::error!(message = protocol::Wire::name(message), error = %e, "not sent");
                false
            }
            // The broker is unreachable or slow right now; heartbeats notice and reconnect, fires are resent.
            Err(e) => {
                tracing::debug!(error = %e, "send to the broker failed");
                false
            }
        }
    }

    fn hello(&mut self) {
        let hello = ToBroker::Hello(Hello {
            role: Role::Semaphore,
            name: self.config.name.clone(),
            host: protocol::clip(&self.host, protocol::limits::NAME_MAX_BYTES).to_string(),
            pid: std::process::id(),
            // A semaphore runs no jobs: no slots, no credit, nothing served, nothing held.
            concurrency: 0,
            credit: 0,
            jobs: Vec::new(),
            holding: Vec::new(),
        });
        self.send(&hello);
    }

    fn on_message(&mut self, message: Result<ToWorker, protocol::DecodeError>) {
        self.last_heard = Instant::now();
        self.reconnect_backoff = RECONNECT_BACKOFF_MIN;
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "dropped a bad message from the broker");
                return;
            }
        };
        match message {
            ToWorker::Welcome(welcome) => self.on_welcome(welcome.heartbeat_ms),
            ToWorker::Events(page) => self.on_events(page),
            ToWorker::Fired(fired) => self.on_fired(fired),
            ToWorker::Heartbeat => {}
            ToWorker::Reconnect => {
                // The broker restarted or forgot us: register again, then subscribe again.
                self.lose_session();
                self.hello();
            }
            ToWorker::Error(e) if !self.subscribed => {
                // Before any events were served, an Error is the broker's answer to Hello or
                // Subscribe: it will not serve this semaphore (gates differ, another version).
                self.refused = Some(e.message);
            }
            ToWorker::Error(e) => {
                if let Some(suppressed) = self.warnings.allow(Instant::now()) {
                    tracing::warn!(reason = %e.message, suppressed, "the broker refused a message");
                }
            }
            ToWorker::Dispatch(d) => {
                // Never asked for (no jobs, no credit); its lease expires on the broker and it runs elsewhere.
                tracing::warn!(job = %d.job_id, job_name = %d.job_name, "the broker dispatched a job to a semaphore; ignored");
            }
            ToWorker::ResultAck(_) | ToWorker::Cancel(_) => {}
        }
    }

    fn on_welcome(&mut self, heartbeat_ms: u64) {
        self.heartbeat = Duration::from_millis(heartbeat_ms.max(1));
        // Give the broker a few heartbeats' grace before deciding it is gone.
        self.broker_timeout = (self.heartbeat * HEARTBEAT_LIVENESS).max(BROKER_TIMEOUT_MIN);
        if self.registered {
            return; // the answer to a resent Hello
        }
        if self.ever_registered {
            tracing::info!(semaphore = %self.config.name, from = self.next, "registered with the broker again; resuming the events");
        } else {
            tracing::info!(semaphore = %self.config.name, "registered with the broker; reading the gate events");
        }
        self.registered = true;
        self.ever_registered = true;
        self.subscribed = false;
        self.subscribe();
        self.pump_fires();
    }

    /// Forgets the session with the broker (not the counts): what was in
    /// flight is sent again after the next `Welcome`.
    fn lose_session(&mut self) {
        self.registered = false;
        self.subscribed = false;
        self.awaiting = None;
        for pending in self.unacked.values_mut() {
            pending.sent = None;
        }
        self.in_flight = 0;
    }

    fn subscribe(&mut self) {
        let message = ToBroker::Subscribe(Subscribe { gates_digest: self.gates_digest.clone(), from: self.next });
        // Counted as asked even when the send failed: the resend timer retries it.
        self.send(&message);
        self.awaiting = Some((self.next, Instant::now()));
    }

    fn on_events(&mut self, page: Events) {
        // Only the answer to the Subscribe in flight counts; a late answer to an
        // earlier one (resent, or from before a reconnect) would count twice.
        if self.stopping || self.awaiting.map(|(from, _)| from) != Some(page.from) || page.from != self.next {
            tracing::debug!(from = page.from, next = self.next, "dropped a stale page of events");
            return;
        }
        self.awaiting = None;
        self.subscribed = true;
        let now = Instant::now();
        // An empty page that moves `next` passed events the broker could not send: not caught up yet.
        if page.events.is_empty() && page.next == self.next {
            self.caught_up_at = Some(Utc::now());
            self.poll_at = now + EVENTS_POLL;
            self.report_caught_up();
            return;
        }
        let file = self.config.file.clone();
        for event in &page.events {
            let effects = self.counter.event(&file, event);
            self.on_effects(effects);
        }
        self.events_counted += page.events.len() as u64;
        self.next = page.next;
        // More may be waiting: ask at once, unless too many fires wait for answers.
        self.poll_at = now;
        if self.unacked.len() < UNACKED_FIRES_PULL_MAX {
            self.subscribe();
        }
        self.pump_fires();
    }

    /// Says once, when it is first true, that every recorded event is counted and
    /// every fire answered: the semaphore has rebuilt its counts and the broker
    /// holds every fire they call for.
    fn report_caught_up(&mut self) {
        if self.reported_caught_up || self.caught_up_at.is_none() || !self.unacked.is_empty() {
            return;
        }
        self.reported_caught_up = true;
        tracing::info!(
            semaphore = %self.config.name,
            events = self.events_counted,
            next = self.next,
            "caught up: every gate event counted, every fire answered"
        );
    }

    fn on_effects(&mut self, effects: Vec<GateEffect>) {
        for effect in effects {
            match effect {
                GateEffect::Start(job) => match Fire::from_new_job(&job) {
                    Some(fire) => {
                        let id = (fire.gate.clone(), fire.key.clone(), fire.reason);
                        self.unacked.entry(id).or_insert(Pending { fire, sent: None });
                    }
                    None => debug_assert!(false, "a gate effect without a gate origin: {job:?}"),
                },
                GateEffect::KeyError { gate, job_id, message } => {
                    if let Some(suppressed) = self.warnings.allow(Instant::now()) {
                        tracing::warn!(%gate, job = %job_id, suppressed, "{message}");
                    }
                }
            }
        }
    }

    /// Sends waiting fires while fewer than [`FIRES_IN_FLIGHT_MAX`] are in flight.
    fn pump_fires(&mut self) {
        if !self.registered || self.in_flight >= FIRES_IN_FLIGHT_MAX {
            return;
        }
        let waiting: Vec<FireId> = self
            .unacked
            .iter()
            .filter(|(_, p)| p.sent.is_none())
            .map(|(id, _)| id.clone())
            .take(FIRES_IN_FLIGHT_MAX - self.in_flight)
            .collect();
        for id in waiting {
            if !self.send_fire(&id) {
                break;
            }
        }
    }

    /// Sends one waiting fire; false if the socket would not take it now.
    fn send_fire(&mut self, id: &FireId) -> bool {
        let Some(pending) = self.unacked.get(id) else { return true };
        let message = ToBroker::Fire(pending.fire.clone());
        let was_sent = pending.sent.is_some();
        match self.link.send(&message) {
            Ok(()) => {
                self.last_sent = Instant::now();
                if !was_sent {
                    self.in_flight += 1;
                }
                if let Some(p) = self.unacked.get_mut(id) {
                    p.sent = Some(Instant::now());
                }
                true
            }
            Err(TransportError::Encode(e)) => {
                // The broker would refuse it whatever happens (a key or param over the limits): give it up, loudly.
                tracing::error!(gate = %id.0, key = %protocol::clip(&id.1, 200), reason = ?id.2, error = %e, "cannot ask the broker to fire this gate");
                if was_sent {
                    self.in_flight -= 1;
                }
                self.unacked.remove(id);
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "a fire could not be sent now; it waits");
                false
            }
        }
    }

    fn on_fired(&mut self, fired: Fired) {
        let id = (fired.gate.clone(), fired.key.clone(), fired.reason);
        let Some(pending) = self.unacked.remove(&id) else {
            tracing::debug!(gate = %fired.gate, key = %fired.key, "an answer to a fire already answered");
            return;
        };
        if pending.sent.is_some() {
            self.in_flight -= 1;
        }
        let key = protocol::clip(&fired.key, 200);
        match (&fired.error, fired.created) {
            (Some(error), _) => {
                tracing::warn!(gate = %fired.gate, %key, reason = ?fired.reason, %error, "the broker cannot start the gate's job")
            }
            (None, true) => tracing::info!(
                gate = %fired.gate,
                %key,
                reason = ?fired.reason,
                job = %fired.job_id,
                job_name = %pending.fire.job_name,
                "gate fired"
            ),
            (None, false) => {
                tracing::debug!(gate = %fired.gate, %key, reason = ?fired.reason, job = %fired.job_id, "gate had fired already")
            }
        }
        self.pump_fires();
        self.report_caught_up();
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if now.saturating_duration_since(self.last_heard) > self.broker_timeout {
            self.reconnect(now);
            return;
        }
        if now.duration_since(self.last_sent) >= self.heartbeat {
            self.send(&ToBroker::Heartbeat);
        }
        if !self.registered {
            if now.duration_since(self.last_sent) >= HELLO_RESEND {
                self.hello();
            }
            return;
        }
        match self.awaiting {
            Some((_, sent)) if now.duration_since(sent) >= SUBSCRIBE_RESEND => self.subscribe(),
            None if now >= self.poll_at && self.unacked.len() < UNACKED_FIRES_PULL_MAX && !self.stopping => {
                self.subscribe()
            }
            _ => {}
        }
        let stale: Vec<FireId> = self
            .unacked
            .iter()
            .filter(|(_, p)| p.sent.is_some_and(|at| now.duration_since(at) >= FIRE_RESEND))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if !self.send_fire(&id) {
                break;
            }
        }
        self.pump_fires();
        if now.duration_since(self.last_expire) >= EXPIRE_INTERVAL {
            self.last_expire = now;
            self.expire();
        }
    }

    /// Gives up the keys whose deadline had passed when the semaphore last knew it had every event.
    fn expire(&mut self) {
        let Some(caught_up_at) = self.caught_up_at else { return };
        // An event recorded just before a deadline may become visible just after it; a little lag lets it count.
        let Ok(lag) = chrono::Duration::from_std(EXPIRE_LAG) else { return };
        let file = self.config.file.clone();
        let effects = self.counter.expire(&file, caught_up_at - lag);
        self.on_effects(effects);
        self.pump_fires();
    }

    /// Paranoid Pirate: the broker is gone or restarted; a fresh socket, then Hello again, backing off.
    fn reconnect(&mut self, now: Instant) {
        let silent_ms = now.saturating_duration_since(self.last_heard).as_millis() as u64;
        let retry_in_ms = self.reconnect_backoff.as_millis() as u64;
        if self.ever_registered {
            tracing::warn!(semaphore = %self.config.name, broker = %self.config.broker, silent_ms, retry_in_ms, "lost the broker; reconnecting");
        } else {
            tracing::warn!(semaphore = %self.config.name, broker = %self.config.broker, retry_in_ms, "the broker does not answer (is it running?); retrying");
        }
        self.lose_session();
        if let Err(e) = self.link.reconnect() {
            tracing::warn!(error = %e, "reconnect failed");
        }
        self.hello();
        self.last_heard = now + self.reconnect_backoff;
        self.reconnect_backoff = (self.reconnect_backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }

    /// Waits (bounded) for answers to the fires in flight, then says goodbye.
    async fn stop(&mut self) {
        self.stopping = true;
        let deadline = Instant::now() + FIRE_ACK_WAIT;
        let mut tick = tokio::time::interval(TICK);
        while self.registered && self.in_flight > 0 && Instant::now() < deadline {
            tokio::select! {
                Some(message) = self.link.recv() => self.on_message(message),
                _ = tick.tick() => {}
            }
        }
        self.send(&ToBroker::Goodbye(Goodbye { hand_back: Vec::new() }));
        // Fires left unanswered are not lost: another semaphore, or this one restarted, fires them again.
        tracing::info!(
            semaphore = %self.config.name,
            events = self.events_counted,
            unanswered_fires = self.unacked.len(),
            "semaphore stopped"
        );
    }
}

/// A rate limit for warnings that a stream of bad events could repeat without end.
struct Warnings {
    window_start: Instant,
    shown: u32,
    suppressed: u64,
}

impl Warnings {
    fn new(now: Instant) -> Warnings {
        Warnings { window_start: now, shown: 0, suppressed: 0 }
    }

    /// `Some(warnings suppressed since the last one shown)` if this one may be shown.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if now.duration_since(self.window_start) >= KEY_WARNINGS_WINDOW {
            self.window_start = now;
            self.shown = 0;
        }
        if self.shown < KEY_WARNINGS_PER_WINDOW {
            self.shown += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}
