//! `jobz run` and `jobz check` through the real binary: eager mode runs a
//! whole chain, fan-in included, and a broken file is reported with locations.

use std::path::Path;
use std::process::{Command, Output};

fn jobz(dir: &Path, args: &[&str]) -> Output {
    let result = Command::new(env!("CARGO_BIN_EXE_jobz"))
        .args(args)
        .current_dir(dir)
        .env("TMPDIR", dir)
        .env_remove("JOBZ_CONFIG")
        .output();
    match result {
        Ok(out) => out,
        Err(e) => panic!("cannot run jobz: {e}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn tempdir() -> tempfile::TempDir {
    match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    }
}

#[test]
fn run_on_the_example_runs_the_whole_chain_through_the_gate() {
    let dir = tempdir();
    let out = jobz(
        dir.path(),
        &[
            "run",
            "nightly_report",
            "date=2026_03_04",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../config/example.yaml"),
        ],
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{}", out.status, text(&out.stderr));
    // Every shard ran, the gate fired merge once, and publish counted the four merged lines.
    let merged = std::fs::read_to_string(dir.path().join("jobz-example/2026_03_04/merged")).unwrap_or_default();
    let mut lines: Vec<_> = merged.lines().collect();
    lines.sort();
    assert_eq!(lines, ["shard 1", "shard 2", "shard 3", "shard 4"]);
    for job in ["nightly_report", "fan_out", "merge", "publish"] {
        assert_eq!(stdout.matches(&format!("{job}  succeeded")).count(), 1, "{job} once:\n{stdout}");
    }
    assert_eq!(stdout.matches("shard  succeeded").count(), 4, "{stdout}");
    assert!(stdout.contains("(gate all_shards_done, key 2026_03_04)"), "{stdout}");
    assert!(stdout.lines().any(|l| l.trim() == "4"), "publish prints the line count:\n{stdout}");
}

#[test]
fn run_with_no_job_file_uses_the_built_in_example() {
    let dir = tempdir();
    let out = jobz(dir.path(), &["run", "hello", "who=eager"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("hello, eager"), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("built-in example"), "{}", text(&out.stderr));
}

#[test]
fn a_failing_job_retries_then_runs_its_failure_handler_and_exits_non_zero() {
    let dir = tempdir();
    let out = jobz(dir.path(), &["run", "flaky", "fail=yes"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("flaky  failed  2 attempts"), "{stdout}");
    assert!(stdout.contains("retrying in"), "{stdout}");
    assert_eq!(stdout.matches("notify  succeeded").count(), 1, "{stdout}");
    assert!(
        stdout.contains("jobz: flaky ") && stdout.contains(" exit 1"),
        "the handler got the parent's name and exit code:\n{stdout}"
    );
}

#[test]
fn bad_params_and_unknown_jobs_are_refused_before_anything_runs() {
    let dir = tempdir();
    let out = jobz(dir.path(), &["run", "hello", "who=NOT OK; touch pwned"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("\"who\""), "names the param: {}", text(&out.stderr));
    let out = jobz(dir.path(), &["run", "hello", "color=red"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("not declared"), "{}", text(&out.stderr));
    let out = jobz(dir.path(), &["run", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no job named \"nope\""), "{}", text(&out.stderr));
    let out = jobz(dir.path(), &["run", "hello", "who"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!dir.path().join("pwned").exists());
}

#[test]
fn a_value_full_of_shell_syntax_reaches_the_command_as_plain_text() {
    let dir = tempdir();
    let file = dir.path().join("jobz.yaml");
    let yaml = "jobs:\n  say:\n    shell: true\n    command: \"printf '%s' {v} > out; printf '%s' \\\"{v}\\\" >> out\"\n    params:\n      v: {}\n";
    std::fs::write(&file, yaml).unwrap_or_else(|e| panic!("{e}"));
    let value = "$(touch pwned); `touch pwned` ' \" *";
    let out = jobz(dir.path(), &["run", "say", &format!("v={value}")]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(std::fs::read_to_string(dir.path().join("out")).unwrap_or_default(), format!("{value}{value}"));
    assert!(!dir.path().join("pwned").exists());
}

#[test]
fn check_reports_every_problem_with_file_line_and_column() {
    let dir = tempdir();
    let file = dir.path().join("broken.yaml");
    let yaml = "\
jobs:
  a:
    command: \"echo {date}\"
    colour: red
    on_success: [ b ]
  c:
    command: \"echo hi\"
    timeout: soon
";
    std::fs::write(&file, yaml).unwrap_or_else(|e| panic!("{e}"));
    let out = jobz(dir.path(), &["check", "--config", "broken.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    let located: Vec<&str> = stderr.lines().filter(|l| l.starts_with("broken.yaml:")).collect();
    assert!(located.iter().any(|l| l.starts_with("broken.yaml:3:") && l.contains("date")), "{stderr}");
    assert!(located.iter().any(|l| l.starts_with("broken.yaml:4:5:") && l.contains("colour")), "{stderr}");
    assert!(
        located.iter().any(|l| l.starts_with("broken.yaml:5:") && l.contains("\"b\"") || l.contains("`b`")),
        "{stderr}"
    );
    assert!(located.iter().any(|l| l.starts_with("broken.yaml:8:") && l.contains("soon")), "{stderr}");
    let out = jobz(dir.path(), &["check", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/../config/example.yaml")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = jobz(dir.path(), &["check", "--config", "missing.yaml"]);
    assert_eq!(out.status.code(), Some(2), "a missing file is an error: {}", text(&out.stderr));
}

/// `jobz` with `args` in `dir`, killed if it has not ended within `deadline`.
fn jobz_within(dir: &Path, args: &[&str], deadline: std::time::Duration) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_jobz"))
        .args(args)
        .current_dir(dir)
        .env("TMPDIR", dir)
        .env_remove("JOBZ_CONFIG")
        .env_remove("JOBZ_URL")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = child.unwrap_or_else(|e| panic!("cannot run jobz: {e}"));
    let until = std::time::Instant::now() + deadline;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if std::time::Instant::now() < until => std::thread::sleep(std::time::Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
                panic!("jobz {args:?} did not end within {deadline:?}:\n{}\n{}", text(&out.stdout), text(&out.stderr));
            }
            Err(e) => panic!("waiting for jobz: {e}"),
        }
    }
    child.wait_with_output().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_step_starts_jobs_and_reports_progress_through_the_runs_own_front_door() {
    let dir = tempdir();
    let bin = env!("CARGO_BIN_EXE_jobz");
    // Each line echoes how the call ended, so the test sees refusals too.
    let yaml = format!(
        r#"
jobs:
  fan:
    shell: true
    command: >-
      echo "url=$JOBZ_URL";
      {bin} progress 40 copying; echo "progress=$?";
      {bin} start leaf d=a; {bin} start leaf d=b;
      {bin} start leaf d=BAD; echo "bad=$?";
      {bin} start leaf d=c --wait; echo "wait=$?";
      {bin} cancel "$JOBZ_JOB_ID"; echo "cancel=$?"
    on_success: [ done ]
  leaf:
    shell: true
    command: 'echo "leaf {{d}} run=$JOBZ_RUN_ID"'
    params:
      d: {{ pattern: '^[a-z]$' }}
  done:
    command: "echo all done"
"#
    );
    std::fs::write(dir.path().join("fan.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"));
    let out = jobz_within(dir.path(), &["run", "fan", "--config", "fan.yaml"], std::time::Duration::from_secs(60));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{}", out.status, text(&out.stderr));
    let fan_id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("── fan ").and_then(|rest| rest.split_whitespace().next()))
        .unwrap_or_else(|| panic!("no fan line:\n{stdout}"));
    // A front door of the run's own, on loopback; not a broker's default address.
    let url = stdout.lines().find_map(|l| l.strip_prefix("url=")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(url.starts_with("http://127.0.0.1:") && !url.ends_with(":6769"), "{url}");
    assert!(stdout.contains("── fan 40% copying") && stdout.contains("progress=0"), "{stdout}");
    // A bad param is refused at the start, naming it, and nothing runs for it.
    // (A step's stderr is part of its output, which `jobz run` prints.)
    assert!(stdout.contains("bad=2") && stdout.contains("param \"d\""), "{stdout}");
    assert!(!stdout.contains("leaf BAD"), "{stdout}");
    // --wait inside the run would wait for its own caller: refused before anything starts.
    assert!(stdout.contains("wait=2") && !stdout.contains("leaf c"), "{stdout}");
    assert!(stdout.contains("in eager mode (`jobz run`) a job started from a job runs after"), "{stdout}");
    // Nothing to cancel without a broker: a 409, exit 1.
    assert!(stdout.contains("cancel=1"), "{stdout}");
    // The started jobs joined fan's run and ran after it, before its follow-up.
    let a = stdout.find(&format!("leaf a run={fan_id}")).unwrap_or_else(|| panic!("leaf a in fan's run:\n{stdout}"));
    let b = stdout.find(&format!("leaf b run={fan_id}")).unwrap_or_else(|| panic!("leaf b in fan's run:\n{stdout}"));
    let fan_end = stdout.find("cancel=").unwrap_or_default();
    let done = stdout.find("all done").unwrap_or_else(|| panic!("done ran:\n{stdout}"));
    assert!(fan_end < a && a < b && b < done, "order:\n{stdout}");
    assert!(stdout.contains("├─ leaf  succeeded") && stdout.contains("└─ done  succeeded"), "{stdout}");
}
