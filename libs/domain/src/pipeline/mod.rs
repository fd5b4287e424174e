//! Pipelines: DAGs of jobs. [`spec`] is what a user writes (steps with `needs`, `when`,
//! `matrix`) and its validation; [`run`] is one run of it, the `PipelineRun` aggregate whose
//! steps are ordinary jobs.

pub mod run;
pub mod spec;

pub use run::{
    Effects, PipelineEvent, PipelineEventKind, PipelineRun, PipelineState, StepRun, StepState,
};
pub use spec::{ExpandedStep, PipelineSpec, PipelineSpecDraft, StepArtifacts, StepDraft, When};
