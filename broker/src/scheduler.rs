//! The broker's schedules: where each one stands, which instants are due
//! now, and what `GET /schedules` shows.
//!
//! The loop (`core.rs`) owns one [`Schedules`]. At start it asks for the
//! catch-up fires ([`Schedules::recover`]), and on every tick for the fires due
//! ([`Schedules::due`]); it turns each into a job and a
//! [`Change::ScheduleFire`](crate::model::Change::ScheduleFire), committed in
//! one batch, and reports a failed commit back ([`Schedules::failed`]).
//!
//! One job per instant:
//! - in a process, each schedule's window only moves forward, so an instant is
//!   handed out once (again only if its commit failed, which stored nothing);
//! - across restarts, the window starts after the schedule's last recorded
//!   fire (or its first sighting, for a new schedule), and whatever happened
//!   while the broker was down is a catch-up window: `catch_up: latest` fires
//!   its latest instant, `none` nothing;
//! - the store refuses a second fire of a (schedule, instant), and with it the
//!   job inserted beside it.
//!
//! Time comes from the broker's [`Clock`](crate::clock::Clock) through the
//! caller; the instants themselves from [`jobz_core::schedule`].

use std::collections::{BTreeSet, HashSet, VecDeque};

use chrono::{DateTime, Utc};
use config::{JobFile, Schedule};
use jobz_core::schedule::{self, Window};

use crate::limits;
use crate::model::{Change, ScheduleFireRecord, ScheduleRecord};
use crate::store::{SqliteStore, Store, StoreError};

/// Every schedule of the job file, once each.
pub(crate) struct Schedules {
    entries: Vec<Entry>,
}

struct Entry {
    /// `jobz_core::schedule::identity`.
    id: String,
    job_name: String,
    schedule: Schedule,
    first_seen: DateTime<Utc>,
    /// Instants up to here are dealt with: fired, being committed, or missed on purpose.
    checked_through: DateTime<Utc>,
    /// The first instant after `checked_through`, so a tick with nothing due costs one comparison.
    next: Option<DateTime<Utc>>,
    /// Fires whose commit failed (nothing was stored): fired again at the next check.
    retry: BTreeSet<DateTime<Utc>>,
    /// The latest fires, newest instant first, the ones being committed included.
    recent: VecDeque<ScheduleFireRecord>,
}

/// One instant of one schedule to fire now.
#[derive(Debug, Clone)]
pub(crate) struct FireRequest {
    pub id: String,
    pub job_name: String,
    pub params: std::collections::BTreeMap<String, String>,
    pub instant: DateTime<Utc>,
}

impl Schedules {
    /// The job file's schedules with what the store remembers of them, and
    /// the changes recording the ones seen for the first time (at `now`).
    pub(crate) async fn load(
        file: &JobFile,
        store: &SqliteStore,
        now: DateTime<Utc>,
    ) -> Result<(Schedules, Vec<Change>), StoreError> {
        let known: std::collections::HashMap<String, DateTime<Utc>> =
            store.schedules().await?.into_iter().map(|s| (s.id, s.first_seen)).collect();
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        let mut changes = Vec::new();
        for (job_name, def) in &file.jobs {
            for schedule in &def.schedules {
                let id = schedule::identity(job_name, schedule);
                if !seen.insert(id.clone()) {
                    tracing::info!(job = %job_name, cron = %schedule.cron.source, "a schedule listed twice fires once");
                    continue;
                }
                let first_seen = match known.get(&id) {
                    Some(first_seen) => *first_seen,
                    None => {
                        let first_seen = crate::store::to_store_precision(now);
                        changes.push(Change::ScheduleSeen(ScheduleRecord { id: id.clone(), first_seen }));
                        first_seen
                    }
                };
                let recent: VecDeque<ScheduleFireRecord> =
                    store.schedule_fires(&id, limits::SCHEDULE_RECENT_FIRES).await?.into();
                let last_fired = recent.front().map(|f| f.instant);
                let checked_through = last_fired.map_or(first_seen, |last| last.max(first_seen));
                entries.push(Entry {
                    next: schedule::next_after(schedule, checked_through),
                    id,
                    job_name: job_name.clone(),
                    schedule: schedule.clone(),
                    first_seen,
                    checked_through,
                    retry: BTreeSet::new(),
                    recent,
                });
            }
        }
        Ok((Schedules { entries }, changes))
    }

    /// At start: what each schedule missed since its last fire (or since it
    /// was first seen) is one catch-up window.
    pub(crate) fn recover(&mut self, now: DateTime<Utc>) -> Vec<FireRequest> {
        let mut fires = Vec::new();
        for entry in &mut self.entries {
            if now <= entry.checked_through {
                if now < entry.checked_through {
                    tracing::warn!(job = %entry.job_name, cron = %entry.schedule.cron.source, last = %entry.checked_through,
                        now = %now, "the scheduler's clock is behind this schedule's last fire; nothing fires until it passes");
                }
                continue;
            }
            fires.extend(entry.look(now, Window::CatchUp));
        }
        fires
    }

    /// On a tick: the fires due up to `now`. A gap longer than
    /// [`limits::SCHEDULE_CLOCK_JUMP`] since the last look is a catch-up window.
    pub(crate) fn due(&mut self, now: DateTime<Utc>) -> Vec<FireRequest> {
        let mut fires = Vec::new();
        for entry in &mut self.entries {
            for instant in std::mem::take(&mut entry.retry) {
                fires.push(entry.request(instant));
            }
            if now <= entry.checked_through {
                continue;
            }
            let jump = chrono::Duration::from_std(limits::SCHEDULE_CLOCK_JUMP).unwrap_or(chrono::Duration::MAX);
            let window = if now - entry.checked_through > jump { Window::CatchUp } else { Window::Live };
            fires.extend(entry.look(now, window));
        }
        fires
    }

    /// A fire handed to the store, recorded in memory at once.
    pub(crate) fn fired(&mut self, fire: ScheduleFireRecord) {
        let Some(entry) = self.entries.iter_mut().find(|e| e.id == fire.schedule) else { return };
        let at = entry.recent.iter().position(|f| f.instant < fire.instant).unwrap_or(entry.recent.len());
        entry.recent.insert(at, fire);
        entry.recent.truncate(limits::SCHEDULE_RECENT_FIRES);
    }

    /// A fire's commit failed, so nothing of it was stored: it is forgotten, and
    /// tried again at the next tick when `again` (a duplicate refused by the
    /// store is not: that instant is recorded already).
    pub(crate) fn failed(&mut self, id: &str, instant: DateTime<Utc>, again: bool) {
        let Some(entry) = self.entries.iter_mut().find(|e| e.id == id) else { return };
        entry.recent.retain(|f| f.instant != instant);
        if !again {
            return;
        }
        entry.retry.insert(instant);
        while entry.retry.len() > limits::SCHEDULE_RETRIES_MAX {
            if let Some(oldest) = entry.retry.pop_first() {
                tracing::error!(job = %entry.job_name, instant = %oldest, "a scheduled instant could not be stored in time; given up");
            }
        }
    }

    /// `GET /schedules`: each schedule with its next instant after `now`, its last fire and its recent ones.
    pub(crate) fn view(&self, now: DateTime<Utc>) -> serde_json::Value {
        let list: Vec<serde_json::Value> = self
            .entries
            .iter()
            .map(|entry| {
                let last = entry.recent.front();
                let fired: Vec<serde_json::Value> = entry
                    .recent
                    .iter()
                    .map(|f| {
                        serde_json::json!({
                            "instant": rfc3339(f.instant), "job_id": f.job_id, "error": f.error, "at": rfc3339(f.at)
                        })
                    })
                    .collect();
                serde_json::json!({
                    "job_name": entry.job_name,
                    "cron": entry.schedule.cron.source,
                    "timezone": entry.schedule.timezone.name(),
                    "params": entry.schedule.params,
                    "catch_up": schedule::catch_up_name(entry.schedule.catch_up),
                    "next": schedule::next_after(&entry.schedule, now.max(entry.checked_through)).map(rfc3339),
                    "last_fired": last.map(|f| rfc3339(f.instant)),
                    "last_job_id": last.and_then(|f| f.job_id.clone()),
                    "first_seen": rfc3339(entry.first_seen),
                    "id": entry.id,
                    "fired": fired,
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }
}

impl Entry {
    /// Looks at `(checked_through, now]` as `window` and moves past it.
    fn look(&mut self, now: DateTime<Utc>, window: Window) -> Vec<FireRequest> {
        if self.next.is_none_or(|next| next > now) {
            // Nothing due: the window is empty, whatever kind it is.
            self.checked_through = now;
            return Vec::new();
        }
        let due = schedule::due(&self.schedule, self.checked_through, now, window, limits::SCHEDULE_FIRES_PER_CHECK);
        if window == Window::CatchUp {
            match (due.fire.first(), due.missed) {
                (Some(instant), _) => tracing::info!(job = %self.job_name, cron = %self.schedule.cron.source,
                    %instant, since = %self.checked_through, "catching up: the latest missed instant fires"),
                (None, Some(latest)) => tracing::info!(job = %self.job_name, cron = %self.schedule.cron.source,
                    %latest, since = %self.checked_through, "missed instants skipped (catch_up: none)"),
                (None, None) => {}
            }
        }
        self.checked_through = due.checked_through;
        self.next = schedule::next_after(&self.schedule, self.checked_through);
        due.fire.into_iter().map(|instant| self.request(instant)).collect()
    }

    fn request(&self, instant: DateTime<Utc>) -> FireRequest {
        FireRequest {
            id: self.id.clone(),
            job_name: self.job_name.clone(),
            params: self.schedule.params.clone(),
            instant,
        }
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
