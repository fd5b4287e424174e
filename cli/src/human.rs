//! Output for people: key/value blocks, tables and one-line events, as plain text, for jobs,
//! workers, pipeline runs and artifacts.
//!
//! Every function returns the text instead of printing it, so tests can compare it; the
//! current time is a parameter wherever an age is shown, and the [`Style`] wherever job states
//! are coloured.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hodei_proto::v1 as pb;

use crate::style::{Style, name_paint, state_paint};
use crate::table::{Cell, Table, indent};
use crate::wire;

/// `hodei get`: the job, then its attempts.
pub fn job_block(j: &pb::Job, style: Style) -> String {
    let mut t = Table::new();
    t.row(["id:", j.id.as_str()]);
    let spec = j.spec.clone().unwrap_or_default();
    t.row(["name:", spec.name.as_str()]);
    let mut state = wire::state_name(j.state).to_owned();
    if j.cancel_requested && !wire::is_terminal(j.state) {
        state.push_str(" (cancel requested)");
    }
    t.row([
        Cell::from("state:"),
        Cell::painted(state, style.pick(state_paint(j.state))),
    ]);
    if !j.reason.is_empty() {
        t.row(["reason:", j.reason.as_str()]);
    }
    if let Some(code) = j.exit_code {
        t.row(["exit code:".to_owned(), code.to_string()]);
    }
    t.row(["command:".to_owned(), command_text(&spec)]);
    if !spec.working_dir.is_empty() {
        t.row(["workdir:", spec.working_dir.as_str()]);
    }
    if !spec.env.is_empty() {
        // Names only, to keep the block short; `--output json` shows the values (secret ones
        // come masked from the server).
        let mut keys: Vec<String> = spec
            .env
            .keys()
            .map(|k| {
                if spec.secret_env.contains(k) {
                    format!("{k} (secret)")
                } else {
                    k.clone()
                }
            })
            .collect();
        keys.sort_unstable();
        t.row(["env:".to_owned(), keys.join(", ")]);
    }
    if !spec.labels.is_empty() {
        t.row(["labels:".to_owned(), labels_text(&spec.labels)]);
    }
    if !spec.required_labels.is_empty() {
        t.row(["requires:".to_owned(), labels_text(&spec.required_labels)]);
    }
    t.row(["priority:".to_owned(), spec.priority.to_string()]);
    t.row(["max attempts:".to_owned(), max_attempts(&spec).to_string()]);
    t.row([
        "timeout:".to_owned(),
        match spec.timeout_secs {
            0 => "server default".to_owned(),
            secs => format!("{secs}s"),
        },
    ]);
    if let Some(r) = &spec.resources {
        t.row(["resources:".to_owned(), resources_text(r)]);
    }
    if !spec.idempotency_key.is_empty() {
        t.row(["idempotency key:", spec.idempotency_key.as_str()]);
    }
    if !j.tenant.is_empty() {
        t.row(["tenant:", j.tenant.as_str()]);
    }
    t.row([
        "created:".to_owned(),
        wire::rfc3339_secs(j.created_at.as_ref()),
    ]);
    t.row([
        "updated:".to_owned(),
        wire::rfc3339_secs(j.updated_at.as_ref()),
    ]);
    if j.not_before.is_some() {
        t.row([
            "not before:".to_owned(),
            wire::rfc3339_secs(j.not_before.as_ref()),
        ]);
    }
    if j.archived_at.is_some() {
        t.row([
            "archived:".to_owned(),
            wire::rfc3339_secs(j.archived_at.as_ref()),
        ]);
    }
    let mut out = t.render();
    if j.attempts.is_empty() {
        out.push_str("attempts: none\n");
    } else {
        out.push_str("attempts:\n");
        out.push_str(&indent(&attempts_table(&j.attempts).render(), "  "));
    }
    if j.attempts_omitted > 0 {
        out.push_str(&format!(
            "  ({} earlier attempts left out of the answer: `hodei history {}` lists them)\n",
            j.attempts_omitted, j.id
        ));
    }
    if let Some(last) = j.attempts.last() {
        if !last.output_tail.is_empty() {
            out.push_str(&format!(
                "output of attempt {} (last lines, `hodei logs` for all):\n",
                last.attempt
            ));
            for line in &last.output_tail {
                out.push_str(&format!("  {line}\n"));
            }
        } else if last.output_tail_omitted {
            out.push_str(&format!(
                "output of attempt {} left out of the answer (too large): `hodei logs` for all\n",
                last.attempt
            ));
        }
    }
    out
}

fn attempts_table(attempts: &[pb::Attempt]) -> Table {
    let mut t = Table::with_header(&["#", "WORKER", "ASSIGNED", "STARTED", "FINISHED", "OUTCOME"]);
    for a in attempts {
        t.row([
            a.attempt.to_string(),
            a.worker_id.clone(),
            wire::rfc3339_secs(a.assigned_at.as_ref()),
            wire::rfc3339_secs(a.started_at.as_ref()),
            wire::rfc3339_secs(a.finished_at.as_ref()),
            wire::outcome_text(a.outcome.as_ref()).unwrap_or_default(),
        ]);
    }
    t
}

/// `hodei list`.
pub fn jobs_table(jobs: &[pb::Job], now: DateTime<Utc>, style: Style) -> String {
    let mut t = Table::with_header(&["ID", "NAME", "STATE", "ATTEMPT", "WORKER", "EXIT", "AGE"]);
    for j in jobs {
        let spec = j.spec.clone().unwrap_or_default();
        let last = j.attempts.last();
        t.row([
            Cell::from(j.id.clone()),
            spec.name.into(),
            Cell::painted(wire::state_name(j.state), style.pick(state_paint(j.state))),
            last.map(|a| format!("{}/{}", a.attempt, max_attempts_of(j)))
                .unwrap_or_default()
                .into(),
            last.map(|a| a.worker_id.clone()).unwrap_or_default().into(),
            j.exit_code
                .map(|c| c.to_string())
                .unwrap_or_default()
                .into(),
            wire::time(j.created_at.as_ref())
                .map(|t| age(now, t))
                .unwrap_or_default()
                .into(),
        ]);
    }
    t.render()
}

/// `hodei watch`: time, type and state in fixed columns, then what is known of the event.
pub fn event_line(e: &pb::JobEvent) -> String {
    let mut line = format!(
        "{}  {:<16}  {:<9}",
        wire::rfc3339_secs(e.at.as_ref()),
        e.r#type,
        wire::state_name(e.state)
    );
    let mut details = Vec::new();
    if e.attempt > 0 {
        details.push(format!("attempt {}", e.attempt));
    }
    if !e.worker_id.is_empty() {
        details.push(format!("worker {}", e.worker_id));
    }
    if let Some(outcome) = wire::outcome_text(e.outcome.as_ref()) {
        details.push(outcome);
    }
    if !e.reason.is_empty() {
        details.push(format!("reason: {}", e.reason));
    }
    if !details.is_empty() {
        line.push_str("  ");
        line.push_str(&details.join("  "));
    }
    line.trim_end().to_owned()
}

/// `hodei workers`.
pub fn workers_table(workers: &[pb::Worker], now: DateTime<Utc>) -> String {
    let mut t = Table::with_header(&[
        "ID",
        "STATUS",
        "LABELS",
        "SLOTS",
        "CPU%",
        "MEM",
        "LAST SEEN",
    ]);
    for w in workers {
        t.row([
            w.id.clone(),
            wire::status_name(w.status).to_owned(),
            labels_text(&w.labels),
            slots_text(w),
            w.usage
                .as_ref()
                .map(|u| format!("{:.1}", u.cpu_percent))
                .unwrap_or_default(),
            w.usage.as_ref().map(memory_text).unwrap_or_default(),
            last_seen(w, now),
        ]);
    }
    t.render()
}

/// `hodei tenant list` and `hodei tenant get`: one line per tenant.
pub fn tenants_table(tenants: &[pb::Tenant]) -> String {
    let mut t = Table::with_header(&[
        "TENANT", "WEIGHT", "QUEUED", "RUNNING", "CPU", "MEM", "SHARE", "ENTITLED", "QUOTAS",
    ]);
    for tenant in tenants {
        let policy = tenant.policy.unwrap_or_default();
        let quotas: Vec<String> = [
            ("queued", policy.max_queued_jobs),
            ("running", policy.max_running_jobs),
            ("cpu", policy.max_cpu_millis),
            ("mem", policy.max_memory_mb),
        ]
        .into_iter()
        .filter_map(|(name, limit)| limit.map(|l| format!("{name}<={l}")))
        .chain(policy.max_priority.map(|p| format!("priority<={p}")))
        .collect();
        t.row([
            tenant.tenant.clone(),
            policy.weight.max(1).to_string(),
            tenant.queued_jobs.to_string(),
            tenant.running_jobs.to_string(),
            format!("{}m", tenant.cpu_millis_in_use),
            format!("{} MiB", tenant.memory_mb_in_use),
            format!("{:.1}%", tenant.share * 100.0),
            format!("{:.1}%", tenant.entitled_share * 100.0),
            if quotas.is_empty() {
                "-".to_owned()
            } else {
                quotas.join(" ")
            },
        ]);
    }
    t.render()
}

/// `hodei worker`: the worker, then the attempts it holds.
pub fn worker_block(w: &pb::Worker, now: DateTime<Utc>) -> String {
    let mut t = Table::new();
    t.row(["id:", w.id.as_str()]);
    t.row(["status:", wire::status_name(w.status)]);
    t.row(["labels:".to_owned(), labels_text(&w.labels)]);
    if let Some(c) = &w.capacity {
        t.row(["capacity:".to_owned(), resources_text(c)]);
    }
    t.row(["slots:".to_owned(), format!("{} used", slots_text(w))]);
    if let Some(u) = &w.usage {
        t.row([
            "usage:".to_owned(),
            format!(
                "cpu {:.1}%, memory {}, load {:.2}",
                u.cpu_percent,
                memory_text(u),
                u.load_1m
            ),
        ]);
    }
    t.row([
        "registered:".to_owned(),
        wire::rfc3339_secs(w.registered_at.as_ref()),
    ]);
    t.row([
        "last seen:".to_owned(),
        format!(
            "{} ({})",
            wire::rfc3339_secs(w.last_heartbeat_at.as_ref()),
            last_seen(w, now)
        ),
    ]);
    let mut out = t.render();
    if w.held.is_empty() {
        out.push_str("held: none\n");
    } else {
        let mut held = Table::with_header(&["JOB", "ATTEMPT", "RESOURCES", "SINCE"]);
        for h in &w.held {
            held.row([
                h.job_id.clone(),
                h.attempt.to_string(),
                h.resources.as_ref().map(resources_text).unwrap_or_default(),
                wire::rfc3339_secs(h.since.as_ref()),
            ]);
        }
        out.push_str("held:\n");
        out.push_str(&indent(&held.render(), "  "));
    }
    out
}

/// `hodei pipeline get`: the run, then a table of its steps.
pub fn run_block(r: &pb::PipelineRun, now: DateTime<Utc>, style: Style) -> String {
    let spec = r.spec.clone().unwrap_or_default();
    let mut t = Table::new();
    t.row(["id:", r.id.as_str()]);
    t.row(["pipeline:", spec.name.as_str()]);
    t.row([Cell::from("state:"), run_state_cell(r, style)]);
    t.row(["steps:".to_owned(), steps_summary(r)]);
    if spec.fail_fast {
        t.row(["fail fast:", "yes"]);
    }
    if !spec.labels.is_empty() {
        t.row(["labels:".to_owned(), labels_text(&spec.labels)]);
    }
    if !spec.idempotency_key.is_empty() {
        t.row(["idempotency key:", spec.idempotency_key.as_str()]);
    }
    if !r.tenant.is_empty() {
        t.row(["tenant:", r.tenant.as_str()]);
    }
    t.row([
        "created:".to_owned(),
        wire::rfc3339_secs(r.created_at.as_ref()),
    ]);
    t.row([
        "updated:".to_owned(),
        wire::rfc3339_secs(r.updated_at.as_ref()),
    ]);
    if r.archived_at.is_some() {
        t.row([
            "archived:".to_owned(),
            wire::rfc3339_secs(r.archived_at.as_ref()),
        ]);
    }
    let mut out = t.render();
    let mut steps = Table::with_header(&["STEP", "STATE", "DURATION", "JOB", "ATTEMPTS", "REASON"]);
    for step in &r.steps {
        steps.row([
            Cell::from(step.name.as_str()),
            step_state_cell(step, style),
            step_duration(step, now)
                .map(duration_text)
                .unwrap_or_default()
                .into(),
            step.job_id.as_str().into(),
            match step.attempts.len() + step.attempts_omitted as usize {
                0 => String::new(),
                n => n.to_string(),
            }
            .into(),
            step_reason(step).unwrap_or_default().into(),
        ]);
    }
    out.push_str(&steps.render());
    out
}

/// `hodei pipeline list`.
pub fn runs_table(runs: &[pb::PipelineRun], now: DateTime<Utc>, style: Style) -> String {
    let mut t = Table::with_header(&["ID", "PIPELINE", "STATE", "STEPS", "AGE"]);
    for r in runs {
        t.row([
            Cell::from(r.id.as_str()),
            r.spec
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default()
                .into(),
            run_state_cell(r, style),
            steps_summary(r).into(),
            wire::time(r.created_at.as_ref())
                .map(|t| age(now, t))
                .unwrap_or_default()
                .into(),
        ]);
    }
    t.render()
}

/// `hodei artifacts ls`.
pub fn artifacts_table(artifacts: &[pb::Artifact]) -> String {
    let mut t = Table::with_header(&["STEP", "PATH", "SIZE", "DIGEST", "MODIFIED"]);
    for a in artifacts {
        t.row([
            a.step.clone(),
            a.path.clone(),
            size_text(a.size),
            a.digest.clone(),
            wire::rfc3339_secs(a.modified.as_ref()),
        ]);
    }
    t.render()
}

/// The run's state, with "(cancel requested)" while a cancel is under way, coloured.
pub fn run_state_cell(r: &pb::PipelineRun, style: Style) -> Cell {
    let name = wire::run_state_name(r.state);
    let mut text = name.to_owned();
    if r.cancel_requested && !wire::run_is_terminal(r.state) {
        text.push_str(" (cancel requested)");
    }
    Cell::painted(text, style.pick(name_paint(name)))
}

/// The step's state, coloured.
pub fn step_state_cell(step: &pb::StepRun, style: Style) -> Cell {
    let name = wire::step_state_name(step.state);
    Cell::painted(name, style.pick(name_paint(name)))
}

/// "3/5 ended, 1 failed": how far the run's steps are.
fn steps_summary(r: &pb::PipelineRun) -> String {
    let ended = r
        .steps
        .iter()
        .filter(|s| wire::step_is_terminal(s.state))
        .count();
    let failed = r
        .steps
        .iter()
        .filter(|s| s.state == i32::from(pb::StepState::Failed))
        .count();
    let mut text = format!("{ended}/{} ended", r.steps.len());
    if failed > 0 {
        text.push_str(&format!(", {failed} failed"));
    }
    text
}

/// How long the step ran: until it finished, or until `now` while it runs; `None` before it
/// starts (and for steps that never did).
pub fn step_duration(step: &pb::StepRun, now: DateTime<Utc>) -> Option<Duration> {
    let started = wire::time(step.started_at.as_ref())?;
    let until = wire::time(step.finished_at.as_ref()).unwrap_or(now);
    Some((until - started).to_std().unwrap_or_default())
}

/// The worker of the step's last attempt, if it has one.
pub fn step_worker(step: &pb::StepRun) -> Option<&str> {
    step.attempts
        .last()
        .map(|a| a.worker_id.as_str())
        .filter(|w| !w.is_empty())
}

/// The exit code of the step's last attempt, when its process exited.
pub fn step_exit_code(step: &pb::StepRun) -> Option<i32> {
    match step.attempts.last()?.outcome.as_ref()?.kind.as_ref()? {
        pb::attempt_outcome::Kind::Exited(code) => Some(*code),
        _ => None,
    }
}

/// Why the step failed, was skipped or was cancelled; `None` for other states.
pub fn step_reason(step: &pb::StepRun) -> Option<&str> {
    let explained = matches!(
        pb::StepState::try_from(step.state),
        Ok(pb::StepState::Failed | pb::StepState::Skipped | pb::StepState::Cancelled)
    );
    (explained && !step.reason.is_empty()).then_some(step.reason.as_str())
}

/// A duration for people: "0.4s", "12s", "3m05s", "2h04m".
pub fn duration_text(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..10 => format!("{:.1}s", d.as_secs_f64()),
        10..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// A size in bytes for people: "512 B", "1.5 KiB", "3.0 MiB".
fn size_text(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // One decimal of the largest unit that keeps it above 1; f64 is precise enough for that.
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// How long ago `then` was, in its largest whole unit: "42s", "5m", "3h", "12d".
pub fn age(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    let secs = (now - then).num_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..172_800 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// The command as one could type it in a shell.
pub fn command_text(spec: &pb::JobSpec) -> String {
    match &spec.command {
        Some(pb::job_spec::Command::Exec(e)) => quote_all(&e.argv),
        Some(pb::job_spec::Command::Script(s)) => {
            let mut words = s.interpreter.clone();
            words.push(s.script.clone());
            quote_all(&words)
        }
        None => String::new(),
    }
}

fn quote_all(words: &[String]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Single quotes unless the word is made only of characters a shell leaves alone.
fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `k=v` pairs sorted by key, comma-separated.
fn labels_text(labels: &HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    sorted
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn resources_text(r: &pb::Resources) -> String {
    format!("cpu {}m, memory {} MiB", r.cpu_millis, r.memory_mb)
}

fn memory_text(u: &pb::ResourceUsage) -> String {
    format!("{}/{} MiB", u.memory_used_mb, u.memory_total_mb)
}

fn slots_text(w: &pb::Worker) -> String {
    format!("{}/{}", w.held.len(), w.max_concurrent_jobs)
}

fn last_seen(w: &pb::Worker, now: DateTime<Utc>) -> String {
    wire::time(w.last_heartbeat_at.as_ref())
        .map(|t| format!("{} ago", age(now, t)))
        .unwrap_or_default()
}

/// The wire's 0 means 1.
fn max_attempts(spec: &pb::JobSpec) -> u32 {
    spec.max_attempts.max(1)
}

fn max_attempts_of(j: &pb::Job) -> u32 {
    j.spec.as_ref().map_or(1, max_attempts)
}

#[cfg(test)]
mod tests {
    use hodei_proto::v1::attempt_outcome::Kind;

    use super::*;
    use crate::fixtures::{sample_job, sample_run, sample_worker, ts};

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(seconds, 0).unwrap()
    }

    #[test]
    fn job_block_shows_state_outcome_and_attempts() {
        let out = job_block(&sample_job(), Style::PLAIN);
        assert_eq!(
            out,
            "\
id:            job-1
name:          echo
state:         failed
reason:        exited with code 3
exit code:     3
command:       echo hi
env:           A, B
requires:      gpu=true
priority:      0
max attempts:  2
timeout:       server default
tenant:        default
created:       2023-11-14T22:13:20Z
updated:       2023-11-14T22:13:25Z
attempts:
  #  WORKER  ASSIGNED              STARTED               FINISHED              OUTCOME
  1  w-1     2023-11-14T22:13:20Z  2023-11-14T22:13:21Z  2023-11-14T22:13:25Z  exited with code 3
output of attempt 1 (last lines, `hodei logs` for all):
  hi
  error: disk full
"
        );
    }

    #[test]
    fn jobs_table_columns() {
        let mut queued = sample_job();
        queued.id = "job-22".into();
        queued.state = pb::JobState::Queued.into();
        queued.attempts.clear();
        queued.exit_code = None;
        queued.created_at = ts(1_700_000_000 - 7200);
        let out = jobs_table(&[sample_job(), queued], at(1_700_000_090), Style::PLAIN);
        assert_eq!(
            out,
            "\
ID      NAME  STATE   ATTEMPT  WORKER  EXIT  AGE
job-1   echo  failed  1/2      w-1     3     1m
job-22  echo  queued  -        -       -     2h
"
        );
    }

    #[test]
    fn states_are_coloured_when_the_style_says_so() {
        let mut running = sample_job();
        running.id = "job-22".into();
        running.state = pb::JobState::Running.into();
        running.exit_code = None;
        let out = jobs_table(&[sample_job(), running], at(1_700_000_090), Style::COLOR);
        assert_eq!(
            out,
            "\
ID      NAME  STATE    ATTEMPT  WORKER  EXIT  AGE
job-1   echo  \x1b[31mfailed\x1b[0m   1/2      w-1     3     1m
job-22  echo  \x1b[34mrunning\x1b[0m  1/2      w-1     -     1m
"
        );
        let out = job_block(&sample_job(), Style::COLOR);
        assert!(
            out.contains("state:         \x1b[31mfailed\x1b[0m\n"),
            "{out}"
        );
        assert!(!job_block(&sample_job(), Style::PLAIN).contains('\x1b'));
    }

    #[test]
    fn event_lines() {
        let mut e = pb::JobEvent {
            job_id: "job-1".into(),
            seq: 1,
            at: ts(1_700_000_000),
            r#type: "submitted".into(),
            state: pb::JobState::Queued.into(),
            ..Default::default()
        };
        assert_eq!(
            event_line(&e),
            "2023-11-14T22:13:20Z  submitted         queued"
        );
        e.r#type = "failed".into();
        e.state = pb::JobState::Failed.into();
        e.attempt = 2;
        e.worker_id = "w-1".into();
        e.outcome = Some(pb::AttemptOutcome {
            kind: Some(Kind::Signalled(9)),
        });
        e.reason = "out of attempts".into();
        assert_eq!(
            event_line(&e),
            "2023-11-14T22:13:20Z  failed            failed     attempt 2  worker w-1  \
             killed by signal 9  reason: out of attempts"
        );
    }

    #[test]
    fn workers_table_columns() {
        let mut lost = sample_worker();
        lost.id = "w-20".into();
        lost.status = pb::WorkerStatus::Lost.into();
        lost.labels.clear();
        lost.held.clear();
        lost.usage = None;
        let out = workers_table(&[sample_worker(), lost], at(1_700_000_010));
        assert_eq!(
            out,
            "\
ID    STATUS  LABELS               SLOTS  CPU%  MEM           LAST SEEN
w-1   ready   arch=amd64,gpu=true  1/4    12.3  512/8192 MiB  5s ago
w-20  lost    -                    0/4    -     -             5s ago
"
        );
    }

    #[test]
    fn worker_block_lists_held_attempts() {
        let out = worker_block(&sample_worker(), at(1_700_000_010));
        assert!(out.contains("slots:       1/4 used\n"), "{out}");
        assert!(
            out.contains("usage:       cpu 12.3%, memory 512/8192 MiB, load 0.50\n"),
            "{out}"
        );
        assert!(
            out.ends_with(
                "held:\n  JOB    ATTEMPT  RESOURCES                 SINCE\n  \
                 job-1  1        cpu 500m, memory 256 MiB  2023-11-14T22:13:21Z\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn run_block_shows_the_run_then_its_steps() {
        let out = run_block(&sample_run(), at(1_700_000_030), Style::PLAIN);
        assert_eq!(
            out,
            "\
id:        run-1
pipeline:  ci
state:     running
steps:     2/4 ended, 1 failed
tenant:    default
created:   2023-11-14T22:13:20Z
updated:   2023-11-14T22:13:25Z
STEP     STATE      DURATION  JOB    ATTEMPTS  REASON
build    succeeded  2.0s      job-b  1         -
test     failed     1.5s      job-t  1         exited with code 3
deploy   running    26s       job-d  1         -
cleanup  waiting    -         -      -         -
"
        );
        let out = run_block(&sample_run(), at(1_700_000_030), Style::COLOR);
        assert!(out.contains("\x1b[31mfailed\x1b[0m "), "{out}");
    }

    #[test]
    fn runs_and_artifacts_tables() {
        let mut cancelling = sample_run();
        cancelling.id = "run-22".into();
        cancelling.cancel_requested = true;
        let out = runs_table(&[sample_run(), cancelling], at(1_700_000_090), Style::PLAIN);
        assert_eq!(
            out,
            "\
ID      PIPELINE  STATE                       STEPS                AGE
run-1   ci        running                     2/4 ended, 1 failed  1m
run-22  ci        running (cancel requested)  2/4 ended, 1 failed  1m
"
        );
        let artifact = |path: &str, size| pb::Artifact {
            step: "build".into(),
            path: path.into(),
            size,
            digest: "SHA-256=abc".into(),
            modified: ts(1_700_000_000),
        };
        let out = artifacts_table(&[artifact("dist/app.txt", 12), artifact("dist/big", 3 << 20)]);
        assert_eq!(
            out,
            "\
STEP   PATH          SIZE     DIGEST       MODIFIED
build  dist/app.txt  12 B     SHA-256=abc  2023-11-14T22:13:20Z
build  dist/big      3.0 MiB  SHA-256=abc  2023-11-14T22:13:20Z
"
        );
    }

    #[test]
    fn step_details() {
        let run = sample_run();
        assert_eq!(step_worker(&run.steps[1]), Some("w-1"));
        assert_eq!(step_exit_code(&run.steps[1]), Some(3));
        assert_eq!(step_reason(&run.steps[1]), Some("exited with code 3"));
        // A succeeded step's reason is not news.
        assert_eq!(step_reason(&run.steps[0]), None);
        assert_eq!(step_duration(&run.steps[3], at(1_700_000_030)), None);
    }

    #[test]
    fn durations_and_sizes_for_people() {
        assert_eq!(duration_text(Duration::from_millis(400)), "0.4s");
        assert_eq!(duration_text(Duration::from_secs(12)), "12s");
        assert_eq!(duration_text(Duration::from_secs(185)), "3m05s");
        assert_eq!(duration_text(Duration::from_secs(7440)), "2h04m");
        assert_eq!(size_text(0), "0 B");
        assert_eq!(size_text(1536), "1.5 KiB");
        assert_eq!(size_text(5 << 30), "5.0 GiB");
    }

    #[test]
    fn ages_use_the_largest_unit() {
        let now = at(1_000_000);
        assert_eq!(age(now, at(1_000_000 - 59)), "59s");
        assert_eq!(age(now, at(1_000_000 - 60)), "1m");
        assert_eq!(age(now, at(1_000_000 - 3 * 3600)), "3h");
        assert_eq!(age(now, at(1_000_000 - 3 * 86_400)), "3d");
        assert_eq!(age(now, at(1_000_000 + 30)), "0s");
    }

    #[test]
    fn commands_are_shell_quoted() {
        let spec = pb::JobSpec {
            command: Some(pb::job_spec::Command::Script(pb::ScriptCommand {
                interpreter: vec!["/bin/sh".into(), "-c".into()],
                script: "echo 'hi' && exit 1".into(),
            })),
            ..Default::default()
        };
        assert_eq!(
            command_text(&spec),
            r"/bin/sh -c 'echo '\''hi'\'' && exit 1'"
        );
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a=b,c"), "a=b,c");
    }
}
