//! What several of the storage test binaries share.

use std::collections::BTreeMap;

use chrono::Utc;
use hodei_domain::pipeline::{PipelineSpecDraft, StepDraft};
use hodei_domain::{PipelineRun, PipelineRunId, PipelineSpec, TenantId};
use hodei_storage::driver;

/// A run named `name` of `steps`, submitted for the default tenant.
pub async fn submitted_run(pool: &sqlx::PgPool, name: &str, steps: Vec<StepDraft>) -> PipelineRun {
    let spec = PipelineSpec::try_from(PipelineSpecDraft {
        name: name.to_owned(),
        env: BTreeMap::new(),
        steps,
        fail_fast: false,
        idempotency_key: None,
        labels: BTreeMap::new(),
    })
    .unwrap();
    let (run, event) =
        PipelineRun::submit(PipelineRunId::new(), TenantId::default(), spec, Utc::now());
    driver::submit_run(pool, run.clone(), &event, "test")
        .await
        .unwrap();
    run
}
