//! Starting a step's process, and waiting for it.
//!
//! On Linux (x86_64 and aarch64) a step's process is made by [`clone`]: a
//! child that shares our memory until it calls `execve`, like `posix_spawn`'s,
//! but without `CLONE_VFORK`. `posix_spawn` suspends the calling thread until
//! the child has executed the program (70–110 µs here), and the caller is the
//! worker's runtime thread, which in `jobz up` is also the broker's: every
//! spawn stopped everything else in the process. With this spawn the thread
//! returns as soon as the child exists, and the child's set-up and `execve`
//! run beside it, on the other core. The child gets its exit reported through
//! a pidfd in tokio's epoll.
//!
//! Anywhere else, or if the kernel refuses that kind of `clone` (no pidfds, a
//! seccomp filter), steps are started by tokio's process support, which uses
//! `posix_spawn`. Both give the step the same things: a process group of its
//! own, stdin from `/dev/null`, stdout and stderr into the given pipe, signal
//! dispositions reset (SIGPIPE to its default, as Rust's `Command` does), an
//! empty signal mask, and `PATH` looked up as `execvp` does.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

#[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
mod clone;

/// What to start.
pub(crate) struct Launch<'a> {
    /// Run directly; looked up in `PATH` when it has no `/`.
    pub(crate) program: &'a str,
    pub(crate) args: &'a [String],
    /// Added to (or replacing in) the environment the worker was started with.
    pub(crate) env: &'a [(String, String)],
    pub(crate) cwd: Option<&'a Path>,
    pub(crate) stdin: BorrowedFd<'a>,
    /// The write end of the output pipe: the child's stdout and stderr.
    pub(crate) output: BorrowedFd<'a>,
}

/// A started step process.
pub(crate) struct Process {
    pid: u32,
    kind: Kind,
}

enum Kind {
    #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
    Cloned(clone::Child),
    Posix(tokio::process::Child),
}

/// Starts `launch`. An error means no process was started. With the clone
/// spawn, a program that cannot be executed (not found, not executable) is
/// only known once the child has exited: see [`Process::exec_error`].
pub(crate) fn spawn(launch: &Launch<'_>) -> io::Result<Process> {
    #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
    if clone::usable() {
        match clone::spawn(launch) {
            Ok(child) => return Ok(Process { pid: child.pid(), kind: Kind::Cloned(child) }),
            Err(clone::SpawnError::Failed(error)) => return Err(error),
            Err(clone::SpawnError::Refused(error)) => {
                clone::give_up();
                tracing::warn!(%error, "the kernel refused clone with a pidfd; starting steps with posix_spawn from now on");
            }
        }
    }
    spawn_posix(launch)
}

/// The portable spawn: tokio's process support (`posix_spawn` where it can).
fn spawn_posix(launch: &Launch<'_>) -> io::Result<Process> {
    let mut command = tokio::process::Command::new(launch.program);
    command
        .args(launch.args)
        .envs(launch.env.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::from(launch.stdin.try_clone_to_owned()?))
        .stdout(Stdio::from(launch.output.try_clone_to_owned()?))
        .stderr(Stdio::from(launch.output.try_clone_to_owned()?))
        .process_group(0);
    if let Some(cwd) = launch.cwd {
        command.current_dir(cwd);
    }
    let child = command.spawn()?;
    // A child that was just spawned and not yet waited for always has its pid.
    let pid = child.id().ok_or_else(|| io::Error::other("the spawned step has no pid"))?;
    Ok(Process { pid, kind: Kind::Posix(child) })
}

impl Process {
    pub(crate) fn id(&self) -> u32 {
        self.pid
    }

    /// Waits for the process to exit and reaps it. Cancel-safe; once it has
    /// returned a status, it returns the same status again.
    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        match &mut self.kind {
            #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
            Kind::Cloned(child) => child.wait().await,
            Kind::Posix(child) => child.wait().await,
        }
    }

    /// Sends SIGKILL to the process (not its group), unless it was reaped.
    pub(crate) fn start_kill(&mut self) -> io::Result<()> {
        match &mut self.kind {
            #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
            Kind::Cloned(child) => child.kill(),
            Kind::Posix(child) => child.start_kill(),
        }
    }

    /// Why the program could not be started, once [`Process::wait`] has
    /// returned: the error of `execve` (or of the set-up before it) in the
    /// child, which then exited with status 127. Always `None` for the
    /// portable spawn, whose [`spawn`] returns such errors itself.
    pub(crate) fn exec_error(&self) -> Option<io::Error> {
        match &self.kind {
            #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
            Kind::Cloned(child) => child.exec_error(),
            Kind::Posix(_) => None,
        }
    }
}

/// Where `execvp` would look for `program`, in order: the program itself when
/// it names a path (has a `/`) or is empty (not found, as with `execvp`), else each directory of `path` (`PATH`; an
/// empty entry is the working directory; glibc's default when unset).
fn candidates(program: &str, path: Option<&OsStr>) -> Vec<OsString> {
    if program.is_empty() || program.contains('/') {
        return vec![OsString::from(program)];
    }
    let path = path.unwrap_or(OsStr::new("/bin:/usr/bin"));
    path.as_bytes()
        .split(|&b| b == b':')
        .map(|dir| {
            let mut candidate = OsString::from(OsStr::from_bytes(dir));
            if !dir.is_empty() && !dir.ends_with(b"/") {
                candidate.push("/");
            }
            candidate.push(program);
            candidate
        })
        .collect()
}

/// The raw file descriptor, for the child's `dup3`.
fn raw(fd: BorrowedFd<'_>) -> i32 {
    fd.as_raw_fd()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use tokio::io::AsyncReadExt;

    #[test]
    fn a_program_with_a_slash_is_used_as_it_is() {
        assert_eq!(candidates("./run.sh", Some(OsStr::new("/bin"))), vec![OsString::from("./run.sh")]);
        assert_eq!(candidates("/bin/true", None), vec![OsString::from("/bin/true")]);
        assert_eq!(candidates("", Some(OsStr::new("/bin"))), vec![OsString::new()]);
    }

    #[test]
    fn a_bare_name_is_looked_up_in_each_path_entry_in_order() {
        assert_eq!(
            candidates("true", Some(OsStr::new("/usr/local/bin:/bin/::/opt"))),
            ["/usr/local/bin/true", "/bin/true", "true", "/opt/true"].map(OsString::from).to_vec()
        );
    }

    #[test]
    fn without_path_the_default_of_execvp_is_searched() {
        assert_eq!(candidates("sh", None), ["/bin/sh", "/usr/bin/sh"].map(OsString::from).to_vec());
    }

    /// Both spawns, so that each case checks the fallback too.
    #[derive(Debug, Clone, Copy)]
    enum Way {
        Native,
        Posix,
    }

    fn ways() -> Vec<Way> {
        #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
        assert!(clone::usable(), "this machine's kernel should allow the clone spawn (pidfds, Linux 5.3)");
        vec![Way::Native, Way::Posix]
    }

    /// How a process started one way ended: its status, output, and the error
    /// that kept it from starting (returned by the spawn or found after it).
    struct Ran {
        status: Option<ExitStatus>,
        output: String,
        error: Option<io::Error>,
        pid: u32,
    }

    async fn run(way: Way, argv: &[&str], env: &[(&str, &str)], cwd: Option<&Path>) -> Ran {
        let (sender, mut receiver) = tokio::net::unix::pipe::pipe().expect("pipe");
        let output = sender.into_blocking_fd().expect("blocking write end");
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let args: Vec<String> = argv[1..].iter().map(|a| a.to_string()).collect();
        let env: Vec<(String, String)> = env.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        let launch =
            Launch { program: argv[0], args: &args, env: &env, cwd, stdin: null.as_fd(), output: output.as_fd() };
        let spawned = match way {
            #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
            Way::Native => match clone::spawn(&launch) {
                Ok(child) => Ok(Process { pid: child.pid(), kind: Kind::Cloned(child) }),
                Err(clone::SpawnError::Failed(e) | clone::SpawnError::Refused(e)) => Err(e),
            },
            _ => spawn_posix(&launch),
        };
        drop(output);
        let mut process = match spawned {
            Ok(process) => process,
            Err(error) => return Ran { status: None, output: String::new(), error: Some(error), pid: 0 },
        };
        let mut text = Vec::new();
        let deadline = std::time::Duration::from_secs(10);
        tokio::time::timeout(deadline, receiver.read_to_end(&mut text))
            .await
            .expect("output within 10 s")
            .expect("read");
        let status = tokio::time::timeout(deadline, process.wait()).await.expect("exit within 10 s").expect("wait");
        Ran {
            status: Some(status),
            output: String::from_utf8_lossy(&text).into_owned(),
            error: process.exec_error(),
            pid: process.id(),
        }
    }

    #[tokio::test]
    async fn the_status_and_the_output_of_both_streams_come_back() {
        for way in ways() {
            let ran = run(way, &["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], &[], None).await;
            assert_eq!(ran.status.and_then(|s| s.code()), Some(3), "{way:?}");
            assert_eq!(ran.output, "out\nerr\n", "{way:?}");
            assert!(ran.error.is_none(), "{way:?}");
        }
    }

    #[tokio::test]
    async fn a_death_by_signal_is_reported_as_such() {
        use std::os::unix::process::ExitStatusExt;
        for way in ways() {
            let ran = run(way, &["/bin/sh", "-c", "kill -TERM $$"], &[], None).await;
            assert_eq!(ran.status.and_then(|s| s.signal()), Some(libc::SIGTERM), "{way:?}");
        }
    }

    #[tokio::test]
    async fn the_environment_is_inherited_with_the_step_variables_on_top() {
        for way in ways() {
            let home = std::env::var("HOME").unwrap_or_default();
            let ran = run(
                way,
                &["/bin/sh", "-c", "echo \"$JOBZ_X|$HOME|$JOBZ_Y\""],
                &[("JOBZ_X", "1"), ("JOBZ_Y", "a b"), ("JOBZ_X", "2")],
                None,
            )
            .await;
            assert_eq!(ran.output, format!("2|{home}|a b\n"), "{way:?}");
            let replaced = run(way, &["/bin/sh", "-c", "echo \"$HOME\""], &[("HOME", "/elsewhere")], None).await;
            assert_eq!(replaced.output, "/elsewhere\n", "{way:?}");
        }
    }

    #[tokio::test]
    async fn a_bare_name_is_found_in_the_path_the_step_sets() {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = dir.path().join("jobz-spawn-test-tool");
        // Written by a child process: a descriptor open for writing it in this
        // process (tests run on many threads) can be copied into a child that
        // another test is starting, and until that child's `execve` closes it,
        // running the script fails with ETXTBSY.
        let written = std::process::Command::new("/bin/sh")
            .args(["-c", "printf '#!/bin/sh\\necho found \"$@\"\\n' > \"$1\" && chmod 755 \"$1\"", "sh"])
            .arg(&script)
            .status()
            .expect("run sh");
        assert!(written.success(), "writing the script failed: {written}");
        let unreadable = dir.path().join("not-executable");
        std::fs::write(&unreadable, "#!/bin/sh\n").expect("write");
        let path = format!("/nonexistent-dir:{}:/bin:/usr/bin", dir.path().display());
        for way in ways() {
            let ran = run(way, &["jobz-spawn-test-tool", "x"], &[("PATH", &path)], None).await;
            assert_eq!(ran.output, "found x\n", "{way:?}");
            for name in ["jobz-spawn-test-no-such-tool", ""] {
                let missing = run(way, &[name], &[("PATH", &path)], None).await;
                let error = missing.error.expect("a missing program is an error");
                assert_eq!(error.kind(), io::ErrorKind::NotFound, "{way:?} {name:?}: {error}");
            }
            let refused = run(way, &[unreadable.to_str().expect("utf-8")], &[], None).await;
            let error = refused.error.expect("a file that is not executable is an error");
            assert_eq!(error.raw_os_error(), Some(libc::EACCES), "{way:?}: {error}");
        }
    }

    #[tokio::test]
    async fn the_working_directory_is_set() {
        let dir = tempfile::tempdir().expect("temp dir");
        let canonical = dir.path().canonicalize().expect("canonical");
        for way in ways() {
            let ran = run(way, &["/bin/pwd", "-P"], &[], Some(dir.path())).await;
            assert_eq!(ran.output.trim_end(), canonical.to_str().expect("utf-8"), "{way:?}");
        }
    }

    #[tokio::test]
    async fn the_process_leads_a_group_of_its_own_with_stdin_from_dev_null() {
        for way in ways() {
            let ran =
                run(way, &["/bin/sh", "-c", "cut -d' ' -f5 /proc/$$/stat; cat; readlink /proc/$$/fd/0"], &[], None)
                    .await;
            assert_eq!(ran.output, format!("{}\n/dev/null\n", ran.pid), "{way:?}");
        }
    }

    #[tokio::test]
    async fn no_signal_is_blocked_and_sigpipe_is_back_to_its_default() {
        for way in ways() {
            let ran = run(way, &["/bin/grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"], &[], None).await;
            let field = |name: &str| {
                ran.output
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                    .unwrap_or_else(|| panic!("{way:?}: no {name} in {:?}", ran.output))
            };
            assert_eq!(field("SigBlk:"), 0, "{way:?}");
            assert_eq!(field("SigIgn:") & (1 << (libc::SIGPIPE - 1)), 0, "{way:?}: SIGPIPE still ignored");
        }
    }

    #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
    #[tokio::test]
    async fn children_dropped_before_they_end_are_reaped_at_a_later_spawn() {
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let launch = |program: &'static str, args: &'static [String]| Launch {
            program,
            args,
            env: &[],
            cwd: None,
            stdin: null.as_fd(),
            output: null.as_fd(),
        };
        let mut dropped = Vec::new();
        for _ in 0..20 {
            let Ok(child) = clone::spawn(&launch("/bin/true", &[])) else { panic!("spawn") };
            dropped.push(child.pid());
        }
        let gone = |pid: &u32| !Path::new(&format!("/proc/{pid}")).exists();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !dropped.iter().all(gone) {
            assert!(std::time::Instant::now() < deadline, "orphans not reaped: {dropped:?}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            // Each spawn reaps the orphans that have ended.
            let Ok(mut child) = clone::spawn(&launch("/bin/true", &[])) else { panic!("spawn") };
            child.wait().await.expect("wait");
        }
    }
}
