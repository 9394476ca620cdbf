//! The JSON the front door speaks (SPEC "HTTP API"), separate from the
//! broker's records: only this module serializes, and it converts at the edge.
//!
//! The same types are read back by the `jobz` client commands, so server and
//! client cannot drift. Fields beyond SPEC's list default when absent, so the
//! client also reads a front door that sends only SPEC's fields.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use jobz_core::pipeline::{GateReason, Origin};
use jobz_core::Status;
use serde::{Deserialize, Serialize};

use crate::handle::WorkerView;
use crate::model::{AttemptRecord, JobRecord};

/// One job (SPEC `GET /jobs/{id}`): SPEC's fields first, then extras.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub job_name: String,
    pub params: BTreeMap<String, String>,
    #[serde(with = "status_name")]
    pub status: Status,
    pub attempts: u32,
    pub run_id: String,
    pub parent_id: Option<String>,
    pub worker: Option<String>,
    pub exit_code: Option<i32>,
    #[serde(with = "time")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "optional_time")]
    pub queued_at: Option<DateTime<Utc>>,
    #[serde(with = "optional_time")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(with = "optional_time")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(with = "optional_time")]
    pub cancelled_at: Option<DateTime<Utc>>,
    /// The tail of stdout and stderr.
    pub output: String,
    #[serde(default)]
    pub signal: Option<i32>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub progress: Option<ProgressView>,
    /// Why the job failed without a process result.
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub origin: OriginView,
    /// A queued retry waits until then.
    #[serde(default, with = "optional_time")]
    pub not_before: Option<DateTime<Utc>>,
    /// The job's filled `unique` key; only for jobs whose definition has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
    /// Every attempt so far; in single-job answers only, not in lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_list: Option<Vec<AttemptView>>,
    /// A queued job that a limit of its name holds back: which limit, and where it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<HoldView>,
    /// Present (true) when a start returned an existing job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deduplicated: Option<bool>,
}

impl JobView {
    pub fn new(job: &JobRecord) -> JobView {
        JobView {
            id: job.id.clone(),
            job_name: job.job_name.clone(),
            params: job.params.clone(),
            status: job.status,
            attempts: job.attempts,
            run_id: job.run_id.clone(),
            parent_id: job.parent_id.clone(),
            worker: job.worker.clone(),
            exit_code: job.exit_code,
            created_at: job.created_at,
            queued_at: job.queued_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            cancelled_at: job.cancelled_at,
            output: job.output_tail.clone(),
            signal: job.signal,
            priority: job.priority,
            progress: job.progress.as_ref().map(|p| ProgressView { percent: p.percent, message: p.message.clone() }),
            error: job.error.clone(),
            origin: OriginView::new(&job.origin),
            not_before: job.not_before,
            unique_key: job.unique_key.clone(),
            attempt_list: None,
            held_by: None,
            deduplicated: None,
        }
    }

    /// The view with its attempts, as single-job answers give it.
    pub fn with_attempts(job: &JobRecord, attempts: &[AttemptRecord]) -> JobView {
        JobView { attempt_list: Some(attempts.iter().map(AttemptView::new).collect()), ..JobView::new(job) }
    }
}

/// `GET /queues`: one entry per job name with jobs queued or running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueList {
    pub queues: Vec<QueueView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueView {
    pub job_name: String,
    /// Waiting to be dispatched (also for a retry's time).
    pub queued: u64,
    pub running: u64,
    /// What holds its queued jobs back now, if a limit does.
    #[serde(default)]
    pub held_by: Option<HoldView>,
}

/// Why a queued job is not dispatched yet (`held_by` in the job view).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldView {
    /// `concurrency` or `rate`.
    pub limit: String,
    pub message: String,
}

impl HoldView {
    pub fn new(hold: &crate::throttle::Hold) -> HoldView {
        HoldView { limit: hold.limit.to_string(), message: hold.message.clone() }
    }
}

/// The answer to a start that stored a new job (`202`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartedView {
    pub id: String,
    pub job_name: String,
    #[serde(with = "status_name")]
    pub status: Status,
    pub run_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressView {
    /// 0 to 100.
    pub percent: f64,
    pub message: Option<String>,
}

/// What started a job: `kind` is `start`, `on_success`, `on_failure`, `gate` or `schedule`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginView {
    pub kind: String,
    /// For `gate`: the gate's name.
    pub gate: Option<String>,
    /// For `gate`: the key that fired.
    pub key: Option<String>,
    /// For `gate`: `then`, `timeout` or `failure`.
    #[serde(default)]
    pub reason: Option<String>,
}

impl OriginView {
    pub fn new(origin: &Origin) -> OriginView {
        let plain = |kind: &str| OriginView { kind: kind.to_owned(), gate: None, key: None, reason: None };
        match origin {
            Origin::Start => plain("start"),
            Origin::OnSuccess => plain("on_success"),
            Origin::OnFailure => plain("on_failure"),
            Origin::Schedule => plain("schedule"),
            Origin::Gate { gate, key, reason } => OriginView {
                kind: "gate".to_owned(),
                gate: Some(gate.clone()),
                key: Some(key.clone()),
                reason: Some(
                    match reason {
                        GateReason::Then => "then",
                        GateReason::Timeout => "timeout",
                        GateReason::Failure => "failure",
                    }
                    .to_owned(),
                ),
            },
        }
    }
}

impl Default for OriginView {
    fn default() -> OriginView {
        OriginView::new(&Origin::Start)
    }
}

/// One attempt of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptView {
    /// 1-based.
    pub attempt: u32,
    pub worker: String,
    #[serde(with = "time")]
    pub started_at: DateTime<Utc>,
    #[serde(with = "optional_time")]
    pub finished_at: Option<DateTime<Utc>>,
    /// Null while the attempt runs.
    #[serde(with = "optional_status_name")]
    pub status: Option<Status>,
    pub exit_code: Option<i32>,
    /// A result that came back after the attempt was handed to another worker; it changed nothing.
    pub stale: bool,
}

impl AttemptView {
    pub fn new(attempt: &AttemptRecord) -> AttemptView {
        AttemptView {
            attempt: attempt.attempt,
            worker: attempt.worker.clone(),
            started_at: attempt.started_at,
            finished_at: attempt.finished_at,
            status: attempt.status,
            exit_code: attempt.exit_code,
            stale: attempt.stale,
        }
    }
}

/// `GET /jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobView>,
}

/// `POST /runs/{run_id}/cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelledList {
    pub cancelled: Vec<JobView>,
}

/// `GET /workers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerList {
    pub workers: Vec<WorkerEntry>,
}

/// One connected worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerEntry {
    pub name: String,
    pub host: String,
    pub jobs: Vec<ServedJobEntry>,
    pub running: usize,
    pub concurrency: usize,
    #[serde(with = "time")]
    pub last_heartbeat: DateTime<Utc>,
    #[serde(with = "time")]
    pub connected_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedJobEntry {
    pub name: String,
    /// False when the worker's definition of the job differs from the broker's (drift).
    pub matches: bool,
}

impl WorkerEntry {
    pub fn new(worker: &WorkerView) -> WorkerEntry {
        WorkerEntry {
            name: worker.name.clone(),
            host: worker.host.clone(),
            jobs: worker.jobs.iter().map(|j| ServedJobEntry { name: j.name.clone(), matches: j.matches }).collect(),
            running: worker.running,
            concurrency: worker.concurrency,
            last_heartbeat: worker.last_heartbeat,
            connected_at: worker.connected_at,
        }
    }
}

/// `POST /jobs/{id}/progress`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressReport {
    pub percent: f64,
    #[serde(default)]
    pub message: Option<String>,
}

/// A JSON error answer: `{"error": "...", "param": ..., "params": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// The one query or body field at fault, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// Bad job params: each param's name and what is wrong with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<BTreeMap<String, String>>,
    /// A 403: the token scope the request needed (`start`, `read`, `admin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// RFC 3339 in UTC with milliseconds and `Z`, e.g. `2026-11-23T16:01:38.123Z`.
pub fn format_time(time: &DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Times as [`format_time`] writes them; any RFC 3339 offset is read.
pub mod time {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_time(time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}")))
    }
}

/// Optional times: `null` when unset.
pub mod optional_time {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &Option<DateTime<Utc>>, serializer: S) -> Result<S::Ok, S::Error> {
        match time {
            Some(time) => serializer.serialize_str(&super::format_time(time)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        match Option::<String>::deserialize(deserializer)? {
            None => Ok(None),
            Some(text) => DateTime::parse_from_rfc3339(&text)
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(|e| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}"))),
        }
    }
}

/// A status as its SPEC name (`timed_out`).
pub mod status_name {
    use jobz_core::Status;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(status: &Status, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(status.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Status, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// An optional status: `null` while an attempt runs.
pub mod optional_status_name {
    use jobz_core::Status;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(status: &Option<Status>, serializer: S) -> Result<S::Ok, S::Error> {
        match status {
            Some(status) => serializer.serialize_str(status.as_str()),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Status>, D::Error> {
        match Option::<String>::deserialize(deserializer)? {
            None => Ok(None),
            Some(text) => text.parse().map(Some).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn record() -> JobRecord {
        JobRecord {
            id: "j1".into(),
            job_name: "hello".into(),
            params: BTreeMap::from([("who".into(), "mesh".into())]),
            status: Status::TimedOut,
            attempts: 1,
            run_id: "j1".into(),
            parent_id: None,
            origin: Origin::Gate { gate: "g".into(), key: "k".into(), reason: GateReason::Then },
            priority: 0,
            worker: Some("w1".into()),
            lease: Some(7),
            exit_code: None,
            signal: Some(9),
            created_at: Utc.with_ymd_and_hms(2026, 11, 23, 16, 1, 38).unwrap(),
            queued_at: Some(Utc.with_ymd_and_hms(2026, 11, 23, 16, 1, 38).unwrap()),
            started_at: None,
            finished_at: None,
            cancelled_at: None,
            not_before: None,
            output_tail: "out".into(),
            progress: None,
            error: None,
            unique_key: None,
        }
    }

    #[test]
    fn job_view_round_trips_with_spec_names_and_utc_times() {
        let view = JobView::new(&record());
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["status"], "timed_out");
        assert_eq!(json["created_at"], "2026-11-23T16:01:38.000Z");
        assert_eq!(json["started_at"], serde_json::Value::Null);
        assert_eq!(json["origin"]["kind"], "gate");
        assert_eq!(json["origin"]["reason"], "then");
        assert!(json.get("attempt_list").is_none());
        assert!(json.get("lease").is_none(), "the fencing token is internal");
        assert_eq!(serde_json::from_value::<JobView>(json).unwrap(), view);
    }

    #[test]
    fn a_spec_only_job_is_read_with_defaults_for_the_extras() {
        let json = serde_json::json!({
            "id": "j", "job_name": "n", "params": {}, "status": "queued", "attempts": 0, "run_id": "j",
            "parent_id": null, "worker": null, "exit_code": null, "created_at": "2026-11-23T16:01:38+00:00",
            "queued_at": null, "started_at": null, "finished_at": null, "cancelled_at": null, "output": ""
        });
        let view: JobView = serde_json::from_value(json).unwrap();
        assert_eq!(view.status, Status::Queued);
        assert_eq!(view.origin.kind, "start");
    }
}
