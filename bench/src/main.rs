//! `hodei-bench`: the benchmark harness. Each scenario starts what it needs — a private
//! nats-server with file storage, a fresh PostgreSQL database, the real Hodei services in this
//! process, simulated agents — measures, prints a table with the machine it ran on, writes
//! JSON with `--json`, and cleans up everything it started. Every scenario is bounded in time.

mod agent;
mod eventbus;
mod failure;
mod fleet;
mod heartbeats;
mod job_events;
mod machine;
mod processes;
mod procfs;
mod queries;
mod real_agents;
mod reference;
mod report;
mod services;
mod sim;
mod system;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::machine::Machine;
use crate::report::{Outcome, Run};

/// Measures Hodei against the targets of TARGETS.md.
#[derive(Debug, Parser)]
#[command(name = "hodei-bench", version)]
struct Cli {
    /// Small sizes, to check the harness works (about a minute for `all`).
    #[arg(long, global = true)]
    quick: bool,
    /// Also write the figures, machine and notes as JSON to this file.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// No-op jobs submitted over grpc by concurrent clients to simulated agents: jobs/s,
    /// beside raw jetstream publishes/s and postgres batched inserts/s.
    Throughput {
        /// Jobs to run (default 10,000; 1,000 with --quick).
        #[arg(long)]
        jobs: Option<usize>,
        /// Concurrent grpc clients (default 64; 16 with --quick).
        #[arg(long)]
        clients: Option<usize>,
        /// Jobs per call: 1 submits each with SubmitJob, more submits them together with
        /// SubmitJobs (default 1).
        #[arg(long)]
        batch: Option<usize>,
        /// Simulated agents (default 1,000; 100 with --quick).
        #[arg(long)]
        agents: Option<usize>,
    },
    /// A fixed offered rate for a fixed time: submit→assigned/started/completed percentiles.
    Latency {
        /// Jobs per second offered (default 1,000; 200 with --quick).
        #[arg(long)]
        rate: Option<u32>,
        /// Seconds of load (default 10; 3 with --quick).
        #[arg(long)]
        seconds: Option<u64>,
        /// Simulated agents (default 1,000; 100 with --quick).
        #[arg(long)]
        agents: Option<usize>,
    },
    /// ListJobs by state (page of 100) against many stored jobs, with the EXPLAIN plan.
    Queries {
        /// Jobs to load (default 1,000,000; 20,000 with --quick).
        #[arg(long)]
        jobs: Option<usize>,
        /// Pages measured per state (default 500; 50 with --quick).
        #[arg(long)]
        pages: Option<usize>,
        /// Leave the loaded database in place at the end and print its URL, to study plans
        /// with psql (drop it by hand afterwards).
        #[arg(long)]
        keep_database: bool,
    },
    /// Simulated agents beating against one real registry: heartbeats/s sent, received and
    /// persisted, with this process's cpu and rss.
    Heartbeats {
        /// Simulated agents (default 10,000; 500 with --quick).
        #[arg(long)]
        agents: Option<usize>,
        /// Heartbeat interval in milliseconds (default 500).
        #[arg(long)]
        interval_ms: Option<u64>,
        /// Seconds measured after the warm-up (default 20; 3 with --quick).
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// Silence 1% of the beating agents: last beat→lost and →jobs requeued percentiles.
    FailureDetection {
        /// Simulated agents (default 10,000; 200 with --quick).
        #[arg(long)]
        agents: Option<usize>,
        /// Heartbeat interval of agents and registry in milliseconds (default 500).
        #[arg(long)]
        interval_ms: Option<u64>,
        /// Missed beats before a worker is unreachable (default 2: with 3, silence alone is
        /// the 1.5 s the target allows).
        #[arg(long)]
        missed_beats: Option<u32>,
    },
    /// Job events in their envelopes over core nats and in process: events/s, beside raw
    /// core nats publishes of the same bytes.
    EventBus {
        /// Events per path (default 1,000,000; 50,000 with --quick).
        #[arg(long)]
        events: Option<usize>,
    },
    /// A real agent process: idle rss, and assignment published→process started percentiles.
    Agent {
        /// Assignments of `true`, one at a time (default 500; 20 with --quick).
        #[arg(long)]
        assignments: Option<usize>,
        /// The hodei-agent binary (default: next to this executable).
        #[arg(long, env = "HODEI_AGENT_BIN")]
        agent_bin: Option<PathBuf>,
    },
    /// Jobs running `true` submitted over grpc by concurrent clients to real agent
    /// processes: jobs/s, submit→started/completed percentiles, the agents' rss.
    RealAgents {
        /// Jobs to run (default 2,000; 200 with --quick).
        #[arg(long)]
        jobs: Option<usize>,
        /// Concurrent grpc clients (default 16).
        #[arg(long)]
        clients: Option<usize>,
        /// Jobs per call: 1 submits each with SubmitJob, more submits them together with
        /// SubmitJobs (default 1).
        #[arg(long)]
        batch: Option<usize>,
        /// Agent processes (default 4).
        #[arg(long)]
        agents: Option<usize>,
        /// Slots of each agent (default 16).
        #[arg(long)]
        slots: Option<u32>,
        /// The folder the agents' work folders are made in (default: the system's temporary
        /// folder), to compare file systems: each job makes and removes files there.
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// The hodei-agent binary (default: next to this executable).
        #[arg(long, env = "HODEI_AGENT_BIN")]
        agent_bin: Option<PathBuf>,
    },
    /// More than the system completes, offered open loop with the admission limit set:
    /// refusals (RESOURCE_EXHAUSTED), this process's memory over time, every accepted job run.
    Overload {
        /// Jobs per second offered (default 3,200, twice `throughput`'s; 800 with --quick).
        #[arg(long)]
        rate: Option<u32>,
        /// Seconds of load (default 30; 5 with --quick).
        #[arg(long)]
        seconds: Option<u64>,
        /// Simulated agents (default 1,000; 100 with --quick).
        #[arg(long)]
        agents: Option<usize>,
        /// The gateway's HODEI_MAX_QUEUED_JOBS (default 20,000; 1,000 with --quick).
        #[arg(long)]
        max_queued: Option<u64>,
        /// Run the gateway, the scheduler and the registry as separate processes, from the
        /// release binaries next to this one (`cargo build --release --bins`), and read each
        /// one's memory apart.
        #[arg(long)]
        processes: bool,
    },
    /// Every scenario above, one after the other, with their defaults.
    All,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let quick = cli.quick;
    // The in-process services log to stderr only when asked (RUST_LOG), for profiling.
    let _telemetry = match std::env::var_os("RUST_LOG") {
        Some(_) => Some(hodei_telemetry::init("hodei-bench").context("failed to start logging")?),
        None => None,
    };
    let started_at = chrono::Utc::now();
    let mut machine = Machine::probe()
        .await
        .context("failed to describe the machine")?;
    if let Scenario::Overload {
        processes: true, ..
    } = cli.scenario
    {
        machine.services = "the gateway, the scheduler and the registry as separate processes \
                            (the binaries next to hodei-bench); the simulated agents and the \
                            load in this process"
            .to_owned();
    }
    eprintln!("{}", machine.describe());
    let mut outcome = Outcome::default();
    let scenarios = match cli.scenario {
        Scenario::All => vec![
            Scenario::Throughput {
                jobs: None,
                clients: None,
                batch: None,
                agents: None,
            },
            Scenario::Latency {
                rate: None,
                seconds: None,
                agents: None,
            },
            Scenario::Queries {
                jobs: None,
                pages: None,
                keep_database: false,
            },
            Scenario::Heartbeats {
                agents: None,
                interval_ms: None,
                seconds: None,
            },
            Scenario::FailureDetection {
                agents: None,
                interval_ms: None,
                missed_beats: None,
            },
            Scenario::EventBus { events: None },
            Scenario::Agent {
                assignments: None,
                agent_bin: None,
            },
            Scenario::RealAgents {
                jobs: None,
                clients: None,
                batch: None,
                agents: None,
                slots: None,
                work_dir: None,
                agent_bin: None,
            },
            Scenario::Overload {
                rate: None,
                seconds: None,
                agents: None,
                max_queued: None,
                processes: false,
            },
        ],
        one => vec![one],
    };
    let mut failed = Vec::new();
    for scenario in scenarios {
        let name = scenario.name();
        eprintln!("running {name}{}", if quick { " (quick)" } else { "" });
        let limit = if quick {
            Duration::from_secs(120)
        } else {
            Duration::from_secs(1800)
        };
        let bounded = tokio::time::timeout(limit, run(scenario, quick));
        let finished = tokio::select! {
            finished = bounded => finished,
            _ = tokio::signal::ctrl_c() => {
                // Dropping the scenario kills its nats-server; its database may be left behind.
                eprintln!("interrupted during {name}");
                outcome.note(format!("{name}: interrupted"));
                failed.push(name);
                break;
            }
        };
        match finished {
            Ok(Ok(result)) => {
                for f in &result.figures {
                    eprintln!("{name}: {} = {:.3} {}", f.metric, f.value, f.unit);
                }
                outcome.extend(result);
            }
            Ok(Err(e)) => {
                eprintln!("{name} failed: {e:#}");
                outcome.note(format!("{name}: failed: {e:#}"));
                failed.push(name);
            }
            Err(_) => {
                eprintln!("{name} did not finish within {limit:?}");
                outcome.note(format!("{name}: did not finish within {limit:?}"));
                failed.push(name);
            }
        }
    }
    let run = Run {
        machine,
        mode: if quick { "quick" } else { "full" },
        started_at,
        outcome,
    };
    println!("{}", run.table());
    if let Some(path) = cli.json {
        run.write_json(&path)?;
    }
    if !failed.is_empty() {
        anyhow::bail!("scenarios failed: {}", failed.join(", "));
    }
    Ok(())
}

impl Scenario {
    fn name(&self) -> &'static str {
        match self {
            Scenario::Throughput { .. } => "throughput",
            Scenario::Latency { .. } => "latency",
            Scenario::Queries { .. } => "queries",
            Scenario::Heartbeats { .. } => "heartbeats",
            Scenario::FailureDetection { .. } => "failure-detection",
            Scenario::EventBus { .. } => "event-bus",
            Scenario::Agent { .. } => "agent",
            Scenario::RealAgents { .. } => "real-agents",
            Scenario::Overload { .. } => "overload",
            Scenario::All => "all",
        }
    }
}

/// Picks the full or the quick default.
fn size<T>(given: Option<T>, quick: bool, full: T, small: T) -> T {
    given.unwrap_or(if quick { small } else { full })
}

async fn run(scenario: Scenario, quick: bool) -> anyhow::Result<Outcome> {
    match scenario {
        Scenario::Throughput {
            jobs,
            clients,
            batch,
            agents,
        } => {
            system::throughput(system::ThroughputParams {
                jobs: size(jobs, quick, 10_000, 1_000),
                clients: size(clients, quick, 64, 16),
                batch: size(batch, quick, 1, 1),
                agents: size(agents, quick, 1_000, 100),
                timeout: Duration::from_secs(if quick { 60 } else { 900 }),
                reference_messages: if quick { 5_000 } else { 50_000 },
            })
            .await
        }
        Scenario::Overload {
            rate,
            seconds,
            agents,
            max_queued,
            processes,
        } => {
            system::overload(system::OverloadParams {
                rate: size(rate, quick, 3_200, 800),
                duration: Duration::from_secs(size(seconds, quick, 30, 5)),
                agents: size(agents, quick, 1_000, 100),
                max_queued_jobs: size(max_queued, quick, 20_000, 1_000),
                timeout: Duration::from_secs(if quick { 60 } else { 600 }),
                processes,
            })
            .await
        }
        Scenario::Latency {
            rate,
            seconds,
            agents,
        } => {
            system::latency(system::LatencyParams {
                rate: size(rate, quick, 1_000, 200),
                duration: Duration::from_secs(size(seconds, quick, 10, 3)),
                agents: size(agents, quick, 1_000, 100),
                timeout: Duration::from_secs(if quick { 60 } else { 240 }),
            })
            .await
        }
        Scenario::Queries {
            jobs,
            pages,
            keep_database,
        } => {
            queries::queries(queries::QueriesParams {
                jobs: size(jobs, quick, 1_000_000, 20_000),
                pages_per_state: size(pages, quick, 500, 50),
                keep_database,
            })
            .await
        }
        Scenario::Heartbeats {
            agents,
            interval_ms,
            seconds,
        } => {
            heartbeats::heartbeats(heartbeats::HeartbeatsParams {
                agents: size(agents, quick, 10_000, 500),
                interval: Duration::from_millis(size(interval_ms, quick, 500, 500).max(1)),
                window: Duration::from_secs(size(seconds, quick, 20, 3)),
                warmup: Duration::from_secs(if quick { 1 } else { 3 }),
                register_within: Duration::from_secs(if quick { 30 } else { 120 }),
            })
            .await
        }
        Scenario::FailureDetection {
            agents,
            interval_ms,
            missed_beats,
        } => {
            failure::failure_detection(failure::FailureParams {
                agents: size(agents, quick, 10_000, 200),
                interval: Duration::from_millis(size(interval_ms, quick, 500, 500).max(1)),
                missed_beats: size(missed_beats, quick, 2, 2).max(1),
                register_within: Duration::from_secs(if quick { 30 } else { 120 }),
                detect_within: Duration::from_secs(if quick { 15 } else { 30 }),
            })
            .await
        }
        Scenario::EventBus { events } => {
            eventbus::event_bus(eventbus::EventBusParams {
                events: size(events, quick, 1_000_000, 50_000),
            })
            .await
        }
        Scenario::Agent {
            assignments,
            agent_bin,
        } => {
            agent::agent(agent::AgentParams {
                binary: agent_bin,
                assignments: size(assignments, quick, 500, 20),
                settle: Duration::from_secs(if quick { 1 } else { 3 }),
            })
            .await
        }
        Scenario::RealAgents {
            jobs,
            clients,
            batch,
            agents,
            slots,
            work_dir,
            agent_bin,
        } => {
            real_agents::real_agents(real_agents::RealAgentsParams {
                binary: agent_bin,
                work_dir,
                jobs: size(jobs, quick, 2_000, 200),
                clients: size(clients, quick, 16, 16),
                batch: size(batch, quick, 1, 1),
                agents: size(agents, quick, 4, 4),
                slots: size(slots, quick, 16, 16),
                ready_within: Duration::from_secs(30),
                timeout: Duration::from_secs(if quick { 60 } else { 300 }),
                reference_messages: if quick { 5_000 } else { 50_000 },
                reference_processes: if quick { 500 } else { 5_000 },
            })
            .await
        }
        Scenario::All => anyhow::bail!("all is not a single scenario"),
    }
}
