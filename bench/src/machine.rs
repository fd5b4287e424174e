//! The machine a run measured on: cores, memory, kernel, and the versions of the nats-server
//! and PostgreSQL the scenarios talked to. Printed beside every figure.

use std::path::PathBuf;

use anyhow::Context as _;
use serde::Serialize;

/// What the figures were measured on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_total_mib: u64,
    pub cpu_model: String,
    pub kernel: String,
    pub nats_server: String,
    pub postgres: String,
    /// How the Hodei services ran.
    pub services: String,
}

impl Machine {
    /// Reads /proc, asks the nats-server binary and the PostgreSQL server for their versions.
    pub async fn probe() -> anyhow::Result<Machine> {
        let cores = std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_total_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib / 1024);
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned());
        let nats_server = nats_server_version().await?;
        let postgres = postgres_version().await?;
        Ok(Machine {
            cores,
            memory_total_mib,
            cpu_model,
            kernel,
            nats_server,
            postgres,
            services: "in process (build + run_until_stopped, one tokio runtime shared with the \
                       load generators and simulated agents)"
                .to_owned(),
        })
    }

    /// One line per fact, for the table header.
    pub fn describe(&self) -> String {
        format!(
            "machine: {} cores ({}), {} MiB memory, linux {}\nnats-server: {}\npostgresql: {}\nservices: {}",
            self.cores,
            self.cpu_model,
            self.memory_total_mib,
            self.kernel,
            self.nats_server,
            self.postgres,
            self.services
        )
    }
}

/// The nats-server binary the test support starts: `HODEI_NATS_SERVER`, else `nats-server`.
fn nats_binary() -> PathBuf {
    std::env::var_os("HODEI_NATS_SERVER")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("nats-server"), PathBuf::from)
}

async fn nats_server_version() -> anyhow::Result<String> {
    let binary = nats_binary();
    let output = tokio::process::Command::new(&binary)
        .arg("--version")
        .output()
        .await
        .with_context(|| format!("failed to run {} --version", binary.display()))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

async fn postgres_version() -> anyhow::Result<String> {
    let database = hodei_test_support::TestDatabase::create()
        .await
        .context("failed to create a database to ask postgresql its version")?;
    let pool = database.connect().await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await
        .context("failed to ask postgresql its version")?;
    pool.close().await;
    database.cleanup().await?;
    Ok(version)
}
