//! The data plane: each endpoint's invoke route and OpenAI-compatible embeddings (the KServe
//! v2 routes are in `kserve`). Every request picks a version by weight, runs through its
//! processor (and model backend), and is counted in the request metrics.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request as HttpRequest, State};
use axum::http::header::{CONTENT_LENGTH, HeaderName, HeaderValue};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use wasp_backend::BackendError;
use wasp_wasm::{CallError, Request};

use super::{ApiError, AppState, ErrorBody, Name, Payload, read_body};
use crate::Error;
use crate::Gateway;
use crate::metrics::{FailureLabels, RequestLabels};
use crate::registry::DeployedVersion;
use crate::workers::WakeError;

/// Largest body of the OpenAI-compatible routes before the endpoint (and its limit) is known.
pub(crate) const MAX_OPENAI_BYTES: u64 = 64 * 1024 * 1024;

/// Headers a processor never sees: the gateway's own credentials.
const HIDDEN_HEADERS: [&str; 2] = ["authorization", "x-wasp-api-key"];

/// An OpenAI embeddings request (the endpoint's processor reads the rest of the body).
/// Only its description is used: the gateway reads `model` alone, and the processor the
/// whole body.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EmbeddingsRequest {
    /// The endpoint that serves it.
    pub model: String,
    /// One text or a list of texts.
    #[schema(value_type = Object)]
    pub input: Value,
    /// `float` (default) or `base64`.
    pub encoding_format: Option<String>,
}

/// The endpoint called `name`, ready to serve, and the version picked for one request.
pub(crate) fn resolve_with(
    gateway: &Gateway,
    name: &str,
    headers: &HeaderMap,
) -> Result<
    (
        std::sync::Arc<crate::Deployment>,
        std::sync::Arc<DeployedVersion>,
    ),
    ApiError,
> {
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
    // `x-wasp-version: v2` asks for one version, whatever its weight (for tests, replays
    // and canaries).
    if let Some(pin) = headers.get(VERSION) {
        let wanted = pin.to_str().unwrap_or("");
        let version = deployment
            .versions
            .iter()
            .find(|v| v.name == wanted)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    "version_not_found",
                    format!(
                        "endpoint `{}` has no version `{wanted}`",
                        crate::tenants::local_name(name)
                    ),
                )
                .with_field("x-wasp-version")
            })?;
        return Ok((deployment, version));
    }
    let roll = rand::random::<u32>() % 100;
    let version = deployment.pick(roll).cloned().ok_or_else(|| {
        ApiError::new(
            503,
            "no_version",
            format!("endpoint `{name}` has no version with traffic"),
        )
    })?;
    Ok((deployment, version))
}

/// The header that pins a request to one version, and that names the version that
/// answered.
const VERSION: &str = "x-wasp-version";

/// Admits a request of `caller` to `deployment` under the caller's key's and the
/// endpoint's rate limits (see [`crate::limits`]); `429` when one refuses.
pub(crate) fn admit(
    gateway: &Gateway,
    caller: Option<&crate::tenants::Caller>,
    deployment: &crate::Deployment,
) -> Result<crate::limits::Admitted, ApiError> {
    let key = caller.and_then(|c| Some((c.key_id.as_deref()?, c.rate_limit.as_ref()?)));
    let name = &deployment.spec.name;
    let endpoint = deployment
        .spec
        .rate_limit
        .as_ref()
        .map(|limit| (name.as_str(), crate::tenants::local_name(name), limit));
    gateway.limiters.admit(key, endpoint)
}

/// Whether the client asked for an async answer (`Prefer: respond-async`, RFC 7240).
fn prefers_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|p| {
                p.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("respond-async"))
            })
        })
    })
}

/// Whether a sync request to this version would wait for a cold start, or (by the
/// version's recent mean latency and its processor queue) past its deadline.
fn would_wait(version: &DeployedVersion) -> bool {
    if version.workers.ready_now() == 0 {
        return true;
    }
    if version.processor.is_none() {
        // Requests pass through to the container, which queues them itself.
        return false;
    }
    let s = version.processor_stats();
    if s.busy < s.max as usize {
        return false;
    }
    let mean = u128::from(
        version
            .metrics
            .mean_us
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    // The rounds of queued requests ahead, the round running now, and its own.
    let rounds = (s.queued / (s.max.max(1) as usize)) as u128 + 2;
    rounds * mean > u128::from(version.limits.timeout_ms) * 1000
}

/// Headers a processor may see.
pub(crate) fn visible_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| !HIDDEN_HEADERS.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

/// The invoke route.
pub(crate) const INVOKE: &str = "/endpoints/{name}/invoke";
/// The invoke route with a path below it.
pub(crate) const INVOKE_BELOW: &str = "/endpoints/{name}/invoke/{*path}";

/// The raw endpoint name of a path the invoke routes take: `/endpoints/{name}/invoke`, or
/// below it (`/endpoints/{name}/invoke/{*path}`).
pub(crate) fn invoke_target(path: &str) -> Option<&str> {
    let (raw, tail) = path.strip_prefix("/endpoints/")?.split_once('/')?;
    let below = tail.strip_prefix("invoke")?;
    let routed = below.is_empty() || below.strip_prefix('/').is_some_and(|p| !p.is_empty());
    routed.then_some(raw)
}

/// Sends a request to an endpoint's processor: the method, the path below the invoke route
/// with its query, the headers (but credentials) and the body all reach it; its response
/// comes back as it is, with `x-wasp-version` naming the version that answered.
#[utoipa::path(
    method(get, post, put, delete, patch),
    path = "/endpoints/{name}/invoke",
    tag = "invoke",
    params(("name" = String, Path, description = "Endpoint name")),
    request_body(content((Vec<u8> = "*/*")), description = "Whatever the processor reads"),
    responses(
        (status = "default", description = "The processor's response, or an error of the gateway", body = ErrorBody),
        (status = 404, description = "No such endpoint", body = ErrorBody),
        (status = 413, description = "Over the version's `limits.max_body_bytes`", body = ErrorBody),
        (status = 429, description = "Instances and queue full; retry after `Retry-After`", body = ErrorBody),
        (status = 503, description = "Stopped, or failed to load", body = ErrorBody),
        (status = 504, description = "The processor overran its deadline", body = ErrorBody),
    ))]
pub(crate) async fn invoke(
    State(gateway): State<AppState>,
    name: Name,
    request: HttpRequest,
) -> Result<Response, ApiError> {
    invoke_inner(gateway, name, request).await
}

/// The same as the invoke route, with a path below it that the processor sees.
#[utoipa::path(
    method(get, post, put, delete, patch),
    path = "/endpoints/{name}/invoke/{path}",
    tag = "invoke",
    params(
        ("name" = String, Path, description = "Endpoint name"),
        ("path" = String, Path, description = "The path below the invoke route (may hold `/`)"),
    ),
    request_body(content((Vec<u8> = "*/*")), description = "Whatever the processor reads"),
    responses(
        (status = "default", description = "The processor's response, or an error of the gateway", body = ErrorBody),
    ))]
pub(crate) async fn invoke_path(
    State(gateway): State<AppState>,
    name: Name,
    request: HttpRequest,
) -> Result<Response, ApiError> {
    invoke_inner(gateway, name, request).await
}

/// The header a forwarded request carries: the node that forwarded it. A node never
/// forwards a request that has it.
const FORWARDED_BY: &str = "x-wasp-forwarded-by";

/// Headers that concern one connection, not the request (RFC 9110 §7.6.1), and the
/// length, which the side that sends the body sets: not passed on by a forward.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    "proxy-authorization",
];

/// How a forward failed.
enum ForwardError {
    /// Before the peer had the request (it could not be reached): it may be served here.
    Unsent(ApiError),
    /// After it was sent, or on this side: answered as it is.
    Failed(ApiError),
}

impl From<ForwardError> for ApiError {
    fn from(e: ForwardError) -> Self {
        match e {
            ForwardError::Unsent(e) | ForwardError::Failed(e) => e,
        }
    }
}

/// Sends an invoke request as it came (its head and its body, read) to `peer`, another
/// node of the cluster with a ready worker for the endpoint, and streams back its answer
/// with `x-wasp-node` naming it.
async fn forward_to_peer(
    gateway: &AppState,
    name: &str,
    me: &str,
    peer: &crate::NodeInfo,
    request: &axum::http::request::Parts,
    body: bytes::Bytes,
) -> Result<Response, ForwardError> {
    let unavailable = |e: String| {
        ApiError::new(
            502,
            "forward_failed",
            format!(
                "node `{}` did not answer a forwarded request: {e}",
                peer.name
            ),
        )
    };
    let tenant = crate::tenants::tenant_of(name);
    let prefix = if tenant == crate::tenants::DEFAULT {
        String::new()
    } else {
        format!("/t/{tenant}")
    };
    let local = crate::tenants::local_name(name);
    let full = request.uri.path();
    let rest = full
        .find("/invoke")
        .map_or("", |i| &full[i + "/invoke".len()..]);
    let query = request
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let uri = format!(
        "{}{prefix}/endpoints/{}/invoke{rest}{query}",
        peer.url,
        percent_encoding::utf8_percent_encode(local, percent_encoding::NON_ALPHANUMERIC)
    );
    let mut outgoing = hyper::Request::builder()
        .method(request.method.clone())
        .uri(&uri);
    for (header, value) in &request.headers {
        if !HOP_BY_HOP.contains(&header.as_str()) {
            outgoing = outgoing.header(header, value);
        }
    }
    outgoing = outgoing.header(FORWARDED_BY, me);
    if let Some(super::auth::Presented(key)) = request.extensions.get() {
        outgoing = outgoing.header(axum::http::header::AUTHORIZATION, key);
    }
    let outgoing = outgoing
        .body(http_body_util::Full::new(body))
        .map_err(|e| ForwardError::Failed(unavailable(e.to_string())))?;
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(600),
        gateway.webhooks.request(outgoing),
    )
    .await
    .map_err(|_| ForwardError::Failed(unavailable("no answer within 600 s".into())))?
    .map_err(|e| {
        let said = unavailable(e.to_string());
        if e.is_connect() {
            ForwardError::Unsent(said)
        } else {
            ForwardError::Failed(said)
        }
    })?;
    gateway
        .metrics
        .forwarded
        .get_or_create(&crate::metrics::ForwardLabels {
            endpoint: name.to_owned(),
            node: peer.name.clone(),
        })
        .inc();
    let (mut parts, incoming) = answer.into_parts();
    for header in HOP_BY_HOP {
        parts.headers.remove(header);
    }
    if let Ok(node) = HeaderValue::from_str(&peer.name) {
        parts.headers.insert("x-wasp-node", node);
    }
    Ok(Response::from_parts(parts, axum::body::Body::new(incoming)))
}

async fn invoke_inner(
    gateway: AppState,
    Name(name): Name,
    mut request: HttpRequest,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (deployment, version) = match resolve_with(&gateway, &name, request.headers()) {
        Ok(found) => found,
        Err(e) => {
            // Not runnable here (unknown to this node, or failed to load: no GPUs, say),
            // but ready on another node of the cluster: sent there, once.
            if e.status != 503 && e.status != 404 || request.headers().contains_key(FORWARDED_BY) {
                return Err(e);
            }
            let Some((me, peer)) = gateway.peer_for(&name) else {
                return Err(e);
            };
            let (parts, body) = request.into_parts();
            let body = read_version_body(body, wasp_core::Limits::default().max_body_bytes).await?;
            return Ok(forward_to_peer(&gateway, &name, &me, &peer, &parts, body).await?);
        }
    };
    // No ready worker here (scaled to zero, say) but one on another node: sent there
    // rather than waiting for a cold start. The node that serves it admits it. When that
    // node cannot be reached (it died since its last heartbeat), the request is served
    // here after all.
    if version.workers.ready_now() == 0
        && !request.headers().contains_key(FORWARDED_BY)
        && let Some((me, peer)) = gateway.peer_for(&name)
    {
        let (parts, body) = request.into_parts();
        let body = read_version_body(body, version.limits.max_body_bytes).await?;
        match forward_to_peer(&gateway, &name, &me, &peer, &parts, body.clone()).await {
            Ok(answer) => return Ok(answer),
            Err(ForwardError::Failed(e)) => return Err(e),
            Err(ForwardError::Unsent(e)) => {
                tracing::warn!(endpoint = %name, node = %peer.name, "served here: {}", e.message);
                request = HttpRequest::from_parts(parts, Body::from(body));
            }
        }
    }
    let admitted = admit(
        &gateway,
        request.extensions().get::<crate::tenants::Caller>(),
        &deployment,
    )?;
    let may_spill = deployment.spec.jobs.spillover || prefers_async(request.headers());
    let recording = recording(&deployment, request.extensions());
    drop(deployment);
    let limit = version.limits.max_body_bytes;
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::version_body_limit(limit));
    }
    // Everything after `/endpoints/{name}/invoke`, with the query string.
    // The raw name holds no `/`, so the route's own part ends at the second one.
    let full = request.uri().path();
    let after = full.strip_prefix("/endpoints/").unwrap_or(full);
    let rest = after
        .find('/')
        .and_then(|i| after[i..].strip_prefix("/invoke"))
        .unwrap_or("");
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
    let mut response = if may_spill && would_wait(&version) {
        super::jobs::spill(&gateway, &name, request).await?
    } else {
        serve(&gateway, &name, &version, request, started, recording).await
    };
    admitted.stamp(response.headers_mut());
    Ok(response)
}

/// OpenAI-compatible embeddings: `model` names the endpoint, whose processor sees the
/// request at path `/v1/embeddings`.
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai",
    request_body = EmbeddingsRequest,
    responses(
        (status = 200, description = "The processor's OpenAI embeddings response", body = Object),
        (status = 400, description = "Not JSON, or no `model`", body = ErrorBody),
        (status = 404, description = "No endpoint of that name", body = ErrorBody),
        (status = 413, description = "Over the version's `limits.max_body_bytes`", body = ErrorBody),
        (status = 429, description = "Busy; retry after `Retry-After`", body = ErrorBody),
        (status = 503, description = "Stopped, or failed to load", body = ErrorBody),
    ))]
pub(crate) async fn embeddings(
    State(gateway): State<AppState>,
    super::Who(caller): super::Who,
    id: Option<axum::Extension<super::RequestId>>,
    headers: HeaderMap,
    Payload(body): Payload<MAX_OPENAI_BYTES>,
) -> Result<Response, ApiError> {
    openai(gateway, caller, id, headers, body, "/v1/embeddings").await
}

/// An OpenAI-style request: `model` names the caller's endpoint, whose processor sees the
/// request at `path` (`/v1/embeddings`, `/v1/chat/completions`, ...).
pub(crate) async fn openai(
    gateway: AppState,
    caller: crate::tenants::Caller,
    id: Option<axum::Extension<super::RequestId>>,
    headers: HeaderMap,
    body: bytes::Bytes,
    path: &str,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let visible = visible_headers(&headers);
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
            return Err(
                ApiError::new(400, "invalid_request", "`model` must name an endpoint")
                    .with_field("model"),
            );
        }
    };
    let name = super::resolve(&gateway, &caller, &name)?;
    let (deployment, version) = resolve_with(&gateway, &name, &headers)?;
    let admitted = admit(&gateway, Some(&caller), &deployment)?;
    let recording = deployment
        .spec
        .records
        .filter(crate::records::sampled)
        .map(|spec| (spec, id.map(|i| i.0.0)));
    drop(deployment);
    if body.len() as u64 > version.limits.max_body_bytes {
        return Err(ApiError::version_body_limit(version.limits.max_body_bytes));
    }
    let request = Request {
        method: "POST".into(),
        path: path.to_owned(),
        headers: visible,
        body: body.to_vec(),
    };
    let mut response = serve(&gateway, &name, &version, request, started, recording).await;
    admitted.stamp(response.headers_mut());
    Ok(response)
}

/// Reads a body under a version's `limits.max_body_bytes`, naming that field when over.
pub(crate) async fn read_version_body(body: Body, limit: u64) -> Result<bytes::Bytes, ApiError> {
    read_body(body, limit, "limits.max_body_bytes")
        .await
        .map_err(|e| {
            if e.status == 413 {
                ApiError::version_body_limit(limit)
            } else {
                e
            }
        })
}

/// Why a request failed after it reached a version.
pub(crate) enum Failure {
    Wake(WakeError),
    Processor(CallError),
    Backend(BackendError),
}

impl Failure {
    pub(crate) fn into_api(self) -> ApiError {
        match self {
            Self::Wake(WakeError::Timeout(t)) => {
                let mut e = ApiError::new(
                    503,
                    "cold_start_timeout",
                    format!(
                        "no worker became ready within the cold-start timeout ({}s, \
                         scaling.cold_start_timeout_s); retry",
                        t.as_secs()
                    ),
                );
                e.retry_after = true;
                e
            }
            Self::Wake(WakeError::Failed(reason)) => {
                let mut e = ApiError::new(
                    503,
                    "worker_failed",
                    format!("no worker could start: {reason}"),
                );
                e.retry_after = true;
                e
            }
            Self::Processor(e) => e.into(),
            Self::Backend(e) => ApiError::backend(&e),
        }
    }
}

/// A processor's answer whose body may still be coming: the response to the first (or
/// only) model output chunk, and the bodies of the chunks after it, one post-process call
/// each (a generation backend's tokens).
pub(crate) struct Answer {
    pub head: wasp_wasm::Response,
    pub rest: Option<Chunks>,
}

/// The bodies of a stream's later chunks, in order.
pub(crate) type Chunks = futures_util::stream::BoxStream<'static, Result<Vec<u8>, Failure>>;

/// Runs one request through a version and waits for the whole answer: a streamed body is
/// gathered (status and headers are the first chunk's).
pub(crate) async fn run(
    version: &Arc<DeployedVersion>,
    request: Request,
) -> Result<wasp_wasm::Response, Failure> {
    let answer = run_streamed(version, request).await?;
    let mut response = answer.head;
    if let Some(mut rest) = answer.rest {
        while let Some(chunk) = futures_util::StreamExt::next(&mut rest).await {
            response.body.extend(chunk?);
        }
    }
    Ok(response)
}

/// Counts a request in the version's meter until dropped (owned, so that a stream can
/// carry it).
pub(crate) struct Counted(Arc<DeployedVersion>);

impl Counted {
    pub(crate) fn enter(version: &Arc<DeployedVersion>) -> Self {
        let meter = &version.workers.meter;
        meter.begin_at(meter.elapsed());
        Self(version.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let meter = &self.0.workers.meter;
        meter.end_at(meter.elapsed());
    }
}

/// Records a finished model call: the tenant's usage, and generation figures.
pub(crate) fn model_done(
    version: &DeployedVersion,
    started: Instant,
    last: &wasp_core::ModelOutput,
) {
    version.usage.model_call(started.elapsed(), Some(last));
    version.metrics.observe_generation(last.metadata.as_deref());
}

/// Runs one request through a version: the processor alone (backend `none`), or
/// pre-process, the backend, and post-process for each output chunk as it comes.
pub(crate) async fn run_streamed(
    version: &Arc<DeployedVersion>,
    request: Request,
) -> Result<Answer, Failure> {
    let counted = Counted::enter(version);
    version.usage.requests.fetch_add(1, Ordering::Relaxed);
    version.workers.wait_ready().await.map_err(Failure::Wake)?;
    let Some(processor) = &version.processor else {
        return forward(version, request, counted).await;
    };
    if !version.workers.has_model() {
        let head = processor
            .handle(request)
            .await
            .map_err(Failure::Processor)?;
        return Ok(Answer { head, rest: None });
    }
    let prepared = processor
        .pre_process(request)
        .await
        .map_err(Failure::Processor)?;
    let started = Instant::now();
    let (mut stream, in_flight) = version
        .infer_stream(prepared.input.into())
        .await
        .map_err(Failure::Backend)?;
    fn ended() -> Failure {
        Failure::Backend(BackendError::Unavailable(
            "the model's output ended before its last chunk".into(),
        ))
    }
    let first = stream
        .recv()
        .await
        .ok_or_else(ended)?
        .map_err(Failure::Backend)?;
    let last = first.last;
    if last {
        model_done(version, started, &first);
    }
    let head = processor
        .post_process(&prepared.context, first.into())
        .await
        .map_err(Failure::Processor)?;
    if last {
        return Ok(Answer { head, rest: None });
    }
    // The rest of the chunks, post-processed as they come. Dropping the stream (a client
    // that went away) drops the backend's receiver, which frees the sequence.
    struct State {
        version: Arc<DeployedVersion>,
        stream: wasp_backend::OutputStream,
        context: Vec<u8>,
        started: Instant,
        done: bool,
        _in_flight: crate::workers::InFlight,
        _counted: Counted,
    }
    let state = State {
        version: version.clone(),
        stream,
        context: prepared.context,
        started,
        done: false,
        _in_flight: in_flight,
        _counted: counted,
    };
    let rest = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let chunk = match s.stream.recv().await {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                s.done = true;
                return Some((Err(Failure::Backend(e)), s));
            }
            None => {
                s.done = true;
                return Some((Err(ended()), s));
            }
        };
        if chunk.last {
            s.done = true;
            model_done(&s.version, s.started, &chunk);
        }
        let body = match &s.version.processor {
            Some(processor) => processor
                .post_process(&s.context, chunk.into())
                .await
                .map(|r| r.body)
                .map_err(Failure::Processor),
            None => Err(ended()),
        };
        s.done |= body.is_err();
        Some((body, s))
    });
    Ok(Answer {
        head,
        rest: Some(Box::pin(rest)),
    })
}

/// Passes a request as it came to a version's container (no processor) and streams back
/// its answer.
async fn forward(
    version: &Arc<DeployedVersion>,
    request: Request,
    counted: Counted,
) -> Result<Answer, Failure> {
    let raw = wasp_backend::RawRequest {
        method: request.method,
        path: request.path,
        headers: request
            .headers
            .into_iter()
            .map(|(name, value)| (name, value.into_bytes()))
            .collect(),
        body: request.body,
    };
    let started = Instant::now();
    let (response, in_flight) = version
        .workers
        .forward(raw)
        .await
        .map_err(Failure::Backend)?;
    version.usage.model_call(started.elapsed(), None);
    let head = wasp_wasm::Response {
        status: response.status,
        // Header values that are not text cannot be answered through the gateway.
        headers: response
            .headers
            .into_iter()
            .filter_map(|(name, value)| Some((name, String::from_utf8(value).ok()?)))
            .collect(),
        body: Vec::new(),
    };
    let chunks = futures_util::stream::unfold(
        (response.body, in_flight, counted),
        |(mut body, in_flight, counted)| async move {
            let chunk = body.recv().await?;
            Some((chunk.map_err(Failure::Backend), (body, in_flight, counted)))
        },
    );
    Ok(Answer {
        head,
        rest: Some(Box::pin(chunks)),
    })
}

/// What a sampled request is recorded with: its endpoint's records settings and its id.
pub(crate) type Recording = Option<(wasp_core::RecordsSpec, Option<HeaderValue>)>;

/// Whether this request of `deployment` is recorded, and how.
fn recording(deployment: &crate::Deployment, extensions: &axum::http::Extensions) -> Recording {
    let spec = deployment.spec.records.filter(crate::records::sampled)?;
    Some((
        spec,
        extensions.get::<super::RequestId>().map(|i| i.0.clone()),
    ))
}

/// A sampled request's record, before its answer.
pub(crate) fn start_record(
    version: &DeployedVersion,
    request: &Request,
    spec: &wasp_core::RecordsSpec,
    id: Option<&HeaderValue>,
) -> crate::records::RequestRecord {
    let (body, body_base64, body_truncated) =
        crate::records::body(&request.body, spec.max_body_bytes);
    crate::records::RequestRecord {
        at_ms: crate::workers::now_ms(),
        request_id: id
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default(),
        version: version.name.clone(),
        method: request.method.clone(),
        path: request.path.clone(),
        headers: crate::records::headers(&request.headers),
        body,
        body_base64,
        body_truncated,
        status: 0,
        response_headers: Vec::new(),
        response_body: None,
        response_body_base64: None,
        response_body_truncated: false,
        latency_ms: 0.0,
    }
}

/// Completes a record with its answer (`truncated` when more of the body came later)
/// and keeps it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn keep_record(
    gateway: &Gateway,
    name: &str,
    spec: wasp_core::RecordsSpec,
    mut record: crate::records::RequestRecord,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    truncated: bool,
    started: Instant,
) {
    record.status = status;
    record.response_headers = crate::records::headers(headers);
    (
        record.response_body,
        record.response_body_base64,
        record.response_body_truncated,
    ) = crate::records::body(body, spec.max_body_bytes);
    record.response_body_truncated |= truncated;
    record.latency_ms = started.elapsed().as_secs_f64() * 1e3;
    gateway.recorder.record(name, spec, &record);
}

/// Runs a request and records its metrics (and, when sampled, the request and its answer).
pub(crate) async fn serve(
    gateway: &Gateway,
    name: &str,
    version: &Arc<DeployedVersion>,
    request: Request,
    started: Instant,
    recording: Recording,
) -> Response {
    let kept = recording.map(|(spec, id)| {
        let record = start_record(version, &request, &spec, id.as_ref());
        (spec, record)
    });
    let response = match run_streamed(version, request).await {
        Ok(Answer {
            head: response,
            rest,
        }) => {
            if let Some((spec, record)) = kept {
                // A streamed body is recorded up to its first chunk.
                keep_record(
                    gateway,
                    name,
                    spec,
                    record,
                    response.status,
                    &response.headers,
                    &response.body,
                    rest.is_some(),
                    started,
                );
            }
            processor_response(response, rest, version)
        }
        Err(failure) => {
            let error = failure.into_api();
            gateway
                .metrics
                .failures
                .get_or_create(&FailureLabels {
                    endpoint: name.to_owned(),
                    version: version.name.clone(),
                    kind: error.code.into(),
                })
                .inc();
            if let Some((spec, record)) = kept {
                let body = serde_json::json!({
                    "error": { "code": error.code, "message": error.message, "field": error.field }
                })
                .to_string();
                keep_record(
                    gateway,
                    name,
                    spec,
                    record,
                    error.status,
                    &[],
                    body.as_bytes(),
                    false,
                    started,
                );
            }
            let mut response = error.into_response();
            if let Ok(v) = HeaderValue::from_str(&version.name) {
                response.headers_mut().insert("x-wasp-version", v);
            }
            response
        }
    };
    record(gateway, name, version, &response, started);
    response
}

/// Counts a data-route response and its latency.
pub(crate) fn record(
    gateway: &Gateway,
    endpoint: &str,
    version: &DeployedVersion,
    response: &Response,
    started: Instant,
) {
    let code = response.status().as_u16();
    if code == 200 {
        version.metrics.ok.inc();
    } else {
        gateway
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                endpoint: endpoint.to_owned(),
                version: version.name.clone(),
                code,
            })
            .inc();
    }
    let elapsed = started.elapsed();
    version.metrics.latency.observe(elapsed.as_secs_f64());
    version.metrics.window.request(code, elapsed.as_secs_f64());
    version
        .metrics
        .observe_mean(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
}

/// Most headers a processor's response may carry.
pub(crate) const MAX_RESPONSE_HEADERS: usize = 100;
/// Most bytes of header names and values a processor's response may carry.
pub(crate) const MAX_RESPONSE_HEADER_BYTES: usize = 64 * 1024;

/// Checks that a processor's response is one HTTP can carry: a status from 100 to 599, at
/// most [`MAX_RESPONSE_HEADERS`] valid headers of at most [`MAX_RESPONSE_HEADER_BYTES`] in
/// all, and a body of at most `max_body` bytes (the version's `limits.max_response_bytes`).
/// What fails is answered `502 invalid_processor_response`, never passed on.
pub(crate) fn check_processor_response(
    response: &wasp_wasm::Response,
    max_body: u64,
) -> Result<(), ApiError> {
    let bad = |why: String| ApiError::new(502, "invalid_processor_response", why);
    if response.body.len() as u64 > max_body {
        return Err(bad(format!(
            "processor returned a body of {} bytes; this version's limit is {max_body} \
             (limits.max_response_bytes)",
            response.body.len()
        )));
    }
    if !(100..=599).contains(&response.status) {
        return Err(bad(format!(
            "processor returned status {}, which is not an HTTP status (100 to 599)",
            response.status
        )));
    }
    if response.headers.len() > MAX_RESPONSE_HEADERS {
        return Err(bad(format!(
            "processor returned {} headers; the limit is {MAX_RESPONSE_HEADERS}",
            response.headers.len()
        )));
    }
    let bytes: usize = response
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if bytes > MAX_RESPONSE_HEADER_BYTES {
        return Err(bad(format!(
            "processor returned {bytes} bytes of headers; the limit is {MAX_RESPONSE_HEADER_BYTES}"
        )));
    }
    if let Some((name, _)) = response.headers.iter().find(|(k, v)| {
        HeaderName::try_from(k.as_str()).is_err() || HeaderValue::try_from(v.as_str()).is_err()
    }) {
        let shown: String = name.chars().take(64).collect();
        return Err(bad(format!(
            "processor returned an invalid header `{shown}`"
        )));
    }
    Ok(())
}

/// Turns a processor's response into an HTTP response, refusing what HTTP cannot carry.
/// With `rest`, the body goes on with the later chunks' bodies as they come, within the
/// version's `limits.max_response_bytes` in all; a failure mid-stream ends the body early
/// (the status is sent by then), and is logged.
fn processor_response(
    response: wasp_wasm::Response,
    rest: Option<Chunks>,
    version: &DeployedVersion,
) -> Response {
    let limit = version.limits.max_response_bytes;
    if let Err(e) = check_processor_response(&response, limit) {
        return e.into_response();
    }
    let Ok(status) = StatusCode::from_u16(response.status) else {
        return ApiError::new(502, "invalid_processor_response", "invalid status").into_response();
    };
    let body = match rest {
        None => Body::from(response.body),
        Some(rest) => {
            let first = response.body.len() as u64;
            let version_name = version.name.clone();
            let later = futures_util::StreamExt::scan(rest, first, move |sent, chunk| {
                let item = match chunk {
                    Ok(bytes) if *sent + bytes.len() as u64 > limit => {
                        tracing::warn!(
                            version = %version_name,
                            "a streamed response passed limits.max_response_bytes ({limit}); \
                             it was cut"
                        );
                        None
                    }
                    Ok(bytes) => {
                        *sent += bytes.len() as u64;
                        Some(Ok(bytes::Bytes::from(bytes)))
                    }
                    Err(failure) => {
                        let e = failure.into_api();
                        tracing::warn!(
                            version = %version_name,
                            "a streamed response failed: {}", e.message
                        );
                        Some(Err(std::io::Error::other(e.message)))
                    }
                };
                std::future::ready(item)
            });
            let head = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(
                response.body,
            ))]);
            Body::from_stream(futures_util::StreamExt::chain(head, later))
        }
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    let headers = out.headers_mut();
    for (name, value) in response.headers {
        // Checked above.
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            headers.append(name, value);
        }
    }
    if let Ok(v) = HeaderValue::from_str(&version.name) {
        headers.insert("x-wasp-version", v);
    }
    out
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::extract::RawPathParams;
    use axum::routing::any;
    use tower::ServiceExt;

    use super::*;

    /// The hot path in `App::serve` takes exactly the paths the router routes to the
    /// invoke handlers, with the same raw name.
    #[tokio::test]
    async fn invoke_target_takes_what_the_router_would() {
        async fn name(params: RawPathParams) -> String {
            let name = params.iter().find(|(k, _)| *k == "name").map(|(_, v)| v);
            format!("invoke:{}", name.unwrap_or_default())
        }
        let router: Router = Router::new()
            .route(INVOKE, any(name))
            .route(INVOKE_BELOW, any(name))
            .route("/endpoints/{name}", any(|| async { "other" }))
            .fallback(|| async { "none" });
        let paths = [
            "/endpoints/a/invoke",
            "/endpoints/a/invoke/",
            "/endpoints/a/invoke/x",
            "/endpoints/a/invoke/x/y/",
            "/endpoints/a/invoke//",
            "/endpoints/a%2Fb/invoke",
            "/endpoints/%C3%A9/invoke/z",
            "/endpoints/a%2541/invoke",
            "/endpoints//invoke",
            "/endpoints/a/invoker",
            "/endpoints/a/INVOKE",
            "/endpoints/a/b/invoke",
            "/endpoints/invoke",
            "/endpoints/a",
            "/endpoints/",
            "/endpoints",
            "/Endpoints/a/invoke",
            "/api/v1/endpoints/a/invoke",
        ];
        for path in paths {
            let request = axum::http::Request::get(path).body(Body::empty()).unwrap();
            let response = router.clone().oneshot(request).await.unwrap();
            let bytes = axum::body::to_bytes(response.into_body(), 1024)
                .await
                .unwrap();
            let routed = String::from_utf8_lossy(&bytes).into_owned();
            let fast = invoke_target(path).map(|raw| {
                format!(
                    "invoke:{}",
                    crate::api::decode(raw).map_err(|e| e.message).unwrap()
                )
            });
            match fast {
                Some(fast) => assert_eq!(routed, fast, "{path}"),
                None => assert!(
                    !routed.starts_with("invoke:"),
                    "{path}: router says {routed}"
                ),
            }
        }
    }
}
