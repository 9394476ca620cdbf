//! The Linux spawn: `clone(CLONE_VM | CLONE_PIDFD | CLONE_CHILD_CLEARTID)`
//! on a stack of our own, without `CLONE_VFORK`.
//!
//! The child shares our memory until `execve` replaces it, while our threads
//! go on. So the child runs only [`child_main`]: raw system calls (no libc
//! wrapper, which could write the calling thread's `errno`), on its own stack,
//! reading a [`Shared`] block prepared before the `clone` and never changed
//! after it. All signals are blocked around the `clone`, so no handler of ours
//! can run in the child; the child resets every handled signal to its default
//! before it unblocks them.
//!
//! The block and the stack must live until the child no longer uses them. The
//! kernel says when: it zeroes [`Shared::in_use`] (`CLONE_CHILD_CLEARTID`) as
//! the child's hold on our memory ends, at `execve` or at exit. A [`Child`]
//! dropped before that leaks them rather than free memory the child may read.
//! A child dropped before it was reaped is reaped later ([`reap_orphans`]).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::raw::{c_char, c_int, c_void};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::{candidates, raw, Launch};

/// Why a spawn did not happen.
pub(crate) enum SpawnError {
    /// The kernel does not allow this kind of `clone` here; the caller falls back to `posix_spawn`.
    Refused(io::Error),
    /// Anything else (no memory, too many processes, a NUL in an argument).
    Failed(io::Error),
}

static REFUSED: AtomicBool = AtomicBool::new(false);

/// Whether this spawn can be used: the kernel has pidfds (`pidfd_open`, Linux
/// 5.3; `CLONE_PIDFD` is 5.2, and an older kernel would ignore the flag
/// rather than refuse it), and no `clone` was refused yet.
pub(crate) fn usable() -> bool {
    static PIDFDS: OnceLock<bool> = OnceLock::new();
    !REFUSED.load(Ordering::Relaxed)
        && *PIDFDS.get_or_init(|| {
            // SAFETY: pidfd_open takes two integers; a returned descriptor is ours and closed at once.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
            if fd < 0 {
                return false;
            }
            // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
            drop(unsafe { OwnedFd::from_raw_fd(fd as c_int) });
            true
        })
}

/// Stops using this spawn for the rest of the process.
pub(crate) fn give_up() {
    REFUSED.store(true, Ordering::Relaxed);
}

/// A child started by [`spawn`].
pub(crate) struct Child {
    pid: u32,
    pidfd: Option<AsyncFd<OwnedFd>>,
    /// `None` only once given up in `drop`.
    launch: Option<(Box<Shared>, Stack)>,
    status: Option<ExitStatus>,
}

/// What the child reads, prepared before the `clone` and not changed after it.
struct Shared {
    /// Non-zero until the kernel zeroes it (`CLONE_CHILD_CLEARTID`) when the
    /// child execs or exits, after which the child no longer touches this block.
    in_use: AtomicU32,
    /// The errno of what failed in the child (set-up or `execve`), 0 if nothing did.
    error: AtomicI32,
    /// Paths to try `execve` on, in order (owned here); and pointers to them.
    _candidates: Vec<CString>,
    candidate_ptrs: Vec<*const c_char>,
    /// argv and envp, NULL-terminated; the strings they point to are `owned` or
    /// the process's environment, [`base_env`] (static).
    argv: Vec<*const c_char>,
    envp: Vec<*const c_char>,
    _owned: Vec<CString>,
    cwd: Option<CString>,
    stdin: c_int,
    output: c_int,
}

// SAFETY: the raw pointers point into `owned`, `candidates` (both owned by the
// block, whose heap buffers do not move when it moves) or the static
// environment snapshot; nothing is shared with another thread through them.
unsafe impl Send for Shared {}
// SAFETY: as for Send; after construction the pointers are only read.
unsafe impl Sync for Shared {}

impl Shared {
    fn new(launch: &Launch<'_>) -> io::Result<Shared> {
        let nul = |_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte found in provided data");
        let mut owned = Vec::with_capacity(1 + launch.args.len() + launch.env.len());
        owned.push(CString::new(launch.program).map_err(nul)?);
        for arg in launch.args {
            owned.push(CString::new(arg.as_str()).map_err(nul)?);
        }
        let argc = owned.len();
        // The variables we set, later ones winning, then the inherited ones we do not.
        let mut ours: Vec<&(String, String)> = Vec::with_capacity(launch.env.len());
        for entry in launch.env.iter().rev() {
            if !ours.iter().any(|seen| seen.0 == entry.0) {
                ours.push(entry);
            }
        }
        for (name, value) in ours.iter().rev() {
            owned.push(CString::new(format!("{name}={value}")).map_err(nul)?);
        }
        let base = base_env();
        let inherited =
            base.iter().filter(|(name, _)| !ours.iter().any(|(ours, _)| ours.as_bytes() == name.as_slice()));
        let path = ours
            .iter()
            .find(|(name, _)| name == "PATH")
            .map(|(_, value)| OsStr::new(value.as_str()))
            .or_else(|| base.iter().find(|(name, _)| name == b"PATH").map(|(_, entry)| path_value(entry)));
        let candidates = candidates(launch.program, path)
            .into_iter()
            .map(|c| CString::new(c.into_vec()).map_err(nul))
            .collect::<io::Result<Vec<_>>>()?;
        let candidate_ptrs = candidates.iter().map(|c| c.as_ptr()).collect();
        let argv = owned[..argc].iter().map(|c| c.as_ptr()).chain([std::ptr::null()]).collect();
        let envp = owned[argc..]
            .iter()
            .map(|c| c.as_ptr())
            .chain(inherited.map(|(_, entry)| entry.as_ptr()))
            .chain([std::ptr::null()])
            .collect();
        let cwd = launch.cwd.map(|cwd| CString::new(cwd.as_os_str().as_bytes()).map_err(nul)).transpose()?;
        Ok(Shared {
            in_use: AtomicU32::new(u32::MAX),
            error: AtomicI32::new(0),
            _candidates: candidates,
            candidate_ptrs,
            argv,
            envp,
            _owned: owned,
            cwd,
            stdin: raw(launch.stdin),
            output: raw(launch.output),
        })
    }
}

/// The value part of a `NAME=value` entry.
fn path_value(entry: &CString) -> &OsStr {
    let bytes = entry.as_bytes();
    let value = bytes.iter().position(|&b| b == b'=').map_or(&bytes[..0], |at| &bytes[at + 1..]);
    OsStr::from_bytes(value)
}

/// The environment this process was started with, as `NAME=value` strings by
/// name, read once: building it anew for every step cost more than the rest of
/// the spawn's preparation. jobz never changes its own environment.
fn base_env() -> &'static [(Vec<u8>, CString)] {
    static BASE: OnceLock<Vec<(Vec<u8>, CString)>> = OnceLock::new();
    BASE.get_or_init(|| {
        std::env::vars_os()
            .filter_map(|(name, value)| {
                let mut entry = name.as_bytes().to_vec();
                entry.push(b'=');
                entry.extend_from_slice(value.as_bytes());
                // A variable with a NUL cannot be passed on; execve would cut it short.
                CString::new(entry).ok().map(|entry| (name.into_vec(), entry))
            })
            .collect()
    })
}

/// Starts the child described by `launch`.
pub(crate) fn spawn(launch: &Launch<'_>) -> Result<Child, SpawnError> {
    reap_orphans();
    let shared = Box::new(Shared::new(launch).map_err(SpawnError::Failed)?);
    let stack = Stack::take().map_err(SpawnError::Failed)?;
    let mut pidfd: c_int = -1;
    let arg = std::ptr::from_ref::<Shared>(&shared).cast_mut().cast::<c_void>();
    let flags = libc::CLONE_VM | libc::CLONE_PIDFD | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD;
    // SAFETY: sigset_t is plain data; sigfillset initializes it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: pthread_sigmask reads `all` and writes `old`, both valid; the
    // old mask is put back right after the clone.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: `child_main` runs on `stack` (ours, unused by anyone else, its
    // top 16-byte aligned) and only reads `shared`, which outlives its use of
    // it (see the module's documentation); the child starts with every signal
    // blocked. The kernel writes the pidfd to `pidfd` and zeroes
    // `shared.in_use` when the child execs or exits; both stay valid.
    let pid = unsafe {
        libc::clone(
            child_main,
            stack.top(),
            flags,
            arg,
            &mut pidfd as *mut c_int,
            std::ptr::null_mut::<c_void>(),
            shared.in_use.as_ptr(),
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: puts back the mask read above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    if pid <= 0 {
        stack.give_back();
        return Err(match clone_error.raw_os_error() {
            Some(libc::EINVAL | libc::ENOSYS | libc::EPERM) => SpawnError::Refused(clone_error),
            _ => SpawnError::Failed(clone_error),
        });
    }
    // The child puts itself in a group of its own; so do we, so that the group
    // exists when we return even if the child has not got that far yet (the
    // shell's way). After the child's execve this fails with EACCES, harmlessly.
    // SAFETY: setpgid takes integers.
    unsafe {
        libc::setpgid(pid, pid);
    }
    // SAFETY: with CLONE_PIDFD a successful clone wrote a new descriptor that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    let pid = pid as u32;
    // SAFETY: an OwnedFd stays open, and is the same descriptor, for as long as the AsyncFd owns it.
    match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
        Ok(pidfd) => Ok(Child { pid, pidfd: Some(pidfd), launch: Some((shared, stack)), status: None }),
        Err(failed) => {
            let (pidfd, error) = failed.into_parts();
            // The child runs but could not be watched: stop it, and let the orphan reaper have it.
            signal(&pidfd, libc::SIGKILL);
            drop(Child { pid, pidfd: None, launch: Some((shared, stack)), status: None });
            adopt_orphan(pidfd);
            Err(SpawnError::Failed(error))
        }
    }
}

impl Child {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let Some(pidfd) = &self.pidfd else {
            return Err(io::Error::other("the step's process is not watched"));
        };
        loop {
            let mut ready = pidfd.readable().await?;
            if let Some(status) = reap(pidfd.get_ref())? {
                self.status = Some(status);
                return Ok(status);
            }
            ready.clear_ready();
        }
    }

    pub(crate) fn kill(&mut self) -> io::Result<()> {
        match (&self.pidfd, self.status) {
            (Some(pidfd), None) => {
                if signal(pidfd.get_ref(), libc::SIGKILL) {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn exec_error(&self) -> Option<io::Error> {
        self.status?;
        let (shared, _) = self.launch.as_ref()?;
        match shared.error.load(Ordering::Acquire) {
            0 => None,
            errno => Some(io::Error::from_raw_os_error(errno)),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_none() {
            if let Some(pidfd) = self.pidfd.take() {
                let pidfd = pidfd.into_inner();
                if !matches!(reap(&pidfd), Ok(Some(_))) {
                    adopt_orphan(pidfd);
                }
            }
        }
        if let Some((shared, stack)) = self.launch.take() {
            if shared.in_use.load(Ordering::Acquire) == 0 {
                stack.give_back();
            } else {
                // The child may still read the block or run on the stack: a few
                // KiB lost, once in a great while, instead of memory corrupted.
                tracing::debug!(pid = self.pid, "step process dropped before its execve; keeping its launch memory");
                std::mem::forget(shared);
                std::mem::forget(stack);
            }
        }
    }
}

/// Reaps the process of `pidfd` if it has exited; `None` if it still runs.
fn reap(pidfd: &OwnedFd) -> io::Result<Option<ExitStatus>> {
    // SAFETY: siginfo_t is plain data, filled in by waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid writes only `info`; the pidfd is ours and open.
    let result = unsafe {
        libc::waitid(libc::P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG)
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after a successful waitid, si_pid and si_status are set (si_pid 0: nothing to reap yet).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => ExitStatus::from_raw((status & 0xff) << 8),
        libc::CLD_DUMPED => ExitStatus::from_raw((status & 0x7f) | 0x80),
        _ => ExitStatus::from_raw(status & 0x7f),
    }))
}

/// Sends `signal` through the pidfd (no pid reuse possible); true if it was sent.
fn signal(pidfd: &OwnedFd, signal: c_int) -> bool {
    // SAFETY: pidfd_send_signal takes integers and a null siginfo.
    let result = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0)
    };
    result == 0
}

/// Children dropped before they exited, reaped as they end.
static ORPHANS: Mutex<Vec<OwnedFd>> = Mutex::new(Vec::new());

fn adopt_orphan(pidfd: OwnedFd) {
    if let Ok(mut orphans) = ORPHANS.lock() {
        orphans.push(pidfd);
    }
}

/// Reaps the orphans that have exited (called before each spawn).
fn reap_orphans() {
    let Ok(mut orphans) = ORPHANS.try_lock() else { return };
    if !orphans.is_empty() {
        // Kept while it runs; dropped once reaped or if it cannot be waited for.
        orphans.retain(|pidfd| matches!(reap(pidfd), Ok(None)));
    }
}

/// A child's stack: mapped once and reused, with a guard page below it.
struct Stack {
    base: *mut c_void,
}

// SAFETY: the mapping is owned by the Stack alone; moving it between threads moves that ownership.
unsafe impl Send for Stack {}

const STACK_BYTES: usize = 64 * 1024;
const GUARD_BYTES: usize = 4096;
/// Stacks kept for reuse: more than the slots of any ordinary worker.
const STACKS_KEPT: usize = 64;

static STACKS: Mutex<Vec<Stack>> = Mutex::new(Vec::new());

impl Stack {
    fn take() -> io::Result<Stack> {
        if let Some(stack) = STACKS.lock().ok().and_then(|mut stacks| stacks.pop()) {
            return Ok(stack);
        }
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                GUARD_BYTES + STACK_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Stack { base };
        // SAFETY: the first page of the mapping made above.
        if unsafe { libc::mprotect(base, GUARD_BYTES, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The initial stack pointer: the end of the mapping (page-aligned, so 16-byte aligned).
    fn top(&self) -> *mut c_void {
        self.base.wrapping_byte_add(GUARD_BYTES + STACK_BYTES)
    }

    fn give_back(self) {
        if let Ok(mut stacks) = STACKS.lock() {
            if stacks.len() < STACKS_KEPT {
                stacks.push(self);
            }
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `take`, no longer used by any child (a
        // stack a child may still use is forgotten, never dropped).
        unsafe {
            libc::munmap(self.base, GUARD_BYTES + STACK_BYTES);
        }
    }
}

/// The child, between `clone` and `execve`. It shares our memory and runs
/// beside our threads, so it must not allocate, lock, unwind or touch
/// thread-local state (errno included): raw system calls and reads of
/// `Shared` only.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Shared` passed to clone, alive and unchanged while
    // the child runs (see `spawn`).
    let shared = unsafe { &*arg.cast::<Shared>().cast_const() };
    // SAFETY: raw system calls on our own stack, with valid pointers into `shared`.
    let errno = unsafe { prepare_and_exec(shared) };
    shared.error.store(errno, Ordering::Release);
    // SAFETY: ends this child only (it is not a thread of ours: no CLONE_THREAD).
    unsafe {
        sys::call1(libc::SYS_exit, 127);
    }
    127
}

/// Sets the child up and executes the program; returns only on failure, with the errno.
///
/// # Safety
/// Only in the child made by `spawn`, with `shared` its block.
unsafe fn prepare_and_exec(shared: &Shared) -> c_int {
    // Handlers are ours and must not run here; SIGPIPE, which Rust ignores, is
    // put back to its default as Rust's Command does. Ignored signals stay so
    // (`nohup` still works), as with posix_spawn.
    let default = sys::KernelSigaction::default_action();
    for signal in 1..=64 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        let mut old = sys::KernelSigaction::default_action();
        if sys::sigaction(signal, None, Some(&mut old)) < 0 {
            continue;
        }
        if signal == libc::SIGPIPE || (old.handler != libc::SIG_DFL && old.handler != libc::SIG_IGN) {
            sys::sigaction(signal, Some(&default), None);
        }
    }
    let empty: u64 = 0;
    let result = sys::call4(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK as usize, &empty as *const u64 as usize, 0, 8);
    if result < 0 {
        return -result as c_int;
    }
    let result = sys::call2(libc::SYS_setpgid, 0, 0);
    if result < 0 {
        return -result as c_int;
    }
    for (from, to) in [(shared.stdin, 0), (shared.output, 1), (shared.output, 2)] {
        let result = if from == to {
            // dup3 refuses equal descriptors; clear close-on-exec instead.
            sys::call3(libc::SYS_fcntl, from as usize, libc::F_SETFD as usize, 0)
        } else {
            sys::call3(libc::SYS_dup3, from as usize, to as usize, 0)
        };
        if result < 0 {
            return -result as c_int;
        }
    }
    if let Some(cwd) = &shared.cwd {
        let result = sys::call1(libc::SYS_chdir, cwd.as_ptr() as usize);
        if result < 0 {
            return -result as c_int;
        }
    }
    // execvp's search: skip the entries where the program is not, remember a
    // permission refusal, stop at any other error.
    let mut refused = false;
    for &candidate in &shared.candidate_ptrs {
        let result = sys::call3(
            libc::SYS_execve,
            candidate as usize,
            shared.argv.as_ptr() as usize,
            shared.envp.as_ptr() as usize,
        );
        match -result as c_int {
            libc::EACCES => refused = true,
            libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
            errno => return errno,
        }
    }
    if refused {
        libc::EACCES
    } else {
        libc::ENOENT
    }
}

/// System calls without libc, which would set `errno` (the parent thread's:
/// the child runs with its thread pointer) on failure. Each returns the
/// kernel's result: non-negative, or minus the errno.
mod sys {
    use std::arch::asm;

    /// The kernel's `struct sigaction` on x86_64 and aarch64.
    #[repr(C)]
    pub(super) struct KernelSigaction {
        pub(super) handler: libc::sighandler_t,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }

    impl KernelSigaction {
        pub(super) fn default_action() -> KernelSigaction {
            KernelSigaction { handler: libc::SIG_DFL, flags: 0, restorer: 0, mask: 0 }
        }
    }

    /// rt_sigaction for one signal.
    ///
    /// # Safety
    /// Changes the calling process's signal dispositions.
    pub(super) unsafe fn sigaction(
        signal: libc::c_int,
        new: Option<&KernelSigaction>,
        old: Option<&mut KernelSigaction>,
    ) -> isize {
        let new = new.map_or(0, |n| n as *const KernelSigaction as usize);
        let old = old.map_or(0, |o| o as *mut KernelSigaction as usize);
        call4(libc::SYS_rt_sigaction, signal as usize, new, old, 8)
    }

    pub(super) unsafe fn call1(number: libc::c_long, a: usize) -> isize {
        call4(number, a, 0, 0, 0)
    }

    pub(super) unsafe fn call2(number: libc::c_long, a: usize, b: usize) -> isize {
        call4(number, a, b, 0, 0)
    }

    pub(super) unsafe fn call3(number: libc::c_long, a: usize, b: usize, c: usize) -> isize {
        call4(number, a, b, c, 0)
    }

    /// # Safety
    /// The arguments must be what the system call `number` expects.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn call4(number: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
        let result: isize;
        asm!(
            "syscall",
            inlateout("rax") number as isize => result,
            in("rdi") a,
            in("rsi") b,
            in("rdx") c,
            in("r10") d,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
        result
    }

    /// # Safety
    /// The arguments must be what the system call `number` expects.
    #[cfg(target_arch = "aarch64")]
    pub(super) unsafe fn call4(number: libc::c_long, a: usize, b: usize, c: usize, d: usize) -> isize {
        let result: isize;
        asm!(
            "svc 0",
            in("x8") number,
            inlateout("x0") a as isize => result,
            in("x1") b,
            in("x2") c,
            in("x3") d,
            options(nostack),
        );
        result
    }
}
