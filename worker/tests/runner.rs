//! Behaviour of the job runner against real child processes: output capture,
//! process-group cleanup on timeout, cancel and normal exit, start failures,
//! the before/after steps, and the live log file.
//!
//! Every wait has a deadline; the only sleeps are inside the child commands.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use worker::limits;
use worker::runner::{self, Ended, JobSpec, Outcome, RunError, Step};

/// Upper bound for any single `run` in these tests.
const RUN_DEADLINE: Duration = Duration::from_secs(20);
/// How long reaped-but-async process deaths may take to show in /proc.
const DEATH_DEADLINE: Duration = Duration::from_secs(5);

fn sh(script: &str) -> Vec<String> {
    vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()]
}

fn spec_in(dir: &Path, command: Vec<String>) -> JobSpec {
    JobSpec { cwd: Some(dir.to_owned()), kill_grace: Duration::from_millis(200), ..JobSpec::new(command) }
}

async fn within<T>(what: &str, deadline: Duration, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(deadline, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what} did not finish within {deadline:?}"),
    }
}

async fn run(spec: &JobSpec) -> Outcome {
    run_with(spec, CancellationToken::new()).await
}

async fn run_with(spec: &JobSpec, cancel: CancellationToken) -> Outcome {
    within("run", RUN_DEADLINE, runner::run(spec, cancel, None)).await.expect("run")
}

/// Polls `condition` every 10 ms until it holds; panics after `deadline`.
async fn wait_until(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    let give_up = Instant::now() + deadline;
    while !condition() {
        assert!(Instant::now() < give_up, "{what}: not true within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn read_pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|line| line.trim().parse().expect("pid")).collect()
}

/// A process is dead when /proc no longer has it, or it is a zombie: in a
/// container, PID 1 may be slow to reap orphans, but a zombie runs nothing.
fn is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next());
            matches!(state, Some('Z' | 'X'))
        }
    }
}

async fn assert_all_dead(pids: &[i32]) {
    wait_until("all recorded processes dead", DEATH_DEADLINE, || pids.iter().all(|&pid| is_dead(pid))).await;
}

/// Kills a process on drop, for processes a test deliberately lets escape the
/// runner, so a failing test leaves nothing behind.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: plain integer arguments; the pid is a process this test started.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

/// Starts two background sleeps and one in a subshell (a grandchild of a
/// grandchild, orphaned when the subshell exits), records their pids, waits.
const THREE_SLEEPERS: &str = "sleep 300 & echo $! > pids; \
     sleep 300 & echo $! >> pids; \
     (sleep 300 & echo $! >> pids); \
     wait";

#[tokio::test]
async fn stdout_and_stderr_interleave_in_tail_and_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("job.log");
    let spec = JobSpec {
        log_path: Some(log.clone()),
        ..spec_in(dir.path(), sh("echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 3"))
    };
    let outcome = run(&spec).await;
    let expected = "out1\nerr1\nout2\nerr2\njobz: command step exited 3\n";
    assert_eq!(outcome.status, Ended::Failed);
    assert_eq!(outcome.failed_step, Some(Step::Command));
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(outcome.signal, None);
    assert_eq!(outcome.tail, expected);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), expected);
    assert_eq!(outcome.output_bytes, expected.len() as u64);
    assert!(outcome.started_at <= outcome.finished_at);
}

#[tokio::test]
async fn large_output_keeps_last_bytes_in_tail_and_all_in_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("job.log");
    let spec =
        JobSpec { log_path: Some(log.clone()), ..spec_in(dir.path(), vec!["seq".into(), "1".into(), "200000".into()]) };
    let outcome = run(&spec).await;
    let expected: String = (1..=200_000).map(|n| format!("{n}\n")).collect();
    assert!(expected.len() > 1024 * 1024);
    assert_eq!(outcome.status, Ended::Succeeded);
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(outcome.output_bytes, expected.len() as u64);
    assert_eq!(outcome.tail.len(), limits::OUTPUT_TAIL_BYTES);
    assert_eq!(outcome.tail, expected[expected.len() - limits::OUTPUT_TAIL_BYTES..]);
    assert!(std::fs::read_to_string(&log).unwrap() == expected);
}

#[tokio::test]
async fn log_is_appended_not_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("job.log");
    std::fs::write(&log, "attempt 1\n").unwrap();
    let spec = JobSpec { log_path: Some(log.clone()), ..spec_in(dir.path(), sh("echo attempt 2")) };
    assert_eq!(run(&spec).await.status, Ended::Succeeded);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "attempt 1\nattempt 2\n");
}

#[tokio::test]
async fn timeout_kills_grandchildren() {
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec { timeout: Some(Duration::from_secs(1)), ..spec_in(dir.path(), sh(THREE_SLEEPERS)) };
    let outcome = run(&spec).await;
    assert_eq!(outcome.status, Ended::TimedOut);
    assert_eq!(outcome.failed_step, Some(Step::Command));
    assert_eq!(outcome.signal, Some(libc::SIGTERM));
    assert!(outcome.tail.contains("jobz: command step timed out after 1s"), "{:?}", outcome.tail);
    let pids = read_pids(&dir.path().join("pids"));
    assert_eq!(pids.len(), 3, "{pids:?}");
    assert_all_dead(&pids).await;
}

#[tokio::test]
async fn cancel_kills_grandchildren() {
    let dir = tempfile::tempdir().unwrap();
    let pids_path = dir.path().join("pids");
    let spec = JobSpec { timeout: Some(Duration::from_secs(60)), ..spec_in(dir.path(), sh(THREE_SLEEPERS)) };
    let cancel = CancellationToken::new();
    let trigger = async {
        wait_until("three pids recorded", Duration::from_secs(5), || read_pids(&pids_path).len() >= 3).await;
        cancel.cancel();
    };
    let (outcome, ()) = tokio::join!(run_with(&spec, cancel.clone()), trigger);
    assert_eq!(outcome.status, Ended::Cancelled);
    assert_eq!(outcome.failed_step, Some(Step::Command));
    assert!(outcome.tail.contains("jobz: command step was cancelled"));
    assert_all_dead(&read_pids(&pids_path)).await;
}

#[tokio::test]
async fn normal_exit_kills_background_children_and_returns_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_in(dir.path(), sh("sleep 300 & echo $! > pids; echo done"));
    let started = Instant::now();
    let outcome = run(&spec).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(outcome.status, Ended::Succeeded);
    assert_eq!(outcome.tail, "done\n");
    let pids = read_pids(&dir.path().join("pids"));
    assert_eq!(pids.len(), 1);
    assert_all_dead(&pids).await;
}

#[tokio::test]
async fn process_outside_the_group_holding_the_pipe_is_bounded_by_drain_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // The escaped process records its pid only after setsid, so by the time
    // the main process exits it has surely left the process group.
    let spec = spec_in(
        dir.path(),
        sh("setsid sh -c 'echo $$ > pids; exec sleep 300' & \
            while [ ! -s pids ]; do sleep 0.01; done; echo done"),
    );
    let started = Instant::now();
    let outcome = run(&spec).await;
    let pids = read_pids(&dir.path().join("pids"));
    let _escaped: Vec<KillOnDrop> = pids.iter().map(|&pid| KillOnDrop(pid)).collect();
    assert!(started.elapsed() < limits::OUTPUT_DRAIN_TIMEOUT + Duration::from_secs(3));
    assert_eq!(outcome.status, Ended::Succeeded);
    assert!(outcome.tail.starts_with("done\n"), "{:?}", outcome.tail);
    assert!(outcome.tail.contains("jobz: stopped reading output"));
}

#[tokio::test]
async fn missing_program_fails_with_message() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_in(dir.path(), vec!["jobz-test-no-such-program".into()]);
    let outcome = run(&spec).await;
    assert_eq!(outcome.status, Ended::Failed);
    assert_eq!(outcome.failed_step, Some(Step::Command));
    assert_eq!(outcome.exit_code, None);
    assert_eq!(outcome.signal, None);
    assert!(
        outcome.tail.starts_with("jobz: cannot start \"jobz-test-no-such-program\": No such file or directory"),
        "{:?}",
        outcome.tail
    );
}

#[tokio::test]
async fn missing_cwd_fails_with_message_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let spec = JobSpec { cwd: Some(missing.clone()), ..JobSpec::new(sh("true")) };
    let outcome = run(&spec).await;
    assert_eq!(outcome.status, Ended::Failed);
    assert_eq!(outcome.exit_code, None);
    let expected = format!("jobz: cannot use cwd {missing:?}: No such file or directory");
    assert!(outcome.tail.starts_with(&expected), "{:?}", outcome.tail);
}

#[tokio::test]
async fn cwd_that_is_a_file_fails_with_message_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let spec = JobSpec { cwd: Some(file.clone()), ..JobSpec::new(sh("true")) };
    let outcome = run(&spec).await;
    assert_eq!(outcome.status, Ended::Failed);
    let expected = format!("jobz: cannot use cwd {file:?}: Not a directory");
    assert!(outcome.tail.starts_with(&expected), "{:?}", outcome.tail);
}

#[tokio::test]
async fn empty_command_fails_with_message() {
    let outcome = run(&JobSpec::new(Vec::new())).await;
    assert_eq!(outcome.status, Ended::Failed);
    assert!(outcome.tail.contains("empty command"));
}

#[tokio::test]
async fn failing_before_skips_command_but_runs_after() {
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        before: Some(sh("echo setting up; exit 3")),
        after: Some(sh("touch after-ran; echo tearing down")),
        ..spec_in(dir.path(), sh("touch command-ran"))
    };
    let outcome = run(&spec).await;
    assert_eq!(outcome.status, Ended::Failed);
    assert_eq!(outcome.failed_step, Some(Step::Before));
    assert_eq!(outcome.exit_code, Some(3));
    assert_eq!(outcome.tail, "setting up\njobz: before step exited 3\ntearing down\n");
    assert!(!dir.path().join("command-ran").exists());
    assert!(dir.path().join("after-ran").exists());
}

#[tokio::test]
async fn successful_steps_run_in_order_without_markers() {
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        before: Some(sh("echo before")),
        after: Some(sh("echo after")),
        ..spec_in(dir.path(), sh("echo command"))
    };
    let outcome = run(&spec).await;
    assert_eq!(outcome.status, Ended::Succeeded);
    assert_eq!(outcome.failed_step, None);
    assert_eq!(outcome.exit_code, Some(0));
    assert_eq!(outcome.tail, "before\ncommand\nafter\n");
}

#[tokio::test]
async fn after_runs_after_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        after: Some(sh("touch after-ran")),
        timeout: Some(Duration::from_millis(300)),
        ..spec_in(dir.path(), vec!["sleep".into(), "300".into()])
    };
    let outcome = run(&spec).await;
    assert_eq!(outcome.status, Ended::TimedOut);
    assert_eq!(outcome.failed_step, Some(Step::Command));
    assert_eq!(outcome.signal, Some(libc::SIGTERM));
    assert!(dir.path().join("after-ran").exists());
}

#[tokio::test]
async fn timeout_covers_before_step() {
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec {
        before: Some(vec!["sleep".into(), "300".into()]),
        after: Some(sh("touch after-ran")),
        timeout: Some(Duration::from_millis(300)),
        ..spec_in(dir.path(), sh("touch command-ran"))
    };
    let outcome = run(&spec).await;
    assert_eq!(outcome.status, Ended::TimedOut);
    assert_eq!(outcome.failed_step, Some(Step::Before));
    assert!(outcome.tail.contains("jobz: before step timed out after 300ms"));
    assert!(!dir.path().join("command-ran").exists());
    assert!(dir.path().join("after-ran").exists());
}

#[tokio::test]
async fn cancelled_before_start_runs_only_after() {
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec { after: Some(sh("touch after-ran")), ..spec_in(dir.path(), sh("touch command-ran")) };
    let cancel = CancellationToken::new();
    cancel.cancel();
    let outcome = run_with(&spec, cancel).await;
    assert_eq!(outcome.status, Ended::Cancelled);
    assert_eq!(outcome.failed_step, Some(Step::Command));
    assert!(!dir.path().join("command-ran").exists());
    assert!(dir.path().join("after-ran").exists());
}

#[tokio::test]
async fn failing_after_fails_a_successful_job() {
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec { after: Some(sh("exit 4")), ..spec_in(dir.path(), sh("true")) };
    let outcome = run(&spec).await;
    assert_eq!(outcome.status, Ended::Failed);
    assert_eq!(outcome.failed_step, Some(Step::After));
    assert_eq!(outcome.exit_code, Some(4));
    assert_eq!(outcome.tail, "jobz: after step exited 4\n");
}

#[tokio::test]
async fn env_and_cwd_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let spec =
        JobSpec { env: vec![("FOO".into(), "bar baz".into())], ..spec_in(dir.path(), sh("echo \"$FOO\"; pwd -P")) };
    let outcome = run(&spec).await;
    assert_eq!(outcome.status, Ended::Succeeded);
    let cwd = dir.path().canonicalize().unwrap();
    assert_eq!(outcome.tail, format!("bar baz\n{}\n", cwd.display()));
}

#[tokio::test]
async fn term_ignoring_process_is_killed_after_grace() {
    let dir = tempfile::tempdir().unwrap();
    let spec = JobSpec { timeout: Some(Duration::from_secs(1)), ..spec_in(dir.path(), sh("trap '' TERM; sleep 300")) };
    let started = Instant::now();
    let outcome = run(&spec).await;
    let elapsed = started.elapsed();
    assert_eq!(outcome.status, Ended::TimedOut);
    assert_eq!(outcome.signal, Some(libc::SIGKILL));
    assert_eq!(outcome.exit_code, None);
    assert!(elapsed >= Duration::from_millis(1200), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(outcome.tail.contains("stopped with signal 9"), "{:?}", outcome.tail);
}

#[tokio::test]
async fn log_file_can_be_read_while_job_runs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("job.log");
    let spec = JobSpec { log_path: Some(log.clone()), ..spec_in(dir.path(), sh("echo first line; sleep 300")) };
    let cancel = CancellationToken::new();
    let job = tokio::spawn({
        let cancel = cancel.clone();
        async move { runner::run(&spec, cancel, None).await }
    });
    wait_until("first line in the log", Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|text| text == "first line\n")
    })
    .await;
    assert!(!job.is_finished());
    cancel.cancel();
    let outcome = within("job", RUN_DEADLINE, job).await.unwrap().unwrap();
    assert_eq!(outcome.status, Ended::Cancelled);
}

#[tokio::test]
async fn output_channel_receives_everything_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_in(dir.path(), sh("for i in 1 2 3; do echo line $i; done; exit 1"));
    // A small channel: the runner waits for the receiver rather than drop output.
    let (sender, mut receiver) = tokio::sync::mpsc::channel(1);
    let collect = async {
        let mut received = Vec::new();
        while let Some(chunk) = receiver.recv().await {
            received.extend(chunk);
        }
        received
    };
    let (outcome, received) = tokio::join!(
        async {
            within("run", RUN_DEADLINE, runner::run(&spec, CancellationToken::new(), Some(sender))).await.expect("run")
        },
        collect,
    );
    assert_eq!(String::from_utf8(received).unwrap(), outcome.tail);
    assert_eq!(outcome.tail, "line 1\nline 2\nline 3\njobz: command step exited 1\n");
}

#[tokio::test]
async fn dropped_output_receiver_does_not_affect_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_in(dir.path(), vec!["seq".into(), "1".into(), "100000".into()]);
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    drop(receiver);
    let outcome =
        within("run", RUN_DEADLINE, runner::run(&spec, CancellationToken::new(), Some(sender))).await.expect("run");
    assert_eq!(outcome.status, Ended::Succeeded);
    assert!(outcome.tail.ends_with("99999\n100000\n"));
}

#[tokio::test]
async fn unopenable_log_file_is_a_run_error() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("no-such-dir").join("job.log");
    let spec = JobSpec { log_path: Some(log.clone()), ..spec_in(dir.path(), sh("touch command-ran")) };
    let result = within("run", RUN_DEADLINE, runner::run(&spec, CancellationToken::new(), None)).await;
    match result {
        Err(RunError::OpenLog { path, .. }) => assert_eq!(path, log),
        other => panic!("expected OpenLog, got {other:?}"),
    }
    assert!(!dir.path().join("command-ran").exists());
}

#[tokio::test]
async fn dropping_the_run_future_kills_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let pids_path = dir.path().join("pids");
    let spec = JobSpec {
        after: Some(sh("touch after-ran")),
        ..spec_in(dir.path(), sh("echo $$ > pids; sleep 300 & echo $! >> pids; wait"))
    };
    tokio::select! {
        outcome = runner::run(&spec, CancellationToken::new(), None) => {
            panic!("run ended on its own: {outcome:?}")
        }
        () = wait_until("two pids recorded", Duration::from_secs(5), || {
            read_pids(&pids_path).len() >= 2
        }) => {}
    }
    // The run future is dropped here.
    assert_all_dead(&read_pids(&pids_path)).await;
    assert!(!dir.path().join("after-ran").exists());
}
