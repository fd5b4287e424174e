//! NATS credentials: one nkey per service and per agent, kept in a folder with the
//! nats-server `authorization` block they make (`auth.conf`, included by the server's
//! configuration). Enrolling or revoking an agent rewrites that block; nats-server applies it
//! on reload (`nats-server --signal reload`) and drops the connections of revoked keys.
//!
//! The folder holds `users.json` (who each public key is), `auth.conf`, the services' seeds
//! (`scheduler.nk`, `registry.nk`, `api-gateway.nk`, `admin.nk`) and the agents' seeds
//! (`agents/<worker_id>.nk`), every seed readable by its owner only. Hand each seed to the one
//! process it is for (`HODEI_NATS_NKEY_FILE`) and keep the rest away from it.

use std::path::{Path, PathBuf};

use hodei_domain::WorkerId;
use hodei_messaging::permissions::{NatsRole, NatsUser, server_config};
use serde::{Deserialize, Serialize};

use crate::{AdminError, write_file};

const USERS: &str = "users.json";
const AUTH: &str = "auth.conf";

/// The services that get a credential at `init`, with their seed files' names.
const SERVICES: [(NatsRole, &str); 4] = [
    (NatsRole::Scheduler, "scheduler.nk"),
    (NatsRole::Registry, "registry.nk"),
    (NatsRole::Gateway, "api-gateway.nk"),
    (NatsRole::Admin, "admin.nk"),
];

/// One credential as `users.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    /// `scheduler`, `registry`, `api-gateway`, `admin` or `agent`.
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    worker_id: Option<WorkerId>,
    /// The nkey's public key.
    nkey: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Users {
    /// The server certificate and key clients must connect to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls: Option<(PathBuf, PathBuf)>,
    users: Vec<Entry>,
}

/// The NATS credentials in one folder.
#[derive(Debug)]
pub struct NatsCredentials {
    dir: PathBuf,
    users: Users,
}

impl NatsCredentials {
    /// Makes a credential for each service in `dir` (keeping those already there) and writes
    /// `auth.conf`; with `tls`, the server's certificate and key go into it too.
    pub fn init(
        dir: &Path,
        tls: Option<(PathBuf, PathBuf)>,
    ) -> Result<NatsCredentials, AdminError> {
        std::fs::create_dir_all(dir.join("agents"))
            .map_err(|e| AdminError::Io(dir.to_owned(), e))?;
        let mut credentials = match Self::open(dir) {
            Ok(existing) => existing,
            Err(AdminError::Io(_, e)) if e.kind() == std::io::ErrorKind::NotFound => {
                NatsCredentials {
                    dir: dir.to_owned(),
                    users: Users::default(),
                }
            }
            Err(e) => return Err(e),
        };
        if tls.is_some() {
            credentials.users.tls = tls;
        }
        for (role, file) in &SERVICES {
            let kind = kind(role);
            if !credentials.users.users.iter().any(|e| e.kind == kind) {
                let nkey = write_seed(&dir.join(file))?;
                credentials.users.users.push(Entry {
                    kind,
                    worker_id: None,
                    nkey,
                });
            }
        }
        credentials.save()?;
        Ok(credentials)
    }

    /// The credentials already in `dir`.
    pub fn open(dir: &Path) -> Result<NatsCredentials, AdminError> {
        let path = dir.join(USERS);
        let text = std::fs::read_to_string(&path).map_err(|e| AdminError::Io(path.clone(), e))?;
        let users = serde_json::from_str(&text).map_err(|e| AdminError::Format(path, e))?;
        Ok(NatsCredentials {
            dir: dir.to_owned(),
            users,
        })
    }

    /// Enrols agent `id` with a new key (replacing, and so revoking, any key it had) and
    /// returns the file holding its seed.
    pub fn add_agent(&mut self, id: &WorkerId) -> Result<PathBuf, AdminError> {
        let path = self.agent_seed_file(id);
        let nkey = write_seed(&path)?;
        self.users
            .users
            .retain(|e| e.worker_id.as_ref() != Some(id));
        self.users.users.push(Entry {
            kind: "agent".to_owned(),
            worker_id: Some(id.clone()),
            nkey,
        });
        self.save()?;
        Ok(path)
    }

    /// Revokes agent `id`'s key and deletes its seed; false when it had none.
    pub fn revoke_agent(&mut self, id: &WorkerId) -> Result<bool, AdminError> {
        let before = self.users.users.len();
        self.users
            .users
            .retain(|e| e.worker_id.as_ref() != Some(id));
        if self.users.users.len() == before {
            return Ok(false);
        }
        self.save()?;
        let path = self.agent_seed_file(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(AdminError::Io(path, e)),
        }
    }

    /// The seed file of a service's credential (`init` wrote it).
    pub fn service_seed_file(&self, role: &NatsRole) -> Option<PathBuf> {
        SERVICES
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, file)| self.dir.join(file))
    }

    /// The seed file of agent `id`'s credential.
    pub fn agent_seed_file(&self, id: &WorkerId) -> PathBuf {
        self.dir.join("agents").join(format!("{id}.nk"))
    }

    /// The `auth.conf` file: include it in the nats-server configuration.
    pub fn auth_file(&self) -> PathBuf {
        self.dir.join(AUTH)
    }

    /// The nats-server configuration fragment these credentials make.
    pub fn server_config(&self) -> String {
        let users: Vec<NatsUser> = self
            .users
            .users
            .iter()
            .filter_map(|e| {
                let role = match (e.kind.as_str(), &e.worker_id) {
                    ("agent", Some(id)) => NatsRole::Agent(id.clone()),
                    (kind, None) => SERVICES
                        .iter()
                        .map(|(r, _)| r)
                        .find(|r| self::kind(r) == kind)?
                        .clone(),
                    _ => return None,
                };
                Some(NatsUser {
                    nkey: e.nkey.clone(),
                    role,
                })
            })
            .collect();
        let tls = self
            .users
            .tls
            .as_ref()
            .map(|(cert, key)| (cert.to_string_lossy(), key.to_string_lossy()));
        server_config(&users, tls.as_ref().map(|(c, k)| (c.as_ref(), k.as_ref())))
    }

    fn save(&self) -> Result<(), AdminError> {
        let users = serde_json::to_string_pretty(&self.users)
            .map_err(|e| AdminError::Format(self.dir.join(USERS), e))?;
        write_file(&self.dir.join(USERS), &users, 0o600)?;
        write_file(&self.auth_file(), &self.server_config(), 0o600)
    }
}

/// The name `users.json` gives a service's role.
fn kind(role: &NatsRole) -> String {
    match role {
        NatsRole::Agent(_) => "agent".to_owned(),
        other => other.client_name().trim_start_matches("hodei-").to_owned(),
    }
}

/// Makes a user nkey, writes its seed to `path` (owner only) and returns its public key.
fn write_seed(path: &Path) -> Result<String, AdminError> {
    let key = nkeys::KeyPair::new_user();
    let seed = key.seed().map_err(|e| AdminError::Key(e.to_string()))?;
    write_file(path, &format!("{seed}\n"), 0o600)?;
    Ok(key.public_key())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_are_enrolled_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let mut creds = NatsCredentials::init(dir.path(), None).unwrap();
        let seed = creds.service_seed_file(&NatsRole::Scheduler).unwrap();
        assert!(std::fs::read_to_string(&seed).unwrap().starts_with("SU"));
        let id: WorkerId = "w-1".parse().unwrap();
        let file = creds.add_agent(&id).unwrap();
        let conf = std::fs::read_to_string(creds.auth_file()).unwrap();
        assert!(conf.contains("hodei.v1.hb.w-1"));
        assert_eq!(conf.matches("\"nkey\"").count(), 5);
        // Opening again keeps everyone; init again keeps the services' keys.
        let reopened = NatsCredentials::init(dir.path(), None).unwrap();
        assert_eq!(reopened.server_config(), conf);
        assert!(creds.revoke_agent(&id).unwrap());
        assert!(!file.exists());
        assert!(!creds.revoke_agent(&id).unwrap());
        let conf = std::fs::read_to_string(creds.auth_file()).unwrap();
        assert!(!conf.contains("w-1"));
    }
}
