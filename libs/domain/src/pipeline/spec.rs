//! What a user asks a pipeline to do: [`PipelineSpec`], parsed once from a
//! [`PipelineSpecDraft`] (see [`super::validation`], which reports every error with its path).
//!
//! A validated spec is expanded into concrete steps ([`PipelineSpec::expand`]): a step with a
//! `matrix` becomes one step per combination of its values, and a step that needs it needs
//! every one of them.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;

use serde::{Deserialize, Serialize};

use super::matrix::{combinations, expanded_name, matrix_env};
use crate::error::ValidationErrors;
use crate::ids::PipelineRunId;
use crate::spec::{ArtifactPlan, JobFields, JobSpec, JobSpecDraft, with_job_fields};

/// Most steps a pipeline may declare.
pub const MAX_STEPS: usize = 500;
/// Most concrete steps a pipeline may expand to (matrices included).
pub const MAX_EXPANDED_STEPS: usize = 1000;
/// Most combinations one step's matrix may expand to.
pub const MAX_MATRIX_COMBINATIONS: usize = 256;

/// When a step runs, once every step it needs has ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Only if every step it needs succeeded (the default).
    #[default]
    OnSuccess,
    /// Only if at least one step it needs failed.
    OnFailure,
    /// Whatever happened to the steps it needs, even when the run is cancelled (clean-up).
    Always,
}

impl When {
    pub fn as_str(&self) -> &'static str {
        match self {
            When::OnSuccess => "on_success",
            When::OnFailure => "on_failure",
            When::Always => "always",
        }
    }
}

/// The files a step passes on and takes from earlier steps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepArtifacts {
    /// Globs, relative to the step's workspace, of files and folders kept after it succeeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub produce: Vec<String>,
    /// Steps whose artifacts are put in this step's workspace before it starts: each must be
    /// one the step needs (directly or not), produce something, and have no matrix.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub consume: Vec<String>,
}

impl StepArtifacts {
    pub fn is_empty(&self) -> bool {
        self.produce.is_empty() && self.consume.is_empty()
    }
}

with_job_fields! {
    /// One step as written: its place in the graph, then the fields of its job (every field of
    /// [`JobSpecDraft`] but the name, which is the step's, and the idempotency key, which is
    /// the pipeline's).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct StepDraft {
        /// Unique in the pipeline: `[A-Za-z0-9_-]`, 1 to 64 characters.
        pub name: String,
        /// Steps that must end before this one starts.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub needs: Vec<String>,
        #[serde(default)]
        pub when: When,
        /// Parameters to expand this step by: one step per combination of values, each with
        /// `MATRIX_<KEY>` (key upper-cased) set to its value in its env.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub matrix: BTreeMap<String, Vec<String>>,
        #[serde(default, skip_serializing_if = "StepArtifacts::is_empty")]
        pub artifacts: StepArtifacts,
    }
}

impl StepDraft {
    /// A step that runs `argv`, with every other field at its default.
    pub fn exec(name: impl Into<String>, argv: &[&str]) -> Self {
        Self::from_job_fields(
            name.into(),
            Vec::new(),
            When::default(),
            BTreeMap::new(),
            StepArtifacts::default(),
            JobFields::exec(argv),
        )
    }

    /// This step `needs` the given steps.
    pub fn needing(mut self, needs: &[&str]) -> Self {
        self.needs = needs.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// The job spec draft of one concrete step named `name`, with the pipeline's env under the
    /// step's own and `extra_env` (matrix values) over both, and the step's artifacts kept
    /// under run `run`.
    pub(super) fn job_draft(
        &self,
        name: String,
        pipeline_env: &BTreeMap<String, String>,
        extra_env: &BTreeMap<String, String>,
        run: PipelineRunId,
    ) -> JobSpecDraft {
        let artifacts = (!self.artifacts.is_empty()).then(|| ArtifactPlan {
            run_id: run,
            step: name.clone(),
            produce: self.artifacts.produce.clone(),
            consume: self.artifacts.consume.clone(),
        });
        let mut env = pipeline_env.clone();
        env.extend(self.env.clone());
        env.extend(extra_env.clone());
        JobSpecDraft {
            name,
            env,
            artifacts,
            ..self.own_job()
        }
    }

    /// The step's job fields as written, named after the step: without the pipeline's env,
    /// matrix values or artifacts.
    pub fn own_job(&self) -> JobSpecDraft {
        JobSpecDraft::from_job_fields(
            self.name.clone(),
            None,
            None,
            self.clone().into_job_fields(),
        )
    }
}

/// A pipeline spec as received, not yet validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpecDraft {
    pub name: String,
    /// Env every step gets, under its own.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub steps: Vec<StepDraft>,
    /// Whether one failed step cancels the steps still running or waiting (except `always`
    /// and `on_failure` steps).
    #[serde(default)]
    pub fail_fast: bool,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A validated pipeline spec. Read its fields through `Deref`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PipelineSpecDraft", into = "PipelineSpecDraft")]
pub struct PipelineSpec(PipelineSpecDraft);

impl Deref for PipelineSpec {
    type Target = PipelineSpecDraft;

    fn deref(&self) -> &PipelineSpecDraft {
        &self.0
    }
}

impl From<PipelineSpec> for PipelineSpecDraft {
    fn from(spec: PipelineSpec) -> Self {
        spec.0
    }
}

/// One concrete step after matrix expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandedStep {
    /// `build`, or `test[os=linux,version=1]` for one combination of a matrix.
    pub name: String,
    /// The step as written this one comes from.
    pub base: String,
    /// Concrete steps this one needs.
    pub needs: Vec<String>,
    pub when: When,
    /// The job this step runs.
    pub job: JobSpec,
}

impl TryFrom<PipelineSpecDraft> for PipelineSpec {
    type Error = ValidationErrors;

    fn try_from(draft: PipelineSpecDraft) -> Result<Self, Self::Error> {
        let errors = super::validation::validate(&draft);
        if errors.is_empty() {
            Ok(PipelineSpec(draft))
        } else {
            Err(ValidationErrors(errors))
        }
    }
}

impl PipelineSpec {
    /// The concrete steps of run `run`, matrices expanded, in the order written.
    pub fn expand(&self, run: PipelineRunId) -> Vec<ExpandedStep> {
        let secrets = self.pipeline_secrets();
        let names: BTreeMap<&str, Vec<String>> = self
            .steps
            .iter()
            .map(|s| {
                let names = combinations(&s.matrix)
                    .iter()
                    .map(|c| expanded_name(&s.name, c))
                    .collect();
                (s.name.as_str(), names)
            })
            .collect();
        let mut out = Vec::new();
        for step in &self.steps {
            let needs: Vec<String> = step
                .needs
                .iter()
                .flat_map(|n| names.get(n.as_str()).cloned().unwrap_or_default())
                .collect();
            for combo in combinations(&step.matrix) {
                let name = expanded_name(&step.name, &combo);
                let mut draft = step.job_draft(name.clone(), &self.env, &matrix_env(&combo), run);
                // A pipeline-level value that any step calls secret is secret in every step.
                draft.secret_env.extend(secrets.iter().cloned());
                // Validation checked the first combination's job and the longest name any
                // combination gets; the others differ only in their names and matrix values,
                // which were checked too, so this cannot fail. (A failure would not panic: the
                // step would be missing, and its dependants would take it as skipped.)
                let Ok(job) = JobSpec::try_from(draft) else {
                    continue;
                };
                out.push(ExpandedStep {
                    name,
                    base: step.name.clone(),
                    needs: needs.clone(),
                    when: step.when,
                    job,
                });
            }
        }
        out
    }

    /// The entries of the pipeline's own `env` that some step names in its `secret_env`:
    /// secret wherever they appear.
    pub fn pipeline_secrets(&self) -> BTreeSet<String> {
        self.steps
            .iter()
            .flat_map(|s| s.secret_env.iter())
            .filter(|name| self.env.contains_key(*name))
            .cloned()
            .collect()
    }

    /// The spec with every secret value masked, in every step and in the pipeline's own `env`
    /// (an entry any step calls secret): what events and answers show.
    pub fn redacted(&self) -> PipelineSpec {
        let masked = self.map_secrets(|_| {
            Ok::<_, std::convert::Infallible>(crate::spec::SECRET_MASK.to_owned())
        });
        match masked {
            Ok(spec) => spec,
            Err(never) => match never {},
        }
    }

    /// Whether some env entry, of a step or of the pipeline, is secret.
    pub fn has_secrets(&self) -> bool {
        !self.pipeline_secrets().is_empty()
            || self
                .steps
                .iter()
                .any(|s| s.secret_env.iter().any(|name| s.env.contains_key(name)))
    }

    /// The spec with each secret value, in every step and in the pipeline's own `env`,
    /// replaced by `f(value)`: masked or sealed.
    pub fn map_secrets<E>(
        &self,
        mut f: impl FnMut(&str) -> Result<String, E>,
    ) -> Result<PipelineSpec, E> {
        let secrets = self.pipeline_secrets();
        let mut draft = self.0.clone();
        for name in &secrets {
            if let Some(value) = draft.env.get_mut(name) {
                *value = f(value)?;
            }
        }
        for step in &mut draft.steps {
            for name in &step.secret_env {
                if let Some(value) = step.env.get_mut(name) {
                    *value = f(value)?;
                }
            }
        }
        Ok(PipelineSpec(draft))
    }
}

/// A pipeline named `ci` of `steps`, every other field at its default: for tests.
#[cfg(test)]
pub(super) fn pipeline(steps: Vec<StepDraft>) -> PipelineSpecDraft {
    PipelineSpecDraft {
        name: "ci".to_owned(),
        env: BTreeMap::new(),
        steps,
        fail_fast: false,
        idempotency_key: None,
        labels: BTreeMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipeline_secret_named_by_one_step_is_masked_everywhere() {
        let mut uses = StepDraft::exec("deploy", &["true"]);
        uses.secret_env.insert("TOKEN".into());
        let other = StepDraft::exec("notify", &["true"]);
        let mut draft = pipeline(vec![uses, other]);
        draft.env.insert("TOKEN".into(), "s3cr3t-value".into());
        draft.env.insert("REGION".into(), "eu".into());
        let spec = PipelineSpec::try_from(draft).unwrap();

        let shown = serde_json::to_string(&spec.redacted()).unwrap();
        assert!(!shown.contains("s3cr3t-value"), "{shown}");
        assert!(shown.contains("eu"), "{shown}");
        for step in spec.expand(PipelineRunId::new()) {
            assert!(step.job.secret_env.contains("TOKEN"), "{}", step.name);
            // The job runs with the real value and shows the mask.
            assert_eq!(step.job.env["TOKEN"], "s3cr3t-value");
            let shown = serde_json::to_string(&step.job.redacted()).unwrap();
            assert!(!shown.contains("s3cr3t-value"), "{shown}");
        }
    }

    fn fields(draft: PipelineSpecDraft) -> Vec<String> {
        PipelineSpec::try_from(draft)
            .unwrap_err()
            .0
            .into_iter()
            .map(|f| f.field)
            .collect()
    }

    #[test]
    fn a_diamond_is_valid_and_expands_in_order() {
        let spec = PipelineSpec::try_from(pipeline(vec![
            StepDraft::exec("a", &["true"]),
            StepDraft::exec("b", &["true"]).needing(&["a"]),
            StepDraft::exec("c", &["true"]).needing(&["a"]),
            StepDraft::exec("d", &["true"]).needing(&["b", "c"]),
        ]))
        .unwrap();
        let steps = spec.expand(PipelineRunId::new());
        let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        assert_eq!(steps[3].needs, ["b", "c"]);
        assert_eq!(steps[3].job.name, "d");
    }

    #[test]
    fn every_error_is_reported_with_its_path() {
        let mut bad = StepDraft::exec("build", &["true"]).needing(&["nope", "build"]);
        bad.timeout_secs = 0;
        let errors = fields(pipeline(vec![
            bad,
            StepDraft::exec("build", &["true"]),
            StepDraft::exec("bad name!", &[""]),
        ]));
        assert!(
            errors.contains(&"steps.build.needs[0]".to_owned()),
            "{errors:?}"
        );
        assert!(
            errors.contains(&"steps.build.needs[1]".to_owned()),
            "{errors:?}"
        );
        assert!(
            errors.contains(&"steps.build.timeout_secs".to_owned()),
            "{errors:?}"
        );
        assert!(errors.contains(&"steps[1].name".to_owned()), "{errors:?}");
        assert!(errors.contains(&"steps[2].name".to_owned()), "{errors:?}");
        assert!(
            errors.contains(&"steps.bad name!.command.argv".to_owned()),
            "{errors:?}"
        );
        assert!(fields(pipeline(vec![])).contains(&"steps".to_owned()));
    }

    #[test]
    fn cycles_are_refused_naming_the_cycle() {
        let err = PipelineSpec::try_from(pipeline(vec![
            StepDraft::exec("a", &["true"]).needing(&["c"]),
            StepDraft::exec("b", &["true"]).needing(&["a"]),
            StepDraft::exec("c", &["true"]).needing(&["b"]),
        ]))
        .unwrap_err();
        let cycle = err
            .0
            .iter()
            .find(|f| f.reason.starts_with("cycle"))
            .unwrap();
        assert_eq!(cycle.field, "steps.a.needs");
        assert_eq!(cycle.reason, "cycle: a -> c -> b -> a");
    }

    #[test]
    fn a_matrix_expands_to_every_combination_with_its_values_in_env() {
        let mut test = StepDraft::exec("test", &["true"]).needing(&["build"]);
        test.matrix = BTreeMap::from([
            ("os".to_owned(), vec!["linux".to_owned(), "mac".to_owned()]),
            ("version".to_owned(), vec!["1".to_owned(), "2".to_owned()]),
        ]);
        let spec = PipelineSpec::try_from(pipeline(vec![
            StepDraft::exec("build", &["true"]),
            test,
            StepDraft::exec("deploy", &["true"]).needing(&["test"]),
        ]))
        .unwrap();
        let steps = spec.expand(PipelineRunId::new());
        assert_eq!(steps.len(), 6);
        assert_eq!(steps[1].name, "test[os=linux,version=1]");
        assert_eq!(steps[4].name, "test[os=mac,version=2]");
        assert_eq!(
            steps[4].job.env.get("MATRIX_OS").map(String::as_str),
            Some("mac")
        );
        assert_eq!(
            steps[4].job.env.get("MATRIX_VERSION").map(String::as_str),
            Some("2")
        );
        assert_eq!(steps[5].needs.len(), 4);
        assert!(
            steps
                .iter()
                .filter(|s| s.base == "test")
                .all(|s| s.needs == ["build"])
        );
    }

    #[test]
    fn bad_matrices_are_refused() {
        let mut test = StepDraft::exec("test", &["true"]);
        test.matrix = BTreeMap::from([
            ("os".to_owned(), vec![]),
            ("bad-key".to_owned(), vec!["x".to_owned(), "x".to_owned()]),
        ]);
        let errors = fields(pipeline(vec![test]));
        assert!(
            errors.contains(&"steps.test.matrix.os".to_owned()),
            "{errors:?}"
        );
        assert!(
            errors.contains(&"steps.test.matrix.bad-key".to_owned()),
            "{errors:?}"
        );
    }

    #[test]
    fn a_huge_matrix_is_refused_before_anything_is_expanded() {
        // 10^8 combinations: expanding them would take gigabytes; counting takes nothing.
        let mut test = StepDraft::exec("test", &["true"]);
        test.matrix = (0..8)
            .map(|k| (format!("k{k}"), (0..10).map(|v| v.to_string()).collect()))
            .collect();
        let errors = fields(pipeline(vec![test]));
        assert!(
            errors.contains(&"steps.test.matrix".to_owned()),
            "{errors:?}"
        );
    }

    #[test]
    fn pipeline_env_is_under_step_env() {
        let mut draft = pipeline(vec![{
            let mut s = StepDraft::exec("a", &["true"]);
            s.env.insert("B".to_owned(), "step".to_owned());
            s
        }]);
        draft.env.insert("A".to_owned(), "pipeline".to_owned());
        draft.env.insert("B".to_owned(), "pipeline".to_owned());
        let steps = PipelineSpec::try_from(draft)
            .unwrap()
            .expand(PipelineRunId::new());
        assert_eq!(
            steps[0].job.env.get("A").map(String::as_str),
            Some("pipeline")
        );
        assert_eq!(steps[0].job.env.get("B").map(String::as_str), Some("step"));
    }

    #[test]
    fn artifacts_are_consumed_only_from_upstream_producers() {
        let mut build = StepDraft::exec("build", &["true"]);
        build.artifacts.produce = vec!["out/*.bin".to_owned()];
        let mut lint = StepDraft::exec("lint", &["true"]);
        lint.artifacts.produce = vec!["../escape".to_owned()];
        let mut deploy = StepDraft::exec("deploy", &["true"]).needing(&["build"]);
        deploy.artifacts.consume = vec!["build".into(), "lint".into(), "ghost".into()];
        let errors = PipelineSpec::try_from(pipeline(vec![build.clone(), lint, deploy]))
            .unwrap_err()
            .0;
        let paths: Vec<(&str, &str)> = errors
            .iter()
            .map(|e| (e.field.as_str(), e.reason.as_str()))
            .collect();
        assert!(
            paths
                .iter()
                .any(|(f, _)| *f == "steps.lint.artifacts.produce[0]"),
            "{paths:?}"
        );
        assert!(
            paths
                .iter()
                .any(|(f, r)| *f == "steps.deploy.artifacts.consume[1]" && r.contains("needs")),
            "{paths:?}"
        );
        assert!(
            paths
                .iter()
                .any(|(f, _)| *f == "steps.deploy.artifacts.consume[2]"),
            "{paths:?}"
        );
        assert!(
            !paths
                .iter()
                .any(|(f, _)| *f == "steps.deploy.artifacts.consume[0]"),
            "{paths:?}"
        );

        let mut ok = StepDraft::exec("deploy", &["true"]).needing(&["build"]);
        ok.artifacts.consume = vec!["build".into()];
        let run = PipelineRunId::new();
        let steps = PipelineSpec::try_from(pipeline(vec![build, ok]))
            .unwrap()
            .expand(run);
        let plan = steps[1].job.artifacts.clone().unwrap();
        assert_eq!(
            (plan.run_id, plan.step.as_str(), plan.consume.as_slice()),
            (run, "deploy", ["build".to_owned()].as_slice())
        );
        assert_eq!(
            steps[0].job.artifacts.as_ref().unwrap().produce,
            ["out/*.bin"]
        );
    }

    #[test]
    fn yaml_shaped_json_is_validated_on_deserialise() {
        let ok = r#"{"name":"ci","steps":[{"name":"a","command":{"kind":"exec","argv":["true"]}},
                     {"name":"b","needs":["a"],"when":"always","command":{"kind":"exec","argv":["true"]}}]}"#;
        let spec: PipelineSpec = serde_json::from_str(ok).unwrap();
        assert_eq!(spec.steps[1].when, When::Always);
        let unknown = r#"{"name":"ci","steps":[{"name":"a","nedds":["x"],"command":{"kind":"exec","argv":["true"]}}]}"#;
        assert!(serde_json::from_str::<PipelineSpec>(unknown).is_err());
    }
}
