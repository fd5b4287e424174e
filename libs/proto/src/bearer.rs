//! The client side of authentication: an interceptor that puts `authorization: Bearer …` on
//! every call, for the CLI, tests and benchmarks.

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// A channel whose calls carry a bearer token.
pub type AuthChannel = InterceptedService<Channel, Bearer>;

/// Adds a bearer token to each call (none: calls go without credentials).
#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

/// A token that cannot be sent in a header.
#[derive(Debug, thiserror::Error)]
#[error("the token holds characters a header cannot carry")]
pub struct InvalidToken;

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Self, InvalidToken> {
        token
            .map(|t| format!("Bearer {t}").parse().map_err(|_| InvalidToken))
            .transpose()
            .map(Bearer)
    }

    /// `channel` with this token on every call.
    pub fn on(self, channel: Channel) -> AuthChannel {
        InterceptedService::new(channel, self)
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<redacted>)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}
