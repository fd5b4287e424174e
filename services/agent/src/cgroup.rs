//! A cgroup for each job, where the host lets the agent make them. The job's requested memory
//! (else the memory the agent offers) and CPU become the cgroup's limits, and
//! `HODEI_JOB_MAX_PROCESSES` its pid limit. Stopping a job kills every process in its cgroup,
//! so a process that left the job's process group (`setsid`) dies with it too.
//!
//! Both hierarchies are supported:
//! - **cgroup v2**: jobs' cgroups go under `<agent's cgroup>/<agent folder>/` (see
//!   [`folder_name`]). The kernel hands controllers down only from a cgroup holding no process,
//!   so when its own cgroup refuses, the agent moves the processes of that cgroup into the leaf
//!   `<agent's cgroup>/hodei-agents` first (the usual arrangement for a delegated cgroup:
//!   systemd `Delegate=yes`, a container).
//! - **cgroup v1**: under `<agent's cgroup>/<agent folder>/` of each of the memory, cpu and pids
//!   hierarchies, and of freezer where it is mounted (a stop freezes the job before killing it,
//!   so nothing forks past the kill).
//!
//! The cgroups are kept for reuse: a job's cgroup, emptied at its end, takes the next job with
//! that job's limits, so the steady state makes and removes none (each costs the kernel, and a
//! 2-core host running short jobs felt it). A new incarnation of the agent removes them all.
//!
//! A job joins its cgroup before it runs anything: between its start and its exec, its process
//! writes itself into the `cgroup.procs` files the agent opened for it ([`crate::launch`]).
//!
//! Cgroups are files in a pseudo file system, but moving a process into one may wait for an
//! RCU grace period (about 10 ms here on cgroup v1): the calls made per job run on tokio's
//! blocking pool (and the move on the launcher's thread), never on the agent's runtime
//! threads.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hodei_domain::{Resources, WorkerId};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

/// Whether jobs run in cgroups of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CgroupMode {
    /// Whenever the host lets the agent make them; otherwise rlimits alone apply (logged at
    /// start).
    #[default]
    Auto,
    /// Always: the agent refuses to start where it cannot make them.
    Required,
    /// Never: rlimits alone apply, and a stop reaches only the job's process group.
    Off,
}

/// Why jobs cannot have cgroups, or one cgroup could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The host offers no hierarchy the agent can use.
    #[error("no usable cgroups: {0}")]
    Unavailable(String),
    /// A cgroup file or folder could not be read, written or made.
    #[error("failed to {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The blocking task doing the work failed.
    #[error("cgroup task failed: {0}")]
    Task(String),
}

/// Runs `work` on tokio's blocking pool.
async fn unblocked<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, CgroupError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| CgroupError::Task(e.to_string()))
}

/// The CFS period a job's CPU quota is expressed in (100 ms, the kernel's default).
const CFS_PERIOD_US: u64 = 100_000;
/// The smallest CFS quota the kernel takes.
const MIN_CFS_QUOTA_US: u64 = 1_000;
/// The leaf the agent's own processes move to on cgroup v2.
const V2_AGENT_LEAF: &str = "hodei-agents";
/// The controllers a job's cgroup needs.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];
/// How often [`JobCgroup::wait_empty`] looks.
const EMPTY_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long killed processes get to leave their cgroup before it is removed instead of reused.
const EMPTY_AFTER_KILL: Duration = Duration::from_secs(2);
/// Most memory still charged to an emptied cgroup (page cache, tmpfs) for it to take another
/// job: past it, the next job gets a fresh cgroup rather than its predecessor's charges.
const REUSE_MAX_CHARGED: u64 = 16 * 1024 * 1024;
/// Rounds of [`JobCgroup::kill_all`] before it gives up on processes that keep appearing.
const KILL_ROUNDS: usize = 20;

/// What a job's cgroup limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub memory_bytes: u64,
    /// None: no CPU quota.
    pub cpu_millis: Option<u64>,
    pub max_processes: u32,
}

impl Limits {
    /// The limits of a job that requested `requested`, on an agent offering `offered`: the
    /// requested memory, else all the memory the agent offers; the requested CPU, else none.
    pub fn for_job(requested: &Resources, offered: &Resources, max_processes: u32) -> Limits {
        let memory_mb = if requested.memory_mb > 0 {
            requested.memory_mb
        } else {
            offered.memory_mb
        };
        Limits {
            memory_bytes: memory_mb.saturating_mul(1024 * 1024).max(1024 * 1024),
            cpu_millis: (requested.cpu_millis > 0).then_some(requested.cpu_millis),
            max_processes: max_processes.max(1),
        }
    }

    /// The CFS quota in microseconds per [`CFS_PERIOD_US`].
    fn cfs_quota_us(millis: u64) -> u64 {
        (millis.saturating_mul(CFS_PERIOD_US) / 1000).max(MIN_CFS_QUOTA_US)
    }

    /// The files to write, in order, for each version (into a cgroup that may hold the limits
    /// of an earlier job).
    fn files(&self, v2: bool) -> Vec<(&'static str, String)> {
        let mut files = Vec::with_capacity(6);
        if v2 {
            files.push(("memory.max", self.memory_bytes.to_string()));
            // Optional: absent where the kernel has no swap accounting.
            files.push(("memory.swap.max", "0".to_owned()));
            let quota = self
                .cpu_millis
                .map_or_else(|| "max".to_owned(), |m| Self::cfs_quota_us(m).to_string());
            files.push(("cpu.max", format!("{quota} {CFS_PERIOD_US}")));
        } else {
            // The memory limit may not be above memory+swap's: lift that one first, then set
            // both (optional: absent where the kernel has no swap accounting), so that no
            // swapping happens past the limit.
            files.push(("memory.memsw.limit_in_bytes", "-1".to_owned()));
            files.push(("memory.limit_in_bytes", self.memory_bytes.to_string()));
            files.push(("memory.memsw.limit_in_bytes", self.memory_bytes.to_string()));
            files.push(("cpu.cfs_period_us", CFS_PERIOD_US.to_string()));
            let quota = self
                .cpu_millis
                .map_or_else(|| "-1".to_owned(), |m| Self::cfs_quota_us(m).to_string());
            files.push(("cpu.cfs_quota_us", quota));
        }
        files.push(("pids.max", self.max_processes.to_string()));
        files
    }
}

/// Files a kernel may lack (no swap accounting): skipped when absent.
const OPTIONAL_FILES: [&str; 2] = ["memory.swap.max", "memory.memsw.limit_in_bytes"];

/// Where this agent's jobs get their cgroups.
#[derive(Debug, Clone)]
enum Layout {
    V2 {
        base: PathBuf,
    },
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        pids: PathBuf,
        freezer: Option<PathBuf>,
    },
}

/// The folder under which this agent makes its jobs' cgroups, what they get by default, and the
/// emptied cgroups waiting for their next job.
#[derive(Debug, Clone)]
pub(crate) struct JobCgroups {
    layout: Layout,
    offered: Resources,
    free: Arc<Mutex<Vec<JobCgroup>>>,
    made: Arc<AtomicU64>,
}

impl JobCgroups {
    /// The cgroups of `worker`'s jobs as `mode` asks: `None` when off, or when the host has
    /// none to give and the mode is `Auto`. Whatever a previous incarnation of the worker left
    /// in them is killed and removed.
    pub fn for_agent(
        mode: CgroupMode,
        worker: &WorkerId,
        work_dir: &Path,
        offered: Resources,
    ) -> Result<Option<JobCgroups>, CgroupError> {
        if mode == CgroupMode::Off {
            info!("job cgroups off: rlimits alone limit jobs");
            return Ok(None);
        }
        let usable = Self::detect(&folder_name(worker, work_dir)).and_then(|layout| {
            let cgroups = JobCgroups {
                layout,
                offered,
                free: Arc::default(),
                made: Arc::default(),
            };
            cgroups.sweep();
            // One cgroup made and limited as a job's would be (a CPU quota included), so a
            // host that cannot is found now rather than at every job.
            let probe = cgroups.take_now(&Resources::new(1000, 0), 1)?;
            cgroups.keep(probe)?;
            Ok(cgroups)
        });
        match usable {
            Ok(cgroups) => {
                info!(base = %cgroups.base().display(), v2 = cgroups.is_v2(), "jobs run in cgroups of their own");
                Ok(Some(cgroups))
            }
            Err(e) if mode == CgroupMode::Auto => {
                warn!(error = %e, "jobs run without cgroups: rlimits alone limit them, and a process that leaves a job's process group survives its stop (set HODEI_JOB_CGROUPS=required to refuse this)");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn is_v2(&self) -> bool {
        matches!(self.layout, Layout::V2 { .. })
    }

    /// The folder every process of the job is listed in (v1: the pids hierarchy's).
    fn base(&self) -> &Path {
        match &self.layout {
            Layout::V2 { base } => base,
            Layout::V1 { pids, .. } => pids,
        }
    }

    fn detect(name: &str) -> Result<Layout, CgroupError> {
        let me = procfs::process::Process::myself()
            .map_err(|e| CgroupError::Unavailable(format!("failed to read /proc/self: {e}")))?;
        let mounts: Vec<_> = me
            .mountinfo()
            .map_err(|e| CgroupError::Unavailable(format!("failed to read mountinfo: {e}")))?
            .into_iter()
            .collect();
        let groups = me.cgroups().map_err(|e| {
            CgroupError::Unavailable(format!("failed to read /proc/self/cgroup: {e}"))
        })?;
        if let Some(own) = own_dir(&mounts, &groups, None)
            && offers(&own, &CONTROLLERS)
        {
            return prepare_v2(&own, name).map(|base| Layout::V2 { base });
        }
        let dir = |controller| own_dir(&mounts, &groups, Some(controller));
        let (Some(memory), Some(cpu), Some(pids)) = (dir("memory"), dir("cpu"), dir("pids")) else {
            return Err(CgroupError::Unavailable(
                "neither a cgroup v2 hierarchy offering the memory, cpu and pids controllers nor \
                 cgroup v1 hierarchies of all three are mounted"
                    .to_owned(),
            ));
        };
        let layout = Layout::V1 {
            memory: memory.join(name),
            cpu: cpu.join(name),
            pids: pids.join(name),
            freezer: dir("freezer").map(|dir| dir.join(name)),
        };
        for base in layout_dirs(&layout) {
            create_dir(&base)?;
        }
        Ok(layout)
    }

    fn named(&self, name: &str) -> JobCgroup {
        match &self.layout {
            Layout::V2 { base } => JobCgroup {
                v2: true,
                dirs: vec![base.join(name)],
                freezer: None,
                oom_kills_before: 0,
                limits: None,
            },
            Layout::V1 {
                memory,
                cpu,
                pids,
                freezer,
            } => {
                // The pids hierarchy's first: the process list is read there.
                let mut dirs = vec![pids.join(name), memory.join(name), cpu.join(name)];
                let freezer = freezer.as_ref().map(|dir| dir.join(name));
                dirs.extend(freezer.clone());
                JobCgroup {
                    v2: false,
                    dirs,
                    freezer,
                    oom_kills_before: 0,
                    limits: None,
                }
            }
        }
    }

    /// An empty cgroup for a job that requested `requested`, with its limits: a free one, else
    /// a new one.
    pub async fn take(
        &self,
        requested: Resources,
        max_processes: u32,
    ) -> Result<JobCgroup, CgroupError> {
        let cgroups = self.clone();
        unblocked(move || cgroups.take_now(&requested, max_processes)).await?
    }

    fn take_now(
        &self,
        requested: &Resources,
        max_processes: u32,
    ) -> Result<JobCgroup, CgroupError> {
        let limits = Limits::for_job(requested, &self.offered, max_processes);
        let free = self.free.lock().ok().and_then(|mut free| free.pop());
        if let Some(mut cgroup) = free {
            // A reused cgroup may refuse a lower memory limit (charges of its last job that
            // cannot be reclaimed): a new one then.
            match cgroup.ready(&limits) {
                Ok(()) => return Ok(cgroup),
                Err(_) => {
                    if let Err(e) = cgroup.remove() {
                        warn!(error = %e, "failed to remove a free job cgroup that could not be reused");
                    }
                }
            }
        }
        let mut cgroup = self.make_new()?;
        match cgroup.ready(&limits) {
            Ok(()) => Ok(cgroup),
            Err(e) => {
                if let Err(e) = cgroup.remove() {
                    warn!(error = %e, "failed to remove a job cgroup whose limits could not be set");
                }
                Err(e)
            }
        }
    }

    /// A cgroup that did not exist: a name already taken (a folder the sweep could not
    /// remove, with something still in it) is skipped.
    fn make_new(&self) -> Result<JobCgroup, CgroupError> {
        const TRIES: usize = 64;
        let mut last = None;
        for _ in 0..TRIES {
            let n = self.made.fetch_add(1, Ordering::Relaxed);
            let cgroup = self.named(&format!("job-{n}"));
            let Some((first, rest)) = cgroup.dirs.split_first() else {
                break;
            };
            match fs::create_dir(first) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    last = Some(io_error("create", first, e));
                    continue;
                }
                Err(e) => return Err(io_error("create", first, e)),
            }
            for dir in rest {
                if let Err(e) = create_dir(dir) {
                    let _ = cgroup.remove();
                    return Err(e);
                }
            }
            return Ok(cgroup);
        }
        Err(last.unwrap_or_else(|| {
            CgroupError::Unavailable("no free name for a job cgroup".to_owned())
        }))
    }

    /// Puts an empty cgroup with little memory still charged to it back in the pool; removes
    /// any other.
    fn keep(&self, cgroup: JobCgroup) -> Result<(), CgroupError> {
        if cgroup.is_empty()
            && cgroup.memory_charged() <= REUSE_MAX_CHARGED
            && let Ok(mut free) = self.free.lock()
        {
            free.push(cgroup);
            return Ok(());
        }
        cgroup.remove()
    }

    /// Once its job has ended: kills whatever is left in `cgroup`, and keeps it for the next
    /// job (or removes it, if something would not die).
    pub async fn give_back(&self, cgroup: JobCgroup) -> Released {
        let cgroups = self.clone();
        unblocked(move || {
            let oom_kills = cgroup.oom_kills().saturating_sub(cgroup.oom_kills_before);
            let memory_limit = cgroup.memory_limit().unwrap_or_default();
            let killed = cgroup.kill_all();
            // Killed processes leave the cgroup a moment after the signal.
            cgroup.wait_empty_blocking(EMPTY_AFTER_KILL);
            let kept = cgroups.keep(cgroup);
            Released {
                oom_kills,
                memory_limit,
                killed,
                kept,
            }
        })
        .await
        .unwrap_or_else(|e| Released {
            oom_kills: 0,
            memory_limit: 0,
            killed: 0,
            kept: Err(e),
        })
    }

    /// Kills and removes every job cgroup left under this agent's folders (by an earlier
    /// incarnation of the worker: this one has started nothing yet).
    fn sweep(&self) {
        let names: Vec<String> = match fs::read_dir(self.base()) {
            Ok(entries) => entries
                .flatten()
                .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|entry| entry.file_name().into_string().ok())
                .collect(),
            Err(e) => {
                warn!(base = %self.base().display(), error = %e, "failed to list job cgroups");
                return;
            }
        };
        for name in names {
            let cgroup = self.named(&name);
            let killed = cgroup.kill_all();
            match cgroup.remove() {
                Ok(()) => {
                    info!(cgroup = %name, killed, "removed a job cgroup of the previous incarnation");
                }
                Err(e) => {
                    warn!(cgroup = %name, killed, error = %e, "failed to remove a job cgroup of the previous incarnation");
                }
            }
        }
    }

    /// Removes the free cgroups and this agent's folders, if no job cgroup is left in them.
    pub fn remove(&self) {
        let free = self
            .free
            .lock()
            .map(|mut free| std::mem::take(&mut *free))
            .unwrap_or_default();
        for cgroup in free {
            if let Err(e) = cgroup.remove() {
                debug!(error = %e, "free job cgroup not removed");
            }
        }
        let dirs = layout_dirs(&self.layout);
        for dir in dirs {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    debug!(dir = %dir.display(), error = %e, "agent cgroup folder not removed");
                }
            }
        }
    }
}

/// The folder of an agent's job cgroups: `hodei-<worker>-<digest of its work folder>`. The
/// work folder tells agents apart as their attempt records do: a restart with the same one
/// finds what its previous incarnation left, and agents with the same worker id but their own
/// work folders (test systems on one host) do not meet.
fn folder_name(worker: &WorkerId, work_dir: &Path) -> String {
    let work_dir = fs::canonicalize(work_dir).unwrap_or_else(|_| work_dir.to_path_buf());
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        work_dir.as_os_str().as_encoded_bytes(),
    );
    let short: String = digest
        .as_ref()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("hodei-{worker}-{short}")
}

fn layout_dirs(layout: &Layout) -> Vec<PathBuf> {
    match layout {
        Layout::V2 { base } => vec![base.clone()],
        Layout::V1 {
            memory,
            cpu,
            pids,
            freezer,
        } => {
            let mut dirs = vec![memory.clone(), cpu.clone(), pids.clone()];
            dirs.extend(freezer.clone());
            dirs
        }
    }
}

/// The folder of this process's own cgroup in the hierarchy of `controller` (v1), or in the
/// v2 hierarchy for `None`.
fn own_dir(
    mounts: &[procfs::process::MountInfo],
    groups: &procfs::ProcessCGroups,
    controller: Option<&str>,
) -> Option<PathBuf> {
    let (fs_type, group) = match controller {
        None => (
            "cgroup2",
            groups
                .0
                .iter()
                .find(|g| g.hierarchy == 0 && g.controllers.is_empty())?,
        ),
        Some(name) => (
            "cgroup",
            groups
                .0
                .iter()
                .find(|g| g.controllers.iter().any(|c| c == name))?,
        ),
    };
    let mount = mounts.iter().find(|m| {
        m.fs_type == fs_type
            && controller.is_none_or(|name| m.super_options.contains_key(name))
            && Path::new(&group.pathname).starts_with(&m.root)
    })?;
    let relative = Path::new(&group.pathname).strip_prefix(&mount.root).ok()?;
    Some(mount.mount_point.join(relative))
}

/// Whether the v2 cgroup `dir` offers all of `controllers`.
fn offers(dir: &Path, controllers: &[&str]) -> bool {
    fs::read_to_string(dir.join("cgroup.controllers")).is_ok_and(|offered| {
        let offered: Vec<&str> = offered.split_whitespace().collect();
        controllers.iter().all(|c| offered.contains(c))
    })
}

/// Hands the controllers down from `own` to `own/<name>` and from there to the jobs' cgroups;
/// returns `own/<name>`.
fn prepare_v2(own: &Path, name: &str) -> Result<PathBuf, CgroupError> {
    // An agent started from the leaf an earlier agent moved into works from its parent, so
    // that it finds what that agent left (and leaves no nested leaves).
    let own = match own.parent() {
        Some(parent) if own.ends_with(V2_AGENT_LEAF) => parent,
        _ => own,
    };
    let enable = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
    if let Err(e) = fs::write(own.join("cgroup.subtree_control"), &enable) {
        // EBUSY: processes live in `own` itself. They move to a leaf of their own.
        if e.raw_os_error() != Some(nix::libc::EBUSY) {
            return Err(io_error("enable controllers in", own, e));
        }
        let leaf = own.join(V2_AGENT_LEAF);
        create_dir(&leaf)?;
        let procs = read(&own.join("cgroup.procs"))?;
        for pid in procs.split_whitespace() {
            match fs::write(leaf.join("cgroup.procs"), pid) {
                Ok(()) => {}
                // Gone meanwhile.
                Err(e) if e.raw_os_error() == Some(nix::libc::ESRCH) => {}
                Err(e) => return Err(io_error("move a process into", &leaf, e)),
            }
        }
        info!(leaf = %leaf.display(), "agent moved into a leaf cgroup so that jobs can have controllers");
        write(&own.join("cgroup.subtree_control"), &enable)?;
    }
    let base = own.join(name);
    create_dir(&base)?;
    write(&base.join("cgroup.subtree_control"), &enable)?;
    Ok(base)
}

fn io_error(what: &'static str, path: &Path, source: io::Error) -> CgroupError {
    CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn create_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_error("create", dir, e)),
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(|e| io_error("write", path, e))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|e| io_error("read", path, e))
}

/// One job's cgroup: a folder (v2), or one in each hierarchy (v1).
#[derive(Debug, Clone)]
pub(crate) struct JobCgroup {
    v2: bool,
    /// The first lists the job's processes.
    dirs: Vec<PathBuf>,
    freezer: Option<PathBuf>,
    /// The kernel's count of processes killed at the memory limit when the job took it.
    oom_kills_before: u64,
    /// The limits last written, by this agent, into the cgroup's files (which only root can
    /// write: a job running as a user of its own cannot change them).
    limits: Option<Limits>,
}

impl JobCgroup {
    /// Sets `limits` (unless the cgroup's last job had the same) and notes the out-of-memory
    /// count the job starts from. Writing a CPU quota makes the kernel update the cgroup's
    /// bandwidth on every CPU, which showed in the agent's profile when every job rewrote the
    /// same limits.
    fn ready(&mut self, limits: &Limits) -> Result<(), CgroupError> {
        if self.limits.as_ref() != Some(limits) {
            self.limits = None;
            self.limit(limits)?;
            self.limits = Some(*limits);
        }
        self.oom_kills_before = self.oom_kills();
        Ok(())
    }

    fn limit(&self, limits: &Limits) -> Result<(), CgroupError> {
        for (file, value) in limits.files(self.v2) {
            let Some(path) = self
                .dirs
                .iter()
                .map(|dir| dir.join(file))
                .find(|p| p.exists())
            else {
                if OPTIONAL_FILES.contains(&file) {
                    continue;
                }
                return Err(CgroupError::Unavailable(format!(
                    "no {file} in the job's cgroup"
                )));
            };
            write(&path, &value)?;
        }
        Ok(())
    }

    /// The folder whose `cgroup.procs` lists every process of the job.
    fn procs_dir(&self) -> &Path {
        // `dirs` is never empty: see `JobCgroups::named`.
        self.dirs.first().map_or(Path::new("/nonexistent"), |d| d)
    }

    /// The cgroup's `cgroup.procs` in every hierarchy, opened for writing (and closed on exec):
    /// a process that writes `0` to each moves itself into the cgroup.
    pub fn procs_files(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.dirs
            .iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|e| io_error("open", &path, e))
            })
            .collect()
    }

    /// The processes in the cgroup (none when it does not exist).
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.procs_dir().join("cgroup.procs"))
            .map(|procs| {
                procs
                    .split_whitespace()
                    .filter_map(|pid| pid.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether no process is left in it.
    pub fn is_empty(&self) -> bool {
        self.pids().is_empty()
    }

    /// Sends `signal` to every process in it; returns whether there was one.
    pub fn signal(&self, signal: Signal) -> bool {
        let pids = self.pids();
        for pid in &pids {
            if let Err(e) = kill(Pid::from_raw(*pid), signal)
                && e != nix::errno::Errno::ESRCH
            {
                warn!(pid, signal = %signal, error = %e, "failed to signal a job process");
            }
        }
        !pids.is_empty()
    }

    /// Waits up to `within` for it to hold no process; returns whether it is empty. (Polled:
    /// v1 has no notification for it.)
    pub async fn wait_empty(&self, within: Duration) -> bool {
        let until = tokio::time::Instant::now() + within;
        while !self.is_empty() {
            if tokio::time::Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(EMPTY_POLL_INTERVAL).await;
        }
        true
    }

    /// SIGKILLs every process in it, including those forked while this runs; returns how many
    /// were signalled. v2 has the kernel do it (`cgroup.kill`); v1 freezes the cgroup first,
    /// where the freezer is mounted.
    pub async fn kill(&self) -> usize {
        let cgroup = self.clone();
        unblocked(move || cgroup.kill_all())
            .await
            .unwrap_or_else(|e| {
                warn!(error = %e, "failed to kill a job cgroup");
                0
            })
    }

    fn kill_all(&self) -> usize {
        // The usual case, a job whose processes all ended: nothing to freeze or kill.
        if self.is_empty() {
            return 0;
        }
        if self.v2 {
            let file = self.procs_dir().join("cgroup.kill");
            if file.exists() {
                let count = self.pids().len();
                if let Err(e) = fs::write(&file, "1") {
                    warn!(cgroup = %self.procs_dir().display(), error = %e, "failed to kill a job cgroup");
                }
                return count;
            }
        }
        let mut killed = std::collections::HashSet::new();
        for _ in 0..KILL_ROUNDS {
            let frozen = self.freeze(true);
            let pids = self.pids();
            for pid in &pids {
                if kill(Pid::from_raw(*pid), Signal::SIGKILL).is_ok() {
                    killed.insert(*pid);
                }
            }
            // A frozen process dies of SIGKILL once thawed.
            if frozen {
                self.freeze(false);
            }
            if pids.is_empty() || self.is_empty() {
                break;
            }
            std::thread::yield_now();
        }
        killed.len()
    }

    /// [`JobCgroup::wait_empty`] for the blocking pool.
    fn wait_empty_blocking(&self, within: Duration) -> bool {
        let until = std::time::Instant::now() + within;
        while !self.is_empty() {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Bytes of memory charged to it now.
    fn memory_charged(&self) -> u64 {
        self.read_first("memory.current", "memory.usage_in_bytes")
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The file named `v2` (or `v1`, on cgroup v1) of the first of its folders that has it.
    fn read_first(&self, v2: &str, v1: &str) -> Option<String> {
        let file = if self.v2 { v2 } else { v1 };
        self.dirs
            .iter()
            .find_map(|dir| fs::read_to_string(dir.join(file)).ok())
    }

    /// Freezes (or thaws) the cgroup, where a v1 freezer is mounted; returns whether it did.
    fn freeze(&self, freeze: bool) -> bool {
        let Some(dir) = &self.freezer else {
            return false;
        };
        let state = if freeze { "FROZEN" } else { "THAWED" };
        if let Err(e) = fs::write(dir.join("freezer.state"), state) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(cgroup = %dir.display(), state, error = %e, "failed to change a job cgroup's freezer state");
            }
            return false;
        }
        if freeze {
            // FREEZING until every task stopped; a few tries, then the kill goes on anyway.
            for _ in 0..100 {
                match fs::read_to_string(dir.join("freezer.state")) {
                    Ok(now) if now.trim() == "FROZEN" => break,
                    Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                    Err(_) => break,
                }
            }
        }
        true
    }

    /// How many processes the kernel killed in it for going over its memory limit.
    fn oom_kills(&self) -> u64 {
        self.read_first("memory.events", "memory.oom_control")
            .and_then(|text| {
                text.lines().find_map(|line| {
                    line.strip_prefix("oom_kill ")
                        .and_then(|n| n.trim().parse().ok())
                })
            })
            .unwrap_or(0)
    }

    /// Its memory limit in bytes, as set.
    fn memory_limit(&self) -> Option<u64> {
        self.read_first("memory.max", "memory.limit_in_bytes")
            .and_then(|text| text.trim().parse().ok())
    }

    /// Removes it (every process must be gone); a cgroup that does not exist is fine.
    fn remove(&self) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error("remove", dir, e)),
            }
        }
        Ok(())
    }
}

/// What [`JobCgroups::give_back`] found and did.
#[derive(Debug)]
pub(crate) struct Released {
    /// Processes the kernel killed at the memory limit.
    pub oom_kills: u64,
    /// The memory limit in bytes.
    pub memory_limit: u64,
    /// Processes still there, killed.
    pub killed: usize,
    /// Kept for the next job, or removed.
    pub kept: Result<(), CgroupError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_are_told_apart_by_worker_and_work_folder() {
        let worker: WorkerId = "w-1".parse().unwrap();
        let a = folder_name(&worker, Path::new("/nonexistent/a"));
        assert_eq!(a, folder_name(&worker, Path::new("/nonexistent/a")));
        assert_ne!(a, folder_name(&worker, Path::new("/nonexistent/b")));
        assert!(
            a.starts_with("hodei-w-1-") && a.len() == "hodei-w-1-".len() + 12,
            "{a}"
        );
    }

    #[test]
    fn limits_follow_the_request_and_fall_back_to_what_the_agent_offers() {
        let offered = Resources::new(2000, 4096);
        let requested = Limits::for_job(&Resources::new(500, 256), &offered, 64);
        assert_eq!(requested.memory_bytes, 256 * 1024 * 1024);
        assert_eq!(requested.cpu_millis, Some(500));
        assert_eq!(requested.max_processes, 64);
        let unrequested = Limits::for_job(&Resources::default(), &offered, 0);
        assert_eq!(unrequested.memory_bytes, 4096 * 1024 * 1024);
        assert_eq!(unrequested.cpu_millis, None);
        assert_eq!(unrequested.max_processes, 1);
    }

    #[test]
    fn limits_are_written_in_each_versions_files() {
        let limits = Limits {
            memory_bytes: 64 * 1024 * 1024,
            cpu_millis: Some(250),
            max_processes: 10,
        };
        assert_eq!(
            limits.files(true),
            vec![
                ("memory.max", "67108864".to_owned()),
                ("memory.swap.max", "0".to_owned()),
                ("cpu.max", "25000 100000".to_owned()),
                ("pids.max", "10".to_owned()),
            ]
        );
        assert_eq!(
            limits.files(false),
            vec![
                ("memory.memsw.limit_in_bytes", "-1".to_owned()),
                ("memory.limit_in_bytes", "67108864".to_owned()),
                ("memory.memsw.limit_in_bytes", "67108864".to_owned()),
                ("cpu.cfs_period_us", "100000".to_owned()),
                ("cpu.cfs_quota_us", "25000".to_owned()),
                ("pids.max", "10".to_owned()),
            ]
        );
        let uncapped = Limits {
            cpu_millis: None,
            ..limits
        };
        assert!(
            uncapped
                .files(true)
                .contains(&("cpu.max", "max 100000".to_owned()))
        );
        assert!(
            uncapped
                .files(false)
                .contains(&("cpu.cfs_quota_us", "-1".to_owned()))
        );
        // A sliver of a core still gets the smallest quota the kernel takes.
        assert_eq!(Limits::cfs_quota_us(1), MIN_CFS_QUOTA_US);
    }
}
