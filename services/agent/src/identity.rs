//! Who jobs run as. An agent running as root runs each job as an unprivileged user
//! (`HODEI_JOB_USER`): either one named user (or uid) for every job, or a range of uids
//! (`61184-61439`) of which each running attempt gets its own, so that concurrent jobs cannot
//! read each other's workspaces either. The job's workspace is handed to its user with mode
//! 0700, the work folder above is 0711 (reachable, not listable) and the attempt records
//! 0700, and the job starts with no supplementary groups and `no_new_privs` (no setuid
//! binary gives root back). Running as another user, the job cannot read the agent's
//! environment (`/proc/<agent>/environ` is its owner's only).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// How `HODEI_JOB_USER` was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobUser {
    /// Every job runs as this uid and gid.
    Fixed { uid: u32, gid: u32 },
    /// Each running attempt gets a uid of this range of its own (gid = uid).
    Range { first: u32, last: u32 },
}

/// Why `HODEI_JOB_USER` is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobUserError {
    #[error("no user named {0:?} on this host")]
    Unknown(String),
    #[error("{0:?} is not a user name, a uid or a uid range like 61184-61439")]
    Malformed(String),
    #[error("jobs may not run as root (uid 0)")]
    Root,
    /// The kernel reads id 4294967295 (-1) as "leave unchanged": the job would keep root.
    #[error("uid or gid 4294967295 cannot be given to jobs: the kernel reads it as no change")]
    NoChange,
    #[error("the range {first}-{last} has fewer uids than the agent's {slots} slots")]
    TooSmall { first: u32, last: u32, slots: u32 },
    #[error("running jobs as another user needs the agent to run as root")]
    NotRoot,
}

impl JobUser {
    /// Parses `HODEI_JOB_USER` for an agent with `slots` slots.
    pub fn parse(value: &str, slots: u32) -> Result<JobUser, JobUserError> {
        let user = if let Some((first, last)) = value.split_once('-')
            && let (Ok(first), Ok(last)) = (first.parse::<u32>(), last.parse::<u32>())
        {
            if last < first {
                return Err(JobUserError::Malformed(value.to_owned()));
            }
            if u64::from(last - first) + 1 < u64::from(slots) {
                return Err(JobUserError::TooSmall { first, last, slots });
            }
            JobUser::Range { first, last }
        } else if let Ok(uid) = value.parse::<u32>() {
            let gid = nix::unistd::User::from_uid(uid.into())
                .ok()
                .flatten()
                .map_or(uid, |u| u.gid.as_raw());
            JobUser::Fixed { uid, gid }
        } else {
            let user = nix::unistd::User::from_name(value)
                .map_err(|_| JobUserError::Malformed(value.to_owned()))?
                .ok_or_else(|| JobUserError::Unknown(value.to_owned()))?;
            JobUser::Fixed {
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            }
        };
        let root = match user {
            JobUser::Fixed { uid, gid } => uid == 0 || gid == 0,
            JobUser::Range { first, .. } => first == 0,
        };
        if root {
            return Err(JobUserError::Root);
        }
        let no_change = match user {
            JobUser::Fixed { uid, gid } => uid == u32::MAX || gid == u32::MAX,
            JobUser::Range { last, .. } => last == u32::MAX,
        };
        if no_change {
            return Err(JobUserError::NoChange);
        }
        Ok(user)
    }
}

/// The job users of one agent, handed out per attempt.
#[derive(Debug)]
pub struct JobUsers {
    user: JobUser,
    free: Mutex<BTreeSet<u32>>,
}

/// The identity an attempt runs as; a uid of a range goes back to it when dropped.
#[derive(Debug)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    users: Arc<JobUsers>,
}

impl Drop for Identity {
    fn drop(&mut self) {
        if matches!(self.users.user, JobUser::Range { .. })
            && let Ok(mut free) = self.users.free.lock()
        {
            free.insert(self.uid);
        }
    }
}

impl JobUsers {
    pub fn new(user: JobUser) -> Arc<Self> {
        let free = match user {
            JobUser::Range { first, last } => (first..=last).collect(),
            JobUser::Fixed { .. } => BTreeSet::new(),
        };
        Arc::new(Self {
            user,
            free: Mutex::new(free),
        })
    }

    /// An identity for one attempt; none when every uid of the range is in use.
    pub fn take(self: &Arc<Self>) -> Option<Identity> {
        let (uid, gid) = match self.user {
            JobUser::Fixed { uid, gid } => (uid, gid),
            JobUser::Range { .. } => {
                let uid = self.free.lock().ok()?.pop_first()?;
                (uid, uid)
            }
        };
        Some(Identity {
            uid,
            gid,
            users: Arc::clone(self),
        })
    }
}

impl Identity {
    /// Hands `workspace` and everything in it (fetched artifacts) to this identity, readable
    /// by it alone. Symbolic links are changed themselves, never what they point at.
    pub fn own(&self, workspace: &Path) -> std::io::Result<()> {
        for entry in walkdir::WalkDir::new(workspace).follow_links(false) {
            let entry = entry.map_err(std::io::Error::other)?;
            std::os::unix::fs::lchown(entry.path(), Some(self.uid), Some(self.gid))?;
        }
        std::fs::set_permissions(workspace, std::fs::Permissions::from_mode(0o700))
    }

    /// The uid and gid the job runs as.
    pub fn ids(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }
}

/// Makes the work folder reachable but not listable by jobs, and the records folder (which
/// holds other attempts' output tails) the agent's alone.
pub fn close_work_dir(work_dir: &Path, records: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(work_dir, std::fs::Permissions::from_mode(0o711))?;
    std::fs::set_permissions(records, std::fs::Permissions::from_mode(0o700))
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_into_users_or_are_refused_saying_why() {
        assert_eq!(
            JobUser::parse("61184-61199", 4),
            Ok(JobUser::Range {
                first: 61184,
                last: 61199
            })
        );
        assert_eq!(
            JobUser::parse("61184-61185", 4),
            Err(JobUserError::TooSmall {
                first: 61184,
                last: 61185,
                slots: 4
            })
        );
        assert_eq!(JobUser::parse("0", 1), Err(JobUserError::Root));
        assert_eq!(JobUser::parse("4294967295", 1), Err(JobUserError::NoChange));
        assert_eq!(
            JobUser::parse("61184-4294967295", 1),
            Err(JobUserError::NoChange)
        );
        assert_eq!(JobUser::parse("root", 1), Err(JobUserError::Root));
        assert_eq!(JobUser::parse("0-10", 1), Err(JobUserError::Root));
        assert!(matches!(
            JobUser::parse("nobody", 1),
            Ok(JobUser::Fixed { uid, .. }) if uid != 0
        ));
        assert_eq!(
            JobUser::parse("no-such-user-here", 1),
            Err(JobUserError::Unknown("no-such-user-here".into()))
        );
        assert_eq!(
            JobUser::parse("12-3", 1),
            Err(JobUserError::Malformed("12-3".into()))
        );
    }

    #[test]
    fn each_attempt_of_a_range_has_its_own_uid_until_it_ends() {
        let users = JobUsers::new(JobUser::Range {
            first: 100,
            last: 101,
        });
        let a = users.take().unwrap();
        let b = users.take().unwrap();
        assert_ne!(a.uid, b.uid);
        assert!(users.take().is_none());
        let freed = a.uid;
        drop(a);
        assert_eq!(users.take().unwrap().uid, freed);
        let fixed = JobUsers::new(JobUser::Fixed { uid: 7, gid: 8 });
        let (x, y) = (fixed.take().unwrap(), fixed.take().unwrap());
        assert_eq!((x.uid, x.gid, y.uid), (7, 8, 7));
    }
}
