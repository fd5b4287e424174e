//! Reference rates measured in the same run as the system figures, on the same servers:
//! raw JetStream persisted publishes (file storage, acknowledgements awaited in batches),
//! PostgreSQL batched inserts (`INSERT … SELECT FROM unnest`) and, for real agents, how fast
//! this machine starts and reaps a program with nothing around it. The system's figures are read
//! as ratios against them, which survives a noisy, shared machine better than absolutes.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::stream::{Config, StorageType};
use sqlx::PgPool;

/// Messages awaited together in the JetStream reference.
const JS_BATCH: usize = 1_000;
/// Rows per statement in the PostgreSQL reference.
const PG_BATCH: usize = 1_000;

/// Publishes `count` messages of `size` bytes to a file-storage stream of its own, awaiting
/// the acknowledgements `JS_BATCH` at a time. Returns messages per second.
pub async fn jetstream_publishes(
    nats_url: &str,
    auth: &hodei_messaging::NatsAuth,
    count: usize,
    size: usize,
) -> anyhow::Result<f64> {
    let (_client, js) = hodei_messaging::connect_with(
        nats_url,
        "hodei-bench-reference",
        Duration::from_secs(10),
        auth,
    )
    .await
    .context("failed to connect for the jetstream reference")?;
    js.create_stream(Config {
        name: "BENCH_REFERENCE".to_owned(),
        subjects: vec!["bench.reference.>".to_owned()],
        storage: StorageType::File,
        ..Default::default()
    })
    .await
    .context("failed to create the reference stream")?;
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    let mut sent = 0;
    while sent < count {
        let n = JS_BATCH.min(count - sent);
        let mut acks = Vec::with_capacity(n);
        for i in 0..n {
            let subject = format!("bench.reference.{}", (sent + i) % 64);
            acks.push(
                js.publish(subject, payload.clone())
                    .await
                    .context("failed to publish a reference message")?,
            );
        }
        for ack in
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
        {
            ack.context("reference message not acknowledged")?;
        }
        sent += n;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    js.delete_stream("BENCH_REFERENCE")
        .await
        .context("failed to delete the reference stream")?;
    Ok(rate)
}

/// Inserts `count` rows shaped like a job row's fixed part (uuid, text, jsonb, timestamps)
/// into a table of its own, `PG_BATCH` rows per `INSERT … SELECT FROM unnest`, each statement
/// its own committed transaction. Returns rows per second.
pub async fn postgres_inserts(pool: &PgPool, count: usize) -> anyhow::Result<f64> {
    sqlx::query(
        "CREATE TABLE bench_reference (
            id uuid PRIMARY KEY, name text NOT NULL, state text NOT NULL, spec jsonb NOT NULL,
            created_at timestamptz NOT NULL)",
    )
    .execute(pool)
    .await
    .context("failed to create the reference table")?;
    let spec = serde_json::json!({"name": "noop", "command": {"exec": {"argv": ["true"]}}});
    let started = Instant::now();
    let mut done = 0;
    while done < count {
        let n = PG_BATCH.min(count - done);
        let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::now_v7()).collect();
        let names: Vec<String> = (done..done + n).map(|i| format!("noop-{i}")).collect();
        let specs: Vec<serde_json::Value> = vec![spec.clone(); n];
        sqlx::query(
            "INSERT INTO bench_reference (id, name, state, spec, created_at)
             SELECT id, name, 'queued', spec, now()
             FROM unnest($1::uuid[], $2::text[], $3::jsonb[]) AS t(id, name, spec)",
        )
        .bind(&ids)
        .bind(&names)
        .bind(&specs)
        .execute(pool)
        .await
        .context("failed to insert reference rows")?;
        done += n;
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE bench_reference")
        .execute(pool)
        .await
        .context("failed to drop the reference table")?;
    Ok(rate)
}

/// Starts `program` `count` times, from as many threads as the machine has cores, each
/// waiting for its process to exit before starting the next (std's spawn: `posix_spawn`
/// where it can, the cheapest way to start a program). Returns processes per second and
/// the number of threads.
pub async fn process_starts(program: &str, count: usize) -> anyhow::Result<(f64, usize)> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let program = program.to_owned();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        std::thread::scope(|scope| {
            let runs: Vec<_> = (0..threads)
                .map(|t| {
                    let program = &program;
                    let mine = count / threads + usize::from(t < count % threads);
                    scope.spawn(move || -> anyhow::Result<()> {
                        for _ in 0..mine {
                            let status = std::process::Command::new(program)
                                .stdin(std::process::Stdio::null())
                                .stdout(std::process::Stdio::null())
                                .stderr(std::process::Stdio::null())
                                .status()
                                .with_context(|| format!("failed to start {program}"))?;
                            anyhow::ensure!(status.success(), "{program} ended with {status}");
                        }
                        Ok(())
                    })
                })
                .collect();
            for run in runs {
                run.join()
                    .map_err(|_| anyhow::anyhow!("a process-start thread panicked"))??;
            }
            Ok::<(), anyhow::Error>(())
        })?;
        Ok((count as f64 / started.elapsed().as_secs_f64(), threads))
    })
    .await
    .context("the process-start reference task failed")?
}
