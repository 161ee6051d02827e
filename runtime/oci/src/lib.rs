//! Wasm components as OCI artifacts, in the CNCF Wasm OCI layout that wkg, Spin and
//! wasmCloud use: an image manifest whose config is `application/vnd.wasm.config.v0+json`
//! and whose one layer is the component, `application/wasm`.
//!
//! [`Client::pull`] fetches one over the OCI distribution API, checking the manifest
//! against a pinned digest and the layer against the digest the manifest names;
//! [`Client::push`] publishes one. Registries that want a login get it as HTTP Basic or
//! through their token service (the Docker registry token flow), as their
//! `WWW-Authenticate` challenge says. Loopback registries, and those named insecure, are
//! spoken to over plain HTTP (as Docker does); every other one over HTTPS.
#![deny(missing_docs)]

mod reference;

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderMap, HeaderValue};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use reference::Reference;

/// The manifest's media type.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The config's media type in the Wasm OCI layout.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// The component layer's media type.
pub const LAYER_MEDIA_TYPE: &str = "application/wasm";

/// Longest a registry may take to answer one request.
const TIMEOUT: Duration = Duration::from_secs(120);
/// Largest manifest, token answer or error body read, in bytes.
const MAX_SMALL: usize = 4 << 20;

/// Why a pull or a push failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not an OCI reference.
    #[error("`{reference}` is not an OCI reference: {reason}")]
    BadReference {
        /// What was given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The registry refused the login, or wanted one that was not given.
    #[error("{0}")]
    Unauthorized(String),
    /// No such repository, tag or digest.
    #[error("{0}")]
    NotFound(String),
    /// The artifact is not a Wasm component in the Wasm OCI layout.
    #[error("{0}")]
    NotAComponent(String),
    /// What came back does not match its digest.
    #[error("{0}")]
    Digest(String),
    /// The component is larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// The registry could not be reached or answered something else.
    #[error("{0}")]
    Registry(String),
}

/// Result of registry operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub use wasp_core::credentials::RegistryLogin as Login;

/// A component pulled from a registry.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The component's bytes (checked against `layer_digest`).
    pub bytes: Bytes,
    /// `sha256:<hex>` of the component.
    pub layer_digest: String,
    /// `sha256:<hex>` of the manifest (what a reference pins with `@`).
    pub manifest_digest: String,
}

/// An OCI descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
}

/// An OCI image manifest.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The config of the Wasm OCI layout.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct WasmConfig {
    created: String,
    architecture: &'static str,
    os: &'static str,
    layer_digests: Vec<String>,
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(71);
    out.push_str("sha256:");
    for b in hash {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Talks to OCI registries.
#[derive(Clone)]
pub struct Client {
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    insecure: Vec<String>,
}

/// One answer.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The registry's own words (`{"errors": [{"code", "message"}]}`), or the status.
    fn explain(&self) -> String {
        let parsed: Option<serde_json::Value> = serde_json::from_slice(&self.body).ok();
        let said = parsed
            .as_ref()
            .and_then(|v| v["errors"].as_array())
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| {
                        format!(
                            "{}: {}",
                            e["code"].as_str().unwrap_or("ERROR"),
                            e["message"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            });
        match said {
            Some(s) if !s.is_empty() => format!("{} ({s})", self.status),
            _ => self.status.to_string(),
        }
    }
}

/// The parameters of a `WWW-Authenticate` challenge: its scheme and `key="value"` pairs.
fn challenge(header: &str) -> (String, Vec<(String, String)>) {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        params.push((key.trim().to_ascii_lowercase(), value));
    }
    (scheme.to_ascii_lowercase(), params)
}

/// One conversation with a registry: the authorization it has earned so far.
struct Session<'a> {
    client: &'a Client,
    base: String,
    login: Option<&'a Login>,
    authorization: Option<String>,
}

impl Client {
    /// A client that checks HTTPS registries' certificates with `tls`.
    pub fn new(tls: rustls::ClientConfig) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Self {
            http: HyperClient::builder(TokioExecutor::new()).build(connector),
            insecure: Vec::new(),
        }
    }

    /// Also speaks plain HTTP to these registries (hosts as references name them).
    pub fn with_insecure(mut self, registries: Vec<String>) -> Self {
        self.insecure = registries;
        self
    }

    /// `http://` for loopback and insecure registries, else `https://`.
    fn base(&self, registry: &str) -> String {
        let host = registry
            .rsplit_once(':')
            .filter(|(_, port)| port.parse::<u16>().is_ok())
            .map_or(registry, |(host, _)| host);
        let loopback = host == "localhost"
            || host == "[::1]"
            || host
                .parse::<std::net::Ipv4Addr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback || self.insecure.iter().any(|r| r == registry) {
            format!("http://{registry}")
        } else {
            format!("https://{registry}")
        }
    }

    /// A conversation with `reference`'s registry.
    fn session<'a>(&'a self, reference: &Reference, login: Option<&'a Login>) -> Session<'a> {
        Session {
            client: self,
            base: self.base(&reference.registry),
            login,
            authorization: None,
        }
    }

    /// Pulls the component `reference` names, with `login` if given; at most `max_bytes`.
    /// The manifest must be the Wasm OCI layout, match the reference's digest if it pins
    /// one, and the component must match the digest the manifest gives it.
    pub async fn pull(
        &self,
        reference: &Reference,
        login: Option<&Login>,
        max_bytes: usize,
    ) -> Result<Pulled> {
        let mut session = self.session(reference, login);
        let url = session.manifest_url(reference);
        let reply = session
            .send(
                "GET",
                &url,
                &[("accept", MANIFEST_MEDIA_TYPE)],
                Bytes::new(),
                MAX_SMALL,
            )
            .await?;
        let reply = expect(reply, &[200], reference)?;
        let manifest_digest = digest_of(&reply.body);
        if let Some(pinned) = &reference.digest
            && *pinned != manifest_digest
        {
            return Err(Error::Digest(format!(
                "the manifest of `{reference}` is {manifest_digest}, not the {pinned} the \
                 reference pins"
            )));
        }
        let manifest: Manifest = serde_json::from_slice(&reply.body).map_err(|e| {
            Error::NotAComponent(format!(
                "`{reference}` is not an OCI image manifest ({e}); a Wasm component is \
                 published with `wasp processor push` or `wkg oci push`"
            ))
        })?;
        let layers: Vec<&Descriptor> = manifest
            .layers
            .iter()
            .filter(|l| l.media_type == LAYER_MEDIA_TYPE)
            .collect();
        let [layer] = layers[..] else {
            return Err(Error::NotAComponent(format!(
                "`{reference}` is not a Wasm component artifact: it has {} `{LAYER_MEDIA_TYPE}` \
                 layers (one wanted) and config `{}`",
                layers.len(),
                manifest.config.media_type
            )));
        };
        if layer.size > max_bytes as u64 {
            return Err(Error::TooLarge(format!(
                "the component of `{reference}` is {} bytes; at most {max_bytes} are taken",
                layer.size
            )));
        }
        let url = format!(
            "{}/v2/{}/blobs/{}",
            session.base, reference.repository, layer.digest
        );
        let reply = session
            .send("GET", &url, &[], Bytes::new(), max_bytes)
            .await?;
        let reply = expect(reply, &[200], reference)?;
        let got = digest_of(&reply.body);
        if got != layer.digest {
            return Err(Error::Digest(format!(
                "the component of `{reference}` is {got}, not the {} its manifest names",
                layer.digest
            )));
        }
        Ok(Pulled {
            bytes: reply.body,
            layer_digest: got,
            manifest_digest,
        })
    }

    /// Publishes `component` as `reference` (its tag, `latest` if none) in the Wasm OCI
    /// layout, with `login` if given; returns the manifest's digest.
    pub async fn push(
        &self,
        reference: &Reference,
        component: Bytes,
        login: Option<&Login>,
    ) -> Result<String> {
        if reference.digest.is_some() {
            return Err(Error::BadReference {
                reference: reference.to_string(),
                reason: "a push names a tag, not a digest".into(),
            });
        }
        let mut session = self.session(reference, login);
        let layer_digest = digest_of(&component);
        let config = serde_json::to_vec(&WasmConfig {
            created: wasp_core::time::UtcTime::now().rfc3339(),
            architecture: "wasm",
            os: "wasip2",
            layer_digests: vec![layer_digest.clone()],
        })
        .map_err(|e| Error::Registry(e.to_string()))?;
        let config = Bytes::from(config);
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.into()),
            config: Descriptor {
                media_type: CONFIG_MEDIA_TYPE.into(),
                digest: digest_of(&config),
                size: config.len() as u64,
            },
            layers: vec![Descriptor {
                media_type: LAYER_MEDIA_TYPE.into(),
                digest: layer_digest,
                size: component.len() as u64,
            }],
        };
        session
            .upload(reference, &manifest.config.digest, config)
            .await?;
        session
            .upload(reference, &manifest.layers[0].digest, component)
            .await?;
        let body =
            Bytes::from(serde_json::to_vec(&manifest).map_err(|e| Error::Registry(e.to_string()))?);
        let digest = digest_of(&body);
        let url = session.manifest_url(reference);
        let reply = session
            .send(
                "PUT",
                &url,
                &[("content-type", MANIFEST_MEDIA_TYPE)],
                body,
                MAX_SMALL,
            )
            .await?;
        expect(reply, &[200, 201], reference)?;
        Ok(digest)
    }
}

/// `reply` if its status is one of `ok`, else the error its status means.
fn expect(reply: Reply, ok: &[u16], reference: &Reference) -> Result<Reply> {
    match reply.status {
        s if ok.contains(&s) => Ok(reply),
        401 | 403 => Err(Error::Unauthorized(format!(
            "the registry refused access to `{reference}`: {}",
            reply.explain()
        ))),
        404 => Err(Error::NotFound(format!(
            "`{reference}` is not in its registry: {}",
            reply.explain()
        ))),
        _ => Err(Error::Registry(format!(
            "the registry answered {} for `{reference}`",
            reply.explain()
        ))),
    }
}

impl Session<'_> {
    /// Where `reference`'s manifest is.
    fn manifest_url(&self, reference: &Reference) -> String {
        format!(
            "{}/v2/{}/manifests/{}",
            self.base,
            reference.repository,
            reference.target()
        )
    }

    /// Uploads a blob unless the repository has it (a monolithic upload: POST, then PUT).
    async fn upload(&mut self, reference: &Reference, digest: &str, blob: Bytes) -> Result<()> {
        let repository = &reference.repository;
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base);
        let there = self.send("HEAD", &url, &[], Bytes::new(), 0).await?;
        if there.status == 200 {
            return Ok(());
        }
        let url = format!("{}/v2/{repository}/blobs/uploads/", self.base);
        let started = self
            .send("POST", &url, &[], Bytes::new(), MAX_SMALL)
            .await?;
        let started = expect(started, &[202], reference)?;
        let location = started.header("location").ok_or_else(|| {
            Error::Registry("the registry started an upload without a Location".into())
        })?;
        let location = if location.starts_with("http://") || location.starts_with("https://") {
            location.to_owned()
        } else {
            format!("{}{location}", self.base)
        };
        let separator = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{separator}digest={digest}");
        let done = self
            .send(
                "PUT",
                &url,
                &[("content-type", "application/octet-stream")],
                blob,
                MAX_SMALL,
            )
            .await?;
        expect(done, &[201, 204], reference)?;
        Ok(())
    }

    /// Sends a request, earning an authorization first if the registry challenges it,
    /// and following redirects (blob storage elsewhere) for reads.
    async fn send(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        max_body: usize,
    ) -> Result<Reply> {
        let mut reply = self
            .once(method, url, headers, body.clone(), max_body, true)
            .await?;
        if reply.status == 401
            && let Some(header) = reply.header("www-authenticate").map(str::to_owned)
        {
            self.authorization = Some(self.authorize(&header).await?);
            reply = self
                .once(method, url, headers, body, max_body, true)
                .await?;
        }
        let mut url = url.to_owned();
        for _ in 0..5 {
            if !matches!(reply.status, 301 | 302 | 303 | 307 | 308)
                || !matches!(method, "GET" | "HEAD")
            {
                break;
            }
            let Some(next) = reply.header("location").map(str::to_owned) else {
                break;
            };
            let next = if next.starts_with("http://") || next.starts_with("https://") {
                next
            } else {
                format!("{}{next}", self.base)
            };
            // Storage elsewhere gets no registry credentials (it signs its own URLs).
            let same = next.starts_with(&format!("{}/", self.base));
            reply = self
                .once(method, &next, headers, Bytes::new(), max_body, same)
                .await?;
            url = next;
        }
        tracing::debug!(%method, %url, status = reply.status, "registry");
        Ok(reply)
    }

    async fn once(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        max_body: usize,
        authorized: bool,
    ) -> Result<Reply> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(url)
            .header("user-agent", "wasp");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if authorized && let Some(auth) = &self.authorization {
            request = request.header("authorization", auth);
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| Error::Registry(format!("cannot make a request to {url}: {e}")))?;
        let exchange = async {
            let response = self
                .client
                .http
                .request(request)
                .await
                .map_err(|e| Error::Registry(format!("cannot reach {url}: {e}")))?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let limit = if (200..300).contains(&status) {
                max_body
            } else {
                MAX_SMALL
            };
            let body = Limited::new(response.into_body(), limit.max(1))
                .collect()
                .await
                .map_err(|e| {
                    if (200..300).contains(&status) {
                        Error::TooLarge(format!("{url} answered more than {max_body} bytes ({e})"))
                    } else {
                        Error::Registry(format!("reading the answer of {url}: {e}"))
                    }
                })?
                .to_bytes();
            Ok(Reply {
                status,
                headers,
                body,
            })
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| Error::Registry(format!("{url} did not answer within {TIMEOUT:?}")))?
    }

    /// The `Authorization` the challenge asks for: Basic with the login, or a bearer token
    /// from the registry's token service (with the login, if any).
    async fn authorize(&self, header: &str) -> Result<String> {
        let basic = self.login.map(|l| {
            let pair = format!("{}:{}", l.username, l.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        let (scheme, params) = challenge(header);
        let param = |key: &str| {
            params
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        match scheme.as_str() {
            "basic" => basic.ok_or_else(|| {
                Error::Unauthorized(
                    "the registry wants a login and none was given (set one: \
                     PUT /api/v1/registries/{host}, or --username for a push)"
                        .into(),
                )
            }),
            "bearer" => {
                let realm = param("realm").ok_or_else(|| {
                    Error::Registry(format!("a bearer challenge without a realm: {header}"))
                })?;
                let mut url = realm.to_owned();
                let mut separator = if realm.contains('?') { '&' } else { '?' };
                for key in ["service", "scope"] {
                    if let Some(value) = param(key) {
                        url.push(separator);
                        url.push_str(key);
                        url.push('=');
                        url.push_str(&encode_query(value));
                        separator = '&';
                    }
                }
                let mut request = hyper::Request::builder()
                    .method("GET")
                    .uri(&url)
                    .header("user-agent", "wasp");
                if let Some(basic) = &basic {
                    request = request.header("authorization", basic);
                }
                let request = request
                    .body(Full::new(Bytes::new()))
                    .map_err(|e| Error::Registry(format!("bad token realm {realm}: {e}")))?;
                let response = tokio::time::timeout(TIMEOUT, self.client.http.request(request))
                    .await
                    .map_err(|_| Error::Registry(format!("{realm} did not answer")))?
                    .map_err(|e| Error::Registry(format!("cannot reach {realm}: {e}")))?;
                let status = response.status().as_u16();
                let body = Limited::new(response.into_body(), MAX_SMALL)
                    .collect()
                    .await
                    .map_err(|e| Error::Registry(format!("reading {realm}: {e}")))?
                    .to_bytes();
                if status == 401 || status == 403 {
                    return Err(Error::Unauthorized(format!(
                        "the registry's token service refused the login ({status})"
                    )));
                }
                if status != 200 {
                    return Err(Error::Registry(format!(
                        "the registry's token service answered {status}"
                    )));
                }
                let token: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| Error::Registry(format!("the token service's answer: {e}")))?;
                let token = token["token"]
                    .as_str()
                    .or_else(|| token["access_token"].as_str())
                    .ok_or_else(|| Error::Registry("the token service answered no token".into()))?;
                HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| Error::Registry("the token is not a header value".into()))?;
                Ok(format!("Bearer {token}"))
            }
            other => Err(Error::Registry(format!(
                "the registry asks for `{other}` authentication, which wasp does not speak"
            ))),
        }
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
fn encode_query(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_with_commas_inside_quotes() {
        let (scheme, params) = challenge(
            r#"Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:o/p:pull,push""#,
        );
        assert_eq!(scheme, "bearer");
        assert_eq!(
            params,
            [
                ("realm".to_owned(), "https://ghcr.io/token".to_owned()),
                ("service".to_owned(), "ghcr.io".to_owned()),
                ("scope".to_owned(), "repository:o/p:pull,push".to_owned()),
            ]
        );
        let (scheme, params) = challenge(r#"Basic realm="wasp-test""#);
        assert_eq!(scheme, "basic");
        assert_eq!(params[0].1, "wasp-test");
    }

    #[test]
    fn loopback_registries_are_plain_http_and_others_https() {
        let client = Client::new(
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth()
            })
            .unwrap(),
        )
        .with_insecure(vec!["registry.lan:5000".into()]);
        assert_eq!(client.base("127.0.0.1:5556"), "http://127.0.0.1:5556");
        assert_eq!(client.base("localhost:5000"), "http://localhost:5000");
        assert_eq!(client.base("registry.lan:5000"), "http://registry.lan:5000");
        assert_eq!(client.base("ghcr.io"), "https://ghcr.io");
    }

    #[test]
    fn digests_are_sha256_hex() {
        assert_eq!(
            digest_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
