//! The broker's records of jobs and attempts, as the store keeps them and the
//! front door shows them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use jobz_core::pipeline::{GateReason, NewJob, Origin};
use jobz_core::Status;

/// One job: its identity, params, where it stands and its timestamps (SPEC `GET /jobs/{id}`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub job_name: String,
    pub params: BTreeMap<String, String>,
    pub status: Status,
    /// Attempts started so far (0 while the first one is queued).
    pub attempts: u32,
    pub run_id: String,
    pub parent_id: Option<String>,
    pub origin: Origin,
    /// Higher runs first; equal priorities are first-in, first-out.
    pub priority: i32,
    /// The worker of the current or last attempt.
    pub worker: Option<String>,
    /// The fencing token of the current attempt: a result carrying another token is stale.
    pub lease: Option<u64>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
    /// A queued retry waits until then.
    pub not_before: Option<DateTime<Utc>>,
    /// The last bytes of the output (SPEC "output").
    pub output_tail: String,
    pub progress: Option<Progress>,
    /// Why the job failed without a process result, e.g. the worker does not know the job.
    pub error: Option<String>,
    /// The job's filled `unique` key, when its definition has one: while the
    /// job is queued or running, or succeeded within the ttl, a start of the
    /// same job name with the same key returns this job.
    pub unique_key: Option<String>,
}

impl JobRecord {
    /// A new job with id `id`, queued at `now`: the record a start, a follow-up or a gate stores.
    /// A job that starts a run (`new.run_id` is `None`) is its own run.
    pub fn queued(id: String, new: &NewJob, priority: i32, now: DateTime<Utc>) -> JobRecord {
        JobRecord {
            run_id: new.run_id.clone().unwrap_or_else(|| id.clone()),
            id,
            job_name: new.job_name.clone(),
            params: new.params.clone(),
            status: Status::Queued,
            attempts: 0,
            parent_id: new.parent_id.clone(),
            origin: new.origin.clone(),
            priority,
            worker: None,
            lease: None,
            exit_code: None,
            signal: None,
            created_at: now,
            queued_at: Some(now),
            started_at: None,
            finished_at: None,
            cancelled_at: None,
            not_before: None,
            output_tail: String::new(),
            progress: None,
            error: None,
            unique_key: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub percent: f64,
    pub message: Option<String>,
}

/// One attempt of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRecord {
    pub job_id: String,
    /// 1-based.
    pub attempt: u32,
    pub worker: String,
    pub lease: u64,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// `None` while it runs.
    pub status: Option<Status>,
    pub exit_code: Option<i32>,
    /// A result that came back after the attempt was handed to another worker:
    /// recorded here for the record, it changed nothing.
    pub stale: bool,
}

/// What happened to an upstream job of a gate, as the broker records it for semaphores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateEventKind {
    Succeeded,
    /// Failed or timed out after its last attempt.
    FailedForGood,
}

/// One durable gate event; `seq` grows with every event, across restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct GateEventRecord {
    pub seq: u64,
    pub kind: GateEventKind,
    pub job_id: String,
    pub job_name: String,
    pub params: BTreeMap<String, String>,
    pub run_id: String,
    pub attempt: u32,
    pub at: DateTime<Utc>,
}

/// A gate's fire for one key and reason: the job it started, or why it could not.
#[derive(Debug, Clone, PartialEq)]
pub struct FireRecord {
    pub gate: String,
    pub key: String,
    pub reason: GateReason,
    pub job_id: Option<String>,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
}

/// A new job stored only if no job already stands for it: the job its
/// idempotency key was first given to, or a job holding its unique key. The
/// store decides inside its writer's transaction, so concurrent starts with
/// one key are serialized there and at most one of them inserts.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardedInsert {
    /// The job to insert; its `unique_key`, when set, is checked.
    pub job: JobRecord,
    /// A succeeded job holds the unique key if it finished at or after this
    /// instant (the start's time minus the `unique` ttl). Unused without a key.
    pub succeeded_since: DateTime<Utc>,
    /// The start's `Idempotency-Key`, if it has one.
    pub idempotency: Option<IdempotencyClaim>,
}

/// An `Idempotency-Key` given with a start. Keys are global (not per job name)
/// and remembered with the job name and params of the start that first gave them.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyClaim {
    pub key: String,
    /// A key first given before this instant has expired: it is given again as new.
    pub since: DateTime<Utc>,
}

/// What became of a [`GuardedInsert`], in the order of the guarded inserts of one commit.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// The job was inserted as given.
    Inserted,
    /// Nothing was inserted: this job stands for the start (the job of the
    /// idempotency key, or the holder of the unique key).
    Existing(Box<JobRecord>),
    /// Nothing was inserted: the idempotency key was first given with another
    /// job name or other params (after defaults) than this start's.
    KeyReused {
        /// The job the key was first given to.
        job_id: String,
        /// The job name and params the key was first given with.
        job_name: String,
        params: BTreeMap<String, String>,
    },
}

/// A schedule the broker has run with, by its identity (`jobz_core::schedule::identity`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRecord {
    pub id: String,
    /// When the broker first ran with it: no instant before this fires.
    pub first_seen: DateTime<Utc>,
}

/// One scheduled instant that fired: the job it started, or why it could not.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleFireRecord {
    /// The schedule's identity.
    pub schedule: String,
    /// The scheduled instant (whole seconds).
    pub instant: DateTime<Utc>,
    pub job_id: Option<String>,
    pub error: Option<String>,
    /// When it fired, on the scheduler's clock.
    pub at: DateTime<Utc>,
}

/// Everything that changes a job, as one durable step. The store applies a
/// batch of changes in one transaction (group commit).
///
/// `Insert` is by far the largest variant and also the most common one (every
/// start, follow-up and fire), so it stays unboxed: a box would cost an
/// allocation per job to shrink the rarer variants.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A new job, queued.
    Insert(JobRecord),
    /// A new job, queued, unless a job already stands for it; the commit answers
    /// with an [`Admission`] for it. Later changes of the same commit that name
    /// the job (a `Fire`) then name the job that stood for it instead.
    InsertUnlessHeld(Box<GuardedInsert>),
    /// Queued → running: attempt `attempt` handed to `worker` under `lease`.
    /// `job_name` is the job's, for the store's counts by name (the store
    /// does not read it back from the row).
    Dispatch {
        id: String,
        job_name: String,
        attempt: u32,
        worker: String,
        lease: u64,
        at: DateTime<Utc>,
    },
    /// Another copy of a running broadcast job, handed to `worker` under its own lease.
    AttemptStart {
        id: String,
        attempt: u32,
        worker: String,
        lease: u64,
        at: DateTime<Utc>,
    },
    /// One copy of a broadcast ended; the job itself ends with a `Finish` after its last copy.
    AttemptEnd {
        id: String,
        lease: u64,
        status: Status,
        exit_code: Option<i32>,
        at: DateTime<Utc>,
    },
    /// Running → a final status, for the attempt holding `lease`. `job_name` as in `Dispatch`.
    Finish {
        id: String,
        job_name: String,
        lease: u64,
        status: Status,
        exit_code: Option<i32>,
        signal: Option<i32>,
        at: DateTime<Utc>,
        output_tail: String,
        error: Option<String>,
    },
    /// Running → queued: the lease was lost (worker gone) or a retry is due at `not_before`.
    Requeue {
        id: String,
        /// As in `Dispatch`.
        job_name: String,
        at: DateTime<Utc>,
        not_before: Option<DateTime<Utc>>,
    },
    /// Queued or running → failed without a result, e.g. its job left the job file.
    Fail {
        id: String,
        at: DateTime<Utc>,
        error: String,
    },
    /// Queued or running → cancelled.
    Cancel {
        id: String,
        at: DateTime<Utc>,
    },
    /// A final status → queued, as a new attempt: a failed job started again by
    /// hand (`not_before: None`), or an automatic retry after a failed attempt
    /// (following that attempt's `Finish` in the same batch) that waits until `not_before`.
    Retry {
        id: String,
        at: DateTime<Utc>,
        not_before: Option<DateTime<Utc>>,
    },
    Progress {
        id: String,
        progress: Progress,
    },
    /// An upstream job of a gate ended for good: recorded for the semaphores.
    GateEvent(GateEventRecord),
    /// A gate fired for a key: recorded once per (gate, key, reason); a repeat is a no-op.
    /// Its job, if any, is inserted by an `Insert` in the same batch.
    Fire(FireRecord),
    /// The broker runs with a schedule: its first sighting is recorded; a later one is a no-op.
    ScheduleSeen(ScheduleRecord),
    /// A schedule fired for an instant: recorded once per (schedule, instant). A second
    /// record of the same instant is refused, and with it the whole commit it came in,
    /// so the job `Insert`ed in the same batch is not stored twice.
    ScheduleFire(ScheduleFireRecord),
    /// A result for a superseded attempt: recorded on the attempt, the job is untouched.
    Stale {
        id: String,
        lease: u64,
        worker: String,
        status: Status,
        exit_code: Option<i32>,
        at: DateTime<Utc>,
    },
}

/// A listing query (SPEC `GET /jobs?status=&job_name=&run_id=&limit=`), newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobFilter {
    pub status: Option<Status>,
    pub job_name: Option<String>,
    pub run_id: Option<String>,
    pub limit: usize,
}

impl JobFilter {
    /// Whether `job` is one this filter lists (its `limit` aside).
    pub fn matches(&self, job: &JobRecord) -> bool {
        self.status.is_none_or(|s| job.status == s)
            && self.job_name.as_ref().is_none_or(|n| &job.job_name == n)
            && self.run_id.as_ref().is_none_or(|r| &job.run_id == r)
    }
}
