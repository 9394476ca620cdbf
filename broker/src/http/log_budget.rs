//! [`LogBudget`]: at most so many lines a minute about refused clients (failed
//! TLS handshakes, missing or wrong tokens), so that a flood of bad clients
//! cannot flood the log. Lines over the budget are counted, and the count is
//! told with the next line that is logged.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A budget of log lines per window, shared by every connection.
#[derive(Debug)]
pub struct LogBudget {
    per_window: u32,
    window: Duration,
    state: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    logged: u32,
    /// Lines not logged since the last one that was.
    suppressed: u64,
}

impl LogBudget {
    pub fn new(per_window: u32, window: Duration) -> LogBudget {
        LogBudget {
            per_window,
            window,
            state: Mutex::new(Window { started: Instant::now(), logged: 0, suppressed: 0 }),
        }
    }

    /// `Some(suppressed)` when a line may be logged now, with how many were left out
    /// since the last one; `None` when the budget is spent (the line is counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    fn admit_at(&self, now: Instant) -> Option<u64> {
        // A panic while holding this lock cannot leave the counters inconsistent in a harmful way.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now.saturating_duration_since(state.started) >= self.window {
            state.started = now;
            state.logged = 0;
        }
        if state.logged < self.per_window {
            state.logged += 1;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed = state.suppressed.saturating_add(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_over_the_budget_are_counted_and_told_with_the_next_window() {
        let budget = LogBudget::new(2, Duration::from_secs(60));
        let start = Instant::now();
        assert_eq!(budget.admit_at(start), Some(0));
        assert_eq!(budget.admit_at(start), Some(0));
        assert_eq!(budget.admit_at(start), None);
        assert_eq!(budget.admit_at(start + Duration::from_secs(30)), None);
        assert_eq!(budget.admit_at(start + Duration::from_secs(61)), Some(2));
        assert_eq!(budget.admit_at(start + Duration::from_secs(61)), Some(0));
    }
}
