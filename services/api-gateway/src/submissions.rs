//! Group commit of submissions: concurrent `SubmitJob` calls hand their jobs to a few writers,
//! each of which records every submission waiting at that moment (up to [`MAX_BATCH`]) in one
//! transaction. A call is answered only once its job is committed, so durability is unchanged;
//! what is saved is a transaction (and a WAL flush) per call. A batch that cannot be recorded
//! as a whole is recorded submission by submission, so one bad submission fails alone.

use std::sync::Arc;

use hodei_runtime::Backends;
use hodei_storage::StorageError;
use hodei_storage::driver::{self, JobSubmitted, Recorded, Submission};
use tokio::sync::{Mutex, mpsc, oneshot};

/// Most submissions recorded in one transaction.
const MAX_BATCH: usize = 256;
/// Writers recording batches at the same time: while one commits, the next batch gathers.
const WRITERS: usize = 2;
/// Submissions that may wait for a writer; past this, calls wait to hand theirs over.
const QUEUE: usize = 1024;

/// What a call waits for.
type Answer = Result<JobSubmitted, StorageError>;

struct Waiting {
    submission: Submission,
    answer: oneshot::Sender<Answer>,
}

/// The handle the calls use; the writers stop once every handle is gone.
#[derive(Clone)]
pub struct Submissions {
    queue: mpsc::Sender<Waiting>,
}

/// Why a submission got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("the gateway is shutting down")]
    Stopped,
}

impl Submissions {
    /// Starts the writers.
    pub fn start(backends: Backends) -> Self {
        let (queue, waiting) = mpsc::channel(QUEUE);
        let waiting = Arc::new(Mutex::new(waiting));
        for _ in 0..WRITERS {
            tokio::spawn(write(backends.clone(), waiting.clone()));
        }
        Self { queue }
    }

    /// Records `submission` with the others waiting, and answers once it is committed.
    pub async fn submit(&self, submission: Submission) -> Result<JobSubmitted, SubmitError> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Waiting { submission, answer })
            .await
            .map_err(|_| SubmitError::Stopped)?;
        Ok(answered.await.map_err(|_| SubmitError::Stopped)??)
    }
}

/// One writer: takes what waits, records it, answers, until every handle is gone.
async fn write(backends: Backends, waiting: Arc<Mutex<mpsc::Receiver<Waiting>>>) {
    loop {
        let batch = {
            let mut waiting = waiting.lock().await;
            let Some(first) = waiting.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match waiting.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            batch
        };
        record(&backends, batch).await;
    }
}

async fn record(backends: &Backends, batch: Vec<Waiting>) {
    let (mut submissions, answers): (Vec<Submission>, Vec<oneshot::Sender<Answer>>) =
        batch.into_iter().map(|w| (w.submission, w.answer)).unzip();
    let recorded = backends
        .db(|| driver::submit_jobs(&backends.pool, &submissions))
        .await;
    match recorded {
        Ok(results) => {
            let committed = submissions
                .iter_mut()
                .zip(&results)
                .filter(|(_, result)| matches!(result, Recorded::New))
                .flat_map(|(submission, _)| std::mem::take(&mut submission.messages))
                .collect();
            backends.relay.hand_over(committed);
            for ((submission, answer), result) in submissions.into_iter().zip(answers).zip(results)
            {
                // A caller that went away still had its job recorded.
                let _ = answer.send(Ok(answered(submission, result)));
            }
        }
        Err(e) if submissions.len() == 1 => {
            if let Some(answer) = answers.into_iter().next() {
                let _ = answer.send(Err(e));
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, count = submissions.len(), "submission batch not recorded together, recording one by one");
            for (mut submission, answer) in submissions.into_iter().zip(answers) {
                let one = std::slice::from_ref(&submission);
                let result = backends
                    .db(|| driver::submit_jobs(&backends.pool, one))
                    .await
                    .and_then(|mut r| {
                        r.pop().ok_or_else(|| StorageError::Conflict {
                            what: "a submission recorded without an answer".to_owned(),
                        })
                    });
                if matches!(result, Ok(Recorded::New)) {
                    backends
                        .relay
                        .hand_over(std::mem::take(&mut submission.messages));
                }
                let _ = answer.send(result.map(|r| answered(submission, r)));
            }
        }
    }
}

/// The answer to `submission`, given what recording it did.
fn answered(submission: Submission, recorded: Recorded) -> JobSubmitted {
    match recorded {
        Recorded::New => JobSubmitted::Created(submission.job),
        Recorded::Existing(existing) => JobSubmitted::Existing(*existing),
        Recorded::OverQuota(reason) => JobSubmitted::OverQuota(reason),
    }
}
