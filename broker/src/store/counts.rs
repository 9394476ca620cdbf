//! The number of stored jobs by name and status (`jobz_jobs` in `GET /metrics`),
//! kept in memory by the writer as it commits, so that neither a scrape nor a
//! commit pays for an index of it.
//!
//! The writer counts the store once when it opens (one scan), then applies the
//! [`Transition`]s of every transaction that commits: an insert, each status
//! change of a job (the statements that change one say which job and from what
//! status), a prune. A transaction that rolls back, or a caller's changes
//! rolled back to their savepoint, count nothing. Readers see a transaction's
//! counts once it has committed, as they see its rows.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use jobz_core::Status;
use rusqlite::Connection;

use super::codec::count_from_row;
use super::StoreError;

/// A job entering the store (`from: None`), changing status, or leaving it (`to: None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Transition {
    pub(super) job_name: String,
    pub(super) from: Option<Status>,
    pub(super) to: Option<Status>,
}

#[derive(Debug, Default)]
pub(super) struct Counts {
    by: Mutex<BTreeMap<(String, Status), u64>>,
}

impl Counts {
    /// Counts what `conn` sees: one scan of the jobs table, at open.
    pub(super) fn load(conn: &Connection) -> Result<Counts, StoreError> {
        let mut statement = conn
            .prepare("SELECT job_name, status, COUNT(*) FROM jobs GROUP BY job_name, status")
            .map_err(StoreError::sqlite("prepare the counts query"))?;
        let mut rows = statement.query([]).map_err(StoreError::sqlite("count jobs"))?;
        let mut by = BTreeMap::new();
        while let Some(row) = rows.next().map_err(StoreError::sqlite("count jobs"))? {
            let (job_name, status, count) = count_from_row(row)?;
            by.insert((job_name, status), count);
        }
        Ok(Counts { by: Mutex::new(by) })
    }

    /// Applies the transitions of a committed transaction.
    pub(super) fn apply(&self, transitions: &[Transition]) {
        if transitions.is_empty() {
            return;
        }
        // A panic elsewhere while holding the lock leaves the map whole: recover it.
        let mut by = self.by.lock().unwrap_or_else(PoisonError::into_inner);
        for t in transitions {
            if let Some(from) = t.from {
                let key = (t.job_name.clone(), from);
                match by.get_mut(&key) {
                    Some(n) if *n > 1 => *n -= 1,
                    Some(_) => {
                        by.remove(&key);
                    }
                    None => debug_assert!(false, "a job of {} left {from}, which counted none", t.job_name),
                }
            }
            if let Some(to) = t.to {
                *by.entry((t.job_name.clone(), to)).or_insert(0) += 1;
            }
        }
    }

    /// Every (job name, status) with at least one job, by name, then status name.
    pub(super) fn snapshot(&self) -> Vec<(String, Status, u64)> {
        let by = self.by.lock().unwrap_or_else(PoisonError::into_inner);
        let mut counts: Vec<_> = by.iter().map(|((name, status), n)| (name.clone(), *status, *n)).collect();
        // Statuses by name, as the store's `ORDER BY job_name, status` listed them.
        counts.sort_by(|a, b| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
        counts
    }
}
