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
//! not only its process. So every job is forked on one thread that lives as long as the
//! agent's process (the launcher), never on a pool thread that could retire while the job
//! runs. The launcher also keeps the wait that a fork implies (until the child has exec'd, or
//! a cgroup move has waited for an RCU grace period) off the agent's runtime threads.
//!
//! Before, a job's chain was `sh` (held until the agent had moved it into its cgroup), then
//! `setpriv`, then the job: three programs started per job, each costing about 0.6 ms of CPU
//! on a virtual machine where glibc's start-up traps to the hypervisor (BENCHMARKS.md).

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::mpsc;

use rustix::io::Errno;
use rustix::process::{Gid, Rlimit, Signal, Uid};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::config::JobLimits;

/// How one job's process is to be started.
pub(crate) struct JobStart {
    /// The `cgroup.procs` file of the job's cgroup in each hierarchy, opened for writing (none
    /// when jobs have no cgroups).
    pub cgroup_procs: Vec<OwnedFd>,
    pub limits: JobLimits,
    /// The uid and gid the job runs as, when not the agent's.
    pub user: Option<(u32, u32)>,
}

/// Makes `command` start its process as `start` says (see the module's documentation).
#[allow(unsafe_code)]
pub(crate) fn prepare(command: &mut Command, start: JobStart) {
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

/// Starts `command` on the launcher thread (see the module's documentation), in the calling
/// task's runtime.
pub(crate) async fn spawn(command: Command) -> io::Result<Child> {
    let (reply, started) = oneshot::channel();
    let request = Request {
        command,
        runtime: tokio::runtime::Handle::current(),
        reply,
    };
    launcher()?
        .send(request)
        .map_err(|_| io::Error::other("the launcher thread has ended"))?;
    started
        .await
        .map_err(|_| io::Error::other("the launcher thread has ended"))?
}

struct Request {
    command: Command,
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<io::Result<Child>>,
}

/// The launcher's queue; the thread is started on first use and, as this keeps its queue
/// open, lives as long as the process.
static LAUNCHER: Mutex<Option<mpsc::Sender<Request>>> = Mutex::new(None);

fn launcher() -> io::Result<mpsc::Sender<Request>> {
    let mut launcher = LAUNCHER
        .lock()
        .map_err(|_| io::Error::other("the launcher's lock is poisoned"))?;
    if let Some(queue) = launcher.as_ref() {
        return Ok(queue.clone());
    }
    let (queue, requests) = mpsc::channel::<Request>();
    std::thread::Builder::new()
        .name("hodei-launcher".into())
        .spawn(move || {
            for Request {
                mut command,
                runtime,
                reply,
            } in requests
            {
                // The child's pipes and its reaping belong to the caller's runtime; a child
                // whose caller has gone is dropped, and so killed, there too.
                let _runtime = runtime.enter();
                let _ = reply.send(command.spawn());
            }
        })?;
    *launcher = Some(queue.clone());
    Ok(queue)
}
