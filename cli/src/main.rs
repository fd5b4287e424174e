//! `hodei`, the command-line client of Hodei Pipelines: submit jobs and pipelines, follow
//! their output and events, and look at jobs, pipeline runs, artifacts and workers, over the
//! API gateway's gRPC API.
//!
//! Exit codes: 0 on success; 2 when the command fails (bad usage, a job or pipeline file that
//! does not parse or validate, an error from the server, the server unreachable); `hodei run`
//! exits with its job's exit code, or 1 when the job ended without one; `hodei pipeline run`
//! and `watch` exit 1 when the run failed or was cancelled.

mod cli;
mod client;
mod commands;
mod error;
#[cfg(test)]
mod fixtures;
mod human;
mod jobfile;
mod json;
mod live;
mod progress;
mod spec;
mod style;
mod table;
mod wire;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let server = cli.server.clone();
    match commands::execute(cli).await {
        Ok(code) => code,
        Err(err) => error::report(&err, &server),
    }
}
