//! When schedules fire (`jobz_core::schedule`): instants across the Europe/Madrid
//! daylight saving changes of 2026 (spring forward 2026-03-29 01:00 UTC, 02:00
//! local becomes 03:00; fall back 2026-10-25 01:00 UTC, 03:00 local becomes
//! 02:00), windows, catch-up, and identity. Each real instant fires at most once.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use chrono::{DateTime, Duration, Utc};
use config::{CatchUp, Cron, Schedule};
use jobz_core::schedule::{due, identity, instants, latest_in, next_after, Window};
use proptest::prelude::*;

fn schedule(cron: &str, timezone: &str, catch_up: CatchUp) -> Schedule {
    Schedule {
        cron: Cron {
            source: cron.to_string(),
            pattern: croner::Cron::from_str(cron).expect("a valid cron expression"),
        },
        timezone: chrono_tz::Tz::from_str(timezone).expect("a known time zone"),
        params: BTreeMap::new(),
        catch_up,
    }
}

fn madrid(cron: &str) -> Schedule {
    schedule(cron, "Europe/Madrid", CatchUp::Latest)
}

fn utc(text: &str) -> DateTime<Utc> {
    text.parse().expect("an RFC 3339 time")
}

fn all(schedule: &Schedule, after: &str, through: &str) -> Vec<DateTime<Utc>> {
    instants(schedule, utc(after), utc(through), 100_000)
}

fn times(list: &[&str]) -> Vec<DateTime<Utc>> {
    list.iter().map(|t| utc(t)).collect()
}

#[test]
fn a_daily_time_in_the_skipped_hour_fires_once_right_after_the_jump() {
    let s = madrid("30 2 * * *");
    let found = all(&s, "2026-03-27T12:00:00Z", "2026-03-30T12:00:00Z");
    // 02:30 CET, then 03:00 CEST (02:30 does not exist on the 29th), then 02:30 CEST.
    assert_eq!(found, times(&["2026-03-28T01:30:00Z", "2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"]));
}

#[test]
fn a_daily_time_in_the_repeated_hour_fires_once_at_its_first_instant() {
    let s = madrid("30 2 * * *");
    let found = all(&s, "2026-10-24T12:00:00Z", "2026-10-26T12:00:00Z");
    // 02:30 comes twice on the 25th (00:30Z in CEST, 01:30Z in CET): only the first fires.
    assert_eq!(found, times(&["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"]));
}

#[test]
fn hourly_follows_real_time_23_hours_in_spring_and_25_in_autumn() {
    let s = madrid("0 * * * *");
    // The local days of the changes: 2026-03-29 00:00 CET is 03-28T23:00Z; 03-30 00:00 CEST is 03-29T22:00Z.
    let spring = all(&s, "2026-03-28T22:59:59Z", "2026-03-29T21:59:59Z");
    assert_eq!(spring.len(), 23, "{spring:?}");
    let autumn = all(&s, "2026-10-24T21:59:59Z", "2026-10-25T22:59:59Z");
    assert_eq!(autumn.len(), 25, "{autumn:?}");
    for list in [spring, autumn] {
        for pair in list.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::hours(1), "one real hour apart: {pair:?}");
        }
    }
}

#[test]
fn every_minute_fires_each_real_minute_once_across_both_changes() {
    let s = madrid("* * * * *");
    for (after, through) in
        [("2026-03-29T00:30:00Z", "2026-03-29T01:30:00Z"), ("2026-10-25T00:00:00Z", "2026-10-25T02:00:00Z")]
    {
        let found = all(&s, after, through);
        let minutes = (utc(through) - utc(after)).num_minutes() as usize;
        assert_eq!(found.len(), minutes, "{after}..{through}");
        assert_eq!(found.iter().collect::<BTreeSet<_>>().len(), found.len(), "no instant twice");
        for pair in found.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::minutes(1));
        }
    }
}

#[test]
fn a_fixed_hour_on_the_change_days_fires_once_each_day() {
    // 02:00 is skipped in spring (fires at 03:00 CEST) and repeated in autumn (fires at 02:00 CEST).
    let s = madrid("0 2 * * *");
    assert_eq!(all(&s, "2026-03-29T00:00:00Z", "2026-03-29T23:00:00Z"), times(&["2026-03-29T01:00:00Z"]));
    assert_eq!(all(&s, "2026-10-24T23:00:00Z", "2026-10-25T23:00:00Z"), times(&["2026-10-25T00:00:00Z"]));
}

#[test]
fn seconds_schedules_fire_every_matching_second() {
    let s = schedule("*/10 * * * * *", "UTC", CatchUp::Latest);
    let found = all(&s, "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z");
    assert_eq!(found.len(), 6);
    assert_eq!(found[0], utc("2026-01-01T00:00:10Z"));
    assert_eq!(found[5], utc("2026-01-01T00:01:00Z"));
}

#[test]
fn windows_are_open_at_the_start_and_closed_at_the_end() {
    let s = madrid("0 * * * *");
    assert_eq!(all(&s, "2026-05-01T10:00:00Z", "2026-05-01T11:00:00Z"), times(&["2026-05-01T11:00:00Z"]));
    assert_eq!(next_after(&s, utc("2026-05-01T10:00:00Z")), Some(utc("2026-05-01T11:00:00Z")));
    let sub_second: DateTime<Utc> = utc("2026-05-01T10:59:59.999Z");
    assert_eq!(next_after(&s, sub_second), Some(utc("2026-05-01T11:00:00Z")));
    assert_eq!(next_after(&s, utc("2026-05-01T11:00:00.5Z")), Some(utc("2026-05-01T12:00:00Z")));
    assert_eq!(
        latest_in(&s, utc("2026-05-01T10:00:00Z"), utc("2026-05-01T11:00:00Z")),
        Some(utc("2026-05-01T11:00:00Z"))
    );
    assert_eq!(latest_in(&s, utc("2026-05-01T11:00:00Z"), utc("2026-05-01T11:59:59Z")), None);
}

#[test]
fn a_live_window_fires_every_instant_and_a_cut_one_resumes_after_the_last() {
    let s = madrid("*/15 * * * *");
    let (after, through) = (utc("2026-05-01T10:00:00Z"), utc("2026-05-01T11:07:00Z"));
    let all_due = due(&s, after, through, Window::Live, 100);
    assert_eq!(all_due.fire.len(), 4);
    assert_eq!(all_due.checked_through, through);
    let cut = due(&s, after, through, Window::Live, 3);
    assert_eq!(cut.fire, times(&["2026-05-01T10:15:00Z", "2026-05-01T10:30:00Z", "2026-05-01T10:45:00Z"]));
    assert_eq!(cut.checked_through, utc("2026-05-01T10:45:00Z"));
    let rest = due(&s, cut.checked_through, through, Window::Live, 3);
    assert_eq!(rest.fire, times(&["2026-05-01T11:00:00Z"]));
    assert_eq!(rest.checked_through, through);
}

#[test]
fn a_catch_up_window_fires_only_its_latest_instant_or_nothing() {
    let (after, through) = (utc("2026-03-28T23:30:00Z"), utc("2026-03-29T03:10:00Z"));
    let latest = due(&madrid("0 * * * *"), after, through, Window::CatchUp, 100);
    assert_eq!(latest.fire, times(&["2026-03-29T03:00:00Z"]));
    assert_eq!((latest.checked_through, latest.missed), (through, None));
    let none = due(&schedule("0 * * * *", "Europe/Madrid", CatchUp::None), after, through, Window::CatchUp, 100);
    assert_eq!(none.fire, Vec::<DateTime<Utc>>::new());
    assert_eq!((none.checked_through, none.missed), (through, Some(utc("2026-03-29T03:00:00Z"))));
    let empty = due(&madrid("0 * * * *"), utc("2026-03-29T03:00:00Z"), utc("2026-03-29T03:59:00Z"), Window::CatchUp, 9);
    assert!(empty.fire.is_empty() && empty.missed.is_none());
}

#[test]
fn an_empty_or_backwards_window_fires_nothing_and_keeps_its_start() {
    let s = madrid("* * * * * *");
    let t = utc("2026-05-01T10:00:00Z");
    for window in [Window::Live, Window::CatchUp] {
        let d = due(&s, t, t - Duration::hours(1), window, 10);
        assert!(d.fire.is_empty());
        assert_eq!(d.checked_through, t);
    }
}

#[test]
fn an_impossible_date_has_no_next_instant() {
    let s = madrid("0 0 30 2 *");
    assert_eq!(next_after(&s, utc("2026-01-01T00:00:00Z")), None);
    assert!(all(&s, "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z").is_empty());
}

#[test]
fn identity_changes_with_what_fires_and_not_with_catch_up_or_spacing() {
    let base = madrid("0 3 * * *");
    let id = identity("job", &base);
    assert_eq!(id, identity("job", &schedule("0  3 * * *", "Europe/Madrid", CatchUp::None)));
    assert_ne!(id, identity("other", &base));
    assert_ne!(id, identity("job", &madrid("0 4 * * *")));
    assert_ne!(id, identity("job", &schedule("0 3 * * *", "UTC", CatchUp::Latest)));
    let mut with_params = base.clone();
    with_params.params.insert("category".into(), "all".into());
    assert_ne!(id, identity("job", &with_params));
    assert_eq!(
        identity("job", &with_params),
        r#"{"job":"job","cron":"0 3 * * *","timezone":"Europe/Madrid","params":{"category":"all"}}"#
    );
}

const PATTERNS: &[&str] =
    &["30 2 * * *", "0 2 * * *", "0 * * * *", "*/7 * * * *", "15,45 1-3 * * *", "0 3 * * SUN", "*/20 * * * * *"];
const ZONES: &[&str] = &["Europe/Madrid", "America/New_York", "Australia/Lord_Howe", "UTC"];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Around the 2026 changes of several zones (Lord Howe shifts by 30 minutes):
    /// instants strictly increase, the latest one found backwards is the last one
    /// found forwards, and splitting a window anywhere finds the same instants.
    #[test]
    fn forward_backward_and_split_windows_agree(
        pattern in proptest::sample::select(PATTERNS),
        zone in proptest::sample::select(ZONES),
        day in prop_oneof![Just("2026-03-08"), Just("2026-03-29"), Just("2026-04-05"), Just("2026-10-04"), Just("2026-10-25"), Just("2026-11-01")],
        start_minutes in 0i64..(36 * 60),
        length_minutes in 1i64..(6 * 60),
        split_seconds in 0i64..(6 * 3600),
    ) {
        let s = schedule(pattern, zone, CatchUp::Latest);
        let after = utc(&format!("{day}T00:00:00Z")) - Duration::hours(12) + Duration::minutes(start_minutes);
        let through = after + Duration::minutes(length_minutes);
        let found = instants(&s, after, through, 100_000);
        for pair in found.windows(2) {
            prop_assert!(pair[0] < pair[1], "{pair:?}");
        }
        prop_assert!(found.iter().all(|t| *t > after && *t <= through));
        prop_assert_eq!(latest_in(&s, after, through), found.last().copied());
        let split = after + Duration::seconds(split_seconds.min((through - after).num_seconds()));
        let mut joined = instants(&s, after, split, 100_000);
        joined.extend(instants(&s, split, through, 100_000));
        prop_assert_eq!(joined, found);
    }
}
