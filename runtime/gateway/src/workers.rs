//! Workers: the replicas of a version that the autoscaler adds and removes.
//!
//! A worker of a model backend is one loaded copy of the model behind its own batcher; a
//! worker of backend `none` is `instances_per_worker` warm processor instances. Each has a
//! lifecycle (`starting` → `ready` → `draining` → gone, or `failed` with a reason), and the
//! version's processor keeps `instances_per_worker` warm instances for every live worker,
//! down to none at zero workers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use wasp_backend::{BackendError, BackendFactory, Batcher, LoadContext};
use wasp_core::{BackendSpec, BatchingSpec, RolloutSpec};
use wasp_scaling::{Autoscaler, Clock, Decision, Inventory, Load, Meter, Policy, Side, Trigger};
use wasp_wasm::Processor;

/// Scaling events kept per endpoint.
const EVENT_CAPACITY: usize = 1000;
/// How long a worker started here for a waiting request is kept against a cluster
/// placement decided before the cluster's scaler could hear of it (cluster mode).
const WAKE_GRACE_MS: u64 = 15_000;

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Loading its model or creating its instances.
    Starting,
    /// Serving.
    Ready,
    /// Finishing what it holds; takes no new requests.
    Draining,
    /// Could not start; the reason says why.
    Failed,
    /// Waiting for the GPUs it needs; holds none and serves nothing.
    Pending,
}

/// One worker of a version.
pub struct Worker {
    /// Its number within the version.
    pub id: u64,
    state: Mutex<(WorkerState, Option<String>, SystemTime)>,
    batcher: Mutex<Option<Arc<Batcher>>>,
    in_flight: AtomicU64,
    gpus: Mutex<Vec<u32>>,
}

/// A request (or stream) counted in flight on a worker until dropped.
pub(crate) struct InFlight(Arc<Worker>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Worker {
    fn new(id: u64) -> Self {
        Self {
            id,
            state: Mutex::new((WorkerState::Starting, None, SystemTime::now())),
            batcher: Mutex::new(None),
            in_flight: AtomicU64::new(0),
            gpus: Mutex::new(Vec::new()),
        }
    }

    /// The GPUs it owns.
    pub fn gpus(&self) -> Vec<u32> {
        self.gpus.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Its state, the reason of a failure, and since when.
    pub fn state(&self) -> (WorkerState, Option<String>, SystemTime) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, state: WorkerState, reason: Option<String>) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (state, reason, SystemTime::now());
    }

    fn is(&self, state: WorkerState) -> bool {
        self.state().0 == state
    }

    /// Moves it from `from` to `to`; false when it was not in `from`.
    fn transition(&self, from: WorkerState, to: WorkerState) -> bool {
        self.transition_with(from, to, None)
    }

    /// Moves it from `from` to `to` with a reason; false when it was not in `from`.
    fn transition_with(&self, from: WorkerState, to: WorkerState, reason: Option<String>) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 != from {
            return false;
        }
        let since = if state.0 == to {
            state.2
        } else {
            SystemTime::now()
        };
        *state = (to, reason, since);
        true
    }

    /// Its batcher, once a model worker is ready.
    pub fn batcher(&self) -> Option<Arc<Batcher>> {
        self.batcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Requests it holds now.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// What a worker of this version is made of.
enum Kind {
    /// Warm processor instances only (backend `none`).
    Instances,
    /// A loaded model behind a batcher.
    Model(Box<ModelKind>),
}

/// How a model worker loads its model and batches its requests.
struct ModelKind {
    factory: Arc<dyn BackendFactory>,
    spec: BackendSpec,
    batching: BatchingSpec,
    context: LoadContext,
}

/// Why a worker could not start.
#[derive(Debug)]
pub(crate) enum StartError {
    /// Its processor instances could not be made.
    Warm(wasp_wasm::CallError),
    /// Its model could not be loaded.
    Backend(BackendError),
    /// The loading task died.
    Task(String),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Warm(e) => write!(f, "{e}"),
            Self::Backend(e) => write!(f, "{e}"),
            Self::Task(e) => f.write_str(e),
        }
    }
}

/// Why a request could not get a worker.
#[derive(Debug)]
pub(crate) enum WakeError {
    /// None became ready within the cold-start timeout.
    Timeout(Duration),
    /// The worker that was starting failed.
    Failed(String),
}

/// A scaling event, kept per endpoint.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ScaleEvent {
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The version.
    pub version: String,
    /// Workers before.
    pub from: u32,
    /// Workers after.
    pub to: u32,
    /// The policy that decided: `target_tracking`, `panic`, `step[i]`, `bounds`,
    /// `schedule[i]`, `wake`, `worker_failed`, `worker_restarting` and `worker_recovered`
    /// (a backend that stopped serving on its own, and its return), or `rollout` (a rolling
    /// update).
    pub trigger: String,
    /// Why, for people.
    pub reason: String,
}

/// The scaling events of one endpoint, oldest first.
#[derive(Default)]
pub struct EventLog {
    events: Mutex<VecDeque<ScaleEvent>>,
}

impl EventLog {
    fn push(&self, event: ScaleEvent) {
        tracing::info!(
            version = %event.version,
            from = event.from,
            to = event.to,
            trigger = %event.trigger,
            "scaling: {}",
            event.reason
        );
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        if events.len() == EVENT_CAPACITY {
            events.pop_front();
        }
        events.push_back(event);
    }

    /// The newest `limit` events, oldest first.
    pub fn recent(&self, limit: usize) -> Vec<ScaleEvent> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let skip = events.len().saturating_sub(limit);
        events.iter().skip(skip).cloned().collect()
    }
}

/// Counts of a version's workers by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerCounts {
    /// Starting.
    pub starting: u32,
    /// Ready.
    pub ready: u32,
    /// Draining.
    pub draining: u32,
    /// Failed.
    pub failed: u32,
    /// Waiting for GPUs.
    pub pending: u32,
}

/// Cold starts of a version, for the metrics.
#[derive(Debug, Default)]
pub struct ColdStarts {
    /// How many.
    pub count: AtomicU64,
    /// Their durations, not yet observed by the metrics.
    pending: Mutex<Vec<f64>>,
}

impl ColdStarts {
    /// Durations (seconds) since the last call.
    pub fn take(&self) -> Vec<f64> {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The workers of one version, its in-flight meter and its autoscaler.
pub struct WorkerSet {
    endpoint: String,
    version: String,
    kind: Kind,
    /// The processor its instances are made from, and how many per worker: replaced
    /// together when a new spec changes the processor but not the model.
    feed: RwLock<Feed>,
    workers: RwLock<Vec<Arc<Worker>>>,
    ready: watch::Sender<u32>,
    next_id: AtomicU64,
    desired: AtomicU32,
    /// In-flight requests, time-weighted: the autoscaler's signal.
    pub meter: Meter,
    scaler: Mutex<Autoscaler>,
    clock: Arc<dyn Clock>,
    events: Arc<EventLog>,
    gpus_per_worker: Option<u32>,
    inventory: Arc<Inventory>,
    /// Cold starts.
    pub cold_starts: ColdStarts,
    /// Batches and requests of workers already gone, so that the counters never go back.
    retired: (AtomicU64, AtomicU64),
    /// Its workers are being started by a rolling update, not by its autoscaler.
    rolling: AtomicBool,
    /// A rolling update is replacing it: it starts no worker, and a request that reaches it
    /// when none serves any more goes to its successor.
    retiring: AtomicBool,
    successor: Mutex<Weak<WorkerSet>>,
    /// The load over the scaling windows at the last autoscaler step.
    load: Mutex<Load>,
    /// When a request that found no worker last started one here (ms since the epoch).
    woke_at_ms: AtomicU64,
    /// When the placement this node follows for it was decided (cluster mode).
    followed_ms: AtomicU64,
    /// What its model takes and gives, from the last backend loaded.
    signature: Mutex<Option<wasp_backend::Signature>>,
}

/// A version's share of its endpoint's queued jobs that may scale it up: by its weight in
/// percent, rounded up (so that a version with any weight wakes for one job).
pub(crate) fn backlog_share(backlog: u64, weight: u32) -> u64 {
    (backlog * u64::from(weight)).div_ceil(100)
}

/// How many of a version's workers the cluster's scaler placed on this node (cluster
/// mode), and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    /// Workers for this node.
    pub workers: u32,
    /// The node whose scaler decided.
    pub leader: String,
    /// Why, for people.
    pub reason: String,
    /// When it was decided, in milliseconds since the Unix epoch.
    pub decided_at_ms: u64,
}

/// What feeds a version's workers: its processor and the instances kept per worker.
#[derive(Clone)]
struct Feed {
    processor: Option<Processor>,
    instances_per_worker: u32,
    cold_start_timeout: Duration,
    /// How long a draining worker may finish what it holds.
    grace: Duration,
}

impl Feed {
    /// Drops idle instances beyond `keep` that have been idle for `idle`.
    fn trim(&self, keep: usize, idle: Duration) {
        if let Some(processor) = &self.processor {
            processor.trim(keep, idle);
        }
    }

    /// Makes `count` instances warm; with `wait`, a full pool that queues makes each
    /// wait for a slot (a worker that calls wait for), else it fails at once (upkeep).
    async fn warm(&self, count: u32, wait: bool) -> Result<(), StartError> {
        let Some(processor) = &self.processor else {
            return Ok(());
        };
        match wait {
            true => processor.warm_waiting(count).await,
            false => processor.warm(count).await,
        }
        .map_err(StartError::Warm)
    }
}

/// What a version needs to build its workers.
pub(crate) struct WorkerSetConfig {
    pub endpoint: String,
    pub version: String,
    pub processor: Option<Processor>,
    pub model: Option<(
        Arc<dyn BackendFactory>,
        BackendSpec,
        BatchingSpec,
        LoadContext,
    )>,
    pub policy: Policy,
    pub rollout: RolloutSpec,
    pub clock: Arc<dyn Clock>,
    pub events: Arc<EventLog>,
    pub inventory: Arc<Inventory>,
}

impl WorkerSet {
    pub(crate) fn new(config: WorkerSetConfig) -> Arc<Self> {
        let spec = config.policy.spec().clone();
        let kind = match config.model {
            None => Kind::Instances,
            Some((factory, spec, batching, context)) => Kind::Model(Box::new(ModelKind {
                factory,
                spec,
                batching,
                context,
            })),
        };
        let now = config.clock.now();
        Arc::new(Self {
            endpoint: config.endpoint,
            version: config.version,
            kind,
            feed: RwLock::new(Feed {
                processor: config.processor,
                instances_per_worker: spec.instances_per_worker,
                cold_start_timeout: Duration::from_secs(spec.cold_start_timeout_s.into()),
                grace: Duration::from_secs(config.rollout.grace_period_s.into()),
            }),
            workers: RwLock::new(Vec::new()),
            ready: watch::channel(0).0,
            next_id: AtomicU64::new(1),
            desired: AtomicU32::new(0),
            meter: Meter::new(),
            scaler: Mutex::new(Autoscaler::new(config.policy, 0, now)),
            clock: config.clock,
            events: config.events,
            gpus_per_worker: spec.gpus_per_worker,
            inventory: config.inventory,
            cold_starts: ColdStarts::default(),
            retired: (AtomicU64::new(0), AtomicU64::new(0)),
            rolling: AtomicBool::new(false),
            retiring: AtomicBool::new(false),
            successor: Mutex::new(Weak::new()),
            load: Mutex::new(Load::default()),
            woke_at_ms: AtomicU64::new(0),
            followed_ms: AtomicU64::new(0),
            signature: Mutex::new(None),
        })
    }

    /// Workers to start at deploy: `initial_workers`, else `min_workers` and at least one,
    /// so that a deploy proves the version can start (a version with `min_workers = 0`
    /// then scales down).
    pub(crate) fn initial(&self) -> u32 {
        let scaler = self.lock_scaler();
        let spec = scaler.policy().spec();
        spec.initial_workers
            .unwrap_or_else(|| spec.min_workers.max(1))
    }

    /// The tensors its model takes and gives, as the last backend it loaded said (none
    /// before one has loaded, or when the backend does not know).
    pub fn signature(&self) -> Option<wasp_backend::Signature> {
        self.signature
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether its workers run a model backend.
    pub fn has_model(&self) -> bool {
        matches!(self.kind, Kind::Model(_))
    }

    /// Workers wanted now.
    pub fn desired(&self) -> u32 {
        self.desired.load(Ordering::Relaxed)
    }

    /// Its workers, oldest first.
    pub fn list(&self) -> Vec<Arc<Worker>> {
        self.read().clone()
    }

    /// Its workers by state.
    pub fn counts(&self) -> WorkerCounts {
        let mut counts = WorkerCounts::default();
        for w in self.read().iter() {
            match w.state().0 {
                WorkerState::Starting => counts.starting += 1,
                WorkerState::Ready => counts.ready += 1,
                WorkerState::Draining => counts.draining += 1,
                WorkerState::Failed => counts.failed += 1,
                WorkerState::Pending => counts.pending += 1,
            }
        }
        counts
    }

    /// Batches and requests served by its model workers, gone ones included.
    pub fn batch_totals(&self) -> (u64, u64) {
        let (mut batches, mut requests) = (
            self.retired.0.load(Ordering::Relaxed),
            self.retired.1.load(Ordering::Relaxed),
        );
        for w in self.read().iter() {
            if let Some(b) = w.batcher() {
                batches += b.stats().batches.load(Ordering::Relaxed);
                requests += b.stats().requests.load(Ordering::Relaxed);
            }
        }
        (batches, requests)
    }

    /// Requests queued at its model workers.
    pub fn backend_queued(&self) -> usize {
        self.read()
            .iter()
            .filter_map(|w| w.batcher())
            .map(|b| b.queued())
            .sum()
    }

    /// Starts `count` workers at deploy and waits for them; the first failure is the
    /// deploy's error.
    pub(crate) async fn start_initial(
        self: &Arc<Self>,
        count: u32,
        prove: bool,
    ) -> Result<(), StartError> {
        if count == 0
            && prove
            && let Some(processor) = self.feed().processor
        {
            // Scaled to zero from the start: the processor is proved to instantiate, and
            // its instance dropped at once.
            processor.prove().await.map_err(StartError::Warm)?;
        }
        let workers: Vec<_> = (0..count).map(|_| self.add_worker()).collect();
        let mut failure = None;
        for worker in &workers {
            if let Err(e) = self.start(worker.clone()).await {
                failure.get_or_insert(e);
            }
        }
        if let Some(e) = failure {
            self.remove_all();
            return Err(e);
        }
        self.desired.store(count, Ordering::Relaxed);
        self.lock_scaler().reset(count, self.clock.now());
        Ok(())
    }

    /// Waits until a worker is ready, waking the version when it has none; the cold start
    /// is counted and timed.
    pub(crate) async fn wait_ready(self: &Arc<Self>) -> Result<(), WakeError> {
        if *self.ready.borrow() > 0 {
            return Ok(());
        }
        let started = Instant::now();
        let mut ready = self.ready.subscribe();
        self.wake();
        let waited = tokio::time::timeout(self.feed().cold_start_timeout, async {
            loop {
                if *ready.borrow_and_update() > 0 {
                    return Ok(());
                }
                if let Some(reason) = self.failed_while_none_live() {
                    return Err(WakeError::Failed(reason));
                }
                if ready.changed().await.is_err() {
                    return Err(WakeError::Failed("the version was removed".into()));
                }
            }
        })
        .await;
        match waited {
            Ok(Ok(())) => {
                self.cold_starts.count.fetch_add(1, Ordering::Relaxed);
                self.cold_starts
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(started.elapsed().as_secs_f64());
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(WakeError::Timeout(self.feed().cold_start_timeout)),
        }
    }

    /// The ready model worker with the shortest queue, waking the version if none is.
    /// Once a rolling update retires the version, a request that reached it before the
    /// switch is served by a draining worker, or by the successor when none is left.
    pub(crate) async fn pick(self: &Arc<Self>) -> Result<Arc<Worker>, WakeError> {
        loop {
            if let Some(worker) = self.least_queued(WorkerState::Ready) {
                return Ok(worker);
            }
            if self.retiring.load(Ordering::Acquire) {
                if let Some(worker) = self.least_queued(WorkerState::Draining) {
                    return Ok(worker);
                }
                let successor = self
                    .successor
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .upgrade();
                return match successor {
                    Some(next) => Box::pin(next.pick()).await,
                    None => Err(WakeError::Failed("the version was replaced".into())),
                };
            }
            self.wait_ready().await?;
        }
    }

    /// The worker in `state` with a model and the shortest queue.
    fn least_queued(&self, state: WorkerState) -> Option<Arc<Worker>> {
        self.read()
            .iter()
            .filter(|w| w.is(state))
            .filter_map(|w| w.batcher().map(|b| (w.clone(), b.queued())))
            .min_by_key(|(_, queued)| *queued)
            .map(|(w, _)| w)
    }

    /// A ready worker's batcher (waking the version if none is ready), counted in flight
    /// on that worker until the guard is dropped.
    async fn ready_batcher(self: &Arc<Self>) -> Result<(Arc<Batcher>, InFlight), BackendError> {
        let worker = self.pick().await.map_err(|e| match e {
            WakeError::Timeout(t) => BackendError::Unavailable(format!(
                "no worker became ready within the cold-start timeout ({}s)",
                t.as_secs()
            )),
            WakeError::Failed(reason) => {
                BackendError::Unavailable(format!("the worker failed to start: {reason}"))
            }
        })?;
        let batcher = worker
            .batcher()
            .ok_or_else(|| BackendError::Unavailable("the worker has no model".into()))?;
        worker.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok((batcher, InFlight(worker)))
    }

    /// Runs model input through a ready worker.
    pub(crate) async fn infer(
        self: &Arc<Self>,
        input: wasp_core::ModelInput,
    ) -> Result<wasp_core::ModelOutput, BackendError> {
        let (batcher, _in_flight) = self.ready_batcher().await?;
        batcher.infer(input).await
    }

    /// Runs model input through a ready worker and hands back its output chunks as they
    /// come (a generation backend's tokens). The worker counts the stream as in flight
    /// until the returned guard is dropped, so that it is not drained away mid-stream.
    pub(crate) async fn infer_stream(
        self: &Arc<Self>,
        input: wasp_core::ModelInput,
    ) -> Result<(wasp_backend::OutputStream, InFlight), BackendError> {
        let (batcher, guard) = self.ready_batcher().await?;
        let stream = batcher.infer_stream(input).await?;
        Ok((stream, guard))
    }

    /// Sends an HTTP request as it came to a ready worker's backend (a container without a
    /// processor). The worker counts it as in flight until the returned guard is dropped,
    /// so that it is not drained away while the answer streams.
    pub(crate) async fn forward(
        self: &Arc<Self>,
        request: wasp_backend::RawRequest,
    ) -> Result<(wasp_backend::RawResponse, InFlight), BackendError> {
        let (batcher, guard) = self.ready_batcher().await?;
        let response = batcher.backend().forward(request).await?;
        Ok((response, guard))
    }

    /// What the version's self-scheduling backends (generation) are doing, summed over its
    /// workers; `None` when its backend batches whole requests.
    pub fn generation_load(&self) -> Option<wasp_backend::GenerationLoad> {
        let mut total: Option<wasp_backend::GenerationLoad> = None;
        for worker in self.read().iter() {
            if let Some(load) = worker.batcher().and_then(|b| b.backend().load()) {
                let sum = total.get_or_insert_with(Default::default);
                sum.running += load.running;
                sum.waiting += load.waiting;
                sum.kv_cache_bytes += load.kv_cache_bytes;
                sum.kv_cache_capacity += load.kv_cache_capacity;
            }
        }
        total
    }

    /// A request is waiting and no worker is live: decide at once rather than at the next
    /// tick.
    fn wake(self: &Arc<Self>) {
        if self.rolling() {
            // The rolling update starts (or stops) its workers.
            return;
        }
        let live = self
            .read()
            .iter()
            .any(|w| w.is(WorkerState::Starting) || w.is(WorkerState::Ready));
        if live {
            return;
        }
        let failed = self.read().iter().any(|w| w.is(WorkerState::Failed));
        if failed && self.desired() > 0 {
            // The worker there is failed: one more try, for the request that waits.
            self.events.push(ScaleEvent {
                at_ms: now_ms(),
                version: self.version.clone(),
                from: self.desired(),
                to: self.desired(),
                trigger: Trigger::Wake.to_string(),
                reason: "a request is waiting; replacing the failed worker".into(),
            });
            self.spawn_start(self.add_worker());
            return;
        }
        self.woke_at_ms.store(now_ms(), Ordering::Relaxed);
        self.tick(true, 0);
    }

    /// One autoscaler step: reads the meter (and the version's share of the endpoint's
    /// job backlog), decides, and applies the decision.
    pub(crate) fn tick(self: &Arc<Self>, waiting: bool, backlog: u64) {
        self.follow_backends();
        if self.rolling() {
            return;
        }
        let now = self.clock.now();
        let decision = {
            let mut scaler = self.lock_scaler();
            let load = scaler.observe(self.meter.read(), waiting);
            *self.load.lock().unwrap_or_else(|e| e.into_inner()) = load;
            scaler.decide_load(load, backlog, now)
        };
        self.settle(decision);
    }

    /// Applies a decision, gives pending workers their GPUs if they are free now, and
    /// drops the warm instances of a version left with no workers.
    fn settle(self: &Arc<Self>, decision: Decision) {
        self.apply(decision);
        self.retry_pending();
        if self.desired() == 0 {
            // Nothing is left to feed: no warm instances either.
            self.feed().trim(0, Duration::ZERO);
        }
    }

    /// One step in cluster mode, once the cluster's scaler has placed the version: the
    /// meter is still read (its load goes to the scaler in the heartbeat), and the workers
    /// here follow the placement. A worker started here for a waiting request is kept
    /// against a placement decided before the scaler could hear of it.
    pub(crate) fn follow_placement(self: &Arc<Self>, placed: &Placed) {
        self.follow_backends();
        if self.rolling() {
            return;
        }
        let now = self.clock.now();
        let current = self.desired();
        self.followed_ms
            .store(placed.decided_at_ms, Ordering::Relaxed);
        let woke_lately = now_ms()
            < self
                .woke_at_ms
                .load(Ordering::Relaxed)
                .saturating_add(WAKE_GRACE_MS);
        let to = if placed.workers < current && woke_lately {
            current
        } else {
            placed.workers
        };
        {
            let mut scaler = self.lock_scaler();
            let load = scaler.observe(self.meter.read(), false);
            *self.load.lock().unwrap_or_else(|e| e.into_inner()) = load;
            if to != current {
                scaler.reset(to, now);
            }
        }
        self.settle(Decision {
            from: current,
            to,
            trigger: Trigger::Placement,
            reason: format!(
                "the cluster's scaler (on node `{}`) placed {to} here: {}",
                placed.leader, placed.reason
            ),
        });
    }

    /// When the placement it follows was decided (0 before any).
    pub(crate) fn followed_placement_ms(&self) -> u64 {
        self.followed_ms.load(Ordering::Relaxed)
    }

    /// The load over the scaling windows at the last autoscaler step.
    pub fn load(&self) -> Load {
        *self.load.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a rolling update, not the autoscaler, sets its workers now.
    pub(crate) fn rolling(&self) -> bool {
        self.rolling.load(Ordering::Acquire) || self.retiring.load(Ordering::Acquire)
    }

    fn apply(self: &Arc<Self>, decision: Decision) {
        self.desired.store(decision.to, Ordering::Relaxed);
        if decision.to == decision.from {
            return;
        }
        self.events.push(ScaleEvent {
            at_ms: now_ms(),
            version: self.version.clone(),
            from: decision.from,
            to: decision.to,
            trigger: decision.trigger.to_string(),
            reason: decision.reason.clone(),
        });
        if decision.to > decision.from {
            for _ in decision.from..decision.to {
                self.spawn_start(self.add_worker());
            }
        } else {
            self.drain(decision.from - decision.to);
        }
    }

    /// Removes `count` workers: those not yet ready first, then the newest ready ones.
    pub(crate) fn drain(self: &Arc<Self>, count: u32) {
        let mut chosen = Vec::new();
        {
            let workers = self.read();
            for state in [
                WorkerState::Failed,
                WorkerState::Pending,
                WorkerState::Starting,
                WorkerState::Ready,
            ] {
                for w in workers.iter().rev() {
                    if chosen.len() < count as usize && w.is(state) {
                        chosen.push(w.clone());
                    }
                }
            }
        }
        for worker in chosen {
            worker.set(WorkerState::Draining, None);
            self.publish();
            let this = self.clone();
            tokio::spawn(async move { this.finish_draining(worker).await });
        }
        let feed = self.feed();
        let keep = self.live_workers() * feed.instances_per_worker;
        feed.trim(keep as usize, Duration::ZERO);
    }

    /// Waits until the worker holds nothing (at most the grace period), then drops it. The
    /// last worker of a retiring version also waits for the requests that were sent to
    /// the version before the switch and have not reached a worker yet.
    async fn finish_draining(self: Arc<Self>, worker: Arc<Worker>) {
        let deadline = Instant::now() + self.feed().grace;
        while Instant::now() < deadline {
            let queued = worker.batcher().map_or(0, |b| b.queued());
            let held = worker.in_flight() > 0 || queued > 0;
            let awaited = self.retiring.load(Ordering::Acquire)
                && self.meter.read().in_flight > 0
                && !self.read().iter().any(|w| {
                    !Arc::ptr_eq(w, &worker)
                        && (w.is(WorkerState::Ready) || w.is(WorkerState::Draining))
                });
            if !held && !awaited {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(b) = worker.batcher() {
            self.retired
                .0
                .fetch_add(b.stats().batches.load(Ordering::Relaxed), Ordering::Relaxed);
            self.retired.1.fetch_add(
                b.stats().requests.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        self.release_gpus(&worker);
        self.write().retain(|w| !Arc::ptr_eq(w, &worker));
        self.publish();
    }

    fn release_gpus(&self, worker: &Worker) {
        let gpus = std::mem::take(&mut *worker.gpus.lock().unwrap_or_else(|e| e.into_inner()));
        self.inventory.release(&gpus);
    }

    /// Whether this node has what a new worker needs now (free GPUs, when it needs some).
    pub(crate) fn could_start_here(&self) -> bool {
        self.gpus_per_worker
            .is_none_or(|count| self.inventory.free() >= count as usize)
    }

    /// Gives the worker the GPUs it needs; true when it has them (or needs none). Without
    /// them it is `pending` with the reason, unless it was drained meanwhile.
    fn claim_gpus(&self, worker: &Worker) -> bool {
        let Some(count) = self.gpus_per_worker else {
            return true;
        };
        let mut held = worker.gpus.lock().unwrap_or_else(|e| e.into_inner());
        if !held.is_empty() {
            // Another task claimed them first.
            return false;
        }
        let owner = format!("{}/{}/{}", self.endpoint, self.version, worker.id);
        match self.inventory.allocate(count, &owner) {
            Some(gpus) if worker.is(WorkerState::Draining) => {
                self.inventory.release(&gpus);
                false
            }
            Some(gpus) => {
                *held = gpus;
                true
            }
            None => {
                let reason = format!(
                    "needs {count} GPUs; {} of {} are free",
                    self.inventory.free(),
                    self.inventory.total()
                );
                drop(held);
                if !worker.transition_with(
                    WorkerState::Starting,
                    WorkerState::Pending,
                    Some(reason.clone()),
                ) {
                    worker.transition_with(
                        WorkerState::Pending,
                        WorkerState::Pending,
                        Some(reason),
                    );
                }
                self.publish();
                false
            }
        }
    }

    /// Workers waiting for GPUs try again.
    pub(crate) fn retry_pending(self: &Arc<Self>) {
        let pending: Vec<_> = self
            .read()
            .iter()
            .filter(|w| w.is(WorkerState::Pending))
            .cloned()
            .collect();
        for worker in pending {
            // Only the task that gets the GPUs starts it, so it never starts twice.
            if self.claim_gpus(&worker)
                && worker.transition(WorkerState::Pending, WorkerState::Starting)
            {
                self.spawn_start(worker);
            }
        }
    }

    /// Starts a worker in the background; a failure is in its state and the events.
    fn spawn_start(self: &Arc<Self>, worker: Arc<Worker>) {
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.start(worker).await {
                tracing::warn!(endpoint = %this.endpoint, version = %this.version, "worker failed to start: {e}");
            }
        });
    }

    fn add_worker(&self) -> Arc<Worker> {
        let worker = Arc::new(Worker::new(self.next_id.fetch_add(1, Ordering::Relaxed)));
        let mut workers = self.write();
        // A failed worker is replaced by the new one (it holds no GPUs).
        workers.retain(|w| !w.is(WorkerState::Failed));
        workers.push(worker.clone());
        worker
    }

    /// Brings a worker up: loads its model (on a blocking thread) or creates its
    /// instances.
    async fn start(self: &Arc<Self>, worker: Arc<Worker>) -> Result<(), StartError> {
        if worker.gpus().is_empty() && !self.claim_gpus(&worker) {
            // Pending (or drained meanwhile).
            return Ok(());
        }
        let loaded = match &self.kind {
            Kind::Instances => Ok(()),
            Kind::Model(model) => self.load_model(&worker, model).await,
        };
        let result = match loaded {
            Ok(()) => self.warm_live(true).await,
            Err(e) => Err(e),
        };
        if worker.is(WorkerState::Draining) {
            // Scaled down while it started.
            return result;
        }
        match &result {
            Ok(()) => worker.set(WorkerState::Ready, None),
            Err(e) => {
                self.release_gpus(&worker);
                worker.set(WorkerState::Failed, Some(e.to_string()));
                self.events.push(ScaleEvent {
                    at_ms: now_ms(),
                    version: self.version.clone(),
                    from: self.desired(),
                    to: self.desired(),
                    trigger: "worker_failed".into(),
                    reason: format!("worker {} failed to start: {e}", worker.id),
                });
            }
        }
        self.publish();
        result
    }

    /// Loads a worker's model on a blocking thread, on its own GPU when it has one, and
    /// puts a batcher in front of it.
    async fn load_model(&self, worker: &Worker, model: &ModelKind) -> Result<(), StartError> {
        let (factory, mut spec, context) = (
            model.factory.clone(),
            model.spec.clone(),
            model.context.clone(),
        );
        // The worker sees only its own devices.
        match (&mut spec, worker.gpus().first().copied()) {
            (BackendSpec::Candle(candle), Some(gpu)) => candle.device = format!("cuda:{gpu}"),
            (BackendSpec::Container(container), Some(_)) => container.gpus = worker.gpus(),
            _ => {}
        }
        let backend = tokio::task::spawn_blocking(move || factory.load(&spec, &context))
            .await
            .map_err(|e| StartError::Task(format!("model load task failed: {e}")))?
            .map_err(StartError::Backend)?;
        if let Some(signature) = backend.signature() {
            *self.signature.lock().unwrap_or_else(|e| e.into_inner()) = Some(signature);
        }
        *worker.batcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(Batcher::spawn(
            backend,
            model.batching.max_batch as usize,
            Duration::from_millis(model.batching.max_batch_delay_ms),
        )));
        Ok(())
    }

    /// Follows backends that stopped serving on their own (a container restarted after
    /// failing its liveness probe): such a worker leaves `ready` for `starting`, with the
    /// backend's reason, until its backend serves again; each change is an event.
    fn follow_backends(&self) {
        const RESTARTING: &str = "restarting: ";
        let mut changed = false;
        for worker in self.read().iter() {
            let Some(batcher) = worker.batcher() else {
                continue;
            };
            let (state, reason, _) = worker.state();
            let (trigger, why) = match (batcher.backend().unhealthy(), state) {
                (Some(why), WorkerState::Ready) => {
                    let why = format!("{RESTARTING}{why}");
                    if !worker.transition_with(
                        WorkerState::Ready,
                        WorkerState::Starting,
                        Some(why.clone()),
                    ) {
                        continue;
                    }
                    ("worker_restarting", why)
                }
                (None, WorkerState::Starting)
                    if reason.as_deref().is_some_and(|r| r.starts_with(RESTARTING)) =>
                {
                    if !worker.transition(WorkerState::Starting, WorkerState::Ready) {
                        continue;
                    }
                    ("worker_recovered", "its backend serves again".to_owned())
                }
                _ => continue,
            };
            changed = true;
            self.events.push(ScaleEvent {
                at_ms: now_ms(),
                version: self.version.clone(),
                from: self.desired(),
                to: self.desired(),
                trigger: trigger.into(),
                reason: format!("worker {}: {why}", worker.id),
            });
        }
        if changed {
            self.publish();
        }
    }

    /// Makes the processor's warm instances what the live workers need (see
    /// [`Feed::warm`] for `wait`).
    async fn warm_live(&self, wait: bool) -> Result<(), StartError> {
        let feed = self.feed();
        feed.warm(self.live_workers() * feed.instances_per_worker, wait)
            .await
    }

    /// Workers starting or ready.
    fn live_workers(&self) -> u32 {
        self.read()
            .iter()
            .filter(|w| w.is(WorkerState::Starting) || w.is(WorkerState::Ready))
            .count() as u32
    }

    /// The reason of the newest failure, when no worker is starting or ready.
    fn failed_while_none_live(&self) -> Option<String> {
        if self.live_workers() > 0 {
            return None;
        }
        self.read().iter().rev().find_map(|w| match w.state() {
            (WorkerState::Failed, reason, _) => reason,
            _ => None,
        })
    }

    /// Drops every worker and instance (stop, or a failed deploy).
    pub(crate) fn remove_all(&self) {
        for w in self.read().iter() {
            self.release_gpus(w);
        }
        self.write().clear();
        self.desired.store(0, Ordering::Relaxed);
        self.lock_scaler().reset(0, self.clock.now());
        self.feed().trim(0, Duration::ZERO);
        self.publish();
    }

    /// Tells waiting requests how many workers are ready.
    fn publish(&self) {
        let ready = self
            .read()
            .iter()
            .filter(|w| w.is(WorkerState::Ready))
            .count() as u32;
        self.ready.send_replace(ready);
    }

    /// Periodic upkeep: instances idle for a minute beyond what the live workers need are
    /// dropped, and warm instances lost to failures are made again.
    pub(crate) async fn housekeep(&self) {
        let feed = self.feed();
        let keep = self.live_workers() * feed.instances_per_worker;
        feed.trim(keep as usize, Duration::from_secs(60));
        if let Err(e) = self.warm_live(false).await {
            tracing::warn!(endpoint = %self.endpoint, version = %self.version, "cannot re-warm: {e}");
        }
    }

    /// Whether a new spec for this version can keep these workers: the same model, the
    /// same batching, the same GPUs per worker (only the processor or the policies change).
    pub(crate) fn can_keep(
        &self,
        backend: &BackendSpec,
        batching: &BatchingSpec,
        gpus: Option<u32>,
    ) -> bool {
        let same_model = match &self.kind {
            Kind::Instances => matches!(backend, BackendSpec::None),
            Kind::Model(model) => &model.spec == backend && &model.batching == batching,
        };
        same_model && self.gpus_per_worker == gpus
    }

    /// Takes on a new processor and policy without touching the workers (their models
    /// stay loaded): the new processor's instances are made warm first, then it feeds
    /// every request; requests in flight finish on the old one.
    pub(crate) async fn replace_feed(
        &self,
        processor: Option<Processor>,
        policy: Policy,
        rollout: &RolloutSpec,
    ) -> Result<(), StartError> {
        let spec = policy.spec().clone();
        let target = self.live_workers() * spec.instances_per_worker;
        if let Some(processor) = &processor {
            processor
                .warm_waiting(target)
                .await
                .map_err(StartError::Warm)?;
        }
        let old = {
            let mut feed = self.feed.write().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(
                &mut *feed,
                Feed {
                    processor,
                    instances_per_worker: spec.instances_per_worker,
                    cold_start_timeout: Duration::from_secs(spec.cold_start_timeout_s.into()),
                    grace: Duration::from_secs(rollout.grace_period_s.into()),
                },
            )
        };
        self.lock_scaler().set_policy(policy);
        // Idle instances of the old processor go now; busy ones finish and go with it.
        old.trim(0, Duration::ZERO);
        Ok(())
    }

    /// Its workers for a rolling update: live (starting, ready or pending) and ready.
    pub(crate) fn side(&self) -> Side {
        let c = self.counts();
        Side {
            live: c.starting + c.ready + c.pending,
            ready: c.ready,
        }
    }

    /// Workers ready now (what requests are shared by during a rolling update).
    pub fn ready_now(&self) -> u32 {
        *self.ready.borrow()
    }

    /// Starts `count` more workers in the background.
    pub(crate) fn start_workers(self: &Arc<Self>, count: u32) {
        for _ in 0..count {
            self.spawn_start(self.add_worker());
        }
    }

    /// The reason of a worker that failed to start, if one has.
    pub(crate) fn failure(&self) -> Option<String> {
        self.read().iter().find_map(|w| match w.state() {
            (WorkerState::Failed, reason, _) => Some(reason.unwrap_or_default()),
            _ => None,
        })
    }

    /// Why a worker still waits, if one waits for GPUs.
    pub(crate) fn pending_reason(&self) -> Option<String> {
        self.read().iter().find_map(|w| match w.state() {
            (WorkerState::Pending, reason, _) => Some(format!(
                "worker {} is pending: {}",
                w.id,
                reason.unwrap_or_default()
            )),
            _ => None,
        })
    }

    /// A rolling update takes over: it alone starts workers until [`Self::end_rollout`],
    /// and the version counts `target` as wanted.
    pub(crate) fn begin_rollout(&self, target: u32) {
        self.rolling.store(true, Ordering::Release);
        self.desired.store(target, Ordering::Relaxed);
    }

    /// The rolling update is over: the autoscaler takes over from `target` workers.
    pub(crate) fn end_rollout(&self, target: u32) {
        self.desired.store(target, Ordering::Relaxed);
        self.lock_scaler().reset(target, self.clock.now());
        self.rolling.store(false, Ordering::Release);
    }

    /// A rolling update replaces this version by `successor`.
    pub(crate) fn retire(&self, successor: &Arc<WorkerSet>) {
        *self.successor.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(successor);
        self.retiring.store(true, Ordering::Release);
    }

    /// The rolling update that retired it failed: it serves again, with as many workers
    /// as it wanted before.
    pub(crate) fn resume(self: &Arc<Self>) {
        self.retiring.store(false, Ordering::Release);
        *self.successor.lock().unwrap_or_else(|e| e.into_inner()) = Weak::new();
        let missing = self.desired().saturating_sub(self.live_workers());
        self.start_workers(missing);
    }

    /// Records a scaling event of this version.
    pub(crate) fn note(&self, trigger: &str, from: u32, to: u32, reason: String) {
        self.events.push(ScaleEvent {
            at_ms: now_ms(),
            version: self.version.clone(),
            from,
            to,
            trigger: trigger.to_owned(),
            reason,
        });
    }

    fn feed(&self) -> Feed {
        self.feed.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lock_scaler(&self) -> std::sync::MutexGuard<'_, Autoscaler> {
        self.scaler.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Worker>>> {
        self.workers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Worker>>> {
        self.workers.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for WorkerSet {
    fn drop(&mut self) {
        // Waiters see the version go, and its GPUs go back.
        self.ready.send_replace(0);
        for w in self.read().iter() {
            self.release_gpus(w);
        }
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
