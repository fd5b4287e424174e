//! The schedule commands: create, create-pipeline, list, get, pause, resume, delete and
//! trigger.

use std::process::ExitCode;

use anyhow::Context;
use hodei_proto::v1 as pb;
use serde_json::{Value, json};

use super::{print_answer, print_page};
use crate::cli::{
    JobArgs, OutputFormat, OverlapArg, PipelineFileArgs, ScheduleArgs, ScheduleCommand, ScheduleRef,
};
use crate::client::Clients;
use crate::table::Table;
use crate::{json as job_json, spec, wire};

pub async fn execute(
    clients: &mut Clients,
    command: ScheduleCommand,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    match command {
        ScheduleCommand::Create { schedule, job } => {
            create(clients, &schedule, target_job(&job)?, format).await
        }
        ScheduleCommand::CreatePipeline { schedule, pipeline } => {
            create(clients, &schedule, target_pipeline(&pipeline)?, format).await
        }
        ScheduleCommand::List {
            limit,
            page_token,
            tenant,
        } => list(clients, limit, page_token, tenant, format).await,
        ScheduleCommand::Get(named) => {
            let found = clients
                .schedules
                .get_schedule(pb::GetScheduleRequest {
                    schedule: named.schedule,
                    tenant: named.tenant.unwrap_or_default(),
                })
                .await?
                .into_inner()
                .schedule
                .context("the server answered without the schedule")?;
            print_answer(format, &block(&found), || schedule_json(&found))
        }
        ScheduleCommand::Pause(named) => switch(clients, named, true, format).await,
        ScheduleCommand::Resume(named) => switch(clients, named, false, format).await,
        ScheduleCommand::Delete(named) => {
            let ScheduleRef { schedule, tenant } = named;
            clients
                .schedules
                .delete_schedule(pb::DeleteScheduleRequest {
                    schedule: schedule.clone(),
                    tenant: tenant.unwrap_or_default(),
                })
                .await?;
            print_answer(
                format,
                &format!("schedule {schedule} deleted"),
                || json!({ "deleted": schedule }),
            )
        }
        ScheduleCommand::Trigger(trigger) => {
            let ScheduleRef { schedule, tenant } = trigger.schedule;
            let answer = clients
                .schedules
                .trigger_schedule(pb::TriggerScheduleRequest {
                    schedule: schedule.clone(),
                    tenant: tenant.unwrap_or_default(),
                    idempotency_key: trigger.idempotency_key.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let tick = answer
                .tick
                .context("the server answered without the tick")?;
            print_answer(format, &tick_text(&schedule, &tick), || tick_json(&tick))
        }
    }
}

fn target_job(args: &JobArgs) -> anyhow::Result<pb::schedule_spec::Target> {
    Ok(pb::schedule_spec::Target::Job(args.to_spec()?))
}

fn target_pipeline(args: &PipelineFileArgs) -> anyhow::Result<pb::schedule_spec::Target> {
    Ok(pb::schedule_spec::Target::Pipeline(
        spec::pipeline_from_file(&args.file)?,
    ))
}

async fn create(
    clients: &mut Clients,
    args: &ScheduleArgs,
    target: pb::schedule_spec::Target,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let overlap = match args.overlap {
        None => pb::OverlapPolicy::Unspecified,
        Some(OverlapArg::Skip) => pb::OverlapPolicy::Skip,
        Some(OverlapArg::Allow) => pb::OverlapPolicy::Allow,
        Some(OverlapArg::CancelPrevious) => pb::OverlapPolicy::CancelPrevious,
    };
    let millis = |d: Option<std::time::Duration>| {
        d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    };
    let created = clients
        .schedules
        .create_schedule(pb::CreateScheduleRequest {
            spec: Some(pb::ScheduleSpec {
                name: args.schedule.clone(),
                cron: args.cron.clone(),
                time_zone: args.time_zone.clone().unwrap_or_default(),
                target: Some(target),
                overlap: overlap.into(),
                catch_up_window_ms: millis(args.catch_up),
                jitter_ms: millis(args.jitter),
                history_limit: args.history.unwrap_or(0),
            }),
            paused: args.paused,
            tenant: args.tenant.clone().unwrap_or_default(),
        })
        .await?
        .into_inner()
        .schedule
        .context("the server answered without the schedule")?;
    let next = wire::rfc3339_secs(created.next_tick.as_ref());
    print_answer(
        format,
        &format!("{} (next tick {next})", created.id),
        || schedule_json(&created),
    )
}

async fn list(
    clients: &mut Clients,
    limit: Option<u32>,
    page_token: Option<String>,
    tenant: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let page = clients
        .schedules
        .list_schedules(pb::ListSchedulesRequest {
            tenant: tenant.unwrap_or_default(),
            page_size: limit.unwrap_or(0),
            page_token: page_token.unwrap_or_default(),
        })
        .await?
        .into_inner();
    print_page(
        format,
        "schedules",
        || table(&page.schedules),
        || page.schedules.iter().map(schedule_json).collect(),
        &page.next_page_token,
    )
}

/// Pauses (`pause`) or resumes the schedule, and says what it is now.
async fn switch(
    clients: &mut Clients,
    named: ScheduleRef,
    pause: bool,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let ScheduleRef { schedule, tenant } = named;
    let tenant = tenant.unwrap_or_default();
    let answered = if pause {
        clients
            .schedules
            .pause_schedule(pb::PauseScheduleRequest { schedule, tenant })
            .await?
            .into_inner()
            .schedule
    } else {
        clients
            .schedules
            .resume_schedule(pb::ResumeScheduleRequest { schedule, tenant })
            .await?
            .into_inner()
            .schedule
    };
    let s = answered.context("the server answered without the schedule")?;
    let name = s.spec.as_ref().map(|s| s.name.as_str()).unwrap_or_default();
    let text = if s.paused {
        format!("schedule {name} paused")
    } else {
        format!(
            "schedule {name} resumed (next tick {})",
            wire::rfc3339_secs(s.next_tick.as_ref())
        )
    };
    print_answer(format, &text, || schedule_json(&s))
}

fn overlap_name(value: i32) -> &'static str {
    match pb::OverlapPolicy::try_from(value) {
        Ok(pb::OverlapPolicy::Allow) => "allow",
        Ok(pb::OverlapPolicy::CancelPrevious) => "cancel_previous",
        Ok(pb::OverlapPolicy::Skip | pb::OverlapPolicy::Unspecified) | Err(_) => "skip",
    }
}

fn target_text(spec: &pb::ScheduleSpec) -> String {
    match &spec.target {
        Some(pb::schedule_spec::Target::Job(job)) => format!("job {}", job.name),
        Some(pb::schedule_spec::Target::Pipeline(p)) => format!("pipeline {}", p.name),
        None => String::new(),
    }
}

/// `hodei schedule list`.
fn table(schedules: &[pb::Schedule]) -> String {
    let mut t = Table::with_header(&[
        "NAME",
        "ID",
        "CRON",
        "ZONE",
        "STARTS",
        "OVERLAP",
        "STATE",
        "NEXT TICK",
    ]);
    for s in schedules {
        let spec = s.spec.clone().unwrap_or_default();
        t.row([
            spec.name.clone(),
            s.id.clone(),
            spec.cron.clone(),
            spec.time_zone.clone(),
            target_text(&spec),
            overlap_name(spec.overlap).to_owned(),
            if s.paused { "paused" } else { "active" }.to_owned(),
            wire::rfc3339_secs(s.next_tick.as_ref()),
        ]);
    }
    t.render()
}

/// `hodei schedule get`: the schedule, then its newest ticks.
fn block(s: &pb::Schedule) -> String {
    let spec = s.spec.clone().unwrap_or_default();
    let mut t = Table::new();
    let mut row = |key: &str, value: String| t.row([format!("{key}:"), value]);
    row("name", spec.name.clone());
    row("id", s.id.clone());
    row("tenant", s.tenant.clone());
    row("cron", format!("{} ({})", spec.cron, spec.time_zone));
    row("starts", target_text(&spec));
    row("overlap", overlap_name(spec.overlap).to_owned());
    row("catch-up", format!("{} ms", spec.catch_up_window_ms));
    row("jitter", format!("{} ms", spec.jitter_ms));
    row("history", format!("{} ticks", spec.history_limit));
    row(
        "state",
        if s.paused { "paused" } else { "active" }.to_owned(),
    );
    row("next tick", wire::rfc3339_secs(s.next_tick.as_ref()));
    row("fires at", wire::rfc3339_secs(s.fire_at.as_ref()));
    let mut text = t.render();
    if !s.recent_ticks.is_empty() {
        let mut ticks = Table::with_header(&["TICK", "OUTCOME", "STARTED", "DETAIL"]);
        for tick in &s.recent_ticks {
            ticks.row([
                wire::rfc3339_secs(tick.tick.as_ref()),
                tick.outcome.clone(),
                started(tick),
                tick.detail.clone(),
            ]);
        }
        text.push_str("ticks (newest first):\n");
        text.push_str(&ticks.render());
    }
    text
}

fn started(tick: &pb::ScheduleTick) -> String {
    if !tick.job_id.is_empty() {
        format!("job {}", tick.job_id)
    } else if !tick.run_id.is_empty() {
        format!("run {}", tick.run_id)
    } else {
        String::new()
    }
}

fn tick_text(schedule: &str, tick: &pb::ScheduleTick) -> String {
    match tick.outcome.as_str() {
        "skipped" => format!("schedule {schedule} skipped: {}", tick.detail),
        _ => format!("schedule {schedule} started {}", started(tick)),
    }
}

fn tick_json(t: &pb::ScheduleTick) -> Value {
    json!({
        "tick": wire::rfc3339(t.tick.as_ref()),
        "outcome": t.outcome,
        "handled_at": wire::rfc3339(t.handled_at.as_ref()),
        "job_id": Some(&t.job_id).filter(|j| !j.is_empty()),
        "run_id": Some(&t.run_id).filter(|r| !r.is_empty()),
        "detail": t.detail,
    })
}

fn schedule_json(s: &pb::Schedule) -> Value {
    let spec = s.spec.clone().unwrap_or_default();
    let (job, pipeline) = match &spec.target {
        Some(pb::schedule_spec::Target::Job(j)) => (Some(job_json::spec(j)), None),
        Some(pb::schedule_spec::Target::Pipeline(p)) => (None, Some(job_json::pipeline_spec(p))),
        None => (None, None),
    };
    json!({
        "id": s.id,
        "tenant": s.tenant,
        "name": spec.name,
        "cron": spec.cron,
        "time_zone": spec.time_zone,
        "job": job,
        "pipeline": pipeline,
        "overlap": overlap_name(spec.overlap),
        "catch_up_window_ms": spec.catch_up_window_ms,
        "jitter_ms": spec.jitter_ms,
        "history_limit": spec.history_limit,
        "paused": s.paused,
        "next_tick": wire::rfc3339(s.next_tick.as_ref()),
        "fire_at": wire::rfc3339(s.fire_at.as_ref()),
        "created_at": wire::rfc3339(s.created_at.as_ref()),
        "updated_at": wire::rfc3339(s.updated_at.as_ref()),
        "recent_ticks": s.recent_ticks.iter().map(tick_json).collect::<Vec<_>>(),
    })
}
