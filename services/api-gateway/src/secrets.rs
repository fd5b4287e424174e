//! Secret values are sealed at the edge: every secret env value of a submitted job or
//! pipeline is sealed to the control plane's public key (`HODEI_SECRETS_PUBLIC_KEY`) before
//! anything stores or sends it, so PostgreSQL, the outbox and the streams never hold it in
//! clear. The scheduler opens it only to seal it again for the assigned agent.

use hodei_domain::{JobSpec, PipelineSpec};
use hodei_messaging::seal::{SealError, SealingKey};

use crate::errors::ApiError;

/// The control plane's public sealing key, if the gateway has one.
#[derive(Debug, Clone, Default)]
pub struct Secrets(Option<SealingKey>);

impl Secrets {
    /// Seals to `key`; without one, specs with secrets are refused.
    pub fn new(key: Option<SealingKey>) -> Self {
        Secrets(key)
    }

    /// `spec` with its secret values sealed.
    pub fn seal_job(&self, spec: JobSpec) -> Result<JobSpec, ApiError> {
        if !spec.has_secrets() {
            return Ok(spec);
        }
        let key = self.key()?;
        spec.map_secrets(|value| key.seal(value)).map_err(sealing)
    }

    /// `spec` with its secret values (of every step and of the pipeline) sealed.
    pub fn seal_pipeline(&self, spec: PipelineSpec) -> Result<PipelineSpec, ApiError> {
        if !spec.has_secrets() {
            return Ok(spec);
        }
        let key = self.key()?;
        spec.map_secrets(|value| key.seal(value)).map_err(sealing)
    }

    fn key(&self) -> Result<&SealingKey, ApiError> {
        self.0.as_ref().ok_or_else(|| {
            ApiError::Unsupported(
                "spec.secret_env: this gateway has no HODEI_SECRETS_PUBLIC_KEY, so it cannot \
                 store secret values sealed; submit without secret_env or configure the key"
                    .to_owned(),
            )
        })
    }
}

fn sealing(e: SealError) -> ApiError {
    ApiError::Unsupported(format!("spec.secret_env: {e}"))
}
