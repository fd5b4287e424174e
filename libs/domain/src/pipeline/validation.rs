//! Validation of a pipeline as written: every error with its path (`steps.build.needs[1]`,
//! `steps.test.timeout_secs`): duplicate names, unknown or cyclic `needs`, bad matrices,
//! artifacts consumed from steps that cannot have produced them, and every invalid field of
//! every step's job spec.

use std::collections::{BTreeMap, BTreeSet};

use super::dag::find_cycle;
use super::matrix::{
    combination_count, expanded_name, first_combination, is_matrix_key, longest_combination,
    matrix_env,
};
use super::spec::{
    MAX_EXPANDED_STEPS, MAX_MATRIX_COMBINATIONS, MAX_STEPS, PipelineSpecDraft, StepDraft,
};
use crate::error::FieldError;
use crate::ids::PipelineRunId;
use crate::spec::{JobSpec, JobSpecDraft, MAX_NAME_BYTES};

fn is_step_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

pub(super) fn validate(draft: &PipelineSpecDraft) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if draft.name.trim().is_empty()
        || draft.name.len() > 128
        || draft.name.contains(char::is_control)
    {
        errors.push(FieldError::new(
            "name",
            "must be 1 to 128 characters without control characters",
        ));
    }
    if draft
        .idempotency_key
        .as_deref()
        .is_some_and(|k| k.is_empty() || k.len() > 256 || k.contains(char::is_control))
    {
        errors.push(FieldError::new(
            "idempotency_key",
            "must be 1 to 256 characters without control characters when given",
        ));
    }
    if draft.steps.is_empty() {
        errors.push(FieldError::new("steps", "must have at least one step"));
    }
    if draft.steps.len() > MAX_STEPS {
        errors.push(FieldError::new(
            "steps",
            format!("must have at most {MAX_STEPS} steps"),
        ));
    }
    // Pipeline-level env and labels are checked as a job spec would check them.
    let mut probe = JobSpecDraft::exec(draft.name.clone(), &["true"]);
    probe.env = draft.env.clone();
    probe.labels = draft.labels.clone();
    if let Err(e) = JobSpec::try_from(probe) {
        errors.extend(
            e.0.into_iter()
                .filter(|f| f.field.starts_with("env") || f.field.starts_with("labels")),
        );
    }

    let mut first_index: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, step) in draft.steps.iter().enumerate() {
        if !is_step_name(&step.name) {
            errors.push(FieldError::new(
                format!("steps[{i}].name"),
                "must be 1 to 64 characters of [A-Za-z0-9_-]",
            ));
        }
        if let Some(first) = first_index.get(step.name.as_str()) {
            errors.push(FieldError::new(
                format!("steps[{i}].name"),
                format!("duplicate step name '{}' (also steps[{first}])", step.name),
            ));
        } else {
            first_index.insert(&step.name, i);
        }
    }

    let mut expanded = 0usize;
    for step in &draft.steps {
        let at = format!("steps.{}", step.name);
        let mut seen = BTreeSet::new();
        for (j, need) in step.needs.iter().enumerate() {
            if need == &step.name {
                errors.push(FieldError::new(
                    format!("{at}.needs[{j}]"),
                    "a step cannot need itself",
                ));
            } else if !first_index.contains_key(need.as_str()) {
                errors.push(FieldError::new(
                    format!("{at}.needs[{j}]"),
                    format!("unknown step '{need}'"),
                ));
            }
            if !seen.insert(need) {
                errors.push(FieldError::new(
                    format!("{at}.needs[{j}]"),
                    format!("'{need}' is listed twice"),
                ));
            }
        }
        // Each key becomes `MATRIX_<KEY>` in the jobs' environment: two keys that differ
        // only in case would set the same variable, one value silently lost.
        let mut variables: BTreeMap<String, &String> = BTreeMap::new();
        for (key, values) in &step.matrix {
            if !is_matrix_key(key) {
                errors.push(FieldError::new(
                    format!("{at}.matrix.{key}"),
                    "key must match [A-Za-z_][A-Za-z0-9_]*",
                ));
            }
            if let Some(other) = variables.insert(key.to_ascii_uppercase(), key) {
                errors.push(FieldError::new(
                    format!("{at}.matrix.{key}"),
                    format!(
                        "differs from key {other} only in case: both would set MATRIX_{}",
                        key.to_ascii_uppercase()
                    ),
                ));
            }
            if values.is_empty() {
                errors.push(FieldError::new(
                    format!("{at}.matrix.{key}"),
                    "must list at least one value",
                ));
            }
            let distinct: BTreeSet<&String> = values.iter().collect();
            if distinct.len() != values.len() {
                errors.push(FieldError::new(
                    format!("{at}.matrix.{key}"),
                    "values must be distinct",
                ));
            }
            for (k, v) in values.iter().enumerate() {
                if v.is_empty()
                    || v.len() > 64
                    || v.contains(char::is_control)
                    || v.contains([',', '=', '[', ']'])
                {
                    errors.push(FieldError::new(
                        format!("{at}.matrix.{key}[{k}]"),
                        "must be 1 to 64 printable characters without , = [ ]",
                    ));
                }
            }
        }
        let combos = combination_count(&step.matrix);
        if combos > MAX_MATRIX_COMBINATIONS {
            errors.push(FieldError::new(
                format!("{at}.matrix"),
                format!("expands to {combos} steps, at most {MAX_MATRIX_COMBINATIONS} allowed"),
            ));
        }
        expanded = expanded.saturating_add(combos);
        // The step's job spec, checked with every combination's env applied to the first.
        // Counted above and taken without expanding: a matrix of a million combinations
        // must cost nothing before it is refused.
        let first_combo = first_combination(&step.matrix);
        let job = step.job_draft(
            expanded_name(&step.name, &first_combo),
            &draft.env,
            &matrix_env(&first_combo),
            PipelineRunId::from_uuid(uuid::Uuid::nil()),
        );
        if let Err(e) = JobSpec::try_from(job) {
            for f in e.0 {
                // The job's name is the step's, reported under steps[i].name above, and its
                // length under `matrix` below.
                if f.field != "name" {
                    errors.push(FieldError::new(format!("{at}.{}", f.field), f.reason));
                }
            }
        }
        // Every combination's job is named `step[key=value,...]`: the longest must fit a job's
        // name, or its combination could not become a job.
        let longest = expanded_name(&step.name, &longest_combination(&step.matrix)).len();
        if longest > MAX_NAME_BYTES {
            errors.push(FieldError::new(
                format!("{at}.matrix"),
                format!(
                    "names steps of up to {longest} bytes (`{}[key=value,...]`), at most \
                     {MAX_NAME_BYTES} allowed: shorten the step's name or the matrix's keys or values",
                    step.name
                ),
            ));
        }
    }
    if expanded > MAX_EXPANDED_STEPS {
        errors.push(FieldError::new(
            "steps",
            format!("expand to {expanded} steps, at most {MAX_EXPANDED_STEPS} allowed"),
        ));
    }

    // A duplicate name (reported above) does not hide the first step's needs.
    let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for s in &draft.steps {
        graph
            .entry(s.name.as_str())
            .or_insert_with(|| s.needs.iter().map(String::as_str).collect());
    }
    let cycle = find_cycle(&graph);
    if cycle.is_none() {
        errors.extend(consume_errors(draft, &graph));
    }
    if let Some(cycle) = cycle {
        let first = cycle.first().cloned().unwrap_or_default();
        errors.push(FieldError::new(
            format!("steps.{first}.needs"),
            format!("cycle: {}", cycle.join(" -> ")),
        ));
    }
    errors
}

/// What is wrong with each step's `artifacts.consume` (in a graph without cycles).
fn consume_errors(draft: &PipelineSpecDraft, graph: &BTreeMap<&str, Vec<&str>>) -> Vec<FieldError> {
    let by_name: BTreeMap<&str, &StepDraft> =
        draft.steps.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut errors = Vec::new();
    for step in &draft.steps {
        if step.artifacts.consume.is_empty() {
            continue;
        }
        // Every step this one needs, directly or not.
        let mut upstream = BTreeSet::new();
        let mut todo: Vec<&str> = graph.get(step.name.as_str()).cloned().unwrap_or_default();
        while let Some(n) = todo.pop() {
            if upstream.insert(n) {
                todo.extend(graph.get(n).cloned().unwrap_or_default());
            }
        }
        for (j, from) in step.artifacts.consume.iter().enumerate() {
            let field = format!("steps.{}.artifacts.consume[{j}]", step.name);
            let reason = match by_name.get(from.as_str()) {
                None => Some(format!("unknown step '{from}'")),
                Some(_) if !upstream.contains(from.as_str()) => Some(format!(
                    "'{from}' must be among the steps this one needs, so it has ended first"
                )),
                Some(p) if p.artifacts.produce.is_empty() => {
                    Some(format!("'{from}' produces no artifacts"))
                }
                Some(p) if !p.matrix.is_empty() => Some(format!(
                    "'{from}' has a matrix: consume one step, not a matrix of them"
                )),
                Some(_) => None,
            };
            if let Some(reason) = reason {
                errors.push(FieldError::new(field, reason));
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::super::spec::{PipelineSpec, When, pipeline};
    use super::*;

    /// The fields `draft` is refused for, with their reasons.
    fn refused(draft: PipelineSpecDraft) -> BTreeMap<String, String> {
        PipelineSpec::try_from(draft)
            .unwrap_err()
            .0
            .into_iter()
            .map(|f| (f.field, f.reason))
            .collect()
    }

    #[test]
    fn a_matrix_whose_step_names_would_be_too_long_is_refused() {
        let mut wide = StepDraft::exec("a-step-with-a-rather-long-name", &["true"]);
        // The first combination's name fits (its values are short); the longest does not.
        wide.matrix.insert(
            "platform_under_test".into(),
            vec!["x".into(), "p".repeat(64)],
        );
        wide.matrix
            .insert("toolchain".into(), vec!["y".into(), "t".repeat(40)]);
        let errors = refused(pipeline(vec![wide]));
        let reason = &errors["steps.a-step-with-a-rather-long-name.matrix"];
        assert!(reason.contains("at most 128"), "{reason}");
        let mut fits = StepDraft::exec("a-step-with-a-rather-long-name", &["true"]);
        fits.matrix
            .insert("os".into(), vec!["linux".into(), "p".repeat(64)]);
        assert!(PipelineSpec::try_from(pipeline(vec![fits])).is_ok());
    }

    #[test]
    fn matrix_keys_that_differ_only_in_case_are_refused() {
        let mut step = StepDraft::exec("test", &["true"]);
        step.matrix.insert("OS".into(), vec!["linux".into()]);
        step.matrix.insert("os".into(), vec!["mac".into()]);
        let errors = refused(pipeline(vec![step]));
        let reason = &errors["steps.test.matrix.os"];
        assert!(reason.contains("MATRIX_OS"), "{errors:?}");
    }

    #[test]
    fn the_pipeline_s_own_fields_are_checked() {
        let mut draft = pipeline(vec![StepDraft::exec("a", &["true"])]);
        draft.name = " ".to_owned();
        draft.idempotency_key = Some(String::new());
        draft.env.insert("BAD KEY".into(), "v".into());
        draft.labels.insert(String::new(), "v".into());
        let errors = refused(draft);
        assert!(errors["name"].contains("1 to 128"), "{errors:?}");
        assert!(errors["idempotency_key"].contains("1 to 256"), "{errors:?}");
        assert!(errors.keys().any(|f| f.starts_with("env")), "{errors:?}");
        assert!(errors.keys().any(|f| f.starts_with("labels")), "{errors:?}");

        let too_many = (0..=MAX_STEPS)
            .map(|i| StepDraft::exec(format!("s{i}"), &["true"]))
            .collect();
        assert!(refused(pipeline(too_many))["steps"].contains("at most"));
    }

    #[test]
    fn needs_listed_twice_and_bad_matrix_values_are_refused_at_their_index() {
        let mut matrixed = StepDraft::exec("test", &["true"]);
        matrixed.matrix.insert(
            "os".into(),
            vec!["linux".into(), "a,b".into(), String::new()],
        );
        let twice = StepDraft::exec("b", &["true"]).needing(&["test", "test"]);
        let errors = refused(pipeline(vec![matrixed, twice]));
        assert!(
            errors["steps.b.needs[1]"].contains("listed twice"),
            "{errors:?}"
        );
        assert!(errors.contains_key("steps.test.matrix.os[1]"), "{errors:?}");
        assert!(errors.contains_key("steps.test.matrix.os[2]"), "{errors:?}");
        assert!(
            !errors.contains_key("steps.test.matrix.os[0]"),
            "{errors:?}"
        );
    }

    #[test]
    fn artifacts_come_only_from_a_single_producing_step() {
        let mut silent = StepDraft::exec("silent", &["true"]);
        silent.when = When::Always;
        let mut matrixed = StepDraft::exec("many", &["true"]);
        matrixed
            .matrix
            .insert("n".into(), vec!["1".into(), "2".into()]);
        matrixed.artifacts.produce = vec!["out/".into()];
        let mut consumer = StepDraft::exec("use", &["true"]).needing(&["silent", "many"]);
        consumer.artifacts.consume = vec!["silent".into(), "many".into()];
        let errors = refused(pipeline(vec![silent, matrixed, consumer]));
        assert!(
            errors["steps.use.artifacts.consume[0]"].contains("produces no artifacts"),
            "{errors:?}"
        );
        assert!(
            errors["steps.use.artifacts.consume[1]"].contains("has a matrix"),
            "{errors:?}"
        );
        assert_eq!(When::Always.as_str(), "always");
        assert_eq!(When::OnFailure.as_str(), "on_failure");
        assert_eq!(When::OnSuccess.as_str(), "on_success");
    }
}
