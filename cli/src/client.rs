//! The gRPC clients of one API gateway, over one lazily connected channel.

use std::time::Duration;

use anyhow::Context;
use hodei_proto::v1::job_service_client::JobServiceClient;
use hodei_proto::v1::pipeline_service_client::PipelineServiceClient;
use hodei_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::transport::{Channel, Endpoint};

/// How long to wait for the TCP (and HTTP/2) connection before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Clients of the job, pipeline and worker services.
#[derive(Debug, Clone)]
pub struct Clients {
    pub jobs: JobServiceClient<Channel>,
    pub pipelines: PipelineServiceClient<Channel>,
    pub workers: WorkerServiceClient<Channel>,
}

impl Clients {
    /// Prepares the channel without connecting: the first call connects, and a failure to
    /// connect comes back from that call as an UNAVAILABLE status.
    pub fn connect_lazy(server: &str) -> anyhow::Result<Self> {
        let endpoint = Endpoint::from_shared(with_scheme(server))
            .with_context(|| format!("invalid --server URL {server:?}"))?
            .connect_timeout(CONNECT_TIMEOUT);
        let channel = endpoint.connect_lazy();
        Ok(Clients {
            jobs: JobServiceClient::new(channel.clone()),
            pipelines: PipelineServiceClient::new(channel.clone()),
            workers: WorkerServiceClient::new(channel),
        })
    }
}

/// `host:port` alone means plain HTTP/2, as the default does.
fn with_scheme(server: &str) -> String {
    if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_address_gets_http() {
        assert_eq!(with_scheme("10.0.0.1:50051"), "http://10.0.0.1:50051");
        assert_eq!(with_scheme("https://h:443"), "https://h:443");
    }

    #[tokio::test]
    async fn connecting_is_lazy_and_bad_urls_are_refused() {
        assert!(Clients::connect_lazy("http://127.0.0.1:1").is_ok());
        let err = Clients::connect_lazy("http://bad host").unwrap_err();
        assert!(err.to_string().contains("--server"), "{err}");
    }
}
