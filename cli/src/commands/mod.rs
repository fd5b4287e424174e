//! One function per command: call the API, print the answer, choose the exit code.

mod access;
mod artifacts;
mod jobs;
mod pipelines;
mod schedules;
mod tenants;
mod workers;

use std::io::{self, Write};
use std::process::ExitCode;

use hodei_proto::v1 as pb;
use serde_json::Value;

use crate::cli::{ArtifactsCommand, Cli, Command, OutputFormat, PipelineCommand};
use crate::client::{Clients, Connection};
use crate::json;
use crate::style::{Paint, Style};

/// Runs the parsed command line against the server it names.
pub async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut clients = Clients::connect_lazy(&Connection {
        server: &cli.server,
        token: cli.token.as_deref().filter(|t| !t.is_empty()),
        ca: cli.ca.as_deref(),
        client_cert: cli.tls_cert.as_deref().zip(cli.tls_key.as_deref()),
    })?;
    let format = cli.output;
    match cli.command {
        Command::Submit(args) => jobs::submit(&mut clients, &args, format).await,
        Command::Run(args) => jobs::run(&mut clients, &args, format).await,
        Command::SubmitMany { file } => jobs::submit_many(&mut clients, &file, format).await,
        Command::Get { id, at } => jobs::get(&mut clients, id, at, format).await,
        Command::History { id } => jobs::history(&mut clients, id, format).await,
        Command::Events(args) => jobs::events(&mut clients, args, format).await,
        Command::List(args) => jobs::list(&mut clients, args, format).await,
        Command::Watch { id, from } => jobs::watch(&mut clients, id, from, format).await,
        Command::Logs { id, follow, from } => {
            jobs::logs(&mut clients, id, follow, from, format).await
        }
        Command::Cancel { id, reason } => jobs::cancel(&mut clients, id, reason, format).await,
        Command::Workers { status } => workers::list(&mut clients, &status, format).await,
        Command::Worker { id } => workers::get(&mut clients, id, format).await,
        Command::Drain { id, reason } => workers::drain(&mut clients, id, reason, format).await,
        Command::Pipeline(command) => pipeline(&mut clients, command, format).await,
        Command::Schedule(command) => schedules::execute(&mut clients, command, format).await,
        Command::Tenant(command) => tenants::execute(&mut clients, command, format).await,
        Command::WhoAmI => access::whoami(&mut clients, format).await,
        Command::Token(command) => access::token(&mut clients, command, format).await,
        Command::Audit {
            tenant,
            limit,
            page_token,
        } => access::audit(&mut clients, tenant, limit, page_token, format).await,
        Command::Artifacts(command) => match command {
            ArtifactsCommand::Ls { run_id, step } => {
                artifacts::ls(&mut clients, run_id, step, format).await
            }
            ArtifactsCommand::Get {
                run_id,
                step,
                path,
                output_file,
            } => artifacts::get(&mut clients, run_id, step, path, output_file, format).await,
        },
    }
}

async fn pipeline(
    clients: &mut Clients,
    command: PipelineCommand,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    match command {
        PipelineCommand::Run(args) => pipelines::run(clients, &args, format).await,
        PipelineCommand::Submit(args) => pipelines::submit(clients, &args, format).await,
        PipelineCommand::Get { id, at } => pipelines::get(clients, id, at, format).await,
        PipelineCommand::List(args) => pipelines::list(clients, args, format).await,
        PipelineCommand::Watch { id } => pipelines::watch(clients, id, format).await,
        PipelineCommand::Cancel { id, reason } => {
            pipelines::cancel(clients, id, reason, format).await
        }
    }
}

/// Exit code of `hodei run` and `hodei pipeline run` when the user stops waiting with a
/// second Ctrl-C (128 + SIGINT).
const DETACHED: u8 = 130;

/// Recorded on the job or run when Ctrl-C cancels `hodei run` or `hodei pipeline run`.
const INTERRUPT_REASON: &str = "interrupted by the client (ctrl-c)";

/// Writes `text` to stdout as is. Writing through `io::Write` rather than `print!` turns a
/// closed pipe into an error instead of a panic.
fn print_text(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// One JSON document, indented, for commands that answer once.
fn print_json(value: &Value) -> anyhow::Result<()> {
    print_text(&format!("{}\n", serde_json::to_string_pretty(value)?))?;
    Ok(())
}

/// What a cancel did to a job or run (`kind`): `<kind> <id> <state>` once it ended, or that
/// the cancel is on its way while it still runs.
fn cancel_text(kind: &str, id: &str, ended: bool, state: &str) -> String {
    if ended {
        format!("{kind} {id} {state}")
    } else {
        format!("{kind} {id} cancel requested (still {state})")
    }
}

/// Says on stderr when a submission returned what an earlier one with the same idempotency
/// key created (`kind` `job` or `run`).
fn note_resubmission(kind: &str, id: &str, created: bool) {
    if !created {
        eprintln!(
            "{kind} {id} was submitted earlier with this idempotency key; not submitted again"
        );
    }
}

/// An answer in the chosen format: `text` and a newline, or `json` indented.
fn print_answer(
    format: OutputFormat,
    text: &str,
    json: impl FnOnce() -> Value,
) -> anyhow::Result<ExitCode> {
    match format {
        OutputFormat::Human => print_text(&format!("{text}\n"))?,
        OutputFormat::Json => print_json(&json())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// One page of a list: in human form `table` and, when more follow, the `next page:` line; in
/// JSON form `{ <key>: items, "next_page_token": … }`.
fn print_page(
    format: OutputFormat,
    key: &str,
    table: impl FnOnce() -> String,
    items: impl FnOnce() -> Vec<Value>,
    next_page_token: &str,
) -> anyhow::Result<ExitCode> {
    match format {
        OutputFormat::Human => {
            let mut text = table();
            if !next_page_token.is_empty() {
                text.push_str(&format!("next page: --page-token {next_page_token}\n"));
            }
            print_text(&text)?;
        }
        OutputFormat::Json => {
            let mut page = serde_json::Map::new();
            page.insert(key.to_owned(), Value::Array(items()));
            page.insert("next_page_token".to_owned(), Value::from(next_page_token));
            print_json(&Value::Object(page))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One JSON object per line, for streams.
fn print_json_line(value: &Value) -> anyhow::Result<()> {
    print_text(&format!("{value}\n"))?;
    Ok(())
}

/// A job output line: in human form to stdout or stderr like the job wrote it, stderr lines
/// dimmed when `stderr_style` colours; in JSON form as one object per line on stdout.
fn print_log_line(
    line: &pb::LogLine,
    format: OutputFormat,
    stderr_style: Style,
) -> anyhow::Result<()> {
    match format {
        OutputFormat::Json => print_json_line(&json::log_line(line)),
        OutputFormat::Human => {
            if line.stream == i32::from(pb::LogStream::Stderr) {
                let text = format!("{}\n", stderr_style.paint(Some(Paint::Dim), &line.text));
                let mut err = io::stderr().lock();
                err.write_all(text.as_bytes())?;
                err.flush()?;
            } else {
                print_text(&format!("{}\n", line.text))?;
            }
            Ok(())
        }
    }
}
