//! HTTP routes: data plane, control API, health and metrics.
//!
//! Routing is a match on path segments: the route table is small and fixed, and the data
//! route is the hot path, so a router crate would add a dependency without removing code.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use hyper::{Method, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde_json::{Value, json};
use wasp_backend::BackendError;
use wasp_core::EndpointSpec;
use wasp_wasm::{CallError, Request};

use crate::Error;
use crate::metrics::{FailureLabels, InstanceLabels, RequestLabels, VersionLabels};
use crate::registry::{DeployedVersion, Deployment, Gateway};

/// Response type of every route.
pub(crate) type Response = hyper::Response<Full<Bytes>>;

/// Largest control-API body (a spec), in bytes.
const MAX_SPEC_BYTES: u64 = 1024 * 1024;
/// Largest component upload, in bytes.
const MAX_COMPONENT_BYTES: u64 = 256 * 1024 * 1024;

/// Characters escaped in an endpoint name inside a URL path.
const PATH_SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b'?')
    .add(b'<')
    .add(b'>')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// An error answered as `{"error": {"code", "message", "field"}}`.
struct ApiError {
    status: u16,
    code: &'static str,
    message: String,
    field: Option<String>,
    retry_after: bool,
}

impl ApiError {
    fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: false,
        }
    }

    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(field) = self.field {
            error["field"] = Value::String(field);
        }
        let mut response = json_response(self.status, &json!({ "error": error }));
        if self.retry_after {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        // The client gets the operation and the cause; the log also gets the file.
        match &e {
            Error::StorageFull {
                path: Some(path), ..
            }
            | Error::Io {
                path: Some(path), ..
            } => tracing::error!(path = %path.display(), "{e}"),
            _ if e.status() >= 500 => tracing::error!("{e}"),
            _ => {}
        }
        Self {
            status: e.status(),
            code: e.code(),
            field: e.field().map(str::to_owned),
            message: e.to_string(),
            retry_after: false,
        }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        let field = match &e {
            CallError::Guest(g) => g.field.clone(),
            _ => None,
        };
        Self {
            status: e.status(),
            code: e.code(),
            retry_after: matches!(e, CallError::Busy { .. } | CallError::QueueTimeout { .. }),
            message: e.to_string(),
            field,
        }
    }
}

fn json_response(status: u16, body: &Value) -> Response {
    let mut response = hyper::Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text_response(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response {
    let mut response = hyper::Response::new(Full::new(body.into()));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Entry point of every request.
pub(crate) async fn handle(
    gateway: Arc<Gateway>,
    request: hyper::Request<Incoming>,
) -> Result<Response, Infallible> {
    Ok(route(gateway, request)
        .await
        .unwrap_or_else(ApiError::into_response))
}

async fn route(
    gateway: Arc<Gateway>,
    request: hyper::Request<Incoming>,
) -> Result<Response, ApiError> {
    let path = request.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = request.method().clone();
    match (segments.as_slice(), &method) {
        (["healthz"], &Method::GET) => Ok(text_response(200, "text/plain", "ok\n")),
        (["metrics"], &Method::GET) => Ok(metrics(&gateway)),
        (["endpoints", raw, "invoke", ..], _) => {
            let prefix = "/endpoints/".len() + raw.len() + "/invoke".len();
            let name = decode(raw)?;
            invoke(gateway, request, name, prefix).await
        }
        (["v1", "embeddings"], &Method::POST) => openai(gateway, request, "/v1/embeddings").await,
        (["v2", "models", raw, "infer"], &Method::POST) => {
            let name = decode(raw)?;
            kserve_infer(gateway, request, name).await
        }
        (["v2", "models", raw, "ready"], &Method::GET) => {
            let name = decode(raw)?;
            let d = gateway.endpoint(&name).ok_or(Error::NotFound(name))?;
            let ready = d.status() == "ready";
            Ok(json_response(
                if ready { 200 } else { 503 },
                &json!({ "name": d.spec.name, "ready": ready, "status": d.status() }),
            ))
        }
        (["v2", "models", raw], &Method::GET) => {
            let name = decode(raw)?;
            let d = gateway.endpoint(&name).ok_or(Error::NotFound(name))?;
            Ok(json_response(
                200,
                &json!({
                    "name": d.spec.name,
                    "versions": d.versions.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
                    "platform": "wasp",
                }),
            ))
        }
        (["api", "v1", "components"], &Method::PUT | &Method::POST) => {
            let body = read_body(request.into_body(), MAX_COMPONENT_BYTES, "component").await?;
            if body.is_empty() {
                return Err(ApiError::new(
                    400,
                    "empty_body",
                    "the body must be a wasm component",
                ));
            }
            let size = body.len();
            let digest = gateway.upload_component(body).await?;
            Ok(json_response(
                201,
                &json!({ "digest": format!("sha256:{digest}"), "size": size }),
            ))
        }
        (["api", "v1", "components", digest], &Method::GET) => {
            let digest = decode(digest)?;
            let hex = digest.strip_prefix("sha256:").unwrap_or(&digest);
            let bytes = gateway.download_component(hex).await.map_err(|e| match e {
                Error::UnknownComponent(_) | Error::CorruptComponent(_) => {
                    ApiError::new(404, "component_not_found", e.to_string())
                }
                other => other.into(),
            })?;
            Ok(text_response(200, "application/wasm", bytes))
        }
        (["api", "v1", "store", "snapshot"], &Method::GET) => {
            let bytes = gateway.store_snapshot().await?;
            Ok(text_response(200, "application/octet-stream", bytes))
        }
        (["api", "v1", "endpoints"], &Method::GET) => {
            let list: Vec<Value> = gateway.endpoints().iter().map(|d| summary(d)).collect();
            Ok(json_response(200, &json!({ "endpoints": list })))
        }
        (["api", "v1", "endpoints"], &Method::POST) => {
            let spec = read_spec(request).await?;
            let deployment = gateway.deploy(spec, false).await?;
            Ok(json_response(201, &detail(&deployment)))
        }
        (["api", "v1", "endpoints", name], _) => {
            let name = decode(name)?;
            match method {
                Method::GET => {
                    let d = gateway.endpoint(&name).ok_or(Error::NotFound(name))?;
                    Ok(json_response(200, &detail(&d)))
                }
                Method::PUT => {
                    let spec = read_spec(request).await?;
                    if spec.name != name {
                        return Err(Error::Invalid {
                            field: "name".into(),
                            message: format!(
                                "the spec names `{}` but the URL names `{name}`",
                                spec.name
                            ),
                        }
                        .into());
                    }
                    let existed = gateway.endpoint(&name).is_some();
                    let deployment = gateway.deploy(spec, true).await?;
                    Ok(json_response(
                        if existed { 200 } else { 201 },
                        &detail(&deployment),
                    ))
                }
                Method::DELETE => {
                    gateway.remove(&name).await?;
                    Ok(text_response(204, "text/plain", Bytes::new()))
                }
                _ => Err(method_not_allowed(&method, &path)),
            }
        }
        (["api", "v1", "endpoints", name, action @ ("stop" | "start")], &Method::POST) => {
            let name = decode(name)?;
            let deployment = gateway.set_stopped(&name, *action == "stop").await?;
            Ok(json_response(200, &detail(&deployment)))
        }
        (["api", "v1", "endpoints", name, "logs"], &Method::GET) => {
            let name = decode(name)?;
            let d = gateway.endpoint(&name).ok_or(Error::NotFound(name))?;
            let limit = query_param(request.uri().query(), "limit")
                .map(|v| {
                    v.parse::<usize>().map_err(|_| ApiError {
                        field: Some("limit".into()),
                        ..ApiError::new(400, "invalid_query", format!("`{v}` is not a count"))
                    })
                })
                .transpose()?
                .unwrap_or(100);
            let records: Vec<Value> = d
                .logs
                .tail(limit)
                .into_iter()
                .map(|r| json!({ "at_ms": r.at_ms, "level": r.level, "version": r.version, "message": r.message }))
                .collect();
            Ok(json_response(200, &json!({ "logs": records })))
        }
        (["healthz" | "metrics"], _)
        | (["api", "v1", "components" | "endpoints"], _)
        | (["api", "v1", "components", _], _)
        | (["api", "v1", "store", "snapshot"], _)
        | (["api", "v1", "endpoints", _, "stop" | "start" | "logs"], _) => {
            Err(method_not_allowed(&method, &path))
        }
        _ => Err(ApiError::new(
            404,
            "route_not_found",
            format!("no route for {method} {path}"),
        )),
    }
}

fn method_not_allowed(method: &Method, path: &str) -> ApiError {
    ApiError::new(
        405,
        "method_not_allowed",
        format!("{method} is not allowed on {path}"),
    )
}

fn decode(segment: &str) -> Result<String, ApiError> {
    percent_decode_str(segment)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            ApiError::new(
                400,
                "invalid_path",
                "the endpoint name in the path is not UTF-8",
            )
        })
}

fn query_param<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Reads a body of at most `limit` bytes; 413 naming `what` when larger.
async fn read_body(body: Incoming, limit: u64, what: &str) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            413,
            "body_too_large",
            format!("request body exceeds the limit of {limit} bytes ({what})"),
        )
    };
    match Limited::new(body, limit as usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(ApiError::new(
            400,
            "bad_body",
            format!("cannot read request body: {e}"),
        )),
    }
}

fn declared_length(request: &hyper::Request<Incoming>) -> Option<u64> {
    request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Reads a spec as JSON (`application/json`, or a body starting with `{`) or TOML.
async fn read_spec(request: hyper::Request<Incoming>) -> Result<EndpointSpec, ApiError> {
    let json = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| ct.starts_with("application/json"));
    let body = read_body(request.into_body(), MAX_SPEC_BYTES, "spec").await?;
    let is_json =
        json.unwrap_or_else(|| body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'));
    let spec = if is_json {
        EndpointSpec::from_json(&body)
    } else {
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApiError::new(400, "invalid_spec", "the spec is not UTF-8"))?;
        EndpointSpec::from_toml(text)
    };
    spec.map_err(|e| Error::Spec(e).into())
}

fn invoke_url(name: &str) -> String {
    format!(
        "/endpoints/{}/invoke",
        utf8_percent_encode(name, PATH_SEGMENT)
    )
}

fn summary(d: &Deployment) -> Value {
    json!({
        "name": d.spec.name,
        "status": d.status(),
        "url": invoke_url(&d.spec.name),
        "versions": d.versions.iter().map(|v| json!({ "name": v.name, "weight": v.weight })).collect::<Vec<_>>(),
    })
}

fn detail(d: &Deployment) -> Value {
    let versions: Vec<Value> = d
        .versions
        .iter()
        .map(|v| {
            let s = v.processor.stats();
            json!({
                "name": v.name,
                "weight": v.weight,
                "status": d.version_status(v),
                "backend": v.backend,
                "workers": v.workers.iter().map(|w| json!({
                    "model": w.backend().describe(),
                    "queued": w.queued(),
                    "batches": w.stats().batches.load(std::sync::atomic::Ordering::Relaxed),
                    "requests": w.stats().requests.load(std::sync::atomic::Ordering::Relaxed),
                })).collect::<Vec<_>>(),
                "component": format!("sha256:{}", v.digest),
                "compiled_from_cache": v.from_cache,
                "instances": { "idle": s.idle, "busy": s.busy, "queued": s.queued, "max": s.max, "created": s.created, "lost": s.lost },
            })
        })
        .collect();
    let mut out = json!({
        "name": d.spec.name,
        "description": d.spec.description,
        "status": d.status(),
        "stopped": d.stopped,
        "url": invoke_url(&d.spec.name),
        "versions": versions,
        "spec": d.spec,
    });
    if let Some(error) = &d.error {
        out["error"] = Value::String(error.clone());
    }
    out
}

fn metrics(gateway: &Gateway) -> Response {
    let m = &gateway.metrics;
    m.instances.clear();
    m.queued.clear();
    for d in gateway.endpoints() {
        for v in &d.versions {
            let s = v.processor.stats();
            let labels = |state: &str| InstanceLabels {
                endpoint: d.spec.name.clone(),
                version: v.name.clone(),
                state: state.into(),
            };
            m.instances
                .get_or_create(&labels("idle"))
                .set(s.idle as i64);
            m.instances
                .get_or_create(&labels("busy"))
                .set(s.busy as i64);
            let version = VersionLabels {
                endpoint: d.spec.name.clone(),
                version: v.name.clone(),
            };
            m.queued.get_or_create(&version).set(s.queued as i64);
            if !v.workers.is_empty() {
                use std::sync::atomic::Ordering::Relaxed;
                let sum = |f: fn(&wasp_backend::BatchStats) -> u64| {
                    v.workers.iter().map(|w| f(w.stats())).sum::<u64>()
                };
                // The batchers count; the counters catch up to them at each scrape.
                let batches = m.batches.get_or_create(&version);
                batches.inc_by(sum(|s| s.batches.load(Relaxed)).saturating_sub(batches.get()));
                let requests = m.batched_requests.get_or_create(&version);
                requests.inc_by(sum(|s| s.requests.load(Relaxed)).saturating_sub(requests.get()));
                let queued: usize = v.workers.iter().map(|w| w.queued()).sum();
                m.backend_queued.get_or_create(&version).set(queued as i64);
            }
        }
    }
    text_response(
        200,
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        m.encode(),
    )
}

/// Headers a processor never sees: the gateway's own credentials.
const HIDDEN_HEADERS: [&str; 2] = ["authorization", "x-wasp-api-key"];

/// The endpoint called `name`, ready to serve, and the version picked for one request.
fn resolve(gateway: &Gateway, name: &str) -> Result<Arc<DeployedVersion>, ApiError> {
    let deployment = gateway
        .endpoint(name)
        .ok_or_else(|| Error::NotFound(name.to_owned()))?;
    if let Some(error) = &deployment.error {
        return Err(ApiError::new(
            503,
            "endpoint_failed",
            format!("endpoint `{name}` failed to load: {error}"),
        ));
    }
    if deployment.stopped {
        return Err(ApiError::new(
            503,
            "endpoint_stopped",
            format!(
                "endpoint `{name}` is stopped; POST /api/v1/endpoints/{{name}}/start resumes it"
            ),
        ));
    }
    let roll = rand::random::<u32>() % 100;
    deployment.pick(roll).cloned().ok_or_else(|| {
        ApiError::new(
            503,
            "no_version",
            format!("endpoint `{name}` has no version with traffic"),
        )
    })
}

/// Headers a processor may see.
fn visible_headers(headers: &hyper::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| !HIDDEN_HEADERS.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

/// Serves the data route; `prefix` is the length of `/endpoints/{name}/invoke` in the path.
async fn invoke(
    gateway: Arc<Gateway>,
    request: hyper::Request<Incoming>,
    name: String,
    prefix: usize,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let version = resolve(&gateway, &name)?;
    let limit = version.limits.max_body_bytes;
    if declared_length(&request).is_some_and(|n| n > limit) {
        return Err(body_limit(limit));
    }
    // Everything after `/endpoints/{name}/invoke`, with the query string.
    let rest = request.uri().path().get(prefix..).unwrap_or("");
    let mut path = if rest.is_empty() {
        "/".to_owned()
    } else {
        rest.to_owned()
    };
    if let Some(q) = request.uri().query() {
        path.push('?');
        path.push_str(q);
    }
    let method = request.method().to_string();
    let headers = visible_headers(request.headers());
    let body = read_version_body(request.into_body(), limit).await?;
    let request = Request {
        method,
        path,
        headers,
        body: body.to_vec(),
    };
    Ok(serve(&gateway, &name, &version, request, started).await)
}

/// Largest body of the OpenAI-compatible routes before the endpoint (and its limit) is known.
const MAX_OPENAI_BYTES: u64 = 64 * 1024 * 1024;

/// `POST /v1/embeddings`: the body's `model` names the endpoint; its processor sees the
/// request at path `/v1/embeddings`.
async fn openai(
    gateway: Arc<Gateway>,
    request: hyper::Request<Incoming>,
    path: &str,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let headers = visible_headers(request.headers());
    let body = read_body(request.into_body(), MAX_OPENAI_BYTES, "body").await?;
    #[derive(serde::Deserialize)]
    struct Model {
        model: Option<Value>,
    }
    let model: Model = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            400,
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    let name = match model.model {
        Some(Value::String(name)) => name,
        _ => {
            return Err(ApiError {
                field: Some("model".into()),
                ..ApiError::new(400, "invalid_request", "`model` must name an endpoint")
            });
        }
    };
    let version = resolve(&gateway, &name)?;
    if body.len() as u64 > version.limits.max_body_bytes {
        return Err(body_limit(version.limits.max_body_bytes));
    }
    let request = Request {
        method: "POST".into(),
        path: path.to_owned(),
        headers,
        body: body.to_vec(),
    };
    Ok(serve(&gateway, &name, &version, request, started).await)
}

/// Why a request failed after it reached a version.
enum Failure {
    Processor(CallError),
    Backend(BackendError),
}

impl Failure {
    fn code(&self) -> &'static str {
        match self {
            Self::Processor(e) => e.code(),
            Self::Backend(BackendError::BadInput { .. }) => "bad_model_input",
            Self::Backend(BackendError::Unavailable(_)) => "backend_unavailable",
            Self::Backend(_) => "backend_error",
        }
    }
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Processor(e) => e.into(),
            Failure::Backend(e) => {
                let code = Failure::Backend(e.clone()).code();
                let (status, field) = match &e {
                    BackendError::BadInput { field, .. } => (400, field.clone()),
                    BackendError::Unavailable(_) => (503, None),
                    _ => (500, None),
                };
                ApiError {
                    field,
                    ..ApiError::new(status, code, e.to_string())
                }
            }
        }
    }
}

/// Runs one request through a version: the processor alone (backend `none`), or
/// pre-process, the backend's batcher, and post-process.
async fn run(version: &DeployedVersion, request: Request) -> Result<wasp_wasm::Response, Failure> {
    if version.workers.is_empty() {
        return version
            .processor
            .handle(request)
            .await
            .map_err(Failure::Processor);
    }
    let prepared = version
        .processor
        .pre_process(request)
        .await
        .map_err(Failure::Processor)?;
    let output = version
        .infer(prepared.input.into())
        .await
        .map_err(Failure::Backend)?;
    version
        .processor
        .post_process(&prepared.context, output.into())
        .await
        .map_err(Failure::Processor)
}

/// Runs a request and records its metrics.
async fn serve(
    gateway: &Gateway,
    name: &str,
    version: &DeployedVersion,
    request: Request,
    started: Instant,
) -> Response {
    let response = match run(version, request).await {
        Ok(response) => into_hyper(response, &version.name),
        Err(failure) => {
            gateway
                .metrics
                .failures
                .get_or_create(&FailureLabels {
                    endpoint: name.to_owned(),
                    version: version.name.clone(),
                    kind: failure.code().into(),
                })
                .inc();
            let mut response = ApiError::from(failure).into_response();
            if let Ok(v) = HeaderValue::from_str(&version.name) {
                response.headers_mut().insert("x-wasp-version", v);
            }
            response
        }
    };
    record(gateway, name, &version.name, &response, started);
    response
}

/// Counts a data-route response and its latency.
fn record(gateway: &Gateway, endpoint: &str, version: &str, response: &Response, started: Instant) {
    let m = &gateway.metrics;
    m.requests
        .get_or_create(&RequestLabels {
            endpoint: endpoint.to_owned(),
            version: version.to_owned(),
            code: response.status().as_u16(),
        })
        .inc();
    m.latency
        .get_or_create(&VersionLabels {
            endpoint: endpoint.to_owned(),
            version: version.to_owned(),
        })
        .observe(started.elapsed().as_secs_f64());
}

/// `POST /v2/models/{name}/infer`: tensors straight to the backend (no processor).
async fn kserve_infer(
    gateway: Arc<Gateway>,
    request: hyper::Request<Incoming>,
    name: String,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let version = resolve(&gateway, &name)?;
    let limit = version.limits.max_body_bytes;
    let body = read_version_body(request.into_body(), limit).await?;
    let parsed = crate::kserve::parse(&body).map_err(|e| ApiError {
        field: Some(e.field),
        ..ApiError::new(400, "invalid_request", e.message)
    })?;
    if version.workers.is_empty() {
        return Err(ApiError::new(
            422,
            "no_model_backend",
            format!(
                "endpoint `{name}` has no model backend (backend `none`); use its invoke route"
            ),
        ));
    }
    let result = version.infer(parsed.input).await;
    let response = match result {
        Ok(output) => json_response(
            200,
            &crate::kserve::response(&name, &version.name, parsed.id.as_deref(), &output),
        ),
        Err(e) => ApiError::from(Failure::Backend(e)).into_response(),
    };
    record(&gateway, &name, &version.name, &response, started);
    Ok(response)
}

/// Reads a body under a version's `limits.max_body_bytes`, naming that field when over.
async fn read_version_body(body: Incoming, limit: u64) -> Result<Bytes, ApiError> {
    read_body(body, limit, "limits.max_body_bytes")
        .await
        .map_err(|e| {
            if e.status == 413 {
                body_limit(limit)
            } else {
                e
            }
        })
}

fn body_limit(limit: u64) -> ApiError {
    ApiError {
        field: Some("limits.max_body_bytes".into()),
        ..ApiError::new(
            413,
            "body_too_large",
            format!("request body exceeds this version's limit of {limit} bytes"),
        )
    }
}

/// Turns a processor's response into an HTTP response, refusing what HTTP cannot carry.
fn into_hyper(response: wasp_wasm::Response, version: &str) -> Response {
    let Ok(status) = StatusCode::from_u16(response.status) else {
        return ApiError::new(
            502,
            "invalid_processor_response",
            format!(
                "processor returned status {}, which is not an HTTP status",
                response.status
            ),
        )
        .into_response();
    };
    let mut out = hyper::Response::new(Full::new(Bytes::from(response.body)));
    *out.status_mut() = status;
    let headers = out.headers_mut();
    for (name, value) in response.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) else {
            return ApiError::new(
                502,
                "invalid_processor_response",
                format!("processor returned an invalid header `{name}`"),
            )
            .into_response();
        };
        headers.append(name, value);
    }
    if let Ok(v) = HeaderValue::from_str(version) {
        headers.insert("x-wasp-version", v);
    }
    out
}
