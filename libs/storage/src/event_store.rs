//! The append-only event tables (`job_events`, `pipeline_events`): one way to append a batch
//! of an aggregate's events (unique `(aggregate, seq)`: a second writer at the same version
//! gets `Conflict`) and to read them back in order.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::error::{StorageError, encode, to_i64};
use crate::sql::Unnest;

/// Which event table.
#[derive(Debug, Clone, Copy)]
pub(crate) enum EventTable {
    Jobs,
    Pipelines,
}

impl EventTable {
    fn name(self) -> &'static str {
        match self {
            EventTable::Jobs => "job_events",
            EventTable::Pipelines => "pipeline_events",
        }
    }

    fn insert_sql(self) -> &'static str {
        match self {
            EventTable::Jobs => "INSERT INTO job_events (job_id, seq, event_id, type, at, data)",
            EventTable::Pipelines => {
                "INSERT INTO pipeline_events (run_id, seq, event_id, type, at, data)"
            }
        }
    }

    fn select_sql(self) -> &'static str {
        match self {
            EventTable::Jobs => {
                "SELECT seq, data FROM job_events
                 WHERE job_id = $1 AND seq >= $2 AND ($3::bigint IS NULL OR seq <= $3)
                   AND ($4::timestamptz IS NULL OR at <= $4)
                 ORDER BY seq LIMIT $5"
            }
            EventTable::Pipelines => {
                "SELECT seq, data FROM pipeline_events
                 WHERE run_id = $1 AND seq >= $2 AND ($3::bigint IS NULL OR seq <= $3)
                   AND ($4::timestamptz IS NULL OR at <= $4)
                 ORDER BY seq LIMIT $5"
            }
        }
    }
}

/// What the event table keeps of one event besides the event itself.
pub(crate) struct Stored<'e, E> {
    pub aggregate: Uuid,
    pub seq: u64,
    pub event_id: Uuid,
    pub kind: &'static str,
    pub at: DateTime<Utc>,
    pub event: &'e E,
}

/// Appends `events` to `table` in one statement.
pub(crate) async fn append<'e, E: Serialize + 'e>(
    conn: &mut PgConnection,
    table: EventTable,
    events: impl ExactSizeIterator<Item = Stored<'e, E>>,
) -> Result<(), StorageError> {
    if events.len() == 0 {
        return Ok(());
    }
    let mut query = QueryBuilder::new("");
    push_insert(&mut query, table, events, None)?;
    query.build().execute(conn).await.map_err(|e| {
        let err = StorageError::Database(e);
        if err.is_conflict() {
            StorageError::Conflict {
                what: match table {
                    EventTable::Jobs => "job event sequence",
                    EventTable::Pipelines => "pipeline event sequence",
                }
                .to_owned(),
            }
        } else {
            err
        }
    })?;
    Ok(())
}

/// Writes into `query` the `INSERT` that appends `events` to `table`, for a statement that
/// also does other writes (as one of its `WITH` clauses). With `only`, the name of an earlier
/// `WITH` clause that returns an `id` column, only the events of the aggregates it returned are
/// appended.
pub(crate) fn push_insert<'e, E: Serialize + 'e>(
    query: &mut QueryBuilder<Postgres>,
    table: EventTable,
    events: impl ExactSizeIterator<Item = Stored<'e, E>>,
    only: Option<&str>,
) -> Result<(), StorageError> {
    let n = events.len();
    let (mut aggregates, mut seqs, mut ids) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut kinds, mut ats, mut data) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for e in events {
        aggregates.push(e.aggregate);
        seqs.push(to_i64(e.seq));
        ids.push(e.event_id);
        kinds.push(e.kind);
        ats.push(e.at);
        data.push(encode("event", e.event)?);
    }
    query.push(table.insert_sql());
    query.push(" SELECT * FROM ");
    Unnest::new(query)
        .column(aggregates, "uuid")
        .column(seqs, "bigint")
        .column(ids, "uuid")
        .column(kinds, "text")
        .column(ats, "timestamptz")
        .column(data, "jsonb")
        .alias("e(aggregate, seq, event_id, type, at, data)");
    if let Some(only) = only {
        query.push(format_args!(
            " WHERE e.aggregate IN (SELECT id FROM {only})"
        ));
    }
    Ok(())
}

/// Every event of each of `aggregates` in `table` (those recorded at or before `until` when
/// given), in order, by aggregate; aggregates without any are absent.
pub(crate) async fn read_many<E: DeserializeOwned>(
    conn: impl sqlx::PgExecutor<'_>,
    table: EventTable,
    aggregates: &[Uuid],
    until: Option<DateTime<Utc>>,
) -> Result<std::collections::HashMap<Uuid, Vec<E>>, StorageError> {
    let mut out: std::collections::HashMap<Uuid, Vec<E>> = std::collections::HashMap::new();
    if aggregates.is_empty() {
        return Ok(out);
    }
    let sql = match table {
        EventTable::Jobs => {
            "SELECT job_id, seq, data FROM job_events
             WHERE job_id = ANY($1) AND ($2::timestamptz IS NULL OR at <= $2)
             ORDER BY job_id, seq"
        }
        EventTable::Pipelines => {
            "SELECT run_id, seq, data FROM pipeline_events
             WHERE run_id = ANY($1) AND ($2::timestamptz IS NULL OR at <= $2)
             ORDER BY run_id, seq"
        }
    };
    let rows: Vec<(Uuid, i64, serde_json::Value)> = sqlx::query_as(sql)
        .bind(aggregates)
        .bind(until)
        .fetch_all(conn)
        .await?;
    for (aggregate, seq, data) in rows {
        let event = decode(table, aggregate, seq, data)?;
        out.entry(aggregate).or_default().push(event);
    }
    Ok(out)
}

fn decode<E: DeserializeOwned>(
    table: EventTable,
    aggregate: Uuid,
    seq: i64,
    data: serde_json::Value,
) -> Result<E, StorageError> {
    serde_json::from_value(data).map_err(|e| StorageError::Corrupt {
        table: table.name(),
        id: format!("{aggregate}/{seq}"),
        column: "data",
        reason: e.to_string(),
    })
}

/// Which part of one aggregate's history to read: the events from `from_seq` on, up to
/// `to_seq` and recorded at or before `until` when given, at most `limit` of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventRange {
    pub from_seq: u64,
    pub to_seq: Option<u64>,
    pub until: Option<DateTime<Utc>>,
    pub limit: Option<u32>,
}

impl EventRange {
    /// Every event from `from_seq` on.
    pub fn from(from_seq: u64) -> Self {
        Self {
            from_seq,
            ..Self::default()
        }
    }
}

/// The events of `aggregate` in `table` within `range`, in order.
pub(crate) async fn read<E: DeserializeOwned>(
    pool: &PgPool,
    table: EventTable,
    aggregate: Uuid,
    range: EventRange,
) -> Result<Vec<E>, StorageError> {
    let rows: Vec<(i64, serde_json::Value)> = sqlx::query_as(table.select_sql())
        .bind(aggregate)
        .bind(to_i64(range.from_seq))
        .bind(range.to_seq.map(to_i64))
        .bind(range.until)
        .bind(range.limit.map(i64::from))
        .fetch_all(pool)
        .await?;
    rows.into_iter()
        .map(|(seq, data)| decode(table, aggregate, seq, data))
        .collect()
}
