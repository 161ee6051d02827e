//! OpenAI-compatible text generation: `POST /v1/chat/completions`, `POST /v1/completions`
//! and `GET /v1/models`.
//!
//! `model` names the caller's endpoint; its processor (the `chat` processor, say) turns the
//! request into token ids, and the backend's tokens back into OpenAI answers: one JSON
//! object, or with `stream: true` server-sent events (`data: {...}` chunks, then
//! `data: [DONE]`) written as the tokens come. Errors on these routes have OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, which OpenAI's clients read.

use axum::extract::State;
use axum::http::header::{CONTENT_TYPE, HeaderValue};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::data::{MAX_OPENAI_BYTES, openai};
use super::error::json;
use super::{ApiError, AppState, Payload, RequestId, Who};
use crate::tenants::local_name;

/// An OpenAI chat completion request (the fields wasp's router reads; the processor reads
/// the rest: `messages`, `max_tokens`, `temperature`, `top_p`, `stop`, `seed`, `stream`,
/// `stream_options`...). Only its description is used.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ChatCompletionRequest {
    /// The endpoint that serves it.
    pub model: String,
    /// The conversation: `{"role", "content"}` objects.
    #[schema(value_type = Vec<Object>)]
    pub messages: Value,
    /// Answer as server-sent events, a chunk per token.
    pub stream: Option<bool>,
}

/// An OpenAI (legacy) completion request: `prompt` instead of `messages`. Only its
/// description is used.
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct CompletionRequest {
    /// The endpoint that serves it.
    pub model: String,
    /// The text to continue.
    pub prompt: String,
    /// Answer as server-sent events, a chunk per token.
    pub stream: Option<bool>,
}

/// OpenAI's error body.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct OpenAiErrorBody {
    /// What went wrong.
    pub error: OpenAiError,
}

/// What went wrong, as OpenAI describes it.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct OpenAiError {
    /// What happened, for a person.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `permission_error`,
    /// `not_found_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault (`messages`, `temperature`), when there is one.
    pub param: Option<String>,
    /// wasp's code for the error (`invalid_field`, `busy`...).
    pub code: Option<String>,
}

fn kind_of(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// Rewrites an error answer of wasp's shape (`{"error": {"code", "message", "field"}}`)
/// into OpenAI's; other answers pass unchanged.
async fn openai_shaped(response: Response) -> Response {
    let status = response.status();
    if status.as_u16() < 400 {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return (status, "").into_response();
    };
    #[derive(Deserialize)]
    struct Wasp {
        error: WaspDetail,
    }
    #[derive(Deserialize)]
    struct WaspDetail {
        code: String,
        message: String,
        field: Option<String>,
    }
    let Ok(wasp) = serde_json::from_slice::<Wasp>(&bytes) else {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    };
    let body = OpenAiErrorBody {
        error: OpenAiError {
            message: wasp.error.message,
            kind: kind_of(status.as_u16()).to_owned(),
            param: wasp.error.field,
            code: Some(wasp.error.code),
        },
    };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Response::from_parts(
        parts,
        axum::body::Body::from(serde_json::to_vec(&body).unwrap_or_default()),
    )
}

async fn generate(
    gateway: AppState,
    caller: crate::tenants::Caller,
    id: Option<axum::Extension<RequestId>>,
    headers: HeaderMap,
    body: bytes::Bytes,
    path: &str,
) -> Response {
    let response = match openai(gateway, caller, id, headers, body, path).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    openai_shaped(response).await
}

/// OpenAI chat completions: `model` names the endpoint, whose processor sees the request
/// at path `/v1/chat/completions`.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A `chat.completion`, or with `stream: true` `text/event-stream` of `chat.completion.chunk` events ending `data: [DONE]`", body = Object),
        (status = 400, description = "Not JSON, no `model`, or a bad parameter (`param` names it)", body = OpenAiErrorBody),
        (status = 404, description = "No endpoint of that name", body = OpenAiErrorBody),
        (status = 413, description = "Over the version's `limits.max_body_bytes`", body = OpenAiErrorBody),
        (status = 429, description = "Busy; retry after `Retry-After`", body = OpenAiErrorBody),
        (status = 503, description = "Stopped, or failed to load", body = OpenAiErrorBody),
    ))]
pub(crate) async fn chat_completions(
    State(gateway): State<AppState>,
    Who(caller): Who,
    id: Option<axum::Extension<RequestId>>,
    headers: HeaderMap,
    Payload(body): Payload<MAX_OPENAI_BYTES>,
) -> Response {
    generate(gateway, caller, id, headers, body, "/v1/chat/completions").await
}

/// OpenAI (legacy) completions: `model` names the endpoint, whose processor sees the
/// request at path `/v1/completions`.
#[utoipa::path(post, path = "/v1/completions", tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "A `text_completion`, or with `stream: true` `text/event-stream` events ending `data: [DONE]`", body = Object),
        (status = 400, description = "Not JSON, no `model`, or a bad parameter (`param` names it)", body = OpenAiErrorBody),
        (status = 404, description = "No endpoint of that name", body = OpenAiErrorBody),
        (status = 413, description = "Over the version's `limits.max_body_bytes`", body = OpenAiErrorBody),
        (status = 429, description = "Busy; retry after `Retry-After`", body = OpenAiErrorBody),
        (status = 503, description = "Stopped, or failed to load", body = OpenAiErrorBody),
    ))]
pub(crate) async fn completions(
    State(gateway): State<AppState>,
    Who(caller): Who,
    id: Option<axum::Extension<RequestId>>,
    headers: HeaderMap,
    Payload(body): Payload<MAX_OPENAI_BYTES>,
) -> Response {
    generate(gateway, caller, id, headers, body, "/v1/completions").await
}

/// One model in `GET /v1/models`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelEntry {
    /// The endpoint's name (what `model` takes).
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// When the model was created, in seconds since the epoch: 0, as wasp does not keep it
    /// (OpenAI's clients require the field).
    pub created: u64,
    /// The tenant that owns it.
    pub owned_by: String,
}

/// `GET /v1/models`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The caller's endpoints.
    pub data: Vec<ModelEntry>,
}

/// The caller's endpoints, as OpenAI lists models.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses(
        (status = 200, description = "The caller's endpoints", body = ModelList),
        (status = 401, description = "No API key", body = OpenAiErrorBody),
    ))]
pub(crate) async fn models(State(gateway): State<AppState>, Who(caller): Who) -> Response {
    if caller.role.is_none() {
        let e = ApiError::new(401, "missing_api_key", super::auth::NEEDS_KEY);
        return openai_shaped(e.into_response()).await;
    }
    let data = gateway
        .endpoints()
        .iter()
        .filter(|d| caller.sees(&d.spec.name))
        .map(|d| ModelEntry {
            id: local_name(&d.spec.name).to_owned(),
            object: "model",
            created: 0,
            owned_by: crate::tenants::tenant_of(&d.spec.name).to_owned(),
        })
        .collect();
    json(
        StatusCode::OK,
        &ModelList {
            object: "list",
            data,
        },
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[tokio::test]
    async fn wasp_errors_become_openai_errors() {
        let e = ApiError::new(400, "invalid_field", "temperature must be between 0 and 2")
            .with_field("temperature");
        let response = openai_shaped(e.into_response()).await;
        assert_eq!(response.status(), 400);
        let bytes = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: OpenAiErrorBody = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body.error.kind, "invalid_request_error");
        assert_eq!(body.error.param.as_deref(), Some("temperature"));
        assert_eq!(body.error.code.as_deref(), Some("invalid_field"));
        // Answers that are not errors pass as they are.
        let ok = openai_shaped((StatusCode::OK, "hi").into_response()).await;
        let bytes = axum::body::to_bytes(ok.into_body(), 4096).await.unwrap();
        assert_eq!(&bytes[..], b"hi");
    }
}
