//! Starts that are durable but not yet rows in SQLite.
//!
//! An urgent batch of plain starts is made durable by the start journal alone
//! (`store/journal.rs`): the writer appends their rows to it, the syncer syncs
//! it, and the 202s go out without a SQLite transaction on the way. The writer
//! puts the rows into SQLite later, all of them at the start of its next
//! transaction, or on their own once [`FLUSH_DELAY`](super::FLUSH_DELAY) has
//! passed (see `Writer::defer_batch`). Until then they are here, so that
//! every read sees a job from the moment its start was answered: a read looks
//! here first and then in SQLite, and a listing merges both.
//!
//! A job leaves this set only after the transaction that inserted its row has
//! committed, so a reader that misses it here finds it in SQLite. A job read
//! from here is as it was when it was started: nothing changes an unflushed
//! job, because every transaction inserts the unflushed rows before it
//! applies anything.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use chrono::SubsecRound;

use crate::model::{JobFilter, JobRecord};

/// The unflushed jobs, shared by the writer (which adds and removes them) and the readers.
#[derive(Default)]
pub(super) struct Unflushed {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Each job with its place in the order the jobs were started.
    jobs: HashMap<String, (u64, JobRecord)>,
    next: u64,
}

impl Unflushed {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The map is consistent after every call; a panicking holder leaves it usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds jobs whose starts were just made durable, in the order they were started.
    pub(super) fn add(&self, jobs: impl IntoIterator<Item = JobRecord>) {
        let mut inner = self.lock();
        for job in jobs {
            let order = inner.next;
            inner.next += 1;
            inner.jobs.insert(job.id.clone(), (order, at_store_precision(job)));
        }
    }

    /// Forgets jobs whose rows are committed in SQLite now.
    pub(super) fn remove<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        let mut inner = self.lock();
        for id in ids {
            inner.jobs.remove(id);
        }
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.lock().jobs.contains_key(id)
    }

    /// The job `id`, if it is unflushed.
    pub(super) fn get(&self, id: &str) -> Option<JobRecord> {
        self.lock().jobs.get(id).map(|(_, job)| job.clone())
    }

    /// The unflushed jobs `filter` lists, in the order they were started.
    pub(super) fn matching(&self, filter: &JobFilter) -> Vec<JobRecord> {
        let inner = self.lock();
        if inner.jobs.is_empty() {
            return Vec::new();
        }
        let mut found: Vec<_> = inner.jobs.values().filter(|(_, job)| filter.matches(job)).cloned().collect();
        found.sort_unstable_by_key(|(order, _)| *order);
        found.into_iter().map(|(_, job)| job).collect()
    }

    /// Every unflushed job (all are queued), in the order they were started.
    pub(super) fn all(&self) -> Vec<JobRecord> {
        self.matching(&JobFilter::default())
    }
}

/// A job as SQLite gives it back: its times at microsecond precision.
fn at_store_precision(mut job: JobRecord) -> JobRecord {
    job.created_at = job.created_at.trunc_subsecs(6);
    for time in
        [&mut job.queued_at, &mut job.started_at, &mut job.finished_at, &mut job.cancelled_at, &mut job.not_before]
    {
        *time = time.map(|t| t.trunc_subsecs(6));
    }
    job
}

/// `stored` (newest first, from SQLite) with `unflushed` jobs it lacks, newest
/// first (by `created_at`, then `id`), at most `limit`. A job in both is taken
/// from `stored`: it was flushed, and maybe changed, after `unflushed` was read.
pub(super) fn merge_newest_first(
    mut stored: Vec<JobRecord>,
    unflushed: Vec<JobRecord>,
    limit: usize,
) -> Vec<JobRecord> {
    if unflushed.is_empty() {
        return stored;
    }
    let known: std::collections::HashSet<String> = stored.iter().map(|job| job.id.clone()).collect();
    stored.extend(unflushed.into_iter().filter(|job| !known.contains(&job.id)));
    stored.sort_by(|a, b| (b.created_at, &b.id).cmp(&(a.created_at, &a.id)));
    stored.truncate(limit);
    stored
}

/// `stored` (unfinished jobs in queue order, from SQLite) with `unflushed`
/// jobs it lacks, in queue order: higher priority first, then first queued
/// first. An unflushed job was started after every stored one, so among
/// equals it comes after them, as its row will.
pub(super) fn merge_queue_order(mut stored: Vec<JobRecord>, unflushed: Vec<JobRecord>) -> Vec<JobRecord> {
    if unflushed.is_empty() {
        return stored;
    }
    let known: std::collections::HashSet<String> = stored.iter().map(|job| job.id.clone()).collect();
    stored.extend(unflushed.into_iter().filter(|job| !known.contains(&job.id)));
    // Stable: the stored order (and the unflushed ones' after it) holds among equals.
    stored.sort_by_key(|job| (Reverse(job.priority), job.queued_at));
    stored
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, TimeZone, Utc};
    use jobz_core::pipeline::{NewJob, Origin};
    use jobz_core::Status;

    fn at(millis: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_700_000_000_000 + millis).single().expect("a valid instant")
    }

    fn job(id: &str, name: &str, created: i64, priority: i32) -> JobRecord {
        let new = NewJob {
            job_name: name.into(),
            params: Default::default(),
            run_id: None,
            parent_id: None,
            origin: Origin::Start,
        };
        JobRecord::queued(id.into(), &new, priority, at(created))
    }

    fn ids(jobs: &[JobRecord]) -> Vec<&str> {
        jobs.iter().map(|job| job.id.as_str()).collect()
    }

    #[test]
    fn jobs_are_found_until_removed_and_listed_in_start_order() {
        let set = Unflushed::default();
        let mut precise = job("c", "b", 3, 0);
        precise.created_at += chrono::Duration::nanoseconds(1_234);
        set.add([job("b", "a", 5, 0), precise, job("a", "a", 1, 0)]);
        assert_eq!(ids(&set.all()), ["b", "c", "a"]);
        let filter = JobFilter { job_name: Some("a".into()), ..JobFilter::default() };
        assert_eq!(ids(&set.matching(&filter)), ["b", "a"]);
        assert_eq!(set.get("c").map(|j| j.created_at), Some(at(3) + chrono::Duration::microseconds(1)));
        set.remove(["b", "c"]);
        assert!(!set.contains("b") && set.get("c").is_none());
        assert_eq!(ids(&set.all()), ["a"]);
    }

    #[test]
    fn a_listing_merges_newest_first_prefers_the_stored_copy_and_keeps_its_limit() {
        let mut flushed_since = job("x", "a", 4, 0);
        flushed_since.status = Status::Running;
        let stored = vec![flushed_since, job("old", "a", 1, 0)];
        let unflushed = vec![job("x", "a", 4, 0), job("new", "a", 9, 0), job("mid", "a", 2, 0)];
        let merged = merge_newest_first(stored.clone(), unflushed.clone(), 10);
        assert_eq!(ids(&merged), ["new", "x", "mid", "old"]);
        assert_eq!(merged[1].status, Status::Running, "the stored copy wins");
        assert_eq!(ids(&merge_newest_first(stored, unflushed, 2)), ["new", "x"]);
    }

    #[test]
    fn unfinished_jobs_merge_in_queue_order_with_the_unflushed_after_their_equals() {
        let stored = vec![job("s-high", "a", 5, 10), job("s-1", "a", 1, 0), job("s-2", "a", 7, 0)];
        let unflushed = vec![job("u-high", "a", 2, 10), job("u-same", "a", 7, 0), job("u-late", "a", 8, 0)];
        let merged = merge_queue_order(stored, unflushed);
        assert_eq!(ids(&merged), ["u-high", "s-high", "s-1", "s-2", "u-same", "u-late"]);
    }
}
