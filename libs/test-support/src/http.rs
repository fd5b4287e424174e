//! Plain HTTP/1.1 requests, for tests that read a service's `/metrics`, `/healthz` and
//! `/readyz`, or call the web console as a script or a forger would.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::TestSupportError;

/// Longest one [`http_get`] may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A response's status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code, e.g. 200.
    pub status: u16,
    /// The body as text (lossily decoded).
    pub body: String,
    /// The response's headers, names in lowercase, in the order received.
    pub headers: Vec<(String, String)>,
}

impl HttpResponse {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// GETs `path` from the HTTP server at `addr` (one connection per call).
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<HttpResponse, TestSupportError> {
    http_request(addr, "GET", path, &[], "").await
}

/// Sends one request with `headers` and `body` (empty: none) to the HTTP server at `addr`
/// (one connection per call); redirects are not followed.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<HttpResponse, TestSupportError> {
    let url = format!("http://{addr}{path}");
    let failed = |reason: String| TestSupportError::Http {
        url: url.clone(),
        reason,
    };
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| failed(format!("connect: {e}")))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(format!("handshake: {e}")))?;
        let driver = tokio::spawn(connection);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .map_err(|e| failed(format!("request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| failed(format!("send: {e}")))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| failed(format!("body: {e}")))?
            .to_bytes();
        driver.abort();
        Ok(HttpResponse {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            headers,
        })
    };
    tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| failed(format!("no answer within {REQUEST_TIMEOUT:?}")))?
}

/// The value of the sample `series` (metric name with its labels as exposed, e.g.
/// `hodei_jobs_finished_total{outcome="failed"}`) in a Prometheus text exposition.
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.trim().parse().ok())?
        })
}
