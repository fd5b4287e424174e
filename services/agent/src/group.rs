//! Signalling a job's processes. Every job is started as the leader of its own group, so
//! signalling the group reaches everything the job started, unless a process left the group
//! on purpose (`setsid`). Where the job also has a cgroup ([`crate::cgroup`]), signals reach
//! every process in it as well, so such a process is stopped too.

use std::future::Future;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tracing::{debug, warn};

use crate::cgroup::JobCgroup;

/// How often [`ProcessGroup::wait_empty`] looks whether the group is empty.
const EMPTY_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A job's process group, named by its leader's pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcessGroup(Pid);

impl ProcessGroup {
    /// The group led by `pid`. `None` for 0 and 1 (which `killpg` reads as the agent's own
    /// group and init) and for pids beyond `i32`: signalling those would hit the wrong targets.
    pub fn led_by(pid: u32) -> Option<Self> {
        i32::try_from(pid)
            .ok()
            .filter(|pid| *pid > 1)
            .map(|pid| Self(Pid::from_raw(pid)))
    }

    /// The group id (the leader's pid).
    pub fn id(&self) -> i32 {
        self.0.as_raw()
    }

    /// Sends `signal` to every process in the group. Returns whether the group still had a
    /// process to signal.
    pub fn signal(&self, signal: Signal) -> bool {
        match killpg(self.0, signal) {
            Ok(()) => {
                debug!(pgid = self.id(), signal = %signal, "process group signalled");
                true
            }
            Err(Errno::ESRCH) => false,
            Err(e) => {
                warn!(pgid = self.id(), signal = %signal, error = %e, "failed to signal process group");
                false
            }
        }
    }

    /// Whether any process is left in the group.
    pub fn is_alive(&self) -> bool {
        killpg(self.0, None).is_ok()
    }

    /// Waits up to `within` for the group to have no process left; returns whether it is
    /// empty. There is no notification for a whole group ending, so this polls.
    pub async fn wait_empty(&self, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        while self.is_alive() {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(EMPTY_POLL_INTERVAL).await;
        }
        true
    }
}

/// Everything a job started: its process group and, where the host allows, its cgroup (which
/// also holds the processes that left the group).
#[derive(Debug, Clone)]
pub(crate) struct JobProcesses {
    group: Option<ProcessGroup>,
    cgroup: Option<JobCgroup>,
}

impl JobProcesses {
    /// The processes of the job whose first process is `pid`.
    pub fn new(pid: u32, cgroup: Option<JobCgroup>) -> Self {
        Self {
            group: ProcessGroup::led_by(pid),
            cgroup,
        }
    }

    /// Whether there is anything to signal by group or cgroup (else only the child itself).
    pub fn is_tracked(&self) -> bool {
        self.group.is_some() || self.cgroup.is_some()
    }

    /// The process group's id, for logs.
    pub fn pgid(&self) -> Option<i32> {
        self.group.map(|group| group.id())
    }

    /// Sends `signal` to the group and to everything in the cgroup. Returns whether any
    /// process was left to signal.
    pub fn signal(&self, signal: Signal) -> bool {
        let in_group = self.group.is_some_and(|group| group.signal(signal));
        let in_cgroup = self
            .cgroup
            .as_ref()
            .is_some_and(|cgroup| cgroup.signal(signal));
        in_group || in_cgroup
    }

    /// SIGKILL to the group, and to every process of the cgroup (forks included).
    pub async fn kill(&self) {
        if let Some(group) = self.group {
            group.signal(Signal::SIGKILL);
        }
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill().await;
        }
    }

    /// Waits up to `within` for no process to be left; returns whether none is.
    pub async fn wait_empty(&self, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        if let Some(group) = self.group
            && !group.wait_empty(within).await
        {
            return false;
        }
        match &self.cgroup {
            Some(cgroup) => {
                cgroup
                    .wait_empty(until.saturating_duration_since(tokio::time::Instant::now()))
                    .await
            }
            None => true,
        }
    }

    /// Stops the job: SIGTERM, up to `grace` for `done` to complete, then SIGKILL (to the
    /// whole cgroup, where there is one) and up to `after_kill` more. Returns `done`'s output,
    /// or `None` if it did not complete in time.
    pub async fn terminate<F: Future>(
        &self,
        grace: Duration,
        after_kill: Duration,
        done: F,
    ) -> Option<F::Output> {
        tokio::pin!(done);
        if self.signal(Signal::SIGTERM)
            && let Ok(output) = tokio::time::timeout(grace, &mut done).await
        {
            return Some(output);
        }
        self.kill().await;
        tokio::time::timeout(after_kill, &mut done).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;

    use tokio::io::{AsyncBufReadExt, BufReader};

    use super::*;

    #[test]
    fn pids_that_would_hit_other_groups_are_refused() {
        assert_eq!(ProcessGroup::led_by(0), None);
        assert_eq!(ProcessGroup::led_by(1), None);
        assert_eq!(ProcessGroup::led_by(u32::MAX), None);
        assert_eq!(ProcessGroup::led_by(1234).map(|g| g.id()), Some(1234));
    }

    #[tokio::test]
    async fn terminate_stops_a_group_that_ignores_sigterm() {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "trap '' TERM; echo ready; while :; do sleep 1; done"])
            .stdout(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // Signal only once the trap is in place.
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(stdout.next_line().await.unwrap().as_deref(), Some("ready"));
        let processes = JobProcesses::new(child.id().unwrap(), None);
        let status = processes
            .terminate(
                Duration::from_millis(200),
                Duration::from_secs(10),
                child.wait(),
            )
            .await
            .expect("the group dies after sigkill")
            .unwrap();
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    }
}
