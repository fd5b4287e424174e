//! Rebuilding the `jobs` and `pipeline_runs` projections from the event store, online and in
//! batches.
//!
//! Each batch (a keyset page of the projection, newest first) is read together with every
//! event of its aggregates in one `REPEATABLE READ` snapshot, so a job moving meanwhile cannot
//! look like a difference. Each aggregate is folded from its events with the same `apply` the
//! live path uses and compared field by field with its row. With `repair`, a differing row is
//! overwritten with the folded state, only if it is still at the version that was read (a job
//! that moved meanwhile is checked again).
//!
//! What the events do not hold is taken from the row: secret env values (events carry the spec
//! with secrets masked, so specs are compared masked and a repair never writes the spec) and
//! a queued job's pending reason (why it is still waiting: an annotation, not an event).

use std::collections::HashMap;
use std::fmt::Debug;

use hodei_domain::{Job, JobId, PipelineRun, PipelineRunId};
use hodei_storage::jobs::{self, JobFilter};
use hodei_storage::pipelines::{self, RunFilter};
use hodei_storage::{PgPool, StorageError};

/// How many times a differing aggregate that keeps moving is read again before giving up.
const REPAIR_TRIES: usize = 3;

/// What to do.
#[derive(Debug, Clone, Copy)]
pub struct RebuildOptions {
    /// Aggregates per batch (one snapshot read each).
    pub batch: u32,
    /// Overwrite differing rows with the folded state.
    pub repair: bool,
}

/// Which projection a difference is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Job,
    PipelineRun,
}

impl Aggregate {
    pub fn name(self) -> &'static str {
        match self {
            Aggregate::Job => "job",
            Aggregate::PipelineRun => "pipeline run",
        }
    }
}

/// One field that differs: the row's value and the folded one, as debug text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDiff {
    pub field: &'static str,
    pub live: String,
    pub rebuilt: String,
}

/// One row that differs from its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub aggregate: Aggregate,
    pub id: String,
    pub fields: Vec<FieldDiff>,
    /// Whether the row was overwritten with the folded state.
    pub repaired: bool,
}

/// What a rebuild found (and repaired).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RebuildReport {
    pub jobs_checked: u64,
    pub runs_checked: u64,
    pub differences: Vec<Difference>,
}

impl RebuildReport {
    /// Differences left as they were found.
    pub fn unrepaired(&self) -> usize {
        self.differences.iter().filter(|d| !d.repaired).count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Checks (and with `repair`, rebuilds) every job and pipeline run.
pub async fn rebuild_projections(
    pool: &PgPool,
    options: RebuildOptions,
) -> Result<RebuildReport, RebuildError> {
    let mut report = RebuildReport::default();
    rebuild::<Jobs>(pool, options, &mut report).await?;
    rebuild::<Runs>(pool, options, &mut report).await?;
    Ok(report)
}

/// A transaction reading one consistent snapshot.
async fn snapshot(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// One projection and its event store, as the rebuild walks, checks and repairs them.
trait Projection {
    type Id: Copy + Eq + std::hash::Hash + std::fmt::Display;
    type Row;
    type Event;
    const AGGREGATE: Aggregate;

    fn id(row: &Self::Row) -> Self::Id;
    /// A keyset page of rows, newest first, before `before`.
    async fn page(
        conn: &mut sqlx::PgConnection,
        before: Option<Self::Id>,
        limit: u32,
    ) -> Result<Vec<Self::Row>, StorageError>;
    async fn get(
        conn: &mut sqlx::PgConnection,
        id: Self::Id,
    ) -> Result<Option<Self::Row>, StorageError>;
    async fn histories(
        conn: &mut sqlx::PgConnection,
        ids: &[Self::Id],
    ) -> Result<HashMap<Self::Id, Vec<Self::Event>>, StorageError>;
    /// The row folded from `events`, with what events do not hold taken from `row`.
    fn fold(
        row: &Self::Row,
        events: &[Self::Event],
    ) -> Result<Self::Row, hodei_domain::DomainError>;
    /// The fields where `row` and `rebuilt` differ.
    fn compare(row: &Self::Row, rebuilt: &Self::Row) -> Vec<FieldDiff>;
    /// Writes `rebuilt` over the row if it is still at the version `row` was read at.
    async fn overwrite(
        conn: &mut sqlx::PgConnection,
        row: &Self::Row,
        rebuilt: &Self::Row,
    ) -> Result<(), StorageError>;
}

struct Jobs;

impl Projection for Jobs {
    type Id = JobId;
    type Row = Job;
    type Event = hodei_domain::JobEvent;
    const AGGREGATE: Aggregate = Aggregate::Job;

    fn id(row: &Job) -> JobId {
        row.id()
    }
    async fn page(
        conn: &mut sqlx::PgConnection,
        before: Option<JobId>,
        limit: u32,
    ) -> Result<Vec<Job>, StorageError> {
        jobs::list(
            conn,
            &JobFilter {
                tenant: None,
                before,
                limit,
                ..JobFilter::default()
            },
        )
        .await
    }
    async fn get(conn: &mut sqlx::PgConnection, id: JobId) -> Result<Option<Job>, StorageError> {
        jobs::get(conn, id).await
    }
    async fn histories(
        conn: &mut sqlx::PgConnection,
        ids: &[JobId],
    ) -> Result<HashMap<JobId, Vec<Self::Event>>, StorageError> {
        jobs::histories(conn, ids, None).await
    }
    fn fold(row: &Job, events: &[Self::Event]) -> Result<Job, hodei_domain::DomainError> {
        let mut rebuilt = Job::from_events(events)?;
        rebuilt.set_pending_reason(row.reason().map(str::to_owned));
        Ok(rebuilt)
    }
    fn compare(row: &Job, rebuilt: &Job) -> Vec<FieldDiff> {
        let mut fields = Vec::new();
        diff(&mut fields, "tenant", row.tenant(), rebuilt.tenant());
        diff(&mut fields, "spec", &row.spec().redacted(), rebuilt.spec());
        diff(&mut fields, "state", &row.state(), &rebuilt.state());
        diff(&mut fields, "attempts", row.attempts(), rebuilt.attempts());
        diff(
            &mut fields,
            "cancel_requested",
            &row.cancel_requested(),
            &rebuilt.cancel_requested(),
        );
        diff(
            &mut fields,
            "preempted_by",
            &row.preempted_by(),
            &rebuilt.preempted_by(),
        );
        diff(
            &mut fields,
            "not_before",
            &row.not_before(),
            &rebuilt.not_before(),
        );
        diff(&mut fields, "reason", &row.reason(), &rebuilt.reason());
        diff(
            &mut fields,
            "created_at",
            &row.created_at(),
            &rebuilt.created_at(),
        );
        diff(
            &mut fields,
            "updated_at",
            &row.updated_at(),
            &rebuilt.updated_at(),
        );
        diff(&mut fields, "version", &row.version(), &rebuilt.version());
        fields
    }
    async fn overwrite(
        conn: &mut sqlx::PgConnection,
        row: &Job,
        rebuilt: &Job,
    ) -> Result<(), StorageError> {
        // The spec (with its secrets) is not written: only what events change.
        jobs::save(conn, rebuilt, row.version(), &[])
            .await
            .map(|_| ())
    }
}

struct Runs;

impl Projection for Runs {
    type Id = PipelineRunId;
    type Row = PipelineRun;
    type Event = hodei_domain::PipelineEvent;
    const AGGREGATE: Aggregate = Aggregate::PipelineRun;

    fn id(row: &PipelineRun) -> PipelineRunId {
        row.id()
    }
    async fn page(
        conn: &mut sqlx::PgConnection,
        before: Option<PipelineRunId>,
        limit: u32,
    ) -> Result<Vec<PipelineRun>, StorageError> {
        let filter = RunFilter {
            tenant: None,
            states: Vec::new(),
            name_prefix: None,
            before,
            limit,
        };
        pipelines::list(conn, &filter).await
    }
    async fn get(
        conn: &mut sqlx::PgConnection,
        id: PipelineRunId,
    ) -> Result<Option<PipelineRun>, StorageError> {
        pipelines::get(conn, id).await
    }
    async fn histories(
        conn: &mut sqlx::PgConnection,
        ids: &[PipelineRunId],
    ) -> Result<HashMap<PipelineRunId, Vec<Self::Event>>, StorageError> {
        pipelines::histories(conn, ids).await
    }
    fn fold(
        _row: &PipelineRun,
        events: &[Self::Event],
    ) -> Result<PipelineRun, hodei_domain::DomainError> {
        PipelineRun::from_events(events)
    }
    fn compare(row: &PipelineRun, rebuilt: &PipelineRun) -> Vec<FieldDiff> {
        let mut fields = Vec::new();
        diff(&mut fields, "tenant", row.tenant(), rebuilt.tenant());
        diff(&mut fields, "spec", &row.spec().redacted(), rebuilt.spec());
        diff(&mut fields, "state", &row.state(), &rebuilt.state());
        diff(&mut fields, "steps", row.steps(), rebuilt.steps());
        diff(
            &mut fields,
            "cancel_requested",
            &row.cancel_requested(),
            &rebuilt.cancel_requested(),
        );
        diff(
            &mut fields,
            "failing_fast",
            &row.failing_fast(),
            &rebuilt.failing_fast(),
        );
        diff(
            &mut fields,
            "created_at",
            &row.created_at(),
            &rebuilt.created_at(),
        );
        diff(
            &mut fields,
            "updated_at",
            &row.updated_at(),
            &rebuilt.updated_at(),
        );
        diff(&mut fields, "version", &row.version(), &rebuilt.version());
        fields
    }
    async fn overwrite(
        conn: &mut sqlx::PgConnection,
        row: &PipelineRun,
        rebuilt: &PipelineRun,
    ) -> Result<(), StorageError> {
        pipelines::overwrite(conn, rebuilt, row.version()).await
    }
}

/// Walks every row of projection `P`, a snapshot per batch, checking (and repairing) each.
async fn rebuild<P: Projection>(
    pool: &PgPool,
    options: RebuildOptions,
    report: &mut RebuildReport,
) -> Result<(), RebuildError> {
    let limit = options.batch.max(1);
    let mut before = None;
    loop {
        let mut tx = snapshot(pool).await?;
        let live = P::page(&mut tx, before, limit).await?;
        let ids: Vec<P::Id> = live.iter().map(P::id).collect();
        let mut histories = P::histories(&mut tx, &ids).await?;
        tx.commit().await?;
        for row in &live {
            match P::AGGREGATE {
                Aggregate::Job => report.jobs_checked += 1,
                Aggregate::PipelineRun => report.runs_checked += 1,
            }
            let events = histories.remove(&P::id(row)).unwrap_or_default();
            let Some(mut difference) = check::<P>(row, &events) else {
                continue;
            };
            if options.repair {
                match repair::<P>(pool, P::id(row), difference).await? {
                    Some(left) => difference = left,
                    // Moved on meanwhile, and agrees with its events now.
                    None => continue,
                }
            }
            tracing::warn!(
                aggregate = P::AGGREGATE.name(),
                id = %P::id(row),
                repaired = difference.repaired,
                "projection differs from its events"
            );
            report.differences.push(difference);
        }
        match live.last() {
            Some(last) if live.len() == limit as usize => before = Some(P::id(last)),
            _ => return Ok(()),
        }
    }
}

/// How `row` differs from what its `events` fold to, if it does.
fn check<P: Projection>(row: &P::Row, events: &[P::Event]) -> Option<Difference> {
    let fields = match P::fold(row, events) {
        Ok(rebuilt) => P::compare(row, &rebuilt),
        Err(e) => vec![FieldDiff {
            field: "history",
            live: format!("{} events", events.len()),
            rebuilt: format!("does not replay: {e}"),
        }],
    };
    (!fields.is_empty()).then(|| Difference {
        aggregate: P::AGGREGATE,
        id: P::id(row).to_string(),
        fields,
        repaired: false,
    })
}

/// Overwrites row `id` with its folded state if it still differs, reading both again (the
/// row may have moved since its batch was read). `None`: it agrees with its events now.
async fn repair<P: Projection>(
    pool: &PgPool,
    id: P::Id,
    found: Difference,
) -> Result<Option<Difference>, RebuildError> {
    for _ in 0..REPAIR_TRIES {
        let mut tx = pool.begin().await?;
        let Some(row) = P::get(&mut tx, id).await? else {
            return Ok(None);
        };
        let events = P::histories(&mut tx, &[id])
            .await?
            .remove(&id)
            .unwrap_or_default();
        let Some(mut now) = check::<P>(&row, &events) else {
            return Ok(None);
        };
        let Ok(rebuilt) = P::fold(&row, &events) else {
            return Ok(Some(now));
        };
        match P::overwrite(&mut tx, &row, &rebuilt).await {
            Ok(()) => {
                tx.commit().await?;
                now.repaired = true;
                return Ok(Some(now));
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(found))
}

fn diff<T: PartialEq + Debug + ?Sized>(
    out: &mut Vec<FieldDiff>,
    field: &'static str,
    live: &T,
    rebuilt: &T,
) {
    if live != rebuilt {
        out.push(FieldDiff {
            field,
            live: format!("{live:?}"),
            rebuilt: format!("{rebuilt:?}"),
        });
    }
}
