//! A job's status: the states of SPEC and which of them are final.

use std::fmt;
use std::str::FromStr;

/// SPEC "Statuses": `queued`, `running`, `succeeded`, `failed`, `timed_out`, `cancelled`.
///
/// The transitions are drawn in `docs/STATE_MACHINE.md`; [`crate::pipeline`]
/// decides them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 6] =
        [Status::Queued, Status::Running, Status::Succeeded, Status::Failed, Status::TimedOut, Status::Cancelled];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::TimedOut => "timed_out",
            Status::Cancelled => "cancelled",
        }
    }

    /// A final status never changes again (but a failed job can be retried by hand as a new attempt).
    pub fn is_final(self) -> bool {
        !matches!(self, Status::Queued | Status::Running)
    }

    /// Failed and timed-out jobs count as failures: they retry and fire `on_failure`.
    pub fn is_failure(self) -> bool {
        matches!(self, Status::Failed | Status::TimedOut)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}: expected one of queued, running, succeeded, failed, timed_out, cancelled")]
pub struct StatusParseError(pub String);

impl FromStr for Status {
    type Err = StatusParseError;

    fn from_str(s: &str) -> Result<Status, StatusParseError> {
        Status::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| StatusParseError(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_through_its_name() {
        for st in Status::ALL {
            assert_eq!(st.as_str().parse::<Status>(), Ok(st));
        }
        assert!("done".parse::<Status>().is_err());
    }

    #[test]
    fn only_queued_and_running_are_not_final() {
        let open: Vec<_> = Status::ALL.into_iter().filter(|s| !s.is_final()).collect();
        assert_eq!(open, vec![Status::Queued, Status::Running]);
    }
}
