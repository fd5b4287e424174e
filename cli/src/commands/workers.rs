//! The worker commands: workers, worker and drain.

use std::collections::HashSet;
use std::process::ExitCode;

use anyhow::Context;
use hodei_proto::v1 as pb;
use serde_json::json;

use super::{print_json, print_text};
use crate::cli::{OutputFormat, WorkerStatusArg};
use crate::client::Clients;
use crate::{human, json, wire};

/// Workers per page requested from the server; every page is fetched.
const PAGE_SIZE: u32 = 1000;

pub async fn list(
    clients: &mut Clients,
    statuses: &[WorkerStatusArg],
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let statuses: Vec<i32> = statuses
        .iter()
        .map(|s| pb::WorkerStatus::from(*s).into())
        .collect();
    let mut workers = Vec::new();
    let mut page_token = String::new();
    let mut seen_tokens = HashSet::new();
    loop {
        let page = clients
            .workers
            .list_workers(pb::ListWorkersRequest {
                statuses: statuses.clone(),
                page_size: PAGE_SIZE,
                page_token: page_token.clone(),
            })
            .await?
            .into_inner();
        workers.extend(page.workers);
        // A server handing out a token twice would otherwise keep us here forever.
        if page.next_page_token.is_empty() || !seen_tokens.insert(page.next_page_token.clone()) {
            break;
        }
        page_token = page.next_page_token;
    }
    match format {
        OutputFormat::Human => print_text(&human::workers_table(&workers, chrono::Utc::now()))?,
        OutputFormat::Json => print_json(&json!({
            "workers": workers.iter().map(json::worker).collect::<Vec<_>>(),
        }))?,
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn get(
    clients: &mut Clients,
    id: String,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let worker = clients
        .workers
        .get_worker(pb::GetWorkerRequest { worker_id: id })
        .await?
        .into_inner()
        .worker
        .context("the server answered without the worker")?;
    match format {
        OutputFormat::Human => print_text(&human::worker_block(&worker, chrono::Utc::now()))?,
        OutputFormat::Json => print_json(&json::worker(&worker))?,
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn drain(
    clients: &mut Clients,
    id: String,
    reason: String,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let worker = clients
        .workers
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: id,
            reason,
        })
        .await?
        .into_inner()
        .worker
        .context("the server answered without the worker")?;
    match format {
        OutputFormat::Human => print_text(&format!(
            "worker {} {}\n",
            worker.id,
            wire::status_name(worker.status)
        ))?,
        OutputFormat::Json => print_json(&json::worker(&worker))?,
    }
    Ok(ExitCode::SUCCESS)
}
