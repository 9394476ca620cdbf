//! Conversions between the broker's records and SQLite column values, both
//! ways, in one place: what is written here is checked when read back here.
//!
//! - Times are integer Unix microseconds (UTC). Integers compare and index
//!   cheaply, and microseconds cover every `DateTime<Utc>` chrono can hold, so
//!   encoding never fails; the nanosecond digits are dropped.
//! - A lease (`u64`) is stored bit for bit in SQLite's signed 64-bit integer:
//!   leases are only compared for equality, so the sign does not matter.
//! - Statuses, origin kinds and gate reasons are their lower-case names, which
//!   the schema's CHECK constraints list.
//! - Params are a JSON object of strings.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use jobz_core::pipeline::{GateReason, Origin};
use jobz_core::Status;
use rusqlite::types::FromSql;
use rusqlite::Row;

use super::StoreError;
use crate::model::{
    AttemptRecord, FireRecord, GateEventKind, GateEventRecord, JobRecord, Progress, ScheduleFireRecord, ScheduleRecord,
};

/// `t` as the store keeps it: truncated to whole microseconds. A caller that
/// compares what it wrote with what it reads back rounds its clock with this.
pub fn to_store_precision(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

pub(super) fn time_to_sql(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(super) fn opt_time_to_sql(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(time_to_sql)
}

/// Bit for bit: `u64::MAX` is stored as -1 and read back as `u64::MAX`.
pub(super) fn lease_to_sql(lease: u64) -> i64 {
    lease as i64
}

pub(super) fn lease_from_sql(value: i64) -> u64 {
    value as u64
}

pub(super) fn params_to_sql(params: &BTreeMap<String, String>) -> Result<String, serde_json::Error> {
    serde_json::to_string(params)
}

/// The origin as its four columns: kind, gate, key, reason.
pub(super) fn origin_to_sql(origin: &Origin) -> (&'static str, Option<&str>, Option<&str>, Option<&'static str>) {
    match origin {
        Origin::Start => ("start", None, None, None),
        Origin::OnSuccess => ("on_success", None, None, None),
        Origin::OnFailure => ("on_failure", None, None, None),
        Origin::Schedule => ("schedule", None, None, None),
        Origin::Gate { gate, key, reason } => {
            let reason = match reason {
                GateReason::Then => "then",
                GateReason::Timeout => "timeout",
                GateReason::Failure => "failure",
            };
            ("gate", Some(gate.as_str()), Some(key.as_str()), Some(reason))
        }
    }
}

/// The columns every job query selects, in the order [`job_from_row`] reads them by name.
pub(super) const JOB_COLUMNS: &str = "id, job_name, params, status, attempts, run_id, parent_id, \
     origin_kind, origin_gate, origin_key, origin_reason, priority, worker, lease, exit_code, signal, \
     created_at, queued_at, started_at, finished_at, cancelled_at, not_before, output_tail, \
     progress_percent, progress_message, error, unique_key";

/// The columns every attempt query selects.
pub(super) const ATTEMPT_COLUMNS: &str =
    "job_id, attempt, worker, lease, started_at, finished_at, status, exit_code, stale";

/// Reads one row's columns by name, turning any mismatch into [`StoreError::Corrupt`] naming the job.
struct Columns<'r, 's> {
    row: &'r Row<'s>,
    id: String,
}

impl Columns<'_, '_> {
    fn get<T: FromSql>(&self, column: &'static str) -> Result<T, StoreError> {
        self.row.get(column).map_err(|e| self.corrupt(column, e.to_string()))
    }

    fn corrupt(&self, column: &'static str, reason: impl Into<String>) -> StoreError {
        StoreError::Corrupt { id: self.id.clone(), column, reason: reason.into() }
    }

    fn time(&self, column: &'static str) -> Result<DateTime<Utc>, StoreError> {
        let micros: i64 = self.get(column)?;
        DateTime::from_timestamp_micros(micros).ok_or_else(|| self.corrupt(column, format!("{micros} is out of range")))
    }

    fn opt_time(&self, column: &'static str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let micros: Option<i64> = self.get(column)?;
        micros
            .map(|m| {
                DateTime::from_timestamp_micros(m).ok_or_else(|| self.corrupt(column, format!("{m} is out of range")))
            })
            .transpose()
    }

    fn status(&self, column: &'static str) -> Result<Status, StoreError> {
        let name: String = self.get(column)?;
        name.parse().map_err(|e: jobz_core::StatusParseError| self.corrupt(column, e.to_string()))
    }

    fn opt_status(&self, column: &'static str) -> Result<Option<Status>, StoreError> {
        let name: Option<String> = self.get(column)?;
        name.map(|n| n.parse().map_err(|e: jobz_core::StatusParseError| self.corrupt(column, e.to_string())))
            .transpose()
    }

    fn count(&self, column: &'static str) -> Result<u32, StoreError> {
        let value: i64 = self.get(column)?;
        u32::try_from(value).map_err(|_| self.corrupt(column, format!("{value} is not a count")))
    }

    fn origin(&self) -> Result<Origin, StoreError> {
        let kind: String = self.get("origin_kind")?;
        let gate: Option<String> = self.get("origin_gate")?;
        let key: Option<String> = self.get("origin_key")?;
        let reason: Option<String> = self.get("origin_reason")?;
        let simple = |origin: Origin| {
            if gate.is_some() || key.is_some() || reason.is_some() {
                return Err(self.corrupt("origin_gate", format!("a {kind:?} origin has gate columns")));
            }
            Ok(origin)
        };
        match kind.as_str() {
            "start" => simple(Origin::Start),
            "on_success" => simple(Origin::OnSuccess),
            "on_failure" => simple(Origin::OnFailure),
            "schedule" => simple(Origin::Schedule),
            "gate" => {
                let reason = match reason.as_deref() {
                    Some("then") => GateReason::Then,
                    Some("timeout") => GateReason::Timeout,
                    Some("failure") => GateReason::Failure,
                    other => return Err(self.corrupt("origin_reason", format!("unknown gate reason {other:?}"))),
                };
                match (gate, key) {
                    (Some(gate), Some(key)) => Ok(Origin::Gate { gate, key, reason }),
                    _ => Err(self.corrupt("origin_gate", "a gate origin without its gate or key")),
                }
            }
            other => Err(self.corrupt("origin_kind", format!("unknown origin kind {other:?}"))),
        }
    }
}

/// A job row, selected with [`JOB_COLUMNS`], as a record.
pub(super) fn job_from_row(row: &Row<'_>) -> Result<JobRecord, StoreError> {
    let id: String = key_column(row, "id")?;
    let c = Columns { row, id };
    let params_json: String = c.get("params")?;
    let params: BTreeMap<String, String> =
        serde_json::from_str(&params_json).map_err(|e| c.corrupt("params", e.to_string()))?;
    let progress_percent: Option<f64> = c.get("progress_percent")?;
    let progress_message: Option<String> = c.get("progress_message")?;
    let progress = match (progress_percent, progress_message) {
        (Some(percent), message) => Some(Progress { percent, message }),
        (None, None) => None,
        (None, Some(_)) => return Err(c.corrupt("progress_percent", "a progress message without a percentage")),
    };
    let lease: Option<i64> = c.get("lease")?;
    Ok(JobRecord {
        job_name: c.get("job_name")?,
        params,
        status: c.status("status")?,
        attempts: c.count("attempts")?,
        run_id: c.get("run_id")?,
        parent_id: c.get("parent_id")?,
        origin: c.origin()?,
        priority: c.get("priority")?,
        worker: c.get("worker")?,
        lease: lease.map(lease_from_sql),
        exit_code: c.get("exit_code")?,
        signal: c.get("signal")?,
        created_at: c.time("created_at")?,
        queued_at: c.opt_time("queued_at")?,
        started_at: c.opt_time("started_at")?,
        finished_at: c.opt_time("finished_at")?,
        cancelled_at: c.opt_time("cancelled_at")?,
        not_before: c.opt_time("not_before")?,
        output_tail: c.get("output_tail")?,
        progress,
        error: c.get("error")?,
        unique_key: c.get("unique_key")?,
        id: c.id,
    })
}

/// The column a row's other errors are reported against (its id, job or gate), read first.
fn key_column(row: &Row<'_>, column: &'static str) -> Result<String, StoreError> {
    row.get(column).map_err(|e| StoreError::Corrupt { id: String::new(), column, reason: e.to_string() })
}

/// An attempt row, selected with [`ATTEMPT_COLUMNS`], as a record.
pub(super) fn attempt_from_row(row: &Row<'_>) -> Result<AttemptRecord, StoreError> {
    let job_id: String = key_column(row, "job_id")?;
    let c = Columns { row, id: job_id };
    let stale: i64 = c.get("stale")?;
    Ok(AttemptRecord {
        attempt: c.count("attempt")?,
        worker: c.get("worker")?,
        lease: lease_from_sql(c.get("lease")?),
        started_at: c.time("started_at")?,
        finished_at: c.opt_time("finished_at")?,
        status: c.opt_status("status")?,
        exit_code: c.get("exit_code")?,
        stale: match stale {
            0 => false,
            1 => true,
            other => return Err(c.corrupt("stale", format!("{other} is not 0 or 1"))),
        },
        job_id: c.id,
    })
}

pub(super) fn gate_event_kind_to_sql(kind: GateEventKind) -> &'static str {
    match kind {
        GateEventKind::Succeeded => "succeeded",
        GateEventKind::FailedForGood => "failed_for_good",
    }
}

pub(super) fn gate_reason_to_sql(reason: GateReason) -> &'static str {
    match reason {
        GateReason::Then => "then",
        GateReason::Timeout => "timeout",
        GateReason::Failure => "failure",
    }
}

/// The columns a gate event query selects.
pub(super) const GATE_EVENT_COLUMNS: &str = "seq, kind, job_id, job_name, params, run_id, attempt, at";

/// A `gate_events` row as a record.
pub(super) fn gate_event_from_row(row: &Row<'_>) -> Result<GateEventRecord, StoreError> {
    let job_id: String = key_column(row, "job_id")?;
    let c = Columns { row, id: job_id };
    let kind: String = c.get("kind")?;
    let kind = match kind.as_str() {
        "succeeded" => GateEventKind::Succeeded,
        "failed_for_good" => GateEventKind::FailedForGood,
        other => return Err(c.corrupt("kind", format!("{other:?} is not a gate event kind"))),
    };
    let params: String = c.get("params")?;
    let params = serde_json::from_str(&params).map_err(|e| c.corrupt("params", e.to_string()))?;
    Ok(GateEventRecord {
        seq: lease_from_sql(c.get("seq")?),
        kind,
        job_name: c.get("job_name")?,
        params,
        run_id: c.get("run_id")?,
        attempt: c.count("attempt")?,
        at: c.time("at")?,
        job_id: c.id,
    })
}

/// A `gate_fires` row as a record.
pub(super) fn fire_from_row(row: &Row<'_>) -> Result<FireRecord, StoreError> {
    let gate: String = key_column(row, "gate")?;
    let c = Columns { row, id: format!("(fire of gate {gate})") };
    let reason: String = c.get("reason")?;
    let reason = match reason.as_str() {
        "then" => GateReason::Then,
        "timeout" => GateReason::Timeout,
        "failure" => GateReason::Failure,
        other => return Err(c.corrupt("reason", format!("{other:?} is not a fire reason"))),
    };
    Ok(FireRecord {
        key: c.get("key")?,
        reason,
        job_id: c.get("job_id")?,
        error: c.get("error")?,
        at: c.time("at")?,
        gate,
    })
}

/// A `schedules` row (`id, first_seen`) as a record.
pub(super) fn schedule_from_row(row: &Row<'_>) -> Result<ScheduleRecord, StoreError> {
    let id: String = key_column(row, "id")?;
    let c = Columns { row, id: format!("(schedule {id})") };
    Ok(ScheduleRecord { first_seen: c.time("first_seen")?, id })
}

/// The columns a schedule fire query selects.
pub(super) const SCHEDULE_FIRE_COLUMNS: &str = "schedule, instant, job_id, error, at";

/// A `schedule_fires` row as a record.
pub(super) fn schedule_fire_from_row(row: &Row<'_>) -> Result<ScheduleFireRecord, StoreError> {
    let schedule: String = key_column(row, "schedule")?;
    let c = Columns { row, id: format!("(fire of schedule {schedule})") };
    Ok(ScheduleFireRecord {
        instant: c.time("instant")?,
        job_id: c.get("job_id")?,
        error: c.get("error")?,
        at: c.time("at")?,
        schedule,
    })
}

/// A `(job_name, status, count)` row of the counts query.
pub(super) fn count_from_row(row: &Row<'_>) -> Result<(String, Status, u64), StoreError> {
    let job_name: String =
        row.get(0).map_err(|e| StoreError::Corrupt { id: String::new(), column: "job_name", reason: e.to_string() })?;
    let corrupt = |column, reason: String| StoreError::Corrupt { id: format!("(any of {job_name})"), column, reason };
    let status: String = row.get(1).map_err(|e| corrupt("status", e.to_string()))?;
    let status = status.parse().map_err(|e: jobz_core::StatusParseError| corrupt("status", e.to_string()))?;
    let count: i64 = row.get(2).map_err(|e| corrupt("count", e.to_string()))?;
    let count = u64::try_from(count).map_err(|_| corrupt("count", format!("{count} is negative")))?;
    Ok((job_name, status, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_round_trip_bit_for_bit() {
        for lease in [0, 1, i64::MAX as u64, i64::MAX as u64 + 1, u64::MAX] {
            assert_eq!(lease_from_sql(lease_to_sql(lease)), lease);
        }
    }

    #[test]
    fn times_round_trip_at_microsecond_precision() {
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap_or_default();
        let back = DateTime::from_timestamp_micros(time_to_sql(t)).unwrap_or_default();
        assert_eq!(back, to_store_precision(t));
        assert_eq!(back.timestamp_subsec_nanos(), 123_456_000);
        for t in [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC] {
            let t = to_store_precision(t);
            assert_eq!(DateTime::from_timestamp_micros(time_to_sql(t)), Some(t));
        }
    }
}
