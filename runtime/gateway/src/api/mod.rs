//! The HTTP API on axum: one router per area (control plane, invoke, OpenAI, KServe v2,
//! operations), merged here, with the shared concerns of every request around it (request
//! ids, a tracing span per request, a request timeout; see [`App::serve`]) and every route
//! described by the OpenAPI document that [`openapi`] returns and the server serves at
//! `/api/v1/openapi.json`.
//!
//! Handlers are small: typed extractors in, a typed value or an [`ApiError`] out.

mod access;
pub(crate) mod auth;
mod batches;
mod control;
pub(crate) mod data;
pub(crate) mod error;
mod history;
mod jobs;
mod kserve;
mod openai;
mod ops;
mod ui;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use percent_encoding::percent_decode_str;
use tower::ServiceExt;
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub(crate) use error::ApiError;
pub use error::{ErrorBody, ErrorDetail};
pub(crate) use jobs::status_of as job_status;

use crate::Gateway;
use crate::tenants::Caller;

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
                       \"field\"}}`. Every route but `/healthz` and this document takes an \
                       API key as `Authorization: Bearer <key>` (a public endpoint's data \
                       routes take none); `/t/{tenant}` before any path acts in that tenant.",
        license(name = "Apache-2.0")
    ),
    paths(data::invoke, data::invoke_path),
    modifiers(&BearerKeys),
    components(schemas(ErrorBody, ErrorDetail, kserve::ProtocolError)),
    tags(
        (name = "control", description = "Endpoints, versions, components and the store"),
        (name = "invoke", description = "Each endpoint's own route, answered by its processor"),
        (name = "jobs", description = "Durable async jobs of every endpoint"),
        (name = "openai", description = "OpenAI-compatible routes"),
        (name = "kserve", description = "The KServe v2 (Open Inference Protocol) routes"),
        (name = "access", description = "Tenants, API keys, registry logins and who a key is"),
        (name = "operations", description = "Health, metrics and this description"),
    )
)]
struct ApiDoc;

/// Declares the API keys every route but the open ones takes.
struct BearerKeys;

impl utoipa::Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("wasp_<id>_<secret>")
                    .description(Some(
                        "An API key: `wasp key create`, or DATA_DIR/operator.key after the \
                         first start",
                    ))
                    .build(),
            ),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "api_key",
            Vec::<String>::new(),
        )]);
    }
}

/// Documents the answers every route that takes a key may give (`401`, `403`), and marks
/// the open routes as taking none; run on the whole document, once every router added its
/// paths.
fn document_keys(openapi: &mut utoipa::openapi::OpenApi) {
    let error = |description: &str, schema: &str| {
        utoipa::openapi::ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(utoipa::openapi::Ref::from_schema_name(schema)))
                    .build(),
            )
            .build()
    };
    for (path, item) in openapi.paths.paths.iter_mut() {
        let open = matches!(path.as_str(), "/healthz" | "/api/v1/openapi.json");
        // KServe v2 routes answer errors in the protocol's own shape.
        let schema = if kserve::is_v2(path) {
            "ProtocolError"
        } else {
            "ErrorBody"
        };
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
            &mut item.head,
            &mut item.options,
            &mut item.trace,
        ]
        .into_iter()
        .flatten()
        {
            if open {
                // No key needed: an empty requirement.
                op.security = Some(vec![
                    utoipa::openapi::security::SecurityRequirement::default(),
                ]);
                continue;
            }
            let responses = &mut op.responses.responses;
            responses.entry("401".into()).or_insert_with(|| {
                error(
                    "No API key (unless the endpoint is public), or not a valid one",
                    schema,
                )
                .into()
            });
            responses
                .entry("403".into())
                .or_insert_with(|| error("The key's role may not use this route", schema).into());
        }
    }
}

/// The routes and their description, without state or layers.
fn routes() -> OpenApiRouter<AppState> {
    let control = OpenApiRouter::new()
        .routes(routes!(control::list, control::create))
        .routes(routes!(control::get, control::replace, control::remove))
        .routes(routes!(control::stop))
        .routes(routes!(control::start))
        .routes(routes!(control::logs))
        .routes(routes!(control::records))
        .routes(routes!(control::record_file))
        .routes(routes!(control::events))
        .routes(routes!(history::metrics))
        .routes(routes!(control::webhook_secret))
        .routes(routes!(control::rotate_webhook_secret))
        .routes(routes!(control::upload_component))
        .routes(routes!(control::download_component))
        .routes(routes!(control::snapshot));
    let data = OpenApiRouter::new()
        // Any method: the processor sees it. Described as `data::invoke` and
        // `data::invoke_path` in `ApiDoc`.
        .route(data::INVOKE, any(data::invoke))
        .route(data::INVOKE_BELOW, any(data::invoke_path))
        .routes(routes!(data::embeddings))
        .routes(routes!(openai::chat_completions))
        .routes(routes!(openai::completions))
        .routes(routes!(openai::models))
        .routes(routes!(kserve::server_live))
        .routes(routes!(kserve::server_ready))
        .routes(routes!(kserve::server_metadata))
        .routes(routes!(kserve::infer))
        .routes(routes!(kserve::version_infer))
        .routes(routes!(kserve::model_ready))
        .routes(routes!(kserve::version_ready))
        .routes(routes!(kserve::model_metadata))
        .routes(routes!(kserve::version_metadata))
        .routes(routes!(jobs::run))
        .routes(routes!(jobs::runsync))
        .routes(routes!(jobs::status))
        .routes(routes!(jobs::result))
        .routes(routes!(jobs::stream))
        .routes(routes!(jobs::cancel))
        .routes(routes!(jobs::retry))
        .routes(routes!(jobs::purge))
        .routes(routes!(jobs::health))
        .routes(routes!(jobs::list))
        .routes(routes!(jobs::get))
        .routes(routes!(batches::submit, batches::list))
        .routes(routes!(batches::get))
        .routes(routes!(batches::output))
        .routes(routes!(batches::pause))
        .routes(routes!(batches::resume))
        .routes(routes!(batches::cancel));
    let access = OpenApiRouter::new()
        .routes(routes!(access::whoami))
        .routes(routes!(access::list_tenants, access::create_tenant))
        .routes(routes!(access::remove_tenant))
        .routes(routes!(access::set_policy))
        .routes(routes!(access::set_quota))
        .routes(routes!(access::usage))
        .routes(routes!(access::audit))
        .routes(routes!(access::list_keys, access::create_key))
        .routes(routes!(access::revoke_key))
        .routes(routes!(access::list_registries))
        .routes(routes!(access::set_registry, access::remove_registry))
        .routes(routes!(access::nodes));
    let operations = OpenApiRouter::new()
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::metrics))
        .routes(routes!(ops::openapi));
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(control)
        .merge(data)
        .merge(access)
        .merge(operations)
}

/// The OpenAPI document of every route (what `/api/v1/openapi.json` serves).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = routes().split_for_parts().1;
    document_keys(&mut doc);
    doc
}

/// The whole API, ready to serve: the routes, and around them the shared concerns of
/// every request.
#[derive(Clone)]
pub(crate) struct App {
    gateway: AppState,
    router: Router,
    request_timeout: Duration,
    /// Plain HTTP beyond loopback with no TLS proxy in front: keys from other addresses
    /// are refused.
    plain_keys_refused: bool,
}

/// The whole API with its shared concerns, ready to serve.
pub(crate) fn app(gateway: AppState, request_timeout: Duration, plain_keys_refused: bool) -> App {
    let (router, mut doc) = routes().split_for_parts();
    document_keys(&mut doc);
    ops::DOCUMENT.get_or_init(|| Bytes::from(doc.to_pretty_json().unwrap_or_default()));
    let router = router
        .route("/ui", axum::routing::get(ui::root))
        .route("/ui/", axum::routing::get(ui::page))
        .route("/ui/{*path}", axum::routing::get(ui::asset))
        .fallback(|method: Method, uri: Uri| async move { ApiError::no_route(&method, &uri) })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::method_not_allowed(&method, &uri)
        })
        .with_state(gateway.clone());
    App {
        gateway,
        router,
        request_timeout,
        plain_keys_refused,
    }
}

impl App {
    /// Answers one request: gives it a request id (`x-request-id`, kept when the client
    /// sent one, else 128 random bits in hex) that the response carries, runs it in a
    /// tracing span named by its method, path and id, and answers 504 `request_timeout`
    /// when it outlasts the server's request timeout.
    ///
    /// One hand-written step instead of tower-http's request-id, trace and timeout layers
    /// around every route: measured in-process, those cost about 1.9 µs a request against
    /// about 6 µs for routing, the handler and a trivial processor together.
    pub(crate) async fn serve<B>(self, request: axum::http::Request<B>) -> Response
    where
        B: axum::body::HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        // A generated id is not added to the request: every header a processor sees is
        // copied into its memory, and the id is in the span of everything logged for it.
        let id = match request.headers().get(REQUEST_ID) {
            Some(id) => id.clone(),
            None => new_request_id(),
        };
        let span = tracing::info_span!(
            "request",
            method = %request.method(),
            path = %request.uri().path(),
            request_id = %String::from_utf8_lossy(id.as_bytes()),
        );
        let started = std::time::Instant::now();
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(RequestId(id.clone()));
        let gateway = self.gateway.clone();
        let audited = crate::audit::audited(request.method(), request.uri().path());
        let v2 = kserve::is_v2(request.uri().path());
        let mut change = None;
        let changes = &mut change;
        let call = async move {
            if self.plain_keys_refused && exposes_key(&request) {
                return Ok(ApiError::new(
                    403,
                    "insecure_transport",
                    "this server takes API keys over plain HTTP from loopback clients only: \
                     use its HTTPS address (`wasp serve --tls-cert/--tls-key`), or start it \
                     with --behind-tls-proxy when a proxy in front encrypts the traffic",
                )
                .into_response());
            }
            if let Err(refused) = auth::authenticate(&self.gateway, &mut request) {
                return Ok(*refused);
            }
            if audited {
                // The path without its `/t/{tenant}` prefix, and who calls.
                *changes = Some((
                    auth::caller_in(request.extensions()),
                    request.method().to_string(),
                    request.uri().path().to_owned(),
                ));
            }
            // The data path's hot route goes straight to its handler, skipping the
            // router's per-request allocations; the router still answers every other
            // path, and would route these the same way.
            if let Some(raw) = data::invoke_target(request.uri().path()) {
                let caller = auth::caller_in(request.extensions());
                let response =
                    match decode(raw).and_then(|name| resolve(&self.gateway, &caller, &name)) {
                        Ok(name) => data::invoke(State(self.gateway), Name(name), request).await,
                        Err(e) => Err(e),
                    };
                return Ok(response.into_response());
            }
            self.router.oneshot(request).await
        };
        let mut response = match tokio::time::timeout(self.request_timeout, call)
            .instrument(span.clone())
            .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(never)) => match never {},
            Err(_) => {
                ApiError::new(504, "request_timeout", "the request took too long").into_response()
            }
        };
        if v2 {
            // The protocol's error shape, whoever answered (auth, routing, the handler).
            response = kserve::protocol_error(response).await;
        }
        let status = response.status().as_u16();
        if let Some((caller, method, path)) = change {
            // Durable before the answer goes out.
            let request_id = String::from_utf8_lossy(id.as_bytes()).into_owned();
            let written = tokio::task::spawn_blocking(move || {
                gateway
                    .audit
                    .append(&gateway.store, &caller, &method, &path, status, &request_id)
            })
            .await;
            let failed = match written {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(e) = failed {
                span.in_scope(|| tracing::error!("cannot write the audit log: {e}"));
            }
        }
        response.headers_mut().insert(REQUEST_ID, id);
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        span.in_scope(|| {
            if status == 500 {
                tracing::error!(status, latency_ms, "request failed");
            } else if status > 500 {
                tracing::warn!(status, latency_ms, "request not served");
            } else {
                tracing::debug!(status, latency_ms, "request done");
            }
        });
        response
    }
}

/// Whether a request carries a key from beyond loopback (over plain HTTP, which the caller
/// has established).
fn exposes_key(request: &axum::http::Request<Body>) -> bool {
    request
        .headers()
        .contains_key(axum::http::header::AUTHORIZATION)
        && !request
            .extensions()
            .get::<crate::server::ClientAddr>()
            .is_some_and(|a| a.0.ip().is_loopback())
}

/// A request's id (a request extension): the client's `x-request-id` or a new one.
#[derive(Debug, Clone)]
pub(crate) struct RequestId(pub HeaderValue);

/// The request id header, in and out.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A fresh request id: 128 random bits in hex.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = rand::random::<u128>();
    let mut text = [0u8; 32];
    for (i, byte) in text.iter_mut().enumerate() {
        *byte = HEX[((bits >> (124 - 4 * i)) & 0xf) as usize];
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// An endpoint from the path: its name percent-decoded and qualified by the caller's
/// tenant (the server's name for it). A caller without a key gets it only when the
/// endpoint is public (else 401, whether it exists or not).
pub(crate) struct Name(pub String);

impl FromRequestParts<AppState> for Name {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // The router has percent-decoded the captures already.
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(400, "invalid_path", e.body_text()))?;
        let name = params
            .iter()
            .find(|(key, _)| *key == "name")
            .map(|(_, value)| value)
            .unwrap_or("");
        resolve(state, &auth::caller_in(&parts.extensions), name).map(Name)
    }
}

/// The server's name for the caller's endpoint `name`; for a caller without a key, only
/// when that endpoint is public.
pub(crate) fn resolve(gateway: &Gateway, caller: &Caller, name: &str) -> Result<String, ApiError> {
    let qualified = caller.qualify(name);
    if caller.role.is_none() && !gateway.endpoint(&qualified).is_some_and(|d| d.spec.public) {
        return Err(ApiError::new(401, "missing_api_key", auth::NEEDS_KEY));
    }
    Ok(qualified)
}

/// The caller of a request (see [`auth`]).
pub(crate) struct Who(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        Ok(Who(auth::caller_in(&parts.extensions)))
    }
}

/// Percent-decodes a raw path segment; 400 when it is not UTF-8.
pub(crate) fn decode(segment: &str) -> Result<String, ApiError> {
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

    #[tokio::test]
    async fn keys_over_plain_http_from_beyond_loopback_are_refused_when_no_proxy_encrypts() {
        let dir = tempfile::tempdir().unwrap();
        let gateway = Gateway::open(
            dir.path(),
            wasp_wasm::RuntimeConfig {
                pooling: false,
                ..Default::default()
            },
            wasp_backend::Registry::default(),
            dir.path().join("models"),
            Arc::default(),
            &[],
            &[],
            None,
        )
        .await
        .unwrap();
        let call = |refusing: bool, from: &str, key: bool| {
            let app = app(gateway.clone(), Duration::from_secs(5), refusing);
            let mut request = axum::http::Request::builder().uri("/api/v1/whoami");
            if key {
                request = request.header("authorization", "Bearer wasp_0_x");
            }
            let mut request = request.body(Body::empty()).unwrap();
            request
                .extensions_mut()
                .insert(crate::server::ClientAddr(from.parse().unwrap()));
            async move {
                let response = app.serve(request).await;
                let status = response.status().as_u16();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
                (
                    status,
                    body["error"]["code"].as_str().unwrap_or("").to_owned(),
                )
            }
        };
        let refused = call(true, "192.0.2.7:40000", true).await;
        assert_eq!(refused, (403, "insecure_transport".to_owned()));
        // From loopback, behind a proxy, or without a key: on to authentication.
        let checked = (401, "invalid_api_key".to_owned());
        assert_eq!(call(true, "127.0.0.1:40000", true).await, checked);
        assert_eq!(call(false, "192.0.2.7:40000", true).await, checked);
        assert_eq!(
            call(true, "192.0.2.7:40000", false).await,
            (401, "missing_api_key".to_owned())
        );
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
