//! `hodei-admin`: parses the command, runs it against the database and prints its report.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use hodei_admin::{
    AdminArgs, AdminCommand, RebuildOptions, archive, archive_text, rebuild_projections,
    report_text,
};

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let args = AdminArgs::parse();
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
    };
    pool.close().await;
    telemetry.shutdown().await;
    Ok(code)
}
