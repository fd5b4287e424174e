//! The pure domain of Hodei Pipelines: typed identifiers, job specifications and their
//! validation, the `Job`, `Worker` and `PipelineRun` aggregates with their state machines, composable
//! specifications and the domain events every state change produces.
//!
//! Nothing here performs I/O: no tokio, no database, no NATS. Adapters at the edge
//! persist and transport what this crate decides.

pub mod access;
pub mod error;
pub mod ids;
pub mod job;
pub mod pipeline;
pub mod schedule;
pub mod spec;
pub mod specification;
pub mod tenancy;
pub mod text;
pub mod time;
pub mod worker;

pub use access::{AccessError, Action, Principal, Role};
pub use error::{DomainError, FieldError, ValidationErrors};
pub use ids::{
    AttemptId, AttemptNumber, IdError, IncarnationId, JobId, PipelineRunId, ScheduleId, TenantId,
    TokenId, WorkerId,
};
pub use job::{AttemptOutcome, AttemptRecord, Job, JobEvent, JobEventKind, JobState};
pub use pipeline::{
    Effects, PipelineEvent, PipelineEventKind, PipelineRun, PipelineSpec, PipelineSpecDraft,
    PipelineState, StepArtifacts, StepDraft, StepRun, StepState, When,
};
pub use schedule::{
    Cadence, Firing, OverlapPolicy, Round, Schedule, ScheduleEvent, ScheduleEventKind,
    ScheduleSpec, ScheduleTarget, TickOutcome, TickRecord,
};
pub use spec::{ArtifactPlan, Backoff, Command, JobFields, JobSpec, Resources};
pub use specification::Specification;
pub use tenancy::{
    Capacity, FairQueue, Quota, QuotaHold, Shares, TenantPolicy, TenantShare, Usage,
};
pub use worker::{
    HeldAttempt, LeaseTerms, ResourceUsage, Worker, WorkerEvent, WorkerEventKind, WorkerStatus,
};
