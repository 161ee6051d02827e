//! A version's processor: its `InstancePre`, its pool of warm instances, and guest calls
//! under deadline, memory and instance caps.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::component::{Component, InstancePre, Linker, ResourceTable};
use wasmtime::{Store, Trap, UpdateDeadline};
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};
use wasp_core::{Isolation, Limits, Mount};

use crate::bindings::{handler, lifecycle, transform};
use crate::engine::{LoadedComponent, Overflow, OverflowInstance, PoolFull};
use crate::host::{BoxFuture, HostState, Limiter, VersionContext};
use crate::{
    Error, GuestError, LogBuffer, ModelOutput, ModelRouter, Prepared, Request, Response, Result,
    Runtime, chain,
};

/// Which exports a version needs from its processor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Backend `none`: the processor's `handler` answers requests.
    Service,
    /// A model backend: the processor's `transform` pre- and post-processes.
    Transform,
}

/// Everything a version's processor is configured with.
pub struct ProcessorSettings {
    /// Endpoint name (for logs and model calls).
    pub endpoint: String,
    /// Version name.
    pub version: String,
    /// Configuration visible through the `config` import and as WASI environment.
    pub env: BTreeMap<String, String>,
    /// Read-only directory mounts.
    pub mounts: Vec<Mount>,
    /// Socket addresses the guest may reach (`IP:PORT` or `IP:*`); empty means none.
    pub allow_hosts: Vec<String>,
    /// Deadline, memory and instance caps.
    pub limits: Limits,
    /// Where the guest's log records go.
    pub logs: Arc<LogBuffer>,
    /// Where the guest's model calls go.
    pub models: Arc<dyn ModelRouter>,
    /// Whose share of the cores its long-running calls take (the tenant): every group gets
    /// the same share, however many calls it makes.
    pub group: String,
    /// Where the time its guest code runs is added up, in nanoseconds (a tenant's
    /// metered guest time; several processors may share one counter).
    pub guest_nanos: Arc<AtomicU64>,
}

/// Why a guest call failed. Each variant fails only its own request.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The processor returned an error value.
    #[error("{}", .0.describe())]
    Guest(GuestError),
    /// The processor's `init` returned an error, so no instance could serve.
    #[error("processor failed to initialise: {}", .0.describe())]
    Init(GuestError),
    /// The call ran past the version's deadline and was interrupted.
    #[error("processor exceeded its deadline of {ms} ms")]
    Timeout {
        /// The deadline.
        ms: u64,
    },
    /// The guest tried to grow its memory past the version's cap.
    #[error("processor exceeded its memory limit of {mib} MiB")]
    OutOfMemory {
        /// The cap.
        mib: u32,
    },
    /// The guest overflowed its wasm stack.
    #[error("processor overflowed its stack")]
    StackOverflow,
    /// The guest trapped (a panic, `unreachable`, an out-of-bounds access...).
    #[error("processor trapped: {0}")]
    Trap(String),
    /// Every instance is busy and the wait queue is full.
    #[error("all {instances} processor instances are busy and {queued} requests are queued")]
    Busy {
        /// Instances of the version.
        instances: u32,
        /// Requests already waiting.
        queued: u32,
    },
    /// No instance became free before the request's deadline.
    #[error("no processor instance became free within {ms} ms")]
    QueueTimeout {
        /// How long the request waited.
        ms: u64,
    },
    /// The processor does not export what this call needs.
    #[error("processor does not export `{0}`")]
    NotExported(&'static str),
    /// A new instance could not be created (a mount could not be opened).
    #[error("cannot create a processor instance: {0}")]
    Unavailable(String),
    /// The server's pool of instance slots is full: a capacity limit of the whole server,
    /// not a fault of the processor.
    #[error("the server is full: {0}")]
    Capacity(String),
}

impl CallError {
    /// The HTTP status a client should see.
    pub fn status(&self) -> u16 {
        match self {
            Self::Guest(e) => e.status(),
            Self::Init(_) | Self::Trap(_) | Self::StackOverflow | Self::OutOfMemory { .. } => 500,
            Self::NotExported(_) => 501,
            Self::Timeout { .. } => 504,
            Self::Busy { .. } => 429,
            Self::QueueTimeout { .. } | Self::Unavailable(_) | Self::Capacity(_) => 503,
        }
    }

    /// A short machine-readable name of the failure.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Guest(_) => "processor_error",
            Self::Init(_) => "processor_init_failed",
            Self::Timeout { .. } => "processor_timeout",
            Self::OutOfMemory { .. } => "processor_out_of_memory",
            Self::StackOverflow => "processor_stack_overflow",
            Self::Trap(_) => "processor_trap",
            Self::Busy { .. } => "busy",
            Self::QueueTimeout { .. } => "queue_timeout",
            Self::NotExported(_) => "not_exported",
            Self::Unavailable(_) => "unavailable",
            Self::Capacity(_) => "server_full",
        }
    }

    /// Whether the instance that failed is lost (trapped or interrupted).
    pub fn lost_instance(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. } | Self::OutOfMemory { .. } | Self::StackOverflow | Self::Trap(_)
        )
    }
}

/// Counters and gauges of a version's instance pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Instances waiting for a call.
    pub idle: usize,
    /// Instances in a call.
    pub busy: usize,
    /// Requests waiting for an instance.
    pub queued: usize,
    /// Cap on instances.
    pub max: u32,
    /// Instances created since deploy.
    pub created: u64,
    /// Instances lost to traps, timeouts and memory exhaustion since deploy.
    pub lost: u64,
    /// Instances dropped after serving what their isolation allows (one call when
    /// `per-request`, `max_requests_per_instance` when pooled) since deploy.
    pub retired: u64,
}

/// One live instance with its store and resolved exports.
struct Slot {
    store: Store<HostState>,
    handler: Option<handler::Guest>,
    transform: Option<transform::Guest>,
    last_used: Instant,
    /// Calls it has served.
    served: u32,
    /// Set when it lives outside the pool (created on demand while the pool was full).
    _overflow: Option<OverflowInstance>,
    /// Set when calls may wait for its pool slot: dropped after the store, it tells them
    /// the slot is free.
    _freed: Option<SlotFreed>,
}

/// How often a call waiting for a pool slot tries again without being told of one.
const SLOT_RECHECK: Duration = Duration::from_millis(50);

/// Counts a call as waiting for a pool slot until it is dropped.
struct Waiting(Arc<AtomicU64>);

impl Waiting {
    fn new(count: &Arc<AtomicU64>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Tells the calls waiting for a pool slot, when dropped, that one is free.
struct SlotFreed(Arc<tokio::sync::Notify>);

impl Drop for SlotFreed {
    fn drop(&mut self) {
        self.0.notify_waiters();
    }
}

/// A component linked for one engine, with the indices of its exports (which belong to
/// that engine's copy of the component).
struct Linked {
    pre: InstancePre<HostState>,
    lifecycle: lifecycle::GuestIndices,
    handler: Option<handler::GuestIndices>,
    transform: Option<transform::GuestIndices>,
}

impl Linked {
    fn new(linker: &Linker<HostState>, component: &Component) -> Result<Self> {
        let pre = linker
            .instantiate_pre(component)
            .map_err(|e| Error::Contract(chain(&e)))?;
        let missing = |name: &str, e: wasmtime::Error| {
            Error::Contract(format!("it does not export `wasp:processor/{name}`: {e:#}"))
        };
        let lifecycle = lifecycle::GuestIndices::new(&pre).map_err(|e| missing("lifecycle", e))?;
        let handler = handler::GuestIndices::new(&pre).ok();
        let transform = transform::GuestIndices::new(&pre).ok();
        Ok(Self {
            pre,
            lifecycle,
            handler,
            transform,
        })
    }

    /// Checks that it exports what `role` needs.
    fn check(&self, role: Role) -> Result<()> {
        match role {
            Role::Service if self.handler.is_none() => Err(Error::Contract(
                "backend `none` needs a processor that exports `wasp:processor/handler`".into(),
            )),
            Role::Transform if self.transform.is_none() => Err(Error::Contract(
                "a model backend needs a processor that exports `wasp:processor/transform`".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// Gives a lazy processor its component, at its first instance.
pub type ComponentSource =
    Arc<dyn Fn() -> BoxFuture<'static, Result<LoadedComponent>> + Send + Sync>;

/// Where a processor's instances go when the pool is full.
struct Spill {
    overflow: Arc<Overflow>,
    key: Arc<str>,
    /// Linked on the overflow engine at the first overflow.
    linked: Mutex<Option<Arc<Linked>>>,
}

/// The processor of one endpoint version. Cheap to clone.
#[derive(Clone)]
pub struct Processor {
    inner: Arc<Inner>,
}

struct Inner {
    engine: wasmtime::Engine,
    _ticker: Arc<crate::engine::Ticker>,
    /// The component linked on the pooled engine: at build, or by the first instance of a
    /// lazy processor.
    linked: tokio::sync::OnceCell<Linked>,
    linker: Arc<Linker<HostState>>,
    /// Whether the component came from the compiled cache, once it is loaded.
    from_cache: std::sync::OnceLock<bool>,
    /// Where a lazy processor's component comes from, and the exports it must have.
    source: Option<(ComponentSource, Role)>,
    /// The overflow engine, when the runtime has one.
    spill: Option<Spill>,
    /// Whether the version's memory cap fits a pool slot (always, without a pool).
    fits_pool: bool,
    /// The memory of a pool slot, in MiB.
    slot_mib: u32,
    /// What a new instance does when the pool is full.
    pool_full: PoolFull,
    /// Notified when a pooled instance is dropped.
    slot_freed: Arc<tokio::sync::Notify>,
    /// Calls waiting for a pool slot, all processors together.
    slot_waiters: Arc<AtomicU64>,
    context: Arc<VersionContext>,
    fair: Arc<crate::fair::FairShare>,
    group: Arc<str>,
    guest_nanos: Arc<AtomicU64>,
    mounts: Vec<Mount>,
    allow_hosts: Arc<Vec<(std::net::IpAddr, Option<u16>)>>,
    limits: Limits,
    idle: Mutex<Vec<Slot>>,
    permits: Arc<Semaphore>,
    queued: AtomicUsize,
    created: AtomicU64,
    lost: AtomicU64,
    /// Instances dropped after serving what their isolation allows.
    retired: AtomicU64,
}

impl Runtime {
    /// Prepares a version's processor: links the component (once, as an `InstancePre`) and
    /// checks that it exports what `role` needs.
    pub fn processor(
        &self,
        component: &LoadedComponent,
        role: Role,
        settings: ProcessorSettings,
    ) -> Result<Processor> {
        let linked = Linked::new(&self.linker, &component.component)?;
        linked.check(role)?;
        let processor = self.make_processor(
            tokio::sync::OnceCell::new_with(Some(linked)),
            None,
            component.key.clone(),
            settings,
        )?;
        let _ = processor.inner.from_cache.set(component.from_cache);
        Ok(processor)
    }

    /// Prepares a version's processor whose component is loaded, linked and checked by
    /// its first instance (a version restored at start, scaled to zero): `source` gives
    /// the component, `key` is its digest. A failure there fails that call (and every
    /// later one tries again).
    pub fn lazy_processor(
        &self,
        key: &str,
        source: ComponentSource,
        role: Role,
        settings: ProcessorSettings,
    ) -> Result<Processor> {
        self.make_processor(
            tokio::sync::OnceCell::new(),
            Some((source, role)),
            key.into(),
            settings,
        )
    }

    fn make_processor(
        &self,
        linked: tokio::sync::OnceCell<Linked>,
        source: Option<(ComponentSource, Role)>,
        key: Arc<str>,
        settings: ProcessorSettings,
    ) -> Result<Processor> {
        let mut allow_hosts = Vec::new();
        for entry in &settings.allow_hosts {
            let parsed = wasp_core::spec::parse_allow_host(entry)
                .ok_or_else(|| Error::Contract(format!("bad allow_hosts entry `{entry}`")))?;
            allow_hosts.push(parsed);
        }
        let mut env: Vec<_> = settings.env.into_iter().collect();
        env.sort();
        let context = Arc::new(VersionContext {
            endpoint: settings.endpoint.into(),
            version: settings.version,
            env,
            logs: settings.logs,
            models: settings.models,
        });
        Ok(Processor {
            inner: Arc::new(Inner {
                engine: self.engine.clone(),
                _ticker: self.ticker.clone(),
                linked,
                linker: self.linker.clone(),
                from_cache: std::sync::OnceLock::new(),
                source,
                spill: self.overflow.as_ref().map(|overflow| Spill {
                    overflow: overflow.clone(),
                    key,
                    linked: Mutex::new(None),
                }),
                fits_pool: self
                    .slot_memory_mib()
                    .is_none_or(|slot| settings.limits.memory_mib <= slot),
                slot_mib: self
                    .slot_memory_mib()
                    .unwrap_or(crate::engine::FULL_SLOT_MIB),
                pool_full: self.pool_full,
                slot_freed: self.slot_freed.clone(),
                slot_waiters: self.slot_waiters.clone(),
                context,
                fair: self.fair.clone(),
                group: settings.group.into(),
                guest_nanos: settings.guest_nanos,
                mounts: settings.mounts,
                allow_hosts: Arc::new(allow_hosts),
                permits: Arc::new(Semaphore::new(settings.limits.max_instances as usize)),
                limits: settings.limits,
                idle: Mutex::new(Vec::new()),
                queued: AtomicUsize::new(0),
                created: AtomicU64::new(0),
                lost: AtomicU64::new(0),
                retired: AtomicU64::new(0),
            }),
        })
    }
}

/// An instance on loan to one call, with the permit that counts it against the cap.
struct Lease {
    slot: Slot,
    _permit: OwnedSemaphorePermit,
}

/// Decrements the queue gauge when a waiting request stops waiting, however it stops.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Processor {
    /// Answers a request with the processor's `handler` (backend `none`).
    pub async fn handle(&self, request: Request) -> Result<Response, CallError> {
        let deadline = self.deadline();
        let mut lease = self.acquire(deadline).await?;
        let guest = lease
            .slot
            .handler
            .clone()
            .ok_or(CallError::NotExported("handler"))?;
        self.arm(&mut lease.slot, deadline);
        let result = self
            .timed(guest.call_handle(&mut lease.slot.store, &request))
            .await;
        self.finish(lease, result)
    }

    /// Turns a request into model input and a context (`transform.pre-process`).
    pub async fn pre_process(&self, request: Request) -> Result<Prepared, CallError> {
        let deadline = self.deadline();
        let mut lease = self.acquire(deadline).await?;
        let guest = lease
            .slot
            .transform
            .clone()
            .ok_or(CallError::NotExported("transform"))?;
        self.arm(&mut lease.slot, deadline);
        let result = self
            .timed(guest.call_pre_process(&mut lease.slot.store, &request))
            .await;
        self.finish(lease, result)
    }

    /// Turns one model output chunk into a response chunk (`transform.post-process`).
    pub async fn post_process(
        &self,
        context: &[u8],
        output: ModelOutput,
    ) -> Result<Response, CallError> {
        let deadline = self.deadline();
        let mut lease = self.acquire(deadline).await?;
        let guest = lease
            .slot
            .transform
            .clone()
            .ok_or(CallError::NotExported("transform"))?;
        self.arm(&mut lease.slot, deadline);
        let result = self
            .timed(guest.call_post_process(&mut lease.slot.store, context, &output))
            .await;
        self.finish(lease, result)
    }

    /// Whether its component is loaded and linked (a lazy processor's is at its first
    /// instance).
    pub fn is_loaded(&self) -> bool {
        self.inner.linked.initialized()
    }

    /// Whether its component came from the compiled cache; `None` until it is loaded.
    pub fn compiled_from_cache(&self) -> Option<bool> {
        self.inner.from_cache.get().copied()
    }

    /// The component linked on the pooled engine, loaded first if this processor is lazy.
    async fn linked(&self) -> Result<&Linked, CallError> {
        let inner = &self.inner;
        inner
            .linked
            .get_or_try_init(|| async {
                let unavailable =
                    |e: Error| CallError::Unavailable(format!("cannot load the component: {e}"));
                let Some((source, role)) = &inner.source else {
                    return Err(CallError::Unavailable("the component is not loaded".into()));
                };
                let loaded = source().await.map_err(unavailable)?;
                let linked = Linked::new(&inner.linker, &loaded.component).map_err(unavailable)?;
                linked.check(*role).map_err(unavailable)?;
                let _ = inner.from_cache.set(loaded.from_cache);
                Ok(linked)
            })
            .await
    }

    /// Creates instances (running `init`) until `count` are idle, within the instance cap.
    /// A full pool fails it at once, but for [`warm_waiting`](Self::warm_waiting).
    pub async fn warm(&self, count: u32) -> Result<(), CallError> {
        self.warm_for(count, false).await
    }

    /// [`warm`](Self::warm) for a worker that calls are waiting for: when the pool is full
    /// and the policy queues ([`PoolFull::Queue`]), each instance waits for a slot, up to
    /// the version's call timeout.
    pub async fn warm_waiting(&self, count: u32) -> Result<(), CallError> {
        self.warm_for(count, true).await
    }

    async fn warm_for(&self, count: u32, wait: bool) -> Result<(), CallError> {
        let target = (count.min(self.inner.limits.max_instances)) as usize;
        while self.idle_len() < target {
            let permit = match self.inner.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => break,
            };
            let slot = self.instantiate(self.deadline(), wait).await?;
            self.release(Lease {
                slot,
                _permit: permit,
            });
        }
        Ok(())
    }

    /// Drops idle instances unused for `idle_for`, keeping at least `keep`.
    pub fn trim(&self, keep: usize, idle_for: Duration) -> usize {
        let mut idle = self.lock_idle();
        let before = idle.len();
        let now = Instant::now();
        // Oldest first, so that the most recently used instances stay.
        idle.sort_by_key(|slot| std::cmp::Reverse(slot.last_used));
        while idle.len() > keep
            && idle
                .last()
                .is_some_and(|slot| now.duration_since(slot.last_used) >= idle_for)
        {
            idle.pop();
        }
        before - idle.len()
    }

    /// The pool's gauges and counters.
    pub fn stats(&self) -> PoolStats {
        let inner = &self.inner;
        let max = inner.limits.max_instances;
        let in_use = max as usize - inner.permits.available_permits();
        let idle = self.idle_len();
        PoolStats {
            idle,
            busy: in_use.saturating_sub(idle),
            queued: inner.queued.load(Ordering::Relaxed),
            max,
            created: inner.created.load(Ordering::Relaxed),
            lost: inner.lost.load(Ordering::Relaxed),
            retired: inner.retired.load(Ordering::Relaxed),
        }
    }

    /// Creates an instance and runs its `init`, then drops it: proves the version can
    /// serve without keeping an instance or its pool slot (a deploy scaled to zero).
    pub async fn prove(&self) -> Result<(), CallError> {
        let deadline = self.deadline();
        self.instantiate(deadline, true).await.map(drop)
    }

    /// Instantiates the component once and drops it, without running `init` or any
    /// export: the bare cost of a new instance (for benchmarks and health checks).
    pub async fn instantiate_only(&self) -> Result<(), CallError> {
        let linked = self.linked().await?;
        let mut store = self.new_store(&self.inner.engine)?;
        linked
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| self.classify(&store, e))?;
        Ok(())
    }

    /// Answers a request on a brand-new instance that is dropped afterwards (no pool):
    /// the cost of full per-request isolation.
    pub async fn handle_fresh(&self, request: Request) -> Result<Response, CallError> {
        let deadline = self.deadline();
        let mut slot = self.instantiate(deadline, true).await?;
        let guest = slot
            .handler
            .clone()
            .ok_or(CallError::NotExported("handler"))?;
        self.arm(&mut slot, deadline);
        match self
            .timed(guest.call_handle(&mut slot.store, &request))
            .await
        {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(CallError::Guest(e)),
            Err(e) => Err(self.classify(&slot.store, e)),
        }
    }

    /// Runs a guest call, adding the time its polls take (the guest running, not waiting
    /// for a turn or a model) to the tenant's meter.
    async fn timed<F: std::future::Future>(&self, future: F) -> F::Output {
        let meter = &self.inner.guest_nanos;
        let mut future = std::pin::pin!(future);
        std::future::poll_fn(|cx| {
            let started = Instant::now();
            let polled = future.as_mut().poll(cx);
            let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            meter.fetch_add(nanos, Ordering::Relaxed);
            polled
        })
        .await
    }

    /// The time this processor's guest code has run, with every processor sharing its
    /// meter.
    pub fn guest_time(&self) -> Duration {
        Duration::from_nanos(self.inner.guest_nanos.load(Ordering::Relaxed))
    }

    fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.inner.limits.timeout_ms)
    }

    fn idle_len(&self) -> usize {
        self.lock_idle().len()
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Slot>> {
        // A poisoned lock only means another thread panicked while holding it; the Vec
        // inside is still a valid list of instances.
        self.inner.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (bounded by the queue limit and the deadline) for a permit, then takes an
    /// idle instance or creates one.
    async fn acquire(&self, deadline: Instant) -> Result<Lease, CallError> {
        let inner = &self.inner;
        let permit = match inner.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let queued = inner.queued.fetch_add(1, Ordering::Relaxed);
                let _queued = Queued(&inner.queued);
                if queued >= inner.limits.max_queue as usize {
                    return Err(CallError::Busy {
                        instances: inner.limits.max_instances,
                        queued: queued as u32,
                    });
                }
                let started = Instant::now();
                let wait = inner.permits.clone().acquire_owned();
                match tokio::time::timeout_at(deadline.into(), wait).await {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => {
                        return Err(CallError::Unavailable("version is shut down".into()));
                    }
                    Err(_) => {
                        return Err(CallError::QueueTimeout {
                            ms: started.elapsed().as_millis() as u64,
                        });
                    }
                }
            }
        };
        // Idle instances are fresh ones or, when pooled, reused ones: per-request
        // isolation drops each after its call (see `release`).
        let idle = self.lock_idle().pop();
        let slot = match idle {
            Some(slot) => slot,
            None => self.instantiate(deadline, true).await?,
        };
        Ok(Lease {
            slot,
            _permit: permit,
        })
    }

    fn new_store(&self, engine: &wasmtime::Engine) -> Result<Store<HostState>, CallError> {
        let inner = &self.inner;
        let mut wasi = WasiCtxBuilder::new();
        // The version's own configuration only: never the host's environment.
        wasi.envs(&inner.context.env);
        for mount in &inner.mounts {
            wasi.preopened_dir(&mount.host, &mount.guest, FsPerms::ReadOnly)
                .map_err(|e| {
                    CallError::Unavailable(format!(
                        "cannot mount {} at {}: {e:#}",
                        mount.host.display(),
                        mount.guest
                    ))
                })?;
        }
        if inner.allow_hosts.is_empty() {
            wasi.allow_tcp(false)
                .allow_udp(false)
                .allow_ip_name_lookup(false);
        } else {
            let allowed = inner.allow_hosts.clone();
            wasi.allow_tcp(true)
                .allow_udp(true)
                .allow_ip_name_lookup(true)
                .socket_addr_check(move |addr: SocketAddr, use_| {
                    // A connect first binds the wildcard address to an ephemeral port;
                    // that bind exposes nothing, so only the connect target is checked.
                    let implicit_bind =
                        matches!(use_, SocketAddrUse::TcpBind | SocketAddrUse::UdpBind)
                            && addr.ip().is_unspecified()
                            && addr.port() == 0;
                    let ok = implicit_bind
                        || allowed.iter().any(|(ip, port)| {
                            *ip == addr.ip() && port.is_none_or(|p| p == addr.port())
                        });
                    Box::pin(async move { ok })
                });
        }
        let state = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_bytes: inner.limits.memory_mib as usize * 1024 * 1024,
                memory_refused: false,
            },
            version: inner.context.clone(),
            deadline: None,
            ticks: 0,
            turn: Arc::default(),
        };
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.limiter);
        let (fair, group, endpoint) = (
            inner.fair.clone(),
            inner.group.clone(),
            inner.context.endpoint.clone(),
        );
        store.epoch_deadline_callback(move |mut ctx| {
            let state = ctx.data_mut();
            if state.deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(UpdateDeadline::Interrupt);
            }
            state.ticks = state.ticks.saturating_add(1);
            if state.ticks < 2 {
                // Its first tick: short calls never queue for a turn.
                return Ok(UpdateDeadline::Yield(1));
            }
            // A long run: give the core back and wait for the group's next turn.
            // Queued at once, so that it is in line before the next hand-over.
            let cell = state.turn.clone();
            drop(cell.lock().unwrap_or_else(|e| e.into_inner()).take());
            let asked = fair.request(&group, &endpoint);
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    let turn = asked.wait().await;
                    *cell.lock().unwrap_or_else(|e| e.into_inner()) = Some(turn);
                }),
            ))
        });
        store.set_epoch_deadline(1);
        Ok(store)
    }

    /// Creates an instance, resolves its exports and runs `init`, all under `deadline`.
    /// An instance whose memory cap is larger than a pool slot is created on demand,
    /// outside the pool. When the pool is full, the runtime's [`PoolFull`] policy decides:
    /// the instance is created on demand too, or the call waits for a slot (when `wait`),
    /// or it fails with a capacity error.
    async fn instantiate(&self, deadline: Instant, wait: bool) -> Result<Slot, CallError> {
        let inner = &self.inner;
        let mut linked = self.linked().await?;
        let spilled;
        let mut overflow = None;
        let mut freed = None;
        let pooled = match inner.fits_pool {
            true => self.pooled(linked, deadline, wait).await,
            false => Err(CallError::Capacity(format!(
                "the version's limits.memory_mib ({} MiB) is larger than a pool slot ({} MiB); \
                 raise `wasp serve --slot-memory-mib`",
                inner.limits.memory_mib, inner.slot_mib
            ))),
        };
        let (mut store, instance) = match (pooled, &inner.spill) {
            (Ok(pooled), _) => {
                if inner.pool_full == PoolFull::Queue {
                    freed = Some(SlotFreed(inner.slot_freed.clone()));
                }
                pooled
            }
            (Err(CallError::Capacity(_)), Some(spill))
                if !inner.fits_pool || inner.pool_full == PoolFull::Overflow =>
            {
                spilled = self.spill_linked(spill, linked)?;
                linked = &spilled;
                let mut store = self.new_store(&spill.overflow.engine)?;
                store.data_mut().deadline = Some(deadline);
                overflow = Some(spill.overflow.count());
                let instance = self
                    .timed(linked.pre.instantiate_async(&mut store))
                    .await
                    .map_err(|e| self.classify(&store, e))?;
                (store, instance)
            }
            (Err(error), _) => return Err(error),
        };
        let load_err = |e: wasmtime::Error| CallError::Trap(chain(&e));
        let lifecycle = linked
            .lifecycle
            .load(&mut store, &instance)
            .map_err(load_err)?;
        let handler = match &linked.handler {
            Some(indices) => Some(indices.load(&mut store, &instance).map_err(load_err)?),
            None => None,
        };
        let transform = match &linked.transform {
            Some(indices) => Some(indices.load(&mut store, &instance).map_err(load_err)?),
            None => None,
        };
        store.set_epoch_deadline(1);
        match self.timed(lifecycle.call_init(&mut store)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(CallError::Init(e)),
            Err(e) => return Err(self.classify(&store, e)),
        }
        store.data_mut().end_call();
        inner.created.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            store,
            handler,
            transform,
            last_used: Instant::now(),
            served: 0,
            _overflow: overflow,
            _freed: freed,
        })
    }

    /// An instance from the pool. When the pool is full and the policy queues, a call
    /// that may `wait` tries again each time a pooled instance is dropped (and every
    /// [`SLOT_RECHECK`], for slots freed unannounced), until `deadline`.
    async fn pooled(
        &self,
        linked: &Linked,
        deadline: Instant,
        wait: bool,
    ) -> Result<(Store<HostState>, wasmtime::component::Instance), CallError> {
        let inner = &self.inner;
        let started = Instant::now();
        let mut waiting = None;
        loop {
            let freed = inner.slot_freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            let mut store = self.new_store(&inner.engine)?;
            store.data_mut().deadline = Some(deadline);
            let error = match self.timed(linked.pre.instantiate_async(&mut store)).await {
                Ok(instance) => return Ok((store, instance)),
                Err(e) => self.classify(&store, e),
            };
            let now = Instant::now();
            match error {
                CallError::Capacity(full) if wait && inner.pool_full == PoolFull::Queue => {
                    if now >= deadline {
                        return Err(CallError::Capacity(format!(
                            "{full}; no slot was freed in the {} ms the call waited",
                            now.duration_since(started).as_millis()
                        )));
                    }
                    waiting.get_or_insert_with(|| Waiting::new(&inner.slot_waiters));
                    let until = deadline.min(now + SLOT_RECHECK);
                    let _ = tokio::time::timeout_at(until.into(), freed).await;
                }
                error => return Err(error),
            }
        }
    }

    /// The component linked on the overflow engine, linked at the first overflow.
    fn spill_linked(&self, spill: &Spill, pooled: &Linked) -> Result<Arc<Linked>, CallError> {
        let mut linked = spill.linked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(linked) = &*linked {
            return Ok(linked.clone());
        }
        let unavailable = |e: Error| {
            CallError::Unavailable(format!("cannot instantiate outside the full pool: {e}"))
        };
        let component = spill
            .overflow
            .component(&spill.key, pooled.pre.component())
            .map_err(unavailable)?;
        let made = Arc::new(Linked::new(&spill.overflow.linker, &component).map_err(unavailable)?);
        *linked = Some(made.clone());
        Ok(made)
    }

    fn arm(&self, slot: &mut Slot, deadline: Instant) {
        let state = slot.store.data_mut();
        state.end_call();
        state.deadline = Some(deadline);
        state.limiter.memory_refused = false;
        slot.store.set_epoch_deadline(1);
    }

    /// Returns a healthy instance to the pool, or drops one that trapped.
    fn finish<T>(
        &self,
        mut lease: Lease,
        result: wasmtime::Result<Result<T, GuestError>>,
    ) -> Result<T, CallError> {
        match result {
            Ok(value) => {
                lease.slot.store.data_mut().end_call();
                lease.slot.served = lease.slot.served.saturating_add(1);
                self.release(lease);
                value.map_err(CallError::Guest)
            }
            Err(e) => {
                let error = self.classify(&lease.slot.store, e);
                self.inner.lost.fetch_add(1, Ordering::Relaxed);
                let v = &self.inner.context;
                tracing::warn!(endpoint = %v.endpoint, version = %v.version, "dropping instance: {error}");
                Err(error)
            }
        }
    }

    /// Returns an instance to the pool, unless its isolation or its call bound says it
    /// is done (then it is dropped, and the next call gets a fresh one).
    fn release(&self, mut lease: Lease) {
        let limits = &self.inner.limits;
        let done = match limits.isolation {
            Isolation::PerRequest => lease.slot.served > 0,
            Isolation::Pooled => {
                limits.max_requests_per_instance > 0
                    && lease.slot.served >= limits.max_requests_per_instance
            }
        };
        if done {
            self.inner.retired.fetch_add(1, Ordering::Relaxed);
            return;
        }
        lease.slot.last_used = Instant::now();
        self.lock_idle().push(lease.slot);
    }

    fn classify(&self, store: &Store<HostState>, e: wasmtime::Error) -> CallError {
        if let Some(full) = e.downcast_ref::<wasmtime::PoolConcurrencyLimitError>() {
            return CallError::Capacity(format!(
                "{full} (the instance pool's slots); raise `wasp serve --max-instances`, or let \
                 idle endpoints scale to zero (`min_workers = 0`) to free their slots"
            ));
        }
        let limits = &self.inner.limits;
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => CallError::Timeout {
                ms: limits.timeout_ms,
            },
            Some(Trap::StackOverflow) => CallError::StackOverflow,
            _ if store.data().limiter.memory_refused => CallError::OutOfMemory {
                mib: limits.memory_mib,
            },
            _ => CallError::Trap(chain(&e)),
        }
    }
}
