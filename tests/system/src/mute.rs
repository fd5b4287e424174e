//! A worker driven by the test on the real bus: it beats (listing what it runs), reads its
//! commands and reports what the test tells it to, and does nothing else. Its beats can be
//! held back, as a partition between it and the registry does while it keeps its lease.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use hodei_domain::{AttemptId, AttemptNumber, AttemptOutcome, IncarnationId, JobId, WorkerId};
use hodei_messaging::{AgentCommand, AgentReport, Heartbeat, ReportKind, subjects};
use tokio_util::sync::CancellationToken;

use crate::{StartError, TestSystem, heartbeat, worker_id};

/// How often a mute worker beats.
const BEAT_EVERY: Duration = Duration::from_millis(200);

/// A worker that beats and reads its commands; see the module's documentation.
pub struct MuteWorker {
    id: WorkerId,
    _client: async_nats::Client,
    js: async_nats::jetstream::Context,
    commands: async_nats::Subscriber,
    running: Arc<Mutex<Vec<AttemptId>>>,
    silent: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl MuteWorker {
    /// Starts worker `id` with a 60 s lease and 1 s of kill grace.
    pub async fn start(system: &TestSystem, id: &str) -> Result<MuteWorker, StartError> {
        Self::start_leased(system, id, 60_000, 1_000).await
    }

    /// Starts worker `id`, announcing `lease_ms` and `kill_grace_ms` in its beats.
    pub async fn start_leased(
        system: &TestSystem,
        id: &str,
        lease_ms: u64,
        kill_grace_ms: u64,
    ) -> Result<MuteWorker, StartError> {
        let id = worker_id(id)?;
        // A test double subscribing to an agent's command subject directly: only admin may.
        let (client, js) = system.admin_nats().await?;
        let commands = client
            .subscribe(subjects::agent_commands(&id))
            .await
            .map_err(|e| StartError(format!("subscribing to {id}'s commands: {e}")))?;
        let running = Arc::new(Mutex::new(Vec::new()));
        let silent = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let incarnation = IncarnationId::new();
        {
            let (client, id, running, silent, stop) = (
                client.clone(),
                id.clone(),
                running.clone(),
                silent.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(BEAT_EVERY);
                while !stop.is_cancelled() {
                    tick.tick().await;
                    if silent.load(Ordering::SeqCst) {
                        continue;
                    }
                    let beat = Heartbeat {
                        incarnation,
                        lease_ms,
                        kill_grace_ms,
                        capacity: hodei_domain::Resources::new(4000, 4096),
                        running: running
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .clone(),
                        ..heartbeat(&id)
                    };
                    let Ok(payload) = serde_json::to_vec(&beat) else {
                        continue;
                    };
                    let _ = client
                        .publish(subjects::heartbeat(&id), payload.into())
                        .await;
                }
            });
        }
        Ok(MuteWorker {
            id,
            _client: client,
            js,
            commands,
            running,
            silent,
            stop,
        })
    }

    /// Its JetStream context (the admin credential's).
    pub fn js(&self) -> &async_nats::jetstream::Context {
        &self.js
    }

    /// Holds back its beats until [`MuteWorker::speak`].
    pub fn fall_silent(&self) {
        self.silent.store(true, Ordering::SeqCst);
    }

    /// Beats again.
    pub fn speak(&self) {
        self.silent.store(false, Ordering::SeqCst);
    }

    /// The next command for this worker, within `within`.
    pub async fn next_command(&mut self, within: Duration) -> Result<AgentCommand, StartError> {
        let message = tokio::time::timeout(within, self.commands.next())
            .await
            .map_err(|_| StartError(format!("no command for {} in {within:?}", self.id)))?
            .ok_or_else(|| StartError(format!("{}'s command subscription ended", self.id)))?;
        serde_json::from_slice(&message.payload)
            .map_err(|e| StartError(format!("a command for {} unreadable: {e}", self.id)))
    }

    /// Reports that the attempt started, as an agent would, and lists it in its beats.
    pub async fn report_started(
        &self,
        job_id: JobId,
        attempt: AttemptNumber,
    ) -> Result<(), StartError> {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(AttemptId::new(job_id, attempt));
        self.report(job_id, attempt, ReportKind::Started { pid: 4242 })
            .await
    }

    /// Reports that the attempt ended with `outcome` and `tail`, and no longer lists it.
    pub async fn report_finished(
        &self,
        job_id: JobId,
        attempt: AttemptNumber,
        outcome: AttemptOutcome,
        tail: Vec<String>,
    ) -> Result<(), StartError> {
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|a| *a != AttemptId::new(job_id, attempt));
        self.report(job_id, attempt, ReportKind::Finished { outcome, tail })
            .await
    }

    /// Publishes a report as an agent would, and waits for the stream to store it.
    pub async fn report(
        &self,
        job_id: JobId,
        attempt: AttemptNumber,
        kind: ReportKind,
    ) -> Result<(), StartError> {
        let report = AgentReport {
            report_id: uuid::Uuid::now_v7(),
            worker_id: self.id.clone(),
            job_id,
            attempt,
            at: Utc::now(),
            kind,
        };
        let payload = serde_json::to_vec(&report)
            .map_err(|e| StartError(format!("encoding a report: {e}")))?;
        self.js
            .publish(subjects::report(&self.id, &job_id), payload.into())
            .await
            .map_err(|e| StartError(format!("publishing a report: {e}")))?
            .await
            .map_err(|e| StartError(format!("storing a report: {e}")))?;
        Ok(())
    }
}

impl Drop for MuteWorker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
