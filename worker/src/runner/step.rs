//! Running one step (before, command or after) of a job attempt: spawn it in a
//! process group of its own with its output in one pipe, copy the output to
//! the sink while watching for exit, deadline and cancel, and stop the whole
//! group when the step is over.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::group::{self, KillOnDrop, ProcessGroup};
use super::output::Sink;
use super::spawn::{self, Launch, Process};
use super::{JobSpec, Step};
use crate::limits;

/// What bounds one step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepLimits<'a> {
    /// When the step is stopped as timed out; `None` for no limit.
    pub(crate) deadline: Option<Instant>,
    /// Cancelling this stops the step; `None` for a step that cannot be
    /// cancelled (the tear-down step).
    pub(crate) cancel: Option<&'a CancellationToken>,
    /// Time between SIGTERM and SIGKILL when the step is stopped.
    pub(crate) kill_grace: Duration,
}

/// Why the runner stopped a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    TimedOut,
    Cancelled,
}

/// How a step ended.
#[derive(Debug)]
pub(crate) enum StepEnd {
    /// The main process exited on its own (successfully or not).
    Exited(ExitStatus),
    /// The runner stopped the process group. `status` is the main process's
    /// status, if it could be reaped.
    Stopped { reason: StopReason, status: Option<ExitStatus> },
    /// The step ended without an exit status: it could not be started, or its
    /// status was lost. The reason has been written to the output.
    NoStatus,
}

/// Runs one step to its end. Never fails: whatever goes wrong is a
/// [`StepEnd`] plus a `jobz: ...` line in the output.
pub(crate) async fn run(
    step: Step,
    argv: &[String],
    spec: &JobSpec,
    limits: StepLimits<'_>,
    sink: &mut Sink,
) -> StepEnd {
    let Some((program, args)) = argv.split_first() else {
        tracing::warn!(%step, "step has an empty command");
        sink.line(&format!("jobz: cannot start the {step} step: empty command")).await;
        return StepEnd::NoStatus;
    };
    if let Some(cwd) = &spec.cwd {
        // Checked here rather than left to the spawn, whose error would name
        // the program although the directory is at fault.
        if let Err(error) = check_cwd(cwd) {
            tracing::warn!(%step, cwd = %cwd.display(), %error, "cannot use working directory");
            sink.line(&format!("jobz: cannot use cwd {cwd:?}: {error}")).await;
            return StepEnd::NoStatus;
        }
    }
    let (output, reader) = match output_pipe() {
        Ok(pipe) => pipe,
        Err(error) => {
            tracing::error!(%step, %error, "cannot create output pipe");
            sink.line(&format!("jobz: cannot create the output pipe for the {step} step: {error}")).await;
            return StepEnd::NoStatus;
        }
    };
    let Some(stdin) = dev_null() else {
        tracing::error!(%step, "cannot open /dev/null");
        sink.line(&format!("jobz: cannot start the {step} step: cannot open /dev/null")).await;
        return StepEnd::NoStatus;
    };
    let spawned = spawn::spawn(&Launch {
        program,
        args,
        env: &spec.env,
        cwd: spec.cwd.as_deref(),
        stdin,
        output: output.as_fd(),
    });
    // The child has its own copy of the pipe's write end; closing ours lets the
    // read end see EOF once the step's processes are gone.
    drop(output);
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => return cannot_start(step, program, &error, sink).await,
    };
    let Some(group) = ProcessGroup::of_leader(child.id()) else {
        // A freshly spawned, unwaited child always has a pid > 1; this is a
        // bug, reported instead of signalling a wrong group.
        tracing::error!(%step, pid = ?child.id(), "spawned step has no usable process group id");
        if let Err(error) = child.start_kill() {
            tracing::error!(%step, %error, "cannot kill step");
        }
        sink.line(&format!("jobz: internal error: the {step} step has no usable process group")).await;
        return StepEnd::NoStatus;
    };
    tracing::debug!(%step, program, pgid = group.id(), "step started");

    let guard = KillOnDrop::arm(group);
    let (drain_deadline, drain_deadline_receiver) = oneshot::channel();
    // One task, two futures: a receiver that is slow to take output (or a
    // full log disk) can delay the copy, but never the timeout or the cancel.
    let (end, ()) = tokio::join!(
        supervise(&mut child, group, limits, drain_deadline),
        copy_output(reader, sink, drain_deadline_receiver),
    );
    guard.disarm();
    if let Some(error) = child.exec_error() {
        return cannot_start(step, program, &error, sink).await;
    }
    tracing::debug!(%step, pgid = group.id(), ?end, "step ended");
    end
}

/// A step whose program could not be started: said in its output, and no status.
async fn cannot_start(step: Step, program: &str, error: &io::Error, sink: &mut Sink) -> StepEnd {
    tracing::warn!(%step, program, %error, "cannot start step");
    sink.line(&format!("jobz: cannot start {program:?}: {error}")).await;
    StepEnd::NoStatus
}

/// Waits for the step's main process, the deadline or the cancel, stops the
/// process group, and then tells the output copy how long it may still read.
async fn supervise(
    child: &mut Process,
    group: ProcessGroup,
    limits: StepLimits<'_>,
    drain_deadline: oneshot::Sender<Instant>,
) -> StepEnd {
    let timed_out = async {
        match limits.deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    let cancelled = async {
        match limits.cancel {
            Some(cancel) => cancel.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let stop_reason = tokio::select! {
        waited = child.wait() => Err(waited),
        () = timed_out => Ok(StopReason::TimedOut),
        () = cancelled => Ok(StopReason::Cancelled),
    };
    let end = match stop_reason {
        Err(Ok(status)) => {
            // The job is over when its main process exits: whatever it left
            // running in its group is stopped too.
            let grace = limits.kill_grace.min(limits::LEFTOVER_KILL_GRACE);
            group::stop(group, None, grace).await;
            StepEnd::Exited(status)
        }
        Err(Err(error)) => {
            tracing::error!(pgid = group.id(), %error, "cannot wait for step; stopping it");
            group::stop(group, Some(child), limits.kill_grace).await;
            StepEnd::NoStatus
        }
        Ok(reason) => {
            tracing::info!(pgid = group.id(), ?reason, "stopping step");
            let status = group::stop(group, Some(child), limits.kill_grace).await;
            StepEnd::Stopped { reason, status }
        }
    };
    // An error means the copy already ended at EOF and needs no deadline.
    let _ = drain_deadline.send(Instant::now() + limits::OUTPUT_DRAIN_TIMEOUT);
    end
}

/// Copies the pipe to the sink until EOF, or until the drain deadline passes
/// (a process that left the process group can hold the pipe open forever).
///
/// The pipe is not watched at first: a step that ends within
/// [`limits::OUTPUT_WATCH_AFTER`] (most do) has its output read once, after its
/// exit, with plain reads. Watching it from the start cost two registrations
/// with the reactor and a second wake-up per step, at the end-of-file that
/// comes just before the exit. Meanwhile the output waits in the pipe's
/// buffer; a step that fills it waits at most that long for the first read.
async fn copy_output(reader: OwnedFd, sink: &mut Sink, mut drain_deadline: oneshot::Receiver<Instant>) {
    // Filled without zeroing first (`read_buf` reads into the spare capacity).
    let mut buffer = Vec::with_capacity(limits::OUTPUT_CHUNK_BYTES);
    // `Some` once the step has ended: the deadline its supervisor sent (or its absence).
    let ended = tokio::select! {
        biased;
        deadline = &mut drain_deadline => Some(deadline),
        () = tokio::time::sleep(limits::OUTPUT_WATCH_AFTER) => None,
    };
    if ended.is_some() {
        match drain_ended_step(&reader, &mut buffer, sink).await {
            Ok(true) => return,
            // Something still holds the pipe open: watched from here on, until the deadline.
            Ok(false) => {}
            Err(error) => return cannot_read(&error, sink).await,
        }
    }
    let mut reader = match pipe::Receiver::from_owned_fd_unchecked(reader) {
        Ok(reader) => reader,
        Err(error) => return cannot_read(&error, sink).await,
    };
    let drain_over = async {
        let deadline = match ended {
            Some(deadline) => deadline,
            None => drain_deadline.await,
        };
        match deadline {
            Ok(deadline) => tokio::time::sleep_until(deadline).await,
            // The supervisor is gone without a deadline: only EOF ends the copy.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::pin!(drain_over);
    let mut held_open = false;
    loop {
        let copied = tokio::select! {
            // Checked first, so that a writer that never pauses cannot keep
            // the copy going past its deadline.
            biased;
            () = &mut drain_over => {
                held_open = true;
                break;
            }
            copied = copy_chunk(&mut reader, &mut buffer, sink) => copied,
        };
        match copied {
            Ok(true) => {}
            Ok(false) => break,
            Err(error) => {
                cannot_read(&error, sink).await;
                break;
            }
        }
    }
    if held_open {
        tracing::warn!(
            timeout = ?limits::OUTPUT_DRAIN_TIMEOUT,
            "output still open after the process group was stopped; a process left the group"
        );
        sink.line("jobz: stopped reading output: a process that left the job's process group holds it open").await;
    }
}

/// The step's output could not be read (or watched): said in its output.
async fn cannot_read(error: &io::Error, sink: &mut Sink) {
    tracing::error!(%error, "cannot read step output");
    sink.line(&format!("jobz: cannot read output: {error}")).await;
}

/// Reads what an ended step left in the pipe, without waiting: true at EOF,
/// false when the pipe is empty but still open (a process outside the group,
/// or a sibling step's child between its clone and its exec, holds it).
async fn drain_ended_step(reader: &OwnedFd, buffer: &mut Vec<u8>, sink: &mut Sink) -> io::Result<bool> {
    loop {
        buffer.clear();
        let spare = buffer.spare_capacity_mut();
        // SAFETY: `read` writes at most `spare.len()` bytes into the spare
        // capacity, which is valid for writes; `reader` is an open descriptor we own.
        let read = unsafe { libc::read(reader.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
        match read {
            0 => return Ok(true),
            n if n > 0 => {
                // SAFETY: `read` initialized the first `n` bytes of the spare capacity.
                unsafe { buffer.set_len(n as usize) };
                sink.write(buffer).await;
            }
            _ => {
                let error = io::Error::last_os_error();
                match error.kind() {
                    io::ErrorKind::WouldBlock => return Ok(false),
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(error),
                }
            }
        }
    }
}

/// Reads one chunk and writes it to the sink; false at EOF.
async fn copy_chunk(reader: &mut pipe::Receiver, buffer: &mut Vec<u8>, sink: &mut Sink) -> io::Result<bool> {
    buffer.clear();
    if reader.read_buf(buffer).await? == 0 {
        return Ok(false);
    }
    sink.write(buffer).await;
    Ok(true)
}

/// One pipe for both stdout and stderr, so the output interleaves as it would
/// on a terminal. Returns the write end (the child's stdout and stderr) and the
/// read end, not yet watched by the reactor. Both ends are close-on-exec, so no other child the worker spawns
/// meanwhile inherits them and holds the pipe open.
fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, which has room for them.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2 and nothing else owns them.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The child writes with ordinary blocking writes; we read without blocking.
    // Made this way instead of with tokio's `pipe()`, which registers both ends
    // with the reactor and then takes the write end out again: three system
    // calls fewer per step.
    // SAFETY: fcntl on a descriptor we own; the read end of a pipe has no other status flags.
    if unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((write, read))
}

/// Standard input for a step: `/dev/null`, opened once per process (opening it
/// for every step is a path lookup per spawn). The child gets a copy of it.
fn dev_null() -> Option<BorrowedFd<'static>> {
    static DEV_NULL: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    DEV_NULL.get_or_init(|| std::fs::File::open("/dev/null").ok()).as_ref().map(|file| file.as_fd())
}

/// Checks that `cwd` is a directory we may enter.
fn check_cwd(cwd: &Path) -> io::Result<()> {
    let metadata = std::fs::metadata(cwd)?;
    if !metadata.is_dir() {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    let path = CString::new(cwd.as_os_str().as_bytes())?;
    // SAFETY: `path` is a valid NUL-terminated string that lives until after
    // the call; `access` only reads it.
    if unsafe { libc::access(path.as_ptr(), libc::X_OK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    async fn sink() -> Sink {
        Sink::open(None, None, 1024).await.expect("a sink without a log file opens")
    }

    #[tokio::test]
    async fn an_ended_step_output_is_read_to_the_end_without_the_reactor() {
        let (write, read) = output_pipe().expect("pipe");
        let mut writer = std::fs::File::from(write);
        writer.write_all(b"first\nsecond\n").expect("write");
        drop(writer);
        let mut sink = sink().await;
        let mut buffer = Vec::with_capacity(limits::OUTPUT_CHUNK_BYTES);
        assert!(drain_ended_step(&read, &mut buffer, &mut sink).await.expect("read"));
        assert_eq!(sink.tail_text(), "first\nsecond\n");
    }

    #[tokio::test]
    async fn a_pipe_still_held_open_is_read_as_far_as_it_goes_and_reported_open() {
        let (write, read) = output_pipe().expect("pipe");
        let mut writer = std::fs::File::from(write);
        writer.write_all(b"so far\n").expect("write");
        let mut sink = sink().await;
        let mut buffer = Vec::with_capacity(limits::OUTPUT_CHUNK_BYTES);
        assert!(!drain_ended_step(&read, &mut buffer, &mut sink).await.expect("read"));
        assert_eq!(sink.tail_text(), "so far\n");
        // What comes later is read by the watched copy, which ends at EOF.
        writer.write_all(b"later\n").expect("write");
        drop(writer);
        let (deadline, deadline_receiver) = oneshot::channel();
        deadline.send(Instant::now() + Duration::from_secs(5)).expect("send");
        tokio::time::timeout(Duration::from_secs(5), copy_output(read, &mut sink, deadline_receiver))
            .await
            .expect("the copy ends at EOF");
        assert_eq!(sink.tail_text(), "so far\nlater\n");
    }

    #[tokio::test]
    async fn output_of_a_step_that_runs_on_is_streamed_before_it_ends() {
        let (write, read) = output_pipe().expect("pipe");
        let mut writer = std::fs::File::from(write);
        let (_deadline, deadline_receiver) = oneshot::channel::<Instant>();
        let (sender, mut receiver) = tokio::sync::mpsc::channel(4);
        let mut sink = Sink::open(None, Some(sender), 1024).await.expect("sink");
        let copy = tokio::spawn(async move { copy_output(read, &mut sink, deadline_receiver).await });
        writer.write_all(b"while running\n").expect("write");
        let chunk = tokio::time::timeout(Duration::from_secs(5), receiver.recv())
            .await
            .expect("streamed while the step runs")
            .expect("a chunk");
        assert_eq!(chunk, b"while running\n");
        drop(writer);
        tokio::time::timeout(Duration::from_secs(5), copy).await.expect("ends at EOF").expect("copy task");
    }
}
