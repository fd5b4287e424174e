//! What an agent leaves for its next incarnation: one small file per attempt in
//! `<work dir>/.attempts/`, written when the process starts (its process group) and again the
//! moment it ends (its outcome), removed once the `Finished` report is stored.
//!
//! Every job's process-group leader dies with its agent (`PR_SET_PDEATHSIG`, set before the
//! job's program is executed: see [`crate::launch`]). At start, the agent [`recover`]s what the
//! previous incarnation left: it kills whatever is left of those process groups (only
//! processes whose environment names that very attempt, so a reused group id is never hit),
//! and reports each attempt: with the outcome recorded when the process had ended, otherwise
//! as lost. The report reuses the recorded report id, so a report the previous incarnation
//! already stored is de-duplicated by the server.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use hodei_domain::{AttemptId, AttemptOutcome};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uuid::Uuid;

/// The folder, inside the work folder, holding the attempt records.
const FOLDER: &str = ".attempts";

/// The reason reported for an attempt whose process the previous incarnation left running.
pub const RESTARTED_REASON: &str =
    "the agent restarted while the attempt ran: its process was killed with the agent";

/// One attempt, as recorded for the next incarnation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub attempt: AttemptId,
    /// The process group of the job (its leader's pid).
    pub pgid: i32,
    /// The id of the attempt's `Finished` report, the same in every incarnation.
    pub report_id: Uuid,
    /// How the process ended, once it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<AttemptOutcome>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tail: Vec<String>,
}

/// The records of one work folder.
#[derive(Debug, Clone)]
pub(crate) struct Records {
    dir: PathBuf,
}

impl Records {
    /// The records under `work_dir`, creating their folder.
    pub fn open(work_dir: &Path) -> io::Result<Records> {
        let dir = work_dir.join(FOLDER);
        std::fs::create_dir_all(&dir)?;
        Ok(Records { dir })
    }

    /// The folder the records are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, attempt: &AttemptId) -> PathBuf {
        self.dir
            .join(format!("{}-{}.json", attempt.job_id, attempt.attempt))
    }

    /// Writes `record` (atomically: a reader sees the old or the new one, never half).
    /// Small and synchronous on purpose: it is written the moment a process ends, before
    /// anything else can be lost with the agent.
    pub fn write(&self, record: &Record) {
        let path = self.path(&record.attempt);
        let tmp = path.with_extension("tmp");
        let result = serde_json::to_vec(record)
            .map_err(io::Error::other)
            .and_then(|json| std::fs::write(&tmp, json))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            warn!(job_id = %record.attempt.job_id, attempt = %record.attempt.attempt, path = %path.display(), error = %e, "failed to write attempt record");
        }
    }

    /// Removes the record of `attempt`: its report is stored.
    pub fn remove(&self, attempt: &AttemptId) {
        match std::fs::remove_file(self.path(attempt)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(job_id = %attempt.job_id, attempt = %attempt.attempt, error = %e, "failed to remove attempt record")
            }
        }
    }

    /// Every record left in the folder; unreadable ones are logged and removed.
    pub fn left(&self) -> Vec<Record> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(path = %self.dir.display(), error = %e, "failed to read attempt records");
                return Vec::new();
            }
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<Record>(&bytes).map_err(|e| e.to_string())
                }) {
                Ok(record) => records.push(record),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unreadable attempt record removed");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        records
    }
}

/// Kills every process left in `record`'s process group that belongs to that attempt (its
/// environment names the job and the attempt). Returns how many were killed.
pub(crate) fn kill_leftovers(record: &Record) -> usize {
    let job = OsString::from(record.attempt.job_id.to_string());
    let attempt = OsString::from(record.attempt.attempt.to_string());
    let processes = match procfs::process::all_processes() {
        Ok(processes) => processes,
        Err(e) => {
            warn!(error = %e, "failed to list processes, leftovers of the previous incarnation not swept");
            return 0;
        }
    };
    let mut killed = 0;
    for process in processes.flatten() {
        let Ok(stat) = process.stat() else { continue };
        if stat.pgrp != record.pgid {
            continue;
        }
        let Ok(env) = process.environ() else { continue };
        let ours = env.get(&OsString::from("HODEI_JOB_ID")) == Some(&job)
            && env.get(&OsString::from("HODEI_ATTEMPT")) == Some(&attempt);
        if ours && kill(Pid::from_raw(process.pid), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    if killed > 0 {
        info!(job_id = %record.attempt.job_id, attempt = %record.attempt.attempt, pgid = record.pgid, killed, "killed what the previous incarnation left running");
    }
    killed
}

/// The outcome to report for an attempt the previous incarnation left.
pub(crate) fn outcome_of(record: &Record) -> AttemptOutcome {
    record.outcome.clone().unwrap_or(AttemptOutcome::Lost {
        reason: RESTARTED_REASON.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use hodei_domain::{AttemptNumber, JobId};

    use super::*;

    #[test]
    fn records_survive_the_agent_and_are_removed_once_reported() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path()).unwrap();
        let attempt = AttemptId::new(JobId::new(), AttemptNumber::new(2));
        let mut record = Record {
            attempt,
            pgid: 1234,
            report_id: Uuid::now_v7(),
            outcome: None,
            tail: Vec::new(),
        };
        records.write(&record);
        assert_eq!(records.left(), vec![record.clone()]);
        assert!(matches!(outcome_of(&record), AttemptOutcome::Lost { .. }));
        record.outcome = Some(AttemptOutcome::Exited { code: 0 });
        records.write(&record);
        assert_eq!(
            Records::open(dir.path()).unwrap().left(),
            vec![record.clone()]
        );
        assert_eq!(outcome_of(&record), AttemptOutcome::Exited { code: 0 });
        std::fs::write(dir.path().join(FOLDER).join("junk.json"), b"{").unwrap();
        assert_eq!(records.left().len(), 1, "an unreadable record is dropped");
        records.remove(&attempt);
        assert!(records.left().is_empty());
    }

    #[test]
    fn leftovers_are_killed_only_when_they_belong_to_the_attempt() {
        use std::os::unix::process::{CommandExt, ExitStatusExt};
        let attempt = AttemptId::new(JobId::new(), AttemptNumber::new(1));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("HODEI_JOB_ID", attempt.job_id.to_string())
            .env("HODEI_ATTEMPT", "1")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = i32::try_from(child.id()).unwrap();
        let mut record = Record {
            attempt: AttemptId::new(attempt.job_id, AttemptNumber::new(2)),
            pgid,
            report_id: Uuid::now_v7(),
            outcome: None,
            tail: Vec::new(),
        };
        assert_eq!(
            kill_leftovers(&record),
            0,
            "another attempt's process is spared"
        );
        record.attempt = attempt;
        assert_eq!(kill_leftovers(&record), 1);
        assert_eq!(child.wait().unwrap().signal(), Some(9));
    }
}
