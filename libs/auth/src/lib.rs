//! Credentials: the opaque API tokens Hodei mints (only their hashes are stored), OIDC/JWT
//! access tokens verified against an issuer's JWKS, and (feature `pki`) a local certificate
//! authority for TLS. Both kinds of token, and client certificates, resolve to a
//! [`hodei_domain::Principal`].

pub mod cert;
pub mod jwt;
#[cfg(feature = "pki")]
pub mod pki;
pub mod token;

pub use jwt::{JwtSettings, JwtVerifier};

/// Why a credential was not accepted, or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The credential is malformed, badly signed, expired, revoked or unknown. The reason is
    /// for logs and the caller; it never holds the credential.
    #[error("{0}")]
    Invalid(String),
    /// The JWKS (or its file) could not be read.
    #[error("failed to load the jwks: {0}")]
    Jwks(String),
    /// The system's random source failed.
    #[error("failed to draw random bytes for a token")]
    Random,
    #[cfg(feature = "pki")]
    #[error("failed to make a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}
