//! What an agent leaves for its next incarnation: a record per attempt, written when the
//! process starts (its process group) and again the moment it ends (its outcome), dropped once
//! the `Finished` report is stored.
//!
//! The records are lines appended to one journal, `<work dir>/.attempts/journal` (JSON, one
//! entry a line: a record as it now is, or the removal of one). A line is written with one
//! system call, so a reader sees each entry whole, or a torn last line that it skips (the
//! attempt then keeps its previous record). Once the journal has grown past
//! [`COMPACT_AT`] bytes it is rewritten with only the records still held (to a temporary file,
//! then renamed over it; the file is readable by the agent's user only). A journal that
//! cannot be read or written is logged and does not stop the agent, and is written whole again
//! at the next record. A file per attempt, written through a temporary file and a rename,
//! made three files and removed them again for every job: on ext4 each new inode scans the
//! inodes freed lately, and that was a third of the agent's own CPU at a few hundred jobs a
//! second. Records in that older form (`<job id>-<attempt>.json`) are still read at start.
//!
//! Every job's process-group leader dies with its agent (`PR_SET_PDEATHSIG`, set before the
//! job's program is executed: see [`crate::launch`]). At start, the agent [`recover`]s what the
//! previous incarnation left: it kills whatever is left of those process groups (only
//! processes whose environment names that very attempt, so a reused group id is never hit),
//! and reports each attempt: with the outcome recorded when the process had ended, otherwise
//! as lost. The report reuses the recorded report id, so a report the previous incarnation
//! already stored is de-duplicated by the server.
//!
//! [`recover`]: crate::agent

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hodei_domain::{AttemptId, AttemptOutcome};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use uuid::Uuid;

/// The folder, inside the work folder, holding the attempt records.
const FOLDER: &str = ".attempts";
/// The journal's name inside [`FOLDER`].
const JOURNAL: &str = "journal";
/// The journal's size past which it is rewritten with only the records still held (a few
/// thousand entries: one rewrite every thousand jobs or so).
const COMPACT_AT: u64 = 512 * 1024;

/// The reason reported for an attempt whose process the previous incarnation left running.
pub const RESTARTED_REASON: &str =
    "the agent restarted while the attempt ran: its process was killed with the agent";

/// The reason reported for an attempt whose process exited 0 while the previous incarnation
/// had not yet kept the step's artifacts: the step did not succeed (its artifacts may be
/// missing or partial), and is retried as any attempt whose artifacts failed.
pub const ARTIFACTS_INTERRUPTED_REASON: &str =
    "the agent restarted before the step's artifacts were kept";

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

/// One line of the journal, as written.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
enum EntryOut<'a> {
    Record(&'a Record),
    Removed { attempt: &'a AttemptId },
}

/// One line of the journal, as read back.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum EntryIn {
    Record(Record),
    Removed { attempt: AttemptId },
}

/// The records of one work folder. Clones share the journal.
#[derive(Debug, Clone)]
pub(crate) struct Records {
    dir: PathBuf,
    journal: Arc<Mutex<Journal>>,
    /// What the previous incarnation left, as found at [`Records::open`].
    left: Arc<Vec<Record>>,
}

#[derive(Debug)]
struct Journal {
    path: PathBuf,
    /// The journal opened for appending; `None` until it is (re)written: at start, and after a
    /// write that failed part-way (the file may end in a torn line, so nothing is appended to
    /// it).
    file: Option<File>,
    /// Bytes in the file.
    size: u64,
    /// The least size at which the file is rewritten.
    bound: u64,
    /// Rewrite once the file is larger than this: [`Journal::bound`], or twice the records
    /// held when more than that, so that many large records do not make every write a rewrite.
    compact_at: u64,
    /// Every record held, as last written.
    held: HashMap<AttemptId, Record>,
}

impl Records {
    /// The records under `work_dir`, creating their folder, with what the previous
    /// incarnation left read into memory and the journal rewritten with only that.
    pub fn open(work_dir: &Path) -> io::Result<Records> {
        Records::open_with(work_dir, COMPACT_AT)
    }

    fn open_with(work_dir: &Path, bound: u64) -> io::Result<Records> {
        let dir = work_dir.join(FOLDER);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(JOURNAL);
        // A journal that cannot be read or written (a full disk, a failing device) must not
        // keep the agent from starting: it is what sweeps the previous incarnation's jobs and
        // workspaces away. It is written again at the next record.
        let mut held = read_journal(&path).unwrap_or_else(|e| {
            warn!(path = %path.display(), error = %e, "failed to read the attempt journal");
            HashMap::new()
        });
        let older = read_files(&dir, &mut held);
        let mut left: Vec<Record> = held.values().cloned().collect();
        left.sort_by_key(|r| r.attempt);
        let mut journal = Journal {
            path,
            file: None,
            size: 0,
            bound,
            compact_at: bound,
            held,
        };
        match journal.rewrite() {
            // Only once their records are in the journal.
            Ok(()) => {
                for older in older {
                    let _ = std::fs::remove_file(older);
                }
            }
            Err(e) => {
                warn!(path = %journal.path.display(), error = %e, "failed to write the attempt journal")
            }
        }
        Ok(Records {
            dir,
            journal: Arc::new(Mutex::new(journal)),
            left: Arc::new(left),
        })
    }

    /// The folder the records are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> MutexGuard<'_, Journal> {
        // A panic while holding the lock leaves the map whole (it is changed in one call).
        self.journal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `record`, replacing the attempt's previous one. Small and synchronous on
    /// purpose: it is written the moment a process ends, before anything else can be lost
    /// with the agent.
    pub fn write(&self, record: &Record) {
        let mut journal = self.lock();
        journal.held.insert(record.attempt, record.clone());
        if let Err(e) = journal.append(&EntryOut::Record(record)) {
            warn!(job_id = %record.attempt.job_id, attempt = %record.attempt.attempt, path = %journal.path.display(), error = %e, "failed to write attempt record");
        }
    }

    /// Drops the record of `attempt`: its report is stored.
    pub fn remove(&self, attempt: &AttemptId) {
        let mut journal = self.lock();
        if journal.held.remove(attempt).is_none() {
            return;
        }
        if let Err(e) = journal.append(&EntryOut::Removed { attempt }) {
            warn!(job_id = %attempt.job_id, attempt = %attempt.attempt, path = %journal.path.display(), error = %e, "failed to remove attempt record");
        }
    }

    /// The records the previous incarnation left (unreadable ones were logged and dropped).
    pub fn left(&self) -> Vec<Record> {
        self.left.as_ref().clone()
    }
}

impl Journal {
    /// Appends `entry` (already applied to `held`), or rewrites the file from `held` when it
    /// has grown past its bound or may end in a torn line.
    fn append(&mut self, entry: &EntryOut<'_>) -> io::Result<()> {
        let file = match &mut self.file {
            Some(file) if self.size <= self.compact_at => file,
            _ => return self.rewrite(),
        };
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        // One system call for the line (`O_APPEND`): a reader never sees half of it unless
        // the write itself failed part-way.
        match file.write_all(&line) {
            Ok(()) => {
                self.size += line.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.file = None;
                Err(e)
            }
        }
    }

    /// Writes the records held as a new journal (a temporary file, readable by the agent's
    /// user only, renamed over it) and opens it for appending.
    fn rewrite(&mut self) -> io::Result<()> {
        let mut lines = Vec::new();
        for record in self.held.values() {
            serde_json::to_writer(&mut lines, &EntryOut::Record(record))
                .map_err(io::Error::other)?;
            lines.push(b'\n');
        }
        let tmp = self.path.with_extension("tmp");
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?
            .write_all(&lines)?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = Some(OpenOptions::new().append(true).open(&self.path)?);
        self.size = lines.len() as u64;
        self.compact_at = self.bound.max(self.size.saturating_mul(2));
        Ok(())
    }
}

/// The records held by the journal at `path` (none if there is no journal). A line that does
/// not parse (a torn last line) is skipped: its attempt keeps the record written before it.
fn read_journal(path: &Path) -> io::Result<HashMap<AttemptId, Record>> {
    let mut held = HashMap::new();
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(held),
        Err(e) => return Err(e),
    };
    let mut skipped = 0usize;
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        match serde_json::from_slice::<EntryIn>(line) {
            Ok(EntryIn::Record(record)) => {
                held.insert(record.attempt, record);
            }
            Ok(EntryIn::Removed { attempt }) => {
                held.remove(&attempt);
            }
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        warn!(path = %path.display(), skipped, "unreadable lines of the attempt journal skipped");
    }
    Ok(held)
}

/// Adds to `held` the records of an older agent, one file per attempt, and returns every such
/// file, to be removed once the journal holds them. Unreadable ones are logged and returned too.
fn read_files(dir: &Path, held: &mut HashMap<AttemptId, Record>) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            warn!(path = %dir.display(), error = %e, "failed to read attempt records");
            return Vec::new();
        }
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let journal = path.file_name().and_then(|n| n.to_str()) == Some(JOURNAL);
        if journal {
            continue;
        }
        if path.extension().and_then(|e| e.to_str()) == Some("json") {
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| {
                    serde_json::from_slice::<Record>(&bytes).map_err(|e| e.to_string())
                }) {
                Ok(record) => {
                    held.insert(record.attempt, record);
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unreadable attempt record removed")
                }
            }
        }
        files.push(path);
    }
    files
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
    use std::os::unix::fs::MetadataExt;

    use hodei_domain::{AttemptNumber, JobId};

    use super::*;

    fn record(attempt: AttemptId) -> Record {
        Record {
            attempt,
            pgid: 1234,
            report_id: Uuid::now_v7(),
            outcome: None,
            tail: Vec::new(),
        }
    }

    fn attempt() -> AttemptId {
        AttemptId::new(JobId::new(), AttemptNumber::new(2))
    }

    fn journal(dir: &Path) -> PathBuf {
        dir.join(FOLDER).join(JOURNAL)
    }

    #[test]
    fn records_survive_the_agent_and_are_removed_once_reported() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path()).unwrap();
        assert!(records.left().is_empty());
        let (a, b) = (attempt(), attempt());
        let mut first = record(a);
        records.write(&first);
        records.write(&record(b));
        assert!(matches!(outcome_of(&first), AttemptOutcome::Lost { .. }));
        first.outcome = Some(AttemptOutcome::Exited { code: 0 });
        first.tail = vec!["last line".to_owned()];
        records.write(&first);
        records.remove(&b);
        // The next incarnation finds the attempt as last recorded, and not the removed one.
        let next = Records::open(dir.path()).unwrap();
        assert_eq!(next.left(), vec![first.clone()]);
        assert_eq!(outcome_of(&first), AttemptOutcome::Exited { code: 0 });
        next.remove(&a);
        assert!(Records::open(dir.path()).unwrap().left().is_empty());
        let files: Vec<_> = std::fs::read_dir(dir.path().join(FOLDER))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            files,
            vec![OsString::from(JOURNAL)],
            "one file, however many attempts"
        );
    }

    #[test]
    fn a_torn_last_line_keeps_the_record_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path()).unwrap();
        let a = attempt();
        let started = record(a);
        records.write(&started);
        // The agent died part-way through writing the attempt's outcome.
        let mut file = OpenOptions::new()
            .append(true)
            .open(journal(dir.path()))
            .unwrap();
        file.write_all(br#"{"record":{"attempt":"#).unwrap();
        assert_eq!(
            Records::open(dir.path()).unwrap().left(),
            vec![started.clone()]
        );
        // Reopening rewrote the journal without the torn line: what follows reads back.
        let reopened = Records::open(dir.path()).unwrap();
        let b = attempt();
        reopened.write(&record(b));
        let left = Records::open(dir.path()).unwrap().left();
        let mut expected = [a, b];
        expected.sort();
        assert_eq!(left.iter().map(|r| r.attempt).collect::<Vec<_>>(), expected);
        assert!(left.contains(&started));
    }

    #[test]
    fn a_journal_that_cannot_be_written_does_not_keep_the_agent_from_starting() {
        let dir = tempfile::tempdir().unwrap();
        // Neither readable nor replaceable as a file.
        std::fs::create_dir_all(journal(dir.path()).join("x")).unwrap();
        let records = Records::open(dir.path()).unwrap();
        assert!(records.left().is_empty());
        let a = attempt();
        records.write(&record(a));
        records.remove(&a);
        // Once it can be written again, the next record writes it whole.
        std::fs::remove_dir_all(journal(dir.path())).unwrap();
        let b = record(attempt());
        records.write(&b);
        assert_eq!(Records::open(dir.path()).unwrap().left(), vec![b]);
    }

    #[test]
    fn the_journal_is_rewritten_once_it_outgrows_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let bound = 4096;
        let records = Records::open_with(dir.path(), bound).unwrap();
        let held = record(attempt());
        records.write(&held);
        for _ in 0..1_000 {
            let done = record(attempt());
            records.write(&done);
            records.remove(&done.attempt);
        }
        let size = std::fs::metadata(journal(dir.path())).unwrap().len();
        assert!(size <= bound + 1024, "the journal is {size} bytes");
        assert_eq!(Records::open(dir.path()).unwrap().left(), vec![held]);
        // Records held that outgrow the bound themselves do not make every write a rewrite.
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open_with(dir.path(), 512).unwrap();
        let many: Vec<Record> = (0..20).map(|_| record(attempt())).collect();
        for r in &many {
            records.write(r);
        }
        let inode = || std::fs::metadata(journal(dir.path())).unwrap().ino();
        let before = inode();
        records.write(&many[0]);
        assert_eq!(inode(), before, "appended, not rewritten");
    }

    #[test]
    fn records_of_an_older_agent_are_read_and_moved_into_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join(FOLDER);
        std::fs::create_dir_all(&folder).unwrap();
        let old = record(attempt());
        std::fs::write(
            folder.join(format!(
                "{}-{}.json",
                old.attempt.job_id, old.attempt.attempt
            )),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        std::fs::write(folder.join("junk.json"), b"{").unwrap();
        std::fs::write(folder.join("half.tmp"), b"{").unwrap();
        let records = Records::open(dir.path()).unwrap();
        assert_eq!(
            records.left(),
            vec![old.clone()],
            "an unreadable record is dropped"
        );
        let files: Vec<_> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, vec![OsString::from(JOURNAL)]);
        drop(records);
        let next = Records::open(dir.path()).unwrap();
        assert_eq!(next.left(), vec![old.clone()]);
        next.remove(&old.attempt);
        assert!(Records::open(dir.path()).unwrap().left().is_empty());
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
