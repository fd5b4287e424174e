//! What a user asks to run: [`JobSpec`], parsed once from a [`JobSpecDraft`] by rules that are
//! [`Specification`]s, reporting every invalid field with its reason.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{FieldError, ValidationErrors};
use crate::specification::{Predicate, Specification};

/// Longest a job may run, whatever its spec says.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// Most attempts a job may ask for.
pub const MAX_ATTEMPTS: u32 = 100;
/// The longest a job's name may be, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// The lowest priority a job may ask for.
pub const MIN_PRIORITY: i32 = -1000;
/// The highest priority a job may ask for.
pub const MAX_PRIORITY: i32 = 1000;
const MAX_ARGS: usize = 4096;
const MAX_ARG_BYTES: usize = 128 * 1024;
const MAX_MAP_ENTRIES: usize = 256;

/// How the job's process is started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Command {
    /// Run a program with arguments, without a shell: `argv[0]` is looked up on `PATH`.
    Exec { argv: Vec<String> },
    /// Run a script with an interpreter (`["/bin/sh", "-c"]`, `["python3", "-c"]`): the script
    /// is passed as the last argument.
    Script {
        interpreter: Vec<String>,
        script: String,
    },
}

impl Command {
    /// The argv the agent executes.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Exec { argv } => argv.clone(),
            Command::Script {
                interpreter,
                script,
            } => {
                let mut v = interpreter.clone();
                v.push(script.clone());
                v
            }
        }
    }
}

/// Resources a job requests, or a worker offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in thousandths of a core.
    pub cpu_millis: u64,
    /// Memory in MiB.
    pub memory_mb: u64,
}

impl Resources {
    pub fn new(cpu_millis: u64, memory_mb: u64) -> Self {
        Self {
            cpu_millis,
            memory_mb,
        }
    }

    /// Whether `other` fits inside these resources.
    pub fn fits(&self, other: &Resources) -> bool {
        other.cpu_millis <= self.cpu_millis && other.memory_mb <= self.memory_mb
    }

    pub fn saturating_sub(&self, other: &Resources) -> Resources {
        Resources::new(
            self.cpu_millis.saturating_sub(other.cpu_millis),
            self.memory_mb.saturating_sub(other.memory_mb),
        )
    }

    pub fn saturating_add(&self, other: &Resources) -> Resources {
        Resources::new(
            self.cpu_millis.saturating_add(other.cpu_millis),
            self.memory_mb.saturating_add(other.memory_mb),
        )
    }
}

/// Delay before retrying a failed attempt: exponential from `initial_ms`, doubling each
/// attempt, capped at `max_ms`, with up to 20 % jitter subtracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    pub initial_ms: u64,
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial_ms: 1_000,
            max_ms: 60_000,
        }
    }
}

impl Backoff {
    /// Delay before the attempt after `failed_attempt` (1-based). `jitter` in `[0, 1)` comes
    /// from the caller so the domain stays deterministic.
    pub fn delay(&self, failed_attempt: u32, jitter: f64) -> Duration {
        let exp = failed_attempt.saturating_sub(1).min(32);
        let base = self
            .initial_ms
            .saturating_mul(1u64 << exp)
            .min(self.max_ms.max(self.initial_ms));
        let jitter = jitter.clamp(0.0, 1.0);
        // Truncation is intended: milliseconds are precise enough for a retry delay.
        let cut = ((base as f64) * 0.2 * jitter) as u64;
        Duration::from_millis(base.saturating_sub(cut))
    }
}

pub(crate) fn default_timeout() -> u64 {
    3600
}

pub(crate) fn default_attempts() -> u32 {
    1
}

/// Declares a struct whose fields are its own followed by the fields every job has: a job
/// spec and a pipeline step share them, so the list is written once, here. The macro also
/// gives the struct `from_job_fields` (its own fields, in order, then a [`JobFields`]) and
/// `into_job_fields`.
///
/// The shared fields are laid out flat in the struct rather than in a nested
/// `#[serde(flatten)]` member: flattening decodes a spec about 1.8 times slower (serde buffers
/// the flattened part) and lets unknown fields through `deny_unknown_fields`.
macro_rules! with_job_fields {
    (@define [$( $(#[$sattr:meta])* $sfield:ident : $sty:ty ),* $(,)?]
     $(#[$attr:meta])*
     pub struct $name:ident {
         $( $(#[$fattr:meta])* pub $field:ident : $fty:ty ),* $(,)?
     }) => {
        $(#[$attr])*
        pub struct $name {
            $( $(#[$fattr])* pub $field: $fty, )*
            $( $(#[$sattr])* pub $sfield: $sty, )*
        }

        impl $name {
            /// The struct from its own fields, in order, and the job fields.
            #[allow(clippy::too_many_arguments)]
            pub fn from_job_fields($($field: $fty,)* job: $crate::spec::JobFields) -> Self {
                Self {
                    $( $field, )*
                    $( $sfield: job.$sfield, )*
                }
            }

            /// The job fields, without the struct's own.
            pub fn into_job_fields(self) -> $crate::spec::JobFields {
                $crate::spec::JobFields {
                    $( $sfield: self.$sfield, )*
                }
            }
        }
    };
    ($($definition:tt)*) => {
        with_job_fields! {
            @define [
                command: $crate::spec::Command,
                #[serde(default)]
                env: std::collections::BTreeMap<String, String>,
                /// Names of `env` entries whose values are secret: never shown in events, API
                /// answers or logs, and masked in the job's own output.
                #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
                secret_env: std::collections::BTreeSet<String>,
                #[serde(default)]
                working_dir: Option<String>,
                #[serde(default = "crate::spec::default_timeout")]
                timeout_secs: u64,
                #[serde(default)]
                resources: $crate::spec::Resources,
                #[serde(default)]
                required_labels: std::collections::BTreeMap<String, String>,
                #[serde(default)]
                priority: i32,
                #[serde(default = "crate::spec::default_attempts")]
                max_attempts: u32,
                #[serde(default)]
                retry_backoff: $crate::spec::Backoff,
                #[serde(default)]
                labels: std::collections::BTreeMap<String, String>,
                /// For idempotent work: when the worker goes silent, hand the attempt back at
                /// once rather than after the worker's lease and kill grace. Two copies may then
                /// run at once.
                #[serde(default, skip_serializing_if = "std::ops::Not::not")]
                requeue_when_unreachable: bool,
                /// A waiting job of a higher priority may stop this one's attempt to take its
                /// place; the job is then queued again without spending a retry.
                #[serde(default, skip_serializing_if = "std::ops::Not::not")]
                preemptible: bool,
            ]
            $($definition)*
        }
    };
}
pub(crate) use with_job_fields;

with_job_fields! {
    /// The fields every job has: what a job spec and a pipeline step share.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct JobFields {}
}

impl JobFields {
    /// Job fields that run `argv`, every other field at its default.
    pub fn exec(argv: &[&str]) -> Self {
        Self {
            command: Command::Exec {
                argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            },
            env: BTreeMap::new(),
            secret_env: BTreeSet::new(),
            working_dir: None,
            timeout_secs: default_timeout(),
            resources: Resources::default(),
            required_labels: BTreeMap::new(),
            priority: 0,
            max_attempts: default_attempts(),
            retry_backoff: Backoff::default(),
            labels: BTreeMap::new(),
            requeue_when_unreachable: false,
            preemptible: false,
        }
    }
}

with_job_fields! {
    /// A job spec as received, not yet validated. Every field is public; turn it into a
    /// [`JobSpec`] with `JobSpec::try_from` to have it checked.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct JobSpecDraft {
        pub name: String,
        #[serde(default)]
        pub idempotency_key: Option<String>,
        /// For a pipeline step: the artifacts to fetch before it starts and to keep after it
        /// succeeds. Set by the pipeline, never by a client (the API has no such field).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub artifacts: Option<ArtifactPlan>,
    }
}

/// The artifacts of one pipeline step's job, for its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactPlan {
    pub run_id: crate::ids::PipelineRunId,
    /// The concrete step the job runs: its artifacts are kept under this name.
    pub step: String,
    /// Globs, relative to the workspace, of the files and folders to keep after success.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub produce: Vec<String>,
    /// Steps of the same run whose artifacts are put in the workspace before the start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consume: Vec<String>,
}

/// Whether `glob` is a usable artifact pattern: relative, inside the workspace, printable.
pub fn is_workspace_glob(glob: &str) -> bool {
    !glob.is_empty()
        && glob.len() <= 1024
        && !glob.starts_with('/')
        && !glob.split('/').any(|part| part == "..")
        && !glob.contains(char::is_control)
}

impl JobSpecDraft {
    /// A draft that runs `argv` with every other field at its default.
    pub fn exec(name: impl Into<String>, argv: &[&str]) -> Self {
        Self::from_job_fields(name.into(), None, None, JobFields::exec(argv))
    }
}

/// A validated job spec. Read its fields through `Deref`; it cannot be changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "JobSpecDraft", into = "JobSpecDraft")]
pub struct JobSpec(JobSpecDraft);

impl Deref for JobSpec {
    type Target = JobSpecDraft;

    fn deref(&self) -> &JobSpecDraft {
        &self.0
    }
}

impl From<JobSpec> for JobSpecDraft {
    fn from(spec: JobSpec) -> Self {
        spec.0
    }
}

impl TryFrom<JobSpecDraft> for JobSpec {
    type Error = ValidationErrors;

    fn try_from(draft: JobSpecDraft) -> Result<Self, Self::Error> {
        let errors: Vec<FieldError> = rules(&draft)
            .into_iter()
            .filter(|rule| !rule.spec.is_satisfied_by(&draft))
            .map(|rule| FieldError::new(rule.field, rule.spec.describe()))
            .collect();
        if errors.is_empty() {
            Ok(JobSpec(draft))
        } else {
            Err(ValidationErrors(errors))
        }
    }
}

/// What secret values are replaced with wherever they would be shown.
pub const SECRET_MASK: &str = "********";

impl JobSpec {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// The values of secret env entries (non-empty ones), for masking output.
    pub fn secret_values(&self) -> Vec<&str> {
        self.secret_env
            .iter()
            .filter_map(|name| self.env.get(name))
            .map(String::as_str)
            .filter(|v| !v.is_empty())
            .collect()
    }

    /// The spec with every secret value replaced by [`SECRET_MASK`]: what events, API answers
    /// and logs show.
    pub fn redacted(&self) -> JobSpec {
        let masked =
            self.map_secrets(|_| Ok::<_, std::convert::Infallible>(SECRET_MASK.to_owned()));
        match masked {
            Ok(spec) => spec,
            Err(never) => match never {},
        }
    }

    /// Whether some env entry is secret.
    pub fn has_secrets(&self) -> bool {
        self.secret_env
            .iter()
            .any(|name| self.env.contains_key(name))
    }

    /// The spec with each secret value replaced by `f(value)`: masked, sealed or opened.
    pub fn map_secrets<E>(
        &self,
        mut f: impl FnMut(&str) -> Result<String, E>,
    ) -> Result<JobSpec, E> {
        let mut draft = self.0.clone();
        for name in &draft.secret_env {
            if let Some(value) = draft.env.get_mut(name) {
                *value = f(value)?;
            }
        }
        Ok(JobSpec(draft))
    }
}

/// One validation rule: the field it speaks of and the specification it must meet.
struct Rule {
    field: String,
    spec: Predicate<JobSpecDraft>,
}

impl Rule {
    fn new(
        field: impl Into<String>,
        requirement: impl Into<String>,
        test: impl Fn(&JobSpecDraft) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            field: field.into(),
            spec: Predicate::new(requirement, test),
        }
    }
}

/// What makes an idempotency key valid, as error messages say it.
pub const IDEMPOTENCY_KEY_RULE: &str =
    "must be 1 to 256 characters without control characters when given";

/// Whether `key` is a valid idempotency key: 1 to 256 characters without control characters.
pub fn is_idempotency_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= 256 && is_printable(key)
}

fn is_printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 256
}

fn is_label_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn is_label_value(s: &str) -> bool {
    s.len() <= 255 && is_printable(s)
}

/// The rules a draft must meet. Map entries get a rule each, so errors name the entry.
fn rules(draft: &JobSpecDraft) -> Vec<Rule> {
    let mut rules = vec![
        Rule::new(
            "name",
            "must be 1 to 128 characters without control characters",
            |d| {
                !d.name.trim().is_empty() && d.name.len() <= MAX_NAME_BYTES && is_printable(&d.name)
            },
        ),
        Rule::new(
            "timeout_secs",
            format!("must be between 1 and {MAX_TIMEOUT_SECS}"),
            |d| (1..=MAX_TIMEOUT_SECS).contains(&d.timeout_secs),
        ),
        Rule::new(
            "max_attempts",
            format!("must be between 1 and {MAX_ATTEMPTS}"),
            |d| (1..=MAX_ATTEMPTS).contains(&d.max_attempts),
        ),
        Rule::new(
            "priority",
            format!("must be between {MIN_PRIORITY} and {MAX_PRIORITY}"),
            |d| (MIN_PRIORITY..=MAX_PRIORITY).contains(&d.priority),
        ),
        Rule::new(
            "resources.cpu_millis",
            "must be at most 1048576 (1024 cores)",
            |d| d.resources.cpu_millis <= 1 << 20,
        ),
        Rule::new(
            "resources.memory_mb",
            "must be at most 16777216 (16 TiB)",
            |d| d.resources.memory_mb <= 1 << 24,
        ),
        Rule::new(
            "retry_backoff.initial_ms",
            "must be between 1 and 3600000",
            |d| (1..=3_600_000).contains(&d.retry_backoff.initial_ms),
        ),
        Rule::new(
            "retry_backoff.max_ms",
            "must be at least initial_ms and at most 86400000",
            |d| {
                d.retry_backoff.max_ms >= d.retry_backoff.initial_ms
                    && d.retry_backoff.max_ms <= 86_400_000
            },
        ),
        Rule::new("idempotency_key", IDEMPOTENCY_KEY_RULE, |d| {
            d.idempotency_key.as_deref().is_none_or(is_idempotency_key)
        }),
        Rule::new(
            "working_dir",
            "must be a relative path inside the job's workspace (no '..', not absolute)",
            |d| {
                d.working_dir.as_deref().is_none_or(|w| {
                    !w.is_empty()
                        && !w.starts_with('/')
                        && !w.split('/').any(|part| part == "..")
                        && !w.contains('\0')
                })
            },
        ),
        Rule::new(
            "env",
            format!("must have at most {MAX_MAP_ENTRIES} entries"),
            |d| d.env.len() <= MAX_MAP_ENTRIES,
        ),
        Rule::new(
            "labels",
            format!("must have at most {MAX_MAP_ENTRIES} entries"),
            |d| d.labels.len() <= MAX_MAP_ENTRIES,
        ),
        Rule::new(
            "required_labels",
            format!("must have at most {MAX_MAP_ENTRIES} entries"),
            |d| d.required_labels.len() <= MAX_MAP_ENTRIES,
        ),
    ];
    match &draft.command {
        Command::Exec { .. } => {
            rules.push(Rule::new(
                "command.argv",
                "must name a program: at least one argument, the first not empty",
                |d| matches!(&d.command, Command::Exec { argv } if argv.first().is_some_and(|a| !a.is_empty())),
            ));
            rules.push(args_rule("command.argv"));
        }
        Command::Script { .. } => {
            rules.push(Rule::new(
                "command.interpreter",
                "must name an interpreter: at least one argument, the first not empty",
                |d| matches!(&d.command, Command::Script { interpreter, .. } if interpreter.first().is_some_and(|a| !a.is_empty())),
            ));
            rules.push(Rule::new(
                "command.script",
                "must not be empty",
                |d| matches!(&d.command, Command::Script { script, .. } if !script.trim().is_empty()),
            ));
            rules.push(args_rule("command.interpreter"));
        }
    }
    for key in draft.env.keys() {
        let k = key.clone();
        rules.push(Rule::new(
            format!("env.{key}"),
            "name must match [A-Za-z_][A-Za-z0-9_]* and must not start with HODEI_ (reserved), value must not contain NUL",
            move |d| {
                is_env_name(&k)
                    && !k.starts_with("HODEI_")
                    && d.env.get(&k).is_some_and(|v| !v.contains('\0'))
            },
        ));
    }
    if let Some(plan) = &draft.artifacts {
        for (i, glob) in plan.produce.iter().enumerate() {
            let g = glob.clone();
            rules.push(Rule::new(
                format!("artifacts.produce[{i}]"),
                "must be a glob relative to the workspace (no '..', not absolute), 1 to 1024 printable characters",
                move |_| is_workspace_glob(&g),
            ));
        }
    }
    for name in &draft.secret_env {
        let n = name.clone();
        rules.push(Rule::new(
            format!("secret_env.{name}"),
            "must name an entry of env",
            move |d| d.env.contains_key(&n),
        ));
    }
    for (field, map) in [
        ("labels", &draft.labels),
        ("required_labels", &draft.required_labels),
    ] {
        for key in map.keys() {
            let k = key.clone();
            let pick = field == "labels";
            rules.push(Rule::new(
                format!("{field}.{key}"),
                "key must be 1 to 63 characters of [A-Za-z0-9-_./], value at most 255 printable characters",
                move |d| {
                    let map = if pick { &d.labels } else { &d.required_labels };
                    is_label_key(&k) && map.get(&k).is_some_and(|v| is_label_value(v))
                },
            ));
        }
    }
    rules
}

fn args_rule(field: &'static str) -> Rule {
    Rule::new(
        field,
        format!(
            "must have at most {MAX_ARGS} arguments of {MAX_ARG_BYTES} bytes in all, without NUL"
        ),
        |d| {
            let args = d.command.argv();
            args.len() <= MAX_ARGS + 1
                && args.iter().map(String::len).sum::<usize>() <= MAX_ARG_BYTES
                && !args.iter().any(|a| a.contains('\0'))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_draft_is_valid() {
        let spec = JobSpec::try_from(JobSpecDraft::exec("hello", &["echo", "hi"])).unwrap();
        assert_eq!(spec.command.argv(), vec!["echo", "hi"]);
        assert_eq!(spec.timeout(), Duration::from_secs(3600));
    }

    #[test]
    fn every_invalid_field_is_reported() {
        let mut d = JobSpecDraft::exec("", &[]);
        d.timeout_secs = 0;
        d.max_attempts = 0;
        d.env.insert("1BAD".into(), "x".into());
        d.env.insert("HODEI_JOB_ID".into(), "x".into());
        d.required_labels.insert("gpu".into(), "true".into());
        d.working_dir = Some("../etc".into());
        let err = JobSpec::try_from(d).unwrap_err();
        let fields: Vec<&str> = err.errors().iter().map(|e| e.field.as_str()).collect();
        for f in [
            "name",
            "timeout_secs",
            "max_attempts",
            "working_dir",
            "command.argv",
            "env.1BAD",
            "env.HODEI_JOB_ID",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        assert!(!fields.contains(&"required_labels.gpu"));
    }

    #[test]
    fn script_commands_append_the_script() {
        let mut d = JobSpecDraft::exec("s", &[]);
        d.command = Command::Script {
            interpreter: vec!["/bin/sh".into(), "-c".into()],
            script: "echo hi".into(),
        };
        let spec = JobSpec::try_from(d).unwrap();
        assert_eq!(spec.command.argv(), vec!["/bin/sh", "-c", "echo hi"]);
    }

    #[test]
    fn json_is_validated_on_deserialise() {
        let bad = r#"{"name":"x","command":{"kind":"exec","argv":[]}}"#;
        assert!(serde_json::from_str::<JobSpec>(bad).is_err());
        let good = r#"{"name":"x","command":{"kind":"exec","argv":["true"]}}"#;
        let spec: JobSpec = serde_json::from_str(good).unwrap();
        assert_eq!(spec.max_attempts, 1);
    }

    #[test]
    fn secrets_are_redacted_and_must_name_env_entries() {
        let mut d = JobSpecDraft::exec("s", &["env"]);
        d.env.insert("TOKEN".into(), "hunter2".into());
        d.env.insert("PLAIN".into(), "visible".into());
        d.secret_env.insert("TOKEN".into());
        let spec = JobSpec::try_from(d.clone()).unwrap();
        assert_eq!(spec.secret_values(), vec!["hunter2"]);
        let shown = serde_json::to_string(&spec.redacted()).unwrap();
        assert!(
            !shown.contains("hunter2") && shown.contains("visible"),
            "{shown}"
        );
        d.secret_env.insert("MISSING".into());
        let err = JobSpec::try_from(d).unwrap_err();
        assert_eq!(err.errors()[0].field, "secret_env.MISSING");
    }

    #[test]
    fn backoff_grows_and_caps() {
        let b = Backoff {
            initial_ms: 100,
            max_ms: 1000,
        };
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(100));
        assert_eq!(b.delay(2, 0.0), Duration::from_millis(200));
        assert_eq!(b.delay(10, 0.0), Duration::from_millis(1000));
        assert_eq!(b.delay(1, 0.5), Duration::from_millis(90));
    }
}
