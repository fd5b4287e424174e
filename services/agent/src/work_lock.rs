//! One agent per work folder: an agent holds an exclusive lock on its work folder from its
//! start until its process ends.
//!
//! Two agents on one folder would each read the other's attempt journal as left by a previous
//! incarnation: each would kill the other's running jobs and report them as lost, and their
//! workspaces and journal writes would overwrite each other's. That happens when an agent is
//! started again while the old process still drains (a supervisor that does not wait for it,
//! an overlapping rolling update), or when two agents are configured with the same folder.
//! The second one now refuses to start, with an error that names the folder and the pid that
//! holds it (written to `<work dir>/.agent-pid`); once that process has ended, the kernel
//! releases its lock and a new start succeeds.
//!
//! The lock is a `flock` on the folder itself, not on a file in it, so removing or replacing a
//! file cannot free it (and `systemd-tmpfiles` leaves a locked folder alone). The kernel drops
//! it when the last descriptor of the open folder is closed: when the agent's process ends,
//! however it ends, so a killed agent never leaves a stale lock behind. The folder is opened
//! close-on-exec, and a job's process closes its copy before anything else (see
//! [`crate::launch`]), so no job keeps it, not even one stopped before its exec. A file system
//! without `flock` makes the start fail with the error.

use std::fs::{File, TryLockError};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The file, inside the work folder, naming the pid of the agent that holds it.
const PID_FILE: &str = ".agent-pid";

/// Why the work folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum WorkLockError {
    /// Another process holds the lock: an agent already runs on this folder.
    #[error(
        "another agent ({holder}) holds the work folder {}: one agent per work folder (set HODEI_WORK_DIR to another one, or stop that agent first)",
        path.display()
    )]
    InUse { path: PathBuf, holder: String },
    /// The folder could not be opened or locked, or the pid not written.
    #[error("failed to lock the work folder {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The exclusive lock on a work folder, held until every clone is dropped (or the process
/// ends).
#[derive(Debug, Clone)]
pub(crate) struct WorkLock {
    folder: Arc<File>,
}

impl WorkLock {
    /// Takes the lock of `work_dir` (which must exist) without waiting, and writes this
    /// process's pid to the folder's pid file, for the error another agent would give.
    pub fn acquire(work_dir: &Path) -> Result<WorkLock, WorkLockError> {
        let io_error = |source| WorkLockError::Io {
            path: work_dir.to_path_buf(),
            source,
        };
        // Rust's std opens files (and folders) close-on-exec.
        let folder = File::open(work_dir).map_err(io_error)?;
        match folder.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(WorkLockError::InUse {
                    path: work_dir.to_path_buf(),
                    holder: holder(work_dir),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_error(e)),
        }
        std::fs::write(work_dir.join(PID_FILE), format!("{}\n", std::process::id()))
            .map_err(io_error)?;
        Ok(WorkLock {
            folder: Arc::new(folder),
        })
    }

    /// The descriptor that holds the lock, for a job's process to close its copy of.
    pub fn raw_fd(&self) -> RawFd {
        self.folder.as_raw_fd()
    }
}

/// Who holds the lock of `work_dir`, as its pid file says.
fn holder(work_dir: &Path) -> String {
    match std::fs::read_to_string(work_dir.join(PID_FILE)) {
        Ok(text) => match text.trim().parse::<u32>() {
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
        // Removing the pid file frees nothing: the lock is the folder's.
        std::fs::remove_file(dir.path().join(PID_FILE)).unwrap();
        let refused = WorkLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(refused, WorkLockError::InUse { .. }), "{refused}");
        // Held until the last clone goes.
        let clone = first.clone();
        drop(first);
        assert!(WorkLock::acquire(dir.path()).is_err());
        drop(clone);
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
