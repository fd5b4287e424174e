//! The agent's configuration: [`AgentConfig`] as given on the command line or in `HODEI_*`
//! environment variables, and [`Settings`], the same values checked and completed with the
//! host's defaults (worker id from the hostname, capacity from the hardware).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hodei_domain::{Resources, WorkerId};
use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use crate::cgroup::CgroupMode;
use crate::error::AgentError;
use crate::identity::{JobUser, JobUserError, is_root};

/// Longest worker id the domain accepts.
const MAX_WORKER_ID_LEN: usize = 64;
/// Worker id used when the hostname is unknown or has no usable character.
const FALLBACK_WORKER_ID: &str = "agent";

/// How an agent is configured: flags, with `HODEI_*` environment variables as fallbacks.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "hodei-agent", version, about = "Runs Hodei jobs on this host")]
pub struct AgentConfig {
    /// NATS server to connect to.
    #[arg(long, env = "HODEI_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    #[command(flatten)]
    pub nats_auth: hodei_messaging::NatsCredentialArgs,
    /// This worker's id (ASCII letters, digits, '-' and '_'); defaults to the hostname with
    /// every other character replaced by '-'.
    #[arg(long, env = "HODEI_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Labels jobs can require, as comma-separated `key=value` pairs, e.g. `gpu=true,os=linux`.
    #[arg(long, env = "HODEI_AGENT_LABELS", default_value = "")]
    pub labels: String,
    /// Most attempts this agent runs at once.
    #[arg(long, env = "HODEI_MAX_CONCURRENT_JOBS", default_value_t = 4)]
    pub max_concurrent_jobs: u32,
    /// CPU offered to jobs, in thousandths of a core; defaults to 1000 per core.
    #[arg(long, env = "HODEI_AGENT_CPU_MILLIS")]
    pub cpu_millis: Option<u64>,
    /// Memory offered to jobs, in MiB; defaults to the host's total memory.
    #[arg(long, env = "HODEI_AGENT_MEMORY_MB")]
    pub memory_mb: Option<u64>,
    /// Folder holding the jobs' workspaces; defaults to `<temp dir>/hodei-agent-<worker id>`.
    #[arg(long, env = "HODEI_WORK_DIR")]
    pub work_dir: Option<PathBuf>,
    /// Milliseconds between heartbeats.
    #[arg(long, env = "HODEI_HEARTBEAT_INTERVAL_MS", default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,
    /// Milliseconds a job gets between SIGTERM and SIGKILL when it is stopped.
    #[arg(long, env = "HODEI_KILL_GRACE_MS", default_value_t = 10_000)]
    pub kill_grace_ms: u64,
    /// Milliseconds the agent keeps running attempts without reaching NATS. Past it, it stops
    /// them itself (SIGTERM, kill grace, SIGKILL) and reports them once reconnected; the
    /// registry hands a silent worker's attempts back only after lease plus kill grace. The
    /// default survives a 10 s NATS restart without stopping any work.
    #[arg(long, env = "HODEI_LEASE_MS", default_value_t = 15_000)]
    pub lease_ms: u64,
    /// Milliseconds running attempts get to finish when the agent shuts down.
    #[arg(long, env = "HODEI_DRAIN_TIMEOUT_MS", default_value_t = 60_000)]
    pub drain_timeout_ms: u64,
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz` (port 0 picks a
    /// free port); none when unset.
    #[arg(long, env = "HODEI_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Most bytes of artifacts one pipeline step may keep; a step producing more fails.
    #[arg(long, env = "HODEI_ARTIFACT_MAX_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub artifact_max_bytes: u64,
    /// Who jobs run as, for an agent running as root: a user name or uid (every job runs as
    /// it), or a uid range such as `61184-61439` (each running attempt gets a uid of its own,
    /// so concurrent jobs cannot read each other's workspaces; needs at least as many uids
    /// as slots; agents on one host need ranges that do not overlap). Unset or empty: jobs
    /// run as the agent's own user.
    #[arg(long, env = "HODEI_JOB_USER")]
    pub job_user: Option<String>,
    /// Most processes a job's user may have at once (RLIMIT_NPROC): with a uid range, a fork
    /// bomb stops at its own attempt's limit. Not enforced for jobs running as root.
    #[arg(long, env = "HODEI_JOB_MAX_PROCESSES", default_value_t = 4096)]
    pub job_max_processes: u32,
    /// Most files a job's process may hold open (RLIMIT_NOFILE).
    #[arg(long, env = "HODEI_JOB_MAX_OPEN_FILES", default_value_t = 65_536)]
    pub job_max_open_files: u32,
    /// Whether each job runs in a cgroup of its own, limited to its requested memory (else the
    /// memory this agent offers), its requested CPU and HODEI_JOB_MAX_PROCESSES processes, and
    /// whose every process dies when the job is stopped: `auto` where the host lets the agent
    /// make cgroups (as root, or in a delegated cgroup), `required` (refuse to start without),
    /// or `off`.
    #[arg(long, env = "HODEI_JOB_CGROUPS", value_enum, default_value_t = CgroupMode::Auto)]
    pub job_cgroups: CgroupMode,
}

impl AgentConfig {
    /// Most threads of the runtime's blocking pool (workspaces made and removed, attempt
    /// records, cgroups, name look-ups): half the slots, at least 8. The pool is otherwise
    /// unbounded, and each of its threads is a stack and a malloc arena more (which every job's
    /// fork copied, when jobs were forked, and the agent then faulted back in): at 16 slots the
    /// pool grew to about 25 threads. Bounded to 4, real agents ran 8-10 % more jobs/s, and
    /// bounded to 8 about 4 % fewer than that (BENCHMARKS.md); 8 leaves room for a few slow
    /// workspace removals before a job's stop or a NATS reconnection waits behind them.
    pub fn blocking_threads(&self) -> usize {
        usize::try_from(self.max_concurrent_jobs / 2)
            .unwrap_or(usize::MAX)
            .max(8)
    }
}

/// The configuration checked and completed: what the agent runs with.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub nats_url: String,
    pub nats_auth: hodei_messaging::NatsAuth,
    pub worker_id: WorkerId,
    pub labels: BTreeMap<String, String>,
    pub max_concurrent_jobs: u32,
    pub capacity: Resources,
    pub work_dir: PathBuf,
    pub heartbeat_interval: Duration,
    pub kill_grace: Duration,
    /// How long attempts run on without contact with NATS.
    pub lease: Duration,
    pub drain_timeout: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub artifact_max_bytes: u64,
    pub job_user: Option<JobUser>,
    pub job_limits: JobLimits,
    pub job_cgroups: CgroupMode,
}

/// The resource limits every job starts with (core dumps are always off: they would write
/// the job's memory, secrets included, to disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    pub max_processes: u32,
    pub max_open_files: u32,
}

impl JobLimits {
    /// The limits asked for, lowered to the agent's own hard limits: a job cannot be given
    /// more than the agent has (raising a hard limit takes CAP_SYS_RESOURCE).
    pub fn within_own(max_processes: u32, max_open_files: u32) -> JobLimits {
        use nix::sys::resource::{Resource, getrlimit};
        let hard = |resource, asked: u32| {
            getrlimit(resource).map_or(asked, |(_, hard)| {
                u32::try_from(hard.min(u64::from(asked))).unwrap_or(asked)
            })
        };
        JobLimits {
            max_processes: hard(Resource::RLIMIT_NPROC, max_processes.max(1)),
            max_open_files: hard(Resource::RLIMIT_NOFILE, max_open_files.max(16)),
        }
    }

    /// Every limit a job gets (soft and hard): its resource and its value.
    pub(crate) fn each(&self) -> [(rustix::process::Resource, u64); 3] {
        use rustix::process::Resource;
        [
            (Resource::Nproc, u64::from(self.max_processes)),
            (Resource::Nofile, u64::from(self.max_open_files)),
            (Resource::Core, 0),
        ]
    }
}

impl Settings {
    /// Checks `config` and fills in the host's defaults.
    pub fn from_config(config: AgentConfig) -> Result<Settings, AgentError> {
        let worker_id = match config.worker_id.as_deref() {
            Some(id) => id.parse().map_err(AgentError::WorkerId)?,
            None => worker_id_from_hostname(System::host_name().as_deref())?,
        };
        let labels = parse_labels(&config.labels)?;
        if config.max_concurrent_jobs == 0 {
            return Err(invalid("max_concurrent_jobs", "must be at least 1"));
        }
        if config.heartbeat_interval_ms == 0 {
            return Err(invalid("heartbeat_interval_ms", "must be at least 1"));
        }
        let terms =
            hodei_domain::LeaseTerms::new(config.lease_ms, config.kill_grace_ms).map_err(|_| {
                invalid(
                    "lease_ms",
                    "lease must be 1 ms to 1 day, kill grace at most 1 day",
                )
            })?;
        let job_user = config
            .job_user
            .as_deref()
            .filter(|value| !value.is_empty())
            .map(|value| {
                let user = JobUser::parse(value, config.max_concurrent_jobs)?;
                if is_root() {
                    Ok(user)
                } else {
                    Err(JobUserError::NotRoot)
                }
            })
            .transpose()?;
        let capacity = host_capacity(config.cpu_millis, config.memory_mb);
        let work_dir = config
            .work_dir
            .unwrap_or_else(|| std::env::temp_dir().join(format!("hodei-agent-{worker_id}")));
        Ok(Settings {
            nats_url: config.nats_url,
            nats_auth: config.nats_auth.load()?,
            worker_id,
            labels,
            max_concurrent_jobs: config.max_concurrent_jobs,
            capacity,
            work_dir,
            heartbeat_interval: Duration::from_millis(config.heartbeat_interval_ms),
            kill_grace: Duration::from_millis(terms.kill_grace_ms),
            lease: Duration::from_millis(terms.lease_ms),
            drain_timeout: Duration::from_millis(config.drain_timeout_ms),
            metrics_addr: config.metrics_addr,
            artifact_max_bytes: config.artifact_max_bytes,
            job_user,
            job_limits: JobLimits::within_own(config.job_max_processes, config.job_max_open_files),
            job_cgroups: config.job_cgroups,
        })
    }
}

fn invalid(field: &'static str, reason: &'static str) -> AgentError {
    AgentError::InvalidConfig { field, reason }
}

/// The capacity offered: what the configuration says, else the host's cores and memory.
fn host_capacity(cpu_millis: Option<u64>, memory_mb: Option<u64>) -> Resources {
    if let (Some(cpu), Some(memory)) = (cpu_millis, memory_mb) {
        return Resources::new(cpu, memory);
    }
    let system = System::new_with_specifics(
        RefreshKind::nothing()
            .with_cpu(CpuRefreshKind::nothing())
            .with_memory(MemoryRefreshKind::nothing().with_ram()),
    );
    let cores = u64::try_from(system.cpus().len())
        .unwrap_or(u64::MAX)
        .max(1);
    Resources::new(
        cpu_millis.unwrap_or_else(|| cores.saturating_mul(1000)),
        memory_mb.unwrap_or_else(|| system.total_memory() / (1024 * 1024)),
    )
}

/// A worker id made from the hostname: every character outside `[A-Za-z0-9_-]` becomes '-',
/// cut to 64 characters; `agent` when there is no hostname.
pub(crate) fn worker_id_from_hostname(hostname: Option<&str>) -> Result<WorkerId, AgentError> {
    let sanitised: String = hostname
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_WORKER_ID_LEN)
        .collect();
    let id = if sanitised.is_empty() {
        FALLBACK_WORKER_ID
    } else {
        &sanitised
    };
    id.parse().map_err(AgentError::WorkerId)
}

/// Parses `key=value,key=value`. Keys are 1 to 63 characters of `[A-Za-z0-9-_./]`, values at
/// most 255 characters without control characters; blanks around pairs are ignored.
pub(crate) fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, AgentError> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let err = |reason| AgentError::InvalidLabel {
            label: pair.to_owned(),
            reason,
        };
        let (key, value) = pair.split_once('=').ok_or(err("expected key=value"))?;
        let (key, value) = (key.trim(), value.trim());
        let key_ok = !key.is_empty()
            && key.len() <= 63
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if !key_ok {
            return Err(err(
                "key must be 1 to 63 characters of ascii letters, digits, '-', '_', '.' and '/'",
            ));
        }
        if value.len() > 255 || value.chars().any(char::is_control) {
            return Err(err(
                "value must be at most 255 characters without control characters",
            ));
        }
        if labels.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(err("key given twice"));
        }
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn labels_parse_into_a_map() {
        let labels = parse_labels(" gpu=true, os=linux ,zone=eu/west-1").unwrap();
        assert_eq!(labels.len(), 3);
        assert_eq!(labels["gpu"], "true");
        assert_eq!(labels["os"], "linux");
        assert_eq!(labels["zone"], "eu/west-1");
        assert!(parse_labels("").unwrap().is_empty());
        assert!(parse_labels(" , ").unwrap().is_empty());
        assert_eq!(parse_labels("empty=").unwrap()["empty"], "");
    }

    #[test]
    fn invalid_labels_are_named_in_the_error() {
        for (text, culprit) in [
            ("gpu=true,nogood", "nogood"),
            ("bad key=1", "bad key=1"),
            ("=1", "=1"),
            ("a=1,a=2", "a=2"),
        ] {
            let err = parse_labels(text).unwrap_err();
            assert!(
                matches!(&err, AgentError::InvalidLabel { label, .. } if label == culprit),
                "{text:?} gave {err}"
            );
            assert!(err.to_string().contains(culprit), "{err}");
        }
    }

    #[test]
    fn hostnames_become_worker_ids() {
        assert_eq!(
            worker_id_from_hostname(Some("build-01.example.com"))
                .unwrap()
                .as_str(),
            "build-01-example-com"
        );
        assert_eq!(
            worker_id_from_hostname(None).unwrap().as_str(),
            FALLBACK_WORKER_ID
        );
        let long = "h".repeat(100);
        assert_eq!(
            worker_id_from_hostname(Some(&long)).unwrap().as_str().len(),
            MAX_WORKER_ID_LEN
        );
    }

    #[test]
    fn defaults_are_filled_in() {
        let config =
            AgentConfig::try_parse_from(["hodei-agent", "--worker-id", "w-1", "--labels", "a=b"])
                .unwrap();
        let settings = Settings::from_config(config).unwrap();
        assert_eq!(settings.worker_id.as_str(), "w-1");
        assert_eq!(settings.max_concurrent_jobs, 4);
        assert!(settings.capacity.cpu_millis >= 1000);
        assert!(settings.capacity.memory_mb > 0);
        assert!(settings.work_dir.ends_with("hodei-agent-w-1"));
        assert_eq!(settings.heartbeat_interval, Duration::from_secs(1));
    }

    #[test]
    fn invalid_settings_are_refused() {
        let parse = |args: &[&str]| {
            let mut all = vec!["hodei-agent"];
            all.extend_from_slice(args);
            Settings::from_config(AgentConfig::try_parse_from(all).unwrap())
        };
        assert!(matches!(
            parse(&["--worker-id", "a.b"]),
            Err(AgentError::WorkerId(_))
        ));
        assert!(matches!(
            parse(&["--worker-id", "w", "--max-concurrent-jobs", "0"]),
            Err(AgentError::InvalidConfig {
                field: "max_concurrent_jobs",
                ..
            })
        ));
        assert!(matches!(
            parse(&["--worker-id", "w", "--heartbeat-interval-ms", "0"]),
            Err(AgentError::InvalidConfig {
                field: "heartbeat_interval_ms",
                ..
            })
        ));
    }
}
