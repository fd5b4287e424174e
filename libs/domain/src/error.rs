//! Errors raised by the domain: invalid input and refused state transitions.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One invalid field: its path (`resources.cpu_millis`, `env.FOO`) and why it is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Every invalid field found in one input, never just the first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        write!(f, "invalid input: {}", parts.join("; "))
    }
}

impl std::error::Error for ValidationErrors {}

/// A refused operation on an aggregate. The aggregate is left unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error(transparent)]
    Invalid(#[from] ValidationErrors),
    #[error("cannot {action} a job in state {state}")]
    IllegalJobTransition { action: &'static str, state: String },
    #[error("cannot {action} a pipeline run in state {state}")]
    IllegalPipelineTransition { action: &'static str, state: String },
    #[error("cannot {action} step {step} in state {state}")]
    IllegalStepTransition {
        step: String,
        action: &'static str,
        state: String,
    },
    #[error("the pipeline run has no step {step}")]
    UnknownStep { step: String },
    #[error("stale attempt {got}: the job's current attempt is {current}")]
    StaleAttempt { got: u32, current: u32 },
    #[error("cannot {action} a worker in status {status}")]
    IllegalWorkerTransition {
        action: &'static str,
        status: String,
    },
    #[error("worker {worker_id} has no free slot ({held} of {max} held)")]
    NoFreeSlot {
        worker_id: String,
        held: usize,
        max: u32,
    },
    #[error("worker {worker_id} lacks capacity for {resource}: requested {requested}, free {free}")]
    InsufficientCapacity {
        worker_id: String,
        resource: &'static str,
        requested: u64,
        free: u64,
    },
    #[error("{field} is {value}, out of range (at most {max})")]
    OutOfRange {
        field: &'static str,
        value: u64,
        max: u64,
    },
    #[error("worker {worker_id} already holds attempt {attempt}")]
    AlreadyHeld { worker_id: String, attempt: String },
    #[error("worker {worker_id} does not hold attempt {attempt}")]
    NotHeld { worker_id: String, attempt: String },
    #[error("worker {worker_id} changed beyond freed slots since it was read: {why}")]
    WorkerMoved {
        worker_id: String,
        why: &'static str,
    },
    #[error("event {seq} does not follow version {version} of job {job_id}")]
    OutOfOrderEvent {
        job_id: String,
        seq: u64,
        version: u64,
    },
    #[error("an event of {event_of} cannot be applied to {target}")]
    ForeignEvent { target: String, event_of: String },
}
