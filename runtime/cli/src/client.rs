//! A small HTTP client for the wasp API.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;
use wasp_core::EndpointSpec;

/// Talks to one server.
pub struct Client {
    base: String,
    http: HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    key: Option<String>,
}

/// `/api/v1/endpoints/{name}{suffix}` with the name percent-encoded.
pub fn endpoint_path(name: &str, suffix: &str) -> String {
    format!(
        "/api/v1/endpoints/{}{suffix}",
        utf8_percent_encode(name, NON_ALPHANUMERIC)
    )
}

/// `/endpoints/{name}/invoke{path}` with the name percent-encoded; `path` is what the
/// processor sees (`/` for the invoke route itself).
pub fn endpoint_invoke_path(name: &str, path: &str) -> String {
    let below = match path.strip_prefix('/') {
        Some(rest) if rest.is_empty() || rest.starts_with('?') => rest,
        _ => path,
    };
    format!(
        "/endpoints/{}/invoke{below}",
        utf8_percent_encode(name, NON_ALPHANUMERIC)
    )
}

/// A value for a query string, percent-encoded.
pub fn query_value(value: &str) -> String {
    utf8_percent_encode(value, NON_ALPHANUMERIC).to_string()
}

/// `/api/v1/jobs/{id}`.
pub fn job_path(id: &str) -> String {
    format!("/api/v1/jobs/{}", query_value(id))
}

/// `/endpoints/{name}/{verb}/{id}` (cancel, retry, status).
pub fn endpoint_job_path(endpoint: &str, verb: &str, id: &str) -> String {
    format!(
        "/endpoints/{}/{verb}/{}",
        query_value(endpoint),
        query_value(id)
    )
}

impl Client {
    /// A client for the server at `base` that sends `key` (an API key) with every request.
    /// HTTPS servers' certificates must chain to the system's roots or to one of
    /// `ca_certs` (PEM files).
    pub fn new(base: &str, key: Option<String>, ca_certs: &[std::path::PathBuf]) -> Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            bail!("--server must be an http:// or https:// URL, not `{base}`");
        }
        let tls = wasp_gateway::tls_client_config(ca_certs)
            .map_err(|e| anyhow::anyhow!("--ca-cert {e}"))?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            base,
            http: HyperClient::builder(TokioExecutor::new()).build(connector),
            key,
        })
    }

    /// The server's URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes)> {
        let headers: Vec<(String, String)> = content_type
            .map(|ct| ("content-type".to_owned(), ct.to_owned()))
            .into_iter()
            .collect();
        self.send_with(method, path, &headers, body).await
    }

    /// Sends a request with these headers (besides the key); the status and body.
    pub async fn send_with(
        &self,
        method: Method,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes)> {
        let url = format!("{}{path}", self.base);
        let mut request = hyper::Request::builder().method(method).uri(&url);
        for (name, value) in headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(key) = &self.key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .with_context(|| format!("bad URL {url}"))?;
        let response = self
            .http
            .request(request)
            .await
            .with_context(|| format!("cannot reach {url} (is `wasp serve` running?)"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .context("cannot read response")?
            .to_bytes();
        Ok((status, body))
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        ct: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Value> {
        let (status, bytes) = self.send(method, path, ct, body).await?;
        if status == StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        if !status.is_success() {
            return Err(api_error(status, &value));
        }
        Ok(value)
    }

    /// GETs a binary body; an error status fails with the server's message.
    pub async fn get_bytes(&self, path: &str) -> Result<Bytes> {
        let (status, bytes) = self.send(Method::GET, path, None, Vec::new()).await?;
        if !status.is_success() {
            let value: Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
            return Err(api_error(status, &value));
        }
        Ok(bytes)
    }

    pub async fn get(&self, path: &str) -> Result<Value> {
        self.json(Method::GET, path, None, Vec::new()).await
    }

    pub async fn post(&self, path: &str) -> Result<Value> {
        self.json(Method::POST, path, None, Vec::new()).await
    }

    /// POSTs a body of the given content type.
    pub async fn post_body(&self, path: &str, content_type: &str, body: Vec<u8>) -> Result<Value> {
        self.json(Method::POST, path, Some(content_type), body)
            .await
    }

    /// PUTs a body; an error status fails with the server's message.
    pub async fn put_body(&self, path: &str, content_type: &str, body: Vec<u8>) -> Result<Value> {
        self.json(Method::PUT, path, Some(content_type), body).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value> {
        self.json(Method::DELETE, path, None, Vec::new()).await
    }

    /// Uploads a component; returns `sha256:<hex>`.
    pub async fn upload(&self, bytes: Vec<u8>) -> Result<String> {
        let value = self
            .json(
                Method::PUT,
                "/api/v1/components",
                Some("application/wasm"),
                bytes,
            )
            .await?;
        value["digest"]
            .as_str()
            .map(str::to_owned)
            .context("the server's upload answer has no digest")
    }

    pub async fn put_spec(&self, spec: &EndpointSpec) -> Result<Value> {
        let body = serde_json::to_vec(spec)?;
        self.json(
            Method::PUT,
            &endpoint_path(&spec.name, ""),
            Some("application/json"),
            body,
        )
        .await
    }

    pub async fn invoke(
        &self,
        name: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes)> {
        let path = format!(
            "/endpoints/{}/invoke{path}",
            utf8_percent_encode(name, NON_ALPHANUMERIC)
        );
        self.send(Method::POST, &path, Some("application/json"), body)
            .await
    }
}

/// The error a failed API call is reported as: the status, the server's message and the
/// field at fault.
fn api_error(status: StatusCode, value: &Value) -> anyhow::Error {
    let error = &value["error"];
    if status == StatusCode::UNAUTHORIZED {
        return anyhow::anyhow!(
            "{status}: {} (set WASP_API_KEY, or run `wasp login`; the first start of a server \
             writes its operator key to DATA_DIR/operator.key)",
            error["message"].as_str().unwrap_or("")
        );
    }
    match error["field"].as_str() {
        Some(field) => anyhow::anyhow!(
            "{status}: {} (field `{field}`)",
            error["message"].as_str().unwrap_or("")
        ),
        None => anyhow::anyhow!(
            "{status}: {}",
            error["message"]
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned)
        ),
    }
}
