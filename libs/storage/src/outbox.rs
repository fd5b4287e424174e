//! The transactional outbox (`outbox`, `outbox_dead`): messages are inserted in the
//! transaction that commits the state change they announce, with the trace context of the
//! span that queued them. The relay (`hodei_runtime::relay`) claims them, publishes them and
//! deletes them, or moves those the transport refuses for good to `outbox_dead`.

use std::borrow::Borrow;

use hodei_messaging::{Outgoing, TraceHeaders};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::error::{StorageError, encode};
use crate::sql::Unnest;

/// Appends messages to the outbox inside the caller's transaction; any relay publishes them
/// once woken.
pub async fn append<M: Borrow<Outgoing>>(
    conn: &mut PgConnection,
    messages: &[M],
) -> Result<(), StorageError> {
    insert(conn, messages, false).await
}

/// [`append`] for messages the caller hands to its own relay once committed, which publishes
/// them from memory: other claims leave them alone while they are younger than
/// [`Claim::direct_older_than`].
pub async fn append_direct<M: Borrow<Outgoing>>(
    conn: &mut PgConnection,
    messages: &[M],
) -> Result<(), StorageError> {
    insert(conn, messages, true).await
}

async fn insert<M: Borrow<Outgoing>>(
    conn: &mut PgConnection,
    messages: &[M],
    direct: bool,
) -> Result<(), StorageError> {
    if messages.is_empty() {
        return Ok(());
    }
    let mut query = QueryBuilder::new("");
    push_insert(&mut query, messages, direct, None)?;
    query.build().execute(conn).await?;
    Ok(())
}

/// Writes into `query` the `INSERT` that appends `messages` to the outbox (handed to the
/// caller's relay once committed when `direct`, as [`append_direct`]), for a statement that
/// also does other writes (as one of its `WITH` clauses). With `only`, each message's job and
/// the name of an earlier `WITH` clause that returns an `id` column: only the messages of the
/// jobs it returned are appended.
pub(crate) fn push_insert<M: Borrow<Outgoing>>(
    query: &mut QueryBuilder<Postgres>,
    messages: &[M],
    direct: bool,
    only: Option<(&[Uuid], &str)>,
) -> Result<(), StorageError> {
    let messages: Vec<&Outgoing> = messages.iter().map(Borrow::borrow).collect();
    let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
    let headers = messages
        .iter()
        .map(|m| encode("outbox headers", &m.headers))
        .collect::<Result<Vec<_>, _>>()?;
    let at_most_once: Vec<bool> = messages.iter().map(|m| m.at_most_once).collect();
    query.push(
        "INSERT INTO outbox (id, subject, payload, headers, at_most_once, direct)
         SELECT m.id, m.subject, m.payload, m.headers, m.at_most_once, ",
    );
    query.push_bind(direct);
    query.push(" FROM ");
    Unnest::new(query)
        .column(ids, "uuid")
        .column(subjects, "text")
        .column(payloads, "bytea")
        .column(headers, "jsonb")
        .column(at_most_once, "bool")
        .alias_of_jobs("m", "id, subject, payload, headers, at_most_once", only);
    Ok(())
}

/// Number of messages waiting to be relayed.
pub async fn pending(pool: &PgPool) -> Result<i64, StorageError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(pool)
        .await?)
}

/// A message the transport refused for good, moved out of the outbox by the relay, whose
/// consequences are still to be handled.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: Uuid,
    pub subject: String,
    pub payload: Vec<u8>,
    pub reason: String,
}

/// Up to `limit` dead letters not yet handled, oldest first.
pub async fn dead_unhandled(pool: &PgPool, limit: i64) -> Result<Vec<DeadLetter>, StorageError> {
    let rows: Vec<(Uuid, String, Vec<u8>, String)> = sqlx::query_as(
        "SELECT id, subject, payload, reason FROM outbox_dead
         WHERE handled_at IS NULL ORDER BY dead_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, subject, payload, reason)| DeadLetter {
            id,
            subject,
            payload,
            reason,
        })
        .collect())
}

/// Records that the consequences of dead letter `id` were handled.
pub async fn mark_dead_handled(conn: &mut PgConnection, id: Uuid) -> Result<(), StorageError> {
    sqlx::query("UPDATE outbox_dead SET handled_at = now() WHERE id = $1 AND handled_at IS NULL")
        .bind(id)
        .execute(conn)
        .await?;
    Ok(())
}

/// A committed message waiting in the outbox.
#[derive(Debug)]
pub struct Pending {
    /// Its place in the order of commits.
    pub position: i64,
    pub id: Uuid,
    pub subject: String,
    pub payload: Vec<u8>,
    /// The trace context of the span that queued it (empty when it does not decode).
    pub trace: TraceHeaders,
    /// A message that must not be delivered twice, committed longer ago than
    /// [`Claim::at_most_once_within`]: it must not be published any more.
    pub expired: bool,
}

/// Which waiting messages a relay may claim.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    /// Most messages to claim.
    pub limit: i64,
    /// Only messages committed at least this long ago (their committing process publishes
    /// the newer ones itself), or any age.
    pub older_than: Option<std::time::Duration>,
    /// Messages appended with [`append_direct`] only once at least this old (or as
    /// `older_than` says, if that is older): until then their committing process is
    /// publishing them, whichever process claims.
    pub direct_older_than: std::time::Duration,
    /// Messages this process is publishing now, left alone.
    pub except: &'a [Uuid],
    /// How long after its commit a message that must not be delivered twice may still be
    /// published: older ones are claimed marked [`Pending::expired`].
    pub at_most_once_within: std::time::Duration,
}

/// Waiting messages in commit order, as `which` says, locked until the end of the caller's
/// transaction; rows another relay holds are skipped (`FOR UPDATE SKIP LOCKED`).
pub async fn claim(
    conn: &mut PgConnection,
    which: Claim<'_>,
) -> Result<Vec<Pending>, StorageError> {
    let rows = sqlx::query(
        "SELECT position, id, subject, payload, headers,
                at_most_once AND created_at < now() - make_interval(secs => $5) AS expired
         FROM outbox
         WHERE ($2::float8 IS NULL OR created_at < now() - make_interval(secs => $2))
           AND (NOT direct OR created_at < now() - make_interval(secs => $4))
           AND NOT (id = ANY($3))
         ORDER BY position LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(which.limit)
    .bind(which.older_than.map(|age| age.as_secs_f64()))
    .bind(which.except)
    .bind(which.direct_older_than.as_secs_f64())
    .bind(which.at_most_once_within.as_secs_f64())
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Pending {
                position: row.try_get("position")?,
                id: row.try_get("id")?,
                subject: row.try_get("subject")?,
                payload: row.try_get("payload")?,
                trace: row
                    .try_get::<sqlx::types::Json<TraceHeaders>, _>("headers")
                    .map(|json| json.0)
                    .unwrap_or_default(),
                expired: row.try_get("expired")?,
            })
        })
        .collect()
}

/// Adds to a deletion's `WHERE` a condition that always holds and turns `synchronous_commit`
/// off for the rest of its transaction: the commit of a statement that deletes published messages does not wait for
/// the WAL to reach the disk. Such a deletion (with, in the claiming relay's transaction, the
/// moves to `outbox_dead` beside it, which a lost commit only makes the relay repeat) may be
/// lost to a crash of the PostgreSQL server (its last few hundred milliseconds of asynchronous
/// commits: three times `wal_writer_delay`, more if the disk stalls), and losing it is
/// harmless. The row is published again by a claiming relay and JetStream keeps one copy by
/// its id, or, for a message that must not be delivered twice and is past
/// [`Claim::at_most_once_within`], it is deleted unpublished, as after any deletion that
/// PostgreSQL's absence lost; a copy of an assignment that gets through anyway (a NATS restart
/// lost the duplicate memory) is refused by the agent, which is what the assignment's
/// guarantee rests on (docs/ARCHITECTURE.md, "Delivery"). Any synchronous commit that follows
/// it makes it durable too (the WAL is flushed in order), so nothing that read it and
/// committed can outlive it. Every other commit stays synchronous. Without it every relay's
/// batch of deletions waited for its own WAL flush, and those flushes queued with the
/// submissions' and the placements' commits.
macro_rules! without_waiting_for_the_disk {
    ($delete:literal) => {
        concat!(
            $delete,
            " AND (SELECT set_config('synchronous_commit', 'off', true)) = 'off'"
        )
    };
}

/// Deletes the messages at `positions` (published), committed without waiting for the disk
/// (see `without_waiting_for_the_disk!`).
pub async fn delete(conn: &mut PgConnection, positions: &[i64]) -> Result<(), StorageError> {
    if positions.is_empty() {
        return Ok(());
    }
    sqlx::query(without_waiting_for_the_disk!(
        "DELETE FROM outbox WHERE position = ANY($1)"
    ))
    .bind(positions)
    .execute(conn)
    .await?;
    Ok(())
}

/// Deletes the messages with these ids (published by the process that committed them),
/// committed without waiting for the disk (see `without_waiting_for_the_disk!`);
/// returns how many were still there.
pub async fn delete_ids(pool: &PgPool, ids: &[Uuid]) -> Result<u64, StorageError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let deleted = sqlx::query(without_waiting_for_the_disk!(
        "DELETE FROM outbox WHERE id = ANY($1)"
    ))
    .bind(ids)
    .execute(pool)
    .await?;
    Ok(deleted.rows_affected())
}

/// Moves the messages at the given positions to `outbox_dead`, each with the reason the
/// transport refused it for good. Returns how many moved.
pub async fn move_to_dead(
    conn: &mut PgConnection,
    refused: Vec<(i64, String)>,
) -> Result<u64, StorageError> {
    if refused.is_empty() {
        return Ok(0);
    }
    let (positions, reasons): (Vec<i64>, Vec<String>) = refused.into_iter().unzip();
    let moved = sqlx::query(
        "WITH dead AS (
             DELETE FROM outbox o USING unnest($1::bigint[], $2::text[]) AS d(position, reason)
             WHERE o.position = d.position
             RETURNING o.id, o.subject, o.payload, o.headers, o.created_at, d.reason
         )
         INSERT INTO outbox_dead (id, subject, payload, headers, created_at, reason)
         SELECT id, subject, payload, headers, created_at, reason FROM dead
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&positions)
    .bind(&reasons)
    .execute(conn)
    .await?;
    Ok(moved.rows_affected())
}

/// How many messages wait, and the age in seconds of the oldest (0 when none wait).
pub async fn backlog(pool: &PgPool) -> Result<(i64, f64), StorageError> {
    let (count, age): (i64, f64) = sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8
         FROM outbox",
    )
    .fetch_one(pool)
    .await?;
    Ok((count, age.max(0.0)))
}
