//! Starting a job's process: one fork, then one exec of the job's own program.
//!
//! Between the two, in the child (still the agent's code, with nothing of the job run yet), it
//! joins the job's cgroup (it writes `0` to each `cgroup.procs` the agent opened for it), takes
//! the job's resource limits (soft and hard), drops to the job's own uid and gid with no
//! supplementary groups and `no_new_privs` when the agent runs jobs as other users, and sets
//! its parent-death signal to SIGKILL, then checks that its parent is still the agent. Should
//! any of that fail, the child ends without running the job and the start fails with the
//! error. The death signal is set after the uid changes, because the kernel clears it when
//! the credentials change.
//!
//! The kernel sends the parent-death signal when the *thread* that forked the process ends,
//! not only its process. So jobs are forked on a few threads that live as long as the agent's
//! process (the launchers), never on a pool thread that could retire while the job runs. The
//! launchers also keep the wait that a fork implies (until the child has exec'd, or a cgroup
//! move has waited for an RCU grace period) off the agent's runtime threads, and a slow start
//! holds up one of them, not every start.
//!
//! A child can be stopped before its exec (a process of the job's uid sends it SIGSTOP in the
//! moment between its uid change and its exec; a frozen cgroup), and its launcher then waits.
//! So a start that takes longer than [`START_TIMEOUT`] has its child killed (its pid is written
//! to a pipe as the child's first act): its launcher goes on, and the attempt ends as killed.
//!
//! Before, a job's chain was `sh` (held until the agent had moved it into its cgroup), then
//! `setpriv`, then the job: three programs started per job, each costing about 0.6 ms of CPU
//! on a virtual machine where glibc's start-up traps to the hypervisor (BENCHMARKS.md).

use std::io;
use std::os::fd::OwnedFd;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustix::io::Errno;
use rustix::pipe::PipeFlags;
use rustix::process::{DumpableBehavior, Gid, Pid, Rlimit, Signal, Uid};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tracing::warn;

use crate::config::JobLimits;

/// How long a start may take, from the request to the exec of the job's program, before its
/// child is killed.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The threads that fork jobs.
const LAUNCHERS: usize = 4;

/// How one job's process is to be started.
pub(crate) struct JobStart {
    /// The `cgroup.procs` file of the job's cgroup in each hierarchy, opened for writing (none
    /// when jobs have no cgroups).
    pub cgroup_procs: Vec<OwnedFd>,
    pub limits: JobLimits,
    /// The uid and gid the job runs as, when not the agent's.
    pub user: Option<(u32, u32)>,
}

/// Starts `command`'s process as `start` says (see the module's documentation), on a launcher
/// thread, in the calling task's runtime.
pub(crate) async fn start(mut command: Command, start: JobStart) -> io::Result<Child> {
    let (pid_read, pid_write) = pid_pipe()?;
    prepare(&mut command, start, pid_write);
    launch(command, &pid_read, START_TIMEOUT).await
}

/// A pipe for the child's pid: closed on exec, and never blocking.
fn pid_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(
        PipeFlags::CLOEXEC | PipeFlags::NONBLOCK,
    )?)
}

/// Has a launcher start `command` (prepared to write its pid to the other end of `pid_read`),
/// killing its child if the start takes longer than `timeout`.
async fn launch(command: Command, pid_read: &OwnedFd, timeout: Duration) -> io::Result<Child> {
    let (reply, mut started) = oneshot::channel();
    let request = Request {
        command,
        runtime: tokio::runtime::Handle::current(),
        reply,
    };
    let ended = || io::Error::other("the launcher threads have ended");
    launcher()?.send(request).map_err(|_| ended())?;
    if let Ok(result) = tokio::time::timeout(timeout, &mut started).await {
        return result.map_err(|_| ended())?;
    }
    let mut pid = [0; 4];
    let forked = matches!(rustix::io::read(pid_read, &mut pid), Ok(4));
    let pid = Pid::from_raw(i32::from_ne_bytes(pid)).filter(|_| forked);
    let Some(pid) = pid else {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the job's process was not forked in time: every launcher is busy",
        ));
    };
    // Not yet reaped (its launcher is still waiting for it), so the pid is still the child's.
    warn!(
        pid = pid.as_raw_nonzero().get(),
        timeout_ms = timeout.as_millis(),
        "a job's process was stopped before its program started: killing it"
    );
    let _ = rustix::process::kill_process(pid, Signal::KILL);
    match tokio::time::timeout(timeout, started).await {
        // Its launcher returns once the child is gone: the attempt ends as killed.
        Ok(result) => result.map_err(|_| ended())?,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the job's process could not be started or killed (is its cgroup frozen?)",
        )),
    }
}

/// Makes `command` start its process as `start` says, writing the process's pid to
/// `pid_write` first.
#[allow(unsafe_code)]
fn prepare(command: &mut Command, start: JobStart, pid_write: OwnedFd) {
    // Everything the child needs is computed here: between fork and exec only system calls
    // are made (no allocation, no lock), as is safe in the child of a threaded process.
    let agent = rustix::process::getpid();
    let limits = start.limits.each().map(|(resource, value)| {
        let both = Rlimit {
            current: Some(value),
            maximum: Some(value),
        };
        (resource, both)
    });
    let user = start
        .user
        .map(|(uid, gid)| (Uid::from_raw(uid), Gid::from_raw(gid)));
    let cgroup_procs = start.cgroup_procs;
    let child_setup = move || -> io::Result<()> {
        let pid = rustix::process::getpid().as_raw_nonzero().get();
        let _ = rustix::io::write(&pid_write, &pid.to_ne_bytes());
        for procs in &cgroup_procs {
            rustix::io::write(procs, b"0")?;
        }
        for (resource, limit) in limits {
            rustix::process::setrlimit(resource, limit)?;
        }
        if let Some((uid, gid)) = user {
            rustix::thread::set_thread_groups(&[])?;
            rustix::thread::set_thread_res_gid(gid, gid, gid)?;
            rustix::thread::set_thread_res_uid(uid, uid, uid)?;
            // Until its exec this process is a copy of the agent (its memory, its files): no
            // process of the job's uid may attach to it or read its memory.
            rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
            rustix::thread::set_no_new_privs(true)?;
        }
        rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
        // The agent may have ended before the signal was set: then nothing may run.
        if rustix::process::getppid() != Some(agent) {
            return Err(Errno::SRCH.into());
        }
        Ok(())
    };
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe work is allowed: it makes raw system calls through `rustix` on values
    // computed before the fork, and allocates nothing (its errors are plain errno values).
    unsafe {
        command.pre_exec(child_setup);
    }
}

struct Request {
    command: Command,
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<Child>>,
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

/// One launcher: takes the next request, forks its process, hands it back.
fn launch_loop(requests: &Mutex<mpsc::Receiver<Request>>) {
    loop {
        let next = requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        let Ok(Request {
            mut command,
            runtime,
            reply,
        }) = next
        else {
            return;
        };
        // A caller that has gone (its attempt aborted, its start timed out) starts nothing.
        if reply.is_closed() {
            continue;
        }
        // The child's pipes and its reaping belong to the caller's runtime; a child whose
        // caller has gone is dropped, and so killed, there too. A panic must not end this
        // thread: its children's death signal would fire.
        let _runtime = runtime.enter();
        let started = std::panic::catch_unwind(AssertUnwindSafe(|| command.spawn()))
            .unwrap_or_else(|_| Err(io::Error::other("starting the job's process panicked")));
        let _ = reply.send(started);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn no_limits() -> JobStart {
        JobStart {
            cgroup_procs: Vec::new(),
            limits: JobLimits::within_own(4096, 1024),
            user: None,
        }
    }

    #[tokio::test]
    async fn a_start_stopped_before_its_exec_is_killed_and_its_launcher_goes_on() {
        // Every launcher gets a child that stops itself after its set-up, before its exec.
        let mut stopped = Vec::new();
        for _ in 0..LAUNCHERS {
            let (pid_read, pid_write) = pid_pipe().unwrap();
            let mut command = Command::new("true");
            prepare(&mut command, no_limits(), pid_write);
            // SAFETY: one raw system call (kill of itself), as in `prepare`.
            #[allow(unsafe_code)]
            unsafe {
                command.pre_exec(|| {
                    rustix::process::kill_process(rustix::process::getpid(), Signal::STOP)?;
                    Ok(())
                });
            }
            stopped.push(tokio::spawn(async move {
                launch(command, &pid_read, Duration::from_millis(300)).await
            }));
        }
        for start in stopped {
            let mut child = start.await.unwrap().unwrap();
            let status = child.wait().await.unwrap();
            assert_eq!(status.signal(), Some(9), "{status:?}");
        }
        // Each launcher was freed by the kill: a start after them runs its program.
        for _ in 0..LAUNCHERS {
            let mut command = Command::new("true");
            command.kill_on_drop(true);
            let mut child = start(command, no_limits()).await.unwrap();
            assert!(child.wait().await.unwrap().success());
        }
    }

    #[tokio::test]
    async fn the_program_runs_with_its_limits() {
        let mut command = Command::new("sh");
        command
            .args(["-c", "ulimit -Sn; ulimit -Hn; ulimit -c"])
            .stdout(std::process::Stdio::piped());
        let child = start(command, no_limits()).await.unwrap();
        let out = child.wait_with_output().await.unwrap();
        assert!(out.status.success());
        let nofile = JobLimits::within_own(4096, 1024).max_open_files;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{nofile}\n{nofile}\n0\n")
        );
    }
}
