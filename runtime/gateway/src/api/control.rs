//! The control plane, `/api/v1`: endpoints and their versions, components, logs, the store.
//!
//! Operations that change state run in a task of their own, so a client that hangs up or a
//! request timeout never leaves a deploy half done.

use std::sync::atomic::Ordering;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::http::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use wasp_core::EndpointSpec;

use super::error::json;
use super::{ApiError, AppState, ErrorBody, Name, Payload, Who};
use crate::Error;
use crate::registry::Deployment;
use crate::tenants::local_name;
use crate::workers::{ScaleEvent, Worker, WorkerState};

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

/// The endpoints, by name.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EndpointList {
    /// One summary per endpoint.
    pub endpoints: Vec<EndpointSummary>,
}

/// An endpoint in a listing.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EndpointSummary {
    /// Its name.
    pub name: String,
    /// `ready`, `concerning`, `notReady` or `stopped`.
    pub status: &'static str,
    /// Its invoke route.
    pub url: String,
    /// Its versions and their weights.
    pub versions: Vec<VersionWeight>,
    /// Its workers, over every version.
    pub workers: WorkerTotals,
    /// Whether it runs with no worker now (scaled to zero, not stopped): its next request
    /// waits for a cold start.
    pub scaled_to_zero: bool,
    /// What it served over the last minute, on this node.
    pub recent: RecentFigures,
}

/// Workers of an endpoint, over every version.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkerTotals {
    /// What the autoscalers want.
    pub desired: u32,
    /// Ready.
    pub ready: u32,
}

/// What an endpoint served over the last minute.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RecentFigures {
    /// Requests answered per second.
    pub requests_per_s: f64,
    /// Answers with a 4xx or 5xx status.
    pub errors: u64,
    /// The 99th percentile of latency in milliseconds: the highest of its versions'
    /// (`null` without requests).
    pub p99_ms: Option<f64>,
    /// Requests that waited for a worker to start.
    pub cold_starts: u64,
}

/// A version's share of traffic.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VersionWeight {
    /// Version name.
    pub name: String,
    /// Share of traffic, in percent.
    pub weight: u32,
}

/// An endpoint in detail.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EndpointDetail {
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: Option<String>,
    /// `ready`, `concerning`, `notReady` or `stopped`.
    pub status: &'static str,
    /// Whether the user stopped it.
    pub stopped: bool,
    /// Its invoke route.
    pub url: String,
    /// Its versions, live.
    pub versions: Vec<VersionDetail>,
    /// The spec it was deployed with (components as digests).
    pub spec: EndpointSpec,
    /// Why it could not be loaded, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A deployed version, live.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct VersionDetail {
    /// Version name.
    pub name: String,
    /// Share of traffic, in percent.
    pub weight: u32,
    /// `ready` (as many ready workers as wanted), `concerning` (some), `notReady` (none),
    /// `scaledToZero` (none wanted; the next request wakes it) or `stopped`.
    pub status: &'static str,
    /// The backend kind (`none`, `candle`, `container`).
    pub backend: &'static str,
    /// Workers the autoscaler wants now.
    pub desired_workers: u32,
    /// Its workers: loaded models, or for backend `none` sets of warm instances.
    pub workers: Vec<WorkerDetail>,
    /// During a rolling update, the workers of the spec being replaced (they share the
    /// traffic until each drains).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outgoing_workers: Vec<WorkerDetail>,
    /// Its component, `sha256:<hex>`; absent when requests pass through to a container.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// Whether the component was loaded from the compiled cache (false until it is
    /// loaded).
    pub compiled_from_cache: bool,
    /// Whether its compiled component is in memory: a version restored at start loads
    /// its component with its first instance (absent when it has no processor).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub component_loaded: Option<bool>,
    /// Its processor instances.
    pub instances: InstanceCounts,
}

/// A worker.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkerDetail {
    /// Its number within the version.
    pub id: u64,
    /// `starting`, `ready`, `draining`, `failed` or `pending` (waiting for GPUs).
    pub state: WorkerState,
    /// The GPUs it owns (device indices).
    pub gpus: Vec<u32>,
    /// Why it failed, or what it waits for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Since when it is in that state, in milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// What it runs (model and device), for model workers once loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Requests it holds.
    pub in_flight: u64,
    /// Requests waiting for a forward pass.
    pub queued: usize,
    /// Forward passes run.
    pub batches: u64,
    /// Requests served.
    pub requests: u64,
}

/// Processor instances of a version.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct InstanceCounts {
    /// Ready and idle.
    pub idle: usize,
    /// Serving a call.
    pub busy: usize,
    /// Requests waiting for an instance.
    pub queued: usize,
    /// Most alive at once.
    pub max: u32,
    /// Made since the version was deployed.
    pub created: u64,
    /// Dropped after a failure.
    pub lost: u64,
    /// Dropped after serving what the version's isolation allows (one call when
    /// `per-request`, `max_requests_per_instance` when pooled).
    pub retired: u64,
}

/// An uploaded component.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ComponentDigest {
    /// `sha256:<hex>` of its bytes: how specs name it.
    pub digest: String,
    /// Its size in bytes.
    pub size: usize,
}

/// Processor log records, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LogList {
    /// The records.
    pub logs: Vec<LogEntry>,
}

/// One log record of a processor.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LogEntry {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: String,
    /// The version whose processor logged it.
    pub version: String,
    /// The message.
    pub message: String,
}

/// How many log records to return.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Most records, the newest (default 100).
    pub limit: Option<usize>,
}

/// The invoke route of an endpoint, by its server's name: `/endpoints/{name}/invoke`, under
/// `/t/{tenant}` outside the default tenant.
pub(crate) fn invoke_url(qualified: &str) -> String {
    let name = utf8_percent_encode(local_name(qualified), PATH_SEGMENT);
    match qualified.split_once('/') {
        Some((tenant, _)) => format!("/t/{tenant}/endpoints/{name}/invoke"),
        None => format!("/endpoints/{name}/invoke"),
    }
}

fn summary(gateway: &crate::Gateway, d: &Deployment) -> EndpointSummary {
    let now = crate::history::tick_of(crate::workers::now_ms());
    let minute = 60 / crate::history::INTERVAL.as_secs();
    let mut workers = WorkerTotals {
        desired: 0,
        ready: 0,
    };
    let mut recent = RecentFigures {
        requests_per_s: 0.0,
        errors: 0,
        p99_ms: None,
        cold_starts: 0,
    };
    for v in &d.versions {
        workers.desired += v.workers.desired();
        workers.ready += v.workers.counts().ready;
        let r = gateway.history.recent(&d.spec.name, &v.name, now, minute);
        recent.requests_per_s += r.requests_per_s;
        recent.errors += r.errors;
        recent.cold_starts += r.cold_starts;
        recent.p99_ms = match (recent.p99_ms, r.p99_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    EndpointSummary {
        workers,
        scaled_to_zero: !d.stopped
            && !d.versions.is_empty()
            && d.versions
                .iter()
                .all(|v| d.version_status(v) == "scaledToZero"),
        recent,
        name: local_name(&d.spec.name).to_owned(),
        status: d.status(),
        url: invoke_url(&d.spec.name),
        versions: d
            .versions
            .iter()
            .map(|v| VersionWeight {
                name: v.name.clone(),
                weight: v.weight,
            })
            .collect(),
    }
}

fn detail(d: &Deployment) -> EndpointDetail {
    let versions = d
        .versions
        .iter()
        .map(|v| {
            let s = v.processor_stats();
            VersionDetail {
                name: v.name.clone(),
                weight: v.weight,
                status: d.version_status(v),
                backend: v.backend,
                desired_workers: v.workers.desired(),
                workers: v.workers.list().iter().map(|w| worker_detail(w)).collect(),
                outgoing_workers: d.outgoing_of(v).map_or_else(Vec::new, |old| {
                    old.workers
                        .list()
                        .iter()
                        .map(|w| worker_detail(w))
                        .collect()
                }),
                component: v.digest.as_ref().map(|d| format!("sha256:{d}")),
                compiled_from_cache: v
                    .processor
                    .as_ref()
                    .and_then(|p| p.compiled_from_cache())
                    .unwrap_or(false),
                component_loaded: v.processor.as_ref().map(|p| p.is_loaded()),
                instances: InstanceCounts {
                    idle: s.idle,
                    busy: s.busy,
                    queued: s.queued,
                    max: s.max,
                    created: s.created,
                    lost: s.lost,
                    retired: s.retired,
                },
            }
        })
        .collect();
    let mut spec = d.spec.clone();
    spec.name = local_name(&d.spec.name).to_owned();
    EndpointDetail {
        name: spec.name.clone(),
        description: d.spec.description.clone(),
        status: d.status(),
        stopped: d.stopped,
        url: invoke_url(&d.spec.name),
        versions,
        spec,
        error: d.error.clone(),
    }
}

fn worker_detail(w: &Worker) -> WorkerDetail {
    let (state, reason, since) = w.state();
    let batcher = w.batcher();
    WorkerDetail {
        id: w.id,
        state,
        gpus: w.gpus(),
        reason,
        since_ms: since
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        model: batcher.as_ref().map(|b| b.backend().describe()),
        in_flight: w.in_flight(),
        queued: batcher.as_ref().map_or(0, |b| b.queued()),
        batches: batcher
            .as_ref()
            .map_or(0, |b| b.stats().batches.load(Ordering::Relaxed)),
        requests: batcher
            .as_ref()
            .map_or(0, |b| b.stats().requests.load(Ordering::Relaxed)),
    }
}

/// Reads a spec as JSON (`application/json`, or a body starting with `{`) or TOML.
fn parse_spec(headers: &HeaderMap, body: &[u8]) -> Result<EndpointSpec, ApiError> {
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|ct| ct.starts_with("application/json"));
    let is_json =
        json.unwrap_or_else(|| body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'));
    let spec = if is_json {
        EndpointSpec::from_json(body)
    } else {
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::new(400, "invalid_spec", "the spec is not UTF-8"))?;
        EndpointSpec::from_toml(text)
    };
    spec.map_err(|e| Error::Spec(e).into())
}

/// Runs a state-changing operation to its end even if the request is dropped.
async fn to_completion<T: Send + 'static>(
    operation: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(operation)
        .await
        .map_err(|e| ApiError::new(500, "internal", format!("the operation failed: {e}")))?
        .map_err(ApiError::from)
}

/// Lists endpoints with their status and URL.
#[utoipa::path(get, path = "/api/v1/endpoints", tag = "control",
    responses((status = 200, description = "Every endpoint", body = EndpointList)))]
pub(crate) async fn list(State(gateway): State<AppState>, Who(caller): Who) -> Response {
    let endpoints = gateway
        .endpoints()
        .iter()
        .filter(|d| caller.sees(&d.spec.name))
        .map(|d| summary(&gateway, d))
        .collect();
    json(StatusCode::OK, &EndpointList { endpoints })
}

/// Creates an endpoint from a spec (TOML, or JSON with `content-type: application/json`).
#[utoipa::path(post, path = "/api/v1/endpoints", tag = "control",
    request_body(content(
        (EndpointSpec = "application/json"),
        (String = "application/toml", example = "name = \"hello\"\n[[versions]]\nname = \"v1\"\nprocessor = { component = \"sha256:...\" }\n"),
    )),
    responses(
        (status = 201, description = "Deployed", body = EndpointDetail),
        (status = 400, description = "The spec does not parse", body = ErrorBody),
        (status = 409, description = "An endpoint of that name exists", body = ErrorBody),
        (status = 413, description = "The spec is over 1 MiB", body = ErrorBody),
        (status = 422, description = "A field is not acceptable (the error names it)", body = ErrorBody),
        (status = 503, description = "The store is reopening after an I/O error", body = ErrorBody),
        (status = 507, description = "The data directory is full", body = ErrorBody),
    ))]
pub(crate) async fn create(
    State(gateway): State<AppState>,
    Who(caller): Who,
    headers: HeaderMap,
    Payload(body): Payload<MAX_SPEC_BYTES>,
) -> Result<Response, ApiError> {
    let mut spec = parse_spec(&headers, &body)?;
    spec.name = caller.qualify(&spec.name);
    let deployment = to_completion(async move { gateway.deploy(spec, false).await }).await?;
    Ok(json(StatusCode::CREATED, &detail(&deployment)))
}

/// Shows an endpoint: status, versions, workers, instances and spec.
#[utoipa::path(get, path = "/api/v1/endpoints/{name}", tag = "control",
    params(("name" = String, Path, description = "Endpoint name")),
    responses(
        (status = 200, description = "The endpoint", body = EndpointDetail),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ))]
pub(crate) async fn get(
    State(gateway): State<AppState>,
    Name(name): Name,
) -> Result<Response, ApiError> {
    let d = gateway.endpoint(&name).ok_or(Error::NotFound(name))?;
    Ok(json(StatusCode::OK, &detail(&d)))
}

/// Creates or replaces an endpoint; requests in flight finish on the old versions.
#[utoipa::path(put, path = "/api/v1/endpoints/{name}", tag = "control",
    params(("name" = String, Path, description = "Endpoint name; must match the spec's")),
    request_body(content(
        (EndpointSpec = "application/json"),
        (String = "application/toml"),
    )),
    responses(
        (status = 200, description = "Replaced", body = EndpointDetail),
        (status = 201, description = "Created", body = EndpointDetail),
        (status = 400, description = "The spec does not parse", body = ErrorBody),
        (status = 413, description = "The spec is over 1 MiB", body = ErrorBody),
        (status = 422, description = "A field is not acceptable (the error names it)", body = ErrorBody),
        (status = 503, description = "The store is reopening after an I/O error", body = ErrorBody),
        (status = 507, description = "The data directory is full", body = ErrorBody),
    ))]
pub(crate) async fn replace(
    State(gateway): State<AppState>,
    Name(name): Name,
    headers: HeaderMap,
    Payload(body): Payload<MAX_SPEC_BYTES>,
) -> Result<Response, ApiError> {
    let mut spec = parse_spec(&headers, &body)?;
    if spec.name != local_name(&name) {
        return Err(Error::Invalid {
            field: "name".into(),
            message: format!(
                "the spec names `{}` but the URL names `{}`",
                spec.name,
                local_name(&name)
            ),
        }
        .into());
    }
    spec.name = name.clone();
    let existed = gateway.endpoint(&name).is_some();
    let deployment = to_completion(async move { gateway.deploy(spec, true).await }).await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json(status, &detail(&deployment)))
}

/// Removes an endpoint; requests in flight finish.
#[utoipa::path(delete, path = "/api/v1/endpoints/{name}", tag = "control",
    params(("name" = String, Path, description = "Endpoint name")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such endpoint", body = ErrorBody),
        (status = 503, description = "The store is reopening after an I/O error", body = ErrorBody),
        (status = 507, description = "The data directory is full", body = ErrorBody),
    ))]
pub(crate) async fn remove(
    State(gateway): State<AppState>,
    Name(name): Name,
) -> Result<StatusCode, ApiError> {
    to_completion(async move { gateway.remove(&name).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn set_stopped(gateway: AppState, name: String, stopped: bool) -> Result<Response, ApiError> {
    let deployment =
        to_completion(async move { gateway.set_stopped(&name, stopped).await }).await?;
    Ok(json(StatusCode::OK, &detail(&deployment)))
}

/// Stops an endpoint: no instances, requests answered 503, spec and URL kept.
#[utoipa::path(post, path = "/api/v1/endpoints/{name}/stop", tag = "control",
    params(("name" = String, Path, description = "Endpoint name")),
    responses(
        (status = 200, description = "Stopped", body = EndpointDetail),
        (status = 404, description = "No such endpoint", body = ErrorBody),
        (status = 503, description = "The store is reopening after an I/O error", body = ErrorBody),
        (status = 507, description = "The data directory is full", body = ErrorBody),
    ))]
pub(crate) async fn stop(
    State(gateway): State<AppState>,
    Name(name): Name,
) -> Result<Response, ApiError> {
    set_stopped(gateway, name, true).await
}

/// Starts a stopped endpoint.
#[utoipa::path(post, path = "/api/v1/endpoints/{name}/start", tag = "control",
    params(("name" = String, Path, description = "Endpoint name")),
    responses(
        (status = 200, description = "Started", body = EndpointDetail),
        (status = 404, description = "No such endpoint", body = ErrorBody),
        (status = 422, description = "Its processor could not start", body = ErrorBody),
        (status = 503, description = "The store is reopening after an I/O error", body = ErrorBody),
        (status = 507, description = "The data directory is full", body = ErrorBody),
    ))]
pub(crate) async fn start(
    State(gateway): State<AppState>,
    Name(name): Name,
) -> Result<Response, ApiError> {
    set_stopped(gateway, name, false).await
}

/// The processors' log records.
#[utoipa::path(get, path = "/api/v1/endpoints/{name}/logs", tag = "control",
    params(("name" = String, Path, description = "Endpoint name"), LogQuery),
    responses(
        (status = 200, description = "The newest records, oldest first", body = LogList),
        (status = 400, description = "`limit` is not a count", body = ErrorBody),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ))]
pub(crate) async fn logs(
    State(gateway): State<AppState>,
    Name(name): Name,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::from(e).with_field("limit"))?;
    let d = gateway.endpoint(&name).ok_or(Error::NotFound(name))?;
    let logs = d
        .logs
        .tail(query.limit.unwrap_or(100))
        .into_iter()
        .map(|r| LogEntry {
            at_ms: r.at_ms,
            level: r.level.to_owned(),
            version: r.version,
            message: r.message,
        })
        .collect();
    Ok(json(StatusCode::OK, &LogList { logs }))
}

/// Scaling events of an endpoint's versions, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventList {
    /// The events.
    pub events: Vec<ScaleEvent>,
}

/// The endpoint's scaling events: every change of a version's workers, with the policy
/// that made it and why, and workers that failed to start.
#[utoipa::path(get, path = "/api/v1/endpoints/{name}/events", tag = "control",
    params(("name" = String, Path, description = "Endpoint name"), LogQuery),
    responses(
        (status = 200, description = "The newest events, oldest first", body = EventList),
        (status = 400, description = "`limit` is not a count", body = ErrorBody),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ))]
pub(crate) async fn events(
    State(gateway): State<AppState>,
    Name(name): Name,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::from(e).with_field("limit"))?;
    let d = gateway.endpoint(&name).ok_or(Error::NotFound(name))?;
    let events = d.events.recent(query.limit.unwrap_or(100));
    Ok(json(StatusCode::OK, &EventList { events }))
}

/// Uploads a component (the body is the `.wasm`); specs then name it by digest.
#[utoipa::path(put, path = "/api/v1/components", tag = "control",
    request_body(content((Vec<u8> = "application/wasm")), description = "The component's bytes"),
    responses(
        (status = 201, description = "Stored", body = ComponentDigest),
        (status = 400, description = "The body is empty", body = ErrorBody),
        (status = 413, description = "Over 256 MiB", body = ErrorBody),
        (status = 507, description = "The data directory is full", body = ErrorBody),
    ))]
pub(crate) async fn upload_component(
    State(gateway): State<AppState>,
    Who(caller): Who,
    Payload(body): Payload<MAX_COMPONENT_BYTES>,
) -> Result<Response, ApiError> {
    if body.is_empty() {
        return Err(ApiError::new(
            400,
            "empty_body",
            "the body must be a wasm component",
        ));
    }
    let size = body.len();
    let digest =
        to_completion(async move { gateway.upload_component(&caller.tenant, body).await }).await?;
    Ok(json(
        StatusCode::CREATED,
        &ComponentDigest {
            digest: format!("sha256:{digest}"),
            size,
        },
    ))
}

/// Downloads an uploaded component, checked against its digest.
#[utoipa::path(get, path = "/api/v1/components/{digest}", tag = "control",
    params(("digest" = String, Path, description = "`sha256:<hex>` or the hex alone")),
    responses(
        (status = 200, description = "The component", content_type = "application/wasm", body = Vec<u8>),
        (status = 400, description = "The digest in the path is not UTF-8", body = ErrorBody),
        (status = 404, description = "No such component, or its stored copy was corrupt", body = ErrorBody),
    ))]
pub(crate) async fn download_component(
    State(gateway): State<AppState>,
    Who(caller): Who,
    digest: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Response, ApiError> {
    let axum::extract::Path(digest) =
        digest.map_err(|e| ApiError::new(400, "invalid_path", e.body_text()))?;
    let hex = digest.strip_prefix("sha256:").unwrap_or(&digest).to_owned();
    let bytes = gateway
        .tenant_component(&caller.tenant, &hex)
        .await
        .map_err(|e| match e {
            Error::UnknownComponent(_) | Error::CorruptComponent(_) => {
                ApiError::new(404, "component_not_found", e.to_string())
            }
            other => other.into(),
        })?;
    Ok((
        [(CONTENT_TYPE, HeaderValue::from_static("application/wasm"))],
        bytes,
    )
        .into_response())
}

/// A consistent copy of the store's database, taken while serving (what `wasp store
/// backup` downloads).
#[utoipa::path(get, path = "/api/v1/store/snapshot", tag = "control",
    responses(
        (status = 200, description = "A redb database file", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 503, description = "The store is reopening after an I/O error", body = ErrorBody),
        (status = 507, description = "The data directory is full", body = ErrorBody),
    ))]
pub(crate) async fn snapshot(State(gateway): State<AppState>) -> Result<Response, ApiError> {
    let bytes = gateway.store_snapshot().await?;
    Ok((
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        bytes,
    )
        .into_response())
}

/// The key an endpoint's job webhooks are signed with.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookSecret {
    /// The secret (HMAC-SHA256 key).
    pub secret: String,
    /// How deliveries carry the signature.
    pub header: &'static str,
}

fn webhook_secret_of(d: &Deployment) -> WebhookSecret {
    WebhookSecret {
        secret: d.webhook_secret.clone(),
        header: "x-wasp-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">",
    }
}

/// The endpoint's webhook secret: receivers check `x-wasp-signature` with it.
#[utoipa::path(get, path = "/api/v1/endpoints/{name}/webhook-secret", tag = "control",
    params(("name" = String, Path, description = "Endpoint name")),
    responses(
        (status = 200, description = "The secret", body = WebhookSecret),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ))]
pub(crate) async fn webhook_secret(
    State(gateway): State<AppState>,
    Name(name): Name,
) -> Result<Response, ApiError> {
    let d = gateway.endpoint(&name).ok_or(Error::NotFound(name))?;
    Ok(json(StatusCode::OK, &webhook_secret_of(&d)))
}

/// Replaces the endpoint's webhook secret; deliveries from now on are signed with the new
/// one.
#[utoipa::path(post, path = "/api/v1/endpoints/{name}/webhook-secret/rotate", tag = "control",
    params(("name" = String, Path, description = "Endpoint name")),
    responses(
        (status = 200, description = "The new secret", body = WebhookSecret),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ))]
pub(crate) async fn rotate_webhook_secret(
    State(gateway): State<AppState>,
    Name(name): Name,
) -> Result<Response, ApiError> {
    let d = to_completion(async move { gateway.rotate_webhook_secret(&name).await }).await?;
    Ok(json(StatusCode::OK, &webhook_secret_of(&d)))
}

/// An endpoint's request record files.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RecordFiles {
    /// The files, oldest first.
    pub files: Vec<RecordFile>,
    /// Records dropped because the writer fell behind (every endpoint, since start).
    pub dropped: u64,
}

/// A request record file.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RecordFile {
    /// Its name, for `/records/{file}`.
    pub name: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// The endpoint's request record files (its spec's `records` says which requests are
/// kept), oldest first.
#[utoipa::path(get, path = "/api/v1/endpoints/{name}/records", tag = "control",
    params(("name" = String, Path, description = "Endpoint name")),
    responses(
        (status = 200, description = "The files", body = RecordFiles),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ))]
pub(crate) async fn records(
    State(gateway): State<AppState>,
    Name(name): Name,
) -> Result<Response, ApiError> {
    gateway
        .endpoint(&name)
        .ok_or_else(|| Error::NotFound(local_name(&name).to_owned()))?;
    let files = gateway
        .recorder
        .files(&name)
        .into_iter()
        .map(|(name, bytes)| RecordFile { name, bytes })
        .collect();
    let dropped = gateway.recorder.dropped.load(Ordering::Relaxed);
    Ok(json(StatusCode::OK, &RecordFiles { files, dropped }))
}

/// One request record file: a [`crate::records::RequestRecord`] per line (JSONL), streamed.
#[utoipa::path(get, path = "/api/v1/endpoints/{name}/records/{file}", tag = "control",
    params(
        ("name" = String, Path, description = "Endpoint name"),
        ("file" = String, Path, description = "File name, as the listing gives it"),
    ),
    responses(
        (status = 200, description = "The records, one JSON object per line", content_type = "application/jsonl", body = crate::records::RequestRecord),
        (status = 404, description = "No such endpoint or file", body = ErrorBody),
    ))]
pub(crate) async fn record_file(
    State(gateway): State<AppState>,
    Name(name): Name,
    params: axum::extract::RawPathParams,
) -> Result<Response, ApiError> {
    gateway
        .endpoint(&name)
        .ok_or_else(|| Error::NotFound(local_name(&name).to_owned()))?;
    let file = params
        .iter()
        .find(|(k, _)| *k == "file")
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default();
    let not_found = || {
        ApiError::new(
            404,
            "records_not_found",
            format!(
                "endpoint `{}` has no record file `{file}`",
                local_name(&name)
            ),
        )
    };
    let path = gateway.recorder.file(&name, &file).ok_or_else(not_found)?;
    let opened = tokio::fs::File::open(&path)
        .await
        .map_err(|_| not_found())?;
    // Read in chunks as the client takes them: a file may be large.
    let chunks = futures_util::stream::unfold(Some(opened), |file| async move {
        use tokio::io::AsyncReadExt;
        let mut file = file?;
        let mut buf = vec![0u8; 64 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(bytes::Bytes::from(buf)), Some(file)))
            }
            // The error ends the body (the client sees it cut short), and the stream.
            Err(e) => Some((Err(e), None)),
        }
    });
    let mut response = Response::new(axum::body::Body::from_stream(chunks));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/jsonl"));
    Ok(response)
}
