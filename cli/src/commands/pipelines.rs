//! The pipeline commands: run, submit, get, list, watch and cancel.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use hodei_proto::v1 as pb;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::time::MissedTickBehavior;
use tonic::Code;

use super::{
    DETACHED, INTERRUPT_REASON, note_resubmission, print_answer, print_json, print_json_line,
    print_page, print_text,
};
use crate::cli::{Moment, OutputFormat, PipelineFileArgs, PipelineListArgs};
use crate::client::Clients;
use crate::live::LiveView;
use crate::style::Style;
use crate::{human, json, spec, wire};

/// How often a view on a terminal is redrawn, so running steps' durations move.
const REDRAW: Duration = Duration::from_secs(1);

/// How long to wait before following a run again when its event stream ended early without
/// news, so a server that keeps closing streams is not asked again at once.
const REWATCH_AFTER: Duration = Duration::from_secs(1);

/// What Ctrl-C does while a run is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnInterrupt {
    /// The first cancels the run, the second stops waiting (`pipeline run`).
    Cancel,
    /// The first stops waiting (`pipeline watch`: the run is not ours to cancel).
    Detach,
}

pub async fn run(
    clients: &mut Clients,
    args: &PipelineFileArgs,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    // Listen before submitting: from the run's first moment on, Ctrl-C is ours.
    let interrupt = signal(SignalKind::interrupt()).context("failed to listen for ctrl-c")?;
    let run = submit_run(clients, args).await?;
    follow(clients, run, format, interrupt, OnInterrupt::Cancel).await
}

pub async fn submit(
    clients: &mut Clients,
    args: &PipelineFileArgs,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let run = submit_run(clients, args).await?;
    match format {
        OutputFormat::Human => print_text(&format!("{}\n", run.id))?,
        OutputFormat::Json => print_json(&json::pipeline_run(&run))?,
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn watch(
    clients: &mut Clients,
    id: String,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let interrupt = signal(SignalKind::interrupt()).context("failed to listen for ctrl-c")?;
    let run = get_run(clients, &id).await?;
    follow(clients, run, format, interrupt, OnInterrupt::Detach).await
}

pub async fn get(
    clients: &mut Clients,
    id: String,
    at: Option<Moment>,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let run = get_run_at(clients, &id, at).await?;
    match format {
        OutputFormat::Human => {
            print_text(&human::run_block(&run, chrono::Utc::now(), Style::stdout()))?
        }
        OutputFormat::Json => print_json(&json::pipeline_run(&run))?,
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(
    clients: &mut Clients,
    args: PipelineListArgs,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let request = pb::ListPipelineRunsRequest {
        states: args
            .state
            .into_iter()
            .map(|s| pb::PipelineState::from(s).into())
            .collect(),
        name_prefix: args.name_prefix.unwrap_or_default(),
        page_size: args.limit.unwrap_or(0),
        page_token: args.page_token.unwrap_or_default(),
        tenant: args.tenant.unwrap_or_default(),
    };
    let page = clients
        .pipelines
        .list_pipeline_runs(request)
        .await?
        .into_inner();
    print_page(
        format,
        "runs",
        || human::runs_table(&page.runs, chrono::Utc::now(), Style::stdout()),
        || page.runs.iter().map(json::pipeline_run).collect(),
        &page.next_page_token,
    )
}

pub async fn cancel(
    clients: &mut Clients,
    id: String,
    reason: String,
    format: OutputFormat,
) -> anyhow::Result<ExitCode> {
    let run = clients
        .pipelines
        .cancel_pipeline_run(pb::CancelPipelineRunRequest { run_id: id, reason })
        .await?
        .into_inner()
        .run
        .context("the server answered without the run")?;
    print_answer(format, &cancel_text(&run), || json::pipeline_run(&run))
}

fn cancel_text(run: &pb::PipelineRun) -> String {
    super::cancel_text(
        "run",
        &run.id,
        wire::run_is_terminal(run.state),
        wire::run_state_name(run.state),
    )
}

/// Follows `run` until it ends: its events wake the view up, and the run is read again to
/// show it as it is. Prints each event in JSON form, then the ended run, for `--output json`.
async fn follow(
    clients: &mut Clients,
    mut run: pb::PipelineRun,
    format: OutputFormat,
    mut interrupt: Signal,
    on_interrupt: OnInterrupt,
) -> anyhow::Result<ExitCode> {
    let id = run.id.clone();
    let mut view =
        (format == OutputFormat::Human).then(|| LiveView::stdout(std::io::stdout().is_terminal()));
    let redraws = view.as_ref().is_some_and(LiveView::redraws);
    if let Some(view) = view.as_mut() {
        view.show(&run, chrono::Utc::now())?;
    }
    let mut redraw = tokio::time::interval(REDRAW);
    redraw.set_missed_tick_behavior(MissedTickBehavior::Delay);

    let mut from_seq = 0;
    let mut cancelling = false;
    // Watched at least once, even when the run has ended: its history is the JSON output.
    loop {
        let mut events = clients
            .pipelines
            .watch_pipeline_run(pb::WatchPipelineRunRequest {
                run_id: id.clone(),
                from_seq,
            })
            .await?
            .into_inner();
        let mut news = false;
        // Set by an event, cleared once the run is read again: a burst of events costs one
        // read, since events waiting in the stream are taken first.
        let mut stale = false;
        loop {
            tokio::select! {
                biased;
                event = events.message() => match event? {
                    Some(event) => {
                        news = true;
                        stale = true;
                        from_seq = event.seq + 1;
                        if format == OutputFormat::Json {
                            print_json_line(&json::pipeline_event(&event))?;
                        }
                    }
                    None => break,
                },
                _ = interrupt.recv() => {
                    if let Some(code) =
                        on_ctrl_c(clients, &id, view.as_mut(), &mut cancelling, on_interrupt).await?
                    {
                        return Ok(code);
                    }
                }
                () = std::future::ready(()), if stale && view.is_some() => {
                    stale = false;
                    run = get_run(clients, &id).await?;
                    if let Some(view) = view.as_mut() {
                        view.show(&run, chrono::Utc::now())?;
                    }
                }
                _ = redraw.tick(), if redraws => {
                    if let Some(view) = view.as_mut() {
                        view.refresh(chrono::Utc::now())?;
                    }
                }
            }
        }
        // The stream ends with the run, or early (a server going away): the run says which.
        run = get_run(clients, &id).await?;
        if let Some(view) = view.as_mut() {
            view.show(&run, chrono::Utc::now())?;
        }
        if wire::run_is_terminal(run.state) {
            break;
        }
        if !news {
            tokio::select! {
                () = tokio::time::sleep(REWATCH_AFTER) => {}
                _ = interrupt.recv() => {
                    if let Some(code) =
                        on_ctrl_c(clients, &id, view.as_mut(), &mut cancelling, on_interrupt).await?
                    {
                        return Ok(code);
                    }
                }
            }
        }
    }
    if format == OutputFormat::Json {
        print_json_line(&json::pipeline_run(&run))?;
    }
    Ok(run_exit(&run))
}

/// What a Ctrl-C does: cancel the run the first time (when it is ours), or stop waiting, with
/// the exit code to stop with.
async fn on_ctrl_c(
    clients: &mut Clients,
    id: &str,
    view: Option<&mut LiveView>,
    cancelling: &mut bool,
    on_interrupt: OnInterrupt,
) -> anyhow::Result<Option<ExitCode>> {
    if *cancelling || on_interrupt == OnInterrupt::Detach {
        return Ok(Some(detach(id)));
    }
    *cancelling = true;
    let note = format!("cancelling run {id}; press ctrl-c again to stop waiting");
    match view {
        Some(view) => view.note(&note, chrono::Utc::now())?,
        None => eprintln!("{note}"),
    }
    request_cancel(clients, id).await?;
    Ok(None)
}

fn detach(id: &str) -> ExitCode {
    eprintln!("stopped waiting for run {id}");
    ExitCode::from(DETACHED)
}

/// 0 for a run that succeeded, 1 otherwise.
fn run_exit(run: &pb::PipelineRun) -> ExitCode {
    if run.state == i32::from(pb::PipelineState::Succeeded) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Reads and checks the file, then submits it; nothing is sent if the file is not valid.
async fn submit_run(
    clients: &mut Clients,
    args: &PipelineFileArgs,
) -> anyhow::Result<pb::PipelineRun> {
    let spec = spec::pipeline_from_file(&args.file)?;
    let response = clients
        .pipelines
        .submit_pipeline(pb::SubmitPipelineRequest {
            spec: Some(spec),
            tenant: String::new(),
        })
        .await?
        .into_inner();
    let run = response
        .run
        .context("the server answered without the run")?;
    note_resubmission("run", &run.id, response.created);
    Ok(run)
}

async fn get_run(clients: &mut Clients, id: &str) -> anyhow::Result<pb::PipelineRun> {
    get_run_at(clients, id, None).await
}

async fn get_run_at(
    clients: &mut Clients,
    id: &str,
    at: Option<Moment>,
) -> anyhow::Result<pb::PipelineRun> {
    clients
        .pipelines
        .get_pipeline_run(pb::GetPipelineRunRequest {
            run_id: id.to_owned(),
            as_of: at.map(|at| match at {
                Moment::Seq(seq) => pb::get_pipeline_run_request::AsOf::AsOfSeq(seq),
                Moment::Time(t) => {
                    pb::get_pipeline_run_request::AsOf::AsOfTime(hodei_proto::timestamp(t))
                }
            }),
        })
        .await?
        .into_inner()
        .run
        .context("the server answered without the run")
}

/// Asks for the run to be cancelled; a run that has ended meanwhile is fine.
async fn request_cancel(clients: &mut Clients, id: &str) -> anyhow::Result<()> {
    match clients
        .pipelines
        .cancel_pipeline_run(pb::CancelPipelineRunRequest {
            run_id: id.to_owned(),
            reason: INTERRUPT_REASON.to_owned(),
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
    use crate::fixtures::sample_run;

    #[test]
    fn only_a_succeeded_run_exits_0() {
        let mut run = sample_run();
        for (state, code) in [
            (pb::PipelineState::Succeeded, ExitCode::SUCCESS),
            (pb::PipelineState::Failed, ExitCode::from(1)),
            (pb::PipelineState::Cancelled, ExitCode::from(1)),
            (pb::PipelineState::Running, ExitCode::from(1)),
        ] {
            run.state = state.into();
            assert_eq!(run_exit(&run), code, "{state:?}");
        }
    }

    #[test]
    fn cancel_says_whether_the_run_ended() {
        let mut run = sample_run();
        assert_eq!(
            cancel_text(&run),
            "run run-1 cancel requested (still running)"
        );
        run.state = pb::PipelineState::Cancelled.into();
        assert_eq!(cancel_text(&run), "run run-1 cancelled");
    }
}
