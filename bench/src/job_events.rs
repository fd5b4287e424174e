//! One job's life as events, built by the domain's own commands: the events the event-bus
//! scenario and the envelope criterion bench serialise. (The bench includes this file by its
//! path, since a bench cannot import from the harness's binary crate.)

use chrono::{DateTime, Utc};
use hodei_domain::spec::JobSpecDraft;
use hodei_domain::{
    AttemptNumber, AttemptOutcome, DomainError, Job, JobEvent, JobId, JobSpec, TenantId, WorkerId,
};

/// The spec and the worker every job of [`one_job`] has.
pub struct Fixture {
    spec: JobSpec,
    worker: WorkerId,
}

impl Fixture {
    pub fn new() -> Result<Self, String> {
        let spec = JobSpec::try_from(JobSpecDraft::exec("build", &["make", "-j2", "test"]))
            .map_err(|e| format!("invalid spec: {e}"))?;
        let worker = "worker-0001"
            .parse()
            .map_err(|e| format!("invalid worker id: {e}"))?;
        Ok(Self { spec, worker })
    }

    /// A new job's submitted, assigned, started and succeeded events, all at `now`.
    pub fn one_job(&self, now: DateTime<Utc>) -> Result<[JobEvent; 4], DomainError> {
        let (mut job, submitted) =
            Job::submit(JobId::new(), TenantId::default(), self.spec.clone(), now);
        let assigned = job.assign(self.worker.clone(), now)?;
        let started = job.start(AttemptNumber::new(1), now)?;
        let finished = job.finish(
            AttemptNumber::new(1),
            AttemptOutcome::Exited { code: 0 },
            now,
            0.0,
        )?;
        Ok([submitted, assigned, started, finished])
    }
}
