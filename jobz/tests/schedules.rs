//! Schedules through real `jobz broker` processes whose scheduler runs on a
//! test clock (`JOBZ_TEST_CLOCK`, fast where it helps): one job per instant
//! across the Europe/Madrid daylight saving changes of 2026, catch-up after a
//! `kill -9` and restart, and bad input refused before anything starts.
//!
//! The schedules name the change's date, so they stop firing once the test's
//! window has passed: every count is exact, and "nothing fires twice" is
//! watched for a while after.

mod support;

use std::time::Duration;

use support::{get, json, run_jobz, wait_for, Mesh};

/// How long "nothing more fires" is watched for (at 900x, 15 minutes of the test clock).
const QUIET: Duration = Duration::from_secs(1);
const DEADLINE: Duration = Duration::from_secs(20);

/// The jobs named `name`, newest first.
fn jobs(mesh: &Mesh, name: &str) -> Vec<serde_json::Value> {
    let list = json(&get(&mesh.url(), &format!("/jobs?job_name={name}&limit=1000")).1);
    list["jobs"].as_array().cloned().unwrap_or_default()
}

fn schedule(mesh: &Mesh, name: &str) -> serde_json::Value {
    let list = json(&get(&mesh.url(), "/schedules").1);
    let found = list["schedules"].as_array().and_then(|l| l.iter().find(|s| s["job_name"] == name).cloned());
    match found {
        Some(s) => s,
        None => panic!("no schedule for {name}: {list}\n{}", mesh.logs()),
    }
}

/// Waits until `name` has `n` jobs; fails at once if it has more.
fn wait_jobs(mesh: &Mesh, name: &str, n: usize) {
    let done = wait_for(DEADLINE, || {
        let count = jobs(mesh, name).len();
        assert!(count <= n, "{name}: {count} jobs, expected {n}\n{}", mesh.logs());
        (count == n).then_some(())
    });
    if done.is_none() {
        panic!("{name}: {} jobs after {DEADLINE:?}, expected {n}\n{}", jobs(mesh, name).len(), mesh.logs());
    }
}

/// Checks that each of `name`'s fired instants is exactly `expected`, each with one job of its own,
/// and that every job of `name` is one of them.
fn check_fires(mesh: &Mesh, name: &str, expected: &[&str]) {
    let view = schedule(mesh, name);
    let fired = view["fired"].as_array().cloned().unwrap_or_default();
    let mut instants: Vec<&str> = fired.iter().filter_map(|f| f["instant"].as_str()).collect();
    instants.sort();
    let expected: Vec<String> = expected.iter().map(|t| format!("{}.000Z", t.trim_end_matches('Z'))).collect();
    assert_eq!(instants, expected, "{name}: {view}");
    let mut fire_jobs: Vec<&str> = fired.iter().filter_map(|f| f["job_id"].as_str()).collect();
    fire_jobs.sort();
    let listed = jobs(mesh, name);
    let mut job_ids: Vec<&str> = listed.iter().filter_map(|j| j["id"].as_str()).collect();
    job_ids.sort();
    assert_eq!(fire_jobs, job_ids, "{name}: one job per instant, and no other");
    assert!(listed.iter().all(|j| j["origin"]["kind"] == "schedule"), "{listed:?}");
}

#[test]
fn a_fast_clock_over_the_spring_forward_in_madrid_fires_each_instant_once() {
    // 2026-03-29 01:00Z: 02:00 CET becomes 03:00 CEST. The clock starts at 01:55 local, 900x.
    let mesh = Mesh::new(
        r#"
jobs:
  gap_time:
    command: "true"
    schedule: { cron: "30 2 29 3 *", timezone: Europe/Madrid }
  hours:
    command: "true"
    schedule: { cron: "0 0-4 29 3 *", timezone: Europe/Madrid }
  five_minutes:
    command: "true"
    schedule: { cron: "*/5 0-3 29 3 *", timezone: Europe/Madrid }
"#,
    );
    let _broker = mesh.broker_with_env(&[], &[("JOBZ_TEST_CLOCK", "2026-03-29T00:55:00Z@900x")]);
    // 02:30 does not exist that day: it fires once, at 03:00 CEST.
    wait_jobs(&mesh, "gap_time", 1);
    // Local 03:00 and 04:00 (the 02:00 hour does not exist).
    wait_jobs(&mesh, "hours", 2);
    // Local 03:00 to 03:55 every five minutes.
    wait_jobs(&mesh, "five_minutes", 12);
    std::thread::sleep(QUIET);
    check_fires(&mesh, "gap_time", &["2026-03-29T01:00:00Z"]);
    check_fires(&mesh, "hours", &["2026-03-29T01:00:00Z", "2026-03-29T02:00:00Z"]);
    let five: Vec<String> = (0..12).map(|i| format!("2026-03-29T01:{:02}:00Z", i * 5)).collect();
    check_fires(&mesh, "five_minutes", &five.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn a_fast_clock_over_the_fall_back_in_madrid_fires_each_instant_once() {
    // 2026-10-25 01:00Z: 03:00 CEST becomes 02:00 CET, so 02:xx comes twice. The clock starts at 02:20 CEST, 900x.
    let mesh = Mesh::new(
        r#"
jobs:
  repeated_time:
    command: "true"
    schedule: { cron: "30 2 25 10 *", timezone: Europe/Madrid }
  hours:
    command: "true"
    schedule: { cron: "0 0-2 25 10 *", timezone: Europe/Madrid }
  ten_minutes:
    command: "true"
    schedule: { cron: "*/10 2 25 10 *", timezone: Europe/Madrid }
"#,
    );
    let _broker = mesh.broker_with_env(&[], &[("JOBZ_TEST_CLOCK", "2026-10-25T00:20:00Z@900x")]);
    // 02:30 comes twice: it fires once, at its first instant (CEST).
    wait_jobs(&mesh, "repeated_time", 1);
    // 02:00 CET, the second 02:00 (02:00 CEST was before the clock started).
    wait_jobs(&mesh, "hours", 1);
    // 02:30, 02:40, 02:50 CEST, then 02:00 to 02:50 CET: each real instant once.
    wait_jobs(&mesh, "ten_minutes", 9);
    std::thread::sleep(QUIET);
    check_fires(&mesh, "repeated_time", &["2026-10-25T00:30:00Z"]);
    check_fires(&mesh, "hours", &["2026-10-25T01:00:00Z"]);
    let ten: Vec<String> = (3..12).map(|i| format!("2026-10-25T{:02}:{:02}:00Z", i / 6, (i % 6) * 10)).collect();
    check_fires(&mesh, "ten_minutes", &ten.iter().map(String::as_str).collect::<Vec<_>>());
}

const RESTART: &str = r#"
jobs:
  caught:
    command: "true"
    schedule: { cron: "0 * * * *", timezone: Europe/Madrid }
  skipped:
    command: "true"
    schedule: { cron: "0 * * * *", timezone: Europe/Madrid, catch_up: none }
"#;

#[test]
fn after_a_kill_9_the_latest_missed_instant_fires_once_with_latest_and_never_with_none() {
    let mesh = Mesh::new(RESTART);
    // Up just before 01:00Z: both fire it, live.
    let mut broker = mesh.broker_with_env(&[], &[("JOBZ_TEST_CLOCK", "2026-03-29T00:59:58Z")]);
    wait_jobs(&mesh, "caught", 1);
    wait_jobs(&mesh, "skipped", 1);
    broker.kill9();

    // Down over 02:00Z and 03:00Z: `latest` fires 03:00Z once, `none` nothing; 01:00Z stays fired once.
    let mut broker = mesh.broker_with_env(&[], &[("JOBZ_TEST_CLOCK", "2026-03-29T03:30:00Z")]);
    wait_jobs(&mesh, "caught", 2);
    std::thread::sleep(QUIET);
    check_fires(&mesh, "caught", &["2026-03-29T01:00:00Z", "2026-03-29T03:00:00Z"]);
    check_fires(&mesh, "skipped", &["2026-03-29T01:00:00Z"]);
    let caught = schedule(&mesh, "caught");
    assert_eq!(caught["last_fired"], "2026-03-29T03:00:00.000Z", "{caught}");
    assert_eq!(caught["next"], "2026-03-29T04:00:00.000Z", "{caught}");
    broker.kill9();

    // A second restart finds nothing missed.
    let _broker = mesh.broker_with_env(&[], &[("JOBZ_TEST_CLOCK", "2026-03-29T03:40:00Z")]);
    std::thread::sleep(QUIET);
    check_fires(&mesh, "caught", &["2026-03-29T01:00:00Z", "2026-03-29T03:00:00Z"]);
    check_fires(&mesh, "skipped", &["2026-03-29T01:00:00Z"]);

    // `jobz schedules` shows them as a table, and as JSON.
    let url = mesh.url();
    let (code, out, err) = run_jobz(mesh.path(), &["schedules", "--url", &url], &[], DEADLINE);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("JOB "), "{out}");
    let row = lines.iter().find(|l| l.starts_with("caught ")).unwrap_or_else(|| panic!("no caught row: {out}"));
    for cell in ["0 * * * *", "Europe/Madrid", "latest", "2026-03-29T04:00:00Z", "2026-03-29T03:00:00Z"] {
        assert!(row.contains(cell), "{cell:?} in {row:?}");
    }
    assert!(lines.iter().any(|l| l.starts_with("skipped ") && l.contains(" none ")), "{out}");
    let (code, out, err) = run_jobz(mesh.path(), &["schedules", "--url", &url, "--json"], &[], DEADLINE);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["schedules"].as_array().map(Vec::len), Some(2), "{out}");
}

#[test]
fn a_nonexistent_time_zone_or_a_bad_test_clock_is_refused_before_anything_starts() {
    let mesh = Mesh::new(
        r#"jobs:
  report:
    command: "true"
    schedule:
      - { cron: "0 3 * * *", timezone: Europe/Madird }
"#,
    );
    let config = mesh.config.display().to_string();
    let (code, out, err) = run_jobz(mesh.path(), &["check", "--config", &config], &[], DEADLINE);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("jobz.yaml:5:40: jobs.report.schedule.0.timezone: unknown time zone `Europe/Madird`"),
        "{err}"
    );
    let data = mesh.path().join("data");
    let data_arg = data.display().to_string();
    let http = format!("127.0.0.1:{}", mesh.http_port);
    let endpoint = mesh.endpoint();
    let broker_args = ["broker", "--config", &config, "--data", &data_arg, "--http", &http, "--bind", &endpoint];
    let (code, _, err) = run_jobz(mesh.path(), &broker_args, &[], DEADLINE);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown time zone `Europe/Madird`"), "{err}");
    assert!(!data.exists(), "a refused broker creates nothing");

    std::fs::write(&mesh.config, "jobs:\n  report: { command: \"true\", schedule: { cron: \"0 3 * * *\" } }\n")
        .expect("rewrite the job file");
    for clock in ["tomorrow", "2026-03-29T00:58:00Z@60", "2026-03-29T00:58:00Z@0x", ""] {
        let (code, _, err) = run_jobz(mesh.path(), &broker_args, &[("JOBZ_TEST_CLOCK", clock)], DEADLINE);
        assert_eq!(code, 2, "{clock:?}: {err}");
        assert!(err.contains(&format!("JOBZ_TEST_CLOCK: `{clock}` is not a test clock")), "{clock:?}: {err}");
        assert!(!data.exists(), "a refused broker creates nothing");
    }
    let up_args = ["up", "--config", &config, "--data", &data_arg, "--http", &http, "--bind", &endpoint];
    let (code, _, err) = run_jobz(mesh.path(), &up_args, &[("JOBZ_TEST_CLOCK", "soon@2x")], DEADLINE);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("JOBZ_TEST_CLOCK: `soon@2x` is not a test clock"), "{err}");
    assert!(!data.exists(), "a refused `jobz up` creates nothing");
}
