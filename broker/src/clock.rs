//! Where the broker's scheduler gets "now" from.
//!
//! The scheduler reads time only through a [`Clock`], so tests can move it:
//! a [`ManualClock`] in process, or a [`ShiftedClock`] in a real process
//! started with `JOBZ_TEST_CLOCK` (a testing aid: the clock starts at a given
//! instant and may run faster than real time). Everything else keeps reading
//! the system clock, so job timestamps stay real.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use chrono::{DateTime, Utc};

use crate::limits::TEST_CLOCK_SPEED_MAX;

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that reads `start` when it is made and then runs `speed` times
/// faster than real time.
#[derive(Debug, Clone, Copy)]
pub struct ShiftedClock {
    start: DateTime<Utc>,
    origin: Instant,
    speed: u32,
}

/// Why a test clock's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}` is not a test clock: {reason}; expected an RFC 3339 time such as `2026-03-29T00:58:00Z`, optionally followed by a speed such as `@60x`")]
pub struct ClockSpecError {
    pub text: String,
    pub reason: String,
}

impl ShiftedClock {
    /// A clock reading `start` now and running `speed` times faster than real time.
    pub fn new(start: DateTime<Utc>, speed: u32) -> Result<ShiftedClock, ClockSpecError> {
        if !(1..=TEST_CLOCK_SPEED_MAX).contains(&speed) {
            return Err(ClockSpecError {
                text: format!("{}@{speed}x", start.to_rfc3339()),
                reason: format!("the speed must be from 1 to {TEST_CLOCK_SPEED_MAX}"),
            });
        }
        Ok(ShiftedClock { start, origin: Instant::now(), speed })
    }

    /// Parses `TIME` or `TIME@SPEEDx` (`2026-03-29T00:58:00Z@60x`), strictly:
    /// `TIME` is RFC 3339 with its offset, `SPEED` a whole number from 1 to
    /// [`TEST_CLOCK_SPEED_MAX`]. The clock starts when it is parsed.
    pub fn parse(text: &str) -> Result<ShiftedClock, ClockSpecError> {
        let refuse = |reason: &str| ClockSpecError { text: text.to_string(), reason: reason.to_string() };
        let (time, speed) = match text.split_once('@') {
            None => (text, None),
            Some((time, speed)) => (time, Some(speed)),
        };
        let start = DateTime::parse_from_rfc3339(time)
            .map_err(|e| refuse(&format!("`{time}` is not an RFC 3339 time ({e})")))?
            .with_timezone(&Utc);
        let speed = match speed {
            None => 1,
            Some(speed) => {
                let digits = speed.strip_suffix('x').ok_or_else(|| refuse("the speed ends in `x`, as in `@60x`"))?;
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(refuse("the speed is a whole number, as in `@60x`"));
                }
                match digits.parse::<u32>() {
                    Ok(n) if (1..=TEST_CLOCK_SPEED_MAX).contains(&n) => n,
                    _ => return Err(refuse(&format!("the speed must be from 1 to {TEST_CLOCK_SPEED_MAX}"))),
                }
            }
        };
        ShiftedClock::new(start, speed)
    }

    pub fn speed(&self) -> u32 {
        self.speed
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> DateTime<Utc> {
        let elapsed = self.origin.elapsed().saturating_mul(self.speed);
        let elapsed = chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX);
        self.start.checked_add_signed(elapsed).unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

/// A clock that moves only when told to: for tests in process.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl ManualClock {
    pub fn new(now: DateTime<Utc>) -> ManualClock {
        ManualClock { now: Arc::new(Mutex::new(now)) }
    }

    pub fn set(&self, now: DateTime<Utc>) {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner) = now;
    }

    pub fn advance(&self, by: chrono::Duration) {
        let mut now = self.now.lock().unwrap_or_else(PoisonError::into_inner);
        *now = now.checked_add_signed(by).unwrap_or(*now);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_clock_parses_a_time_and_an_optional_speed() {
        let clock = ShiftedClock::parse("2026-03-29T00:58:00Z").expect("plain time");
        assert_eq!(clock.speed(), 1);
        let now = clock.now();
        assert!(now >= "2026-03-29T00:58:00Z".parse::<DateTime<Utc>>().unwrap());
        assert!(now < "2026-03-29T00:59:00Z".parse::<DateTime<Utc>>().unwrap());
        assert_eq!(ShiftedClock::parse("2026-03-29T00:58:00Z@60x").expect("with a speed").speed(), 60);
        let offset = ShiftedClock::parse("2026-03-29T02:58:00+02:00").expect("an offset");
        assert!(offset.now() >= "2026-03-29T00:58:00Z".parse::<DateTime<Utc>>().unwrap());
    }

    #[test]
    fn a_bad_test_clock_is_refused_with_the_reason() {
        for (text, reason) in [
            ("", "is not an RFC 3339 time"),
            ("tomorrow", "is not an RFC 3339 time"),
            ("2026-03-29 00:58:00", "is not an RFC 3339 time"),
            ("2026-03-29T00:58:00", "is not an RFC 3339 time"),
            ("2026-03-29T00:58:00Z@60", "ends in `x`"),
            ("2026-03-29T00:58:00Z@x", "whole number"),
            ("2026-03-29T00:58:00Z@1.5x", "whole number"),
            ("2026-03-29T00:58:00Z@-3x", "whole number"),
            ("2026-03-29T00:58:00Z@0x", "from 1 to"),
            ("2026-03-29T00:58:00Z@99999999999x", "from 1 to"),
            ("2026-03-29T00:58:00Z@60x@2x", "whole number"),
        ] {
            let error = ShiftedClock::parse(text).expect_err(text);
            assert!(error.reason.contains(reason), "{text:?}: {error}");
            assert!(error.to_string().contains("2026-03-29T00:58:00Z"), "the message shows an example: {error}");
        }
    }

    #[test]
    fn a_fast_clock_runs_faster_and_a_manual_one_only_when_told() {
        let fast = ShiftedClock::parse("2026-01-01T00:00:00Z@1000x").expect("fast clock");
        let first = fast.now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(fast.now() - first >= chrono::Duration::seconds(20), "20 ms at 1000x is at least 20 s");
        let start: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        let manual = ManualClock::new(start);
        assert_eq!(manual.now(), start);
        manual.advance(chrono::Duration::minutes(5));
        assert_eq!(manual.now(), start + chrono::Duration::minutes(5));
        manual.set(start);
        assert_eq!(manual.now(), start);
    }
}
