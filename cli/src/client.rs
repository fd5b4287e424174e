//! The gRPC clients of one API gateway, over one lazily connected channel whose calls carry
//! the token, with TLS for `https://` servers.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use hodei_proto::v1::access_service_client::AccessServiceClient;
use hodei_proto::v1::job_service_client::JobServiceClient;
use hodei_proto::v1::pipeline_service_client::PipelineServiceClient;
use hodei_proto::v1::schedule_service_client::ScheduleServiceClient;
use hodei_proto::v1::tenant_service_client::TenantServiceClient;
use hodei_proto::v1::worker_service_client::WorkerServiceClient;
use hodei_proto::{AuthChannel, Bearer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// How long to wait for the TCP (and HTTP/2) connection before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How the CLI reaches the gateway: where, with which token, trusting which CA, and with
/// which client certificate.
#[derive(Debug, Default)]
pub struct Connection<'a> {
    pub server: &'a str,
    pub token: Option<&'a str>,
    pub ca: Option<&'a Path>,
    pub client_cert: Option<(&'a Path, &'a Path)>,
}

/// Clients of the job, pipeline, schedule, tenant, worker and access services.
#[derive(Debug, Clone)]
pub struct Clients {
    pub jobs: JobServiceClient<AuthChannel>,
    pub pipelines: PipelineServiceClient<AuthChannel>,
    pub schedules: ScheduleServiceClient<AuthChannel>,
    pub tenants: TenantServiceClient<AuthChannel>,
    pub workers: WorkerServiceClient<AuthChannel>,
    pub access: AccessServiceClient<AuthChannel>,
}

impl Clients {
    /// Prepares the channel without connecting: the first call connects, and a failure to
    /// connect comes back from that call as an UNAVAILABLE status.
    pub fn connect_lazy(connection: &Connection<'_>) -> anyhow::Result<Self> {
        let server = connection.server;
        let url = with_scheme(server);
        let mut endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| format!("invalid --server URL {server:?}"))?
            .connect_timeout(CONNECT_TIMEOUT);
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_enabled_roots();
            if let Some(ca) = connection.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca, "--ca")?));
            }
            if let Some((cert, key)) = connection.client_cert {
                tls = tls.identity(Identity::from_pem(
                    read(cert, "--tls-cert")?,
                    read(key, "--tls-key")?,
                ));
            }
            endpoint = endpoint
                .tls_config(tls)
                .context("failed to set up tls for --server")?;
        } else if connection.ca.is_some() || connection.client_cert.is_some() {
            anyhow::bail!("--ca and --tls-cert need an https:// --server (got {server:?})");
        }
        let bearer = Bearer::new(connection.token).context("invalid --token")?;
        let channel = bearer.on(endpoint.connect_lazy());
        Ok(Clients {
            jobs: JobServiceClient::new(channel.clone()),
            pipelines: PipelineServiceClient::new(channel.clone()),
            schedules: ScheduleServiceClient::new(channel.clone()),
            tenants: TenantServiceClient::new(channel.clone()),
            workers: WorkerServiceClient::new(channel.clone()),
            access: AccessServiceClient::new(channel),
        })
    }
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("failed to read {flag} {}", path.display()))
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
    async fn connecting_is_lazy_and_bad_urls_or_files_are_refused() {
        let plain = |server| Connection {
            server,
            ..Connection::default()
        };
        assert!(Clients::connect_lazy(&plain("http://127.0.0.1:1")).is_ok());
        let err = Clients::connect_lazy(&plain("http://bad host")).unwrap_err();
        assert!(err.to_string().contains("--server"), "{err}");
        let missing = Connection {
            server: "https://127.0.0.1:1",
            ca: Some(Path::new("/nonexistent/ca.pem")),
            ..Connection::default()
        };
        let err = Clients::connect_lazy(&missing).unwrap_err();
        assert!(err.to_string().contains("--ca"), "{err}");
        let plain_with_ca = Connection {
            server: "http://127.0.0.1:1",
            ca: Some(Path::new("/nonexistent/ca.pem")),
            ..Connection::default()
        };
        let err = Clients::connect_lazy(&plain_with_ca).unwrap_err();
        assert!(err.to_string().contains("https://"), "{err}");
    }
}
