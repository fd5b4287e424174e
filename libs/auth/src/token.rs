//! Opaque API tokens: `hodei_` and 32 random bytes in URL-safe base64. The secret is shown
//! once, when it is minted; only its SHA-256 is stored. A token is a random 256-bit value, so
//! a plain hash suffices (nothing to guess, no dictionary to try), and lookups by hash take
//! no secret-dependent time beyond the index probe.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};

use crate::AuthError;

/// What every opaque token starts with; anything else presented as a bearer is taken for a
/// JWT.
pub const PREFIX: &str = "hodei_";

/// A new token: its secret, to hand to its owner once, and the hash to store.
pub struct Minted {
    pub secret: String,
    pub hash: Vec<u8>,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted").finish_non_exhaustive()
    }
}

/// Draws a new token.
pub fn mint() -> Result<Minted, AuthError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AuthError::Random)?;
    let secret = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash(&secret);
    Ok(Minted { secret, hash })
}

/// The stored form of a token secret.
pub fn hash(secret: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .to_vec()
}

/// Whether a bearer credential is one of ours (else it may be a JWT).
pub fn is_opaque(credential: &str) -> bool {
    credential.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_distinct_and_hash_to_what_is_stored() {
        let a = mint().unwrap();
        let b = mint().unwrap();
        assert_ne!(a.secret, b.secret);
        assert!(is_opaque(&a.secret));
        assert_eq!(a.secret.len(), PREFIX.len() + 43);
        assert_eq!(hash(&a.secret), a.hash);
        assert_ne!(hash(&b.secret), a.hash);
        assert!(!format!("{a:?}").contains(&a.secret));
    }
}
