//! The job commands: submit, run, get, list, watch, logs and cancel.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use hodei_proto::v1 as pb;
use tokio::time::MissedTickBehavior;
use tonic::Code;

use super::{
    DETACHED, INTERRUPT_REASON, note_resubmission, print_answer, print_json, print_json_line,
    print_log_line, print_page, print_text,
};
use crate::cli::{EventsArgs, JobArgs, ListArgs, Moment, OutputFormat};
use crate::client::Clients;
use crate::progress::{StatusLine, waiting_text};
use crate::style::Style;
use crate::{human, json, wire};

/// How often `hodei run` refreshes its waiting status on a terminal. Why a queued job waits is
/// kept on the job, not sent as an event, so the job is looked up again.
const STATUS_REFRESH: Duration = Duration::from_secs(1);

pub async fn submit(
    clients: &mut Clients,
    args: &JobArgs,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let job = submit_job(clients, args).await?;
    match format {
        OutputFormat::Human => print_text(&format!("{}\n", job.id))?,
        OutputFormat::Json => print_json(&json::job(&job))?,
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn submit_many(
    clients: &mut Clients,
    file: &str,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let specs = crate::spec::specs_from_list(file)?;
    let results = clients
        .jobs
        .submit_jobs(pb::SubmitJobsRequest {
            specs,
            tenant: String::new(),
        })
        .await?
        .into_inner()
        .results;
    let mut jobs = Vec::with_capacity(results.len());
    for result in results {
        let job = result.job.context("the server answered without a job")?;
        note_resubmission("job", &job.id, result.created);
        jobs.push(job);
    }
    match format {
        OutputFormat::Human => {
            let ids: String = jobs.iter().map(|job| format!("{}\n", job.id)).collect();
            print_text(&ids)?;
        }
        OutputFormat::Json => print_json(&serde_json::Value::Array(
            jobs.iter().map(json::job).collect(),
        ))?,
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run(
    clients: &mut Clients,
    args: &JobArgs,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let submitted = Instant::now();
    let job = submit_job(clients, args).await?;
    let id = job.id;
    let people_watch = format == OutputFormat::Human && std::io::stderr().is_terminal();
    if people_watch {
        eprintln!("job {id} submitted");
    }
    let stderr_style = Style::stderr();
    // Listen before anything streams: from the first line on, Ctrl-C is ours.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("failed to listen for ctrl-c")?;
    let mut logs = clients
        .jobs
        .stream_logs(pb::StreamLogsRequest {
            job_id: id.clone(),
            from_sequence: 0,
            follow: true,
        })
        .await?
        .into_inner();

    // Until the job prints its first line, a terminal shows what it is waiting for.
    let mut status = StatusLine::stderr(people_watch);
    let mut waiting = people_watch;
    let mut refresh = tokio::time::interval(STATUS_REFRESH);
    refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);

    // The first Ctrl-C cancels the job and keeps streaming, so the job's last lines and its
    // end still show; the second stops waiting.
    let mut cancelling = false;
    loop {
        tokio::select! {
            line = logs.message() => match line? {
                Some(line) => {
                    if waiting {
                        waiting = false;
                        status.clear()?;
                    }
                    print_log_line(&line, format, stderr_style)?;
                }
                None => break,
            },
            _ = refresh.tick(), if waiting => {
                // The status is only a courtesy: a failed look-up skips one refresh.
                if let Ok(job) = get_job(clients, &id).await {
                    if wire::is_terminal(job.state) {
                        waiting = false;
                        status.clear()?;
                    } else {
                        status.show(&waiting_text(&job, submitted.elapsed()))?;
                    }
                }
            }
            _ = interrupt.recv() => {
                status.clear()?;
                if cancelling {
                    return Ok(detach(&id));
                }
                cancelling = true;
                eprintln!("cancelling job {id}; press ctrl-c again to stop waiting");
                request_cancel(clients, &id, INTERRUPT_REASON).await?;
            }
        }
    }
    status.clear()?;

    let job = tokio::select! {
        job = finished_job(clients, &id) => job?,
        _ = interrupt.recv() => {
            return Ok(detach(&id));
        }
    };
    if format == OutputFormat::Json {
        print_json_line(&json::job(&job))?;
    }
    let (code, line) = run_exit(&job);
    if let Some(line) = line {
        eprintln!("{line}");
    }
    Ok(ExitCode::from(code))
}

fn detach(id: &str) -> ExitCode {
    eprintln!("stopped waiting for job {id}");
    ExitCode::from(DETACHED)
}

/// The exit code of `hodei run` for a job, and the line to print on stderr when the job's own
/// exit code does not tell what happened.
fn run_exit(job: &pb::Job) -> (u8, Option<String>) {
    let state = pb::JobState::try_from(job.state).unwrap_or(pb::JobState::Unspecified);
    match (state, job.exit_code) {
        (pb::JobState::Succeeded, _) => (0, None),
        // Codes outside 1..=255 would wrap to something else, even 0, in the shell.
        (pb::JobState::Failed, Some(code)) if (1..=255).contains(&code) => {
            (u8::try_from(code).unwrap_or(1), None)
        }
        _ => {
            let mut line = format!("job {} {}", job.id, wire::state_name(job.state));
            if !wire::is_terminal(job.state) {
                line.push_str(" and has not ended");
            }
            if let Some(code) = job.exit_code {
                line.push_str(&format!(" (exit code {code})"));
            }
            if !job.reason.is_empty() {
                line.push_str(": ");
                line.push_str(&job.reason);
            }
            (1, Some(line))
        }
    }
}

/// The job once it has ended. The log stream can close before the job's final event is
/// recorded, so when the job still looks live, its events are followed to the end.
async fn finished_job(clients: &mut Clients, id: &str) -> anyhow::Result<pb::Job> {
    let job = get_job(clients, id).await?;
    if wire::is_terminal(job.state) {
        return Ok(job);
    }
    let mut events = clients
        .jobs
        .watch_job(pb::WatchJobRequest {
            job_id: id.to_owned(),
            from_seq: job.version,
        })
        .await?
        .into_inner();
    while events.message().await?.is_some() {}
    get_job(clients, id).await
}

pub async fn get(
    clients: &mut Clients,
    id: String,
    at: Option<Moment>,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let job = get_job_at(clients, &id, at).await?;
    match format {
        OutputFormat::Human => print_text(&human::job_block(&job, Style::stdout()))?,
        OutputFormat::Json => print_json(&json::job(&job))?,
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(
    clients: &mut Clients,
    args: ListArgs,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let request = pb::ListJobsRequest {
        states: args
            .state
            .into_iter()
            .map(|s| pb::JobState::from(s).into())
            .collect(),
        name_prefix: args.name_prefix.unwrap_or_default(),
        labels: args.labels.into_iter().collect(),
        page_size: args.limit.unwrap_or(0),
        page_token: args.page_token.unwrap_or_default(),
        query: args.search.unwrap_or_default(),
        tenant: args.tenant.unwrap_or_default(),
    };
    let page = clients.jobs.list_jobs(request).await?.into_inner();
    print_page(
        format,
        "jobs",
        || human::jobs_table(&page.jobs, chrono::Utc::now(), Style::stdout()),
        || page.jobs.iter().map(json::job).collect(),
        &page.next_page_token,
    )
}

/// `hodei history`: every page of the job's events, oldest first.
pub async fn history(
    clients: &mut Clients,
    id: String,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let mut page_token = String::new();
    loop {
        let page = clients
            .jobs
            .get_job_history(pb::GetJobHistoryRequest {
                job_id: id.clone(),
                page_size: 0,
                page_token,
            })
            .await?
            .into_inner();
        for event in &page.events {
            match format {
                OutputFormat::Human => {
                    print_text(&format!("{:>3}  {}\n", event.seq, human::event_line(event)))?
                }
                OutputFormat::Json => print_json_line(&json::job_event(event))?,
            }
        }
        if page.next_page_token.is_empty() {
            return Ok(ExitCode::SUCCESS);
        }
        page_token = page.next_page_token;
    }
}

/// `hodei events`: one page of events across jobs.
pub async fn events(
    clients: &mut Clients,
    args: EventsArgs,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let page = clients
        .jobs
        .list_events(pb::ListEventsRequest {
            start_time: args.since.map(hodei_proto::timestamp),
            end_time: args.until.map(hodei_proto::timestamp),
            types: args.types,
            tenant: args.tenant.unwrap_or_default(),
            labels: args.labels.into_iter().collect(),
            page_size: args.limit.unwrap_or(0),
            page_token: args.page_token.unwrap_or_default(),
        })
        .await?
        .into_inner();
    print_page(
        format,
        "events",
        || {
            page.events
                .iter()
                .map(|event| format!("{}  {}\n", event.job_id, human::event_line(event)))
                .collect()
        },
        || page.events.iter().map(json::job_event).collect(),
        &page.next_page_token,
    )
}

pub async fn watch(
    clients: &mut Clients,
    id: String,
    from: u64,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let mut events = clients
        .jobs
        .watch_job(pb::WatchJobRequest {
            job_id: id,
            from_seq: from,
        })
        .await?
        .into_inner();
    while let Some(event) = events.message().await? {
        match format {
            OutputFormat::Human => print_text(&format!("{}\n", human::event_line(&event)))?,
            OutputFormat::Json => print_json_line(&json::job_event(&event))?,
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn logs(
    clients: &mut Clients,
    id: String,
    follow: bool,
    from: u64,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let mut lines = clients
        .jobs
        .stream_logs(pb::StreamLogsRequest {
            job_id: id,
            from_sequence: from,
            follow,
        })
        .await?
        .into_inner();
    let stderr_style = Style::stderr();
    while let Some(line) = lines.message().await? {
        print_log_line(&line, format, stderr_style)?;
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(
    clients: &mut Clients,
    id: String,
    reason: String,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let job = clients
        .jobs
        .cancel_job(pb::CancelJobRequest { job_id: id, reason })
        .await?
        .into_inner()
        .job
        .context("the server answered without the job")?;
    print_answer(format, &cancel_text(&job), || json::job(&job))
}

fn cancel_text(job: &pb::Job) -> String {
    super::cancel_text(
        "job",
        &job.id,
        wire::is_terminal(job.state),
        wire::state_name(job.state),
    )
}

async fn submit_job(clients: &mut Clients, args: &JobArgs) -> anyhow::Result<pb::Job> {
    let spec = args.to_spec()?;
    let response = clients
        .jobs
        .submit_job(pb::SubmitJobRequest {
            spec: Some(spec),
            tenant: String::new(),
        })
        .await?
        .into_inner();
    let job = response
        .job
        .context("the server answered without the job")?;
    note_resubmission("job", &job.id, response.created);
    Ok(job)
}

async fn get_job(clients: &mut Clients, id: &str) -> anyhow::Result<pb::Job> {
    get_job_at(clients, id, None).await
}

async fn get_job_at(
    clients: &mut Clients,
    id: &str,
    at: Option<Moment>,
) -> anyhow::Result<pb::Job> {
    clients
        .jobs
        .get_job(pb::GetJobRequest {
            job_id: id.to_owned(),
            as_of: at.map(|at| match at {
                Moment::Seq(seq) => pb::get_job_request::AsOf::AsOfSeq(seq),
                Moment::Time(t) => pb::get_job_request::AsOf::AsOfTime(hodei_proto::timestamp(t)),
            }),
        })
        .await?
        .into_inner()
        .job
        .context("the server answered without the job")
}

/// Asks for the job to be cancelled; a job that has ended meanwhile is fine.
async fn request_cancel(clients: &mut Clients, id: &str, reason: &str) -> anyhow::Result<()> {
    match clients
        .jobs
        .cancel_job(pb::CancelJobRequest {
            job_id: id.to_owned(),
            reason: reason.to_owned(),
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(status) if status.code() == Code::FailedPrecondition => Ok(()),
        Err(status) => Err(status.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::sample_job;

    fn job(state: pb::JobState, exit_code: Option<i32>, reason: &str) -> pb::Job {
        pb::Job {
            state: state.into(),
            exit_code,
            reason: reason.into(),
            ..sample_job()
        }
    }

    #[test]
    fn run_exits_with_the_job_exit_code() {
        assert_eq!(
            run_exit(&job(pb::JobState::Succeeded, Some(0), "")),
            (0, None)
        );
        assert_eq!(
            run_exit(&job(pb::JobState::Failed, Some(3), "exited with code 3")),
            (3, None)
        );
        assert_eq!(
            run_exit(&job(pb::JobState::Failed, Some(255), "")),
            (255, None)
        );
    }

    #[test]
    fn run_exits_1_with_a_line_otherwise() {
        assert_eq!(
            run_exit(&job(pb::JobState::TimedOut, None, "ran past 10s")),
            (1, Some("job job-1 timed_out: ran past 10s".into()))
        );
        assert_eq!(
            run_exit(&job(pb::JobState::Cancelled, None, "")),
            (1, Some("job job-1 cancelled".into()))
        );
        assert_eq!(
            run_exit(&job(
                pb::JobState::Failed,
                None,
                "failed to start: no such file"
            )),
            (
                1,
                Some("job job-1 failed: failed to start: no such file".into())
            )
        );
        // A code the shell would wrap around is not passed on.
        assert_eq!(
            run_exit(&job(pb::JobState::Failed, Some(256), "")),
            (1, Some("job job-1 failed (exit code 256)".into()))
        );
        assert_eq!(
            run_exit(&job(pb::JobState::Running, None, "")),
            (1, Some("job job-1 running and has not ended".into()))
        );
    }

    #[test]
    fn cancel_says_whether_the_job_ended() {
        assert_eq!(
            cancel_text(&job(pb::JobState::Cancelled, None, "")),
            "job job-1 cancelled"
        );
        assert_eq!(
            cancel_text(&job(pb::JobState::Running, None, "")),
            "job job-1 cancel requested (still running)"
        );
    }
}
