//! The web console at `/ui`: the assets `wasp-console` embeds, gzip-compressed for the
//! browsers that take it, with headers that keep the page to its own origin. The console
//! speaks only the public API, with the key its user gives it.

use axum::extract::Path;
use axum::http::header::{
    ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_SECURITY_POLICY, CONTENT_TYPE, VARY,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use super::ApiError;

/// What the page may load and reach: its own origin only.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                      img-src 'self' data:; connect-src 'self'; font-src 'self'; \
                      base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `/ui` without the slash: the page's relative asset paths need it.
pub(crate) async fn root() -> Redirect {
    Redirect::permanent("/ui/")
}

/// The console's page.
pub(crate) async fn page(headers: HeaderMap) -> Response {
    serve("", &headers)
}

/// One of the console's assets.
pub(crate) async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&path, &headers)
}

fn serve(path: &str, headers: &HeaderMap) -> Response {
    let Some(asset) = wasp_console::asset(path) else {
        if path.is_empty() {
            return ApiError::new(
                404,
                "console_not_built",
                "this wasp was built without its console: run `./x build` (it builds \
                 console/ with npm), then build wasp again",
            )
            .into_response();
        }
        return ApiError::new(
            404,
            "not_found",
            format!("the console has no file `{path}`"),
        )
        .into_response();
    };
    let gzip_ok = headers
        .get(ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let (body, gzipped) = match asset.gzip {
        Some(gz) if gzip_ok => (gz, true),
        _ => (asset.bytes, false),
    };
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(VARY, HeaderValue::from_static("accept-encoding"));
    if gzipped {
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static(if asset.immutable() {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    response
}
