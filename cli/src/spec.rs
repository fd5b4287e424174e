//! Turns the job options of `submit` and `run` into the wire `JobSpec`.
//!
//! Options left out stay at their wire zero values, which the server reads as its documented
//! defaults; the server validates the rest and names any field it refuses.

use std::collections::HashMap;
use std::path::Path;

use anyhow::bail;
use hodei_proto::v1 as pb;

use crate::cli::JobArgs;

/// Longest job name the server accepts; a default name is cut to fit.
const MAX_NAME_CHARS: usize = 128;

/// What runs a `--script` when `--interpreter` is not given.
const DEFAULT_INTERPRETER: &str = "/bin/sh -c";

/// Name of a `--script` job submitted without `--name`.
const SCRIPT_JOB_NAME: &str = "script";

impl JobArgs {
    /// The spec to submit.
    pub fn to_spec(&self) -> anyhow::Result<pb::JobSpec> {
        let command = match &self.script {
            Some(script) => {
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
                pb::job_spec::Command::Script(pb::ScriptCommand {
                    interpreter,
                    script: script.clone(),
                })
            }
            None => {
                if self.command.is_empty() {
                    bail!("no command to run; give one after `--` or use --script");
                }
                pb::job_spec::Command::Exec(pb::ExecCommand {
                    argv: self.command.clone(),
                })
            }
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
        for (key, value) in &self.secret_env {
            let value = match value {
                Some(value) => value.clone(),
                None => std::env::var(key).map_err(|_| {
                    anyhow::anyhow!(
                        "--secret-env {key}: {key} is not set (or not UTF-8) in this environment; \
                         give it as {key}=VALUE"
                    )
                })?,
            };
            env.insert(key.clone(), value);
            if !secret_env.contains(key) {
                secret_env.push(key.clone());
            }
        }
        Ok(pb::JobSpec {
            name,
            command: Some(command),
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
        })
    }
}

/// The basename of the program for a command, `script` for a script.
fn default_name(command: &pb::job_spec::Command) -> String {
    let name = match command {
        pb::job_spec::Command::Exec(exec) => exec
            .argv
            .first()
            .map(|program| {
                Path::new(program)
                    .file_name()
                    .map_or_else(|| program.clone(), |n| n.to_string_lossy().into_owned())
            })
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| SCRIPT_JOB_NAME.to_owned()),
        pb::job_spec::Command::Script(_) => SCRIPT_JOB_NAME.to_owned(),
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
}
