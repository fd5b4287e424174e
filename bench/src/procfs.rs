//! What a process costs, read from /proc: CPU time (user + system, from `/proc/<pid>/stat`)
//! and resident memory (`VmRSS`, `VmHWM` from `/proc/<pid>/status`). Linux only, like the
//! harness.

use std::time::{Duration, Instant};

use anyhow::Context as _;

/// Which process to read: this one, or another by pid.
#[derive(Debug, Clone, Copy)]
pub enum Pid {
    Current,
    Other(u32),
}

impl Pid {
    fn dir(self) -> String {
        match self {
            Pid::Current => "/proc/self".to_owned(),
            Pid::Other(pid) => format!("/proc/{pid}"),
        }
    }
}

/// Clock ticks per second of /proc/<pid>/stat times (`getconf CLK_TCK`, 100 on every Linux
/// the harness has met).
fn clock_ticks() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .filter(|&t: &u64| t > 0)
        .unwrap_or(100)
}

/// CPU time the process has used so far, user plus system, all threads.
pub fn cpu_time(pid: Pid) -> anyhow::Result<Duration> {
    let path = format!("{}/stat", pid.dir());
    let stat = std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("unexpected contents of {path}"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("no cpu time in {path}"))
    };
    let total = ticks(11)? + ticks(12)?;
    let per_second = clock_ticks();
    Ok(Duration::from_micros(total * 1_000_000 / per_second))
}

/// Resident memory now and at its peak, in KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub rss_kib: u64,
    pub peak_kib: u64,
}

impl Memory {
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }

    pub fn peak_mib(&self) -> f64 {
        self.peak_kib as f64 / 1024.0
    }
}

/// `VmRSS` and `VmHWM` of the process.
pub fn memory(pid: Pid) -> anyhow::Result<Memory> {
    let path = format!("{}/status", pid.dir());
    let status =
        std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in {path}"))
    };
    Ok(Memory {
        rss_kib: field("VmRSS:")?,
        peak_kib: field("VmHWM:")?,
    })
}

/// CPU used by a process between two instants, as a share of one core.
pub struct CpuMeter {
    pid: Pid,
    wall: Instant,
    cpu: Duration,
}

impl CpuMeter {
    pub fn start(pid: Pid) -> anyhow::Result<CpuMeter> {
        Ok(CpuMeter {
            pid,
            wall: Instant::now(),
            cpu: cpu_time(pid)?,
        })
    }

    /// CPU seconds per wall second since `start` (1.0 is one core busy).
    pub fn cores_used(&self) -> anyhow::Result<f64> {
        let cpu = cpu_time(self.pid)?.saturating_sub(self.cpu);
        let wall = self.wall.elapsed().as_secs_f64().max(1e-9);
        Ok(cpu.as_secs_f64() / wall)
    }
}

/// Processes whose command line holds every one of `words` (e.g. the nats-server started on
/// one port).
pub fn find(words: &[&str]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                let line = String::from_utf8_lossy(&raw).replace('\0', " ");
                words.iter().all(|w| line.contains(w))
            })
        })
        .collect()
}

/// CPU used by several processes together (those that vanish meanwhile are left out).
pub struct GroupMeter {
    wall: Instant,
    start: Vec<(u32, Duration)>,
}

impl GroupMeter {
    pub fn start(pids: &[u32]) -> GroupMeter {
        GroupMeter {
            wall: Instant::now(),
            start: pids
                .iter()
                .filter_map(|&p| Some((p, cpu_time(Pid::Other(p)).ok()?)))
                .collect(),
        }
    }

    /// How many processes are measured.
    pub fn len(&self) -> usize {
        self.start.len()
    }

    /// CPU seconds per wall second since `start`, all processes together.
    pub fn cores_used(&self) -> f64 {
        let used: Duration = self
            .start
            .iter()
            .filter_map(|&(p, at)| Some(cpu_time(Pid::Other(p)).ok()?.saturating_sub(at)))
            .sum();
        used.as_secs_f64() / self.wall.elapsed().as_secs_f64().max(1e-9)
    }
}
