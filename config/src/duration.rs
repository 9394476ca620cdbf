//! Durations (`90s`, `1h30m`) and rates (`50/s`) as users write them.
//!
//! One grammar for every duration jobz reads, in the job file and elsewhere
//! (`wait=10m` on the HTTP API, `--exit-when-idle 5m`), so a value that works in
//! one place works in all of them. Errors show a good example, since the
//! person reading them is fixing a config by hand.

use std::time::Duration;

use crate::model::Rate;

/// Why a duration could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{text}` is not a duration: write a whole number and a unit (ms, s, m, h, d), e.g. `90s` or `1h30m`")]
    Malformed { text: String },
    #[error("`{text}` has no unit: write e.g. `{text}s` for seconds or `{text}m` for minutes")]
    MissingUnit { text: String },
    #[error("`{unit}` in `{text}` is not a unit: use ms, s, m, h or d, e.g. `1h30m`")]
    UnknownUnit { text: String, unit: String },
    #[error("`{text}` is too long a duration")]
    Overflow { text: String },
}

/// Why a rate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("`{text}` is not a rate: write a count per second, minute or hour, e.g. `50/s`, `10/m` or `3/h`")]
    Malformed { text: String },
    #[error("`{text}` would never dispatch anything: the count must be at least 1, e.g. `1/m`")]
    Zero { text: String },
}

/// Reads `90s`, `500ms`, `1h30m`, `2d`: whole numbers each followed by a unit. `0s` is zero.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let malformed = || DurationError::Malformed { text: text.to_owned() };
    let overflow = || DurationError::Overflow { text: text.to_owned() };
    if text.is_empty() {
        return Err(malformed());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(DurationError::MissingUnit { text: text.to_owned() });
    }
    let mut total_ms: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(malformed());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| overflow())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let unit_ms: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "" => return Err(malformed()),
            other => return Err(DurationError::UnknownUnit { text: text.to_owned(), unit: other.to_owned() }),
        };
        let part = number.checked_mul(unit_ms).ok_or_else(overflow)?;
        total_ms = total_ms.checked_add(part).ok_or_else(overflow)?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// Reads `50/s`, `10/m`, `3/h`; a bare `/s` means `1/s`.
pub fn parse_rate(text: &str) -> Result<Rate, RateError> {
    let malformed = || RateError::Malformed { text: text.to_owned() };
    let (count, unit) = text.split_once('/').ok_or_else(malformed)?;
    let per = match unit {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(malformed()),
    };
    let count: u32 = match count {
        "" => 1,
        digits if digits.bytes().all(|b| b.is_ascii_digit()) => digits.parse().map_err(|_| malformed())?,
        _ => return Err(malformed()),
    };
    if count == 0 {
        return Err(RateError::Zero { text: text.to_owned() });
    }
    Ok(Rate { count, per })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit_and_combined() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1m1s500ms"), Ok(Duration::from_millis(61_500)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_say_why_and_show_an_example() {
        assert_eq!(parse_duration("10"), Err(DurationError::MissingUnit { text: "10".into() }));
        assert!(parse_duration("10").unwrap_err().to_string().contains("`10s`"));
        assert_eq!(parse_duration("10y"), Err(DurationError::UnknownUnit { text: "10y".into(), unit: "y".into() }));
        for bad in ["", "s", "h1", "1.5h", "1h 30m", "-1s", "1h30"] {
            assert_eq!(parse_duration(bad), Err(DurationError::Malformed { text: bad.into() }), "{bad:?}");
        }
        assert!(parse_duration("x").unwrap_err().to_string().contains("e.g. `90s`"));
        assert_eq!(
            parse_duration("99999999999999999999d"),
            Err(DurationError::Overflow { text: "99999999999999999999d".into() })
        );
        assert_eq!(
            parse_duration("999999999999999d"),
            Err(DurationError::Overflow { text: "999999999999999d".into() })
        );
    }

    #[test]
    fn rates_per_second_minute_and_hour() {
        assert_eq!(parse_rate("50/s"), Ok(Rate { count: 50, per: Duration::from_secs(1) }));
        assert_eq!(parse_rate("10/m"), Ok(Rate { count: 10, per: Duration::from_secs(60) }));
        assert_eq!(parse_rate("3/h"), Ok(Rate { count: 3, per: Duration::from_secs(3600) }));
        assert_eq!(parse_rate("/s"), Ok(Rate { count: 1, per: Duration::from_secs(1) }));
    }

    #[test]
    fn bad_rates_are_rejected() {
        for bad in ["50", "50/d", "50/", "-1/s", "1.5/s", "50 /s", "a/s", "99999999999/s"] {
            assert_eq!(parse_rate(bad), Err(RateError::Malformed { text: bad.into() }), "{bad:?}");
        }
        assert_eq!(parse_rate("0/s"), Err(RateError::Zero { text: "0/s".into() }));
        assert!(parse_rate("x").unwrap_err().to_string().contains("e.g. `50/s`"));
    }
}
