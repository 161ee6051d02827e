//! The KServe v2 (Open Inference Protocol) over gRPC: `inference.GRPCInferenceService`,
//! as Triton serves it and `tritonclient[grpc]` calls it, served by `wasp serve
//! --grpc-listen`.
//!
//! Every call goes through wasp's HTTP API in-process ([`wasp_gateway::Api`]), as the
//! matching KServe v2 HTTP route: an inference becomes a request with the binary tensor
//! data extension, its answer the gRPC response with raw output contents. So gRPC gets
//! exactly the HTTP API's authentication (`authorization: Bearer` metadata), tenancy
//! (`x-wasp-tenant` metadata, as the `/t/{tenant}` path prefix), rate limits, quotas,
//! request timeouts, request records and metrics, and a version's `max_body_bytes`.
//! Metadata is passed on as headers (`x-wasp-version` pins a version, `x-request-id` names
//! the request); the answer's `x-request-id` and `x-wasp-version` come back as metadata.

mod convert;

use std::pin::Pin;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tonic::{Code, Request, Response, Status, Streaming};
use wasp_gateway::{Api, ClientAddr};

pub use convert::Invalid;

/// The protocol's messages and service, generated from `proto/grpc_service.proto`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::*;

/// The largest message taken or sent (64 MiB). A version's own `limits.max_body_bytes`
/// applies too, to the request as the HTTP route would see it.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Most requests of one `ModelStreamInfer` stream in flight at once; the stream's next
/// request is read when one of them is answered.
pub const STREAM_IN_FLIGHT: usize = 64;

/// The gRPC service over `api`, ready for [`wasp_gateway::Server::serve_h2`]: messages up
/// to [`MAX_MESSAGE_BYTES`], gzip accepted, and gzip sent to clients that accept it.
pub fn service(api: Api) -> Served {
    Served(
        GrpcInferenceServiceServer::new(Inference { api })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .send_compressed(tonic::codec::CompressionEncoding::Gzip),
    )
}

/// The methods of `inference.GRPCInferenceService` that wasp serves.
pub const SERVED: [&str; 7] = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
];

/// The path prefix of the protocol's methods.
const SERVICE_PATH: &str = "/inference.GRPCInferenceService/";

/// The gRPC service: the protocol's methods that wasp serves, and for any other method
/// (Triton's extensions: model configuration, statistics, the repository, shared memory,
/// trace and log settings) `UNIMPLEMENTED` with a message that names it and what is
/// served, where tonic alone would answer with no message at all.
#[derive(Clone)]
pub struct Served(GrpcInferenceServiceServer<Inference>);

impl<B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Served
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tonic::codegen::Service::<tonic::codegen::http::Request<B>>::poll_ready(&mut self.0, cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let method = path.strip_prefix(SERVICE_PATH).unwrap_or(path);
        if SERVED.contains(&method) && path.starts_with(SERVICE_PATH) {
            return self.0.call(request);
        }
        let status = Status::unimplemented(unserved(path));
        Box::pin(async move { Ok(status.into_http()) })
    }
}

/// Why a call to `path` is not served.
fn unserved(path: &str) -> String {
    let served = SERVED.join(", ");
    match path.strip_prefix(SERVICE_PATH) {
        Some(method) => format!(
            "wasp does not serve `inference.GRPCInferenceService/{method}` (a Triton \
             extension); it serves {served} (a model's inputs and outputs are in \
             ModelMetadata)"
        ),
        None => format!(
            "no gRPC service at `{path}`: wasp serves `inference.GRPCInferenceService` \
             ({served})"
        ),
    }
}

/// `inference.GRPCInferenceService` over wasp's API.
#[derive(Clone)]
pub struct Inference {
    api: Api,
}

/// What a call carries besides its message: its metadata and where it came from.
#[derive(Clone)]
struct Caller {
    metadata: MetadataMap,
    client: Option<ClientAddr>,
}

impl Caller {
    fn of<T>(request: &Request<T>) -> Self {
        Self {
            metadata: request.metadata().clone(),
            client: request.extensions().get::<ClientAddr>().copied(),
        }
    }
}

/// An answer from the HTTP API.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    /// The JSON body of a 200, else the error as a gRPC status.
    fn json(self) -> Result<serde_json::Value, Status> {
        if self.status != StatusCode::OK {
            return Err(self.error());
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| Status::internal(format!("the server answered JSON that is not: {e}")))
    }

    /// The HTTP error as the gRPC status a client expects, with the protocol's message.
    fn error(&self) -> Status {
        let message = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned());
        let mut status = Status::new(code_of(self.status), message);
        if let Some(after) = self
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            status.metadata_mut().insert("retry-after", after);
        }
        status
    }

    /// Metadata for the gRPC answer: the request's id and the version that served.
    fn metadata(&self) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        for name in ["x-request-id", "x-wasp-version"] {
            if let Some(value) = self.headers.get(name).and_then(|v| v.to_str().ok())
                && let Ok(value) = value.parse()
            {
                metadata.insert(name, value);
            }
        }
        metadata
    }
}

/// The gRPC code for an HTTP status of the API.
fn code_of(status: StatusCode) -> Code {
    match status.as_u16() {
        400 | 422 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        409 => Code::Aborted,
        413 | 429 | 507 => Code::ResourceExhausted,
        499 => Code::Cancelled,
        501 => Code::Unimplemented,
        503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        _ => Code::Internal,
    }
}

/// A path segment with everything but unreserved characters percent-encoded.
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `/v2/models/{name}[/versions/{version}]`, or `InvalidArgument` for an empty name.
fn model_path(name: &str, version: &str) -> Result<String, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("the model name is empty"));
    }
    let mut path = format!("/v2/models/{}", segment(name));
    if !version.is_empty() {
        path.push_str("/versions/");
        path.push_str(&segment(version));
    }
    Ok(path)
}

/// Headers added to a request.
type Headers = Vec<(HeaderName, HeaderValue)>;

impl Inference {
    /// Sends one request through the API as the HTTP route `path` would get it, and
    /// reads the whole answer.
    async fn send(
        &self,
        caller: &Caller,
        method: Method,
        path: &str,
        extra: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<Answer, Status> {
        let response = self.open(caller, method, path, extra, body).await?;
        collect(response).await
    }

    /// Sends one request through the API as the HTTP route `path` would get it; the
    /// answer's body is read as it comes.
    async fn open(
        &self,
        caller: &Caller,
        method: Method,
        path: &str,
        extra: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> Result<axum::response::Response, Status> {
        let mut uri = String::new();
        if let Some(tenant) = caller.metadata.get("x-wasp-tenant") {
            let tenant = tenant
                .to_str()
                .map_err(|_| Status::invalid_argument("x-wasp-tenant is not text"))?;
            uri.push_str("/t/");
            uri.push_str(&segment(tenant));
        }
        uri.push_str(path);
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .body(axum::body::Body::from(body))
            .map_err(|e| Status::invalid_argument(format!("not a valid request: {e}")))?;
        let headers = request.headers_mut();
        for entry in caller.metadata.iter() {
            // Binary (`-bin`) metadata has no header form the API reads.
            let KeyAndValueRef::Ascii(key, value) = entry else {
                continue;
            };
            let name = key.as_str();
            if name.starts_with("grpc-")
                || matches!(
                    name,
                    "te" | "content-type" | "content-length" | "x-wasp-tenant"
                )
            {
                continue;
            }
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value.as_encoded_bytes()),
            ) {
                headers.append(name, value);
            }
        }
        for (name, value) in extra {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(client) = caller.client {
            request.extensions_mut().insert(client);
        }
        Ok(self.api.call(request).await)
    }

    /// A health route's `key` (false when missing), and the answer's metadata.
    async fn flag<T>(
        &self,
        request: &Request<T>,
        path: &str,
        key: &str,
    ) -> Result<(bool, MetadataMap), Status> {
        let answer = self.get(&Caller::of(request), path).await?;
        let metadata = answer.metadata();
        Ok((answer.json()?[key].as_bool().unwrap_or(false), metadata))
    }

    async fn get(&self, caller: &Caller, path: &str) -> Result<Answer, Status> {
        self.send(caller, Method::GET, path, &[], Bytes::new())
            .await
    }

    /// An inference request as the API's KServe route takes it: its path, headers and body
    /// (with the binary tensor extension).
    fn infer_request(request: ModelInferRequest) -> Result<(String, Headers, Bytes), Status> {
        let path = format!(
            "{}/infer",
            model_path(&request.model_name, &request.model_version)?
        );
        let encoded = convert::to_http(request).map_err(|e| Status::invalid_argument(e.0))?;
        let extra = vec![
            (
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                HeaderName::from_static("inference-header-content-length"),
                HeaderValue::from(encoded.header_length),
            ),
        ];
        Ok((path, extra, encoded.body))
    }

    /// One inference through the API's KServe route.
    async fn infer(
        &self,
        caller: &Caller,
        request: ModelInferRequest,
    ) -> Result<(ModelInferResponse, MetadataMap), Status> {
        let (path, extra, body) = Self::infer_request(request)?;
        let answer = self.send(caller, Method::POST, &path, &extra, body).await?;
        answered(answer)
    }

    /// One inference of a stream: each output chunk of the model (a generation backend's
    /// tokens, when asked to stream) is sent as its own response, as Triton's decoupled
    /// models answer; an error is sent as the request's `error_message`.
    async fn infer_chunks(
        &self,
        caller: &Caller,
        request: ModelInferRequest,
        tx: &mpsc::Sender<Result<ModelStreamInferResponse, Status>>,
    ) {
        let named = ModelInferResponse {
            model_name: request.model_name.clone(),
            model_version: request.model_version.clone(),
            id: request.id.clone(),
            ..ModelInferResponse::default()
        };
        let failed = |status: Status| ModelStreamInferResponse {
            error_message: status.message().to_owned(),
            infer_response: Some(named.clone()),
        };
        let sent = async {
            let (path, mut extra, body) = Self::infer_request(request)?;
            extra.push((
                HeaderName::from_static("accept"),
                HeaderValue::from_static("text/event-stream"),
            ));
            let response = self.open(caller, Method::POST, &path, &extra, body).await?;
            let events = response
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            if !events {
                // One answer (text through a processor, or an error).
                let (answer, _) = answered(collect(response).await?)?;
                let _ = tx
                    .send(Ok(ModelStreamInferResponse {
                        error_message: String::new(),
                        infer_response: Some(answer),
                    }))
                    .await;
                return Ok(());
            }
            let mut body = response.into_body().into_data_stream();
            let mut pending = Vec::new();
            while let Some(frame) = tokio_stream::StreamExt::next(&mut body).await {
                let frame =
                    frame.map_err(|e| Status::internal(format!("reading the answer: {e}")))?;
                pending.extend_from_slice(&frame);
                while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
                    let event: Vec<u8> = pending.drain(..end + 2).collect();
                    let Some(data) = event.strip_prefix(b"data: ") else {
                        continue;
                    };
                    let data = Bytes::copy_from_slice(data.trim_ascii_end());
                    let message = match serde_json::from_slice::<serde_json::Value>(&data) {
                        Ok(v) if v["error"].is_string() => failed(Status::internal(
                            v["error"].as_str().unwrap_or_default().to_owned(),
                        )),
                        _ => match convert::from_http(&data, None) {
                            Ok(answer) => ModelStreamInferResponse {
                                error_message: String::new(),
                                infer_response: Some(answer),
                            },
                            Err(e) => failed(Status::internal(e.0)),
                        },
                    };
                    if tx.send(Ok(message)).await.is_err() {
                        // The client went away: dropping the body stops the model.
                        return Ok(());
                    }
                }
            }
            Ok::<(), Status>(())
        };
        if let Err(status) = sent.await {
            let _ = tx.send(Ok(failed(status))).await;
        }
    }
}

/// Reads a whole answer.
async fn collect(response: axum::response::Response) -> Result<Answer, Status> {
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| Status::internal(format!("reading the answer: {e}")))?;
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// An inference answer as the gRPC response, or its error.
fn answered(answer: Answer) -> Result<(ModelInferResponse, MetadataMap), Status> {
    if answer.status != StatusCode::OK {
        return Err(answer.error());
    }
    let header_length = match answer.headers.get("inference-header-content-length") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .ok_or_else(|| Status::internal("the answer's header length is not a number"))?,
        ),
        None => None,
    };
    let response = convert::from_http(&answer.body, header_length)
        .map_err(|e| Status::internal(format!("reading the answer: {}", e.0)))?;
    Ok((response, answer.metadata()))
}

fn with_metadata<T>(message: T, metadata: MetadataMap) -> Response<T> {
    let mut response = Response::new(message);
    *response.metadata_mut() = metadata;
    response
}

/// The answer stream of `ModelStreamInfer`.
pub type InferStream =
    Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl GrpcInferenceService for Inference {
    async fn server_live(
        &self,
        request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        let (live, metadata) = self.flag(&request, "/v2/health/live", "live").await?;
        Ok(with_metadata(ServerLiveResponse { live }, metadata))
    }

    async fn server_ready(
        &self,
        request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let (ready, metadata) = self.flag(&request, "/v2/health/ready", "ready").await?;
        Ok(with_metadata(ServerReadyResponse { ready }, metadata))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let caller = Caller::of(&request);
        let asked = request.into_inner();
        let path = format!("{}/ready", model_path(&asked.name, &asked.version)?);
        let answer = self.get(&caller, &path).await?;
        let metadata = answer.metadata();
        // Not ready, or no such model (as Triton and the HTTP client say): false.
        let ready = match answer.status.as_u16() {
            200 => true,
            503 | 404 => false,
            _ => return Err(answer.error()),
        };
        Ok(with_metadata(ModelReadyResponse { ready }, metadata))
    }

    async fn server_metadata(
        &self,
        request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        let answer = self.get(&Caller::of(&request), "/v2").await?;
        let metadata = answer.metadata();
        let v = answer.json()?;
        let text = |key: &str| v[key].as_str().unwrap_or_default().to_owned();
        Ok(with_metadata(
            ServerMetadataResponse {
                name: text("name"),
                version: text("version"),
                extensions: convert::strings(&v["extensions"]),
            },
            metadata,
        ))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let caller = Caller::of(&request);
        let asked = request.into_inner();
        let path = model_path(&asked.name, &asked.version)?;
        let answer = self.get(&caller, &path).await?;
        let metadata = answer.metadata();
        let v = answer.json()?;
        Ok(with_metadata(convert::model_metadata(&v), metadata))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let caller = Caller::of(&request);
        let (response, metadata) = self.infer(&caller, request.into_inner()).await?;
        Ok(with_metadata(response, metadata))
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<InferStream>, Status> {
        let caller = Caller::of(&request);
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_IN_FLIGHT);
        let this = self.clone();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(STREAM_IN_FLIGHT));
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let next = tokio::select! {
                    next = inbound.message() => next,
                    () = tx.closed() => break,
                };
                let asked = match next {
                    Ok(Some(asked)) => asked,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!("a ModelStreamInfer stream ended: {status}");
                        break;
                    }
                };
                let (this, caller, tx) = (this.clone(), caller.clone(), tx.clone());
                tokio::spawn(async move {
                    // An error answers its request; the stream goes on.
                    this.infer_chunks(&caller, asked, &tx).await;
                    drop(slot);
                });
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_map_to_the_grpc_codes_clients_expect() {
        assert_eq!(code_of(StatusCode::BAD_REQUEST), Code::InvalidArgument);
        assert_eq!(code_of(StatusCode::UNAUTHORIZED), Code::Unauthenticated);
        assert_eq!(code_of(StatusCode::NOT_FOUND), Code::NotFound);
        assert_eq!(
            code_of(StatusCode::TOO_MANY_REQUESTS),
            Code::ResourceExhausted
        );
        assert_eq!(code_of(StatusCode::SERVICE_UNAVAILABLE), Code::Unavailable);
        assert_eq!(code_of(StatusCode::GATEWAY_TIMEOUT), Code::DeadlineExceeded);
        assert_eq!(code_of(StatusCode::INTERNAL_SERVER_ERROR), Code::Internal);
    }

    #[test]
    fn model_paths_encode_what_a_path_cannot_hold() {
        assert_eq!(
            model_path("minilm", "").ok().as_deref(),
            Some("/v2/models/minilm")
        );
        assert_eq!(
            model_path("a/b", "v 2").ok().as_deref(),
            Some("/v2/models/a%2Fb/versions/v%202")
        );
        assert_eq!(
            model_path("", "").map_err(|s| s.code()).err(),
            Some(Code::InvalidArgument)
        );
    }
}
