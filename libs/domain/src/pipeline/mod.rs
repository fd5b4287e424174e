//! Pipelines: DAGs of jobs. [`spec`] is what a user writes (steps with `needs`, `when`,
//! `matrix`), checked by `validation`, its graph in `dag` and its matrices expanded by `matrix`; [`run`] is one run of it, the `PipelineRun` aggregate whose
//! steps are ordinary jobs.

mod dag;
mod matrix;
pub mod run;
pub mod spec;
mod validation;

pub use run::{
    Effects, PipelineEvent, PipelineEventKind, PipelineRun, PipelineState, StepRun, StepState,
};
pub use spec::{ExpandedStep, PipelineSpec, PipelineSpecDraft, StepArtifacts, StepDraft, When};
