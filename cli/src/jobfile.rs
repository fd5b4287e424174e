//! Job and pipeline files for `-f`: a YAML or JSON document in the schema of the domain's
//! `JobSpecDraft` or `PipelineSpecDraft`, so files and the API share one definition of each.
//!
//! The format follows the extension: `.json` is read as JSON, anything else (`.yaml`, `.yml`,
//! stdin) as YAML, which also reads JSON. A document that does not parse or does not fit the
//! schema is reported as `FILE:LINE:COLUMN: message`; one that parses but breaks the spec's
//! rules is reported with every invalid field by the caller (after flags are applied, for
//! jobs).

use std::fmt;
use std::io::Read;
use std::path::Path;

use anyhow::Context;
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{Command, PipelineSpecDraft};
use serde::de::DeserializeOwned;
use serde_yaml_ng::Value;

/// What `-f` takes to read the job from stdin.
pub const STDIN: &str = "-";

/// How a job file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

impl Format {
    /// JSON for a `.json` extension (any case), YAML for anything else.
    pub fn of(path: &str) -> Format {
        let is_json = Path::new(path)
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        if is_json { Format::Json } else { Format::Yaml }
    }
}

/// A job file that does not parse or does not fit the schema, with where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// The file as the user named it, or `<stdin>`.
    pub source: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.source, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for ParseError {}

/// The name a job file goes by in messages: its path, or `<stdin>` for `-`.
pub fn display_name(path: &str) -> String {
    if path == STDIN {
        "<stdin>".to_owned()
    } else {
        path.to_owned()
    }
}

/// What a file can hold: a job or a pipeline.
pub trait Document: DeserializeOwned {
    /// What it is, in messages: "job".
    const WHAT: &'static str;
    /// The fields it cannot do without, in messages: "`name` and `command`".
    const REQUIRED: &'static str;

    /// Where its commands are, each with the path of the mapping that holds it (empty for
    /// the top level) and the command as written.
    fn commands(document: &Value) -> Vec<(String, &Value)>;
}

impl Document for JobSpecDraft {
    const WHAT: &'static str = "job";
    const REQUIRED: &'static str = "`name` and `command`";

    fn commands(document: &Value) -> Vec<(String, &Value)> {
        document
            .get("command")
            .map(|c| (String::new(), c))
            .into_iter()
            .collect()
    }
}

impl Document for PipelineSpecDraft {
    const WHAT: &'static str = "pipeline";
    const REQUIRED: &'static str = "`name` and `steps`";

    fn commands(document: &Value) -> Vec<(String, &Value)> {
        let Some(steps) = document.get("steps").and_then(Value::as_sequence) else {
            return Vec::new();
        };
        steps
            .iter()
            .enumerate()
            .filter_map(|(i, step)| Some((format!("steps[{i}]"), step.get("command")?)))
            .collect()
    }
}

impl Document for Vec<JobSpecDraft> {
    const WHAT: &'static str = "list of jobs";
    const REQUIRED: &'static str = "one job with `name` and `command`";

    fn commands(document: &Value) -> Vec<(String, &Value)> {
        let Some(jobs) = document.as_sequence() else {
            return Vec::new();
        };
        jobs.iter()
            .enumerate()
            .filter_map(|(i, job)| Some((format!("[{i}]"), job.get("command")?)))
            .collect()
    }
}

/// Reads and parses the job or pipeline file at `path`, or stdin for `-`.
pub fn load<D: Document>(path: &str) -> anyhow::Result<D> {
    let text = if path == STDIN {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .with_context(|| format!("failed to read the {} from stdin", D::WHAT))?;
        text
    } else {
        std::fs::read_to_string(path).with_context(|| format!("failed to read {path}"))?
    };
    Ok(parse(&text, Format::of(path), &display_name(path))?)
}

/// Parses a job or pipeline document; `source` names it in errors.
pub fn parse<D: Document>(text: &str, format: Format, source: &str) -> Result<D, ParseError> {
    let error = |line, column, message: String| ParseError {
        source: source.to_owned(),
        line,
        column,
        message,
    };
    if text.trim().is_empty() {
        return Err(error(
            1,
            1,
            format!(
                "the file is empty; a {} needs at least {}",
                D::WHAT,
                D::REQUIRED
            ),
        ));
    }
    match format {
        Format::Json => serde_json::from_str(text).map_err(|e| {
            let (line, column) = (e.line().max(1), e.column().max(1));
            error(
                line,
                column,
                without_position(&e.to_string(), e.line(), e.column()),
            )
        }),
        Format::Yaml => serde_yaml_ng::from_str(text).map_err(|e| {
            let (line, column) = e
                .location()
                .map_or((1, 1), |l| (l.line().max(1), l.column().max(1)));
            let message = without_position(&e.to_string(), line, column);
            // The parser names an item of a top-level list `.[1]`; shown as `[1]`, as a
            // pipeline's `steps[1]`.
            let message = message.strip_prefix('.').unwrap_or(&message).to_owned();
            match command_error::<D>(text, &message) {
                Some((path, message)) => {
                    let (line, column) =
                        key_position(text, "command", line, column).unwrap_or((line, column));
                    error(
                        line,
                        column,
                        format!("{path}command: {}", with_hint(message)),
                    )
                }
                None => error(line, column, message),
            }
        }),
    }
}

/// When the document's error `message` is one of its commands' own, that command's path
/// (`""` or `"steps[1]."`) and error.
///
/// serde reads a command, an internally tagged enum, from a buffered copy, so the parser can
/// only place errors inside it at the start of the mapping that holds it, without their path
/// under it. Such an error is reported at the `command` key instead.
fn command_error<D: Document>(text: &str, message: &str) -> Option<(String, String)> {
    let document: Value = serde_yaml_ng::from_str(text).ok()?;
    D::commands(&document)
        .into_iter()
        .find_map(|(at, command)| {
            let error = serde_yaml_ng::from_value::<Command>(command.clone())
                .err()?
                .to_string();
            let (path, whole) = if at.is_empty() {
                (String::new(), error.clone())
            } else {
                (format!("{at}."), format!("{at}: {error}"))
            };
            (whole == message).then_some((path, error))
        })
}

/// Line and column (1-based) of the key `key:` of the mapping that starts at `line` and
/// `column`: a block key at that column, or a JSON-style `"key":` anywhere, on that line or a
/// later one before the mapping ends (a line indented less than the mapping).
fn key_position(text: &str, key: &str, line: usize, column: usize) -> Option<(usize, usize)> {
    let quoted = format!("\"{key}\"");
    let followed_by_colon = |rest: &str| rest.trim_start().starts_with(':');
    let indent = column.saturating_sub(1);
    for (i, text) in text.lines().enumerate().skip(line.saturating_sub(1)) {
        let leading = text.chars().take_while(|c| *c == ' ').count();
        let blank = text.trim().is_empty() || text.trim_start().starts_with('#');
        // The mapping's first line may start after a `- `; later ones end it by dedenting.
        if i + 1 > line && !blank && leading < indent {
            return None;
        }
        let at_column: String = text.chars().skip(indent).collect();
        if at_column.strip_prefix(key).is_some_and(followed_by_colon) {
            return Some((i + 1, column.max(1)));
        }
        if let Some(at) = text.find(&quoted)
            && followed_by_colon(&text[at + quoted.len()..])
        {
            return Some((i + 1, text[..at].chars().count() + 1));
        }
    }
    None
}

/// A buffered copy keeps YAML's types, so `argv: [sleep, 10]` holds a number where a string
/// is wanted; the fix is to quote it.
fn with_hint(message: String) -> String {
    if message.ends_with("expected a string") {
        format!("{message} (quote it, as in argv: [sleep, \"10\"])")
    } else {
        message
    }
}

/// The parsers' messages end their first clause with " at line L column C"; the position
/// leads the report already, so it is taken out once. Other positions (such as where an
/// unclosed bracket was opened) stay.
fn without_position(message: &str, line: usize, column: usize) -> String {
    message.replacen(&format!(" at line {line} column {column}"), "", 1)
}

#[cfg(test)]
mod tests {
    use hodei_domain::JobSpec;

    use super::*;

    const HELLO_YAML: &str = "\
name: hello
command:
  kind: exec
  argv: [echo, hi]
env:
  A: b
max_attempts: 2
";

    fn yaml_error(text: &str) -> String {
        parse::<JobSpecDraft>(text, Format::Yaml, "job.yaml")
            .unwrap_err()
            .to_string()
    }

    fn pipeline_error(text: &str) -> String {
        parse::<PipelineSpecDraft>(text, Format::Yaml, "p.yaml")
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_format_follows_the_extension() {
        assert_eq!(Format::of("job.json"), Format::Json);
        assert_eq!(Format::of("dir.d/JOB.JSON"), Format::Json);
        assert_eq!(Format::of("job.yaml"), Format::Yaml);
        assert_eq!(Format::of("job.yml"), Format::Yaml);
        assert_eq!(Format::of("job"), Format::Yaml);
        assert_eq!(Format::of(STDIN), Format::Yaml);
    }

    #[test]
    fn yaml_parses_into_the_domain_draft_with_its_defaults() {
        let draft: JobSpecDraft = parse(HELLO_YAML, Format::Yaml, "job.yaml").unwrap();
        let mut want = JobSpecDraft::exec("hello", &["echo", "hi"]);
        want.env.insert("A".into(), "b".into());
        want.max_attempts = 2;
        assert_eq!(draft, want);
    }

    #[test]
    fn json_parses_as_json_and_as_yaml() {
        let text = r#"{
  "name": "s",
  "command": {"kind": "script", "interpreter": ["/bin/sh", "-c"], "script": "echo hi"},
  "retry_backoff": {"initial_ms": 10, "max_ms": 20},
  "resources": {"cpu_millis": 500, "memory_mb": 64}
}"#;
        let draft: JobSpecDraft = parse(text, Format::Json, "job.json").unwrap();
        assert_eq!(
            draft.command,
            Command::Script {
                interpreter: vec!["/bin/sh".into(), "-c".into()],
                script: "echo hi".into()
            }
        );
        assert_eq!(draft.retry_backoff.max_ms, 20);
        assert_eq!(draft.resources.memory_mb, 64);
        assert_eq!(
            parse::<JobSpecDraft>(text, Format::Yaml, "job").unwrap(),
            draft
        );
    }

    #[test]
    fn a_syntax_error_names_the_line_and_column() {
        let err = yaml_error("name: x\ncommand:\n  kind: exec\n  argv: [echo, hi\n");
        assert_eq!(
            err,
            "job.yaml:5:1: did not find expected ',' or ']', \
             while parsing a flow sequence at line 4 column 9"
        );
    }

    #[test]
    fn an_unknown_field_names_its_line_and_column() {
        let err = yaml_error("name: x\ncommand:\n  kind: exec\n  argv: [\"true\"]\nretries: 3\n");
        assert!(
            err.starts_with("job.yaml:5:1: unknown field `retries`, expected one of `name`"),
            "{err}"
        );
        assert!(!err.contains("at line"), "{err}");

        let err = parse::<JobSpecDraft>(
            "{\"name\": \"x\",\n \"command\": {\"kind\": \"exec\", \"argv\": [\"true\"]},\n \"bogus\": 1}",
            Format::Json,
            "job.json",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("job.json:3:") && err.contains("unknown field `bogus`"),
            "{err}"
        );
        assert!(!err.contains("at line"), "{err}");
    }

    #[test]
    fn wrong_types_and_variants_name_the_field() {
        let err =
            yaml_error("name: x\ncommand:\n  kind: exec\n  argv: [\"true\"]\ntimeout_secs: soon\n");
        assert_eq!(
            err,
            "job.yaml:5:15: timeout_secs: invalid type: string \"soon\", expected u64"
        );
        let err = yaml_error("name: x\ncommand:\n  kind: shell\n  argv: [\"true\"]\n");
        assert_eq!(
            err,
            "job.yaml:3:9: command.kind: unknown variant `shell`, expected `exec` or `script`"
        );
    }

    #[test]
    fn errors_inside_the_command_are_placed_at_its_key() {
        assert_eq!(
            yaml_error("# sleeps\nname: x\ncommand:\n  kind: exec\n  argv: [sleep, 10]\n"),
            "job.yaml:3:1: command: invalid type: integer `10`, expected a string \
             (quote it, as in argv: [sleep, \"10\"])"
        );
        assert_eq!(
            yaml_error("name: x\ncommand:\n  kind: script\n  interpreter: [sh, -c]\n"),
            "job.yaml:2:1: command: missing field `script`"
        );
        assert_eq!(
            yaml_error("{\"name\": \"x\",\n  \"command\": {\"kind\": \"exec\"}}"),
            "job.yaml:2:3: command: missing field `argv`"
        );
        // Errors the parser places itself keep their place.
        assert!(yaml_error("name: x\ncommand:\n  kind: shell\n").starts_with("job.yaml:3:9: "),);
    }

    #[test]
    fn missing_and_empty_documents_are_reported() {
        assert_eq!(
            yaml_error("command:\n  kind: exec\n  argv: [\"true\"]\n"),
            "job.yaml:1:1: missing field `name`"
        );
        assert_eq!(
            yaml_error("\n  \n"),
            "job.yaml:1:1: the file is empty; a job needs at least `name` and `command`"
        );
        assert!(yaml_error("- a\n").starts_with("job.yaml:1:1: invalid type: sequence"));
    }

    #[test]
    fn files_are_read_and_named_in_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hello.yaml");
        std::fs::write(&path, HELLO_YAML).unwrap();
        let draft: JobSpecDraft = load(path.to_str().unwrap()).unwrap();
        assert_eq!(draft.name, "hello");

        let missing = dir.path().join("missing.yaml");
        let err = load::<JobSpecDraft>(missing.to_str().unwrap()).unwrap_err();
        assert!(
            format!("{err:#}").starts_with(&format!("failed to read {}: ", missing.display())),
            "{err:#}"
        );
        assert_eq!(display_name(STDIN), "<stdin>");
    }

    const PIPELINE_YAML: &str = "\
name: ci
steps:
  - name: build
    command: {kind: exec, argv: [make]}
  - name: test
    needs: [build]
    command:
      kind: exec
      argv: [sleep, 10]
";

    #[test]
    fn pipelines_parse_into_the_domain_draft() {
        let text = PIPELINE_YAML.replace("[sleep, 10]", "[sleep, \"10\"]");
        let draft: PipelineSpecDraft = parse(&text, Format::Yaml, "p.yaml").unwrap();
        assert_eq!(draft.name, "ci");
        let names: Vec<&str> = draft.steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["build", "test"]);
        assert_eq!(draft.steps[1].needs, ["build"]);
    }

    #[test]
    fn a_list_of_jobs_names_a_bad_command_by_its_place() {
        let text = "- name: a\n  command: {kind: exec, argv: [\"true\"]}\n- name: b\n  command:\n    kind: shell\n    argv: [\"true\"]\n";
        let err = parse::<Vec<JobSpecDraft>>(text, Format::Yaml, "jobs.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("jobs.yaml:5:11: [1].command.kind: unknown variant `shell`"),
            "{err}"
        );
        let err = parse::<Vec<JobSpecDraft>>(
            &text
                .replace("shell", "exec")
                .replace("[\"true\"]\n", "[sleep, 10]\n"),
            Format::Yaml,
            "jobs.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("jobs.yaml:4:3: [1].command: invalid type: integer `10`"),
            "{err}"
        );
        let jobs: Vec<JobSpecDraft> =
            parse(&text.replace("shell", "exec"), Format::Yaml, "jobs.yaml").unwrap();
        assert_eq!(jobs.len(), 2);
    }

    #[test]
    fn pipeline_errors_name_the_step_line_and_column() {
        assert_eq!(
            pipeline_error(PIPELINE_YAML),
            "p.yaml:7:5: steps[1].command: invalid type: integer `10`, expected a string \
             (quote it, as in argv: [sleep, \"10\"])"
        );
        let text = PIPELINE_YAML.replace("kind: exec\n      argv", "kind: exec\n      arg");
        assert_eq!(
            pipeline_error(&text),
            "p.yaml:7:5: steps[1].command: missing field `argv`"
        );
        let text = PIPELINE_YAML.replace(
            "    needs: [build]\n",
            "    needs: [build]\n    retries: 2\n",
        );
        assert!(
            pipeline_error(&text).starts_with("p.yaml:7:5: steps[1]: unknown field `retries`"),
            "{}",
            pipeline_error(&text)
        );
        let text = PIPELINE_YAML.replace("kind: exec\n      argv", "kind: shell\n      argv");
        assert_eq!(
            pipeline_error(&text),
            "p.yaml:8:13: steps[1].command.kind: unknown variant `shell`, expected `exec` or \
             `script`"
        );
        assert_eq!(
            pipeline_error("name: ci\nsteps:\n  - name: a\n"),
            "p.yaml:3:5: steps[0]: missing field `command`"
        );
        assert_eq!(
            pipeline_error(""),
            "p.yaml:1:1: the file is empty; a pipeline needs at least `name` and `steps`"
        );
        assert!(pipeline_error("name: ci\nsteps: [\n").starts_with("p.yaml:3:1: "));
    }

    #[test]
    fn a_command_key_is_looked_for_in_its_own_mapping_only() {
        // The flow-style step has its command inline; the next step's key must not be taken.
        let text = "name: ci\nsteps:\n  - {name: a, command: {kind: exec, argv: [sleep, 1]}}\n  - name: b\n    command: {kind: exec, argv: [\"true\"]}\n";
        let err = pipeline_error(text);
        assert!(err.starts_with("p.yaml:3:"), "{err}");
        assert!(err.contains("steps[0].command: invalid type"), "{err}");
    }

    /// The shipped examples are documentation: each must parse and pass validation.
    #[test]
    fn every_example_job_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.to_str().unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            let listed = serde_yaml_ng::from_str::<Value>(&text)
                .unwrap()
                .is_sequence();
            // A list is for `submit-many`, anything else for `submit -f`.
            let drafts: Vec<JobSpecDraft> = if listed {
                load(name).unwrap_or_else(|e| panic!("{e:#}"))
            } else {
                vec![load(name).unwrap_or_else(|e| panic!("{e:#}"))]
            };
            for draft in drafts {
                if let Err(e) = JobSpec::try_from(draft) {
                    panic!("{name}: {e}");
                }
            }
            seen += 1;
        }
        assert!(seen >= 3, "only {seen} examples in {}", dir.display());
    }

    #[test]
    fn every_example_pipeline_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/pipelines");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if !matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "json")
            ) {
                continue;
            }
            let name = path.to_str().unwrap();
            let draft: PipelineSpecDraft = load(name).unwrap_or_else(|e| panic!("{e:#}"));
            if let Err(e) = hodei_domain::PipelineSpec::try_from(draft) {
                panic!("{name}: {e}");
            }
            seen += 1;
        }
        assert!(seen >= 1, "no example pipelines in {}", dir.display());
    }
}
