//! One agent per work folder: an agent holds an exclusive lock on `<work dir>/.lock` from
//! its start until its process ends.
//!
//! Two agents on one folder would each read the other's attempt journal as left by a previous
//! incarnation: each would kill the other's running jobs and report them as lost, and their
//! workspaces and journal writes would overwrite each other's. That happens when an agent is
//! started again while the old process still drains (a supervisor that does not wait for it,
//! an overlapping rolling update), or when two agents are configured with the same folder.
//! The second one now refuses to start, with an error that names the folder and the pid that
//! holds it; once that process has ended, the kernel releases its lock and a new start
//! succeeds.
//!
//! The lock is an open file description's `flock`: the kernel drops it when the process
//! ends, however it ends, so a killed agent never leaves a stale lock behind. The file is
//! opened close-on-exec, so no job's process (started by the agent) keeps it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The lock file's name inside the work folder.
const FILE: &str = ".lock";

/// Why the work folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum WorkLockError {
    /// Another process holds the lock: an agent already runs on this folder.
    #[error(
        "another agent ({holder}) holds the work folder {}: one agent per work folder (set HODEI_WORK_DIR to another one, or stop that agent first)",
        path.display()
    )]
    InUse { path: PathBuf, holder: String },
    /// The lock file could not be opened or written.
    #[error("failed to lock the work folder with {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The exclusive lock on a work folder, held until it is dropped (or the process ends).
#[derive(Debug)]
pub(crate) struct WorkLock {
    _file: File,
}

impl WorkLock {
    /// Takes the lock of `work_dir` (which must exist) without waiting, and writes this
    /// process's pid into the lock file for the error another agent would give.
    pub fn acquire(work_dir: &Path) -> Result<WorkLock, WorkLockError> {
        let path = work_dir.join(FILE);
        let io_error = |source| WorkLockError::Io {
            path: path.clone(),
            source,
        };
        // Rust's std opens files close-on-exec.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_error)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(WorkLockError::InUse {
                    holder: holder(&mut file),
                    path,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_error(e)),
        }
        file.set_len(0).map_err(io_error)?;
        file.rewind().map_err(io_error)?;
        writeln!(file, "{}", std::process::id()).map_err(io_error)?;
        Ok(WorkLock { _file: file })
    }
}

/// Who holds the lock, as its lock file says.
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    match file.read_to_string(&mut text) {
        Ok(_) => match text.trim().parse::<u32>() {
            Ok(pid) => format!("pid {pid}"),
            Err(_) => "a process that has not written its pid yet".to_owned(),
        },
        Err(_) => "a process whose pid cannot be read".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_folder_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = WorkLock::acquire(dir.path()).unwrap();
        let refused = WorkLock::acquire(dir.path()).unwrap_err();
        let message = refused.to_string();
        assert!(
            matches!(&refused, WorkLockError::InUse { holder, .. } if *holder == format!("pid {}", std::process::id())),
            "{message}"
        );
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        drop(first);
        let _again = WorkLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn other_folders_are_not_held() {
        let one = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let _first = WorkLock::acquire(one.path()).unwrap();
        let _second = WorkLock::acquire(other.path()).unwrap();
    }
}
