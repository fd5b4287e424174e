//! Worker rows. The registry writes what heartbeats say (in batches); schedulers write
//! reservations (`held`) only `WHERE version = expected`, so replicas never over-commit.
//! A worker's last beat and the usage it reported are kept apart in `worker_beats`, which
//! only beats write, so that beats and reservations never wait for each other's row locks;
//! every read of a worker joins them. Transactions that lock both lock the `worker_beats` rows
//! first, each set in the order of the ids.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use hodei_domain::{IncarnationId, LeaseTerms, Resources, Worker, WorkerId, WorkerStatus};
use hodei_messaging::Heartbeat;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool};

use crate::error::{RowReader, StorageError, encode, to_i64};

/// A worker's columns, from [`FROM`]. Its last beat is the later of its beat row's and the
/// one a registry of the previous release may still write into `workers` during a rolling
/// update ([`LAST_BEAT`]), with that beat's usage.
const COLUMNS: &str = "w.id, w.labels, w.cpu_millis, w.memory_mb, w.max_concurrent_jobs, w.status, w.held, \
     CASE WHEN b.last_heartbeat_at IS NULL OR w.last_heartbeat_at > b.last_heartbeat_at \
          THEN w.usage ELSE b.usage END AS usage, \
     w.registered_at, greatest(b.last_heartbeat_at, w.last_heartbeat_at) AS last_heartbeat_at, w.version, \
     w.incarnation, w.lease_ms, w.kill_grace_ms, w.seal_key";

/// A worker's last beat (see [`COLUMNS`]); this release writes only `b`'s.
const LAST_BEAT: &str = "greatest(b.last_heartbeat_at, w.last_heartbeat_at)";

/// Workers with their beats.
const FROM: &str = "workers w LEFT JOIN worker_beats b ON b.worker_id = w.id";

/// One worker, if known.
pub async fn get(
    conn: impl sqlx::PgExecutor<'_>,
    id: &WorkerId,
) -> Result<Option<Worker>, StorageError> {
    let sql = format!("SELECT {COLUMNS} FROM {FROM} WHERE w.id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id.as_str())
        .fetch_optional(conn)
        .await?;
    row.as_ref().map(decode).transpose()
}

/// Workers with one of `statuses` (all when empty), by id, after `after`.
pub async fn list(
    pool: &PgPool,
    statuses: &[WorkerStatus],
    after: Option<&WorkerId>,
    limit: u32,
) -> Result<Vec<Worker>, StorageError> {
    let statuses: Option<Vec<&str>> =
        (!statuses.is_empty()).then(|| statuses.iter().map(WorkerStatus::as_str).collect());
    let sql = format!(
        "SELECT {COLUMNS} FROM {FROM}
         WHERE ($1::text[] IS NULL OR w.status = ANY($1)) AND ($2::text IS NULL OR w.id > $2)
         ORDER BY w.id LIMIT $3"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(statuses)
        .bind(after.map(WorkerId::as_str))
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    rows.iter().map(decode).collect()
}

/// Ready workers that beat after `alive_since`: the candidates for placement.
pub async fn placeable(
    pool: &PgPool,
    alive_since: DateTime<Utc>,
) -> Result<Vec<Worker>, StorageError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM {FROM}
         WHERE w.status = 'ready' AND {LAST_BEAT} >= $1 ORDER BY w.id"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(alive_since)
        .fetch_all(pool)
        .await?;
    rows.iter().map(decode).collect()
}

/// What the ready workers offer in all: the denominator of the tenants' shares.
pub async fn capacity(
    conn: impl sqlx::PgExecutor<'_>,
) -> Result<hodei_domain::Capacity, StorageError> {
    let (slots, cpu, memory): (Option<i64>, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT sum(max_concurrent_jobs)::bigint, sum(cpu_millis)::bigint, sum(memory_mb)::bigint
         FROM workers WHERE status = 'ready'",
    )
    .fetch_one(conn)
    .await?;
    let unsigned = |v: Option<i64>| u64::try_from(v.unwrap_or(0)).unwrap_or(0);
    Ok(hodei_domain::Capacity {
        slots: unsigned(slots),
        cpu_millis: unsigned(cpu),
        memory_mb: unsigned(memory),
    })
}

/// Inserts a worker, or overwrites every column of an existing one: for registration and
/// tests. Live updates use [`save_reservation`] and [`apply_heartbeats`].
pub async fn upsert(conn: &mut PgConnection, w: &Worker) -> Result<(), StorageError> {
    sqlx::query(
        "INSERT INTO worker_beats (worker_id, last_heartbeat_at, usage) VALUES ($1, $2, $3)
         ON CONFLICT (worker_id) DO UPDATE SET last_heartbeat_at = $2, usage = $3",
    )
    .bind(w.id().as_str())
    .bind(w.last_heartbeat_at())
    .bind(encode("resource usage", &w.usage())?)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO workers (id, labels, cpu_millis, memory_mb, max_concurrent_jobs, status, held,
                              registered_at, version, incarnation, lease_ms, kill_grace_ms, seal_key,
                              last_heartbeat_at, usage)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
         ON CONFLICT (id) DO UPDATE SET labels = $2, cpu_millis = $3, memory_mb = $4,
             max_concurrent_jobs = $5, status = $6, held = $7, registered_at = $8, version = $9,
             incarnation = $10, lease_ms = $11, kill_grace_ms = $12, seal_key = $13,
             last_heartbeat_at = $14, usage = $15",
    )
    .bind(w.id().as_str())
    .bind(encode("worker labels", w.labels())?)
    .bind(to_i64(w.capacity().cpu_millis))
    .bind(to_i64(w.capacity().memory_mb))
    .bind(i64::from(w.max_concurrent_jobs()))
    .bind(w.status().as_str())
    .bind(encode("held attempts", &w.held())?)
    .bind(w.registered_at())
    .bind(to_i64(w.version()))
    .bind(w.incarnation().map(|i| i.as_uuid()))
    .bind(to_i64(w.lease().lease_ms))
    .bind(to_i64(w.lease().kill_grace_ms))
    .bind(w.seal_key())
    .bind(w.last_heartbeat_at())
    .bind(encode("resource usage", &w.usage())?)
    .execute(conn)
    .await?;
    Ok(())
}

/// Saves a worker's reservations and status if its version is still `expected_version`;
/// otherwise `Conflict`.
pub async fn save_reservation(
    conn: &mut PgConnection,
    w: &Worker,
    expected_version: u64,
) -> Result<(), StorageError> {
    let updated = sqlx::query(
        "UPDATE workers SET held = $3, status = $4, version = $5 WHERE id = $1 AND version = $2",
    )
    .bind(w.id().as_str())
    .bind(to_i64(expected_version))
    .bind(encode("held attempts", &w.held())?)
    .bind(w.status().as_str())
    .bind(to_i64(w.version()))
    .execute(conn)
    .await?;
    if updated.rows_affected() == 0 {
        return Err(StorageError::Conflict {
            what: format!("worker {} at version {expected_version}", w.id()),
        });
    }
    Ok(())
}

/// The workers among `ids` that are known, by id, read in one statement inside the caller's
/// transaction, each row locked until it ends, in the order of their ids (see [`apply_heartbeats`]): what is read cannot move before it is
/// saved, so saving it cannot conflict. Their beats are read, not locked (see [`lock_beats`]).
pub async fn lock_many(
    conn: &mut PgConnection,
    ids: &[&WorkerId],
) -> Result<HashMap<WorkerId, Worker>, StorageError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let names: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
    let sql =
        format!("SELECT {COLUMNS} FROM {FROM} WHERE w.id = ANY($1) ORDER BY w.id FOR UPDATE OF w");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&names)
        .fetch_all(conn)
        .await?;
    rows.iter()
        .map(|row| decode(row).map(|w| (w.id().clone(), w)))
        .collect()
}

/// Locks the beat rows of `ids` in the order of their ids until the caller's transaction ends,
/// before it locks their workers: no beat of theirs is written meanwhile, so the times read
/// afterwards stay their last ones until it ends.
pub async fn lock_beats(conn: &mut PgConnection, ids: &[&WorkerId]) -> Result<(), StorageError> {
    if ids.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
    sqlx::query(
        "SELECT 1 FROM worker_beats WHERE worker_id = ANY($1) ORDER BY worker_id FOR UPDATE",
    )
    .bind(&names)
    .execute(conn)
    .await?;
    Ok(())
}

/// Locks the beat row of `id` until the caller's transaction ends (see [`lock_beats`]) and
/// returns the worker's last beat as it now stands; `None` for an unknown worker.
pub async fn lock_last_beat(
    conn: &mut PgConnection,
    id: &WorkerId,
) -> Result<Option<DateTime<Utc>>, StorageError> {
    lock_beats(&mut *conn, &[id]).await?;
    let sql = format!("SELECT {LAST_BEAT} FROM {FROM} WHERE w.id = $1");
    let beat: Option<Option<DateTime<Utc>>> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(id.as_str())
        .fetch_optional(conn)
        .await?;
    Ok(beat.flatten())
}

/// [`save_reservation`] for many workers in one statement, each at the version it was read
/// at; `Conflict` if any moved (the caller's transaction must then be rolled back).
pub async fn save_reservations(
    conn: &mut PgConnection,
    changes: &[(&Worker, u64)],
) -> Result<(), StorageError> {
    if changes.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = changes.iter().map(|(w, _)| w.id().as_str()).collect();
    // Locked in the order of their ids first (see `apply_heartbeats`): placements, reports
    // and heartbeats write overlapping sets of workers at the same time.
    sqlx::query("SELECT 1 FROM workers WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .bind(&ids)
        .execute(&mut *conn)
        .await?;
    save_locked_reservations(conn, changes).await
}

/// [`save_reservations`] for workers the caller's transaction has already locked (with
/// [`lock_many`]): the same update, without locking them again.
pub async fn save_locked_reservations(
    conn: &mut PgConnection,
    changes: &[(&Worker, u64)],
) -> Result<(), StorageError> {
    if changes.is_empty() {
        return Ok(());
    }
    let n = changes.len();
    let mut ids = Vec::with_capacity(n);
    let mut expected = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut versions = Vec::with_capacity(n);
    for (w, version) in changes {
        ids.push(w.id().as_str());
        expected.push(to_i64(*version));
        held.push(encode("held attempts", &w.held())?);
        statuses.push(w.status().as_str());
        versions.push(to_i64(w.version()));
    }
    let updated = sqlx::query(
        "UPDATE workers w SET held = u.held, status = u.status, version = u.version
         FROM unnest($1::text[], $2::bigint[], $3::jsonb[], $4::text[], $5::bigint[])
              AS u(id, expected, held, status, version)
         WHERE w.id = u.id AND w.version = u.expected",
    )
    .bind(&ids)
    .bind(&expected)
    .bind(&held)
    .bind(&statuses)
    .bind(&versions)
    .execute(conn)
    .await?;
    let saved = usize::try_from(updated.rows_affected()).unwrap_or(usize::MAX);
    if saved != n {
        return Err(StorageError::Conflict {
            what: format!("{} of {n} workers saved together", n.saturating_sub(saved)),
        });
    }
    Ok(())
}

/// How a heartbeat changed a worker's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatEffect {
    /// First heartbeat: the worker was inserted.
    Registered,
    /// The worker was unreachable, lost or offline and is ready again.
    Returned,
    /// The worker asked to drain.
    Draining,
    /// The agent said goodbye: the worker is offline (attempts it still holds are handed
    /// back by the registry).
    Offline,
    /// Nothing but the usage and time changed.
    Refreshed,
}

/// What a batch of heartbeats did to one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatApplied {
    pub worker_id: WorkerId,
    pub effect: HeartbeatEffect,
    /// The incarnation stored before this beat, when it differs from the beat's: the agent
    /// restarted, and the attempts of the previous incarnation are gone.
    pub replaced_incarnation: Option<Option<IncarnationId>>,
}

/// Applies a batch of heartbeats in two statements: every beat's time and usage into
/// `worker_beats`; then, into `workers`, only the beats that change the worker beyond those:
/// inserts unknown workers, refreshes labels, capacity, incarnation, lease terms and seal key,
/// brings unreachable, lost or offline workers back to ready, marks draining ones, and takes
/// offline those whose agent said goodbye (`leaving`). A beat that changes nothing else leaves
/// the worker's row (and its lock) alone, so it never waits for a placement. A worker in
/// `hold_back` (it still runs attempts that are no longer its own) is not brought back to
/// ready until it has killed them. Reservations (`held`) are never touched here. Every beat
/// must have passed [`hodei_messaging::Heartbeat`] validation (numbers in range), and a batch
/// holds one beat a worker. Returns each worker's effect. A beat of another incarnation than
/// the worker's, older than its last beat written (taken by another registry and written
/// late), changes neither the worker's row nor its incarnation.
///
/// The beat rows are written (and locked) first, as the liveness sweep locks them before it
/// marks a worker unreachable: a sweep that began first has committed before the second
/// statement reads the workers, which then sees its mark and brings the worker back.
pub async fn apply_heartbeats(
    conn: &mut PgConnection,
    beats: &[(Heartbeat, DateTime<Utc>)],
    hold_back: &std::collections::HashSet<WorkerId>,
) -> Result<Vec<HeartbeatApplied>, StorageError> {
    if beats.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    let mut cpus = Vec::new();
    let mut mems = Vec::new();
    let mut maxes = Vec::new();
    let mut usages = Vec::new();
    let mut seen = Vec::new();
    let mut draining = Vec::new();
    let mut leaving = Vec::new();
    let mut held_back = Vec::new();
    let mut incarnations = Vec::new();
    let mut leases = Vec::new();
    let mut graces = Vec::new();
    let mut seal_keys = Vec::new();
    for (hb, at) in beats {
        incarnations.push(hb.incarnation.as_uuid());
        leases.push(to_i64(hb.lease_ms));
        graces.push(to_i64(hb.kill_grace_ms));
        seal_keys.push(hb.seal_key.as_deref());
        held_back.push(hold_back.contains(&hb.worker_id));
        ids.push(hb.worker_id.as_str());
        labels.push(encode("worker labels", &hb.labels)?);
        cpus.push(to_i64(hb.capacity.cpu_millis));
        mems.push(to_i64(hb.capacity.memory_mb));
        maxes.push(i64::from(hb.max_concurrent_jobs));
        usages.push(encode("resource usage", &hb.usage)?);
        seen.push(*at);
        draining.push(hb.draining);
        leaving.push(hb.leaving);
    }
    // Rows are upserted (and locked) in the order of their ids, the order every statement
    // that writes several workers (or their beats) locks them in, so two such transactions
    // never deadlock.
    sqlx::query(
        "INSERT INTO worker_beats AS b (worker_id, last_heartbeat_at, usage)
         SELECT id, seen, usage FROM unnest($1::text[], $2::timestamptz[], $3::jsonb[])
             AS t(id, seen, usage)
         ORDER BY id
         ON CONFLICT (worker_id) DO UPDATE SET
             last_heartbeat_at = greatest(b.last_heartbeat_at, excluded.last_heartbeat_at),
             usage = CASE WHEN excluded.last_heartbeat_at >= b.last_heartbeat_at
                          THEN excluded.usage ELSE b.usage END",
    )
    .bind(&ids)
    .bind(&seen)
    .bind(&usages)
    .execute(&mut *conn)
    .await?;
    #[allow(clippy::type_complexity)]
    let rows: Vec<(String, Option<String>, String, Option<uuid::Uuid>, uuid::Uuid)> = sqlx::query_as(
        "WITH input AS (
             SELECT *, CASE WHEN leaving THEN 'offline' WHEN draining THEN 'draining'
                            WHEN held_back THEN 'lost' ELSE 'ready' END AS status
             FROM unnest($1::text[], $2::jsonb[], $3::bigint[], $4::bigint[], $5::bigint[],
                         $6::timestamptz[], $7::bool[], $8::bool[], $9::bool[], $10::uuid[],
                         $11::bigint[], $12::bigint[], $13::text[])
                 AS t(id, labels, cpu, mem, maxc, seen, draining, held_back, leaving,
                      incarnation, lease_ms, kill_grace_ms, seal_key)
         ),
         -- The statement's snapshot: the worker before this beat. (With FOR UPDATE this CTE
         -- would skip the rows the upsert below changes, and every beat would look like a
         -- first registration.) Materialized: read once by primary key, not joined again.
         old AS MATERIALIZED (
             SELECT w.id, w.status, w.incarnation, w.labels, w.cpu_millis, w.memory_mb,
                    w.max_concurrent_jobs, w.lease_ms, w.kill_grace_ms, w.seal_key
             FROM workers w JOIN input i ON i.id = w.id
         ),
         -- The beats that change the worker's row: the same tests as the upsert's below. A
         -- beat older than one already written (two registries share the beats, and one may
         -- write late) changes nothing when it is of another incarnation (it would bring back
         -- an incarnation that is gone) or when the worker said goodbye (it would undo it:
         -- the agent is gone).
         changing AS MATERIALIZED (
             SELECT i.* FROM input i LEFT JOIN old o ON o.id = i.id
             WHERE NOT (o.id IS NOT NULL
                        AND (i.incarnation IS DISTINCT FROM o.incarnation
                             OR (o.status = 'offline' AND i.status <> 'offline'))
                        AND EXISTS (SELECT 1 FROM worker_beats b
                                    WHERE b.worker_id = i.id AND b.last_heartbeat_at > i.seen))
               AND (o.id IS NULL
                OR (i.status = 'offline' AND o.status <> 'offline')
                OR (i.status = 'draining' AND o.status <> 'draining')
                OR (i.status = 'ready' AND o.status IN ('unreachable', 'lost', 'offline'))
                OR i.incarnation IS DISTINCT FROM o.incarnation
                OR i.labels <> o.labels OR i.cpu <> o.cpu_millis OR i.mem <> o.memory_mb
                OR i.maxc <> o.max_concurrent_jobs OR i.lease_ms <> o.lease_ms
                OR i.kill_grace_ms <> o.kill_grace_ms OR i.seal_key IS DISTINCT FROM o.seal_key)
         ),
         upserted AS (
             INSERT INTO workers AS w (id, labels, cpu_millis, memory_mb, max_concurrent_jobs, status, held,
                                       registered_at, last_heartbeat_at, version, incarnation,
                                       lease_ms, kill_grace_ms, seal_key)
             SELECT id, labels, cpu, mem, maxc, status, '[]', seen, seen, 0, incarnation, lease_ms,
                    kill_grace_ms, seal_key
             FROM changing ORDER BY id
             ON CONFLICT (id) DO UPDATE SET
                 labels = excluded.labels, cpu_millis = excluded.cpu_millis, memory_mb = excluded.memory_mb,
                 max_concurrent_jobs = excluded.max_concurrent_jobs,
                 incarnation = excluded.incarnation, lease_ms = excluded.lease_ms,
                 kill_grace_ms = excluded.kill_grace_ms, seal_key = excluded.seal_key,
                 status = CASE
                     WHEN excluded.status = 'offline' AND w.status <> 'offline' THEN 'offline'
                     WHEN excluded.status = 'offline' THEN w.status
                     WHEN excluded.status = 'draining' AND w.status <> 'draining' THEN 'draining'
                     WHEN excluded.status = 'ready' AND w.status IN ('unreachable', 'lost', 'offline') THEN 'ready'
                     ELSE w.status END,
                 version = CASE
                     WHEN (excluded.status = 'offline' AND w.status <> 'offline')
                       OR (excluded.status = 'draining' AND w.status <> 'draining')
                       OR (excluded.status = 'ready' AND w.status IN ('unreachable', 'lost', 'offline'))
                       OR excluded.incarnation IS DISTINCT FROM w.incarnation
                     THEN w.version + 1 ELSE w.version END
             RETURNING w.id, w.status, w.incarnation
         )
         SELECT u.id, o.status, u.status, o.incarnation, u.incarnation
         FROM upserted u LEFT JOIN old o ON o.id = u.id
         UNION ALL
         SELECT o.id, o.status, o.status, o.incarnation, o.incarnation
         FROM old o WHERE NOT EXISTS (SELECT 1 FROM changing c WHERE c.id = o.id)",
    )
    .bind(&ids)
    .bind(&labels)
    .bind(&cpus)
    .bind(&mems)
    .bind(&maxes)
    .bind(&seen)
    .bind(&draining)
    .bind(&held_back)
    .bind(&leaving)
    .bind(&incarnations)
    .bind(&leases)
    .bind(&graces)
    .bind(&seal_keys)
    .fetch_all(conn)
    .await?;
    rows.into_iter()
        .map(|(id, old, new, old_incarnation, new_incarnation)| {
            let worker_id: WorkerId =
                id.parse()
                    .map_err(|e: hodei_domain::IdError| StorageError::Corrupt {
                        table: "workers",
                        id: id.clone(),
                        column: "id",
                        reason: e.to_string(),
                    })?;
            let effect = match (old.as_deref(), new.as_str()) {
                (None, _) => HeartbeatEffect::Registered,
                (Some("unreachable" | "lost" | "offline"), "ready") => HeartbeatEffect::Returned,
                (Some(o), "draining") if o != "draining" => HeartbeatEffect::Draining,
                (Some(o), "offline") if o != "offline" => HeartbeatEffect::Offline,
                _ => HeartbeatEffect::Refreshed,
            };
            let replaced_incarnation = (old.is_some() && old_incarnation != Some(new_incarnation))
                .then(|| old_incarnation.map(IncarnationId::from_uuid));
            Ok(HeartbeatApplied {
                worker_id,
                effect,
                replaced_incarnation,
            })
        })
        .collect()
}

/// Ready or draining workers whose last heartbeat is older than `silent_since`. The beats are
/// read first, and only the silent ones' workers (every worker has its beat row from the
/// moment it is inserted: the trigger `workers_beat_row`).
pub async fn silent(
    pool: &PgPool,
    silent_since: DateTime<Utc>,
) -> Result<Vec<Worker>, StorageError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM worker_beats b JOIN workers w ON w.id = b.worker_id
         WHERE b.last_heartbeat_at < $1 AND w.last_heartbeat_at < $1
           AND w.status IN ('ready', 'draining')"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(silent_since)
        .fetch_all(pool)
        .await?;
    rows.iter().map(decode).collect()
}

/// Workers that may have attempts to hand back: unreachable ones, lost or offline ones that
/// still hold attempts (a goodbye, or a loss whose hand-back was deferred), and any that holds
/// attempts placed with another incarnation of its agent than its current one. Found through
/// the partial index `workers_to_hand_back`: the incarnation test is stored at each write.
pub async fn holding_unreachable_or_gone(pool: &PgPool) -> Result<Vec<Worker>, StorageError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM {FROM}
         WHERE (w.status IN ('unreachable', 'lost', 'offline') OR w.holds_other_incarnation)
           AND (w.status = 'unreachable'
                OR (w.status IN ('lost', 'offline') AND w.held <> '[]'::jsonb)
                OR w.holds_other_incarnation)"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await?;
    rows.iter().map(decode).collect()
}

/// How many workers are live (ready, draining or unreachable): the fleet a partition is
/// measured against.
pub async fn live_count(pool: &PgPool) -> Result<i64, StorageError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM workers WHERE status IN ('ready', 'draining', 'unreachable')",
    )
    .fetch_one(pool)
    .await?)
}

fn decode(row: &PgRow) -> Result<Worker, StorageError> {
    let (_, r) = RowReader::with_id::<String>("workers", row)?;
    let worker_id: WorkerId = r.parse("id")?;
    let max: i32 = r.get("max_concurrent_jobs")?;
    Ok(Worker::restore(
        worker_id,
        r.json("labels")?,
        Resources::new(r.unsigned("cpu_millis")?, r.unsigned("memory_mb")?),
        u32::try_from(max)
            .map_err(|_| r.corrupt("max_concurrent_jobs", format!("negative value {max}")))?,
        r.parse("status")?,
        r.json("held")?,
        r.json("usage")?,
        r.get("registered_at")?,
        r.get("last_heartbeat_at")?,
        r.unsigned("version")?,
        r.get::<Option<uuid::Uuid>>("incarnation")?
            .map(IncarnationId::from_uuid),
        LeaseTerms::new(r.unsigned("lease_ms")?, r.unsigned("kill_grace_ms")?)
            .map_err(|e| r.corrupt("lease_ms", e.to_string()))?,
    )
    .with_seal_key(r.get("seal_key")?))
}

/// How many workers are in each status that has any.
pub async fn count_by_status(pool: &PgPool) -> Result<Vec<(String, i64)>, StorageError> {
    Ok(
        sqlx::query_as("SELECT status, count(*) FROM workers GROUP BY status")
            .fetch_all(pool)
            .await?,
    )
}
