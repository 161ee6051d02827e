//! A short in-memory history of every version's metrics: one point per [`INTERVAL`], kept
//! for [`RETENTION`], so that the console can plot requests, latency percentiles, workers
//! and queues with no Prometheus in sight (`GET /api/v1/endpoints/{name}/metrics`), and the
//! endpoint list can show each endpoint's recent rate, p99 and errors.
//!
//! Requests fold into a [`Window`] as they are answered (a few atomic adds); the server's
//! upkeep closes the window every [`INTERVAL`] into a point. Latencies are kept as sparse
//! log-scale histograms (four buckets per doubling, within 9% of the true value), so that
//! the percentiles of any span are exact merges rather than averages of percentiles. A
//! point that says nothing new (no traffic, the same workers and queues as the last one)
//! is not stored: an idle version costs one point however long it idles.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// How often a point is taken.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// How long points are kept.
pub const RETENTION: Duration = Duration::from_secs(30 * 60);

const INTERVAL_MS: u64 = INTERVAL.as_millis() as u64;
const KEPT_TICKS: u64 = RETENTION.as_millis() as u64 / INTERVAL_MS;
/// Buckets of a latency histogram: bucket `i` holds `[2^(i/4), 2^((i+1)/4))` µs, so 128
/// buckets reach 2^32 µs (71 minutes); longer latencies land in the last.
const BUCKETS: usize = 128;

/// The interval a wall-clock time falls in.
pub(crate) fn tick_of(ms: u64) -> u64 {
    ms / INTERVAL_MS
}

/// A histogram's non-empty buckets, by index, ascending.
type Sparse = Box<[(u8, u32)]>;

/// Latencies observed since the window last closed, one atomic count per bucket.
struct Buckets(Box<[AtomicU32]>);

impl Buckets {
    fn new() -> Self {
        Self((0..BUCKETS).map(|_| AtomicU32::new(0)).collect())
    }

    fn observe(&self, seconds: f64) {
        let us = (seconds * 1e6).max(1.0);
        let index = ((us.log2() * 4.0) as usize).min(BUCKETS - 1);
        self.0[index].fetch_add(1, Ordering::Relaxed);
    }

    fn take(&self) -> Sparse {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, count)| {
                let n = count.swap(0, Ordering::Relaxed);
                (n > 0).then_some((i as u8, n))
            })
            .collect()
    }
}

/// The midpoint of bucket `index`, in milliseconds.
fn bucket_ms(index: u8) -> f64 {
    2f64.powf((f64::from(index) + 0.5) / 4.0) / 1e3
}

/// The `q` quantile (0..=1) of a merged histogram, in milliseconds; `None` when empty.
fn quantile(histogram: &[u32; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = histogram.iter().map(|n| u64::from(*n)).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (i, n) in histogram.iter().enumerate() {
        seen += u64::from(*n);
        if seen >= rank {
            return Some(bucket_ms(i as u8));
        }
    }
    None
}

fn merge(into: &mut [u32; BUCKETS], sparse: &[(u8, u32)]) {
    for (i, n) in sparse {
        let slot = &mut into[usize::from(*i)];
        *slot = slot.saturating_add(*n);
    }
}

/// What one version's requests did since the window last closed. Lives as long as the
/// version's name does, across redeploys.
pub(crate) struct Window {
    changed: AtomicBool,
    requests: AtomicU32,
    client_errors: AtomicU32,
    server_errors: AtomicU32,
    tokens: AtomicU64,
    latency: Buckets,
    ttft: Buckets,
    tpot: Buckets,
}

impl Window {
    fn new() -> Self {
        Self {
            changed: AtomicBool::new(false),
            requests: AtomicU32::new(0),
            client_errors: AtomicU32::new(0),
            server_errors: AtomicU32::new(0),
            tokens: AtomicU64::new(0),
            latency: Buckets::new(),
            ttft: Buckets::new(),
            tpot: Buckets::new(),
        }
    }

    /// One data-route answer: its status code and latency.
    pub fn request(&self, code: u16, seconds: f64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match code {
            400..=499 => self.client_errors.fetch_add(1, Ordering::Relaxed),
            500.. => self.server_errors.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        self.latency.observe(seconds);
        self.changed.store(true, Ordering::Release);
    }

    /// One generation's figures: tokens generated, time to first token and per output
    /// token, in seconds.
    pub fn generation(&self, tokens: u64, ttft: Option<f64>, tpot: Option<f64>) {
        self.tokens.fetch_add(tokens, Ordering::Relaxed);
        if let Some(s) = ttft {
            self.ttft.observe(s);
        }
        if let Some(s) = tpot {
            self.tpot.observe(s);
        }
        self.changed.store(true, Ordering::Release);
    }
}

/// The gauges of a version at a tick.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Gauges {
    /// Workers the autoscaler wants.
    pub desired: u32,
    /// Workers ready.
    pub ready: u32,
    /// Workers starting.
    pub starting: u32,
    /// Requests waiting for an instance or a forward pass.
    pub waiting: u32,
}

/// One interval of a version.
#[derive(Debug, Clone, Default)]
struct Point {
    requests: u32,
    client_errors: u32,
    server_errors: u32,
    tokens: u64,
    cold_starts: u32,
    latency: Sparse,
    ttft: Sparse,
    tpot: Sparse,
    gauges: Gauges,
}

impl Point {
    fn quiet(&self) -> bool {
        self.requests == 0
            && self.tokens == 0
            && self.cold_starts == 0
            && self.ttft.is_empty()
            && self.tpot.is_empty()
    }
}

/// One interval of an endpoint's jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct JobGauges {
    /// Jobs waiting.
    pub queued: u64,
    /// Jobs running.
    pub in_progress: u64,
}

/// A version's window and its points, oldest first.
struct Series {
    window: Arc<Window>,
    points: Mutex<VecDeque<(u64, Point)>>,
    cold_seen: AtomicU64,
}

impl Series {
    fn new(window: Arc<Window>) -> Self {
        Self {
            window,
            points: Mutex::default(),
            cold_seen: AtomicU64::new(0),
        }
    }
}

/// Stores `point` unless it says nothing new, and drops what is past the retention (but
/// the newest point before it, whose gauges still hold).
fn keep<P>(points: &mut VecDeque<(u64, P)>, tick: u64, point: P, same: impl Fn(&P) -> bool) {
    if points.back().is_none_or(|(_, last)| !same(last)) {
        points.push_back((tick, point));
    }
    let oldest = tick.saturating_sub(KEPT_TICKS);
    while points.len() > 1 && points.get(1).is_some_and(|(t, _)| *t <= oldest) {
        points.pop_front();
    }
}

/// The histories of every version and every endpoint's jobs on this node.
#[derive(Default)]
pub(crate) struct History {
    versions: RwLock<HashMap<(String, String), Arc<Series>>>,
    jobs: Mutex<HashMap<String, VecDeque<(u64, JobGauges)>>>,
}

/// What a version did over a recent span, for the endpoint list.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Recent {
    /// Requests answered per second.
    pub requests_per_s: f64,
    /// Answers with a 4xx or 5xx status.
    pub errors: u64,
    /// The 99th percentile of latency, in milliseconds (none without requests).
    pub p99_ms: Option<f64>,
    /// Requests that waited for a worker to start.
    pub cold_starts: u64,
}

/// A version's columns. Latency percentiles are `null` where a column had no requests.
#[derive(Debug, Default, serde::Serialize, utoipa::ToSchema)]
pub struct VersionHistory {
    /// Version name.
    pub version: String,
    /// Requests answered per second (sync routes: invoke, OpenAI, KServe).
    pub requests_per_s: Vec<f64>,
    /// Answers with a 4xx status.
    pub client_errors: Vec<u64>,
    /// Answers with a 5xx status.
    pub server_errors: Vec<u64>,
    /// Median latency, in milliseconds.
    pub p50_ms: Vec<Option<f64>>,
    /// 90th percentile of latency, in milliseconds.
    pub p90_ms: Vec<Option<f64>>,
    /// 99th percentile of latency, in milliseconds.
    pub p99_ms: Vec<Option<f64>>,
    /// Generation: median time to first token, in milliseconds.
    pub ttft_p50_ms: Vec<Option<f64>>,
    /// Generation: median time per output token, in milliseconds.
    pub tpot_p50_ms: Vec<Option<f64>>,
    /// Generation: tokens generated per second.
    pub tokens_per_s: Vec<f64>,
    /// Requests that waited for a worker to start.
    pub cold_starts: Vec<u64>,
    /// Workers the autoscaler wanted, at each column's end.
    pub workers_desired: Vec<u32>,
    /// Workers ready, at each column's end.
    pub workers_ready: Vec<u32>,
    /// Workers starting (or waiting for GPUs), at each column's end.
    pub workers_starting: Vec<u32>,
    /// Requests waiting for an instance or a forward pass, at each column's end.
    pub waiting: Vec<u32>,
}

impl History {
    /// The window of `endpoint`'s `version`, made on first use.
    pub fn window(&self, endpoint: &str, version: &str) -> Arc<Window> {
        let key = (endpoint.to_owned(), version.to_owned());
        if let Some(series) = self.read().get(&key) {
            return series.window.clone();
        }
        let mut versions = self.versions.write().unwrap_or_else(|e| e.into_inner());
        versions
            .entry(key)
            .or_insert_with(|| Arc::new(Series::new(Arc::new(Window::new()))))
            .window
            .clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<(String, String), Arc<Series>>> {
        self.versions.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes `version`'s `window` at `tick` with its gauges now and its cold starts so
    /// far. A version deployed while [`History::retain`] ran has its series made again.
    pub fn close(
        &self,
        endpoint: &str,
        version: &str,
        window: &Arc<Window>,
        tick: u64,
        gauges: Gauges,
        cold: u64,
    ) {
        let key = (endpoint.to_owned(), version.to_owned());
        let found = self.read().get(&key).cloned();
        let series = match found {
            Some(series) if Arc::ptr_eq(&series.window, window) => series,
            _ => self
                .versions
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key)
                .and_modify(|s| {
                    if !Arc::ptr_eq(&s.window, window) {
                        *s = Arc::new(Series::new(window.clone()));
                    }
                })
                .or_insert_with(|| Arc::new(Series::new(window.clone())))
                .clone(),
        };
        let w = &series.window;
        let seen = series.cold_seen.swap(cold, Ordering::Relaxed);
        let mut point = Point {
            cold_starts: u32::try_from(cold.saturating_sub(seen)).unwrap_or(u32::MAX),
            gauges,
            ..Point::default()
        };
        if w.changed.swap(false, Ordering::Acquire) {
            point.requests = w.requests.swap(0, Ordering::Relaxed);
            point.client_errors = w.client_errors.swap(0, Ordering::Relaxed);
            point.server_errors = w.server_errors.swap(0, Ordering::Relaxed);
            point.tokens = w.tokens.swap(0, Ordering::Relaxed);
            point.latency = w.latency.take();
            point.ttft = w.ttft.take();
            point.tpot = w.tpot.take();
        }
        let quiet = point.quiet();
        let mut points = series.points.lock().unwrap_or_else(|e| e.into_inner());
        // A quiet tick is the last point's gauges carried on, with counters at zero.
        keep(&mut points, tick, point, |last| {
            quiet && last.gauges == gauges
        });
    }

    /// Closes `endpoint`'s jobs at `tick`.
    pub fn close_jobs(&self, endpoint: &str, tick: u64, gauges: JobGauges) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let points = jobs.entry(endpoint.to_owned()).or_default();
        keep(points, tick, gauges, |last| *last == gauges);
    }

    /// Forgets what is not in `live` (endpoint, version) any more.
    pub fn retain(&self, live: &std::collections::HashSet<(String, String)>) {
        let endpoints: std::collections::HashSet<&str> =
            live.iter().map(|(e, _)| e.as_str()).collect();
        self.versions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|key, _| live.contains(key));
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|endpoint, _| endpoints.contains(endpoint.as_str()));
    }

    /// `version`'s columns over the ticks `from..to`, `step` ticks a column: counters
    /// summed, histograms merged, gauges as they stood at each column's end.
    pub fn columns(
        &self,
        endpoint: &str,
        version: &str,
        from: u64,
        to: u64,
        step: u64,
    ) -> VersionHistory {
        let mut c = VersionHistory {
            version: version.to_owned(),
            ..VersionHistory::default()
        };
        let step = step.max(1);
        let series = self
            .read()
            .get(&(endpoint.to_owned(), version.to_owned()))
            .cloned();
        let empty = std::sync::Mutex::new(VecDeque::new());
        let points = series
            .as_ref()
            .map_or(&empty, |s| &s.points)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // The span's points, read in place; the newest one before it sets the gauges the
        // span starts with.
        let first = points.partition_point(|(t, _)| *t < from);
        let mut gauges = first
            .checked_sub(1)
            .and_then(|i| points.get(i))
            .map_or_else(Gauges::default, |(_, p)| p.gauges);
        let mut next = points.range(first..).peekable();
        let seconds = (step * INTERVAL_MS) as f64 / 1e3;
        let mut start = from;
        while start < to {
            let end = (start + step).min(to);
            let (mut requests, mut client, mut server, mut tokens, mut cold) = (0u64, 0, 0, 0, 0);
            let mut latency = [0u32; BUCKETS];
            let mut ttft = [0u32; BUCKETS];
            let mut tpot = [0u32; BUCKETS];
            while let Some((_, p)) = next.next_if(|(t, _)| *t < end) {
                requests += u64::from(p.requests);
                client += u64::from(p.client_errors);
                server += u64::from(p.server_errors);
                tokens += p.tokens;
                cold += u64::from(p.cold_starts);
                merge(&mut latency, &p.latency);
                merge(&mut ttft, &p.ttft);
                merge(&mut tpot, &p.tpot);
                gauges = p.gauges;
            }
            c.requests_per_s.push(requests as f64 / seconds);
            c.client_errors.push(client);
            c.server_errors.push(server);
            c.p50_ms.push(quantile(&latency, 0.5));
            c.p90_ms.push(quantile(&latency, 0.9));
            c.p99_ms.push(quantile(&latency, 0.99));
            c.ttft_p50_ms.push(quantile(&ttft, 0.5));
            c.tpot_p50_ms.push(quantile(&tpot, 0.5));
            c.tokens_per_s.push(tokens as f64 / seconds);
            c.cold_starts.push(cold);
            c.workers_desired.push(gauges.desired);
            c.workers_ready.push(gauges.ready);
            c.workers_starting.push(gauges.starting);
            c.waiting.push(gauges.waiting);
            start = end;
        }
        c
    }

    /// `endpoint`'s jobs over the ticks `from..to`, as they stood at the end of each step.
    pub fn job_columns(
        &self,
        endpoint: &str,
        from: u64,
        to: u64,
        step: u64,
    ) -> (Vec<u64>, Vec<u64>) {
        let step = step.max(1);
        let points: Vec<(u64, JobGauges)> = self
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(endpoint)
            .map(|p| p.iter().copied().collect())
            .unwrap_or_default();
        let mut next = points.iter().peekable();
        let mut gauges = JobGauges::default();
        let (mut queued, mut running) = (Vec::new(), Vec::new());
        let mut start = from;
        while start < to {
            let end = (start + step).min(to);
            while let Some((_, g)) = next.next_if(|(t, _)| *t < end) {
                gauges = *g;
            }
            queued.push(gauges.queued);
            running.push(gauges.in_progress);
            start = end;
        }
        (queued, running)
    }

    /// What `version` did over the last `ticks` intervals before `now`.
    pub fn recent(&self, endpoint: &str, version: &str, now: u64, ticks: u64) -> Recent {
        let c = self.columns(endpoint, version, now.saturating_sub(ticks), now, ticks);
        Recent {
            requests_per_s: c.requests_per_s.first().copied().unwrap_or(0.0),
            errors: c.client_errors.first().copied().unwrap_or(0)
                + c.server_errors.first().copied().unwrap_or(0),
            p99_ms: c.p99_ms.first().copied().flatten(),
            cold_starts: c.cold_starts.first().copied().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn percentiles_are_within_a_bucket_of_the_truth() {
        let w = Buckets::new();
        for ms in 1..=1000 {
            w.observe(f64::from(ms) / 1e3);
        }
        let mut merged = [0u32; BUCKETS];
        merge(&mut merged, &w.take());
        for (q, truth) in [(0.5, 500.0), (0.9, 900.0), (0.99, 990.0)] {
            let got = quantile(&merged, q).unwrap();
            assert!(
                (got / truth - 1.0).abs() < 0.1,
                "p{q}: {got} against {truth}"
            );
        }
        assert_eq!(quantile(&[0; BUCKETS], 0.5), None);
        // Nothing is left behind in the window.
        assert!(w.take().is_empty());
    }

    #[test]
    fn columns_sum_counters_merge_latencies_and_carry_gauges() {
        let h = History::default();
        let w = h.window("e", "v1");
        let gauges = |ready| Gauges {
            desired: ready,
            ready,
            starting: 0,
            waiting: 0,
        };
        // Ticks 10 and 11: traffic on two workers; then idle from 12 on.
        for (tick, ms) in [(10, 1.0), (11, 100.0)] {
            for _ in 0..10 {
                w.request(200, ms / 1e3);
            }
            w.request(503, ms / 1e3);
            h.close("e", "v1", &w, tick, gauges(2), 0);
        }
        for tick in 12..20 {
            h.close("e", "v1", &w, tick, gauges(2), 0);
        }
        // Idle ticks with unchanged gauges are not stored.
        assert_eq!(
            h.read()[&("e".into(), "v1".into())]
                .points
                .lock()
                .unwrap()
                .len(),
            2
        );
        h.close("e", "v1", &w, 20, gauges(0), 1);

        let c = h.columns("e", "v1", 8, 22, 2);
        assert_eq!(c.requests_per_s, [0.0, 22.0 / 4.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(c.server_errors, [0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(c.workers_ready, [0, 2, 2, 2, 2, 2, 0]);
        assert_eq!(c.cold_starts, [0, 0, 0, 0, 0, 0, 1]);
        let p50 = c.p50_ms[1].unwrap();
        let p99 = c.p99_ms[1].unwrap();
        assert!(p50 < 1.1 && p99 > 90.0, "p50 {p50}, p99 {p99}");
        assert_eq!(c.p50_ms[2], None);

        let recent = h.recent("e", "v1", 12, 5);
        assert_eq!(recent.errors, 2);
        assert!((recent.requests_per_s - 22.0 / 10.0).abs() < 1e-9);
    }

    #[test]
    fn old_points_go_but_the_gauges_before_the_span_hold() {
        let h = History::default();
        let w = h.window("e", "v1");
        let g = Gauges {
            desired: 3,
            ready: 3,
            starting: 0,
            waiting: 0,
        };
        h.close("e", "v1", &w, 1, g, 0);
        h.close("e", "v1", &w, 5, Gauges::default(), 0);
        h.close("e", "v1", &w, 10 + KEPT_TICKS, g, 0);
        let points = h.read()[&("e".into(), "v1".into())]
            .points
            .lock()
            .unwrap()
            .len();
        assert_eq!(points, 2);
        let c = h.columns("e", "v1", 9 + KEPT_TICKS, 11 + KEPT_TICKS, 1);
        assert_eq!(c.workers_ready, [0, 3]);
        h.retain(&std::collections::HashSet::new());
        assert!(h.read().is_empty());
    }

    #[test]
    fn a_version_forgotten_while_it_deployed_keeps_its_window() {
        let h = History::default();
        // Deploying: the version has its window, but is not live yet when retain runs.
        let w = h.window("e", "v1");
        h.retain(&std::collections::HashSet::new());
        w.request(200, 0.001);
        h.close("e", "v1", &w, 7, Gauges::default(), 0);
        let c = h.columns("e", "v1", 7, 8, 1);
        assert_eq!(c.requests_per_s, [0.5]);
        assert!(Arc::ptr_eq(&h.window("e", "v1"), &w));
    }
}
