//! Starting a job's process: a child that shares the agent's memory until its exec (as
//! `posix_spawn` starts one), set up by the agent's own code, then one exec of the job's
//! program.
//!
//! The child is made with `clone(CLONE_VM | CLONE_VFORK)` on a launcher thread, which waits
//! until the child has exec'd or ended. In the child (on a stack of its own, with every signal
//! blocked but glibc's two internal ones), it writes its pid to a pipe, takes its standard input (`/dev/null`) and its output
//! pipes, changes to the job's working directory, makes its own process group, sets every
//! signal the agent handles back to its default, joins the job's cgroup (it writes `0` to each
//! `cgroup.procs` the agent opened for it), takes the job's resource limits (soft and hard),
//! drops to the job's own uid and gid with no supplementary groups and `no_new_privs` when the
//! agent runs jobs as other users, and sets its parent-death signal to SIGKILL, then checks
//! that its parent is still the agent, unblocks its signals and execs. Should any of that
//! fail, the child stores the error where the launcher reads it, ends without running the job,
//! and the start fails with the error. The death signal is set after the uid changes, because
//! the kernel clears it when the credentials change.
//!
//! The child runs on the agent's memory: it makes only raw system calls on values computed
//! before the clone, allocates nothing and takes no lock (its signal handlers are read and set
//! with the raw system call: glibc's `sigaction` may take a lock). What it writes of the
//! agent's is its own stack (a mapping of the launcher's, with a guard page below it), the
//! launcher's `errno` (the launcher is suspended meanwhile) and the error it stores. A fork instead copied the agent's page tables for each job, and the agent
//! then took a copy-on-write fault on each page it wrote while children still shared it:
//! about a fifth of the machine with real agents (BENCHMARKS.md). As the agent's memory is the
//! child's until its exec, the agent is made non-dumpable when it runs jobs as other users,
//! and refuses to when the host's `fs.suid_dumpable` is 1 ([`check_host`]): a process of the
//! job's uid may not attach to that child.
//!
//! The kernel sends the parent-death signal when the *thread* that made the process ends, not
//! only its process. So jobs are started on a few threads that live as long as the agent's
//! process (the launchers), never on a pool thread that could retire while the job runs. The
//! launchers also keep the wait until the child has exec'd (or a cgroup move has waited for an
//! RCU grace period) off the agent's runtime threads, and a slow start holds up one of them,
//! not every start.
//!
//! A child can be stopped before its exec (a process of the job's uid sends it SIGSTOP in the
//! moment between its uid change and its exec; a frozen cgroup), and its launcher then waits.
//! So a start that takes longer than [`START_TIMEOUT`] has its child killed (its pid is written
//! to a pipe as the child's first act): its launcher goes on, and the attempt ends as killed.
//!
//! A started process is a [`JobProcess`]: its exit is awaited on a pidfd, and a process whose
//! handle is dropped before it was reaped is killed and reaped in the background.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString, c_char, c_void};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use nix::sched::CloneFlags;
use nix::sys::signal::SigSet;
use rustix::io::Errno;
use rustix::mm::{MapFlags, MprotectFlags, ProtFlags};
use rustix::pipe::PipeFlags;
use rustix::process::{
    DumpableBehavior, Gid, Pid, PidfdFlags, Resource, Rlimit, Signal, Uid, WaitOptions,
};
use tokio::io::Interest;
use tokio::io::unix::{AsyncFd, AsyncFdRegisterError};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tracing::warn;

use crate::config::JobLimits;
use crate::work_lock::WorkLock;

/// How long a start may take, from the request to the exec of the job's program, before its
/// child is killed.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The threads that start jobs.
const LAUNCHERS: usize = 4;
/// The stack a child runs on until its exec: it makes a few system calls (most of its pages
/// are never touched, so never resident).
const CHILD_STACK_BYTES: usize = 256 * 1024;
/// What a child whose set-up or exec failed exits with.
const FAILED_START_STATUS: i32 = 127;

/// A job's program, its arguments, its environment (nothing but what is set here) and its
/// working directory. Its standard input is `/dev/null`, its output two pipes, and it runs in
/// a process group of its own.
pub(crate) struct JobCommand {
    program: OsString,
    args: Vec<OsString>,
    env: BTreeMap<OsString, OsString>,
    cwd: OsString,
}

impl JobCommand {
    /// Runs `program` (a path, not looked up) in `cwd`, with `program` as its `argv[0]`.
    pub fn new(program: &Path, cwd: &Path) -> JobCommand {
        JobCommand {
            program: program.as_os_str().to_owned(),
            args: Vec::new(),
            env: BTreeMap::new(),
            cwd: cwd.as_os_str().to_owned(),
        }
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut JobCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets one variable; a later value of the same name replaces an earlier one.
    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut JobCommand {
        self.env
            .insert(key.as_ref().to_owned(), value.as_ref().to_owned());
        self
    }

    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut JobCommand
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (key, value) in vars {
            self.env(key, value);
        }
        self
    }

    /// The command as its exec takes it.
    fn exec(&self) -> io::Result<Exec> {
        let program = c_string("program", &self.program)?;
        let argv = std::iter::once(Ok(program.clone()))
            .chain(self.args.iter().map(|arg| c_string("argument", arg)))
            .collect::<io::Result<_>>()?;
        let envp = self
            .env
            .iter()
            .map(|(key, value)| {
                if key.is_empty() || key.as_bytes().contains(&b'=') {
                    let key = key.to_string_lossy();
                    return Err(invalid(format!("environment variable name {key:?}")));
                }
                let mut pair = Vec::with_capacity(key.len() + 1 + value.len());
                pair.extend_from_slice(key.as_bytes());
                pair.push(b'=');
                pair.extend_from_slice(value.as_bytes());
                CString::new(pair).map_err(|_| {
                    let key = key.to_string_lossy();
                    invalid(format!("environment variable {key} holds a NUL byte"))
                })
            })
            .collect::<io::Result<_>>()?;
        Ok(Exec {
            program,
            argv,
            envp,
            cwd: c_string("working directory", &self.cwd)?,
        })
    }
}

fn c_string(what: &str, value: &OsStr) -> io::Result<CString> {
    CString::new(value.as_bytes()).map_err(|_| invalid(format!("the {what} holds a NUL byte")))
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// A command's exec, as C strings.
struct Exec {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
}

/// How one job's process is to be started.
pub(crate) struct JobStart {
    /// The `cgroup.procs` file of the job's cgroup in each hierarchy, opened for writing (none
    /// when jobs have no cgroups).
    pub cgroup_procs: Vec<OwnedFd>,
    pub limits: JobLimits,
    /// The uid and gid the job runs as, when not the agent's.
    pub user: Option<(u32, u32)>,
    /// The agent's hold on its work folder: the child closes its copy first.
    pub work_lock: Option<WorkLock>,
}

/// Checks that this host can start jobs as this module does, before the agent takes any: the
/// kernel has pidfds (Linux 5.3), and, when jobs run as other users (`other_users`), the agent
/// is made non-dumpable and the host's `fs.suid_dumpable` is not 1.
///
/// Until its exec, a job's process runs on the agent's memory, and once it has the job's uid a
/// process of that uid could attach to it (or open its `/proc/<pid>/mem`, which would then keep
/// the agent's memory) unless that memory is not dumpable: a process whose memory is not
/// user-dumpable may be attached to only with `CAP_SYS_PTRACE`. A uid change sets the
/// dumpable state of the memory to `fs.suid_dumpable`, so with 1 ("debug", which the kernel
/// documents as insecure) there would be a moment after each job's uid change when it is.
pub(crate) fn check_host(other_users: bool) -> io::Result<()> {
    rustix::process::pidfd_open(rustix::process::getpid(), PidfdFlags::empty()).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("jobs are watched through pidfds, which need Linux 5.3 or later: {e}"),
        )
    })?;
    if other_users {
        check_suid_dumpable()?;
        // Also keeps the agent's memory, with the secrets it opens, out of core dumps.
        rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    }
    Ok(())
}

/// Fails when `fs.suid_dumpable` is 1 (see [`check_host`]); read again before each job that
/// changes user, as it may be changed at any time.
fn check_suid_dumpable() -> io::Result<()> {
    const SETTING: &str = "/proc/sys/fs/suid_dumpable";
    let value = std::fs::read_to_string(SETTING)
        .map_err(|e| io::Error::new(e.kind(), format!("failed to read {SETTING}: {e}")))?;
    if value.trim() == "1" {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "fs.suid_dumpable is 1, which would let a job's uid attach to its process before \
             its exec: set it to 0 or 2 (sysctl fs.suid_dumpable=0) to run jobs as other users",
        ));
    }
    Ok(())
}

/// Starts `command`'s process as `start` says (see the module's documentation), on a launcher
/// thread.
pub(crate) async fn start(command: JobCommand, start: JobStart) -> io::Result<JobProcess> {
    let (setup, ends) = Setup::new(&command, start)?;
    launch(setup, ends, START_TIMEOUT).await
}

/// Everything a child needs, made before it exists.
struct Setup {
    exec: Exec,
    /// The child's standard input (`/dev/null`), output and error.
    stdin: BorrowedFd<'static>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    /// Where the child writes its pid first.
    pid_write: OwnedFd,
    cgroup_procs: Vec<OwnedFd>,
    limits: [(Resource, Rlimit); 3],
    user: Option<(Uid, Gid)>,
    /// Kept open until the child has exec'd or ended: its descriptor is the child's to close.
    work_lock: Option<WorkLock>,
    agent: Pid,
    /// Tests only: the child stops itself just before its exec.
    #[cfg(test)]
    stop_before_exec: bool,
}

/// The agent's ends of a child's pipes.
struct Ends {
    /// Never blocking: read only when a start timed out.
    pid_read: OwnedFd,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
}

impl Setup {
    fn new(command: &JobCommand, start: JobStart) -> io::Result<(Setup, Ends)> {
        let exec = command.exec()?;
        if start.user.is_some() {
            check_suid_dumpable()?;
        }
        let (pid_read, pid_write) =
            rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        let (stdout, stdout_write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
        let (stderr, stderr_write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
        let stdin = dev_null()?;
        let limits = start.limits.each().map(|(resource, value)| {
            let both = Rlimit {
                current: Some(value),
                maximum: Some(value),
            };
            (resource, both)
        });
        let setup = Setup {
            exec,
            stdin,
            stdout: stdout_write,
            stderr: stderr_write,
            pid_write,
            cgroup_procs: start.cgroup_procs,
            limits,
            user: start
                .user
                .map(|(uid, gid)| (Uid::from_raw(uid), Gid::from_raw(gid))),
            work_lock: start.work_lock,
            agent: rustix::process::getpid(),
            #[cfg(test)]
            stop_before_exec: false,
        };
        let ends = Ends {
            pid_read,
            stdout: pipe::Receiver::from_owned_fd(stdout)?,
            stderr: pipe::Receiver::from_owned_fd(stderr)?,
        };
        Ok((setup, ends))
    }
}

/// `/dev/null`, opened once (closed on exec): every job's standard input.
fn dev_null() -> io::Result<BorrowedFd<'static>> {
    static DEV_NULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(null) = DEV_NULL.get() {
        return Ok(null.as_fd());
    }
    let null = OwnedFd::from(std::fs::File::open("/dev/null")?);
    Ok(DEV_NULL.get_or_init(|| null).as_fd())
}

/// Has a launcher start `setup`'s process, killing its child if the start takes longer than
/// `timeout`.
async fn launch(setup: Setup, ends: Ends, timeout: Duration) -> io::Result<JobProcess> {
    let (reply, mut started) = oneshot::channel();
    let ended = || io::Error::other("the launcher threads have ended");
    launcher()?
        .send(Request { setup, reply })
        .map_err(|_| ended())?;
    let spawned = match tokio::time::timeout(timeout, &mut started).await {
        Ok(result) => result.map_err(|_| ended())??,
        Err(_) => {
            kill_stopped_start(&ends.pid_read, timeout)?;
            match tokio::time::timeout(timeout, started).await {
                // Its launcher returns once the child is gone: the attempt ends as killed.
                Ok(result) => result.map_err(|_| ended())??,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the job's process could not be started or killed (is its cgroup frozen?)",
                    ));
                }
            }
        }
    };
    JobProcess::new(spawned, ends)
}

/// Kills the child of a start that timed out, found by the pid it wrote first.
fn kill_stopped_start(pid_read: &OwnedFd, timeout: Duration) -> io::Result<()> {
    let mut pid = [0; 4];
    let cloned = matches!(rustix::io::read(pid_read, &mut pid), Ok(4));
    let pid = Pid::from_raw(i32::from_ne_bytes(pid)).filter(|_| cloned);
    let Some(pid) = pid else {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the job's process was not started in time: every launcher is busy",
        ));
    };
    // Not yet reaped (its launcher is still waiting for it), so the pid is still the child's.
    warn!(
        pid = pid.as_raw_nonzero().get(),
        timeout_ms = timeout.as_millis(),
        "a job's process was stopped before its program started: killing it"
    );
    let _ = rustix::process::kill_process(pid, Signal::KILL);
    Ok(())
}

struct Request {
    setup: Setup,
    reply: oneshot::Sender<io::Result<Spawned>>,
}

/// A child that has exec'd (or was killed before it could), not yet reaped.
/// Killed and reaped if dropped before it became a [`JobProcess`] (its caller gone).
struct Spawned {
    pid: Pid,
    /// `None` once taken by [`JobProcess::new`].
    pidfd: Option<OwnedFd>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(pidfd) = self.pidfd.take() {
            abandon(self.pid, pidfd);
        }
    }
}

/// Kills a process not yet reaped, and reaps it: in a task when in a runtime (a caller gone
/// after its reply was sent, a dropped [`JobProcess`]), else at once (on a launcher).
fn abandon(pid: Pid, pidfd: OwnedFd) {
    let _ = rustix::process::pidfd_send_signal(&pidfd, Signal::KILL);
    if tokio::runtime::Handle::try_current().is_ok()
        && let Ok(pidfd) = register(pidfd)
    {
        tokio::spawn(async move {
            while let Ok(mut ready) = pidfd.readable().await {
                match reap(pid) {
                    Ok(None) => ready.clear_ready(),
                    Ok(Some(_)) | Err(_) => return,
                }
            }
        });
        return;
    }
    let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
}

/// A pidfd registered with the current runtime, readable once its process has ended.
#[allow(unsafe_code)]
fn register(pidfd: OwnedFd) -> Result<AsyncFd<OwnedFd>, AsyncFdRegisterError<OwnedFd>> {
    // SAFETY: an `OwnedFd` keeps its descriptor, open, for as long as it lives.
    unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
}

/// The launchers' queue; the threads are started on first use and, as this keeps their queue
/// open, live as long as the process.
static LAUNCHER: Mutex<Option<mpsc::Sender<Request>>> = Mutex::new(None);

fn launcher() -> io::Result<mpsc::Sender<Request>> {
    let mut launcher = LAUNCHER.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(queue) = launcher.as_ref() {
        return Ok(queue.clone());
    }
    let (queue, requests) = mpsc::channel::<Request>();
    let requests = Arc::new(Mutex::new(requests));
    for n in 0..LAUNCHERS {
        let requests = Arc::clone(&requests);
        std::thread::Builder::new()
            .name("hodei-launcher".into())
            .spawn(move || launch_loop(&requests))
            .map_err(|e| io::Error::other(format!("failed to start launcher thread {n}: {e}")))?;
    }
    *launcher = Some(queue.clone());
    Ok(queue)
}

/// One launcher: takes the next request, starts its process, hands it back.
fn launch_loop(requests: &Mutex<mpsc::Receiver<Request>>) {
    // Its children start with every signal blocked (but glibc's two, which glibc does not let
    // a thread block; their handlers return unless glibc itself sent them to this thread), so
    // that none of the agent's handlers runs in one (on the agent's memory) before the child
    // has set them back to their defaults. Signals to the agent go to its other threads.
    if let Err(e) = SigSet::all().thread_block() {
        warn!(error = %e, "a launcher could not block its signals: it starts no job");
        return;
    }
    let mut stack = None;
    loop {
        let next = requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        let Ok(Request { setup, reply }) = next else {
            return;
        };
        // A caller that has gone (its attempt aborted, its start timed out) starts nothing.
        if reply.is_closed() {
            continue;
        }
        // A panic must not end this thread: its children's death signal would fire.
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| spawn(&setup, &mut stack)))
            .unwrap_or_else(|_| Err(io::Error::other("starting the job's process panicked")));
        // The child's ends close here, so that the agent sees the end of the job's output.
        drop(setup);
        // A process whose caller has gone meanwhile is killed and reaped as it is dropped.
        let _ = reply.send(started);
    }
}

/// Clones the child, which sets itself up and execs (see the module's documentation); returns
/// once it has exec'd or ended.
#[allow(unsafe_code)]
fn spawn(setup: &Setup, stack: &mut Option<ChildStack>) -> io::Result<Spawned> {
    let stack = match stack {
        Some(stack) => stack,
        None => stack.insert(ChildStack::new()?),
    };
    let argv = pointers(&setup.exec.argv);
    let envp = pointers(&setup.exec.envp);
    let failure = AtomicI32::new(0);
    let child = Box::new(|| child_main(setup, &argv, &envp, &failure));
    // SAFETY: the child runs `child_main` on `stack` (used by nothing else: this thread is
    // suspended until the child has exec'd or ended, `CLONE_VFORK`) and on this process's
    // memory (`CLONE_VM`), where it only reads `setup` and the pointer arrays, which outlive
    // it, makes raw system calls, and stores its error in `failure`. It has its own copy of
    // the file table and of the signal handlers, and starts with this thread's signals blocked.
    let pid = unsafe {
        nix::sched::clone(
            child,
            stack.as_mut_slice(),
            CloneFlags::CLONE_VM | CloneFlags::CLONE_VFORK,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(io::Error::from)?;
    let pid = Pid::from_raw(pid.as_raw()).ok_or_else(|| io::Error::other("clone returned 0"))?;
    let errno = failure.load(Ordering::Acquire);
    if errno != 0 {
        let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
        return Err(io::Error::from_raw_os_error(errno));
    }
    match rustix::process::pidfd_open(pid, PidfdFlags::empty()) {
        Ok(pidfd) => Ok(Spawned {
            pid,
            pidfd: Some(pidfd),
        }),
        Err(e) => {
            kill_and_reap(pid);
            Err(e.into())
        }
    }
}

/// The stack a launcher's children run on: anonymous memory (its pages resident only once
/// used) with a guard page below it, so that an overflow faults instead of writing over the
/// agent's memory.
struct ChildStack {
    mapping: *mut c_void,
    len: usize,
    guard: usize,
}

impl ChildStack {
    #[allow(unsafe_code)]
    fn new() -> io::Result<ChildStack> {
        let guard = rustix::param::page_size();
        let len = CHILD_STACK_BYTES + guard;
        // SAFETY: a new private anonymous mapping, owned (and unmapped) by the value returned.
        let mapping = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::STACK,
            )
        }?;
        let stack = ChildStack {
            mapping,
            len,
            guard,
        };
        // SAFETY: the lowest page of that mapping, which nothing uses.
        unsafe { rustix::mm::mprotect(mapping, guard, MprotectFlags::empty()) }?;
        Ok(stack)
    }

    #[allow(unsafe_code)]
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the pages of the mapping above its guard page, readable and writable, and
        // borrowed no longer than `self`.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.mapping.cast::<u8>().add(self.guard),
                self.len - self.guard,
            )
        }
    }
}

impl Drop for ChildStack {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer borrowed.
        let _ = unsafe { rustix::mm::munmap(self.mapping, self.len) };
    }
}

/// A null-terminated array of pointers to `strings`, as `execve` takes it.
fn pointers(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The child: sets itself up and execs; stores why it could not and exits.
#[allow(unsafe_code)]
fn child_main(
    setup: &Setup,
    argv: &[*const c_char],
    envp: &[*const c_char],
    failure: &AtomicI32,
) -> isize {
    let errno = match child_setup(setup) {
        Ok(()) => {
            // SAFETY: the program is a C string and `argv` and `envp` null-terminated arrays
            // of pointers to C strings, all held by the caller until this child has exec'd.
            unsafe { libc::execve(setup.exec.program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            io::Error::last_os_error().raw_os_error().unwrap_or(0)
        }
        Err(e) => e.raw_os_error(),
    };
    failure.store(
        if errno == 0 { libc::EINVAL } else { errno },
        Ordering::Release,
    );
    // SAFETY: ends this child at once, without running anything of the agent's.
    unsafe { libc::_exit(FAILED_START_STATUS) }
}

/// The child's set-up, in its order (see the module's documentation). Raw system calls only.
#[allow(unsafe_code)]
fn child_setup(setup: &Setup) -> Result<(), Errno> {
    if let Some(lock) = &setup.work_lock {
        // SAFETY: this closes the child's own copy of the descriptor (it has its own file
        // table: no `CLONE_FILES`), which nothing in the child uses; the agent's stays open.
        // A child that never reaches its exec (stopped before it) then holds no lock on the
        // work folder after the agent has gone.
        unsafe { rustix::io::close(lock.raw_fd()) };
    }
    let pid = rustix::process::getpid().as_raw_nonzero().get();
    let _ = rustix::io::write(&setup.pid_write, &pid.to_ne_bytes());
    // std keeps descriptors 0 to 2 open in the agent, so none of these is one of them.
    rustix::stdio::dup2_stdin(setup.stdin)?;
    rustix::stdio::dup2_stdout(&setup.stdout)?;
    rustix::stdio::dup2_stderr(&setup.stderr)?;
    rustix::process::chdir(setup.exec.cwd.as_c_str())?;
    rustix::process::setpgid(None, None)?;
    default_signal_handlers();
    for procs in &setup.cgroup_procs {
        rustix::io::write(procs, b"0")?;
    }
    for &(resource, limit) in &setup.limits {
        rustix::process::setrlimit(resource, limit)?;
    }
    if let Some((uid, gid)) = setup.user {
        rustix::thread::set_thread_groups(&[])?;
        rustix::thread::set_thread_res_gid(gid, gid, gid)?;
        rustix::thread::set_thread_res_uid(uid, uid, uid)?;
        // The agent is non-dumpable already (`check_host`), and this process shares its
        // memory: set again, as the uid change has just set it to `fs.suid_dumpable` (0 or 2,
        // under which no process of the job's uid may attach either).
        rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
        rustix::thread::set_no_new_privs(true)?;
    }
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
    // The agent may have ended before the signal was set: then nothing may run.
    if rustix::process::getppid() != Some(setup.agent) {
        return Err(Errno::SRCH);
    }
    #[cfg(test)]
    if setup.stop_before_exec {
        rustix::process::kill_process(rustix::process::getpid(), Signal::STOP)?;
    }
    set_signal_mask(0)?;
    Ok(())
}

/// Sets each signal that has a handler (the agent's, of which this child has a copy) back to
/// its default, and SIGPIPE too, which Rust programs ignore. Signals ignored otherwise stay
/// ignored, as an exec keeps them. Through the raw system call: glibc's `sigaction` may take a
/// lock (for SIGABRT), and refuses its own two signals.
fn default_signal_handlers() {
    let default = KernelSigaction::default();
    for signal in 1..=64 {
        let mut current = KernelSigaction::default();
        if rt_sigaction(signal, None, Some(&mut current)).is_err() {
            continue;
        }
        let handled = current.handler != libc::SIG_DFL && current.handler != libc::SIG_IGN;
        if handled || signal == libc::SIGPIPE {
            let _ = rt_sigaction(signal, Some(&default), None);
        }
    }
}

/// The kernel's `struct sigaction` on 64-bit Linux (x86-64 and arm64 both have `sa_restorer`);
/// all zero is SIG_DFL with no flags and an empty mask.
#[derive(Default)]
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// The size of the kernel's signal set, as `rt_sigaction` and `rt_sigprocmask` take it.
const KERNEL_SIGSET_BYTES: usize = 8;

/// `rt_sigaction(2)`.
#[allow(unsafe_code)]
fn rt_sigaction(
    signal: i32,
    new: Option<&KernelSigaction>,
    old: Option<&mut KernelSigaction>,
) -> Result<(), Errno> {
    let new = new.map_or(std::ptr::null(), std::ptr::from_ref);
    let old = old.map_or(std::ptr::null_mut(), std::ptr::from_mut);
    // SAFETY: both pointers are null or point to a `KernelSigaction`, laid out as the kernel's.
    let done = unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            signal,
            new,
            old,
            KERNEL_SIGSET_BYTES,
        )
    };
    syscall_result(done)
}

/// Sets the calling thread's signal mask (`rt_sigprocmask(2)`, raw: glibc's would keep its
/// own two signals as they are).
#[allow(unsafe_code)]
fn set_signal_mask(mask: u64) -> Result<(), Errno> {
    // SAFETY: a pointer to a kernel signal set, and no old set asked for.
    let done = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            std::ptr::from_ref(&mask),
            std::ptr::null_mut::<u64>(),
            KERNEL_SIGSET_BYTES,
        )
    };
    syscall_result(done)
}

/// The result of `libc::syscall`: -1 and `errno` on failure.
fn syscall_result(done: libc::c_long) -> Result<(), Errno> {
    if done == -1 {
        Err(Errno::from_io_error(&io::Error::last_os_error()).unwrap_or(Errno::INVAL))
    } else {
        Ok(())
    }
}

/// Kills a child and waits for it, blocking.
fn kill_and_reap(pid: Pid) {
    let _ = rustix::process::kill_process(pid, Signal::KILL);
    let _ = rustix::process::waitpid(Some(pid), WaitOptions::empty());
}

/// How `pid` ended, if it has (reaping it).
fn reap(pid: Pid) -> io::Result<Option<ExitStatus>> {
    let ended = rustix::process::waitpid(Some(pid), WaitOptions::NOHANG)?;
    Ok(ended.map(|(_, status)| ExitStatus::from_raw(status.as_raw())))
}

/// A started job's process: its output pipes, and its end awaited on a pidfd. Dropped before
/// it was reaped, it is killed, and reaped in the background.
pub(crate) struct JobProcess {
    pid: Pid,
    /// `None` only once handed to the background reaper.
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

impl JobProcess {
    fn new(mut spawned: Spawned, ends: Ends) -> io::Result<JobProcess> {
        let pidfd = spawned
            .pidfd
            .take()
            .ok_or_else(|| io::Error::other("the process was taken already"))?;
        let pidfd = match register(pidfd) {
            Ok(pidfd) => pidfd,
            Err(e) => {
                // Killed and reaped as `spawned` is dropped.
                let (pidfd, e) = e.into_parts();
                spawned.pidfd = Some(pidfd);
                return Err(e);
            }
        };
        Ok(JobProcess {
            pid: spawned.pid,
            pidfd: Some(pidfd),
            status: None,
            stdout: Some(ends.stdout),
            stderr: Some(ends.stderr),
        })
    }

    /// The process's id (also its process group's).
    pub fn id(&self) -> u32 {
        self.pid.as_raw_nonzero().get().unsigned_abs()
    }

    /// Waits for the process to end and reaps it.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            let Some(pidfd) = &self.pidfd else {
                return Err(io::Error::other("the process was handed to the reaper"));
            };
            let mut ready = pidfd.readable().await?;
            match reap(self.pid)? {
                Some(status) => self.status = Some(status),
                None => ready.clear_ready(),
            }
        }
    }

    /// Sends SIGKILL to the process (not its group), unless it has been reaped.
    pub fn start_kill(&self) -> io::Result<()> {
        match &self.pidfd {
            Some(pidfd) if self.status.is_none() => Ok(rustix::process::pidfd_send_signal(
                pidfd.get_ref(),
                Signal::KILL,
            )?),
            _ => Ok(()),
        }
    }
}

impl Drop for JobProcess {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        if let Some(pidfd) = self.pidfd.take() {
            abandon(self.pid, pidfd.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tokio::io::AsyncReadExt;

    fn no_limits() -> JobStart {
        JobStart {
            cgroup_procs: Vec::new(),
            limits: JobLimits::within_own(4096, 1024),
            user: None,
            work_lock: None,
        }
    }

    fn command(program: &str, args: &[&str]) -> JobCommand {
        let program = which::which(program).unwrap();
        let mut command = JobCommand::new(&program, Path::new("/"));
        command.args(args);
        command
    }

    /// Runs `command` to its end: its status, its output and its errors.
    async fn run(command: JobCommand) -> (ExitStatus, String, String) {
        let mut process = start(command, no_limits()).await.unwrap();
        let (mut out, mut err) = (String::new(), String::new());
        let mut stdout = process.stdout.take().unwrap();
        let mut stderr = process.stderr.take().unwrap();
        let (read_out, read_err) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        read_out.unwrap();
        read_err.unwrap();
        (process.wait().await.unwrap(), out, err)
    }

    #[tokio::test]
    async fn a_start_stopped_before_its_exec_is_killed_and_its_launcher_goes_on() {
        // Every launcher gets a child that stops itself after its set-up, before its exec.
        let mut stopped = Vec::new();
        for _ in 0..LAUNCHERS {
            let (mut setup, ends) = Setup::new(&command("true", &[]), no_limits()).unwrap();
            setup.stop_before_exec = true;
            stopped.push(tokio::spawn(async move {
                launch(setup, ends, Duration::from_millis(300)).await
            }));
        }
        for start in stopped {
            let mut process = start.await.unwrap().unwrap();
            let status = process.wait().await.unwrap();
            assert_eq!(status.signal(), Some(9), "{status:?}");
        }
        // Each launcher was freed by the kill: a start after them runs its program.
        for _ in 0..LAUNCHERS {
            let (status, _, _) = run(command("true", &[])).await;
            assert!(status.success());
        }
    }

    #[tokio::test]
    async fn a_child_keeps_no_descriptor_of_the_locked_work_folder_even_before_its_exec() {
        let folder = tempfile::tempdir().unwrap();
        let lock = WorkLock::acquire(folder.path()).unwrap();
        let start = JobStart {
            work_lock: Some(lock.clone()),
            ..no_limits()
        };
        let (mut setup, ends) = Setup::new(&command("true", &[]), start).unwrap();
        setup.stop_before_exec = true;
        let pid_read = ends.pid_read.try_clone().unwrap();
        let launched =
            tokio::spawn(async move { launch(setup, ends, Duration::from_secs(60)).await });
        let pid = hodei_test_support::wait_for(
            "the child to stop before its exec",
            Duration::from_secs(10),
            || {
                let mut pid = [0; 4];
                let read = matches!(rustix::io::read(&pid_read, &mut pid), Ok(4));
                async move {
                    let pid = i32::from_ne_bytes(pid);
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                    (read && stat.rsplit(')').next()?.trim_start().starts_with('T')).then_some(pid)
                }
            },
        )
        .await
        .unwrap();
        let held = std::fs::canonicalize(folder.path()).unwrap();
        let links: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .collect();
        assert!(!links.is_empty(), "the child's descriptors are listed");
        assert!(!links.contains(&held), "{links:?}");
        // The agent's own hold is untouched.
        assert!(WorkLock::acquire(folder.path()).is_err());
        rustix::process::kill_process(Pid::from_raw(pid).unwrap(), Signal::KILL).unwrap();
        let mut process = launched.await.unwrap().unwrap();
        assert_eq!(process.wait().await.unwrap().signal(), Some(9));
    }

    #[tokio::test]
    async fn the_program_runs_with_its_limits() {
        let (status, out, _) =
            run(command("sh", &["-c", "ulimit -Sn; ulimit -Hn; ulimit -c"])).await;
        assert!(status.success());
        let nofile = JobLimits::within_own(4096, 1024).max_open_files;
        assert_eq!(out, format!("{nofile}\n{nofile}\n0\n"));
    }

    #[tokio::test]
    async fn the_program_gets_its_arguments_environment_directory_and_own_group() {
        let dir = tempfile::tempdir().unwrap();
        let program = which::which("sh").unwrap();
        let script = r#"tr '\0' '|' < /proc/$$/cmdline; echo; pwd; env | sort; cut -d' ' -f5 /proc/$$/stat; echo $$; echo oops >&2; exit 3"#;
        let mut command = JobCommand::new(&program, dir.path());
        command
            .args(["-c", script, "one two", ""])
            .env("B", "2")
            .envs([("A", "1"), ("B", "3")])
            .env("PATH", std::env::var_os("PATH").unwrap());
        let (status, out, err) = run(command).await;
        assert_eq!(status.code(), Some(3));
        assert_eq!(err, "oops\n");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            format!("{}|-c|{script}|one two||", program.display())
        );
        assert_eq!(
            lines[1],
            dir.path().canonicalize().unwrap().to_str().unwrap()
        );
        // `sh` adds PWD (and may add SHLVL and `_`); nothing of the agent's comes through.
        let env: Vec<&str> = lines[2..lines.len() - 2]
            .iter()
            .copied()
            .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
            .collect();
        let path = format!("PATH={}", std::env::var("PATH").unwrap());
        assert_eq!(env, ["A=1", "B=3", path.as_str()]);
        // Its own process group, led by itself.
        assert_eq!(lines[lines.len() - 2].trim(), lines[lines.len() - 1]);
    }

    #[tokio::test]
    async fn the_program_starts_with_no_signal_blocked_and_the_agents_handlers_undone() {
        // The test's process handles SIGHUP, as the agent handles its own signals.
        let mut hangups =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
        let (status, out, _) = run(command(
            "sh",
            &[
                "-c",
                "grep -E '^Sig(Blk|Ign)' /proc/self/status; kill -HUP $$; echo survived",
            ],
        ))
        .await;
        let blocked = out.lines().find(|l| l.starts_with("SigBlk:")).unwrap();
        assert!(blocked.ends_with("0000000000000000"), "{out}");
        let ignored = out.lines().find(|l| l.starts_with("SigIgn:")).unwrap();
        let ignored = u64::from_str_radix(ignored.rsplit('\t').next().unwrap(), 16).unwrap();
        assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
        assert_eq!(status.signal(), Some(libc::SIGHUP), "{out}");
        assert!(!out.contains("survived"));
        // The hangup was the job's alone.
        let nothing = tokio::time::timeout(Duration::from_millis(50), hangups.recv()).await;
        assert!(nothing.is_err());
    }

    #[tokio::test]
    async fn a_failed_set_up_or_exec_is_the_starts_error() {
        let program = which::which("true").unwrap();
        let missing = JobCommand::new(&program, Path::new("/nonexistent/workspace"));
        let e = start(missing, no_limits()).await.err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let not_a_program = JobCommand::new(Path::new("/"), Path::new("/"));
        let e = start(not_a_program, no_limits()).await.err().unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
        let mut nul = command("true", &[]);
        nul.env("A", "x\0y");
        let e = start(nul, no_limits()).await.err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("environment variable A"), "{e}");
        // The launchers still start programs.
        assert!(run(command("true", &[])).await.0.success());
    }

    /// Waits until `pid` is gone altogether: killed, and reaped (a zombie keeps its entry).
    async fn wait_gone(pid: u32) {
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while proc_dir.exists() {
            assert!(tokio::time::Instant::now() < deadline, "{pid} still there");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_started_process_whose_caller_has_gone_is_killed_and_reaped() {
        let (setup, _ends) = Setup::new(&command("sleep", &["30"]), no_limits()).unwrap();
        let spawned = spawn(&setup, &mut None).unwrap();
        drop(setup);
        let pid = spawned.pid.as_raw_nonzero().get().unsigned_abs();
        assert!(PathBuf::from(format!("/proc/{pid}")).exists());
        drop(spawned);
        wait_gone(pid).await;
    }

    #[test]
    fn this_host_can_start_jobs() {
        check_host(false).unwrap();
    }

    #[tokio::test]
    async fn a_process_dropped_before_its_end_is_killed_and_reaped() {
        let process = start(command("sleep", &["30"]), no_limits()).await.unwrap();
        let pid = process.id();
        assert!(PathBuf::from(format!("/proc/{pid}")).exists());
        drop(process);
        wait_gone(pid).await;
    }
}
