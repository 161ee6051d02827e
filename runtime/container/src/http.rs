//! The HTTP client side of the container hop: probes and inference requests to
//! `127.0.0.1:<port>`, over pooled keep-alive connections.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest answer read from a container, in bytes.
pub const MAX_BODY: usize = 64 << 20;

/// A pooled HTTP/1.1 client.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

/// What came back.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// The body.
    pub body: Bytes,
}

impl Http {
    /// A client with `TCP_NODELAY`, keeping idle connections for a minute.
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Self { client }
    }

    /// `GET http://{addr}{path}` within `timeout`.
    pub async fn get(
        &self,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<Answer, String> {
        self.send(hyper::Method::GET, addr, path, Bytes::new(), timeout)
            .await
    }

    /// `POST http://{addr}{path}` with a JSON body, within `timeout`.
    pub async fn post_json(
        &self,
        addr: SocketAddr,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, String> {
        self.send(hyper::Method::POST, addr, path, body, timeout)
            .await
    }

    async fn send(
        &self,
        method: hyper::Method,
        addr: SocketAddr,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{addr}{path}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| format!("bad request: {e}"))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{e}"))?;
            let status = response.status().as_u16();
            let limited = http_body_util::Limited::new(response.into_body(), MAX_BODY);
            let body = limited
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
    }
}

/// Headers that concern one connection, not the request: never passed on (RFC 9110 §7.6.1),
/// with the length, which the side that sends the body sets again.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Whether `name` (lower case) is passed on through the container hop.
pub fn passed_on(name: &str) -> bool {
    !HOP_BY_HOP.contains(&name) && name != "host"
}

impl Http {
    /// Sends `request` as it came to `http://{addr}{path}`; the answer's head within
    /// `timeout`, its body as it comes (chunks on the returned channel, which closes after
    /// the last, or after an error).
    pub async fn forward(
        &self,
        addr: SocketAddr,
        request: wasp_backend::RawRequest,
        timeout: Duration,
    ) -> Result<wasp_backend::RawResponse, String> {
        let mut builder = hyper::Request::builder()
            .method(request.method.as_str())
            .uri(format!("http://{addr}{}", request.path));
        for (name, value) in &request.headers {
            if passed_on(&name.to_ascii_lowercase()) {
                builder = builder.header(name.as_str(), value.as_slice());
            }
        }
        let outgoing = builder
            .body(Full::new(Bytes::from(request.body)))
            .map_err(|e| format!("the request cannot be passed on: {e}"))?;
        let response = tokio::time::timeout(timeout, self.client.request(outgoing))
            .await
            .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
            .map_err(|e| format!("{e}"))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter(|(name, _)| passed_on(name.as_str()))
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect();
        let (sender, body) = tokio::sync::mpsc::channel(16);
        let mut incoming = response.into_body();
        tokio::spawn(async move {
            loop {
                let chunk = match incoming.frame().await {
                    None => break,
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => Ok(data.to_vec()),
                        // Trailers: not passed on.
                        Err(_) => continue,
                    },
                    Some(Err(e)) => Err(wasp_backend::BackendError::Unavailable(format!(
                        "the container's answer broke off: {e}"
                    ))),
                };
                let failed = chunk.is_err();
                if sender.send(chunk).await.is_err() || failed {
                    // The client went away (dropping the connection to the container
                    // stops it too), or the answer broke off.
                    break;
                }
            }
        });
        Ok(wasp_backend::RawResponse {
            status,
            headers,
            body,
        })
    }
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}
