//! Secret values sealed to one key: readable only by the holder of its private half.
//!
//! - The gateway seals each secret value of a submitted spec to the control plane's public
//!   key ([`SealingKey`]) before it is stored: PostgreSQL, the outbox and every event hold
//!   only sealed values (or the mask).
//! - At each assignment the scheduler opens them with the control plane's private key
//!   ([`OpeningKey`]) and seals them again to the public key the assigned agent announced in
//!   its heartbeats: a new key pair per agent incarnation, never written to disk. The command
//!   on NATS carries values only that agent can open; a retry or a requeue seals them again
//!   for the next agent.
//!
//! Values are X25519 + XSalsa20-Poly1305 boxes (NATS xkeys, the `nkeys` crate) from a fresh
//! sender key per value, written as `hodei-sealed:v1:<sender public key>:<base64 box>`.

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use nkeys::XKey;

/// What every sealed value starts with.
pub const SEALED_PREFIX: &str = "hodei-sealed:v1:";

/// Why a value could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("not a sealing key: {0}")]
    Key(String),
    #[error("cannot read the key file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("the value is not sealed")]
    NotSealed,
    #[error("the value was not sealed to this key or was altered: {0}")]
    Open(String),
    #[error("failed to seal: {0}")]
    Seal(String),
}

/// Whether `value` is a sealed value (not a value in clear).
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(SEALED_PREFIX)
}

/// A public key values are sealed to.
#[derive(Clone)]
pub struct SealingKey(Arc<XKey>);

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealingKey({})", self.0.public_key())
    }
}

impl SealingKey {
    /// The key from its public form (`X…`).
    pub fn parse(public: &str) -> Result<SealingKey, SealError> {
        XKey::from_public_key(public.trim())
            .map(|key| SealingKey(Arc::new(key)))
            .map_err(|e| SealError::Key(e.to_string()))
    }

    /// Its public form.
    pub fn public_key(&self) -> String {
        self.0.public_key()
    }

    /// `plain` sealed to this key.
    pub fn seal(&self, plain: &str) -> Result<String, SealError> {
        let sender = XKey::new();
        let sealed = sender
            .seal(plain.as_bytes(), &self.0)
            .map_err(|e| SealError::Seal(e.to_string()))?;
        Ok(format!(
            "{SEALED_PREFIX}{}:{}",
            sender.public_key(),
            B64.encode(sealed)
        ))
    }
}

/// A private key that opens what was sealed to its public half.
#[derive(Clone)]
pub struct OpeningKey(Arc<XKey>);

impl std::fmt::Debug for OpeningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OpeningKey({})", self.0.public_key())
    }
}

impl OpeningKey {
    /// A new random key.
    pub fn generate() -> OpeningKey {
        OpeningKey(Arc::new(XKey::new()))
    }

    /// The key from its seed (`SX…`).
    pub fn from_seed(seed: &str) -> Result<OpeningKey, SealError> {
        XKey::from_seed(seed.trim())
            .map(|key| OpeningKey(Arc::new(key)))
            .map_err(|e| SealError::Key(e.to_string()))
    }

    /// The key whose seed is the first line of `path`.
    pub fn load(path: &Path) -> Result<OpeningKey, SealError> {
        let text = std::fs::read_to_string(path).map_err(|e| SealError::KeyFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_seed(text.lines().next().unwrap_or_default())
    }

    /// Its seed (`SX…`), to store.
    pub fn seed(&self) -> Result<String, SealError> {
        self.0.seed().map_err(|e| SealError::Key(e.to_string()))
    }

    /// The public half (`X…`), that values are sealed to ([`SealingKey::parse`]).
    pub fn public_key(&self) -> String {
        self.0.public_key()
    }

    /// The value `sealed` holds.
    pub fn open(&self, sealed: &str) -> Result<String, SealError> {
        let rest = sealed
            .strip_prefix(SEALED_PREFIX)
            .ok_or(SealError::NotSealed)?;
        let (sender, boxed) = rest
            .split_once(':')
            .ok_or_else(|| SealError::Open("no sender key".to_owned()))?;
        let sender = XKey::from_public_key(sender).map_err(|e| SealError::Open(e.to_string()))?;
        let boxed = B64
            .decode(boxed)
            .map_err(|e| SealError::Open(e.to_string()))?;
        let plain = self
            .0
            .open(&boxed, &sender)
            .map_err(|e| SealError::Open(e.to_string()))?;
        String::from_utf8(plain).map_err(|e| SealError::Open(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_key_sealed_to_opens_and_each_seal_differs() {
        let control = OpeningKey::generate();
        let agent = OpeningKey::generate();
        let to_control = SealingKey::parse(&control.public_key()).unwrap();
        let sealed = to_control.seal("hunter2").unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.contains("hunter2"));
        assert_ne!(sealed, to_control.seal("hunter2").unwrap());
        assert_eq!(control.open(&sealed).unwrap(), "hunter2");
        assert!(matches!(agent.open(&sealed), Err(SealError::Open(_))));
        assert_eq!(agent.open("hunter2"), Err(SealError::NotSealed));
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(control.open(&tampered).is_err());
        let public = SealingKey::parse(&agent.public_key()).unwrap();
        let again = OpeningKey::from_seed(&agent.seed().unwrap()).unwrap();
        assert_eq!(again.open(&public.seal("").unwrap()).unwrap(), "");
    }
}
