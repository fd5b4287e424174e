//! `hodei-admin`: parses the command, runs it against the database and prints its report.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hodei_admin::{
    AdminArgs, AdminCommand, NatsCommand, RebuildOptions, SecretsCommand, TlsCommand, TokenCommand,
    archive, archive_text, create_token, rebuild_projections, report_text, revoke_token,
    tls_client, tls_init,
};

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = AdminArgs::parse();
    // Certificates need no database.
    if let AdminCommand::Tls(command) = &args.command {
        let written = match command {
            TlsCommand::Init { dir, names } => tls_init(dir, names).context("tls init failed")?,
            TlsCommand::Client {
                dir,
                name,
                tenant,
                role,
            } => tls_client(dir, name, tenant, *role).context("tls client failed")?,
        };
        for path in written {
            println!("wrote {}", path.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let AdminCommand::Nats(command) = &args.command {
        return nats(command);
    }
    if let AdminCommand::Secrets(SecretsCommand::Init { file }) = &args.command {
        println!(
            "{}",
            hodei_admin::secrets_init(file).context("secrets init failed")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let telemetry = hodei_telemetry::init("admin").context("failed to initialise telemetry")?;
    let pool = hodei_storage::connect(&args.database_url, 4, Duration::from_secs(10))
        .await
        .context("failed to connect to postgres")?;
    let code = match args.command {
        AdminCommand::RebuildProjections { repair, batch } => {
            let report = rebuild_projections(&pool, RebuildOptions { batch, repair })
                .await
                .context("rebuild failed")?;
            print!("{}", report_text(&report));
            if report.unrepaired() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            }
        }
        AdminCommand::Archive { older_than, batch } => {
            let (moved, counts) = archive(&pool, older_than, batch)
                .await
                .context("archive failed")?;
            print!("{}", archive_text(&moved, &counts));
            ExitCode::SUCCESS
        }
        AdminCommand::Token(TokenCommand::Create {
            name,
            tenant,
            role,
            expires_in,
        }) => {
            // A fresh database gets its tables first: the bootstrap token may come before
            // any service has started.
            hodei_storage::migrate(&pool)
                .await
                .context("failed to apply migrations")?;
            let (token, secret) =
                create_token(&pool, &name, tenant, role, expires_in, "hodei-admin")
                    .await
                    .context("token create failed")?;
            eprintln!(
                "token {} ({} of {}): the secret below is shown only now",
                token.id, token.role, token.tenant
            );
            println!("{secret}");
            ExitCode::SUCCESS
        }
        AdminCommand::Token(TokenCommand::Revoke { id }) => {
            if revoke_token(&pool, id)
                .await
                .context("token revoke failed")?
            {
                println!("token {id} revoked");
                ExitCode::SUCCESS
            } else {
                eprintln!("error: token {id} not found");
                ExitCode::from(2)
            }
        }
        AdminCommand::Tls(_) | AdminCommand::Nats(_) | AdminCommand::Secrets(_) => {
            ExitCode::SUCCESS
        }
    };
    pool.close().await;
    telemetry.shutdown().await;
    Ok(code)
}

/// Runs a NATS credential command, which needs no database.
fn nats(command: &NatsCommand) -> anyhow::Result<ExitCode> {
    use hodei_admin::nats::NatsCredentials;
    match command {
        NatsCommand::Init {
            dir,
            tls_cert,
            tls_key,
        } => {
            let tls = tls_cert.clone().zip(tls_key.clone());
            let credentials = NatsCredentials::init(dir, tls).context("nats init failed")?;
            println!("wrote {}", credentials.auth_file().display());
        }
        NatsCommand::AgentAdd { dir, id } => {
            let mut credentials = NatsCredentials::open(dir).context("nats agent-add failed")?;
            let seed = credentials.add_agent(id).context("nats agent-add failed")?;
            println!("{}", seed.display());
            eprintln!("reload nats-server to apply: nats-server --signal reload=<pid>");
        }
        NatsCommand::AgentRevoke { dir, id } => {
            let mut credentials = NatsCredentials::open(dir).context("nats agent-revoke failed")?;
            if !credentials
                .revoke_agent(id)
                .context("nats agent-revoke failed")?
            {
                eprintln!("agent {id} has no nats key");
                return Ok(ExitCode::FAILURE);
            }
            eprintln!("revoked; reload nats-server to apply: nats-server --signal reload=<pid>");
        }
    }
    Ok(ExitCode::SUCCESS)
}
