//! Batch jobs, `/api/v1/batches`: submit a JSONL input for an endpoint, follow its
//! progress, pause, resume or cancel it, and read its output.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, RawPathParams, State};
use axum::http::StatusCode;
use axum::http::header::{CONTENT_TYPE, HeaderValue};
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::error::json;
use super::{ApiError, AppState, ErrorBody, Who, read_body};
use crate::Error;
use crate::batches::{Batch, BatchState, SubmitError};
use crate::tenants::{Caller, Role, local_name};

/// Largest uploaded batch input.
const MAX_INPUT_BYTES: u64 = 1024 * 1024 * 1024;

/// How to run a batch.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BatchQuery {
    /// The endpoint that answers each line.
    pub endpoint: String,
    /// The path below the invoke route each line is sent to (default `/`).
    pub path: Option<String>,
    /// Lines in flight at most (default 32, at most 1024).
    pub concurrency: Option<u32>,
    /// Read the input from this file on the server (under a `--batch-mount` directory)
    /// instead of the body.
    pub input_path: Option<String>,
}

/// A batch's progress.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchStatus {
    /// Its id.
    pub id: String,
    /// The endpoint that answers each line.
    pub endpoint: String,
    /// `RUNNING`, `PAUSED`, `COMPLETED`, `CANCELLED` or `FAILED`.
    pub status: BatchState,
    /// Lines in the input.
    pub total: u64,
    /// Lines with an output line (succeeded or failed).
    pub done: u64,
    /// Lines the endpoint answered with success.
    pub succeeded: u64,
    /// Lines whose output line is an error.
    pub failed: u64,
    /// Lines per second while running.
    pub rate_per_s: f64,
    /// Seconds left at that rate, while running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    /// When it was submitted (ms since the Unix epoch).
    pub created_at_ms: u64,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// The output JSONL: one line per input line, in order (`{"line", "status",
    /// "output"}` or `{"line", "error"}`).
    pub output_url: String,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Batches, the newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchList {
    /// The batches.
    pub batches: Vec<BatchStatus>,
}

fn status_of(batch: &Batch) -> BatchStatus {
    let (r, ok, failed, run_ms) = batch.snapshot();
    let done = r.written + ok + failed;
    let rate = if run_ms > 0 {
        done as f64 * 1000.0 / run_ms as f64
    } else {
        0.0
    };
    BatchStatus {
        id: r.id.clone(),
        endpoint: local_name(&r.endpoint).to_owned(),
        status: r.state,
        total: r.total,
        done,
        succeeded: r.succeeded + ok,
        failed: r.failed + failed,
        rate_per_s: (rate * 10.0).round() / 10.0,
        eta_s: (r.state == BatchState::Running && rate > 0.0)
            .then(|| ((r.total.saturating_sub(done)) as f64 / rate * 10.0).round() / 10.0),
        created_at_ms: r.created_ms,
        finished_at_ms: r.finished_ms,
        output_url: format!("/api/v1/batches/{}/output", r.id),
        error: r.error.clone(),
    }
}

fn batch_id(params: &RawPathParams) -> String {
    params
        .iter()
        .find(|(k, _)| *k == "id")
        .map(|(_, v)| v.to_owned())
        .unwrap_or_default()
}

/// The caller's batch `id` (another tenant's is as absent as one that never was).
fn find(gateway: &AppState, caller: &Caller, id: &str) -> Result<Arc<Batch>, ApiError> {
    gateway
        .batches
        .get(id)
        .filter(|b| caller.sees(&b.endpoint()))
        .ok_or_else(|| ApiError::new(404, "batch_not_found", format!("no batch `{id}`")))
}

/// Submits a batch: the body is the JSONL input (one request body per line), or empty
/// with `input_path` naming a file under a `--batch-mount` directory. Every line is checked
/// first: a line that is not JSON is refused with its number, and nothing is stored.
#[utoipa::path(post, path = "/api/v1/batches", tag = "jobs",
    params(BatchQuery),
    request_body(content((Vec<u8> = "application/jsonl")), description = "One JSON request body per line"),
    responses(
        (status = 202, description = "Stored and started", body = BatchStatus),
        (status = 400, description = "A line that is not JSON (named), an empty input", body = ErrorBody),
        (status = 404, description = "No such endpoint", body = ErrorBody),
        (status = 413, description = "Over 1 GiB", body = ErrorBody),
        (status = 422, description = "A bad concurrency, path or input_path", body = ErrorBody),
    ))]
pub(crate) async fn submit(
    State(gateway): State<AppState>,
    Who(caller): Who,
    query: Result<Query<BatchQuery>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let concurrency = query.concurrency.unwrap_or(32);
    if !(1..=1024).contains(&concurrency) {
        return Err(
            ApiError::new(422, "invalid_field", "must be between 1 and 1024")
                .with_field("concurrency"),
        );
    }
    let path = query.path.unwrap_or_else(|| "/".to_owned());
    if !path.starts_with('/') {
        return Err(
            ApiError::new(422, "invalid_field", "a path starts with `/`").with_field("path"),
        );
    }
    let bytes = read_body(body, MAX_INPUT_BYTES, "the batch input limit (1 GiB)").await?;
    let (input, field) = match query.input_path {
        Some(file) => {
            if !caller.may(Role::Operator) {
                // Mounts are the host's: no tenant reads them by path.
                return Err(ApiError::new(
                    403,
                    "forbidden",
                    "only an operator key may name an input by path; upload it as the body",
                )
                .with_field("input_path"));
            }
            if !bytes.is_empty() {
                return Err(ApiError::new(
                    400,
                    "invalid_request",
                    "give the input as the body or as `input_path`, not both",
                )
                .with_field("input_path"));
            }
            (read_mounted(&gateway, &file).await?, "input_path")
        }
        None => (bytes.to_vec(), "body"),
    };
    let batch = gateway
        .submit_batch(&caller.qualify(&query.endpoint), path, concurrency, input)
        .await
        .map_err(|e| match e {
            SubmitError::Line(n, why) => {
                ApiError::new(400, "invalid_jsonl", format!("{field}, line {n}: {why}"))
                    .with_field(format!("line {n}"))
            }
            SubmitError::Empty => {
                ApiError::new(400, "invalid_jsonl", "the input has no lines").with_field(field)
            }
            SubmitError::Gateway(e) => ApiError::from(e),
        })?;
    Ok(json(StatusCode::ACCEPTED, &status_of(&batch)))
}

/// Reads a server-side input file, which must lie under a `--batch-mount` directory.
async fn read_mounted(gateway: &AppState, file: &str) -> Result<Vec<u8>, ApiError> {
    let bad = |why: String| ApiError::new(422, "invalid_field", why).with_field("input_path");
    let mounts = gateway
        .batches
        .mounts
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if mounts.is_empty() {
        return Err(bad(
            "this server reads no batch input by path (start it with --batch-mount DIR)".into(),
        ));
    }
    let path = std::path::Path::new(file)
        .canonicalize()
        .map_err(|e| bad(format!("`{file}`: {e}")))?;
    if !mounts.iter().any(|m| path.starts_with(m)) {
        return Err(bad(format!(
            "`{file}` is not under a --batch-mount directory"
        )));
    }
    tokio::fs::read(&path)
        .await
        .map_err(|e| bad(format!("`{file}`: {e}")))
}

/// Every batch, the newest first.
#[utoipa::path(get, path = "/api/v1/batches", tag = "jobs",
    responses((status = 200, description = "The batches", body = BatchList)))]
pub(crate) async fn list(
    State(gateway): State<AppState>,
    Who(caller): Who,
) -> Result<Response, ApiError> {
    let batches = gateway
        .batches
        .list()
        .iter()
        .filter(|b| caller.sees(&b.endpoint()))
        .map(|b| status_of(b))
        .collect();
    Ok(json(StatusCode::OK, &BatchList { batches }))
}

/// A batch's progress: lines done and failed of the total, rate and ETA.
#[utoipa::path(get, path = "/api/v1/batches/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Batch id")),
    responses(
        (status = 200, description = "The batch", body = BatchStatus),
        (status = 404, description = "No such batch", body = ErrorBody),
    ))]
pub(crate) async fn get(
    State(gateway): State<AppState>,
    Who(caller): Who,
    params: RawPathParams,
) -> Result<Response, ApiError> {
    let batch = find(&gateway, &caller, &batch_id(&params))?;
    Ok(json(StatusCode::OK, &status_of(&batch)))
}

/// The output JSONL so far: one line per input line done, in input order.
#[utoipa::path(get, path = "/api/v1/batches/{id}/output", tag = "jobs",
    params(("id" = String, Path, description = "Batch id")),
    responses(
        (status = 200, description = "The output lines", content_type = "application/jsonl", body = Vec<u8>),
        (status = 404, description = "No such batch", body = ErrorBody),
    ))]
pub(crate) async fn output(
    State(gateway): State<AppState>,
    Who(caller): Who,
    params: RawPathParams,
) -> Result<Response, ApiError> {
    let id = batch_id(&params);
    find(&gateway, &caller, &id)?;
    let bytes = gateway.batch_output(&id).await.map_err(ApiError::from)?;
    let mut response = Response::new(Body::from(bytes));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/jsonl"));
    Ok(response)
}

async fn control(
    gateway: AppState,
    caller: Caller,
    params: RawPathParams,
    action: &str,
) -> Result<Response, ApiError> {
    let id = batch_id(&params);
    find(&gateway, &caller, &id)?;
    match gateway.control_batch(&id, action).await {
        Ok(Some(_)) => {
            let batch = find(&gateway, &caller, &id)?;
            Ok(json(StatusCode::OK, &status_of(&batch)))
        }
        Ok(None) => Err(ApiError::new(
            404,
            "batch_not_found",
            format!("no batch `{id}`"),
        )),
        Err(why) => Err(ApiError::new(409, "batch_state", why)),
    }
}

/// Pauses a running batch: no new lines start; lines in flight finish and are written.
#[utoipa::path(post, path = "/api/v1/batches/{id}/pause", tag = "jobs",
    params(("id" = String, Path, description = "Batch id")),
    responses(
        (status = 200, description = "Pausing", body = BatchStatus),
        (status = 404, description = "No such batch", body = ErrorBody),
        (status = 409, description = "Not running", body = ErrorBody),
    ))]
pub(crate) async fn pause(
    State(g): State<AppState>,
    Who(caller): Who,
    params: RawPathParams,
) -> Result<Response, ApiError> {
    control(g, caller, params, "pause").await
}

/// Resumes a paused batch where it stopped.
#[utoipa::path(post, path = "/api/v1/batches/{id}/resume", tag = "jobs",
    params(("id" = String, Path, description = "Batch id")),
    responses(
        (status = 200, description = "Running", body = BatchStatus),
        (status = 404, description = "No such batch", body = ErrorBody),
        (status = 409, description = "Not paused", body = ErrorBody),
    ))]
pub(crate) async fn resume(
    State(g): State<AppState>,
    Who(caller): Who,
    params: RawPathParams,
) -> Result<Response, ApiError> {
    control(g, caller, params, "resume").await
}

/// Cancels a batch; the output keeps the lines done.
#[utoipa::path(post, path = "/api/v1/batches/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "Batch id")),
    responses(
        (status = 200, description = "Cancelling", body = BatchStatus),
        (status = 404, description = "No such batch", body = ErrorBody),
        (status = 409, description = "Already over", body = ErrorBody),
    ))]
pub(crate) async fn cancel(
    State(g): State<AppState>,
    Who(caller): Who,
    params: RawPathParams,
) -> Result<Response, ApiError> {
    control(g, caller, params, "cancel").await
}

impl From<Error> for SubmitError {
    fn from(e: Error) -> Self {
        Self::Gateway(e)
    }
}
