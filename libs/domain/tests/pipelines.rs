//! Property tests of pipeline runs: random DAGs, steps ending in random order and outcomes,
//! cancels at random moments. A step is only ever queued once every step it needs has ended,
//! never twice, every run ends with every step ended, and replaying its events rebuilds it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use hodei_domain::{
    JobId, JobState, PipelineEvent, PipelineRun, PipelineRunId, PipelineSpec, PipelineSpecDraft,
    PipelineState, StepDraft, StepState, TenantId, When,
};
use proptest::prelude::*;

/// A random DAG of `n` steps: step i may need any of the steps before it.
fn dag(n: usize) -> impl Strategy<Value = Vec<StepDraft>> {
    let needs = proptest::collection::vec(proptest::collection::btree_set(0usize..n, 0..4), n);
    let whens = proptest::collection::vec(
        prop_oneof![6 => Just(When::OnSuccess), 1 => Just(When::OnFailure), 1 => Just(When::Always)],
        n,
    );
    (needs, whens).prop_map(move |(needs, whens)| {
        (0..n)
            .map(|i| {
                let names: Vec<String> = needs[i]
                    .iter()
                    .filter(|j| **j < i)
                    .map(|j| format!("s{j}"))
                    .collect();
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                let mut step = StepDraft::exec(format!("s{i}"), &["true"]).needing(&refs);
                step.when = whens[i];
                step
            })
            .collect()
    })
}

fn outcome() -> impl Strategy<Value = JobState> {
    prop_oneof![
        6 => Just(JobState::Succeeded),
        2 => Just(JobState::Failed),
        1 => Just(JobState::TimedOut),
        1 => Just(JobState::Cancelled),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_dags_complete_in_dependency_order(
        steps in dag(50),
        fail_fast in any::<bool>(),
        picks in proptest::collection::vec((any::<prop::sample::Index>(), outcome()), 200),
        cancel_at in proptest::option::of(0usize..60),
    ) {
        let spec = PipelineSpec::try_from(PipelineSpecDraft {
            name: "random".to_owned(),
            env: BTreeMap::new(),
            steps,
            fail_fast,
            idempotency_key: None,
            labels: BTreeMap::new(),
        })
        .unwrap();
        let now = Utc::now();
        let (mut run, first) = PipelineRun::submit(PipelineRunId::new(), TenantId::default(), spec, now);
        let mut events: Vec<PipelineEvent> = vec![first];
        let mut effects = run.advance(now, JobId::new).unwrap();
        // Jobs under way: (job, step). A cancelled job ends `cancelled` at its next pick.
        let mut active: Vec<(JobId, String)> = Vec::new();
        let mut to_cancel: BTreeSet<JobId> = BTreeSet::new();
        let mut queued_ever: BTreeSet<String> = BTreeSet::new();
        let mut picks = picks.into_iter();
        for round in 0.. {
            for (step, job) in &effects.jobs_to_create {
                // Every need has ended before a step is queued, and no step is queued twice.
                let s = run.steps().iter().find(|s| &s.name == step).unwrap();
                for need in &s.needs {
                    let n = run.steps().iter().find(|x| &x.name == need).unwrap();
                    prop_assert!(n.state.is_terminal(), "{step} queued before {need} ended");
                }
                prop_assert!(queued_ever.insert(step.clone()), "{step} queued twice");
                active.push((*job, step.clone()));
            }
            to_cancel.extend(effects.jobs_to_cancel.iter().copied());
            events.append(&mut effects.events);
            if cancel_at == Some(round) && !run.state().is_terminal() {
                effects = run.cancel("random cancel", now).unwrap();
                continue;
            }
            if active.is_empty() {
                break;
            }
            let (at, state) = match picks.next() {
                Some((index, state)) => (index.index(active.len()), state),
                None => (0, JobState::Succeeded),
            };
            let (job, _) = active.remove(at);
            let state = if to_cancel.contains(&job) { JobState::Cancelled } else { state };
            if state == JobState::Succeeded && round % 3 == 0 {
                events.extend(run.job_started(job, now).unwrap());
            }
            effects = run.job_ended(job, state, None, now).unwrap();
        }
        prop_assert!(run.state().is_terminal(), "run ended {}", run.state());
        prop_assert!(run.steps().iter().all(|s| s.state.is_terminal()));
        if cancel_at.is_some() && run.state() == PipelineState::Cancelled {
            prop_assert!(run.cancel_requested());
        }
        if run.state() == PipelineState::Succeeded {
            prop_assert!(run.steps().iter().all(|s| matches!(s.state, StepState::Succeeded | StepState::Skipped)));
        }
        prop_assert_eq!(PipelineRun::from_events(&events).unwrap(), run);
    }
}
