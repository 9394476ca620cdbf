//! Signalling the process group of a step.
//!
//! Every step runs as the leader of its own process group, so the runner can
//! reach everything the step started (background jobs, pipelines, subshells)
//! with one `kill(-pgid, ...)`. Processes that leave the group on purpose
//! (`setsid`, double-forking daemons) are out of reach; only a cgroup could
//! follow them.

use std::io;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::time::Instant;

use super::spawn::Process;
use crate::limits;

/// The process group of one step, named by its leader's pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcessGroup {
    id: libc::pid_t,
}

/// Whether a signal found anybody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presence {
    /// At least one process of the group exists (possibly as a zombie).
    Alive,
    /// The group is empty (`ESRCH`).
    Gone,
}

impl ProcessGroup {
    /// The group of a child spawned with `process_group(0)`, whose group id
    /// is its pid. Refuses ids that `kill` would read as something wider than
    /// one group: 0 (our own group) and 1 (with the minus sign, every process
    /// we may signal).
    pub(crate) fn of_leader(pid: u32) -> Option<ProcessGroup> {
        let id = libc::pid_t::try_from(pid).ok()?;
        (id > 1).then_some(ProcessGroup { id })
    }

    pub(crate) fn id(self) -> libc::pid_t {
        self.id
    }

    /// Sends `signal` to every process of the group; signal 0 only checks
    /// whether the group still has members.
    pub(crate) fn signal(self, signal: libc::c_int) -> io::Result<Presence> {
        debug_assert!(self.id > 1);
        // SAFETY: `kill` takes plain integers and touches no memory of ours.
        // `self.id > 1` (checked in `of_leader`), so `-self.id` names exactly
        // this one process group, never our own group (0) or every process (-1).
        let result = unsafe { libc::kill(-self.id, signal) };
        if result == 0 {
            return Ok(Presence::Alive);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ESRCH) {
            Ok(Presence::Gone)
        } else {
            Err(error)
        }
    }

    /// Like [`ProcessGroup::signal`], but a failure is logged and read as
    /// "still there": the runner goes on to the next escalation step either way.
    fn signal_logged(self, signal: libc::c_int) -> Presence {
        match self.signal(signal) {
            Ok(presence) => presence,
            Err(error) => {
                // EPERM: a member changed its user id (a setuid program).
                tracing::warn!(pgid = self.id, signal, %error, "cannot signal process group");
                Presence::Alive
            }
        }
    }

    /// Polls until the group is empty or `deadline` passes; true if it is empty.
    async fn wait_empty(self, deadline: Instant) -> bool {
        loop {
            if self.signal_logged(0) == Presence::Gone {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep(limits::GROUP_POLL_INTERVAL.min(deadline - now)).await;
        }
    }
}

/// Stops a process group: SIGTERM to the group, up to `grace` for the leader
/// (if it has not been reaped yet) and then the rest of the group to exit,
/// then SIGKILL to whatever is left.
///
/// Returns the leader's exit status if the leader was given and could be
/// reaped. A zombie left in the group (an orphan whose new parent has not
/// reaped it yet) keeps the group non-empty until the grace is over; that
/// costs time, never correctness, because SIGKILL to a zombie is harmless.
pub(crate) async fn stop(group: ProcessGroup, mut leader: Option<&mut Process>, grace: Duration) -> Option<ExitStatus> {
    let deadline = deadline_after(grace);
    let mut status = None;
    if group.signal_logged(libc::SIGTERM) == Presence::Gone && leader.is_none() {
        return None;
    }
    if let Some(child) = leader.as_deref_mut() {
        tokio::select! {
            waited = child.wait() => status = reaped(group, waited),
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
    let leader_done = leader.is_none() || status.is_some();
    let empty = leader_done && group.wait_empty(deadline).await;
    // Between the last check and this SIGKILL the group could empty and, in
    // theory, its id be reused by a new group; the window is one poll
    // interval, and a leader still unreaped keeps the id reserved.
    if !empty {
        tracing::debug!(pgid = group.id, "process group outlived its grace; sending SIGKILL");
        group.signal_logged(libc::SIGKILL);
    }
    if let (Some(child), None) = (leader, status) {
        match tokio::time::timeout(limits::REAP_AFTER_KILL_TIMEOUT, child.wait()).await {
            Ok(waited) => status = reaped(group, waited),
            Err(_elapsed) => tracing::error!(
                pgid = group.id,
                timeout = ?limits::REAP_AFTER_KILL_TIMEOUT,
                "process did not exit after SIGKILL; giving up on its exit status"
            ),
        }
    }
    status
}

/// `now + duration`, or a deadline decades away if that does not fit in an
/// `Instant` (a configured grace of `Duration::MAX` must not panic).
fn deadline_after(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration).or_else(|| now.checked_add(Duration::from_secs(30 * 365 * 24 * 60 * 60))).unwrap_or(now)
}

fn reaped(group: ProcessGroup, waited: io::Result<ExitStatus>) -> Option<ExitStatus> {
    match waited {
        Ok(status) => Some(status),
        Err(error) => {
            tracing::error!(pgid = group.id, %error, "cannot wait for process");
            None
        }
    }
}

/// Kills a process group with SIGKILL when dropped while armed, so that a
/// runner future dropped half-way (its task aborted) leaves no processes
/// behind. Disarmed once the runner has stopped the group itself: after that
/// the group id may be reused by an unrelated process group.
#[derive(Debug)]
pub(crate) struct KillOnDrop {
    group: Option<ProcessGroup>,
}

impl KillOnDrop {
    pub(crate) fn arm(group: ProcessGroup) -> KillOnDrop {
        KillOnDrop { group: Some(group) }
    }

    pub(crate) fn disarm(mut self) {
        self.group = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            tracing::warn!(pgid = group.id, "job runner dropped mid-step; killing its process group");
            group.signal_logged(libc::SIGKILL);
        }
    }
}
