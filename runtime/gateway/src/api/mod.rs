//! The HTTP API on axum: one router per area (control plane, invoke, OpenAI, KServe v2,
//! operations), merged here, with the shared concerns as tower layers (request ids, a
//! tracing span per request, a request timeout) and every route described by the OpenAPI
//! document that [`openapi`] returns and the server serves at `/api/v1/openapi.json`.
//!
//! Handlers are small: typed extractors in, a typed value or an [`ApiError`] out.

mod control;
mod data;
pub(crate) mod error;
mod ops;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::error_handling::HandleErrorLayer;
use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, Uri};
use axum::routing::any;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use percent_encoding::percent_decode_str;
use tower::ServiceBuilder;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(crate) use error::ApiError;
pub use error::{ErrorBody, ErrorDetail};

use crate::Gateway;

/// The state every handler shares.
type AppState = Arc<Gateway>;

/// The description of the API, to which the routers add their paths.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "wasp",
        description = "The HTTP API of wasp, a WebAssembly-extensible serverless inference \
                       runtime: the control plane (`/api/v1`), each endpoint's invoke route, \
                       OpenAI-compatible embeddings, the KServe v2 inference protocol, health \
                       and metrics. Every error is `{\"error\": {\"code\", \"message\", \
                       \"field\"}}`.",
        license(name = "Apache-2.0")
    ),
    paths(data::invoke, data::invoke_path),
    components(schemas(ErrorBody, ErrorDetail)),
    tags(
        (name = "control", description = "Endpoints, versions, components and the store"),
        (name = "invoke", description = "Each endpoint's own route, answered by its processor"),
        (name = "openai", description = "OpenAI-compatible routes"),
        (name = "kserve", description = "The KServe v2 (Open Inference Protocol) routes"),
        (name = "operations", description = "Health, metrics and this description"),
    )
)]
struct ApiDoc;

/// The routes and their description, without state or layers.
fn routes() -> OpenApiRouter<AppState> {
    let control = OpenApiRouter::new()
        .routes(routes!(control::list, control::create))
        .routes(routes!(control::get, control::replace, control::remove))
        .routes(routes!(control::stop))
        .routes(routes!(control::start))
        .routes(routes!(control::logs))
        .routes(routes!(control::upload_component))
        .routes(routes!(control::download_component))
        .routes(routes!(control::snapshot));
    let data = OpenApiRouter::new()
        // Any method: the processor sees it. Described as `data::invoke` and
        // `data::invoke_path` in `ApiDoc`.
        .route("/endpoints/{name}/invoke", any(data::invoke))
        .route("/endpoints/{name}/invoke/{*path}", any(data::invoke_path))
        .routes(routes!(data::embeddings))
        .routes(routes!(data::kserve_infer))
        .routes(routes!(data::kserve_ready))
        .routes(routes!(data::kserve_metadata));
    let operations = OpenApiRouter::new()
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(control)
        .merge(data)
        .merge(operations)
}

/// The OpenAPI document of every route (what `/api/v1/openapi.json` serves).
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().split_for_parts().1
}

/// The whole API with its layers, ready to serve.
pub(crate) fn router(gateway: AppState, request_timeout: Duration) -> Router {
    let (router, doc) = routes().split_for_parts();
    ops::DOCUMENT.get_or_init(|| Bytes::from(doc.to_pretty_json().unwrap_or_default()));
    router
        .fallback(|method: Method, uri: Uri| async move { ApiError::no_route(&method, &uri) })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::method_not_allowed(&method, &uri)
        })
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::x_request_id(NewRequestId))
                .layer(TraceLayer::new_for_http().make_span_with(span))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(HandleErrorLayer::new(|e: tower::BoxError| async move {
                    if e.is::<tower::timeout::error::Elapsed>() {
                        ApiError::new(504, "request_timeout", "the request took too long")
                    } else {
                        ApiError::new(500, "internal", e.to_string())
                    }
                }))
                .timeout(request_timeout),
        )
        .with_state(gateway)
}

/// A tracing span per request, named by its method, path and request id.
fn span(request: &axum::http::Request<Body>) -> tracing::Span {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %id,
    )
}

/// Request ids for requests that come without one: 128 random bits in hex.
#[derive(Clone, Copy)]
struct NewRequestId;

impl MakeRequestId for NewRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let id = format!("{:032x}", rand::random::<u128>());
        HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

/// An endpoint name from the path, percent-decoded; 400 when it is not UTF-8.
pub(crate) struct Name(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Name {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(400, "invalid_path", e.body_text()))?;
        let raw = params
            .iter()
            .find(|(key, _)| *key == "name")
            .map(|(_, value)| value)
            .unwrap_or("");
        decode(raw).map(Name)
    }
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

/// A request body read whole under a limit; 413 naming the limit when larger.
pub(crate) struct Payload<const LIMIT: u64>(pub Bytes);

impl<S: Send + Sync, const LIMIT: u64> FromRequest<S> for Payload<LIMIT> {
    type Rejection = ApiError;

    async fn from_request(request: Request, _: &S) -> Result<Self, ApiError> {
        read_body(request.into_body(), LIMIT, "this route's limit")
            .await
            .map(Payload)
    }
}

/// Reads a body of at most `limit` bytes; 413 naming `what` when larger.
pub(crate) async fn read_body(body: Body, limit: u64, what: &str) -> Result<Bytes, ApiError> {
    match Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::body_too_large(limit, what))
        }
        Err(e) => Err(ApiError::new(
            400,
            "bad_body",
            format!("cannot read request body: {e}"),
        )),
    }
}

/// The API reference page (`docs/api.md`), generated from the OpenAPI document: every
/// operation by area, with its parameters and answers.
pub fn reference(doc: &utoipa::openapi::OpenApi) -> String {
    use std::fmt::Write;
    let mut out = String::from(
        "# wasp HTTP API\n\nGenerated from the OpenAPI document that the server serves at \
         `/api/v1/openapi.json` (a copy is `docs/openapi.json`); a test fails when either \
         differs from the code. Every error is `{\"error\": {\"code\", \"message\", \
         \"field\"}}`.\n",
    );
    let tags = doc.tags.clone().unwrap_or_default();
    for tag in tags {
        let _ = write!(
            out,
            "\n## {}\n\n{}\n\n",
            tag.name,
            tag.description.unwrap_or_default()
        );
        out.push_str("| method | path | what | answers |\n| --- | --- | --- | --- |\n");
        for (path, item) in &doc.paths.paths {
            let operations = [
                ("GET", &item.get),
                ("POST", &item.post),
                ("PUT", &item.put),
                ("DELETE", &item.delete),
                ("PATCH", &item.patch),
            ];
            for (method, operation) in operations {
                let Some(op) = operation else { continue };
                if !op.tags.as_ref().is_some_and(|t| t.contains(&tag.name)) {
                    continue;
                }
                let what = op
                    .summary
                    .clone()
                    .or_else(|| op.description.clone())
                    .unwrap_or_default()
                    .replace('\n', " ");
                let answers: Vec<&str> =
                    op.responses.responses.keys().map(String::as_str).collect();
                let _ = writeln!(
                    out,
                    "| {method} | `{path}` | {what} | {} |",
                    answers.join(", ")
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/openapi.json` and `docs/api.md` are what the code describes; run with
    /// `WASP_UPDATE_DOCS=1` to write them after changing the API.
    #[test]
    fn checked_in_documents_match_the_code() {
        let doc = openapi();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
        let expected = [
            ("openapi.json", doc.to_pretty_json().unwrap() + "\n"),
            ("api.md", reference(&doc)),
        ];
        for (file, text) in expected {
            let path = root.join(file);
            if std::env::var_os("WASP_UPDATE_DOCS").is_some() {
                std::fs::write(&path, &text).unwrap();
            }
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == text,
                "docs/{file} differs from the code: run `WASP_UPDATE_DOCS=1 cargo test -p \
                 wasp-gateway checked_in_documents` and commit it"
            );
        }
    }

    #[test]
    fn every_operation_is_described() {
        let doc = openapi();
        assert!(matches!(
            doc.openapi,
            utoipa::openapi::OpenApiVersion::Version31
        ));
        for (path, item) in &doc.paths.paths {
            for op in [&item.get, &item.post, &item.put, &item.delete, &item.patch]
                .into_iter()
                .flatten()
            {
                assert!(op.tags.is_some(), "{path} has no tag");
                assert!(
                    !op.responses.responses.is_empty(),
                    "{path} has no responses"
                );
                assert!(
                    op.description.is_some() || op.summary.is_some(),
                    "{path} is not described"
                );
            }
        }
    }
}
