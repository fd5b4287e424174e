//! Turns the job options of `submit` and `run`, and the job file of `-f`, into the wire
//! `JobSpec` to submit; and a pipeline file into the wire `PipelineSpec`.
//!
//! Without a file, options left out stay at their wire zero values, which the server reads as
//! its documented defaults, and the server validates the rest. With a file, the file is read
//! into the domain's `JobSpecDraft`, the options given override it, and the result is
//! validated here with the domain's own rules, so every invalid field is reported before
//! anything is sent. Pipeline files are validated the same way, every error with its path
//! (`steps.build.needs[1]`).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use anyhow::bail;
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{Command, FieldError, JobSpec, PipelineSpec, PipelineSpecDraft};
use hodei_proto::v1 as pb;

use crate::cli::JobArgs;
use crate::jobfile;

/// Longest job name the server accepts; a default name is cut to fit.
const MAX_NAME_CHARS: usize = 128;

/// What runs a `--script` when `--interpreter` is not given.
const DEFAULT_INTERPRETER: &str = "/bin/sh -c";

/// Name of a `--script` job submitted without `--name`.
const SCRIPT_JOB_NAME: &str = "script";

/// A job file whose spec, once the options are applied, breaks the spec's rules; or a
/// pipeline file that does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSpec {
    /// The file as the user named it, or `<stdin>`.
    pub source: String,
    /// Every invalid field, in the domain's order.
    pub errors: Vec<FieldError>,
}

impl InvalidSpec {
    /// One line per invalid field: `job.yaml: max_attempts: must be between 1 and 100`.
    pub fn lines(&self) -> Vec<String> {
        self.errors
            .iter()
            .map(|e| format!("{}: {}: {}", self.source, e.field, e.reason))
            .collect()
    }
}

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.lines().join("; "))
    }
}

impl std::error::Error for InvalidSpec {}

/// The jobs of the list at `path` (`-` for stdin), validated, in wire form; an invalid field
/// is named by its job's place in the list (`[2].name`).
pub fn specs_from_list(path: &str) -> anyhow::Result<Vec<pb::JobSpec>> {
    let drafts: Vec<JobSpecDraft> = jobfile::load(path)?;
    let source = jobfile::display_name(path);
    if drafts.is_empty() {
        anyhow::bail!("{source}: the list has no job; it needs at least one");
    }
    let mut errors = Vec::new();
    let mut specs = Vec::with_capacity(drafts.len());
    for (i, draft) in drafts.into_iter().enumerate() {
        match JobSpec::try_from(draft) {
            Ok(spec) => specs.push(to_wire(&spec)),
            Err(invalid) => errors.extend(invalid.0.into_iter().map(|mut e| {
                e.field = format!("[{i}].{}", e.field);
                e
            })),
        }
    }
    if errors.is_empty() {
        Ok(specs)
    } else {
        Err(InvalidSpec { source, errors }.into())
    }
}

impl JobArgs {
    /// The spec to submit: the job file with the options applied over it when `-f` is given,
    /// the options alone otherwise.
    pub fn to_spec(&self) -> anyhow::Result<pb::JobSpec> {
        match &self.file {
            Some(path) => {
                let draft: JobSpecDraft = jobfile::load(path)?;
                self.spec_from_file(draft, &jobfile::display_name(path))
            }
            None => self.spec_from_options(),
        }
    }

    /// `draft` with the options applied, validated, in wire form. `source` names the file in
    /// errors.
    fn spec_from_file(&self, mut draft: JobSpecDraft, source: &str) -> anyhow::Result<pb::JobSpec> {
        self.apply_to(&mut draft)?;
        let spec = JobSpec::try_from(draft).map_err(|invalid| InvalidSpec {
            source: source.to_owned(),
            errors: invalid.0,
        })?;
        Ok(to_wire(&spec))
    }

    /// Overrides the file's values with the options given: a name, a command (after `--` or
    /// `--script`), a number, a directory or a key replaces the file's; `--env`,
    /// `--secret-env`, `--label` and `--require` add entries, replacing the file's entries of
    /// the same key (an `--env` value for a key the file marks secret stays secret);
    /// `--cpu` and `--memory` replace one resource each.
    fn apply_to(&self, draft: &mut JobSpecDraft) -> anyhow::Result<()> {
        if let Some(name) = &self.name {
            draft.name = name.clone();
        }
        if let Some(command) = self.command()? {
            draft.command = command;
        }
        draft.env.extend(self.env.iter().cloned());
        for (key, value) in self.secret_values()? {
            draft.env.insert(key.clone(), value);
            draft.secret_env.insert(key);
        }
        draft.labels.extend(self.labels.iter().cloned());
        draft
            .required_labels
            .extend(self.required_labels.iter().cloned());
        if let Some(timeout) = self.timeout {
            draft.timeout_secs = timeout;
        }
        if let Some(max_attempts) = self.max_attempts {
            draft.max_attempts = max_attempts;
        }
        if let Some(priority) = self.priority {
            draft.priority = priority;
        }
        if self.requeue_when_unreachable {
            draft.requeue_when_unreachable = true;
        }
        if self.preemptible {
            draft.preemptible = true;
        }
        if let Some(cpu) = self.cpu {
            draft.resources.cpu_millis = cpu;
        }
        if let Some(memory) = self.memory {
            draft.resources.memory_mb = memory;
        }
        if let Some(key) = &self.idempotency_key {
            draft.idempotency_key = Some(key.clone());
        }
        if let Some(dir) = &self.workdir {
            draft.working_dir = Some(dir.clone());
        }
        Ok(())
    }

    /// The spec from the options alone.
    fn spec_from_options(&self) -> anyhow::Result<pb::JobSpec> {
        let Some(command) = self.command()? else {
            bail!("no command to run; give one after `--`, use --script, or -f FILE");
        };
        let name = match &self.name {
            Some(name) => name.clone(),
            None => default_name(&command),
        };
        let resources = (self.cpu.is_some() || self.memory.is_some()).then(|| pb::Resources {
            cpu_millis: self.cpu.unwrap_or(0),
            memory_mb: self.memory.unwrap_or(0),
        });
        let mut env = to_map(&self.env);
        let mut secret_env = Vec::new();
        for (key, value) in self.secret_values()? {
            env.insert(key.clone(), value);
            if !secret_env.contains(&key) {
                secret_env.push(key);
            }
        }
        Ok(pb::JobSpec {
            name,
            command: Some(command_to_wire(command)),
            env,
            secret_env,
            working_dir: self.workdir.clone().unwrap_or_default(),
            timeout_secs: self.timeout.unwrap_or(0),
            resources,
            required_labels: to_map(&self.required_labels),
            priority: self.priority.unwrap_or(0),
            max_attempts: self.max_attempts.unwrap_or(0),
            retry_backoff: None,
            idempotency_key: self.idempotency_key.clone().unwrap_or_default(),
            labels: to_map(&self.labels),
            requeue_when_unreachable: self.requeue_when_unreachable,
            preemptible: self.preemptible,
        })
    }

    /// The command given by `--script` or after `--`, if any.
    fn command(&self) -> anyhow::Result<Option<Command>> {
        if let Some(script) = &self.script {
            let interpreter: Vec<String> = self
                .interpreter
                .as_deref()
                .unwrap_or(DEFAULT_INTERPRETER)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            if interpreter.is_empty() {
                bail!("--interpreter is empty; give a program such as \"/bin/sh -c\"");
            }
            return Ok(Some(Command::Script {
                interpreter,
                script: script.clone(),
            }));
        }
        Ok((!self.command.is_empty()).then(|| Command::Exec {
            argv: self.command.clone(),
        }))
    }

    /// The `--secret-env` entries with their values, a bare `K` taking the value of `K` in
    /// this environment.
    fn secret_values(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.secret_env
            .iter()
            .map(|(key, value)| {
                let value = match value {
                    Some(value) => value.clone(),
                    None => std::env::var(key).map_err(|_| {
                        anyhow::anyhow!(
                            "--secret-env {key}: {key} is not set (or not UTF-8) in this \
                             environment; give it as {key}=VALUE"
                        )
                    })?,
                };
                Ok((key.clone(), value))
            })
            .collect()
    }
}

/// The pipeline file at `path` (`-` for stdin), validated, in wire form with its secret
/// values, ready to submit.
pub fn pipeline_from_file(path: &str) -> anyhow::Result<pb::PipelineSpec> {
    let draft: PipelineSpecDraft = jobfile::load(path)?;
    pipeline_to_wire(draft, &jobfile::display_name(path))
}

/// `draft` validated and in wire form; `source` names the file in errors.
fn pipeline_to_wire(draft: PipelineSpecDraft, source: &str) -> anyhow::Result<pb::PipelineSpec> {
    let spec = PipelineSpec::try_from(draft).map_err(|invalid| InvalidSpec {
        source: source.to_owned(),
        errors: invalid.0,
    })?;
    // Not `pb::PipelineSpec::from(&spec)`: that is the display form, with secrets masked.
    Ok(hodei_proto::pipeline_spec_to_wire(&spec))
}

/// The validated spec as submitted. `pb::JobSpec::from(&JobSpec)` is the API's display form
/// and masks secret values; a submission must carry them, so the env is put back unmasked and
/// everything else comes from the shared conversion.
pub fn to_wire(spec: &JobSpec) -> pb::JobSpec {
    let mut wire = pb::JobSpec::from(spec);
    wire.env = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    wire
}

fn command_to_wire(command: Command) -> pb::job_spec::Command {
    match command {
        Command::Exec { argv } => pb::job_spec::Command::Exec(pb::ExecCommand { argv }),
        Command::Script {
            interpreter,
            script,
        } => pb::job_spec::Command::Script(pb::ScriptCommand {
            interpreter,
            script,
        }),
    }
}

/// The basename of the program for a command, `script` for a script.
fn default_name(command: &Command) -> String {
    let name = match command {
        Command::Exec { argv } => argv
            .first()
            .map(|program| {
                Path::new(program)
                    .file_name()
                    .map_or_else(|| program.clone(), |n| n.to_string_lossy().into_owned())
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| SCRIPT_JOB_NAME.to_owned()),
        Command::Script { .. } => SCRIPT_JOB_NAME.to_owned(),
    };
    name.chars().take(MAX_NAME_CHARS).collect()
}

/// Later repetitions of a key win, as they would in a shell.
fn to_map(pairs: &[(String, String)]) -> HashMap<String, String> {
    pairs.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn spec(args: &[&str]) -> anyhow::Result<pb::JobSpec> {
        let cli = Cli::try_parse_from(std::iter::once("hodei").chain(args.iter().copied()))?;
        match cli.command {
            Command::Submit(a) | Command::Run(a) => a.to_spec(),
            other => panic!("not a job command: {other:?}"),
        }
    }

    /// The spec of `args` (which name a job file) with `draft` standing for the file.
    fn file_spec(args: &[&str], draft: JobSpecDraft) -> anyhow::Result<pb::JobSpec> {
        let cli = Cli::try_parse_from(std::iter::once("hodei").chain(args.iter().copied()))?;
        match cli.command {
            Command::Submit(a) | Command::Run(a) => {
                assert!(a.file.is_some(), "no -f in {args:?}");
                a.spec_from_file(draft, "job.yaml")
            }
            other => panic!("not a job command: {other:?}"),
        }
    }

    fn file_draft() -> JobSpecDraft {
        let mut d = JobSpecDraft::exec("from-file", &["echo", "file"]);
        d.env.insert("A".into(), "1".into());
        d.env.insert("B".into(), "2".into());
        d.env.insert("TOKEN".into(), "file-secret".into());
        d.secret_env.insert("TOKEN".into());
        d.labels.insert("team".into(), "web".into());
        d.labels.insert("tier".into(), "1".into());
        d.resources = hodei_domain::Resources::new(100, 200);
        d.timeout_secs = 60;
        d.max_attempts = 3;
        d.retry_backoff = hodei_domain::Backoff {
            initial_ms: 10,
            max_ms: 20,
        };
        d
    }

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn submit_with_env_and_requirement_builds_the_spec() {
        let got = spec(&[
            "submit",
            "--env",
            "A=B",
            "--require",
            "gpu=true",
            "--",
            "echo",
            "hi",
        ])
        .unwrap();
        let want = pb::JobSpec {
            name: "echo".into(),
            command: Some(pb::job_spec::Command::Exec(pb::ExecCommand {
                argv: vec!["echo".into(), "hi".into()],
            })),
            env: map(&[("A", "B")]),
            required_labels: map(&[("gpu", "true")]),
            ..Default::default()
        };
        assert_eq!(got, want);
    }

    #[test]
    fn every_option_reaches_the_spec() {
        let got = spec(&[
            "run",
            "--name",
            "build",
            "--label",
            "team=ci",
            "--timeout",
            "60",
            "--max-attempts",
            "3",
            "--priority",
            "-10",
            "--cpu",
            "500",
            "--memory",
            "256",
            "--idempotency-key",
            "k1",
            "--workdir",
            "src",
            "--",
            "/usr/bin/make",
            "all",
        ])
        .unwrap();
        assert_eq!(got.name, "build");
        assert_eq!(got.labels, map(&[("team", "ci")]));
        assert_eq!(got.timeout_secs, 60);
        assert_eq!(got.max_attempts, 3);
        assert_eq!(got.priority, -10);
        assert_eq!(
            got.resources,
            Some(pb::Resources {
                cpu_millis: 500,
                memory_mb: 256
            })
        );
        assert_eq!(got.idempotency_key, "k1");
        assert_eq!(got.working_dir, "src");
    }

    #[test]
    fn default_name_is_the_basename() {
        let got = spec(&["submit", "--", "/usr/local/bin/backup.sh", "-v"]).unwrap();
        assert_eq!(got.name, "backup.sh");
        let long = "x".repeat(300);
        let got = spec(&["submit", "--", &long]).unwrap();
        assert_eq!(got.name.chars().count(), MAX_NAME_CHARS);
    }

    #[test]
    fn script_uses_the_interpreter() {
        let got = spec(&[
            "submit",
            "--script",
            "echo $HOME",
            "--interpreter",
            "bash -eu -c",
        ])
        .unwrap();
        assert_eq!(got.name, "script");
        assert_eq!(
            got.command,
            Some(pb::job_spec::Command::Script(pb::ScriptCommand {
                interpreter: vec!["bash".into(), "-eu".into(), "-c".into()],
                script: "echo $HOME".into(),
            }))
        );
        let default = spec(&["submit", "--script", "true"]).unwrap();
        let Some(pb::job_spec::Command::Script(s)) = default.command else {
            panic!("not a script");
        };
        assert_eq!(s.interpreter, vec!["/bin/sh", "-c"]);
    }

    #[test]
    fn empty_interpreter_is_refused() {
        let err = spec(&["submit", "--script", "true", "--interpreter", " "]).unwrap_err();
        assert!(err.to_string().contains("--interpreter"), "{err}");
    }

    #[test]
    fn secret_env_sets_and_marks_the_variable() {
        // PATH is set wherever tests run.
        let path = std::env::var("PATH").unwrap();
        let got = spec(&[
            "submit",
            "--env",
            "TOKEN=plain",
            "--secret-env",
            "TOKEN=s3cret",
            "--secret-env",
            "PATH",
            "--",
            "true",
        ])
        .unwrap();
        assert_eq!(
            got.env,
            map(&[("TOKEN", "s3cret"), ("PATH", path.as_str())])
        );
        assert_eq!(got.secret_env, vec!["TOKEN", "PATH"]);
    }

    #[test]
    fn secret_env_from_an_unset_variable_is_refused() {
        let err = spec(&[
            "submit",
            "--secret-env",
            "HODEI_TEST_SURELY_UNSET_VARIABLE",
            "--",
            "true",
        ])
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--secret-env HODEI_TEST_SURELY_UNSET_VARIABLE"),
            "{msg}"
        );
        let msg = spec(&["submit", "--secret-env", "", "--", "true"])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--secret-env"), "{msg}");
    }

    #[test]
    fn repeated_keys_keep_the_last_value() {
        let got = spec(&["submit", "--env", "A=1", "--env", "A=2", "--", "true"]).unwrap();
        assert_eq!(got.env, map(&[("A", "2")]));
    }

    #[test]
    fn a_file_is_submitted_as_written_with_secrets_unmasked() {
        let got = file_spec(&["submit", "-f", "job.yaml"], file_draft()).unwrap();
        assert_eq!(
            got.env.get("TOKEN").map(String::as_str),
            Some("file-secret")
        );
        assert_eq!(got.secret_env, vec!["TOKEN"]);
        // Nothing is lost or masked on the way: the server reads back the same draft.
        assert_eq!(JobSpecDraft::from(got), file_draft());
    }

    #[test]
    fn options_override_the_file() {
        let got = file_spec(
            &[
                "run",
                "-f",
                "job.yaml",
                "--name",
                "from-flags",
                "--env",
                "B=3",
                "--env",
                "TOKEN=flag-secret",
                "--secret-env",
                "KEY=k",
                "--label",
                "team=ci",
                "--require",
                "gpu=true",
                "--timeout",
                "5",
                "--memory",
                "512",
                "--priority",
                "7",
                "--idempotency-key",
                "once",
                "--workdir",
                "src",
                "--",
                "echo",
                "flags",
            ],
            file_draft(),
        )
        .unwrap();
        let d = JobSpecDraft::from(got);
        assert_eq!(d.name, "from-flags");
        assert_eq!(
            d.command,
            hodei_domain::Command::Exec {
                argv: vec!["echo".into(), "flags".into()]
            }
        );
        let env: Vec<(&str, &str)> = d
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("A", "1"),
                ("B", "3"),
                ("KEY", "k"),
                ("TOKEN", "flag-secret")
            ]
        );
        // The file marked TOKEN secret; a plain --env value for it stays secret.
        assert_eq!(
            d.secret_env.iter().map(String::as_str).collect::<Vec<_>>(),
            ["KEY", "TOKEN"]
        );
        assert_eq!(d.labels.get("team").map(String::as_str), Some("ci"));
        assert_eq!(d.labels.get("tier").map(String::as_str), Some("1"));
        assert_eq!(
            d.required_labels.get("gpu").map(String::as_str),
            Some("true")
        );
        assert_eq!(d.timeout_secs, 5);
        assert_eq!(d.resources, hodei_domain::Resources::new(100, 512));
        assert_eq!(d.priority, 7);
        assert_eq!(d.idempotency_key.as_deref(), Some("once"));
        assert_eq!(d.working_dir.as_deref(), Some("src"));
        // What no option touched is the file's.
        assert_eq!(d.max_attempts, 3);
        assert_eq!(d.retry_backoff.initial_ms, 10);
    }

    #[test]
    fn a_script_option_replaces_the_files_command() {
        let got = file_spec(
            &["submit", "-f", "job.yaml", "--script", "make"],
            file_draft(),
        )
        .unwrap();
        assert_eq!(
            got.command,
            Some(pb::job_spec::Command::Script(pb::ScriptCommand {
                interpreter: vec!["/bin/sh".into(), "-c".into()],
                script: "make".into(),
            }))
        );
    }

    #[test]
    fn a_pipeline_is_validated_with_paths_and_sent_with_its_secrets() {
        let mut deploy =
            hodei_domain::StepDraft::exec("deploy", &["./deploy.sh"]).needing(&["build"]);
        deploy.env.insert("TOKEN".into(), "s3cret".into());
        deploy.secret_env.insert("TOKEN".into());
        let draft = PipelineSpecDraft {
            name: "ci".into(),
            env: Default::default(),
            steps: vec![hodei_domain::StepDraft::exec("build", &["make"]), deploy],
            fail_fast: false,
            idempotency_key: None,
            labels: Default::default(),
        };
        let wire = pipeline_to_wire(draft.clone(), "p.yaml").unwrap();
        assert_eq!(wire.steps.len(), 2);
        let job = wire.steps[1].job.clone().unwrap();
        assert_eq!(job.env.get("TOKEN").map(String::as_str), Some("s3cret"));
        assert_eq!(wire.steps[1].needs, ["build"]);

        let mut bad = draft;
        bad.steps[1].needs = vec!["build".into(), "nope".into()];
        bad.steps[0].max_attempts = 0;
        let err = pipeline_to_wire(bad, "p.yaml").unwrap_err();
        let invalid = err.downcast_ref::<InvalidSpec>().unwrap();
        let lines = invalid.lines();
        assert!(
            lines.contains(&"p.yaml: steps.deploy.needs[1]: unknown step 'nope'".to_owned()),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("p.yaml: steps.build.max_attempts: ")),
            "{lines:?}"
        );
    }

    #[test]
    fn an_invalid_file_reports_every_field() {
        let mut d = file_draft();
        d.max_attempts = 1000;
        d.priority = 5000;
        d.secret_env.insert("MISSING".into());
        let err = file_spec(&["submit", "-f", "job.yaml"], d.clone()).unwrap_err();
        let invalid = err.downcast_ref::<InvalidSpec>().unwrap();
        assert_eq!(
            invalid.lines(),
            [
                "job.yaml: max_attempts: must be between 1 and 100",
                "job.yaml: priority: must be between -1000 and 1000",
                "job.yaml: secret_env.MISSING: must name an entry of env",
            ]
        );
        // Options are applied before validation, so they can mend a file.
        d.secret_env.remove("MISSING");
        let got = file_spec(
            &[
                "submit",
                "-f",
                "job.yaml",
                "--max-attempts",
                "2",
                "--priority",
                "1",
            ],
            d,
        )
        .unwrap();
        assert_eq!((got.max_attempts, got.priority), (2, 1));
    }
}
