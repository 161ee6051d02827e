//! The KServe v2 (Open Inference Protocol) routes over HTTP: server health and metadata,
//! model readiness and metadata, and inference with JSON tensors or the binary tensor data
//! extension, on every model route with and without `/versions/{version}` (a version is a
//! wasp version). Errors on these routes take the protocol's shape, `{"error": "..."}`
//! (see [`protocol_error`]).
//!
//! Numeric tensors go straight to the model backend. Text (`BYTES` inputs) goes through
//! the endpoint's processor, as a Triton ensemble with a tokenizer step would: it gets the
//! request as KServe JSON at path `/v2/models/{name}/infer` and answers KServe JSON
//! outputs, which are sent on as the client asked.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{RawPathParams, State};
use axum::http::header::{CONTENT_TYPE, HeaderValue};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::data::{
    Recording, admit, keep_record, read_version_body, record, resolve_with, serve, start_record,
    visible_headers,
};
use super::error::json;
use super::{ApiError, AppState, Name};
use crate::Error;
use crate::kserve::{InferRequest, InferResponse};
use crate::registry::DeployedVersion;

/// The header that gives the JSON part's length in a body with binary tensor data.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// An error on a KServe v2 route, as the protocol (and its clients) expect it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProtocolError {
    /// What went wrong, naming the field at fault when there is one.
    pub error: String,
}

/// Server liveness.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ServerLive {
    /// Always true while the server answers.
    pub live: bool,
}

/// Server readiness.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ServerReady {
    /// Whether it takes inference requests.
    pub ready: bool,
}

/// Server metadata.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ServerMetadata {
    /// `wasp`.
    pub name: &'static str,
    /// Its version.
    pub version: &'static str,
    /// The protocol extensions it supports.
    pub extensions: Vec<&'static str>,
}

/// KServe v2 readiness of a model.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelReady {
    /// The endpoint.
    pub name: String,
    /// Whether it (or the version asked for) is ready.
    pub ready: bool,
    /// wasp's status: `ready`, `concerning`, `notReady` or `stopped` for an endpoint, a
    /// version's status for a version.
    pub status: &'static str,
}

/// One tensor a model takes or gives.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TensorMetadata {
    /// Its name.
    pub name: String,
    /// Its datatype.
    pub datatype: &'static str,
    /// Its dimensions; `-1` for one that varies.
    pub shape: Vec<i64>,
    /// Whether a request may leave it out.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub optional: bool,
}

/// KServe v2 metadata of a model.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelMetadata {
    /// The endpoint.
    pub name: String,
    /// Its versions (the one asked for, on a `/versions/{version}` route).
    pub versions: Vec<String>,
    /// `wasp_<backend>`: `wasp_candle`, `wasp_container`...
    pub platform: String,
    /// What it takes: the processor's text input when the version reads text, else the
    /// model backend's tensors (empty when the backend does not say, or before it loaded).
    pub inputs: Vec<TensorMetadata>,
    /// What it gives.
    pub outputs: Vec<TensorMetadata>,
}

/// Answers a failed `/v2` request in the protocol's shape, `{"error": "<message>"}`,
/// keeping the status (the message names the field at fault, when there is one). Run on
/// every response to a `/v2` path, so that authentication, routing and limits answer so
/// too.
pub(crate) async fn protocol_error(response: Response) -> Response {
    if response.status().as_u16() < 400 {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let message = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(v) if v["error"].is_object() => {
            let e = &v["error"];
            let text = e["message"].as_str().unwrap_or("request failed");
            match e["field"].as_str() {
                Some(field) if !text.contains(field) => format!("{text} (field `{field}`)"),
                _ => text.to_owned(),
            }
        }
        Ok(v) if v["error"].is_string() => return Response::from_parts(parts, Body::from(bytes)),
        _ => String::from_utf8_lossy(&bytes).into_owned(),
    };
    let body = serde_json::json!({ "error": message }).to_string();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(parts, Body::from(body))
}

/// Whether a path (after any `/t/{tenant}` prefix) is a KServe v2 route.
pub(crate) fn is_v2(path: &str) -> bool {
    let path = match path.strip_prefix("/t/") {
        Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
        None => path,
    };
    path == "/v2" || path.starts_with("/v2/")
}

/// KServe v2 server liveness: the server answers.
#[utoipa::path(get, path = "/v2/health/live", tag = "kserve",
    responses((status = 200, description = "Live", body = ServerLive)))]
pub(crate) async fn server_live() -> Response {
    json(StatusCode::OK, &ServerLive { live: true })
}

/// KServe v2 server readiness: the server takes inference requests (each model says
/// whether it is ready on its own route).
#[utoipa::path(get, path = "/v2/health/ready", tag = "kserve",
    responses((status = 200, description = "Ready", body = ServerReady)))]
pub(crate) async fn server_ready() -> Response {
    json(StatusCode::OK, &ServerReady { ready: true })
}

/// KServe v2 server metadata: name, version and the protocol extensions served.
#[utoipa::path(get, path = "/v2", tag = "kserve",
    responses((status = 200, description = "The server", body = ServerMetadata)))]
pub(crate) async fn server_metadata() -> Response {
    json(
        StatusCode::OK,
        &ServerMetadata {
            name: "wasp",
            version: env!("CARGO_PKG_VERSION"),
            extensions: vec!["binary_tensor_data", "parameters"],
        },
    )
}

/// The `version` of a `/versions/{version}` route, if the route has one.
fn version_param(params: &RawPathParams) -> Option<String> {
    params
        .iter()
        .find(|(key, _)| *key == "version")
        .map(|(_, v)| v.to_owned())
}

/// The version named, or 404 naming it.
fn named_version(
    d: &crate::Deployment,
    name: &str,
    version: &str,
) -> Result<Arc<DeployedVersion>, ApiError> {
    d.versions
        .iter()
        .find(|v| v.name == version)
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                404,
                "version_not_found",
                format!(
                    "model `{}` has no version `{version}`",
                    crate::tenants::local_name(name)
                ),
            )
        })
}

/// KServe v2 model readiness: 200 when the model (or the version) is ready, else 503.
#[utoipa::path(get, path = "/v2/models/{name}/ready", tag = "kserve",
    params(("name" = String, Path, description = "Endpoint name")),
    responses(
        (status = 200, description = "Ready", body = ModelReady),
        (status = 503, description = "Not ready", body = ModelReady),
        (status = 404, description = "No such model", body = ProtocolError),
    ))]
pub(crate) async fn model_ready(
    State(gateway): State<AppState>,
    Name(name): Name,
    params: RawPathParams,
) -> Result<Response, ApiError> {
    let d = gateway
        .endpoint(&name)
        .ok_or(Error::NotFound(name.clone()))?;
    let status = match version_param(&params) {
        Some(v) => {
            let version = named_version(&d, &name, &v)?;
            if d.stopped {
                "stopped"
            } else {
                d.version_status(&version)
            }
        }
        None => d.status(),
    };
    let ready = matches!(status, "ready" | "scaledToZero");
    Ok(json(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &ModelReady {
            name: crate::tenants::local_name(&d.spec.name).to_owned(),
            ready,
            status,
        },
    ))
}

/// `/v2/models/{name}/versions/{version}/ready`.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}/ready", tag = "kserve",
    params(("name" = String, Path, description = "Endpoint name"),
           ("version" = String, Path, description = "Version name")),
    responses(
        (status = 200, description = "Ready", body = ModelReady),
        (status = 503, description = "Not ready", body = ModelReady),
        (status = 404, description = "No such model or version", body = ProtocolError),
    ))]
pub(crate) async fn version_ready(
    state: State<AppState>,
    name: Name,
    params: RawPathParams,
) -> Result<Response, ApiError> {
    model_ready(state, name, params).await
}

fn tensors(specs: &[wasp_backend::TensorSpec]) -> Vec<TensorMetadata> {
    specs
        .iter()
        .map(|t| TensorMetadata {
            name: t.name.clone(),
            datatype: t.datatype,
            shape: t.shape.clone(),
            optional: t.optional,
        })
        .collect()
}

/// KServe v2 model metadata: versions, platform, and the tensors it takes and gives.
#[utoipa::path(get, path = "/v2/models/{name}", tag = "kserve",
    params(("name" = String, Path, description = "Endpoint name")),
    responses(
        (status = 200, description = "The model", body = ModelMetadata),
        (status = 404, description = "No such model", body = ProtocolError),
    ))]
pub(crate) async fn model_metadata(
    State(gateway): State<AppState>,
    Name(name): Name,
    params: RawPathParams,
) -> Result<Response, ApiError> {
    let d = gateway
        .endpoint(&name)
        .ok_or(Error::NotFound(name.clone()))?;
    let (versions, described) = match version_param(&params) {
        Some(v) => {
            let version = named_version(&d, &name, &v)?;
            (vec![version.name.clone()], version)
        }
        None => {
            let first = d.versions.first().cloned().ok_or_else(|| {
                ApiError::new(503, "no_version", format!("model `{name}` has no version"))
            })?;
            (d.versions.iter().map(|v| v.name.clone()).collect(), first)
        }
    };
    let signature = described.workers.signature().unwrap_or_default();
    Ok(json(
        StatusCode::OK,
        &ModelMetadata {
            name: crate::tenants::local_name(&d.spec.name).to_owned(),
            versions,
            platform: format!("wasp_{}", described.backend),
            inputs: tensors(&signature.inputs),
            outputs: tensors(&signature.outputs),
        },
    ))
}

/// `/v2/models/{name}/versions/{version}`.
#[utoipa::path(get, path = "/v2/models/{name}/versions/{version}", tag = "kserve",
    params(("name" = String, Path, description = "Endpoint name"),
           ("version" = String, Path, description = "Version name")),
    responses(
        (status = 200, description = "The version", body = ModelMetadata),
        (status = 404, description = "No such model or version", body = ProtocolError),
    ))]
pub(crate) async fn version_metadata(
    state: State<AppState>,
    name: Name,
    params: RawPathParams,
) -> Result<Response, ApiError> {
    model_metadata(state, name, params).await
}

/// KServe v2 inference: JSON tensors, or binary tensor data after a JSON header of
/// `Inference-Header-Content-Length` bytes. Numeric inputs go to the model backend; text
/// (`BYTES`) goes through the endpoint's processor. Requested `outputs` are honoured, each
/// in JSON or binary as asked (`binary_data`, `binary_data_output`); `id` is echoed and
/// `parameters` passed on. With `Accept: text/event-stream`, the answer is server-sent
/// events: numeric inputs one per output chunk of the model (a generation backend's tokens
/// when its `parameters` ask it to stream), text one per chunk the processor answers (it
/// is asked to stream: a generation endpoint's text, token by token).
#[utoipa::path(post, path = "/v2/models/{name}/infer", tag = "kserve",
    params(("name" = String, Path, description = "Endpoint name")),
    request_body(content(
        (InferRequest = "application/json"),
        (Vec<u8> = "application/octet-stream"),
    )),
    responses(
        (status = 200, description = "The outputs (JSON, or a JSON header and binary data with `Inference-Header-Content-Length`); with `Accept: text/event-stream`, server-sent events, one KServe JSON response per output chunk of the model (tensors) or of the processor (text, with `parameters.stream` set for it), `parameters.triton_final_response` true on the last", body = InferResponse),
        (status = 400, description = "Not a valid request (the message names the field)", body = ProtocolError),
        (status = 404, description = "No such model or version", body = ProtocolError),
        (status = 413, description = "Over the version's `limits.max_body_bytes`", body = ProtocolError),
        (status = 422, description = "The model cannot take it (no backend, or text without a processor)", body = ProtocolError),
        (status = 429, description = "A rate limit; retry after `Retry-After`", body = ProtocolError),
        (status = 503, description = "Stopped, or failed to load", body = ProtocolError),
    ))]
pub(crate) async fn infer(
    State(gateway): State<AppState>,
    super::Who(caller): super::Who,
    Name(name): Name,
    params: RawPathParams,
    id: Option<axum::Extension<super::RequestId>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let mut pin = HeaderMap::new();
    let named = version_param(&params);
    if let Some(v) = &named {
        // Named by the route: a missing one is said so (not as a header at fault).
        if let Some(d) = gateway.endpoint(&name) {
            named_version(&d, &name, v)?;
        }
        let value = HeaderValue::from_str(v)
            .map_err(|_| ApiError::new(404, "version_not_found", "no such version"))?;
        pin.insert("x-wasp-version", value);
    }
    let (deployment, version) = resolve_with(&gateway, &name, &pin)?;
    let admitted = admit(&gateway, Some(&caller), &deployment)?;
    let recording: Recording = deployment
        .spec
        .records
        .filter(crate::records::sampled)
        .map(|spec| (spec, id.map(|i| i.0.0)));
    drop(deployment);
    let body = read_version_body(body, version.limits.max_body_bytes).await?;
    let header_length = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    ApiError::new(400, "invalid_request", "not a byte count")
                        .with_field("Inference-Header-Content-Length")
                })?,
        ),
    };
    let bad = |e: crate::kserve::Invalid| {
        ApiError::new(400, "invalid_request", e.message).with_field(e.field)
    };
    let mut parsed = crate::kserve::parse(&body, header_length).map_err(bad)?;
    let local = crate::tenants::local_name(&name).to_owned();
    let text = parsed.has_text();
    let as_events = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    // Tensors are recorded here as they came; text is recorded by the processor's run, as
    // the processor saw it.
    let kept = match (&recording, text) {
        (Some((spec, id)), false) => {
            let path = match &named {
                Some(v) => format!("/v2/models/{local}/versions/{v}/infer"),
                None => format!("/v2/models/{local}/infer"),
            };
            let request = wasp_wasm::Request {
                method: "POST".into(),
                path,
                headers: visible_headers(&headers),
                body: body.to_vec(),
            };
            Some((*spec, start_record(&version, &request, spec, id.as_ref())))
        }
        _ => None,
    };
    if as_events && text {
        let served = Served {
            gateway: &gateway,
            name: &name,
            started,
            recording,
        };
        let mut response = match text_events(&version, &local, &parsed, served).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
        if let Ok(v) = HeaderValue::from_str(&version.name) {
            response.headers_mut().insert("x-wasp-version", v);
        }
        admitted.stamp(response.headers_mut());
        return Ok(response);
    }
    if as_events {
        let mut response = match events(&version, &name, &local, parsed).await {
            Ok(response) => response,
            Err(e) => e.into_response(),
        };
        if let Some((spec, record)) = kept {
            let headers = [("content-type".to_owned(), "text/event-stream".to_owned())];
            let status = response.status().as_u16();
            keep_record(
                &gateway, &name, spec, record, status, &headers, b"", true, started,
            );
        }
        record(&gateway, &name, &version, &response, started);
        if let Ok(v) = HeaderValue::from_str(&version.name) {
            response.headers_mut().insert("x-wasp-version", v);
        }
        admitted.stamp(response.headers_mut());
        return Ok(response);
    }
    let answered = if text {
        let served = Served {
            gateway: &gateway,
            name: &name,
            started,
            recording,
        };
        through_processor(&version, &local, &parsed, served).await
    } else {
        to_backend(&version, &name, &mut parsed).await
    };
    let mut response = match answered {
        Ok((outputs, parameters)) => {
            match crate::kserve::encode(
                &local,
                &version.name,
                parsed.id.as_deref(),
                parameters,
                outputs,
                &parsed.outputs,
            ) {
                Ok(encoded) => {
                    if let Some((spec, record)) = kept {
                        let content_type = match encoded.header_length {
                            Some(_) => "application/octet-stream",
                            None => "application/json",
                        };
                        let headers = [("content-type".to_owned(), content_type.to_owned())];
                        keep_record(
                            &gateway,
                            &name,
                            spec,
                            record,
                            200,
                            &headers,
                            &encoded.body,
                            false,
                            started,
                        );
                    }
                    encoded_response(encoded)
                }
                Err(e) => bad(e).into_response(),
            }
        }
        Err(e) => {
            if let Some((spec, record)) = kept {
                let body = serde_json::json!({ "error": e.message }).to_string();
                keep_record(
                    &gateway,
                    &name,
                    spec,
                    record,
                    e.status,
                    &[],
                    body.as_bytes(),
                    false,
                    started,
                );
            }
            e.into_response()
        }
    };
    // The processor's run counted a text request already.
    if !text {
        record(&gateway, &name, &version, &response, started);
    }
    if let Ok(v) = HeaderValue::from_str(&version.name) {
        response.headers_mut().insert("x-wasp-version", v);
    }
    admitted.stamp(response.headers_mut());
    Ok(response)
}

/// `/v2/models/{name}/versions/{version}/infer`: inference on that version, whatever
/// its weight.
#[utoipa::path(post, path = "/v2/models/{name}/versions/{version}/infer", tag = "kserve",
    params(("name" = String, Path, description = "Endpoint name"),
           ("version" = String, Path, description = "Version name")),
    request_body(content(
        (InferRequest = "application/json"),
        (Vec<u8> = "application/octet-stream"),
    )),
    responses(
        (status = 200, description = "The outputs", body = InferResponse),
        (status = 400, description = "Not a valid request", body = ProtocolError),
        (status = 404, description = "No such model or version", body = ProtocolError),
        (status = 413, description = "Over the version's `limits.max_body_bytes`", body = ProtocolError),
        (status = 422, description = "The model cannot take it", body = ProtocolError),
        (status = 429, description = "A rate limit", body = ProtocolError),
        (status = 503, description = "Stopped, or failed to load", body = ProtocolError),
    ))]
pub(crate) async fn version_infer(
    state: State<AppState>,
    who: super::Who,
    name: Name,
    params: RawPathParams,
    id: Option<axum::Extension<super::RequestId>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer(state, who, name, params, id, headers, body).await
}

type Outputs = (Vec<crate::kserve::Data>, Option<serde_json::Value>);

/// 422 unless the version has a model backend to take tensors.
fn needs_model(version: &DeployedVersion, name: &str) -> Result<(), ApiError> {
    if version.workers.has_model() {
        return Ok(());
    }
    Err(ApiError::new(
        422,
        "no_model_backend",
        format!(
            "model `{}` has no model backend (backend `none`): send text (BYTES) for its \
             processor, or use its invoke route",
            crate::tenants::local_name(name)
        ),
    ))
}

/// A backend error, its field named as the request's own tensor.
fn backend_error(e: &wasp_backend::BackendError, names: &[String]) -> ApiError {
    let mut error = ApiError::backend(e);
    error.field = error.field.map(|f| tensor_field(&f, names));
    error
}

/// Numeric tensors to the model backend, each output chunk answered as a server-sent event
/// as it comes (a generation backend's tokens, when its `parameters` ask it to stream; one
/// event from any other backend): `data: <KServe JSON response>`, every output in JSON,
/// with the chunk's metadata in `parameters` and `triton_final_response` true on the last.
/// A failure after the first event is an event `data: {"error": "..."}`, and the end.
async fn events(
    version: &Arc<DeployedVersion>,
    name: &str,
    local: &str,
    mut parsed: crate::kserve::Request,
) -> Result<Response, ApiError> {
    needs_model(version, name)?;
    let counted = super::data::Counted::enter(version);
    version.usage.requests.fetch_add(1, Ordering::Relaxed);
    let names: Vec<String> = parsed.inputs.iter().map(|d| d.name().to_owned()).collect();
    let started = Instant::now();
    let (mut stream, in_flight) = version
        .infer_stream(parsed.take_model_input())
        .await
        .map_err(|e| backend_error(&e, &names))?;
    let ended = || {
        ApiError::new(
            503,
            "backend_unavailable",
            "the model's output ended before its last chunk",
        )
    };
    let first = stream
        .recv()
        .await
        .ok_or_else(ended)?
        .map_err(|e| backend_error(&e, &names))?;
    let choice = parsed.outputs.as_json();
    let event = {
        let (local, version_name, id) = (local.to_owned(), version.name.clone(), parsed.id);
        move |chunk: &wasp_core::ModelOutput| -> Result<String, crate::kserve::Invalid> {
            let mut parameters = chunk
                .metadata
                .as_deref()
                .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
                .filter(serde_json::Value::is_object)
                .unwrap_or_else(|| serde_json::json!({}));
            parameters["triton_final_response"] = serde_json::Value::Bool(chunk.last);
            let encoded = crate::kserve::encode(
                &local,
                &version_name,
                id.as_deref(),
                Some(parameters),
                crate::kserve::model_outputs(chunk),
                &choice,
            )?;
            Ok(format!(
                "data: {}\n\n",
                String::from_utf8_lossy(&encoded.body)
            ))
        }
    };
    // The first chunk answers for the request: an output asked for that the model does
    // not give is a 400, not an event.
    let head = event(&first)
        .map_err(|e| ApiError::new(400, "invalid_request", e.message).with_field(e.field))?;
    if first.last {
        super::data::model_done(version, started, &first);
    }
    struct State<E> {
        version: Arc<DeployedVersion>,
        stream: wasp_backend::OutputStream,
        event: E,
        started: Instant,
        done: bool,
        _in_flight: crate::workers::InFlight,
        _counted: super::data::Counted,
    }
    let state = State {
        version: version.clone(),
        stream,
        event,
        started,
        done: first.last,
        _in_flight: in_flight,
        _counted: counted,
    };
    let rest = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let text = match s.stream.recv().await {
            Some(Ok(chunk)) => {
                if chunk.last {
                    s.done = true;
                    super::data::model_done(&s.version, s.started, &chunk);
                }
                (s.event)(&chunk).unwrap_or_else(|e| error_event(&e.message))
            }
            Some(Err(e)) => {
                s.done = true;
                error_event(&e.to_string())
            }
            None => {
                s.done = true;
                error_event("the model's output ended before its last chunk")
            }
        };
        Some((
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(text)),
            s,
        ))
    });
    let body = futures_util::StreamExt::chain(
        futures_util::stream::once(async move {
            Ok::<_, std::convert::Infallible>(bytes::Bytes::from(head))
        }),
        rest,
    );
    Ok(event_stream(body))
}

/// A `200` of server-sent events.
fn event_stream<S>(events: S) -> Response
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, std::convert::Infallible>> + Send + 'static,
{
    let mut response = (StatusCode::OK, Body::from_stream(events)).into_response();
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(
        axum::http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}

/// A server-sent event that says the stream failed.
fn error_event(message: &str) -> String {
    format!("data: {}\n\n", serde_json::json!({ "error": message }))
}

/// Numeric tensors straight to the model backend.
async fn to_backend(
    version: &Arc<DeployedVersion>,
    name: &str,
    parsed: &mut crate::kserve::Request,
) -> Result<Outputs, ApiError> {
    needs_model(version, name)?;
    let counted = version.workers.meter.enter();
    version.usage.requests.fetch_add(1, Ordering::Relaxed);
    // The names only, for errors: the data moves to the backend.
    let names: Vec<String> = parsed.inputs.iter().map(|d| d.name().to_owned()).collect();
    let inferred = version.infer(parsed.take_model_input()).await;
    drop(counted);
    let output = inferred.map_err(|e| backend_error(&e, &names))?;
    let parameters = output
        .metadata
        .as_ref()
        .and_then(|meta| serde_json::from_str::<serde_json::Value>(meta).ok());
    Ok((crate::kserve::model_outputs(&output), parameters))
}

/// A backend's field (`inputs[0].input_ids`: its batch item and tensor) as the request's
/// own (`inputs[2]`: the position of that tensor among the request's inputs).
fn tensor_field(field: &str, names: &[String]) -> String {
    let named = field
        .strip_prefix("inputs[")
        .and_then(|rest| rest.split_once("]."))
        .map(|(_, name)| name);
    named
        .and_then(|name| names.iter().position(|n| n == name))
        .map_or_else(|| field.to_owned(), |i| format!("inputs[{i}]"))
}

/// What a processor's run needs to count and record the request as the data routes do.
struct Served<'a> {
    gateway: &'a crate::Gateway,
    name: &'a str,
    started: Instant,
    recording: Recording,
}

/// Text through the processor, answered as server-sent events: one KServe response per
/// output chunk the processor's post-process answers (a generation backend's tokens: the
/// request's `parameters.stream` is set for it), the last with
/// `parameters.triton_final_response` true. The run is counted and recorded as
/// [`through_processor`]'s.
async fn text_events(
    version: &Arc<DeployedVersion>,
    local: &str,
    parsed: &crate::kserve::Request,
    served: Served<'_>,
) -> Result<Response, ApiError> {
    let response = run_processor(version, local, parsed, served, true).await?;
    let mut frames = response.into_body().into_data_stream();
    let first = match futures_util::StreamExt::next(&mut frames).await {
        Some(Ok(frame)) => frame,
        Some(Err(e)) => {
            return Err(ApiError::new(
                502,
                "invalid_processor_response",
                e.to_string(),
            ));
        }
        None => {
            return Err(ApiError::new(
                502,
                "invalid_processor_response",
                "the processor answered nothing",
            ));
        }
    };
    let choice = parsed.outputs.as_json();
    let (local, version_name, id) = (local.to_owned(), version.name.clone(), parsed.id.clone());
    let event = move |frame: &[u8], last: bool| -> String {
        let (outputs, parameters) = match crate::kserve::processor_outputs(frame) {
            Ok(answer) => answer,
            Err(e) => {
                return error_event(&format!("the processor did not answer KServe outputs: {e}"));
            }
        };
        let mut parameters = parameters.unwrap_or_else(|| serde_json::json!({}));
        parameters["triton_final_response"] = serde_json::Value::Bool(last);
        match crate::kserve::encode(
            &local,
            &version_name,
            id.as_deref(),
            Some(parameters),
            outputs,
            &choice,
        ) {
            Ok(encoded) => format!("data: {}\n\n", String::from_utf8_lossy(&encoded.body)),
            Err(e) => error_event(&e.message),
        }
    };
    // Each frame is one chunk's answer; the next one is read before a frame is sent, so
    // that the last is known as such.
    let events = futures_util::stream::unfold(
        (frames, Some(first), event),
        |(mut frames, current, event)| async move {
            let current = current?;
            let (text, next) = match futures_util::StreamExt::next(&mut frames).await {
                None => (event(&current, true), None),
                Some(Ok(next)) => (event(&current, false), Some(next)),
                Some(Err(e)) => (error_event(&e.to_string()), None),
            };
            Some((
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from(text)),
                (frames, next, event),
            ))
        },
    );
    Ok(event_stream(events))
}

/// Text through the processor: KServe JSON in, KServe JSON out. The run is counted and
/// recorded (when sampled) as any data route's, failures included.
async fn through_processor(
    version: &Arc<DeployedVersion>,
    local: &str,
    parsed: &crate::kserve::Request,
    served: Served<'_>,
) -> Result<Outputs, ApiError> {
    let response = run_processor(version, local, parsed, served, false).await?;
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .map_err(|e| ApiError::new(502, "invalid_processor_response", e.to_string()))?;
    crate::kserve::processor_outputs(&body).map_err(|e| {
        ApiError::new(
            502,
            "invalid_processor_response",
            format!("the processor did not answer KServe outputs: {e}"),
        )
    })
}

/// Runs the processor on the request as KServe JSON (with `parameters.stream` set when
/// `stream`): its answer when it succeeded, else its error as the protocol's.
async fn run_processor(
    version: &Arc<DeployedVersion>,
    local: &str,
    parsed: &crate::kserve::Request,
    served: Served<'_>,
    stream: bool,
) -> Result<Response, ApiError> {
    if version.processor.is_none() {
        return Err(ApiError::new(
            422,
            "no_processor",
            format!(
                "model `{local}` has no processor to read text (BYTES) inputs; send the \
                 model's tensors"
            ),
        ));
    }
    let mut body = parsed
        .to_json(local)
        .map_err(|e| ApiError::new(400, "invalid_request", e.message).with_field(e.field))?;
    if stream {
        let mut json: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
        if !json["parameters"].is_object() {
            json["parameters"] = serde_json::json!({});
        }
        json["parameters"]["stream"] = serde_json::Value::Bool(true);
        body =
            serde_json::to_vec(&json).map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
    }
    let request = wasp_wasm::Request {
        method: "POST".into(),
        path: format!("/v2/models/{local}/infer"),
        headers: vec![("content-type".into(), "application/json".into())],
        body,
    };
    let response = serve(
        served.gateway,
        served.name,
        version,
        request,
        served.started,
        served.recording,
    )
    .await;
    let status = response.status().as_u16();
    if status < 400 {
        return Ok(response);
    }
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .map_err(|e| ApiError::new(502, "invalid_processor_response", e.to_string()))?;
    let text = String::from_utf8_lossy(&body);
    let message = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            let e = &v["error"];
            let message = e["message"].as_str().or(e.as_str())?.to_owned();
            Some(match e["field"].as_str() {
                Some(f) => format!("{message} (field `{f}`)"),
                None => message,
            })
        })
        .unwrap_or_else(|| text.into_owned());
    Err(ApiError::new(status, "processor_error", message))
}

fn encoded_response(encoded: crate::kserve::Encoded) -> Response {
    let mut response = (StatusCode::OK, encoded.body).into_response();
    let h = response.headers_mut();
    match encoded.header_length {
        Some(n) => {
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if let Ok(v) = HeaderValue::from_str(&n.to_string()) {
                h.insert(HEADER_LENGTH, v);
            }
        }
        None => {
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_paths_are_known_under_a_tenant_too() {
        assert!(is_v2("/v2"));
        assert!(is_v2("/v2/models/m/infer"));
        assert!(is_v2("/t/acme/v2/health/live"));
        assert!(!is_v2("/v2x"));
        assert!(!is_v2("/t/acme/api/v1/endpoints"));
        assert!(!is_v2("/endpoints/v2/invoke"));
    }
}
