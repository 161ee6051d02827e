//! Operations: liveness, Prometheus metrics, and the OpenAPI description of the API.

use axum::extract::State;
use axum::http::HeaderValue;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use super::AppState;
use crate::metrics::{
    EndpointLabels, InstanceLabels, JobLabels, PoolLabels, VersionLabels, WorkerLabels,
};

/// The OpenAPI document, rendered once, by the first router built.
pub(crate) static DOCUMENT: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();

/// Liveness: the server is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)))]
pub(crate) async fn healthz() -> Response {
    text("text/plain", Bytes::from_static(b"ok\n"))
}

/// The OpenAPI 3.1 description of this API.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "The document", body = Object)))]
pub(crate) async fn openapi() -> Response {
    text(
        "application/json",
        DOCUMENT.get().cloned().unwrap_or_default(),
    )
}

fn text(content_type: &'static str, body: Bytes) -> Response {
    (
        [(CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

/// Prometheus metrics in the OpenMetrics text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "The metrics", content_type = "application/openmetrics-text", body = String)))]
pub(crate) async fn metrics(State(gateway): State<AppState>) -> Response {
    let m = &gateway.metrics;
    m.instances.clear();
    m.queued.clear();
    m.workers.clear();
    m.desired_workers.clear();
    m.jobs.clear();
    m.job_backlog.clear();
    m.components_loaded
        .set(i64::try_from(gateway.runtime.loaded_components()).unwrap_or(i64::MAX));
    if let Some(overflow) = gateway.runtime.overflow_stats() {
        m.overflow_instances
            .set(i64::try_from(overflow.live).unwrap_or(i64::MAX));
        m.overflow_created
            .inc_by(overflow.created.saturating_sub(m.overflow_created.get()));
    }
    m.pool_waiting
        .set(i64::try_from(gateway.runtime.slot_waiters()).unwrap_or(i64::MAX));
    if let Some(mib) = gateway.runtime.slot_memory_mib() {
        m.pool_slot_memory.set(i64::from(mib) << 20);
    }
    for slots in gateway.runtime.pool_slots() {
        let labels = PoolLabels {
            kind: slots.kind.into(),
        };
        m.pool_used
            .get_or_create(&labels)
            .set(i64::try_from(slots.used).unwrap_or(i64::MAX));
        m.pool_total
            .get_or_create(&labels)
            .set(i64::try_from(slots.total).unwrap_or(i64::MAX));
    }
    for d in gateway.endpoints() {
        let name = &d.spec.name;
        let c = gateway.jobs.counts(name);
        for (state, n) in [
            ("IN_QUEUE", c.in_queue),
            ("IN_PROGRESS", c.in_progress),
            ("COMPLETED", c.completed),
            ("FAILED", c.failed),
            ("CANCELLED", c.cancelled),
            ("TIMED_OUT", c.timed_out),
        ] {
            m.jobs
                .get_or_create(&JobLabels {
                    endpoint: name.clone(),
                    state: state.into(),
                })
                .set(n as i64);
        }
        m.job_backlog
            .get_or_create(&EndpointLabels {
                endpoint: name.clone(),
            })
            .set(gateway.jobs.backlog(name).scaling as i64);
        for v in &d.versions {
            let s = v.processor_stats();
            let labels = |state: &str| InstanceLabels {
                endpoint: d.spec.name.clone(),
                version: v.name.clone(),
                state: state.into(),
            };
            m.instances
                .get_or_create(&labels("idle"))
                .set(s.idle as i64);
            m.instances
                .get_or_create(&labels("busy"))
                .set(s.busy as i64);
            let version = VersionLabels {
                endpoint: d.spec.name.clone(),
                version: v.name.clone(),
            };
            m.queued.get_or_create(&version).set(s.queued as i64);
            let counts = v.workers.counts();
            for (state, n) in [
                ("starting", counts.starting),
                ("ready", counts.ready),
                ("draining", counts.draining),
                ("failed", counts.failed),
                ("pending", counts.pending),
            ] {
                m.workers
                    .get_or_create(&WorkerLabels {
                        endpoint: d.spec.name.clone(),
                        version: v.name.clone(),
                        state: state.into(),
                    })
                    .set(i64::from(n));
            }
            m.desired_workers
                .get_or_create(&version)
                .set(i64::from(v.workers.desired()));
            let cold = m.cold_starts.get_or_create(&version);
            cold.inc_by(
                v.workers
                    .cold_starts
                    .count
                    .load(std::sync::atomic::Ordering::Relaxed)
                    .saturating_sub(cold.get()),
            );
            let seconds = m.cold_start_seconds.get_or_create(&version);
            for s in v.workers.cold_starts.take() {
                seconds.observe(s);
            }
            if v.workers.has_model() {
                // The batchers count; the counters catch up to them at each scrape.
                let (total_batches, total_requests) = v.workers.batch_totals();
                let batches = m.batches.get_or_create(&version);
                batches.inc_by(total_batches.saturating_sub(batches.get()));
                let requests = m.batched_requests.get_or_create(&version);
                requests.inc_by(total_requests.saturating_sub(requests.get()));
                m.backend_queued
                    .get_or_create(&version)
                    .set(v.workers.backend_queued() as i64);
                if let Some(load) = v.workers.generation_load() {
                    let gauge = |family: &prometheus_client::metrics::family::Family<
                        crate::metrics::VersionLabels,
                        prometheus_client::metrics::gauge::Gauge,
                    >,
                                 value: u64| {
                        family
                            .get_or_create(&version)
                            .set(i64::try_from(value).unwrap_or(i64::MAX));
                    };
                    gauge(&m.running_sequences, load.running as u64);
                    gauge(&m.waiting_sequences, load.waiting as u64);
                    gauge(&m.kv_cache_bytes, load.kv_cache_bytes);
                    gauge(&m.kv_cache_capacity, load.kv_cache_capacity);
                }
            }
        }
    }
    // The meters count; the counters catch up to them at each scrape.
    for (tenant, c) in gateway.usage.snapshot() {
        let labels = crate::metrics::TenantLabels { tenant };
        let requests = m.tenant_requests.get_or_create(&labels);
        requests.inc_by(c.requests.saturating_sub(requests.get()));
        let tokens = m.tenant_tokens.get_or_create(&labels);
        tokens.inc_by(c.tokens.saturating_sub(tokens.get()));
        for (family, nanos) in [
            (&m.tenant_guest_seconds, c.guest_nanos),
            (&m.tenant_model_seconds, c.model_nanos),
        ] {
            let counter = family.get_or_create(&labels);
            let grew = nanos as f64 / 1e9 - counter.get();
            if grew > 0.0 {
                counter.inc_by(grew);
            }
        }
    }
    text(
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        Bytes::from(m.encode()),
    )
}
