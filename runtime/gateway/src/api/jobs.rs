//! Async jobs, in the style of RunPod's queue API under wasp's own routes: submit (`run`),
//! submit and wait (`runsync`), status, result, cancel, retry, purge the queue, queue
//! health, and a listing for the CLI.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Query, RawPathParams, State};
use axum::http::header::{CONTENT_TYPE, HeaderMap, HeaderValue, LOCATION};
use axum::http::request::Parts;
use axum::http::{StatusCode, Uri};
use axum::response::Response;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use wasp_jobs::{
    Job, JobError, JobPolicy, JobRequest, JobState, ListFilter, NewJob, Payload, Priority,
};

use super::error::json;
use super::{ApiError, AppState, ErrorBody, Who, read_body};
use crate::Error;
use crate::registry::Deployment;

/// Outputs up to this size are embedded in a job's status; larger ones are at `output_url`.
const EMBED_MAX: u64 = 10 * 1024 * 1024;
/// Room for the envelope around a JSON job's input.
const ENVELOPE: u64 = 1024 * 1024;
/// Longest `runsync` waits by default, in seconds (RunPod's 90 s).
const RUNSYNC_WAIT_S: u64 = 90;
/// Longest `runsync` may be asked to wait.
const RUNSYNC_MAX_S: u64 = 300;

/// A job to submit, as JSON: the input goes to the endpoint as its request body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The request body the endpoint gets (any JSON).
    #[schema(value_type = Object)]
    pub input: Value,
    /// URL the job's status is POSTed to when it ends (signed; see the endpoint's webhook
    /// secret).
    pub webhook: Option<String>,
    /// This job's own policy, over the endpoint's `[jobs]` defaults.
    pub policy: Option<RunPolicy>,
    /// The path below the invoke route the processor sees, with its query (default `/`).
    pub path: Option<String>,
}

/// A job's own policy.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunPolicy {
    /// Longest one attempt may run, in seconds (1 to 604800).
    pub execution_timeout_s: Option<u64>,
    /// Attempts before the job is dead-lettered (1 to 100).
    pub max_attempts: Option<u32>,
    /// How long the finished job is kept, in seconds (1 to 7776000).
    pub result_ttl_s: Option<u64>,
    /// `high`, `normal` or `low` (a `low` job never makes the endpoint scale up).
    #[schema(value_type = Option<String>)]
    pub priority: Option<Priority>,
}

/// The query of a raw submit (a body that is not the JSON envelope): the policy, the
/// webhook and the path.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RawQuery {
    /// Longest one attempt may run, in seconds (1 to 604800).
    pub execution_timeout_s: Option<u64>,
    /// Attempts before the job is dead-lettered (1 to 100).
    pub max_attempts: Option<u32>,
    /// How long the finished job is kept, in seconds (1 to 7776000).
    pub result_ttl_s: Option<u64>,
    /// `high`, `normal` or `low` (a `low` job never makes the endpoint scale up).
    #[param(value_type = Option<String>)]
    pub priority: Option<Priority>,
    /// URL the job's status is POSTed to when it ends.
    pub webhook: Option<String>,
    /// The path below the invoke route the processor sees (default `/`).
    pub path: Option<String>,
}

/// A job's status (RunPod's shape, with wasp's field names).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobStatus {
    /// The job's id.
    pub id: String,
    /// `IN_QUEUE`, `IN_PROGRESS`, `COMPLETED`, `FAILED`, `CANCELLED` or `TIMED_OUT`.
    pub status: &'static str,
    /// The endpoint that runs it.
    pub endpoint: String,
    /// `high`, `normal` or `low`.
    #[schema(value_type = String)]
    pub priority: Priority,
    /// When it was acknowledged (ms since the Unix epoch).
    pub submitted_at_ms: u64,
    /// Milliseconds it waited before its first attempt (so far).
    pub delay_ms: u64,
    /// Milliseconds its attempts ran.
    pub execution_ms: u64,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// When it and its output will be removed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// Attempts that were retries.
    pub retries: u32,
    /// Every attempt, oldest first, with its error.
    pub attempts: Vec<AttemptDetail>,
    /// The endpoint's answer: JSON as JSON, other text as a string.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub output: Option<Value>,
    /// The answer in base64, when it is not text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_base64: Option<String>,
    /// Where the raw answer is (always, once completed; the only place for answers over
    /// 10 MiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_url: Option<String>,
    /// Why it failed, timed out or was cancelled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobErrorDetail>,
    /// Its webhook and each delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookDetail>,
}

/// One attempt of a job.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AttemptDetail {
    /// 1 for the first.
    pub number: u32,
    /// When it started.
    pub started_at_ms: u64,
    /// When it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobErrorDetail>,
    /// The cluster node it ran on (cluster mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Why a job or an attempt failed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobErrorDetail {
    /// A short machine-readable code (`timed_out`, `processor_error`, `cancelled`...).
    pub code: String,
    /// What happened.
    pub message: String,
}

/// A job's webhook.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookDetail {
    /// Where the status goes.
    pub url: String,
    /// Whether a delivery was answered 2xx.
    pub delivered: bool,
    /// Each delivery: when, the receiver's status or what went wrong.
    pub deliveries: Vec<DeliveryDetail>,
}

/// One webhook delivery.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryDetail {
    /// When.
    pub at_ms: u64,
    /// The receiver's HTTP status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Jobs and workers of an endpoint.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct QueueHealth {
    /// Jobs by state (finished ones until their TTL passes).
    pub jobs: JobCounts,
    /// Workers of its versions.
    pub workers: WorkerTotals,
}

/// Jobs by state.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobCounts {
    /// Waiting.
    pub in_queue: u64,
    /// Running.
    pub in_progress: u64,
    /// Done.
    pub completed: u64,
    /// Failed for good.
    pub failed: u64,
    /// Cancelled or purged.
    pub cancelled: u64,
    /// Out of time.
    pub timed_out: u64,
    /// Attempts that were retries.
    pub retried: u64,
}

/// Workers of an endpoint, summed over its versions.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkerTotals {
    /// Serving.
    pub ready: u32,
    /// Starting (or waiting for GPUs).
    pub starting: u32,
    /// Wanted by the autoscalers.
    pub desired: u32,
}

/// How many jobs a purge cancelled.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Purged {
    /// Jobs taken out of the queue.
    pub removed: u64,
}

/// Jobs, the newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobList {
    /// The jobs.
    pub jobs: Vec<JobStatus>,
}

/// Which jobs to list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    /// Only this endpoint's.
    pub endpoint: Option<String>,
    /// Only jobs in this state (`IN_QUEUE`, `COMPLETED`...).
    pub status: Option<String>,
    /// Most jobs (default 100, at most 10000).
    pub limit: Option<usize>,
}

/// How long `runsync` waits.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Seconds to wait for the job to end (default 90, at most 300).
    pub wait_s: Option<u64>,
}

/// An endpoint name and a job id from the path.
pub(crate) struct JobPath {
    name: String,
    id: String,
}

impl FromRequestParts<AppState> for JobPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(400, "invalid_path", e.body_text()))?;
        let get = |key: &str| {
            params
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.to_owned())
                .unwrap_or_default()
        };
        let name = get("name");
        let name = if name.is_empty() {
            name
        } else {
            // The endpoint of the caller's tenant (a public one, without a key).
            super::resolve(state, &super::auth::caller_in(&parts.extensions), &name)?
        };
        Ok(Self {
            name,
            id: get("id"),
        })
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::NotFound(_) => ApiError::new(404, "job_not_found", e.to_string()),
            JobError::Conflict(_) => ApiError::new(409, "job_state", e.to_string()),
            JobError::StorageFull(_) => ApiError::new(507, "insufficient_storage", e.to_string()),
            JobError::Unavailable(_) => {
                tracing::warn!("{e}");
                ApiError::new(503, "job_store_unavailable", e.to_string())
                    .retry_after(std::time::Duration::from_secs(1))
            }
            JobError::Store(_) | JobError::Closed => {
                tracing::error!("{e}");
                ApiError::new(500, "job_store", e.to_string())
            }
        }
    }
}

/// The endpoint, which must exist.
fn endpoint(gateway: &AppState, name: &str) -> Result<std::sync::Arc<Deployment>, ApiError> {
    Ok(gateway
        .endpoint(name)
        .ok_or_else(|| Error::NotFound(name.to_owned()))?)
}

/// The status URL of a job.
fn status_url(name: &str, id: &str) -> String {
    format!("{}/status/{id}", endpoint_base(name))
}

fn endpoint_base(name: &str) -> String {
    let invoke = super::control::invoke_url(name);
    invoke.strip_suffix("/invoke").unwrap_or(&invoke).to_owned()
}

/// The policy of a new job: the endpoint's `[jobs]` defaults under the job's own.
fn policy_of(d: &Deployment, own: &RunPolicy, at: &str) -> Result<JobPolicy, ApiError> {
    let spec = &d.spec.jobs;
    let field = |name: &str| {
        if at.is_empty() {
            name.to_owned()
        } else {
            format!("{at}.{name}")
        }
    };
    let check = |name: &str, value: u64, low: u64, high: u64| {
        if (low..=high).contains(&value) {
            Ok(value)
        } else {
            Err(ApiError::new(
                422,
                "invalid_field",
                format!("must be between {low} and {high}"),
            )
            .with_field(field(name)))
        }
    };
    let timeout_s = check(
        "execution_timeout_s",
        own.execution_timeout_s
            .unwrap_or(spec.execution_timeout_s.into()),
        1,
        7 * 86_400,
    )?;
    let attempts = check(
        "max_attempts",
        own.max_attempts.unwrap_or(spec.max_attempts).into(),
        1,
        100,
    )?;
    let ttl = check(
        "result_ttl_s",
        own.result_ttl_s.unwrap_or(spec.result_ttl_s),
        1,
        90 * 86_400,
    )?;
    Ok(JobPolicy {
        execution_timeout_ms: timeout_s * 1000,
        max_attempts: attempts as u32,
        retry_delay_ms: spec.retry_delay_ms,
        retry_delay_max_ms: spec.retry_delay_max_ms,
        result_ttl_s: ttl,
        priority: own.priority.unwrap_or_default(),
    })
}

/// Checks a webhook URL: absolute `http` or `https`, with a host.
fn webhook_url(url: &str, field: &str) -> Result<String, ApiError> {
    let bad =
        |why: &str| ApiError::new(422, "invalid_field", format!("`{url}` {why}")).with_field(field);
    if url.len() > 2048 {
        return Err(bad("is longer than 2048 characters"));
    }
    let uri: Uri = url.parse().map_err(|_| bad("is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("is not an http or https URL"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    Ok(url.to_owned())
}

/// Reads a submit: a JSON envelope (`{"input", "webhook", "policy"}`), or any other body
/// as the raw request with the policy in the query.
async fn new_job(
    d: &Deployment,
    headers: &HeaderMap,
    query: Option<&str>,
    body: Body,
) -> Result<NewJob, ApiError> {
    // From the spec: a cluster node that cannot run the endpoint (no GPU for it) has no
    // versions built, and still takes its jobs for the nodes that can.
    let limit = d
        .spec
        .versions
        .iter()
        .map(|v| v.limits.max_body_bytes)
        .max()
        .unwrap_or(0);
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let is_json = content_type.starts_with("application/json");
    let bytes = read_body(
        body,
        limit.saturating_add(if is_json { ENVELOPE } else { 0 }),
        "the endpoint's `limits.max_body_bytes`",
    )
    .await?;
    let (body, content_type, own, webhook, path) = if is_json {
        let run: RunRequest = serde_json::from_slice(&bytes).map_err(|e| {
            let field = e.to_string().split('`').nth(1).map(str::to_owned);
            let mut err = ApiError::new(400, "invalid_json", format!("the job is not valid: {e}"));
            err.field = field;
            err
        })?;
        let input = serde_json::to_vec(&run.input).map_err(|e| {
            ApiError::new(
                400,
                "invalid_json",
                format!("the input cannot be encoded: {e}"),
            )
        })?;
        if input.len() as u64 > limit {
            return Err(
                ApiError::body_too_large(limit, "the endpoint's `limits.max_body_bytes`")
                    .with_field("input"),
            );
        }
        let own = run.policy.unwrap_or_default();
        (
            input,
            "application/json".to_owned(),
            own,
            run.webhook,
            run.path,
        )
    } else {
        let raw: RawQuery = match query {
            Some(q) => raw_query(q)?,
            None => RawQuery::default(),
        };
        let own = RunPolicy {
            execution_timeout_s: raw.execution_timeout_s,
            max_attempts: raw.max_attempts,
            result_ttl_s: raw.result_ttl_s,
            priority: raw.priority,
        };
        (bytes.to_vec(), content_type, own, raw.webhook, raw.path)
    };
    let path = path.unwrap_or_else(|| "/".to_owned());
    if !path.starts_with('/') || path.len() > 2048 {
        return Err(ApiError::new(
            422,
            "invalid_field",
            "a path starts with `/` and is at most 2048 characters",
        )
        .with_field("path"));
    }
    let policy = policy_of(d, &own, if is_json { "policy" } else { "" })?;
    let webhook = webhook
        .map(|url| webhook_url(&url, "webhook"))
        .transpose()?;
    let mut request_headers = Vec::new();
    if !content_type.is_empty() {
        request_headers.push(("content-type".to_owned(), content_type));
    }
    Ok(NewJob {
        endpoint: d.spec.name.clone(),
        request: JobRequest {
            method: "POST".into(),
            path,
            headers: request_headers,
            body: Payload::Inline(body),
        },
        policy,
        webhook,
    })
}

/// A raw submit's query.
fn raw_query(query: &str) -> Result<RawQuery, ApiError> {
    let uri: Uri = format!("/?{query}")
        .parse()
        .map_err(|_| ApiError::new(400, "invalid_query", "the query is not valid"))?;
    Query::<RawQuery>::try_from_uri(&uri)
        .map(|q| q.0)
        .map_err(ApiError::from)
}

/// A job's status as the API shows it; the output is read when it is small enough.
pub(crate) async fn status_of(gateway: &AppState, job: &Job) -> JobStatus {
    let now = crate::workers::now_ms();
    let mut status = JobStatus {
        id: job.id.clone(),
        status: job.state.as_str(),
        endpoint: crate::tenants::local_name(&job.endpoint).to_owned(),
        priority: job.policy.priority,
        submitted_at_ms: job.submitted_ms,
        delay_ms: job.delay_ms(now),
        execution_ms: job.execution_ms(now),
        finished_at_ms: job.finished_ms,
        expires_at_ms: job.expires_ms,
        retries: job.attempts.len().saturating_sub(1) as u32,
        attempts: job
            .attempts
            .iter()
            .map(|a| AttemptDetail {
                number: a.number,
                started_at_ms: a.started_ms,
                finished_at_ms: a.finished_ms,
                error: a.error.as_ref().map(|e| JobErrorDetail {
                    code: e.code.clone(),
                    message: e.message.clone(),
                }),
                node: a.node.clone(),
            })
            .collect(),
        output: None,
        output_base64: None,
        output_url: None,
        error: job.error.as_ref().map(|e| JobErrorDetail {
            code: e.code.clone(),
            message: e.message.clone(),
        }),
        webhook: job.webhook.as_ref().map(|w| WebhookDetail {
            url: w.url.clone(),
            delivered: w.delivered,
            deliveries: w
                .deliveries
                .iter()
                .map(|d| DeliveryDetail {
                    at_ms: d.at_ms,
                    status: d.status,
                    error: d.error.clone(),
                })
                .collect(),
        }),
    };
    if let Some(output) = &job.output {
        status.output_url = Some(format!(
            "{}/result/{}",
            endpoint_base(&job.endpoint),
            job.id
        ));
        if output.body.len() <= EMBED_MAX
            && let Ok(bytes) = gateway.jobs.read_payload(&output.body).await
        {
            let is_json = output
                .content_type()
                .is_some_and(|t| t.starts_with("application/json") || t.contains("+json"));
            match (is_json, serde_json::from_slice::<Value>(&bytes)) {
                (true, Ok(value)) => status.output = Some(value),
                _ => match String::from_utf8(bytes) {
                    Ok(text) => status.output = Some(Value::String(text)),
                    Err(e) => {
                        status.output_base64 =
                            Some(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
                    }
                },
            }
        }
    }
    status
}

/// A job's status as a response.
async fn status_response(gateway: &AppState, job: &Job, code: StatusCode) -> Response {
    let body = status_of(gateway, job).await;
    let mut response = json(code, &body);
    if !job.state.is_final()
        && let Ok(v) = HeaderValue::from_str(&status_url(&job.endpoint, &job.id))
    {
        response.headers_mut().insert(LOCATION, v);
    }
    response
}

/// Submits a job: `202` with its id and `IN_QUEUE` once it is on disk. A JSON body is the
/// envelope `{"input", "webhook", "policy"}`; any other body is the request itself, with
/// the policy and webhook in the query.
#[utoipa::path(post, path = "/endpoints/{name}/run", tag = "jobs",
    params(("name" = String, Path, description = "Endpoint name"), RawQuery),
    request_body(content(
        (RunRequest = "application/json"),
        (Vec<u8> = "*/*"),
    ), description = "The envelope, or the raw request body"),
    responses(
        (status = 202, description = "Acknowledged: durable", body = JobStatus),
        (status = 400, description = "Not valid JSON, an unknown field", body = ErrorBody),
        (status = 404, description = "No such endpoint", body = ErrorBody),
        (status = 413, description = "Over the endpoint's `limits.max_body_bytes`", body = ErrorBody),
        (status = 422, description = "A policy value out of range, a bad webhook URL", body = ErrorBody),
        (status = 429, description = "A rate limit, or the tenant's quota of queued jobs; retry after `Retry-After`", body = ErrorBody),
        (status = 503, description = "A cluster's job store cannot be reached now; retry after `Retry-After`", body = ErrorBody),
        (status = 507, description = "The data directory is full", body = ErrorBody),
    ))]
pub(crate) async fn run(
    State(gateway): State<AppState>,
    super::Name(name): super::Name,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let (job, admitted) = submit(&gateway, &name, request).await?;
    let mut response = status_response(&gateway, &job, StatusCode::ACCEPTED).await;
    admitted.stamp(response.headers_mut());
    Ok(response)
}

/// Submits a job under the caller's and the endpoint's rate limits and the tenant's
/// quota of queued jobs.
async fn submit(
    gateway: &AppState,
    name: &str,
    request: axum::extract::Request,
) -> Result<(Job, crate::limits::Admitted), ApiError> {
    let d = endpoint(gateway, name)?;
    let admitted = super::data::admit(
        gateway,
        request.extensions().get::<crate::tenants::Caller>(),
        &d,
    )?;
    gateway.check_job_quota(name)?;
    let (parts, body) = request.into_parts();
    let new = new_job(&d, &parts.headers, parts.uri.query(), body).await?;
    let mut jobs = gateway.jobs.submit(vec![new]).await?;
    let job = jobs
        .pop()
        .ok_or_else(|| ApiError::new(500, "job_store", "the store acknowledged no job"))?;
    Ok((job, admitted))
}

/// Answers a sync invoke as a job (spillover): `202` with the job's status, `Location` and
/// `Preference-Applied: respond-async`.
pub(crate) async fn spill(
    gateway: &AppState,
    name: &str,
    request: wasp_wasm::Request,
) -> Result<Response, ApiError> {
    let d = endpoint(gateway, name)?;
    let policy = policy_of(&d, &RunPolicy::default(), "")?;
    drop(d);
    gateway.check_job_quota(name)?;
    let new = NewJob {
        endpoint: name.to_owned(),
        request: JobRequest {
            method: request.method,
            path: request.path,
            headers: request.headers,
            body: Payload::Inline(request.body),
        },
        policy,
        webhook: None,
    };
    let job = gateway
        .jobs
        .submit(vec![new])
        .await?
        .pop()
        .ok_or_else(|| ApiError::new(500, "job_store", "the store acknowledged no job"))?;
    let mut response = status_response(gateway, &job, StatusCode::ACCEPTED).await;
    response.headers_mut().insert(
        "preference-applied",
        HeaderValue::from_static("respond-async"),
    );
    Ok(response)
}

/// Submits a job and waits for it to end (up to `wait_s`): `200` with the finished job's
/// status, or `202` with its status (and `Location`) if it is still queued or running.
#[utoipa::path(post, path = "/endpoints/{name}/runsync", tag = "jobs",
    params(("name" = String, Path, description = "Endpoint name"), WaitQuery),
    request_body(content((RunRequest = "application/json")), description = "The envelope"),
    responses(
        (status = 200, description = "The job ended", body = JobStatus),
        (status = 202, description = "Still running; poll `Location`", body = JobStatus),
        (status = 400, description = "Not valid JSON, an unknown field", body = ErrorBody),
        (status = 404, description = "No such endpoint", body = ErrorBody),
        (status = 413, description = "Over the endpoint's `limits.max_body_bytes`", body = ErrorBody),
        (status = 422, description = "A policy value out of range, a bad webhook URL", body = ErrorBody),
        (status = 429, description = "A rate limit, or the tenant's quota of queued jobs; retry after `Retry-After`", body = ErrorBody),
        (status = 503, description = "A cluster's job store cannot be reached now; retry after `Retry-After`", body = ErrorBody),
    ))]
pub(crate) async fn runsync(
    State(gateway): State<AppState>,
    name: super::Name,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    let wait = match request.uri().query() {
        Some(q) => {
            let uri: Uri = format!("/?{q}")
                .parse()
                .map_err(|_| ApiError::new(400, "invalid_query", "the query is not valid"))?;
            Query::<WaitQuery>::try_from_uri(&uri)
                .map_err(|e| ApiError::from(e).with_field("wait_s"))?
                .0
                .wait_s
        }
        None => None,
    }
    .unwrap_or(RUNSYNC_WAIT_S);
    if wait > RUNSYNC_MAX_S {
        return Err(ApiError::new(
            422,
            "invalid_field",
            format!("must be at most {RUNSYNC_MAX_S}"),
        )
        .with_field("wait_s"));
    }
    // Listen before submitting, so that a fast job is not missed.
    let mut ended = gateway.running.ended.subscribe();
    let (job, admitted) = submit(&gateway, &name.0, request).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    loop {
        match tokio::time::timeout_at(deadline, ended.recv()).await {
            Ok(Ok(done)) if done.id == job.id => {
                let mut response = status_response(&gateway, &done, StatusCode::OK).await;
                admitted.stamp(response.headers_mut());
                return Ok(response);
            }
            Ok(Ok(_)) => {}
            // Missed some: look at the store.
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                if let Some(now) = gateway.jobs.get(&job.id).await?
                    && now.state.is_final()
                {
                    let mut response = status_response(&gateway, &now, StatusCode::OK).await;
                    admitted.stamp(response.headers_mut());
                    return Ok(response);
                }
            }
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let now = gateway.jobs.get(&job.id).await?.unwrap_or(job);
    let code = if now.state.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut response = status_response(&gateway, &now, code).await;
    admitted.stamp(response.headers_mut());
    Ok(response)
}

/// The job of this endpoint, or 404.
async fn job_of(gateway: &AppState, path: &JobPath) -> Result<Job, ApiError> {
    endpoint(gateway, &path.name)?;
    gateway
        .jobs
        .get(&path.id)
        .await?
        .filter(|j| j.endpoint == path.name)
        .ok_or_else(|| {
            ApiError::new(
                404,
                "job_not_found",
                format!(
                    "endpoint `{}` has no job `{}` (finished jobs go when their result TTL passes)",
                    path.name, path.id
                ),
            )
        })
}

/// A job's status: its state, attempts, output or error, and webhook deliveries.
#[utoipa::path(get, path = "/endpoints/{name}/status/{id}", tag = "jobs",
    params(("name" = String, Path, description = "Endpoint name"), ("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobStatus),
        (status = 404, description = "No such endpoint or job", body = ErrorBody),
    ))]
pub(crate) async fn status(
    State(gateway): State<AppState>,
    path: JobPath,
) -> Result<Response, ApiError> {
    let job = job_of(&gateway, &path).await?;
    Ok(status_response(&gateway, &job, StatusCode::OK).await)
}

/// A completed job's raw answer: its body with the status and headers the endpoint gave.
#[utoipa::path(get, path = "/endpoints/{name}/result/{id}", tag = "jobs",
    params(("name" = String, Path, description = "Endpoint name"), ("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The endpoint's answer", content_type = "*/*", body = Vec<u8>),
        (status = 404, description = "No such endpoint or job", body = ErrorBody),
        (status = 409, description = "The job has not completed", body = ErrorBody),
    ))]
pub(crate) async fn result(
    State(gateway): State<AppState>,
    path: JobPath,
) -> Result<Response, ApiError> {
    let job = job_of(&gateway, &path).await?;
    let Some(output) = &job.output else {
        return Err(ApiError::new(
            409,
            "job_state",
            format!(
                "job `{}` is {}; only a COMPLETED job has a result",
                job.id, job.state
            ),
        ));
    };
    let bytes = gateway.jobs.read_payload(&output.body).await?;
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = StatusCode::from_u16(output.status).unwrap_or(StatusCode::OK);
    for (k, v) in &output.headers {
        if let (Ok(k), Ok(v)) = (
            axum::http::HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            response.headers_mut().append(k, v);
        }
    }
    Ok(response)
}

/// Cancels a queued or running job (a running one is stopped).
#[utoipa::path(post, path = "/endpoints/{name}/cancel/{id}", tag = "jobs",
    params(("name" = String, Path, description = "Endpoint name"), ("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled", body = JobStatus),
        (status = 404, description = "No such endpoint or job", body = ErrorBody),
        (status = 409, description = "The job has ended", body = ErrorBody),
    ))]
pub(crate) async fn cancel(
    State(gateway): State<AppState>,
    path: JobPath,
) -> Result<Response, ApiError> {
    endpoint(&gateway, &path.name)?;
    let (job, was_running) = gateway
        .jobs
        .cancel(&path.name, &path.id)
        .await
        .map_err(not_found_as_job(&path))?;
    if was_running {
        gateway.running.abort(&job.id);
    }
    gateway.job_ended(job.clone());
    Ok(status_response(&gateway, &job, StatusCode::OK).await)
}

/// Queues a failed, timed-out or cancelled job again, with a fresh set of attempts.
#[utoipa::path(post, path = "/endpoints/{name}/retry/{id}", tag = "jobs",
    params(("name" = String, Path, description = "Endpoint name"), ("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Queued again", body = JobStatus),
        (status = 404, description = "No such endpoint or job", body = ErrorBody),
        (status = 409, description = "The job is queued, running or completed", body = ErrorBody),
    ))]
pub(crate) async fn retry(
    State(gateway): State<AppState>,
    path: JobPath,
) -> Result<Response, ApiError> {
    endpoint(&gateway, &path.name)?;
    let job = gateway
        .jobs
        .retry(&path.name, &path.id)
        .await
        .map_err(not_found_as_job(&path))?;
    Ok(status_response(&gateway, &job, StatusCode::OK).await)
}

fn not_found_as_job(path: &JobPath) -> impl FnOnce(JobError) -> ApiError + '_ {
    move |e| match e {
        JobError::NotFound(_) => ApiError::new(
            404,
            "job_not_found",
            format!("endpoint `{}` has no job `{}`", path.name, path.id),
        ),
        other => other.into(),
    }
}

/// Cancels every queued job of the endpoint; running ones go on.
#[utoipa::path(post, path = "/endpoints/{name}/purge-queue", tag = "jobs",
    params(("name" = String, Path, description = "Endpoint name")),
    responses(
        (status = 200, description = "How many were removed", body = Purged),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ))]
pub(crate) async fn purge(
    State(gateway): State<AppState>,
    super::Name(name): super::Name,
) -> Result<Response, ApiError> {
    endpoint(&gateway, &name)?;
    let removed = gateway.jobs.purge(&name).await?;
    Ok(json(StatusCode::OK, &Purged { removed }))
}

/// The endpoint's jobs by state and its workers.
#[utoipa::path(get, path = "/endpoints/{name}/health", tag = "jobs",
    params(("name" = String, Path, description = "Endpoint name")),
    responses(
        (status = 200, description = "Jobs and workers", body = QueueHealth),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ))]
pub(crate) async fn health(
    State(gateway): State<AppState>,
    super::Name(name): super::Name,
) -> Result<Response, ApiError> {
    let d = endpoint(&gateway, &name)?;
    let c = gateway.jobs.counts(&name);
    let mut workers = WorkerTotals {
        ready: 0,
        starting: 0,
        desired: 0,
    };
    for v in &d.versions {
        let counts = v.workers.counts();
        workers.ready += counts.ready;
        workers.starting += counts.starting + counts.pending;
        workers.desired += v.workers.desired();
    }
    Ok(json(
        StatusCode::OK,
        &QueueHealth {
            jobs: JobCounts {
                in_queue: c.in_queue,
                in_progress: c.in_progress,
                completed: c.completed,
                failed: c.failed,
                cancelled: c.cancelled,
                timed_out: c.timed_out,
                retried: c.retried,
            },
            workers,
        },
    ))
}

/// Jobs, the newest first, by endpoint and state.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs",
    params(JobQuery),
    responses(
        (status = 200, description = "The jobs", body = JobList),
        (status = 400, description = "A bad `status` or `limit`", body = ErrorBody),
    ))]
pub(crate) async fn list(
    State(gateway): State<AppState>,
    Who(caller): Who,
    query: Result<Query<JobQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let state = match query.status.as_deref() {
        Some(s) => Some(JobState::parse(s).ok_or_else(|| {
            ApiError::new(
                400,
                "invalid_query",
                format!("`{s}` is not a job status (IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, TIMED_OUT)"),
            )
            .with_field("status")
        })?),
        None => None,
    };
    let limit = query.limit.unwrap_or(100);
    if limit > 10_000 {
        return Err(
            ApiError::new(400, "invalid_query", "must be at most 10000").with_field("limit")
        );
    }
    let jobs = gateway
        .jobs
        .list(ListFilter {
            endpoint: query.endpoint.map(|e| caller.qualify(&e)),
            tenant: Some(caller.tenant.clone()),
            state,
            limit,
        })
        .await?;
    let mut out = Vec::with_capacity(jobs.len());
    for job in &jobs {
        out.push(status_of(&gateway, job).await);
    }
    Ok(json(StatusCode::OK, &JobList { jobs: out }))
}

/// A job's progress as server-sent events: `status` when the stream opens, an `output`
/// event per chunk of output (the whole output, for an endpoint that does not stream), and
/// `done` with the final status; then the stream ends.
#[utoipa::path(get, path = "/endpoints/{name}/stream/{id}", tag = "jobs",
    params(("name" = String, Path, description = "Endpoint name"), ("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Server-sent events: `status`, `output`..., `done`", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such endpoint or job", body = ErrorBody),
    ))]
pub(crate) async fn stream(
    State(gateway): State<AppState>,
    path: JobPath,
) -> Result<Response, ApiError> {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, KeepAlive, Sse};
    // Listen before looking, so that an end in between is not missed.
    let ended = gateway.running.ended.subscribe();
    let job = job_of(&gateway, &path).await?;
    let opening = Event::default()
        .event("status")
        .json_data(json!({ "id": job.id, "status": job.state.as_str() }))
        .map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
    enum Step {
        Wait(tokio::sync::broadcast::Receiver<std::sync::Arc<Job>>),
        Finish(Box<Job>),
        Close,
    }
    let first = if job.state.is_final() {
        Step::Finish(Box::new(job.clone()))
    } else {
        Step::Wait(ended)
    };
    let (g, id) = (gateway.clone(), job.id.clone());
    let rest = futures_util::stream::unfold(first, move |step| {
        let (g, id) = (g.clone(), id.clone());
        async move {
            match step {
                Step::Wait(mut ended) => loop {
                    match ended.recv().await {
                        Ok(done) if done.id == id => {
                            return Some((Vec::new(), Step::Finish(Box::new((*done).clone()))));
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            if let Ok(Some(now)) = g.jobs.get(&id).await
                                && now.state.is_final()
                            {
                                return Some((Vec::new(), Step::Finish(Box::new(now))));
                            }
                        }
                        Err(_) => return None,
                    }
                },
                Step::Finish(job) => {
                    let status = status_of(&g, &job).await;
                    let mut events = Vec::new();
                    if let Some(output) = &status.output {
                        events.push(Event::default().event("output").json_data(output));
                    } else if let Some(b64) = &status.output_base64 {
                        events.push(Ok(Event::default().event("output_base64").data(b64)));
                    }
                    events.push(Event::default().event("done").json_data(&status));
                    Some((events, Step::Close))
                }
                Step::Close => None,
            }
        }
    });
    let events = futures_util::StreamExt::flat_map(rest, futures_util::stream::iter);
    let all = futures_util::StreamExt::chain(futures_util::stream::iter([Ok(opening)]), events);
    Ok(Sse::new(all)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// A job by id, whatever its endpoint (for the CLI and the console).
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The job", body = JobStatus),
        (status = 404, description = "No such job", body = ErrorBody),
    ))]
pub(crate) async fn get(
    State(gateway): State<AppState>,
    Who(caller): Who,
    path: JobPath,
) -> Result<Response, ApiError> {
    let found = gateway.jobs.get(&path.id).await?;
    // Another tenant's job is as absent as one that never was.
    let job = found.filter(|j| caller.sees(&j.endpoint)).ok_or_else(|| {
        ApiError::new(
            404,
            "job_not_found",
            format!(
                "no job `{}` (finished jobs go when their result TTL passes)",
                path.id
            ),
        )
    })?;
    Ok(status_response(&gateway, &job, StatusCode::OK).await)
}
