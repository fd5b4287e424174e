//! `hodei-admin`: operators' commands that work on the state of record directly, beside the
//! running services. `rebuild-projections` checks (and repairs) the `jobs` and
//! `pipeline_runs` projections against the event store; `archive` runs a retention pass now
//! (the schedulers run one every `HODEI_RETENTION_INTERVAL`); `token` creates and revokes API
//! tokens (the first admin token of a deployment comes from here); `tls init` makes a local
//! CA with the gateway's certificate.

pub mod nats;
pub mod rebuild;

use std::fmt::Write as _;

use clap::{Parser, Subcommand};

use hodei_domain::{Role, TenantId, TokenId};
use hodei_storage::access::{self, TokenRecord};
use hodei_storage::archive::{self, Counts, Moved};
pub use rebuild::{RebuildOptions, RebuildReport, rebuild_projections};

/// Operators' commands on a Hodei Pipelines database.
#[derive(Debug, Parser)]
#[command(name = "hodei-admin", version)]
pub struct AdminArgs {
    /// PostgreSQL URL of the state of record.
    #[arg(
        long,
        env = "HODEI_DATABASE_URL",
        global = true,
        default_value = "postgres://postgres@127.0.0.1:5432/hodei"
    )]
    pub database_url: String,

    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Fold every job and pipeline run from its events and compare it with its projection
    /// row, online, a batch per snapshot. Exits 0 when every row agrees (or was repaired), 3
    /// when differences are left.
    #[command(after_help = "\
Examples:
  hodei-admin rebuild-projections
  hodei-admin rebuild-projections --repair --batch 1000")]
    RebuildProjections {
        /// Overwrite each differing row with the state folded from its events (if the row
        /// has not moved meanwhile; secrets and pending reasons are kept from the row).
        #[arg(long)]
        repair: bool,
        /// Aggregates read per snapshot.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
    },
    /// Move ended jobs and pipeline runs older than `--older-than` to the archive tables now,
    /// a short transaction per batch, beside running schedulers (they share the work).
    #[command(after_help = "\
Examples:
  hodei-admin archive --older-than 30d
  hodei-admin archive --older-than 12h --batch 1000")]
    Archive {
        /// How long ago a job or run must have ended (`30d`, `12h`, `90s`).
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
        /// Jobs, and pipeline runs, moved per transaction.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
    },
    /// Create and revoke API tokens directly in the database: how the first admin token of a
    /// deployment is made (later ones can come from `hodei token create`).
    #[command(subcommand)]
    #[command(after_help = "\
Examples:
  hodei-admin token create --name bootstrap --role admin
  hodei-admin token create --name ci --tenant team-a --role submitter --expires-in 90d
  hodei-admin token revoke 0193a7c2-5d1e-7f00-8a11-2b3c4d5e6f70")]
    Token(TokenCommand),
    /// Certificates for TLS without a PKI of your own.
    #[command(subcommand)]
    #[command(after_help = "\
Example:
  hodei-admin tls init --dir .hodei/tls --name localhost --name 127.0.0.1 --name hodei.internal")]
    Tls(TlsCommand),
    /// NATS credentials: an nkey per service and per agent, and the nats-server
    /// `authorization` block (`auth.conf`) that gives each only the subjects it needs.
    #[command(subcommand)]
    #[command(after_help = "\
Examples:
  hodei-admin nats init --dir .hodei/nats --tls-cert .hodei/tls/server.pem --tls-key .hodei/tls/server-key.pem
  hodei-admin nats agent-add --dir .hodei/nats --id worker-1
  hodei-admin nats agent-revoke --dir .hodei/nats --id worker-1 && nats-server --signal reload=PID")]
    Nats(NatsCommand),
    /// The control plane's secrets key: the gateway seals secret env values to its public
    /// half (`HODEI_SECRETS_PUBLIC_KEY`), the schedulers open them with it
    /// (`HODEI_SECRETS_KEY_FILE`) to seal them again for the assigned agent.
    #[command(subcommand)]
    #[command(after_help = "\
Example:
  HODEI_SECRETS_PUBLIC_KEY=$(hodei-admin secrets init --file .hodei/secrets.xk)")]
    Secrets(SecretsCommand),
}

/// The secrets key commands.
#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Write a new key's seed into `--file` (readable by its owner only), or keep the one
    /// there, and print its public key.
    Init {
        #[arg(long)]
        file: std::path::PathBuf,
    },
}

/// The public half of the secrets key in `file`, making the key first if there is none.
pub fn secrets_init(file: &std::path::Path) -> Result<String, AdminError> {
    use hodei_messaging::seal::OpeningKey;
    let key = match OpeningKey::load(file) {
        Ok(key) => key,
        Err(_) if !file.exists() => {
            let key = OpeningKey::generate();
            let seed = key.seed().map_err(|e| AdminError::Key(e.to_string()))?;
            write_file(file, &format!("{seed}\n"), 0o600)?;
            key
        }
        Err(e) => return Err(AdminError::Key(e.to_string())),
    };
    Ok(key.public_key())
}

/// The NATS credential commands. None needs the database; after `agent-add` or
/// `agent-revoke`, reload nats-server (`nats-server --signal reload=<pid>`) to apply.
#[derive(Debug, Subcommand)]
pub enum NatsCommand {
    /// Make a credential for each service (keeping those already in `--dir`) and write
    /// `auth.conf` for nats-server to include.
    Init {
        /// Where the credentials live.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The NATS server's certificate (PEM): clients must then connect with TLS.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// The NATS server certificate's key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
    },
    /// Enrol an agent: a new key that may act only as worker `--id` (any earlier key of that
    /// worker stops working). Prints the seed file to hand to the agent.
    AgentAdd {
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The worker id the agent runs with (`HODEI_WORKER_ID`).
        #[arg(long)]
        id: hodei_domain::WorkerId,
    },
    /// Revoke an agent's key: after the reload, nats-server refuses it and drops its
    /// connection. Exits 1 if the agent had no key.
    AgentRevoke {
        #[arg(long)]
        dir: std::path::PathBuf,
        #[arg(long)]
        id: hodei_domain::WorkerId,
    },
}

/// The token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print its secret on stdout (shown this once; only its hash is
    /// stored).
    Create {
        /// What the token is for, shown in listings.
        #[arg(long)]
        name: String,
        /// The tenant the token acts for.
        #[arg(long, default_value = "default")]
        tenant: TenantId,
        /// viewer, submitter, operator or admin.
        #[arg(long)]
        role: Role,
        /// How long until it expires (`90d`, `12h`); never when not given.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<std::time::Duration>,
    },
    /// Revoke a token by id: gateways refuse it within their token cache's lifetime (5 s).
    Revoke {
        /// The token's id.
        id: TokenId,
    },
}

/// The TLS commands.
#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Make a local CA and, signed by it, a server certificate for the gateway and a client
    /// certificate (for gateways that require mutual TLS). Writes `ca.pem`, `ca-key.pem`,
    /// `server.pem`, `server-key.pem`, `client.pem` and `client-key.pem` into `--dir` (keys
    /// readable by their owner only); refuses to overwrite a CA already there.
    Init {
        /// Where to write the files.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Names the server certificate is valid for (DNS names or IP addresses).
        #[arg(long = "name", default_values = ["localhost", "127.0.0.1"])]
        names: Vec<String>,
    },
    /// Issue, with the CA in `--dir`, a client certificate that is also a credential: behind a
    /// gateway requiring client certificates, a call without a token is made by `--name` of
    /// `--tenant` with `--role`. Writes `<name>.pem` and `<name>-key.pem` into `--dir`.
    Client {
        /// Where the CA is, and where to write the certificate.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// Who the certificate is (its common name; letters, digits, '-', '_' and '.').
        #[arg(long)]
        name: String,
        /// The tenant it acts for (its organization).
        #[arg(long, default_value = "default")]
        tenant: TenantId,
        /// viewer, submitter, operator or admin (its organizational unit).
        #[arg(long)]
        role: Role,
    },
}

/// Stores a new token of `tenant` with `role`, made by `created_by`, expiring after
/// `expires_in` if given. Returns it with its secret, which nothing else keeps.
pub async fn create_token(
    pool: &sqlx::PgPool,
    name: &str,
    tenant: TenantId,
    role: Role,
    expires_in: Option<std::time::Duration>,
    created_by: &str,
) -> Result<(TokenRecord, String), AdminError> {
    let now = chrono::Utc::now();
    let expires_at = expires_in
        .map(|d| {
            chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
                .ok_or(AdminError::Age)
        })
        .transpose()?;
    let minted = hodei_auth::token::mint()?;
    let record = TokenRecord::new(name, tenant, role, created_by, now, expires_at);
    access::insert_token(pool, &record, &minted.hash).await?;
    Ok((record, minted.secret))
}

/// Revokes token `id`; false when there is no such token.
pub async fn revoke_token(pool: &sqlx::PgPool, id: TokenId) -> Result<bool, AdminError> {
    Ok(access::revoke_token(pool, id, chrono::Utc::now())
        .await?
        .is_some())
}

/// Writes a new local CA, a server certificate for `names` and a client certificate into
/// `dir`. Returns the paths written.
pub fn tls_init(
    dir: &std::path::Path,
    names: &[String],
) -> Result<Vec<std::path::PathBuf>, AdminError> {
    let ca_path = dir.join("ca.pem");
    if ca_path.exists() {
        return Err(AdminError::Exists(ca_path));
    }
    std::fs::create_dir_all(dir).map_err(|e| AdminError::Io(dir.to_owned(), e))?;
    let ca = hodei_auth::pki::LocalCa::new("hodei local ca")?;
    let server = ca.server(names)?;
    let client = ca.client("hodei client")?;
    let files = [
        ("ca.pem", ca.cert_pem(), 0o644),
        ("ca-key.pem", ca.key_pem(), 0o600),
        ("server.pem", server.cert_pem, 0o644),
        ("server-key.pem", server.key_pem, 0o600),
        ("client.pem", client.cert_pem, 0o644),
        ("client-key.pem", client.key_pem, 0o600),
    ];
    write_files(dir, &files)
}

/// Issues, with the CA written in `dir`, a client certificate naming `name` of `tenant` with
/// `role`. Returns the paths written.
pub fn tls_client(
    dir: &std::path::Path,
    name: &str,
    tenant: &TenantId,
    role: Role,
) -> Result<Vec<std::path::PathBuf>, AdminError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name.starts_with('.')
    {
        return Err(AdminError::Name(name.to_owned()));
    }
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).map_err(|e| AdminError::Io(path, e))
    };
    let ca = hodei_auth::pki::LocalCa::load(&read("ca.pem")?, &read("ca-key.pem")?)?;
    let issued = ca.principal_client(name, tenant, role)?;
    write_files(
        dir,
        &[
            (&format!("{name}.pem"), issued.cert_pem, 0o644),
            (&format!("{name}-key.pem"), issued.key_pem, 0o600),
        ],
    )
}

/// Writes each `(file, contents, mode)` into `dir`.
fn write_files<S: AsRef<str>>(
    dir: &std::path::Path,
    files: &[(S, String, u32)],
) -> Result<Vec<std::path::PathBuf>, AdminError> {
    let mut written = Vec::new();
    for (name, contents, mode) in files {
        let path = dir.join(name.as_ref());
        write_file(&path, contents, *mode)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes `contents` to `path` with `mode`, through a temporary file and a rename, so a reader
/// sees the old file or the new one, never half of one.
pub(crate) fn write_file(
    path: &std::path::Path,
    contents: &str,
    mode: u32,
) -> Result<(), AdminError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| AdminError::Io(tmp.clone(), e))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| AdminError::Io(tmp.clone(), e))?;
    std::fs::rename(&tmp, path).map_err(|e| AdminError::Io(path.to_owned(), e))
}

/// Moves every job and run that ended more than `older_than` ago to the archive, a batch per
/// transaction, and returns what moved and the row counts after.
pub async fn archive(
    pool: &sqlx::PgPool,
    older_than: std::time::Duration,
    batch: u32,
) -> Result<(Moved, Counts), AdminError> {
    let cutoff = archive::cutoff(older_than).ok_or(AdminError::Age)?;
    let mut total = Moved::default();
    loop {
        let moved = archive::archive_batch(pool, cutoff, batch).await?;
        if moved == Moved::default() {
            break;
        }
        total += moved;
    }
    Ok((total, archive::counts(pool).await?))
}

/// The archive report as people read it.
pub fn archive_text(moved: &Moved, counts: &Counts) -> String {
    format!(
        "archived {} jobs, {} pipeline runs and {} events\n\
         hot: {} jobs, {} pipeline runs; archive: {} jobs, {} pipeline runs\n",
        moved.jobs,
        moved.runs,
        moved.events,
        counts.jobs,
        counts.pipeline_runs,
        counts.jobs_archive,
        counts.pipeline_runs_archive
    )
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Storage(#[from] hodei_storage::StorageError),
    #[error("the duration reaches past the times this program can count")]
    Age,
    #[error(transparent)]
    Auth(#[from] hodei_auth::AuthError),
    #[error("{0} exists already; remove it to make a new CA")]
    Exists(std::path::PathBuf),
    #[error("{0:?} is not a certificate name (letters, digits, '-', '_' and '.')")]
    Name(String),
    #[error("failed to read or write {0}: {1}")]
    Io(std::path::PathBuf, #[source] std::io::Error),
    #[error("{0} is not a credentials file hodei-admin wrote: {1}")]
    Format(std::path::PathBuf, #[source] serde_json::Error),
    #[error("failed to make a key: {0}")]
    Key(String),
}

/// The report as people read it: one line per differing field, then the totals.
pub fn report_text(report: &RebuildReport) -> String {
    let mut out = String::new();
    for d in &report.differences {
        let _ = writeln!(
            out,
            "{} {}{}",
            d.aggregate.name(),
            d.id,
            if d.repaired { " (repaired)" } else { "" }
        );
        for f in &d.fields {
            let _ = writeln!(
                out,
                "  {}: projection {} / events {}",
                f.field, f.live, f.rebuilt
            );
        }
    }
    let repaired = report.differences.len() - report.unrepaired();
    let _ = writeln!(
        out,
        "checked {} jobs and {} pipeline runs: {} differ from their events, {} repaired",
        report.jobs_checked,
        report.runs_checked,
        report.differences.len(),
        repaired
    );
    out
}
