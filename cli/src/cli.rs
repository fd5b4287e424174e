//! The command line: every command, flag and help text, parsed with clap.
//!
//! Parsing only checks shapes (numbers, `K=V` pairs, known state names); turning job options
//! into a `JobSpec` is `spec.rs`'s job.

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use hodei_proto::v1 as pb;

/// Where `--server` points when neither the flag nor `HODEI_SERVER` is set.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Heading of the options every command takes.
const GLOBAL: &str = "Global options";

/// Submit and follow jobs on a Hodei Pipelines cluster.
#[derive(Debug, Parser)]
#[command(name = "hodei", version, propagate_version = true)]
#[command(after_help = "\
Examples:
  hodei run -- make test
  hodei run -f job.yaml
  hodei submit --name nightly --require gpu=true -- ./train.sh --epochs 10
  hodei list --state running
  hodei logs -f 01J0Z3N1W8Q4K5T6Y7V8X9ABCD
  hodei pipeline run -f examples/pipelines/build-test-deploy.yaml
  hodei artifacts ls 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f
  hodei --server http://hodei.internal:50051 workers")]
pub struct Cli {
    /// Address of the Hodei API gateway.
    #[arg(long, global = true, env = "HODEI_SERVER", default_value = DEFAULT_SERVER,
          value_name = "URL", help_heading = GLOBAL)]
    pub server: String,

    /// The API token (`hodei_…`) or OIDC access token every call carries.
    #[arg(long, global = true, env = "HODEI_TOKEN", hide_env_values = true,
          value_name = "TOKEN", help_heading = GLOBAL)]
    pub token: Option<String>,

    /// The CA certificate (PEM) that signed the server's certificate, for https:// servers
    /// that a system trust store does not know (such as the CA `scripts/up.sh` makes).
    #[arg(long, global = true, env = "HODEI_CA", value_name = "FILE", help_heading = GLOBAL)]
    pub ca: Option<std::path::PathBuf>,

    /// A client certificate (PEM), for servers that require mutual TLS; with --tls-key.
    #[arg(long, global = true, env = "HODEI_TLS_CLIENT_CERT", value_name = "FILE",
          requires = "tls_key", help_heading = GLOBAL)]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "HODEI_TLS_CLIENT_KEY", value_name = "FILE",
          requires = "tls_cert", help_heading = GLOBAL)]
    pub tls_key: Option<std::path::PathBuf>,

    /// How to print results: `human` (tables and plain text) or `json`.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Human,
          value_name = "FORMAT", help_heading = GLOBAL)]
    pub output: OutputFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// The token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print its secret (shown this once; only its hash is stored).
    Create {
        /// What the token is for, shown in listings.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// The tenant the token acts for.
        #[arg(long, value_name = "T", default_value = "default")]
        tenant: String,
        /// viewer, submitter, operator or admin.
        #[arg(long, value_name = "ROLE")]
        role: String,
        /// How long until it expires (`90d`, `12h`); never when not given.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
    },
    /// List tokens (never their secrets), newest first.
    List {
        /// Only this tenant's tokens.
        #[arg(long, value_name = "T")]
        tenant: Option<String>,
    },
    /// Revoke a token: the gateway that answers refuses it at once, other gateways within
    /// their token cache's lifetime (5 s).
    Revoke {
        /// The token's id (as `hodei token list` shows it).
        id: String,
    },
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Tables and plain text for people.
    Human,
    /// JSON for programs; streams print one JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a job and print its id.
    #[command(after_help = "\
Examples:
  hodei submit -- echo hello
  hodei submit --name build --env RUST_LOG=debug --label team=ci --timeout 600 -- cargo build
  hodei submit --script 'make && make install' --require arch=arm64
  hodei submit --secret-env GITHUB_TOKEN -- ./publish.sh
  hodei submit -f examples/jobs/retry.yaml --max-attempts 5
  hodei --output json submit -- true")]
    Submit(JobArgs),

    /// Submit a job, stream its output, and exit with its exit code.
    ///
    /// The job's stdout goes to stdout and its stderr to stderr. A job that succeeds exits 0,
    /// a job that fails with exit code N exits N; a job that is cancelled, times out or fails
    /// without an exit code exits 1. Ctrl-C cancels the job and keeps streaming until it ends;
    /// a second Ctrl-C stops waiting. With `--output json`, every output line is printed as a
    /// JSON object, followed by the finished job.
    ///
    /// On a terminal, the job's stderr lines are dimmed and, until the job prints its first
    /// line, a status line on stderr says what it is waiting for. Set NO_COLOR to turn colours
    /// off.
    #[command(after_help = "\
Examples:
  hodei run -- cargo test --workspace
  hodei run --max-attempts 3 --script 'curl -fsS https://example.com/health'
  hodei run -f examples/jobs/hello.yaml
  generate-job | hodei run -f - --label team=ci")]
    Run(JobArgs),

    /// Submit every job of a file in one call, all of them or none, and print their ids in the
    /// file's order.
    ///
    /// The file is a YAML or JSON list of jobs, each as `submit -f` reads one (up to 1,000).
    /// Nothing is submitted when any job is invalid; each invalid field is named by the job's
    /// place in the list (`jobs.yaml: [2].name: ...`).
    #[command(after_help = "\
Examples:
  hodei submit-many -f examples/jobs/many.yaml
  generate-jobs | hodei submit-many -f -
  hodei --output json submit-many -f jobs.json")]
    SubmitMany {
        /// The list of jobs; `-` reads it from stdin.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: String,
    },

    /// Show one job: its state, outcome and attempts; with --at, as it stood then.
    #[command(after_help = "\
Examples:
  hodei get 01J0Z3N1W8Q4K5T6Y7V8X9ABCD
  hodei get --at 3 01J0Z3N1W8Q4K5T6Y7V8X9ABCD
  hodei get --at 2026-12-03T02:00:00Z 01J0Z3N1W8Q4K5T6Y7V8X9ABCD")]
    Get {
        /// The job's id.
        id: String,
        /// Show the job as it stood after this event (a sequence number, as `hodei history`
        /// shows them) or at this RFC 3339 time, folded from its recorded events.
        #[arg(long, value_name = "SEQ|TIME", value_parser = parse_moment)]
        at: Option<Moment>,
    },

    /// Show a job's recorded events, oldest first, with what each one recorded.
    #[command(after_help = "\
Examples:
  hodei history 01J0Z3N1W8Q4K5T6Y7V8X9ABCD
  hodei --output json history 01J0Z3N1W8Q4K5T6Y7V8X9ABCD")]
    History {
        /// The job's id.
        id: String,
    },

    /// List events across jobs in a time range, oldest first.
    #[command(after_help = "\
Examples:
  hodei events --since 2026-12-03T02:00:00Z --until 2026-12-03T02:05:00Z
  hodei events --since 2026-12-03T00:00:00Z --type failed --type timed_out --label team=ci")]
    Events(EventsArgs),

    /// List jobs, newest first.
    #[command(after_help = "\
Examples:
  hodei list
  hodei list --state queued --state running --label team=ci --limit 20
  hodei list --name-prefix nightly- --page-token <token from the previous page>")]
    List(ListArgs),

    /// Follow a job's events (assigned, started, requeued, ...) until it ends.
    #[command(after_help = "Example:\n  hodei watch 01J0Z3N1W8Q4K5T6Y7V8X9ABCD")]
    Watch {
        /// The job's id.
        id: String,
        /// First event sequence number to show; 0 or 1 for the whole history.
        #[arg(long, default_value_t = 0, value_name = "SEQ")]
        from: u64,
    },

    /// Print a job's output: stdout lines to stdout, stderr lines to stderr.
    #[command(after_help = "\
Examples:
  hodei logs 01J0Z3N1W8Q4K5T6Y7V8X9ABCD
  hodei logs -f --from 120 01J0Z3N1W8Q4K5T6Y7V8X9ABCD")]
    Logs {
        /// The job's id.
        id: String,
        /// Keep printing new lines until the job ends.
        #[arg(short, long)]
        follow: bool,
        /// First line sequence number to print; 0 for the beginning.
        #[arg(long, default_value_t = 0, value_name = "N")]
        from: u64,
    },

    /// Cancel a job: at once if it is queued, otherwise by stopping its process.
    #[command(
        after_help = "Example:\n  hodei cancel --reason 'wrong branch' 01J0Z3N1W8Q4K5T6Y7V8X9ABCD"
    )]
    Cancel {
        /// The job's id.
        id: String,
        /// Why the job is cancelled; recorded on the job.
        #[arg(long, value_name = "R", default_value = "")]
        reason: String,
    },

    /// List workers with their status, load and free slots.
    #[command(after_help = "\
Examples:
  hodei workers
  hodei workers --status ready --status draining")]
    Workers {
        /// Only workers with this status (repeatable, or comma-separated).
        #[arg(long, value_enum, value_delimiter = ',', value_name = "S")]
        status: Vec<WorkerStatusArg>,
    },

    /// Show one worker: labels, capacity, usage and the attempts it holds.
    #[command(after_help = "Example:\n  hodei worker worker-7f3a")]
    Worker {
        /// The worker's id.
        id: String,
    },

    /// Drain a worker: it takes no new work, lets its running jobs finish, then its agent
    /// exits.
    #[command(after_help = "Example:\n  hodei drain --reason 'kernel upgrade' worker-7f3a")]
    Drain {
        /// The worker's id.
        id: String,
        /// Why the worker is drained.
        #[arg(long, value_name = "R", default_value = "")]
        reason: String,
    },

    /// Show who the server takes the token for: subject, tenant and role.
    #[command(name = "whoami")]
    WhoAmI,

    /// Create, list and revoke API tokens (admins).
    #[command(subcommand, alias = "tokens")]
    #[command(after_help = "\
Examples:
  hodei token create --name ci-bot --tenant team-a --role submitter --expires-in 90d
  hodei token list --tenant team-a
  hodei token revoke 0193a7c2-5d1e-7f00-8a11-2b3c4d5e6f70")]
    Token(TokenCommand),

    /// Show the audit log: every mutating call, who made it and how it ended (admins).
    #[command(after_help = "\
Examples:
  hodei audit
  hodei audit --tenant team-a --limit 20
  hodei --output json audit")]
    Audit {
        /// Only this tenant's entries.
        #[arg(long, value_name = "T")]
        tenant: Option<String>,
        /// Entries per page (at most 1000).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// The page after the one that printed this token.
        #[arg(long, value_name = "TOKEN")]
        page_token: Option<String>,
    },

    /// Run pipelines (DAGs of jobs) and look at their runs.
    #[command(subcommand, alias = "pipelines")]
    #[command(after_help = "\
Examples:
  hodei pipeline run -f examples/pipelines/build-test-deploy.yaml
  hodei pipeline list --state running
  hodei pipeline get 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f")]
    Pipeline(PipelineCommand),

    /// Start jobs or pipelines on a cron expression; each tick fires once.
    #[command(subcommand, alias = "schedules")]
    #[command(after_help = "\
Examples:
  hodei schedule create nightly-backup --cron '0 3 * * *' --tz Europe/Madrid -- ./backup.sh
  hodei schedule create-pipeline nightly --cron '@daily' -f examples/pipelines/build-test-deploy.yaml
  hodei schedule list
  hodei schedule get nightly-backup
  hodei schedule trigger nightly-backup --idempotency-key backup-2026-12-06")]
    Schedule(ScheduleCommand),

    /// Tenants' weights and quotas (setting them takes an admin), and each tenant's share of
    /// the fleet.
    #[command(subcommand, alias = "tenants")]
    #[command(after_help = "\
Examples:
  hodei tenant list
  hodei tenant get team-a
  hodei tenant set team-a --weight 3 --max-running-jobs 50 --max-queued-jobs 10000
  hodei tenant reset team-a")]
    Tenant(TenantCommand),

    /// List and download the files the steps of a pipeline run produced.
    #[command(subcommand, alias = "artifact")]
    #[command(after_help = "\
Examples:
  hodei artifacts ls 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f
  hodei artifacts get 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f build dist/app.txt")]
    Artifacts(ArtifactsCommand),
}

/// `hodei tenant ...`.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Every tenant with a policy, queued jobs or jobs on workers: its weight, quotas, usage,
    /// share of the fleet and what its weight entitles it to (yours only, unless admin).
    List,
    /// One tenant [default: the token's].
    Get {
        #[arg(value_name = "TENANT")]
        tenant: Option<String>,
    },
    /// Set a tenant's policy, replacing the one it had: a quota not given is lifted.
    Set {
        #[arg(value_name = "TENANT")]
        tenant: String,
        /// Its share of contended capacity relative to the other tenants' weights.
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        weight: u32,
        /// Most jobs queued at once; a submission past it is refused.
        #[arg(long, value_name = "N")]
        max_queued_jobs: Option<u64>,
        /// Most jobs on workers at once; past it, its jobs wait in the queue.
        #[arg(long, value_name = "N")]
        max_running_jobs: Option<u64>,
        /// Most CPU (thousandths of a core) its jobs on workers may request together.
        #[arg(long, value_name = "N")]
        max_cpu_millis: Option<u64>,
        /// Most memory (MiB) its jobs on workers may request together.
        #[arg(long, value_name = "N")]
        max_memory_mb: Option<u64>,
        /// The highest priority its jobs count with (-1000 to 1000): a job asking for more is
        /// ordered, and may preempt, as if it had asked for this.
        #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-1000..=1000))]
        max_priority: Option<i32>,
    },
    /// Remove a tenant's policy: weight 1, no quota.
    Reset {
        #[arg(value_name = "TENANT")]
        tenant: String,
    },
}

/// `hodei schedule ...`. (Parsed once per process: the size of its largest variant, which
/// carries every job option, costs nothing.)
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)]
pub enum ScheduleCommand {
    /// Create a schedule that starts a job (a command after `--`, `--script` or `-f FILE`,
    /// with every option of `hodei submit`).
    Create {
        #[command(flatten)]
        schedule: ScheduleArgs,
        #[command(flatten)]
        job: JobArgs,
    },
    /// Create a schedule that starts a pipeline run (the file `hodei pipeline run` reads).
    CreatePipeline {
        #[command(flatten)]
        schedule: ScheduleArgs,
        #[command(flatten)]
        pipeline: PipelineFileArgs,
    },
    /// List schedules.
    List {
        /// Schedules per page, 1 to 1000 [server default: 100].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: Option<u32>,
        /// Where to continue, from the previous page's `next page` line.
        #[arg(long, value_name = "T")]
        page_token: Option<String>,
        /// Only this tenant's [default: the token's tenant; every tenant for an admin].
        #[arg(long, value_name = "T")]
        tenant: Option<String>,
    },
    /// Show a schedule and its newest ticks: what each fired, skipped or missed.
    Get(ScheduleRef),
    /// Stop firing until resumed.
    Pause(ScheduleRef),
    /// Fire again from the first tick after now (ticks while paused never fire).
    Resume(ScheduleRef),
    /// Delete a schedule and its history (what it started is left as it is).
    Delete(ScheduleRef),
    /// Fire now, as the overlap policy and the tenant's queue quota allow; prints the job or run
    /// it started, or why the tick was skipped.
    Trigger(TriggerArgs),
}

/// `hodei schedule trigger`.
#[derive(Debug, Clone, Args)]
pub struct TriggerArgs {
    #[command(flatten)]
    pub schedule: ScheduleRef,
    /// A key that makes a retry safe: a trigger with the key of one still in the schedule's
    /// history prints that one's tick and starts nothing.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
}

/// A schedule named on the command line.
#[derive(Debug, Clone, Args)]
pub struct ScheduleRef {
    /// The schedule's name (in the tenant) or id.
    #[arg(value_name = "SCHEDULE")]
    pub schedule: String,
    /// The tenant whose schedule of that name [default: the token's].
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
}

/// What overlapping ticks do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OverlapArg {
    /// Skip a tick while the previous job or run has not ended.
    Skip,
    /// Start it anyway.
    Allow,
    /// Cancel the previous ones, then start it.
    CancelPrevious,
}

/// A schedule's own settings.
#[derive(Debug, Clone, Args)]
pub struct ScheduleArgs {
    /// The schedule's name, unique in its tenant: letters, digits, '-' and '_'.
    #[arg(value_name = "SCHEDULE")]
    pub schedule: String,
    /// Cron expression: five fields (minute hour day-of-month month day-of-week), six with
    /// seconds first, or @hourly, @daily, @weekly, @monthly, @yearly.
    #[arg(long, value_name = "EXPR")]
    pub cron: String,
    /// IANA time zone the expression is read in [server default: UTC].
    #[arg(long = "tz", value_name = "ZONE")]
    pub time_zone: Option<String>,
    /// What a tick does while the previous job or run has not ended [server default: skip].
    #[arg(long, value_enum, value_name = "POLICY")]
    pub overlap: Option<OverlapArg>,
    /// Ticks missed by at most this much (no scheduler ran) fire when one is back (`90s`,
    /// `1h`) [server default: 1m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub catch_up: Option<std::time::Duration>,
    /// Fire each tick up to this much after its time, at random (`30s`).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub jitter: Option<std::time::Duration>,
    /// Ticks kept in the history [server default: 100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub history: Option<u32>,
    /// Create it paused.
    #[arg(long)]
    pub paused: bool,
    /// The tenant it belongs to [default: the token's].
    #[arg(long = "schedule-tenant", value_name = "T")]
    pub tenant: Option<String>,
}

/// `hodei pipeline ...`.
#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Submit a pipeline and show its steps live until the run ends.
    ///
    /// The file is checked before anything is sent: a file that does not parse is reported
    /// with its line and column, an invalid pipeline with every error and its path
    /// (`steps.build.needs[1]`).
    ///
    /// Then one line per step shows its state (waiting, queued, running, succeeded, failed,
    /// skipped, cancelled), how long it ran (so far, while running), its worker and exit code,
    /// and why it was skipped, cancelled or failed. On a terminal the lines are redrawn in
    /// place; otherwise a line is printed each time a step changes state. With `--output
    /// json`, every event of the run is printed as a JSON object, then the ended run.
    ///
    /// Exits 0 if the run succeeded, 1 if it failed or was cancelled. Ctrl-C cancels the run
    /// (steps with `when: always` still run) and keeps watching until it ends; a second
    /// Ctrl-C stops waiting (exit code 130) and leaves the run going.
    #[command(after_help = "\
Examples:
  hodei pipeline run -f examples/pipelines/build-test-deploy.yaml
  generate-pipeline | hodei pipeline run -f -
  hodei --output json pipeline run -f ci.yaml > events.jsonl")]
    Run(PipelineFileArgs),

    /// Submit a pipeline and print its run id.
    #[command(after_help = "\
Examples:
  hodei pipeline submit -f examples/pipelines/build-test-deploy.yaml
  hodei --output json pipeline submit -f ci.json")]
    Submit(PipelineFileArgs),

    /// Show one run: its state, then a table of its steps.
    #[command(after_help = "\
Examples:
  hodei pipeline get 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f
  hodei pipeline get --at 2026-12-03T02:00:00Z 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f")]
    Get {
        /// The run's id.
        id: String,
        /// Show the run (and its steps' attempts) as it stood after this run event (a
        /// sequence number) or at this RFC 3339 time, folded from the recorded events.
        #[arg(long, value_name = "SEQ|TIME", value_parser = parse_moment)]
        at: Option<Moment>,
    },

    /// List pipeline runs, newest first.
    #[command(after_help = "\
Examples:
  hodei pipeline list
  hodei pipeline list --state running,queued --name nightly- --limit 20
  hodei pipeline list --page-token <token from the previous page>")]
    List(PipelineListArgs),

    /// Show the steps of an existing run live until it ends, as `pipeline run` does.
    ///
    /// Exits 0 if the run succeeded, 1 if it failed or was cancelled.
    #[command(after_help = "Example:\n  hodei pipeline watch 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f")]
    Watch {
        /// The run's id.
        id: String,
    },

    /// Cancel a run: steps not started are cancelled, running ones stopped; steps with
    /// `when: always` still run.
    #[command(after_help = "\
Example:
  hodei pipeline cancel --reason 'wrong branch' 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f")]
    Cancel {
        /// The run's id.
        id: String,
        /// Why the run is cancelled; recorded on the run and its steps.
        #[arg(long, value_name = "R", default_value = "")]
        reason: String,
    },
}

/// The pipeline file of `pipeline run` and `pipeline submit`.
#[derive(Debug, Clone, Args)]
pub struct PipelineFileArgs {
    /// Read the pipeline from this YAML or JSON file (`-` for stdin).
    ///
    /// The file has `name`, `steps` and optionally `env` (for every step), `fail_fast`,
    /// `idempotency_key` and `labels`. Each step has a `name`, a `command` (`{kind: exec,
    /// argv: [...]}` or `{kind: script, interpreter: [...], script: ...}`) and optionally
    /// `needs` (steps that must end first), `when` (`on_success`, `on_failure` or `always`),
    /// `matrix` (`{key: [values]}`: one step per combination, with `MATRIX_<KEY>` set),
    /// `artifacts` (`{produce: [globs], consume: [steps]}`) and the fields of a job spec
    /// (`env`, `secret_env`, `working_dir`, `timeout_secs`, `resources`, `required_labels`,
    /// `priority`, `max_attempts`, `retry_backoff`, `labels`). Unknown fields are refused.
    /// `.json` files are read as JSON, others as YAML.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: String,
}

/// Filters and paging of `hodei pipeline list`.
#[derive(Debug, Clone, Args)]
pub struct PipelineListArgs {
    /// Only runs in this state (repeatable, or comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "S")]
    pub state: Vec<PipelineStateArg>,

    /// Only runs whose pipeline name starts with this.
    #[arg(long = "name", visible_alias = "name-prefix", value_name = "PREFIX")]
    pub name_prefix: Option<String>,

    /// Runs per page, 1 to 1000 [server default: 100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,

    /// Where to continue, from the previous page's `next page` line.
    #[arg(long, value_name = "T")]
    pub page_token: Option<String>,

    /// Only this tenant's runs [default: the token's tenant; every tenant for an admin].
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
}

/// `hodei artifacts ...`.
#[derive(Debug, Subcommand)]
pub enum ArtifactsCommand {
    /// List the artifacts of a run: step, path, size, digest and when it was modified.
    #[command(alias = "list")]
    #[command(after_help = "\
Examples:
  hodei artifacts ls 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f
  hodei artifacts ls --step build 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f")]
    Ls {
        /// The run's id.
        run_id: String,
        /// Only this step's artifacts (`build`, or `test[os=linux]` for a matrix step).
        #[arg(long, value_name = "STEP")]
        step: Option<String>,
    },

    /// Download one artifact.
    ///
    /// The file is written as it arrives and its digest is checked by the server as it is
    /// read; an interrupted download leaves no file behind. With `-o -` the bytes go to
    /// stdout and nothing else is printed there.
    #[command(after_help = "\
Examples:
  hodei artifacts get 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f build dist/app.txt
  hodei artifacts get -o app-linux.txt 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f build dist/app.txt
  hodei artifacts get -o - 0190f0e2-7c1a-7b3e-9d4f-2a6b8c0d1e2f build dist/app.tar | tar x")]
    Get {
        /// The run's id.
        run_id: String,
        /// The step that produced it.
        step: String,
        /// Its path, as `artifacts ls` shows it.
        path: String,
        /// Where to write it (`-` for stdout) [default: the path's file name, in the current
        /// directory].
        #[arg(short = 'o', long = "output-file", value_name = "FILE")]
        output_file: Option<String>,
    },
}

/// What to run and how: shared by `submit` and `run`.
#[derive(Debug, Clone, Args)]
pub struct JobArgs {
    /// Read the job from this YAML or JSON file (`-` for stdin).
    ///
    /// The file has the fields of a job spec: `name`, `command` (`{kind: exec, argv: [...]}` or
    /// `{kind: script, interpreter: [...], script: ...}`), `env`, `secret_env`, `working_dir`,
    /// `timeout_secs`, `resources` (`cpu_millis`, `memory_mb`), `required_labels`, `priority`,
    /// `max_attempts`, `retry_backoff` (`initial_ms`, `max_ms`), `idempotency_key`, `labels`;
    /// only `name` and `command` are required, unknown fields are refused. `.json` files are
    /// read as JSON, others as YAML. The spec is checked before it is sent, and every invalid
    /// field is reported.
    ///
    /// Other job options override the file: `--name`, `--timeout`, `--max-attempts`,
    /// `--priority`, `--cpu`, `--memory`, `--idempotency-key`, `--workdir` and a command (after
    /// `--` or `--script`) replace the file's value; `--env`, `--secret-env`, `--label` and
    /// `--require` add entries and replace the file's entries with the same key.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<String>,

    /// Job name; defaults to the command's basename (to the file's with `-f`).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// Environment variable of the process (repeatable).
    #[arg(long = "env", value_name = "K=V", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,

    /// Secret environment variable (repeatable): like `--env`, but masked wherever shown.
    ///
    /// The server never shows its value, and masks it in the job's output. `K` alone takes the
    /// value of `K` in this shell, which keeps it out of the shell history.
    #[arg(long = "secret-env", value_name = "K[=V]", value_parser = parse_secret_env)]
    pub secret_env: Vec<(String, Option<String>)>,

    /// Label to find the job by (repeatable).
    #[arg(long = "label", value_name = "k=v", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,

    /// Label a worker must carry, with this value, to run the job (repeatable).
    #[arg(long = "require", value_name = "k=v", value_parser = parse_key_value)]
    pub required_labels: Vec<(String, String)>,

    /// Seconds an attempt may run before it is killed [server default: 3600].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: Option<u64>,

    /// Attempts in all, counting retries after failures [server default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: Option<u32>,

    /// For idempotent work: when the worker goes silent, run the job elsewhere at once rather
    /// than after the worker's lease; two copies may then run at the same time.
    #[arg(long)]
    pub requeue_when_unreachable: bool,

    /// A waiting job of a higher priority may stop this one to take its place; it is then
    /// queued again without spending a retry.
    #[arg(long)]
    pub preemptible: bool,

    /// Higher runs first, from -1000 to 1000.
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-1000..=1000))]
    pub priority: Option<i32>,

    /// CPU to reserve, in thousandths of a core.
    #[arg(long, value_name = "MILLIS")]
    pub cpu: Option<u64>,

    /// Memory to reserve, in MiB.
    #[arg(long, value_name = "MB")]
    pub memory: Option<u64>,

    /// Submitting again with the same key returns the first job instead of a new one.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,

    /// Working directory, relative to the attempt's workspace.
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,

    /// Run this script with `--interpreter` instead of a command after `--`.
    #[arg(long, value_name = "TEXT")]
    pub script: Option<String>,

    /// Interpreter of `--script`, split on whitespace; the script is its last argument
    /// [default: "/bin/sh -c"].
    #[arg(
        long,
        value_name = "CMD",
        requires = "script",
        conflicts_with = "command"
    )]
    pub interpreter: Option<String>,

    /// The command and its arguments, run without a shell (after `--`).
    #[arg(
        value_name = "CMD",
        trailing_var_arg = true,
        required_unless_present_any = ["script", "file"],
        conflicts_with = "script"
    )]
    pub command: Vec<String>,
}

/// Filters and paging of `hodei list`.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Only jobs in this state (repeatable, or comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "S")]
    pub state: Vec<JobStateArg>,

    /// Only jobs whose name starts with this.
    #[arg(long, value_name = "P")]
    pub name_prefix: Option<String>,

    /// Only jobs carrying this label (repeatable).
    #[arg(long = "label", value_name = "k=v", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,

    /// Only jobs matching these words in their name, labels, command or latest output
    /// tail: `a b` both, `"a b"` the phrase, `a or b` either, `-a` without.
    #[arg(long, value_name = "WORDS")]
    pub search: Option<String>,

    /// Only this tenant's jobs [default: the token's tenant; every tenant for an admin].
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,

    /// Jobs per page, 1 to 1000 [server default: 100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,

    /// Where to continue, from the previous page's `next page` line.
    #[arg(long, value_name = "T")]
    pub page_token: Option<String>,
}

/// `hodei events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Events recorded at or after this RFC 3339 time.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,

    /// Events recorded before this RFC 3339 time.
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,

    /// Only events of this type (repeatable): submitted, assigned, started, requeued,
    /// succeeded, failed, timed_out, cancel_requested, cancelled.
    #[arg(long = "type", value_name = "TYPE")]
    pub types: Vec<String>,

    /// Only this tenant's jobs.
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,

    /// Only jobs carrying this label (repeatable).
    #[arg(long = "label", value_name = "k=v", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,

    /// Events per page, 1 to 1000 [server default: 100].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,

    /// Where to continue, from the previous page's `next page` line.
    #[arg(long, value_name = "T")]
    pub page_token: Option<String>,
}

/// A moment of a job's or run's history: after its event `Seq`, or at `Time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    Seq(u64),
    Time(DateTime<Utc>),
}

/// A job state as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum JobStateArg {
    Queued,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl From<JobStateArg> for pb::JobState {
    fn from(s: JobStateArg) -> Self {
        match s {
            JobStateArg::Queued => pb::JobState::Queued,
            JobStateArg::Assigned => pb::JobState::Assigned,
            JobStateArg::Running => pb::JobState::Running,
            JobStateArg::Succeeded => pb::JobState::Succeeded,
            JobStateArg::Failed => pb::JobState::Failed,
            JobStateArg::Cancelled => pb::JobState::Cancelled,
            JobStateArg::TimedOut => pb::JobState::TimedOut,
        }
    }
}

/// A pipeline run state as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum PipelineStateArg {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<PipelineStateArg> for pb::PipelineState {
    fn from(s: PipelineStateArg) -> Self {
        match s {
            PipelineStateArg::Queued => pb::PipelineState::Queued,
            PipelineStateArg::Running => pb::PipelineState::Running,
            PipelineStateArg::Succeeded => pb::PipelineState::Succeeded,
            PipelineStateArg::Failed => pb::PipelineState::Failed,
            PipelineStateArg::Cancelled => pb::PipelineState::Cancelled,
        }
    }
}

/// A worker status as typed on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum WorkerStatusArg {
    Ready,
    Draining,
    Unreachable,
    Lost,
    Offline,
}

impl From<WorkerStatusArg> for pb::WorkerStatus {
    fn from(s: WorkerStatusArg) -> Self {
        match s {
            WorkerStatusArg::Ready => pb::WorkerStatus::Ready,
            WorkerStatusArg::Draining => pb::WorkerStatus::Draining,
            WorkerStatusArg::Unreachable => pb::WorkerStatus::Unreachable,
            WorkerStatusArg::Lost => pb::WorkerStatus::Lost,
            WorkerStatusArg::Offline => pb::WorkerStatus::Offline,
        }
    }
}

/// Parses `KEY=VALUE`; the value may be empty or contain `=`, the key may not be empty.
/// clap prefixes the error with the flag, as in "invalid value 'X' for '--env <K=V>'".
/// A sequence number (digits) or an RFC 3339 time.
fn parse_moment(s: &str) -> Result<Moment, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s
            .parse()
            .map(Moment::Seq)
            .map_err(|e| format!("not a sequence number: {e}"));
    }
    parse_time(s).map(Moment::Time)
}

/// An RFC 3339 time, such as 2026-12-03T02:00:00Z.
fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("not an RFC 3339 time such as 2026-12-03T02:00:00Z: {e}"))
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err("the key before '=' is empty".to_owned()),
        Some((key, value)) => Ok((key.to_owned(), value.to_owned())),
        None => Err("expected KEY=VALUE, with an '='".to_owned()),
    }
}

/// Parses `KEY=VALUE` or a bare `KEY` whose value is read later from the environment.
fn parse_secret_env(s: &str) -> Result<(String, Option<String>), String> {
    match s.split_once('=') {
        None if s.is_empty() => Err("the variable name is empty".to_owned()),
        None => Ok((s.to_owned(), None)),
        Some(_) => parse_key_value(s).map(|(k, v)| (k, Some(v))),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("hodei").chain(args.iter().copied()))
    }

    fn job_args(args: &[&str]) -> JobArgs {
        match parse(args).unwrap().command {
            Command::Submit(a) | Command::Run(a) => a,
            other => panic!("not a job command: {other:?}"),
        }
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_defaults() {
        let cli = parse(&["get", "j1"]).unwrap();
        assert_eq!(cli.output, OutputFormat::Human);
        // HODEI_SERVER may be set where the tests run; only check the flag wins.
        let cli = parse(&["--server", "http://h:1", "--output", "json", "get", "j1"]).unwrap();
        assert_eq!(cli.server, "http://h:1");
        assert_eq!(cli.output, OutputFormat::Json);
        let cli = parse(&["get", "j1", "--output", "json"]).unwrap();
        assert_eq!(cli.output, OutputFormat::Json);
    }

    #[test]
    fn key_values_split_on_the_first_equals() {
        let a = job_args(&["submit", "--env", "A=b=c", "--env", "EMPTY=", "--", "true"]);
        assert_eq!(
            a.env,
            vec![("A".into(), "b=c".into()), ("EMPTY".into(), String::new())]
        );
    }

    #[test]
    fn malformed_key_value_names_the_flag() {
        let err = parse(&["submit", "--env", "X", "--", "true"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        let msg = err.to_string();
        assert!(msg.contains("--env"), "{msg}");
        assert!(msg.contains("KEY=VALUE"), "{msg}");

        let msg = parse(&["submit", "--require", "=x", "--", "true"])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--require"), "{msg}");
        let msg = parse(&["list", "--label", "nolabel"])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--label"), "{msg}");
    }

    #[test]
    fn command_after_double_dash_keeps_its_flags() {
        let a = job_args(&["run", "--name", "x", "--", "ls", "-la", "--color", "/tmp"]);
        assert_eq!(a.command, vec!["ls", "-la", "--color", "/tmp"]);
        assert_eq!(a.name.as_deref(), Some("x"));
        let a = job_args(&["submit", "echo", "-n", "hi"]);
        assert_eq!(a.command, vec!["echo", "-n", "hi"]);
    }

    #[test]
    fn a_command_or_a_script_is_required_but_not_both() {
        assert!(parse(&["submit"]).is_err());
        assert!(parse(&["submit", "--script", "echo hi", "--", "echo"]).is_err());
        let a = job_args(&["submit", "--script", "echo hi"]);
        assert_eq!(a.script.as_deref(), Some("echo hi"));
        assert_eq!(a.interpreter, None);
        assert!(parse(&["submit", "--interpreter", "bash -c", "--", "true"]).is_err());
        assert!(parse(&["submit", "--interpreter", "bash -c"]).is_err());
    }

    #[test]
    fn a_job_file_stands_for_the_command() {
        let a = job_args(&["run", "-f", "job.yaml"]);
        assert_eq!(a.file.as_deref(), Some("job.yaml"));
        assert!(a.command.is_empty());
        let a = job_args(&["submit", "--file", "-", "--name", "x", "--", "echo", "hi"]);
        assert_eq!(a.file.as_deref(), Some("-"));
        assert_eq!(a.command, vec!["echo", "hi"]);
        let a = job_args(&["submit", "-f", "job.json", "--script", "make"]);
        assert_eq!(a.script.as_deref(), Some("make"));
    }

    #[test]
    fn numbers_are_range_checked() {
        let a = job_args(&["submit", "--priority", "-5", "--", "true"]);
        assert_eq!(a.priority, Some(-5));
        assert!(parse(&["submit", "--priority", "1001", "--", "true"]).is_err());
        assert!(parse(&["submit", "--max-attempts", "0", "--", "true"]).is_err());
        assert!(parse(&["list", "--limit", "0"]).is_err());
    }

    #[test]
    fn states_repeat_or_use_commas() {
        let Command::List(l) =
            parse(&["list", "--state", "queued,timed_out", "--state", "running"])
                .unwrap()
                .command
        else {
            panic!("not list");
        };
        assert_eq!(
            l.state,
            vec![
                JobStateArg::Queued,
                JobStateArg::TimedOut,
                JobStateArg::Running
            ]
        );
        assert!(parse(&["list", "--state", "done"]).is_err());
    }

    #[test]
    fn pipeline_commands_parse() {
        let Command::Pipeline(PipelineCommand::Run(a)) =
            parse(&["pipeline", "run", "-f", "-"]).unwrap().command
        else {
            panic!("not pipeline run");
        };
        assert_eq!(a.file, "-");
        assert!(parse(&["pipeline", "run"]).is_err());
        let Command::Pipeline(PipelineCommand::List(l)) = parse(&[
            "pipeline",
            "list",
            "--state",
            "running,failed",
            "--name",
            "nightly-",
            "--limit",
            "5",
        ])
        .unwrap()
        .command
        else {
            panic!("not pipeline list");
        };
        assert_eq!(
            l.state,
            vec![PipelineStateArg::Running, PipelineStateArg::Failed]
        );
        assert_eq!(l.name_prefix.as_deref(), Some("nightly-"));
        assert_eq!(l.limit, Some(5));
        assert!(parse(&["pipeline", "list", "--state", "waiting"]).is_err());
        assert!(parse(&["pipelines", "get", "r1"]).is_ok());
    }

    #[test]
    fn artifacts_commands_parse() {
        let Command::Artifacts(ArtifactsCommand::Get {
            run_id,
            step,
            path,
            output_file,
        }) = parse(&["artifacts", "get", "-o", "-", "r1", "build", "dist/app.txt"])
            .unwrap()
            .command
        else {
            panic!("not artifacts get");
        };
        assert_eq!(
            (
                run_id.as_str(),
                step.as_str(),
                path.as_str(),
                output_file.as_deref()
            ),
            ("r1", "build", "dist/app.txt", Some("-"))
        );
        let Command::Artifacts(ArtifactsCommand::Ls { step, .. }) =
            parse(&["artifacts", "ls", "r1", "--step", "test[os=linux]"])
                .unwrap()
                .command
        else {
            panic!("not artifacts ls");
        };
        assert_eq!(step.as_deref(), Some("test[os=linux]"));
        assert!(parse(&["artifacts", "get", "r1", "build"]).is_err());
    }

    #[test]
    fn logs_flags() {
        let Command::Logs { id, follow, from } =
            parse(&["logs", "-f", "--from", "7", "j1"]).unwrap().command
        else {
            panic!("not logs");
        };
        assert_eq!((id.as_str(), follow, from), ("j1", true, 7));
    }
}
