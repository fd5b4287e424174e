//! The transport's limits, enforced at the edge: every message a submission will cause must fit
//! the NATS server's `max_payload`, or the submission is refused with INVALID_ARGUMENT naming
//! the field that makes it too large. A message too large to publish would otherwise be
//! accepted and then fail to reach its worker.

use chrono::Utc;
use hodei_domain::{
    AttemptNumber, Command, IncarnationId, JobId, JobSpec, PipelineRunId, PipelineSpec,
};
use hodei_messaging::{AgentCommand, Outgoing};

use crate::errors::ApiError;

/// Room kept for what the relay adds to a message (its id and trace context headers) and for
/// the protocol's own framing.
pub const HEADER_ROOM: usize = 4096;

/// The largest message body a submission may cause, from the server's `max_payload`.
#[derive(Debug, Clone, Copy)]
pub struct TransportLimits {
    max_payload: usize,
}

impl TransportLimits {
    pub fn new(max_payload: usize) -> Self {
        Self { max_payload }
    }

    /// Most bytes a message body may have.
    fn max_body(self) -> usize {
        self.max_payload.saturating_sub(HEADER_ROOM)
    }

    /// Refuses `messages` (built for this submission) unless each fits; `field` names what
    /// they carry.
    pub fn check_messages(self, field: &str, messages: &[Outgoing]) -> Result<(), ApiError> {
        match messages.iter().map(|m| m.payload.len()).max() {
            Some(size) if size > self.max_body() => Err(ApiError::field(
                field,
                format!(
                    "its messages would be {size} bytes, more than the {} bytes the NATS server \
                     accepts ({} max_payload less {HEADER_ROOM} for headers)",
                    self.max_body(),
                    self.max_payload
                ),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses a job spec whose assignment to a worker (the largest message a job causes: its
    /// whole spec, secrets included) would not fit, naming the field that takes most room
    /// under `prefix` (`spec.` for a job).
    pub fn check_job(self, prefix: &str, spec: &JobSpec) -> Result<(), ApiError> {
        self.check_job_named(spec, |field| format!("{prefix}{field}"))
    }

    /// Refuses a pipeline any of whose steps' jobs would not fit (named `steps.<step>.…`,
    /// or `env[…]` for the pipeline's own env), or whose own events would not.
    pub fn check_pipeline(
        self,
        spec: &PipelineSpec,
        run: PipelineRunId,
        events: &[Outgoing],
    ) -> Result<(), ApiError> {
        for step in spec.expand(run) {
            let own = spec.steps.iter().find(|s| s.name == step.base);
            self.check_job_named(&step.job, |field| {
                if let Some(key) = field
                    .strip_prefix("env[\"")
                    .and_then(|k| k.strip_suffix("\"]"))
                {
                    let in_step = own.is_some_and(|s| s.env.contains_key(key));
                    if !in_step && spec.env.contains_key(key) {
                        return field;
                    }
                    if !in_step && key.starts_with("MATRIX_") {
                        return format!("steps.{}.matrix", step.base);
                    }
                }
                format!("steps.{}.{field}", step.base)
            })?;
        }
        self.check_messages("spec", events)
    }

    fn check_job_named(
        self,
        spec: &JobSpec,
        name: impl Fn(String) -> String,
    ) -> Result<(), ApiError> {
        let size = assign_size(spec);
        if size <= self.max_body() {
            return Ok(());
        }
        let (field, bytes) = largest_field(spec);
        Err(ApiError::field(
            name(field),
            format!(
                "this field takes {bytes} bytes and makes the job's assignment {size} bytes, \
                 more than the {} bytes the NATS server accepts ({} max_payload less \
                 {HEADER_ROOM} for headers)",
                self.max_body(),
                self.max_payload
            ),
        ))
    }
}

/// Most bytes a run's steps (expanded, with their names and needs) may take on the wire. Every
/// answer carrying the run carries them (and the spec, and each step's attempts, besides), and
/// the run's row rewrites them at each of its steps' moves: a few steps that each need every
/// job of a wide matrix would otherwise make a run of megabytes from a request of kilobytes,
/// whose answers no client could read.
pub const MAX_RUN_STEPS_BYTES: usize = 1024 * 1024;

/// Refuses a run whose steps on the wire would pass [`MAX_RUN_STEPS_BYTES`], naming `steps`.
pub fn check_run_steps(run: &hodei_domain::PipelineRun) -> Result<(), ApiError> {
    let wire = hodei_proto::pipeline_run_to_wire(run, &std::collections::HashMap::new());
    let size: usize = wire.steps.iter().map(prost::Message::encoded_len).sum();
    if size <= MAX_RUN_STEPS_BYTES {
        return Ok(());
    }
    let needs: usize = run.steps().iter().map(|s| s.needs.len()).sum();
    Err(ApiError::field(
        "steps",
        format!(
            "the run's {} steps (matrices expanded) would take {size} bytes with their {needs} \
             needs, more than {MAX_RUN_STEPS_BYTES}: have fewer steps need a whole matrix (one \
             step that needs it can gather it for the others)",
            run.steps().len()
        ),
    ))
}

/// The size of the command that assigns `spec` to a worker, with the widest ids and numbers.
fn assign_size(spec: &JobSpec) -> usize {
    let command = AgentCommand::Assign {
        job_id: JobId::new(),
        attempt: AttemptNumber::new(u32::MAX),
        spec: Box::new(spec.clone()),
        assigned_at: Utc::now(),
        incarnation: Some(IncarnationId::new()),
    };
    serde_json::to_vec(&command).map_or(usize::MAX, |bytes| bytes.len())
}

/// Bytes `value` takes once encoded.
fn encoded<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len())
}

/// The field of `spec` that takes most room once encoded, and its size.
fn largest_field(spec: &JobSpec) -> (String, usize) {
    let mut fields: Vec<(String, usize)> = vec![
        ("name".to_owned(), encoded(&spec.name)),
        ("working_dir".to_owned(), encoded(&spec.working_dir)),
        ("labels".to_owned(), encoded(&spec.labels)),
        ("required_labels".to_owned(), encoded(&spec.required_labels)),
        ("secret_env".to_owned(), encoded(&spec.secret_env)),
    ];
    match &spec.command {
        Command::Exec { argv } => fields.push(("command.argv".to_owned(), encoded(argv))),
        Command::Script {
            interpreter,
            script,
        } => {
            fields.push(("command.interpreter".to_owned(), encoded(interpreter)));
            fields.push(("command.script".to_owned(), encoded(script)));
        }
    }
    fields.extend(
        spec.env
            .iter()
            .map(|(k, v)| (format!("env[{k:?}]"), encoded(k) + encoded(v))),
    );
    fields
        .into_iter()
        .max_by_key(|(_, bytes)| *bytes)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use hodei_domain::spec::JobSpecDraft;

    use super::*;

    fn job(env: &[(&str, usize)]) -> JobSpec {
        let mut draft = JobSpecDraft::exec("big", &["true"]);
        for (key, size) in env {
            draft.env.insert((*key).to_owned(), "x".repeat(*size));
        }
        JobSpec::try_from(draft).unwrap()
    }

    #[test]
    fn a_run_whose_needs_fan_out_past_the_bound_is_refused_naming_steps() {
        use hodei_domain::pipeline::{PipelineSpecDraft, StepDraft};
        let pipeline = |dependants: usize| {
            let mut wide = StepDraft::exec("a", &["true"]);
            wide.matrix.insert(
                "k".repeat(60),
                (0..256).map(|i| format!("{i:0>64}")).collect(),
            );
            let mut steps = vec![wide];
            steps.extend(
                (0..dependants)
                    .map(|i| StepDraft::exec(format!("s{i}"), &["true"]).needing(&["a"])),
            );
            let spec = hodei_domain::PipelineSpec::try_from(PipelineSpecDraft {
                name: "fan".to_owned(),
                env: Default::default(),
                steps,
                fail_fast: false,
                idempotency_key: None,
                labels: Default::default(),
            })
            .unwrap();
            hodei_domain::PipelineRun::submit(
                PipelineRunId::new(),
                hodei_domain::TenantId::default(),
                spec,
                Utc::now(),
            )
            .0
        };
        check_run_steps(&pipeline(2)).unwrap();
        let err = tonic::Status::from(check_run_steps(&pipeline(499)).unwrap_err());
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with("steps: "), "{}", err.message());
    }

    #[test]
    fn a_job_that_fits_passes() {
        let limits = TransportLimits::new(1 << 20);
        limits.check_job("spec.", &job(&[("SMALL", 1000)])).unwrap();
    }

    #[test]
    fn a_job_too_large_is_refused_naming_its_largest_field() {
        let limits = TransportLimits::new(1 << 20);
        let err = tonic::Status::from(
            limits
                .check_job("spec.", &job(&[("SMALL", 10), ("BIG", 1_200_000)]))
                .unwrap_err(),
        );
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with("spec.env[\"BIG\"]: "),
            "{}",
            err.message()
        );
        assert!(err.message().contains("max_payload"), "{}", err.message());
    }

    #[test]
    fn the_room_for_headers_counts() {
        let spec = job(&[("V", 10_000)]);
        let size = assign_size(&spec);
        assert!(
            TransportLimits::new(size + HEADER_ROOM)
                .check_job("", &spec)
                .is_ok()
        );
        assert!(
            TransportLimits::new(size + HEADER_ROOM - 1)
                .check_job("", &spec)
                .is_err()
        );
    }
}
