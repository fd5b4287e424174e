//! Property tests: random command sequences against the aggregates.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use chrono::Utc;
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{
    AttemptId, AttemptNumber, AttemptOutcome, Job, JobId, JobSpec, JobState, Resources, TenantId,
    Worker, WorkerId,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum JobCmd {
    Assign,
    Start(u32),
    Finish(u32, AttemptOutcome),
    Cancel,
    FailUnplaceable,
}

fn outcome() -> impl Strategy<Value = AttemptOutcome> {
    prop_oneof![
        (-2i32..4).prop_map(|code| AttemptOutcome::Exited { code }),
        (1i32..16).prop_map(|signal| AttemptOutcome::Signalled { signal }),
        Just(AttemptOutcome::TimedOut),
        Just(AttemptOutcome::Cancelled),
        Just(AttemptOutcome::Lost {
            reason: "gone".into()
        }),
    ]
}

fn job_cmd() -> impl Strategy<Value = JobCmd> {
    prop_oneof![
        3 => Just(JobCmd::Assign),
        2 => (0u32..5).prop_map(JobCmd::Start),
        3 => ((0u32..5), outcome()).prop_map(|(a, o)| JobCmd::Finish(a, o)),
        1 => Just(JobCmd::Cancel),
        1 => Just(JobCmd::FailUnplaceable),
    ]
}

proptest! {
    #[test]
    fn job_state_machine_holds_its_invariants(max_attempts in 1u32..4, cmds in prop::collection::vec(job_cmd(), 0..40)) {
        let mut draft = JobSpecDraft::exec("p", &["true"]);
        draft.max_attempts = max_attempts;
        let spec = JobSpec::try_from(draft).unwrap();
        let now = Utc::now();
        let (mut job, first) = Job::submit(JobId::new(), TenantId::default(), spec, now);
        let mut history = vec![first];
        let worker: WorkerId = "w".parse().unwrap();
        for cmd in cmds {
            let before = job.clone();
            let result = match cmd.clone() {
                JobCmd::Assign => job.assign(worker.clone(), now).map(Some),
                JobCmd::Start(a) => job.start(AttemptNumber::new(a), now).map(Some),
                JobCmd::Finish(a, o) => job.finish(AttemptNumber::new(a), o, now, 0.5).map(Some),
                JobCmd::Cancel => job.request_cancel("test", now),
                JobCmd::FailUnplaceable => job.fail_unplaceable("test", now).map(Some),
            };
            match result {
                Ok(Some(event)) => {
                    prop_assert!(!before.state().is_terminal(), "{cmd:?} changed terminal {:?}", before.state());
                    prop_assert_eq!(event.seq, before.version() + 1);
                    history.push(event);
                }
                Ok(None) => prop_assert_eq!(&job, &before),
                Err(_) => prop_assert_eq!(&job, &before, "refused {:?} changed the job", cmd),
            }
            if let JobCmd::Finish(a, _) | JobCmd::Start(a) = cmd
                && AttemptNumber::new(a) != before.current_attempt()
            {
                prop_assert_eq!(&job, &before, "stale attempt {} accepted", a);
            }
            let spent = job.attempts().iter().filter(|r| !matches!(r.outcome, Some(AttemptOutcome::Lost { .. }))).count();
            prop_assert!(spent <= max_attempts as usize);
        }
        prop_assert_eq!(Job::from_events(&history).unwrap(), job.clone());
        if job.state() == JobState::Succeeded {
            prop_assert_eq!(job.exit_code(), Some(0));
        }
    }
}

#[derive(Debug, Clone)]
enum WorkerCmd {
    Reserve(u64, u64),
    Release(usize),
    Lost,
    Heartbeat,
    Drain,
}

fn worker_cmd() -> impl Strategy<Value = WorkerCmd> {
    prop_oneof![
        4 => ((0u64..1500), (0u64..600)).prop_map(|(c, m)| WorkerCmd::Reserve(c, m)),
        3 => (0usize..6).prop_map(WorkerCmd::Release),
        1 => Just(WorkerCmd::Lost),
        1 => Just(WorkerCmd::Heartbeat),
        1 => Just(WorkerCmd::Drain),
    ]
}

proptest! {
    #[test]
    fn a_worker_never_holds_more_than_it_may(max in 1u32..5, cmds in prop::collection::vec(worker_cmd(), 0..60)) {
        let now = Utc::now();
        let capacity = Resources::new(3000, 1024);
        let (mut worker, _) = Worker::register("w".parse().unwrap(), BTreeMap::new(), capacity, max, now);
        let mut attempts: Vec<AttemptId> = Vec::new();
        for cmd in cmds {
            match cmd {
                WorkerCmd::Reserve(c, m) => {
                    let id = AttemptId::new(JobId::new(), AttemptNumber::new(1));
                    if worker.reserve(id, Resources::new(c, m), now).is_ok() {
                        attempts.push(id);
                    }
                }
                WorkerCmd::Release(i) => {
                    if let Some(id) = attempts.get(i).copied() {
                        let held = worker.holds(&id);
                        prop_assert_eq!(worker.release(&id).is_ok(), held);
                    }
                }
                WorkerCmd::Lost => {
                    if worker.mark_lost(now).is_ok() {
                        // The registry hands every attempt of a lost worker back.
                        for held in worker.held().to_vec() {
                            prop_assert!(worker.release(&held.attempt).is_ok());
                        }
                    }
                    prop_assert!(worker.reserve(AttemptId::new(JobId::new(), AttemptNumber::new(1)), Resources::default(), now).is_err() || worker.status() != hodei_domain::WorkerStatus::Lost);
                }
                WorkerCmd::Heartbeat => {
                    let _ = worker.heartbeat(BTreeMap::new(), capacity, max, Default::default(), now);
                }
                WorkerCmd::Drain => {
                    let _ = worker.drain(now);
                }
            }
            prop_assert!(worker.held().len() <= max as usize);
            let used = worker.held().iter().fold(Resources::default(), |acc, h| acc.saturating_add(&h.resources));
            prop_assert!(capacity.fits(&used), "over capacity: {used:?}");
        }
    }
}
