//! An endpoint's short metrics history (`GET /api/v1/endpoints/{name}/metrics`): what the
//! console plots, served from the server's own memory (see `crate::history`).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::error::json;
use super::{ApiError, AppState, ErrorBody, Name};
use crate::Error;
use crate::history::{INTERVAL, RETENTION, VersionHistory, tick_of};

/// The span and resolution of a metrics history.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Seconds back from now (default 900, at most 1800: the history's length).
    pub window_s: Option<u64>,
    /// Seconds a column covers: a multiple of 2 (the history's interval), at least 2
    /// (default: what gives at most 300 columns).
    pub step_s: Option<u64>,
}

/// An endpoint's recent metrics, as columns over time (one value per step), ready to plot.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MetricsHistory {
    /// Seconds between points in the server's history.
    pub interval_s: u64,
    /// Seconds a column covers.
    pub step_s: u64,
    /// Each column's start, in milliseconds since the Unix epoch.
    pub t_ms: Vec<u64>,
    /// Each version's columns.
    pub versions: Vec<VersionHistory>,
    /// The endpoint's jobs at each column's end.
    pub jobs: JobHistory,
}

/// An endpoint's jobs over time.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobHistory {
    /// Jobs `IN_QUEUE`.
    pub queued: Vec<u64>,
    /// Jobs `IN_PROGRESS`.
    pub in_progress: Vec<u64>,
}

/// The endpoint's metrics over the last `window_s` seconds, kept in the server's memory
/// for 30 minutes at a 2-second resolution: requests, errors, latency percentiles, workers
/// desired and ready, waiting requests and jobs, and for generation TTFT, TPOT and tokens
/// per second. No Prometheus needed. On a cluster, what this node served.
#[utoipa::path(get, path = "/api/v1/endpoints/{name}/metrics", tag = "control",
    params(("name" = String, Path, description = "Endpoint name"), HistoryQuery),
    responses(
        (status = 200, description = "Columns over time, oldest first", body = MetricsHistory),
        (status = 400, description = "`window_s` or `step_s` is out of range", body = ErrorBody),
        (status = 404, description = "No such endpoint", body = ErrorBody),
    ))]
pub(crate) async fn metrics(
    State(gateway): State<AppState>,
    Name(name): Name,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(ApiError::from)?;
    let interval = INTERVAL.as_secs();
    let window = query.window_s.unwrap_or(900);
    if window < interval || window > RETENTION.as_secs() {
        return Err(ApiError::new(
            400,
            "invalid_query",
            format!(
                "`window_s` must be from {interval} to {}",
                RETENTION.as_secs()
            ),
        )
        .with_field("window_s"));
    }
    let step = match query.step_s {
        Some(s) if s >= interval && s % interval == 0 && s <= window => s,
        Some(_) => {
            return Err(ApiError::new(
                400,
                "invalid_query",
                format!("`step_s` must be a multiple of {interval}, at most `window_s`"),
            )
            .with_field("step_s"));
        }
        None => window.div_ceil(300).div_ceil(interval).max(1) * interval,
    };
    let d = gateway.endpoint(&name).ok_or(Error::NotFound(name))?;
    let (ticks, step_ticks) = (window / interval, step / interval);
    // Whole intervals only: the one in progress is not closed yet.
    let to = tick_of(crate::workers::now_ms());
    let from = to.saturating_sub(ticks);
    let t_ms = (from..to)
        .step_by(usize::try_from(step_ticks).unwrap_or(1))
        .map(|t| t * interval * 1000)
        .collect();
    let versions = d
        .versions
        .iter()
        .map(|v| {
            gateway
                .history
                .columns(&d.spec.name, &v.name, from, to, step_ticks)
        })
        .collect();
    let (queued, in_progress) = gateway
        .history
        .job_columns(&d.spec.name, from, to, step_ticks);
    Ok(json(
        StatusCode::OK,
        &MetricsHistory {
            interval_s: interval,
            step_s: step,
            t_ms,
            versions,
            jobs: JobHistory {
                queued,
                in_progress,
            },
        },
    ))
}
