//! The wire protocol between the broker and its workers and semaphores.
//!
//! A message is one ZeroMQ multipart message of one or two frames:
//!
//! ```text
//! frame 1:  'J' 'Z' VERSION KIND | JSON object with the message's fields
//! frame 2:  raw bytes             (Output: a chunk of output; Result: the output tail)
//! ```
//!
//! This module is pure: no I/O, no clock. [`decode_to_broker`] and
//! [`decode_to_worker`] check the frame count, the magic, the version, the kind
//! and every size against [`limits`] before they parse, and they never panic,
//! whatever the bytes. An unknown version is its own error,
//! [`DecodeError::Version`], so the broker can tell an outdated peer what is
//! wrong. [`try_encode`] runs the receiver's checks on the sending side, so a
//! message the peer would refuse is a local error rather than a resend loop.
//!
//! Times travel as unix milliseconds (JSON integers); sub-millisecond precision
//! is dropped. Within one version a sender may add fields: receivers ignore
//! fields they do not know. A new required field or a changed meaning bumps
//! [`VERSION`]. The header layout and the `Error` message never change, so a
//! version mismatch can always be reported. `docs/PROTOCOL.md` describes the
//! session these messages make up.
//!
//! These are wire types, not domain types: the broker and the worker convert
//! at the edge (for example [`Outcome`] into [`crate::job::Status`]).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::gates::UpstreamEvent;
use crate::pipeline::{GateReason, JobFacts, NewJob, Origin};

pub mod limits;

use limits::*;

/// The first two bytes of every message.
pub const MAGIC: [u8; 2] = *b"JZ";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// `'J' 'Z' VERSION KIND`.
pub const HEADER_BYTES: usize = 4;

/// The KIND byte of each message. Messages to the broker use `0x01..=0x7f` and
/// messages from it `0x81..=0xff`, so a message sent the wrong way is an
/// unknown kind rather than a misread message.
pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const CREDIT: u8 = 0x02;
    pub const HEARTBEAT: u8 = 0x03;
    pub const STARTED: u8 = 0x04;
    pub const OUTPUT: u8 = 0x05;
    pub const PROGRESS: u8 = 0x06;
    pub const RESULT: u8 = 0x07;
    pub const GOODBYE: u8 = 0x08;
    pub const SUBSCRIBE: u8 = 0x09;
    pub const FIRE: u8 = 0x0A;

    pub const WELCOME: u8 = 0x81;
    pub const DISPATCH: u8 = 0x82;
    pub const RESULT_ACK: u8 = 0x83;
    pub const CANCEL: u8 = 0x84;
    pub const BROKER_HEARTBEAT: u8 = 0x85;
    pub const RECONNECT: u8 = 0x86;
    pub const ERROR: u8 = 0x87;
    pub const EVENTS: u8 = 0x88;
    pub const FIRED: u8 = 0x89;
}

// ---------------------------------------------------------------------------
// Messages to the broker
// ---------------------------------------------------------------------------

/// Everything a worker or semaphore sends to the broker.
#[derive(Debug, Clone, PartialEq)]
pub enum ToBroker {
    /// Registration, and re-registration after a reconnect or a broker restart.
    Hello(Hello),
    /// `n` more free slots (additive; each `Dispatch` consumes one).
    Credit(Credit),
    Heartbeat,
    /// The process of an attempt started.
    Started(Started),
    /// A chunk of an attempt's output; the bytes travel in frame 2.
    Output(Output),
    Progress(Progress),
    /// An attempt ended; resent with the same lease until `ResultAck`.
    Result(ResultReport),
    /// A draining peer leaves and hands back the attempts it did not finish.
    Goodbye(Goodbye),
    /// A semaphore asks for the durable gate events from `from` on; answered by `Events`.
    Subscribe(Subscribe),
    /// A semaphore asks the broker to start a gate's job for one key; answered by `Fired`.
    Fire(Fire),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Worker,
    Semaphore,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub role: Role,
    pub name: String,
    pub host: String,
    pub pid: u32,
    /// Slots this peer has in total.
    pub concurrency: u32,
    /// Slots free right now; replaces whatever credit the broker remembered.
    pub credit: u32,
    pub jobs: Vec<ServedJob>,
    /// Attempts this peer still runs, or holds an unacknowledged result for:
    /// the broker re-adopts them instead of handing them to another worker.
    pub holding: Vec<Held>,
}

/// A job a worker serves, with the digest of its definition (see [`digest`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedJob {
    pub name: String,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub job_id: String,
    pub lease: u64,
    /// The attempt ended and its `Result` awaits a `ResultAck`.
    pub done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    pub n: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    pub job_id: String,
    pub lease: u64,
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    pub job_id: String,
    pub lease: u64,
    /// Where `data` starts in the attempt's log, so a resent chunk can be dropped.
    pub offset: u64,
    /// Frame 2, not JSON.
    #[serde(skip)]
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub job_id: String,
    pub lease: u64,
    /// 0 to 100, finite.
    pub percent: f64,
    pub message: Option<String>,
}

/// How an attempt ended. A wire type: [`crate::job::Status`] is the domain's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [Outcome::Succeeded, Outcome::Failed, Outcome::TimedOut, Outcome::Cancelled];
}

impl From<Outcome> for crate::job::Status {
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Succeeded => crate::job::Status::Succeeded,
            Outcome::Failed => crate::job::Status::Failed,
            Outcome::TimedOut => crate::job::Status::TimedOut,
            Outcome::Cancelled => crate::job::Status::Cancelled,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultReport {
    pub job_id: String,
    pub lease: u64,
    pub status: Outcome,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub started_at: DateTime<Utc>,
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub finished_at: DateTime<Utc>,
    /// Why the attempt could not run or was killed, for people; at most [`TEXT_MAX_BYTES`].
    pub error: Option<String>,
    /// The tail of stdout+stderr; frame 2, not JSON.
    #[serde(skip)]
    pub output: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    pub hand_back: Vec<LeaseRef>,
}

/// One lease of one job: what `ResultAck`, `Cancel` and `Goodbye` refer to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseRef {
    pub job_id: String,
    pub lease: u64,
}

/// A semaphore asks for the gate events with `seq >= from`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    /// [`crate::gates::digest`] of the semaphore's `gates:`; a broker whose own
    /// digest differs answers `Error` and serves the semaphore nothing.
    pub gates_digest: String,
    pub from: u64,
}

/// Which of a gate's jobs a fire starts. The wire twin of [`GateReason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FireReason {
    /// `then`: the key is complete.
    Then,
    /// `on_timeout`: the key was given up.
    Timeout,
    /// `on_failure`: an upstream job of the key failed for good.
    Failure,
}

impl FireReason {
    pub const ALL: [FireReason; 3] = [FireReason::Then, FireReason::Timeout, FireReason::Failure];
}

impl From<GateReason> for FireReason {
    fn from(reason: GateReason) -> Self {
        match reason {
            GateReason::Then => FireReason::Then,
            GateReason::Timeout => FireReason::Timeout,
            GateReason::Failure => FireReason::Failure,
        }
    }
}

impl From<FireReason> for GateReason {
    fn from(reason: FireReason) -> Self {
        match reason {
            FireReason::Then => GateReason::Then,
            FireReason::Timeout => GateReason::Timeout,
            FireReason::Failure => GateReason::Failure,
        }
    }
}

/// Start the job of `gate` for `key` and `reason`: idempotent on the broker,
/// which starts at most one job per (gate, key, reason) whoever sends it and
/// however often (see `docs/PROTOCOL.md`, "Gates").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fire {
    pub gate: String,
    pub key: String,
    pub reason: FireReason,
    pub job_name: String,
    /// Already filled and checked against the semaphore's definition of `job_name`.
    pub params: BTreeMap<String, String>,
    pub run_id: Option<String>,
    pub parent_id: Option<String>,
}

impl Fire {
    /// The fire for a job a gate wants started; `None` for a job that no gate started.
    pub fn from_new_job(job: &NewJob) -> Option<Fire> {
        let Origin::Gate { gate, key, reason } = &job.origin else { return None };
        Some(Fire {
            gate: gate.clone(),
            key: key.clone(),
            reason: (*reason).into(),
            job_name: job.job_name.clone(),
            params: job.params.clone(),
            run_id: job.run_id.clone(),
            parent_id: job.parent_id.clone(),
        })
    }

    /// The job this fire asks for, as the pipeline describes it.
    pub fn new_job(&self) -> NewJob {
        NewJob {
            job_name: self.job_name.clone(),
            params: self.params.clone(),
            run_id: self.run_id.clone(),
            parent_id: self.parent_id.clone(),
            origin: Origin::Gate { gate: self.gate.clone(), key: self.key.clone(), reason: self.reason.into() },
        }
    }
}

// ---------------------------------------------------------------------------
// Messages to a worker or semaphore
// ---------------------------------------------------------------------------

/// Everything the broker sends to a worker or semaphore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWorker {
    Welcome(Welcome),
    Dispatch(Dispatch),
    /// The result of this lease is stored: stop resending it.
    ResultAck(LeaseRef),
    /// Kill the attempt holding this lease.
    Cancel(LeaseRef),
    Heartbeat,
    /// "I do not know you (I restarted, or forgot you): send Hello again."
    Reconnect,
    /// Your last message was malformed or of a version I do not speak (or,
    /// to a semaphore's `Subscribe`, its gates differ from the broker's).
    Error(ErrorReply),
    /// A page of gate events: the answer to `Subscribe`.
    Events(Events),
    /// The job a fire started: the answer to `Fire`.
    Fired(Fired),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub heartbeat_ms: u64,
    /// A peer silent this long loses its leases; at least `heartbeat_ms`.
    pub lease_timeout_ms: u64,
    /// Served jobs whose digest differs from the broker's; not dispatched unless
    /// the broker runs with `--allow-drift`.
    pub drift: Vec<String>,
    /// The HTTP front door, given to jobs as `JOBZ_URL`.
    pub url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatch {
    pub job_id: String,
    pub job_name: String,
    pub params: BTreeMap<String, String>,
    pub run_id: String,
    pub parent_id: Option<String>,
    pub attempt: u32,
    /// The fencing token: every message about this attempt carries it.
    pub lease: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub message: String,
}

/// What happened to an upstream job, as the gates see it. The wire twin of
/// [`UpstreamEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateEventKind {
    /// The job succeeded (any attempt).
    Succeeded,
    /// The job ended failed or timed out after its last attempt.
    FailedForGood,
}

/// One durable gate event, numbered by the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateEvent {
    /// Grows with every recorded event, across broker restarts. Numbers may be
    /// skipped, but an event never becomes visible after one with a larger `seq`.
    pub seq: u64,
    pub kind: GateEventKind,
    pub job_id: String,
    pub job_name: String,
    pub params: BTreeMap<String, String>,
    pub run_id: String,
    pub attempt: u32,
    /// When the broker recorded the job's end: the time every semaphore counts the event at.
    #[serde(with = "chrono::serde::ts_milliseconds")]
    pub at: DateTime<Utc>,
}

impl GateEvent {
    /// The event as [`crate::gates::GateBook::observe`] takes it.
    pub fn upstream(&self) -> UpstreamEvent {
        let facts = JobFacts {
            id: self.job_id.clone(),
            job_name: self.job_name.clone(),
            params: self.params.clone(),
            run_id: self.run_id.clone(),
            attempt: self.attempt,
        };
        match self.kind {
            GateEventKind::Succeeded => UpstreamEvent::Succeeded(facts),
            GateEventKind::FailedForGood => UpstreamEvent::FailedForGood(facts),
        }
    }
}

/// The gate events with `seq` in `[from, next)`, in `seq` order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Events {
    /// The `from` of the `Subscribe` this answers, so a late answer to an
    /// earlier `Subscribe` can be recognised and dropped.
    pub from: u64,
    /// At most [`EVENTS_PAGE_MAX`] events; empty means "caught up for now".
    pub events: Vec<GateEvent>,
    /// Where to ask from next: past every event in this page (and past any the
    /// broker skipped). Equal to `from` when the page is empty.
    pub next: u64,
}

/// A page of events built by [`Events::page`], and what could not go in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsPage {
    pub page: Events,
    /// Events too large to travel in any page, even alone: skipped (the page's
    /// `next` passes them). The broker logs them; with the SPEC's param
    /// limits this only happens to jobs with over a hundred near-4-KiB params.
    pub skipped: Vec<u64>,
}

impl Events {
    /// The answer to `Subscribe { from }`: takes `events` (in `seq` order,
    /// every `seq >= from`; more than one page is fine) while the page stays
    /// within [`EVENTS_PAGE_MAX`] events and [`EVENTS_PAGE_MAX_BYTES`] of
    /// JSON, so the result always passes [`try_encode`]. Events out of order
    /// or before `from` are a caller's bug and end the page.
    pub fn page(from: u64, events: impl IntoIterator<Item = GateEvent>) -> EventsPage {
        let mut page = Events { from, events: Vec::new(), next: from };
        let mut skipped = Vec::new();
        let mut bytes = 0usize;
        for event in events {
            if event.seq < page.next || page.events.len() >= EVENTS_PAGE_MAX {
                debug_assert!(event.seq >= page.next, "events out of seq order: {} after {}", event.seq, page.next);
                break;
            }
            let size = json_size(&event) + 1; // and a comma
            if size > EVENTS_PAGE_MAX_BYTES || GateEvent::validate(&event).is_err() {
                skipped.push(event.seq);
                page.next = event.seq.saturating_add(1);
                continue;
            }
            if bytes + size > EVENTS_PAGE_MAX_BYTES {
                break;
            }
            bytes += size;
            page.next = event.seq.saturating_add(1);
            page.events.push(event);
        }
        EventsPage { page, skipped }
    }
}

/// The answer to `Fire`: the job started for this (gate, key, reason), now
/// (`created`) or earlier, by this semaphore or another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fired {
    pub gate: String,
    pub key: String,
    /// The reason of the `Fire` this answers (so the semaphore can match it).
    pub reason: FireReason,
    /// The job that holds this fire: the one started for it, or, when the fire
    /// conflicts with one already recorded for the key (see
    /// [`crate::gates::fire_conflicts`]), the job of that earlier fire. Empty
    /// only with `error`.
    pub job_id: String,
    /// Whether this `Fire` created the job (false for every repeat).
    pub created: bool,
    /// The broker could not start the job and never will (e.g. its
    /// definition refuses the params); the fire is recorded as failed with
    /// this message. Stop resending.
    pub error: Option<String>,
}

/// Unit messages carry an empty JSON object; unknown fields are ignored like everywhere else.
#[derive(Serialize, Deserialize)]
struct Empty {}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a message was refused. Every variant is an expected outcome of reading
/// the network, never a bug.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("a message has 1 to {max} frames, got {got}", max = FRAMES_MAX)]
    FrameCount { got: usize },
    #[error("the header frame is {len} bytes, shorter than the {min}-byte header", min = HEADER_BYTES)]
    Truncated { len: usize },
    #[error("not a jobz message: magic {got:02x?}")]
    Magic { got: [u8; 2] },
    #[error("protocol version {got} is not spoken here (this side speaks version {VERSION})")]
    Version { got: u8 },
    #[error("unknown message kind {kind:#04x}")]
    Kind { kind: u8 },
    #[error("{message} takes {expected} frame(s), got {got}")]
    Frames { message: &'static str, expected: usize, got: usize },
    #[error("{what} is {len}, over the limit of {max}")]
    TooLarge { what: &'static str, len: usize, max: usize },
    #[error("{message} body is not valid: {reason}")]
    Json { message: &'static str, reason: String },
    #[error("{what} {reason}")]
    Invalid { what: &'static str, reason: &'static str },
}

/// A message its receiver would refuse; found before sending it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not sent, the receiver would refuse it: {0}")]
pub struct EncodeError(pub DecodeError);

// ---------------------------------------------------------------------------
// Encoding and decoding
// ---------------------------------------------------------------------------

/// What both message directions share, so the transport is written once.
pub trait Wire: Sized {
    /// The message's frames. Infallible; use [`try_encode`] at the edge.
    fn encode(&self) -> Vec<Vec<u8>>;
    /// Checks and parses one received message.
    fn decode<F: AsRef<[u8]>>(frames: &[F]) -> Result<Self, DecodeError>;
    /// The checks the receiver makes after parsing: sizes, counts, ranges.
    fn validate(&self) -> Result<(), DecodeError>;
    /// The message's name, for logs.
    fn name(&self) -> &'static str;
}

/// The frames of `message`, without checking it against the limits.
pub fn encode<M: Wire>(message: &M) -> Vec<Vec<u8>> {
    message.encode()
}

/// The frames of `message`, or the error its receiver would give.
pub fn try_encode<M: Wire>(message: &M) -> Result<Vec<Vec<u8>>, EncodeError> {
    message.validate().map_err(EncodeError)?;
    let frames = message.encode();
    // The payload was checked by validate; only the JSON's size is known just now.
    if let Some(first) = frames.first() {
        if first.len() > FRAME_MAX_BYTES {
            let len = first.len();
            return Err(EncodeError(DecodeError::TooLarge { what: "the header frame", len, max: FRAME_MAX_BYTES }));
        }
    }
    Ok(frames)
}

pub fn decode_to_broker<F: AsRef<[u8]>>(frames: &[F]) -> Result<ToBroker, DecodeError> {
    ToBroker::decode(frames)
}

pub fn decode_to_worker<F: AsRef<[u8]>>(frames: &[F]) -> Result<ToWorker, DecodeError> {
    ToWorker::decode(frames)
}

/// The digest of a job definition in its canonical text form: FNV-1a 64 as 16
/// lowercase hex chars. Not cryptographic: it only detects drift between
/// honest peers' job files; authenticity is CURVE's business.
pub fn digest(canonical: &str) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = canonical.bytes().fold(OFFSET, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(PRIME));
    format!("{hash:016x}")
}

/// The longest prefix of `text` of at most `max_bytes` that ends on a char
/// boundary: how senders fit free text into [`TEXT_MAX_BYTES`].
pub fn clip(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1; // terminates: 0 is always a boundary
    }
    &text[..end]
}

/// A message split into its header fields, checked for everything that can be
/// checked without knowing the kind.
struct Parts<'a> {
    kind: u8,
    body: &'a [u8],
    payload: Option<&'a [u8]>,
}

fn split<F: AsRef<[u8]>>(frames: &[F]) -> Result<Parts<'_>, DecodeError> {
    let Some(first) = frames.first() else {
        return Err(DecodeError::FrameCount { got: 0 });
    };
    let head = first.as_ref();
    let [m0, m1, version, kind, body @ ..] = head else {
        return Err(DecodeError::Truncated { len: head.len() });
    };
    if [*m0, *m1] != MAGIC {
        return Err(DecodeError::Magic { got: [*m0, *m1] });
    }
    // The version comes before everything else a future version may change,
    // such as the number of frames.
    if *version != VERSION {
        return Err(DecodeError::Version { got: *version });
    }
    if frames.len() > FRAMES_MAX {
        return Err(DecodeError::FrameCount { got: frames.len() });
    }
    if head.len() > FRAME_MAX_BYTES {
        return Err(DecodeError::TooLarge { what: "the header frame", len: head.len(), max: FRAME_MAX_BYTES });
    }
    let payload = frames.get(1).map(|p| p.as_ref());
    if let Some(p) = payload {
        if p.len() > PAYLOAD_MAX_BYTES {
            return Err(DecodeError::TooLarge { what: "the payload frame", len: p.len(), max: PAYLOAD_MAX_BYTES });
        }
    }
    Ok(Parts { kind: *kind, body, payload })
}

impl Parts<'_> {
    fn frames(&self, message: &'static str, expected: usize) -> Result<(), DecodeError> {
        let got = 1 + usize::from(self.payload.is_some());
        if got == expected {
            Ok(())
        } else {
            Err(DecodeError::Frames { message, expected, got })
        }
    }

    /// The body of a one-frame message. Its size was bounded by [`split`], so
    /// what serde allocates is bounded by a small multiple of FRAME_MAX_BYTES.
    fn json<T: DeserializeOwned>(&self, message: &'static str) -> Result<T, DecodeError> {
        self.frames(message, 1)?;
        self.parse(message)
    }

    /// The body and the payload of a two-frame message.
    fn json_and_payload<T: DeserializeOwned>(&self, message: &'static str) -> Result<(T, Vec<u8>), DecodeError> {
        self.frames(message, 2)?;
        let body = self.parse(message)?;
        Ok((body, self.payload.unwrap_or_default().to_vec()))
    }

    fn unit(&self, message: &'static str) -> Result<(), DecodeError> {
        self.json::<Empty>(message).map(drop)
    }

    fn parse<T: DeserializeOwned>(&self, message: &'static str) -> Result<T, DecodeError> {
        serde_json::from_slice(self.body).map_err(|e| DecodeError::Json { message, reason: e.to_string() })
    }
}

fn frames_of(kind: u8, body: &impl Serialize, payload: Option<&[u8]>) -> Vec<Vec<u8>> {
    let mut head = Vec::with_capacity(128);
    head.extend_from_slice(&[MAGIC[0], MAGIC[1], VERSION, kind]);
    // Writing into a Vec fails only for maps with non-string keys or a failing
    // Serialize impl; these types have neither, so a failure is a bug here.
    serde_json::to_writer(&mut head, body).expect("wire types always serialize");
    match payload {
        Some(p) => vec![head, p.to_vec()],
        None => vec![head],
    }
}

impl Wire for ToBroker {
    fn encode(&self) -> Vec<Vec<u8>> {
        match self {
            ToBroker::Hello(m) => frames_of(kind::HELLO, m, None),
            ToBroker::Credit(m) => frames_of(kind::CREDIT, m, None),
            ToBroker::Heartbeat => frames_of(kind::HEARTBEAT, &Empty {}, None),
            ToBroker::Started(m) => frames_of(kind::STARTED, m, None),
            ToBroker::Output(m) => frames_of(kind::OUTPUT, m, Some(&m.data)),
            ToBroker::Progress(m) => frames_of(kind::PROGRESS, m, None),
            ToBroker::Result(m) => frames_of(kind::RESULT, m, Some(&m.output)),
            ToBroker::Goodbye(m) => frames_of(kind::GOODBYE, m, None),
            ToBroker::Subscribe(m) => frames_of(kind::SUBSCRIBE, m, None),
            ToBroker::Fire(m) => frames_of(kind::FIRE, m, None),
        }
    }

    fn decode<F: AsRef<[u8]>>(frames: &[F]) -> Result<Self, DecodeError> {
        let parts = split(frames)?;
        let message = match parts.kind {
            kind::HELLO => ToBroker::Hello(parts.json("Hello")?),
            kind::CREDIT => ToBroker::Credit(parts.json("Credit")?),
            kind::HEARTBEAT => parts.unit("Heartbeat").map(|()| ToBroker::Heartbeat)?,
            kind::STARTED => ToBroker::Started(parts.json("Started")?),
            kind::OUTPUT => {
                let (output, data) = parts.json_and_payload::<Output>("Output")?;
                ToBroker::Output(Output { data, ..output })
            }
            kind::PROGRESS => ToBroker::Progress(parts.json("Progress")?),
            kind::RESULT => {
                let (report, output) = parts.json_and_payload::<ResultReport>("Result")?;
                ToBroker::Result(ResultReport { output, ..report })
            }
            kind::GOODBYE => ToBroker::Goodbye(parts.json("Goodbye")?),
            kind::SUBSCRIBE => ToBroker::Subscribe(parts.json("Subscribe")?),
            kind::FIRE => ToBroker::Fire(parts.json("Fire")?),
            other => return Err(DecodeError::Kind { kind: other }),
        };
        message.validate()?;
        Ok(message)
    }

    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            ToBroker::Hello(m) => {
                name("Hello.name", &m.name)?;
                text("Hello.host", &m.host, NAME_MAX_BYTES)?;
                at_most("Hello.concurrency", m.concurrency as usize, CONCURRENCY_MAX as usize)?;
                if m.credit > m.concurrency {
                    return Err(DecodeError::Invalid { what: "Hello.credit", reason: "exceeds concurrency" });
                }
                at_most("Hello.jobs (count)", m.jobs.len(), JOBS_MAX)?;
                for job in &m.jobs {
                    name("Hello.jobs.name", &job.name)?;
                    text("Hello.jobs.digest", &job.digest, DIGEST_MAX_BYTES)?;
                }
                at_most("Hello.holding (count)", m.holding.len(), HOLDING_MAX)?;
                m.holding.iter().try_for_each(|held| id("Hello.holding.job_id", &held.job_id))
            }
            ToBroker::Credit(m) => at_most("Credit.n", m.n as usize, CONCURRENCY_MAX as usize),
            ToBroker::Heartbeat => Ok(()),
            ToBroker::Started(m) => id("Started.job_id", &m.job_id),
            ToBroker::Output(m) => {
                id("Output.job_id", &m.job_id)?;
                at_most("Output.data (bytes)", m.data.len(), PAYLOAD_MAX_BYTES)?;
                // A receiver computes offset + len to place the chunk; that must not overflow.
                match m.offset.checked_add(m.data.len() as u64) {
                    Some(_) => Ok(()),
                    None => {
                        Err(DecodeError::Invalid { what: "Output.offset", reason: "overflows with the chunk's length" })
                    }
                }
            }
            ToBroker::Progress(m) => {
                id("Progress.job_id", &m.job_id)?;
                if !(m.percent.is_finite() && (0.0..=100.0).contains(&m.percent)) {
                    return Err(DecodeError::Invalid { what: "Progress.percent", reason: "is not between 0 and 100" });
                }
                m.message.as_deref().map_or(Ok(()), |s| text("Progress.message", s, TEXT_MAX_BYTES))
            }
            ToBroker::Result(m) => {
                id("Result.job_id", &m.job_id)?;
                m.error.as_deref().map_or(Ok(()), |s| text("Result.error", s, TEXT_MAX_BYTES))?;
                at_most("Result.output (bytes)", m.output.len(), PAYLOAD_MAX_BYTES)
            }
            ToBroker::Goodbye(m) => {
                at_most("Goodbye.hand_back (count)", m.hand_back.len(), HOLDING_MAX)?;
                m.hand_back.iter().try_for_each(|l| id("Goodbye.hand_back.job_id", &l.job_id))
            }
            ToBroker::Subscribe(m) => {
                non_empty("Subscribe.gates_digest", &m.gates_digest)?;
                text("Subscribe.gates_digest", &m.gates_digest, DIGEST_MAX_BYTES)
            }
            ToBroker::Fire(m) => {
                name("Fire.gate", &m.gate)?;
                text("Fire.key", &m.key, GATE_KEY_MAX_BYTES)?;
                name("Fire.job_name", &m.job_name)?;
                params("Fire.params", &m.params)?;
                m.run_id.as_deref().map_or(Ok(()), |r| id("Fire.run_id", r))?;
                m.parent_id.as_deref().map_or(Ok(()), |p| id("Fire.parent_id", p))
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            ToBroker::Hello(_) => "Hello",
            ToBroker::Credit(_) => "Credit",
            ToBroker::Heartbeat => "Heartbeat",
            ToBroker::Started(_) => "Started",
            ToBroker::Output(_) => "Output",
            ToBroker::Progress(_) => "Progress",
            ToBroker::Result(_) => "Result",
            ToBroker::Goodbye(_) => "Goodbye",
            ToBroker::Subscribe(_) => "Subscribe",
            ToBroker::Fire(_) => "Fire",
        }
    }
}

impl Wire for ToWorker {
    fn encode(&self) -> Vec<Vec<u8>> {
        match self {
            ToWorker::Welcome(m) => frames_of(kind::WELCOME, m, None),
            ToWorker::Dispatch(m) => frames_of(kind::DISPATCH, m, None),
            ToWorker::ResultAck(m) => frames_of(kind::RESULT_ACK, m, None),
            ToWorker::Cancel(m) => frames_of(kind::CANCEL, m, None),
            ToWorker::Heartbeat => frames_of(kind::BROKER_HEARTBEAT, &Empty {}, None),
            ToWorker::Reconnect => frames_of(kind::RECONNECT, &Empty {}, None),
            ToWorker::Error(m) => frames_of(kind::ERROR, m, None),
            ToWorker::Events(m) => frames_of(kind::EVENTS, m, None),
            ToWorker::Fired(m) => frames_of(kind::FIRED, m, None),
        }
    }

    fn decode<F: AsRef<[u8]>>(frames: &[F]) -> Result<Self, DecodeError> {
        let parts = split(frames)?;
        let message = match parts.kind {
            kind::WELCOME => ToWorker::Welcome(parts.json("Welcome")?),
            kind::DISPATCH => ToWorker::Dispatch(parts.json("Dispatch")?),
            kind::RESULT_ACK => ToWorker::ResultAck(parts.json("ResultAck")?),
            kind::CANCEL => ToWorker::Cancel(parts.json("Cancel")?),
            kind::BROKER_HEARTBEAT => parts.unit("Heartbeat").map(|()| ToWorker::Heartbeat)?,
            kind::RECONNECT => parts.unit("Reconnect").map(|()| ToWorker::Reconnect)?,
            kind::ERROR => ToWorker::Error(parts.json("Error")?),
            kind::EVENTS => ToWorker::Events(parts.json("Events")?),
            kind::FIRED => ToWorker::Fired(parts.json("Fired")?),
            other => return Err(DecodeError::Kind { kind: other }),
        };
        message.validate()?;
        Ok(message)
    }

    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            ToWorker::Welcome(m) => {
                if m.heartbeat_ms == 0 {
                    return Err(DecodeError::Invalid { what: "Welcome.heartbeat_ms", reason: "is zero" });
                }
                if m.lease_timeout_ms < m.heartbeat_ms {
                    return Err(DecodeError::Invalid {
                        what: "Welcome.lease_timeout_ms",
                        reason: "is shorter than heartbeat_ms",
                    });
                }
                at_most("Welcome.drift (count)", m.drift.len(), JOBS_MAX)?;
                m.drift.iter().try_for_each(|job| name("Welcome.drift", job))?;
                m.url.as_deref().map_or(Ok(()), |url| text("Welcome.url", url, URL_MAX_BYTES))
            }
            ToWorker::Dispatch(m) => {
                id("Dispatch.job_id", &m.job_id)?;
                name("Dispatch.job_name", &m.job_name)?;
                id("Dispatch.run_id", &m.run_id)?;
                m.parent_id.as_deref().map_or(Ok(()), |p| id("Dispatch.parent_id", p))?;
                at_most("Dispatch.params (count)", m.params.len(), PARAMS_MAX)?;
                for (param, value) in &m.params {
                    name("Dispatch.params name", param)?;
                    text("Dispatch.params value", value, PARAM_VALUE_MAX_BYTES)?;
                }
                Ok(())
            }
            ToWorker::Events(m) => {
                at_most("Events.events (count)", m.events.len(), EVENTS_PAGE_MAX)?;
                // Pairs with the sender's page: seqs strictly grow within [from, next).
                let mut expected = m.from;
                for event in &m.events {
                    if event.seq < expected {
                        return Err(DecodeError::Invalid {
                            what: "Events.events.seq",
                            reason: "is not increasing from `from`",
                        });
                    }
                    expected = event.seq.saturating_add(1);
                    event.validate()?;
                }
                if m.next < expected || (m.events.last().is_some_and(|e| e.seq == u64::MAX)) {
                    return Err(DecodeError::Invalid { what: "Events.next", reason: "is not past every event" });
                }
                Ok(())
            }
            ToWorker::Fired(m) => {
                name("Fired.gate", &m.gate)?;
                text("Fired.key", &m.key, GATE_KEY_MAX_BYTES)?;
                match &m.error {
                    None => id("Fired.job_id", &m.job_id),
                    Some(error) => {
                        text("Fired.job_id", &m.job_id, ID_MAX_BYTES)?;
                        text("Fired.error", error, TEXT_MAX_BYTES)
                    }
                }
            }
            ToWorker::ResultAck(m) => id("ResultAck.job_id", &m.job_id),
            ToWorker::Cancel(m) => id("Cancel.job_id", &m.job_id),
            ToWorker::Heartbeat | ToWorker::Reconnect => Ok(()),
            ToWorker::Error(m) => text("Error.message", &m.message, TEXT_MAX_BYTES),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            ToWorker::Welcome(_) => "Welcome",
            ToWorker::Dispatch(_) => "Dispatch",
            ToWorker::ResultAck(_) => "ResultAck",
            ToWorker::Cancel(_) => "Cancel",
            ToWorker::Heartbeat => "Heartbeat",
            ToWorker::Reconnect => "Reconnect",
            ToWorker::Error(_) => "Error",
            ToWorker::Events(_) => "Events",
            ToWorker::Fired(_) => "Fired",
        }
    }
}

impl GateEvent {
    fn validate(&self) -> Result<(), DecodeError> {
        id("Events.events.job_id", &self.job_id)?;
        name("Events.events.job_name", &self.job_name)?;
        params("Events.events.params", &self.params)?;
        id("Events.events.run_id", &self.run_id)
    }
}

fn params(what: &'static str, params: &BTreeMap<String, String>) -> Result<(), DecodeError> {
    at_most(what, params.len(), PARAMS_MAX)?;
    for (param, value) in params {
        name(what, param)?;
        text(what, value, PARAM_VALUE_MAX_BYTES)?;
    }
    Ok(())
}

/// The length of `value`'s JSON, counted without building it.
fn json_size(value: &impl Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // As in frames_of: these types always serialize, and Count never fails.
    serde_json::to_writer(&mut count, value).expect("wire types always serialize");
    count.0
}

fn at_most(what: &'static str, len: usize, max: usize) -> Result<(), DecodeError> {
    if len > max {
        Err(DecodeError::TooLarge { what, len, max })
    } else {
        Ok(())
    }
}

fn text(what: &'static str, s: &str, max: usize) -> Result<(), DecodeError> {
    at_most(what, s.len(), max)
}

fn non_empty(what: &'static str, s: &str) -> Result<(), DecodeError> {
    if s.is_empty() {
        Err(DecodeError::Invalid { what, reason: "is empty" })
    } else {
        Ok(())
    }
}

fn name(what: &'static str, s: &str) -> Result<(), DecodeError> {
    non_empty(what, s)?;
    text(what, s, NAME_MAX_BYTES)
}

fn id(what: &'static str, s: &str) -> Result<(), DecodeError> {
    non_empty(what, s)?;
    text(what, s, ID_MAX_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_fnv1a_64() {
        // Reference vectors of FNV-1a 64.
        assert_eq!(digest(""), "cbf29ce484222325");
        assert_eq!(digest("a"), "af63dc4c8601ec8c");
        assert_eq!(digest("foobar"), "85944171f73967e8");
    }

    #[test]
    fn clip_stays_on_char_boundaries() {
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("héllo", 3), "hé");
        assert_eq!(clip("abc", 10), "abc");
        assert_eq!(clip("é", 0), "");
    }
}
