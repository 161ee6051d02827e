//! Rate limits and caps on requests in flight (per endpoint and per API key), and
//! tenants' quotas.
//!
//! A rate limit is a token bucket: it holds up to `burst` tokens, refills at
//! `requests_per_second`, and each request takes one; a request that finds it empty is
//! answered `429 rate_limited` with `Retry-After` (whole seconds, as HTTP has it) and the
//! exact wait in `x-ratelimit-reset-requests`. A request that would pass
//! `max_concurrent` is answered `429 too_many_requests_in_flight`. Admitted responses of a
//! limited endpoint or key carry `x-ratelimit-limit-requests`,
//! `x-ratelimit-remaining-requests` and `x-ratelimit-reset-requests`, the names OpenAI's
//! clients read.
//!
//! Limiters live in memory, by endpoint and by key, and are rebuilt only when their
//! settings change (a redeploy with the same `rate_limit` keeps its bucket).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasp_core::RateLimit;

use crate::api::ApiError;

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    size: f64,
    /// Tokens, and when they were counted.
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: f64, size: f64) -> Self {
        Self {
            rate,
            size,
            state: Mutex::new((size, Instant::now())),
        }
    }

    /// Takes a token: the tokens left, or how long until one is there.
    fn take(&self, now: Instant) -> Result<f64, Duration> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, at) = *state;
        let tokens =
            (tokens + now.saturating_duration_since(at).as_secs_f64() * self.rate).min(self.size);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            Ok(tokens - 1.0)
        } else {
            *state = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }

    /// Gives back a token taken for a request that another limit refused.
    fn refund(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 = (state.0 + 1.0).min(self.size);
    }

    /// How long until the bucket is full again from `tokens`.
    fn refill_time(&self, tokens: f64) -> Duration {
        Duration::from_secs_f64(((self.size - tokens) / self.rate).max(0.0))
    }
}

/// The limiter of one endpoint or one key.
#[derive(Debug)]
pub(crate) struct Limiter {
    settings: RateLimit,
    bucket: Option<Bucket>,
    in_flight: Option<Arc<Semaphore>>,
}

impl Limiter {
    fn new(settings: &RateLimit) -> Self {
        Self {
            settings: settings.clone(),
            bucket: settings
                .bucket()
                .map(|(rate, size)| Bucket::new(rate, size)),
            in_flight: settings
                .max_concurrent
                .map(|n| Arc::new(Semaphore::new(n as usize))),
        }
    }
}

/// What limited a request: an endpoint (by its name within its tenant) or a key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Subject<'a> {
    Endpoint(&'a str),
    Key(&'a str),
}

impl std::fmt::Display for Subject<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Endpoint(name) => write!(f, "endpoint `{name}`"),
            Self::Key(id) => write!(f, "API key `{id}`"),
        }
    }
}

/// An admitted request: holds its places in flight until dropped, and says what the
/// response's rate-limit headers are.
#[derive(Debug, Default)]
pub(crate) struct Admitted {
    _in_flight: Vec<OwnedSemaphorePermit>,
    /// The tightest bucket's size, tokens left and time to full.
    headers: Option<(f64, f64, Duration)>,
}

impl Admitted {
    /// Adds the rate-limit headers to a response.
    pub fn stamp(&self, headers: &mut HeaderMap) {
        if let Some((limit, remaining, reset)) = self.headers {
            stamp(headers, limit, remaining, reset);
        }
    }
}

fn stamp(headers: &mut HeaderMap, limit: f64, remaining: f64, reset: Duration) {
    let value = |s: String| HeaderValue::from_str(&s).ok();
    if let Some(v) = value(format!("{}", limit.floor() as u64)) {
        headers.insert("x-ratelimit-limit-requests", v);
    }
    if let Some(v) = value(format!("{}", remaining.max(0.0).floor() as u64)) {
        headers.insert("x-ratelimit-remaining-requests", v);
    }
    if let Some(v) = value(format!("{:.3}s", reset.as_secs_f64())) {
        headers.insert("x-ratelimit-reset-requests", v);
    }
}

/// The answer to a refused request.
fn refused_rate(subject: Subject<'_>, limit: &RateLimit, size: f64, wait: Duration) -> ApiError {
    let rate = limit.requests_per_second.unwrap_or_default();
    let mut error = ApiError::new(
        429,
        "rate_limited",
        format!(
            "{subject} allows {rate} requests per second (bursts of {}); retry in {:.3} s",
            size as u64,
            wait.as_secs_f64()
        ),
    )
    .retry_after(wait);
    stamp(error.headers_mut(), size, 0.0, wait);
    error
}

fn refused_in_flight(subject: Subject<'_>, max: u32) -> ApiError {
    ApiError::new(
        429,
        "too_many_requests_in_flight",
        format!("{subject} allows {max} requests in flight at once; retry when one ends"),
    )
    .retry_after(Duration::from_secs(1))
}

/// Every endpoint's and key's limiter.
#[derive(Default)]
pub(crate) struct Limiters {
    by: RwLock<HashMap<String, Arc<Limiter>>>,
}

impl Limiters {
    /// The limiter for `id` under `settings`, made (or remade, when the settings
    /// changed) on first use.
    fn get(&self, id: &str, settings: &RateLimit) -> Arc<Limiter> {
        if let Some(limiter) = self.by.read().unwrap_or_else(|e| e.into_inner()).get(id)
            && limiter.settings == *settings
        {
            return limiter.clone();
        }
        let mut by = self.by.write().unwrap_or_else(|e| e.into_inner());
        match by.get(id) {
            Some(limiter) if limiter.settings == *settings => limiter.clone(),
            _ => {
                let limiter = Arc::new(Limiter::new(settings));
                by.insert(id.to_owned(), limiter.clone());
                limiter
            }
        }
    }

    /// Forgets the limiter of a removed endpoint or key.
    pub fn forget_endpoint(&self, qualified: &str) {
        self.by
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&format!("e:{qualified}"));
    }

    /// Forgets the limiter of a revoked key.
    pub fn forget_key(&self, id: &str) {
        self.by
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&format!("k:{id}"));
    }

    /// Admits a request of a key with limits `key` to an endpoint with limits
    /// `endpoint`, or says why not (`429`). Nothing is taken from either when one
    /// refuses.
    pub fn admit(
        &self,
        key: Option<(&str, &RateLimit)>,
        endpoint: Option<(&str, &str, &RateLimit)>,
    ) -> Result<Admitted, ApiError> {
        let mut admitted = Admitted::default();
        if key.is_none() && endpoint.is_none() {
            return Ok(admitted);
        }
        let mut limiters: Vec<(Subject<'_>, Arc<Limiter>)> = Vec::with_capacity(2);
        if let Some((id, settings)) = key {
            limiters.push((Subject::Key(id), self.get(&format!("k:{id}"), settings)));
        }
        if let Some((qualified, local, settings)) = endpoint {
            limiters.push((
                Subject::Endpoint(local),
                self.get(&format!("e:{qualified}"), settings),
            ));
        }
        for (subject, limiter) in &limiters {
            if let Some(sem) = &limiter.in_flight {
                match sem.clone().try_acquire_owned() {
                    Ok(permit) => admitted._in_flight.push(permit),
                    Err(_) => {
                        return Err(refused_in_flight(
                            *subject,
                            limiter.settings.max_concurrent.unwrap_or_default(),
                        ));
                    }
                }
            }
        }
        let now = Instant::now();
        let mut taken: Vec<&Bucket> = Vec::with_capacity(2);
        for (subject, limiter) in &limiters {
            let Some(bucket) = &limiter.bucket else {
                continue;
            };
            match bucket.take(now) {
                Ok(left) => {
                    taken.push(bucket);
                    let tighter = admitted
                        .headers
                        .is_none_or(|(_, remaining, _)| left < remaining);
                    if tighter {
                        admitted.headers = Some((bucket.size, left, bucket.refill_time(left)));
                    }
                }
                Err(wait) => {
                    for bucket in taken {
                        bucket.refund();
                    }
                    return Err(refused_rate(*subject, &limiter.settings, bucket.size, wait));
                }
            }
        }
        Ok(admitted)
    }
}

/// What a tenant may hold, set by an operator; an absent field is unlimited. A deploy, an
/// upload or a job that would pass one is refused with the quota named.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    /// Endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<u64>,
    /// Versions, over all its endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<u64>,
    /// Processor instances: the sum of its versions' `limits.max_instances`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u64>,
    /// Workers: the sum of its versions' `scaling.max_workers`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<u64>,
    /// GPUs: the sum of its versions' `scaling.max_workers` × `gpus_per_worker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u64>,
    /// Processor memory in MiB: the sum of its versions' `limits.max_instances` ×
    /// `limits.memory_mib`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// Bytes of components it uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    /// Jobs waiting in its endpoints' queues (`IN_QUEUE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_jobs: Option<u64>,
    /// Not a cap but a share: its weight in the sharing of the cores among tenants whose
    /// guests run long (1 to 1000; 1 when absent). A tenant of weight 2 gets twice the
    /// turns of one of weight 1 while both have guests waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
}

/// What a set of endpoint specs holds, in the terms of a [`Quota`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Holding {
    /// Endpoints.
    pub endpoints: u64,
    /// Versions.
    pub versions: u64,
    /// Processor instances at most.
    pub instances: u64,
    /// Workers at most.
    pub workers: u64,
    /// GPUs at most.
    pub gpus: u64,
    /// Processor memory at most, in MiB.
    pub memory_mib: u64,
}

impl Holding {
    /// Adds an endpoint's spec.
    pub fn add(&mut self, spec: &wasp_core::EndpointSpec) {
        self.endpoints += 1;
        for v in &spec.versions {
            self.versions += 1;
            let instances = if v.processor.is_some() {
                u64::from(v.limits.max_instances)
            } else {
                0
            };
            self.instances += instances;
            self.memory_mib += instances * u64::from(v.limits.memory_mib);
            let workers = u64::from(v.scaling.max_workers);
            self.workers += workers;
            self.gpus += workers * u64::from(v.scaling.gpus_per_worker.unwrap_or(0));
        }
    }
}

impl Quota {
    /// Checks what a tenant would hold after a deploy.
    pub fn check(&self, after: &Holding) -> Result<(), crate::Error> {
        let checks = [
            ("endpoints", self.endpoints, after.endpoints),
            ("versions", self.versions, after.versions),
            ("instances", self.instances, after.instances),
            ("workers", self.workers, after.workers),
            ("gpus", self.gpus, after.gpus),
            ("memory_mib", self.memory_mib, after.memory_mib),
        ];
        for (name, limit, wanted) in checks {
            if let Some(limit) = limit
                && wanted > limit
            {
                return Err(crate::Error::Quota {
                    quota: name,
                    limit,
                    wanted,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn limit(rps: f64, burst: Option<u32>, max: Option<u32>) -> RateLimit {
        RateLimit {
            requests_per_second: Some(rps),
            burst,
            max_concurrent: max,
        }
    }

    #[test]
    fn a_bucket_lets_a_burst_through_then_the_rate() {
        let b = Bucket::new(10.0, 3.0);
        let t = Instant::now();
        assert!(b.take(t).is_ok());
        assert!(b.take(t).is_ok());
        assert_eq!(b.take(t).unwrap(), 0.0);
        let wait = b.take(t).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9, "{wait:?}");
        // A tenth of a second later, one more.
        assert!(b.take(t + Duration::from_millis(100)).is_ok());
        assert!(b.take(t + Duration::from_millis(100)).is_err());
        // Never more than the burst, however long the quiet.
        let later = t + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(b.take(later).is_ok());
        }
        assert!(b.take(later).is_err());
    }

    #[test]
    fn a_refusal_takes_nothing_from_the_other_limit() {
        let limiters = Limiters::default();
        let key = limit(1.0, Some(5), None);
        let endpoint = limit(1.0, Some(1), None);
        let first = limiters
            .admit(Some(("k1", &key)), Some(("e", "e", &endpoint)))
            .unwrap();
        // The tighter bucket (the endpoint's, now empty) speaks for the response.
        let mut headers = HeaderMap::new();
        first.stamp(&mut headers);
        assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
        assert_eq!(headers["x-ratelimit-limit-requests"], "1");
        let refused = limiters
            .admit(Some(("k1", &key)), Some(("e", "e", &endpoint)))
            .unwrap_err();
        assert_eq!(refused.status, 429);
        assert_eq!(refused.code, "rate_limited");
        assert!(
            refused.message.contains("endpoint `e`"),
            "{}",
            refused.message
        );
        // The key kept its four tokens: four more admissions to other endpoints.
        for _ in 0..4 {
            limiters.admit(Some(("k1", &key)), None).unwrap();
        }
        let e = limiters.admit(Some(("k1", &key)), None).unwrap_err();
        assert!(e.message.contains("API key `k1`"), "{}", e.message);
    }

    #[test]
    fn requests_in_flight_are_capped_until_they_end() {
        let limiters = Limiters::default();
        let cap = RateLimit {
            requests_per_second: None,
            burst: None,
            max_concurrent: Some(2),
        };
        let a = limiters.admit(None, Some(("e", "e", &cap))).unwrap();
        let _b = limiters.admit(None, Some(("e", "e", &cap))).unwrap();
        let e = limiters.admit(None, Some(("e", "e", &cap))).unwrap_err();
        assert_eq!(e.code, "too_many_requests_in_flight");
        drop(a);
        limiters.admit(None, Some(("e", "e", &cap))).unwrap();
    }

    #[test]
    fn new_settings_make_a_new_bucket_and_the_same_keep_it() {
        let limiters = Limiters::default();
        let one = limit(1.0, Some(1), None);
        limiters.admit(None, Some(("e", "e", &one))).unwrap();
        assert!(limiters.admit(None, Some(("e", "e", &one))).is_err());
        let two = limit(1.0, Some(2), None);
        limiters.admit(None, Some(("e", "e", &two))).unwrap();
        limiters.admit(None, Some(("e", "e", &two))).unwrap();
        assert!(limiters.admit(None, Some(("e", "e", &two))).is_err());
    }

    #[test]
    fn quotas_name_what_they_refuse() {
        let spec = wasp_core::EndpointSpec::from_toml(
            "name = \"e\"\n[[versions]]\nname = \"v1\"\n[versions.processor]\n\
             component = \"a.wasm\"\n[versions.limits]\nmax_instances = 8\nmemory_mib = 64\n",
        )
        .unwrap();
        let mut held = Holding::default();
        held.add(&spec);
        held.add(&spec);
        assert_eq!(held.instances, 16);
        assert_eq!(held.memory_mib, 1024);
        let quota = Quota {
            instances: Some(10),
            ..Quota::default()
        };
        match quota.check(&held).unwrap_err() {
            crate::Error::Quota {
                quota,
                limit,
                wanted,
            } => assert_eq!((quota, limit, wanted), ("instances", 10, 16)),
            other => panic!("{other}"),
        }
        assert!(Quota::default().check(&held).is_ok());
    }
}
