//! The API's one error type: every failure is answered as
//! `{"error": {"code", "message", "field"}}` with its status, and `Retry-After` where waiting
//! helps.

use axum::extract::rejection::QueryRejection;
use axum::http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use wasp_backend::BackendError;
use wasp_wasm::CallError;

use crate::Error;

/// The body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A short machine-readable code (`endpoint_not_found`, `invalid_field`, `busy`...).
    pub code: String,
    /// What happened, for a person.
    pub message: String,
    /// The field at fault (`versions[1].weight`, `input`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error answered as [`ErrorBody`].
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: bool,
    /// Headers the answer carries besides `Retry-After` (rate-limit headers).
    pub headers: Option<Box<axum::http::HeaderMap>>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: false,
            headers: None,
        }
    }

    /// Says to retry after `wait` (`Retry-After` in whole seconds, at least 1).
    pub fn retry_after(mut self, wait: std::time::Duration) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        self.retry_after = true;
        self.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
        self
    }

    /// The extra headers of the answer, to add to.
    pub fn headers_mut(&mut self) -> &mut axum::http::HeaderMap {
        self.headers.get_or_insert_with(Default::default)
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// 404 for a path no route serves.
    pub fn no_route(method: &Method, uri: &Uri) -> Self {
        Self::new(
            404,
            "route_not_found",
            format!("no route for {method} {}", uri.path()),
        )
    }

    /// 405 for a method a route does not serve.
    pub fn method_not_allowed(method: &Method, uri: &Uri) -> Self {
        Self::new(
            405,
            "method_not_allowed",
            format!("{method} is not allowed on {}", uri.path()),
        )
    }

    /// 413 naming the limit (`what` says which).
    pub fn body_too_large(limit: u64, what: &str) -> Self {
        Self::new(
            413,
            "body_too_large",
            format!("request body exceeds the limit of {limit} bytes ({what})"),
        )
    }

    /// 413 naming a version's `limits.max_body_bytes`.
    pub fn version_body_limit(limit: u64) -> Self {
        Self::new(
            413,
            "body_too_large",
            format!("request body exceeds this version's limit of {limit} bytes"),
        )
        .with_field("limits.max_body_bytes")
    }

    /// A backend failure.
    pub fn backend(e: &BackendError) -> Self {
        let (status, code, field) = match e {
            BackendError::BadInput { field, .. } => (400, "bad_model_input", field.clone()),
            BackendError::Unavailable(_) => (503, "backend_unavailable", None),
            _ => (500, "backend_error", None),
        };
        Self {
            field,
            ..Self::new(status, code, e.to_string())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                field: self.field,
            },
        };
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = json(status, &body);
        let headers = response.headers_mut();
        let extra = self.headers.map(|h| *h).unwrap_or_default();
        if self.retry_after && !extra.contains_key(RETRY_AFTER) {
            headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        headers.extend(extra);
        response
    }
}

/// A JSON response with `content-type: application/json`.
pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
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
            retry_after: matches!(
                e,
                Error::StoreUnavailable(_)
                    | Error::Quota {
                        quota: "queued_jobs",
                        ..
                    }
            ),
            message: e.to_string(),
            headers: None,
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
            retry_after: matches!(
                e,
                CallError::Busy { .. } | CallError::QueueTimeout { .. } | CallError::Capacity(_)
            ),
            message: e.to_string(),
            field,
            headers: None,
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::new(400, "invalid_query", e.body_text())
    }
}
