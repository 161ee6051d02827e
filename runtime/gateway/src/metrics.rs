//! Prometheus metrics of the gateway and the processor pools.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a request count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// Version name (empty when no version was picked).
    pub version: String,
    /// HTTP status code.
    pub code: u16,
}

/// Labels naming a version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// Version name.
    pub version: String,
}

/// Labels naming a kind of slot of the instance pool.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `component_instances`, `core_instances`, `memories`, `tables` or `stacks`.
    pub kind: String,
}

/// Labels of a request forwarded to another node.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// The node it went to.
    pub node: String,
}

/// Labels of a processor failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// Version name.
    pub version: String,
    /// What failed (`processor_timeout`, `processor_trap`...).
    pub kind: String,
}

/// Labels of an instance gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// Version name.
    pub version: String,
    /// `idle` or `busy`.
    pub state: String,
}

/// Labels of a worker gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// Version name.
    pub version: String,
    /// `starting`, `ready`, `draining` or `failed`.
    pub state: String,
}

/// Labels of a count of jobs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    /// Endpoint name.
    pub endpoint: String,
    /// `IN_QUEUE`, `IN_PROGRESS`, `COMPLETED`, `FAILED`, `CANCELLED` or `TIMED_OUT`.
    pub state: String,
}

/// Labels of an endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// Endpoint name.
    pub endpoint: String,
}

/// Labels of a tenant.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    /// Tenant name.
    pub tenant: String,
}

/// Labels of an integrity failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabels {
    /// What kind of file failed its check (`component`, `compiled_component`).
    pub file: String,
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    /// Jobs by endpoint and state.
    pub jobs: Family<JobLabels, Gauge>,
    /// Due jobs that may scale an endpoint up.
    pub job_backlog: Family<EndpointLabels, Gauge>,
    /// Requests answered on data routes.
    pub requests: Family<RequestLabels, Counter>,
    /// Latency of data-route requests, by version.
    pub latency: Family<VersionLabels, Histogram>,
    /// Failed processor calls.
    pub failures: Family<FailureLabels, Counter>,
    /// Processor instances, refreshed at each scrape.
    pub instances: Family<InstanceLabels, Gauge>,
    /// Slots of the server's instance pool in use, by kind.
    pub pool_used: Family<PoolLabels, Gauge>,
    /// Slots of the server's instance pool in all, by kind (`--max-instances`).
    pub pool_total: Family<PoolLabels, Gauge>,
    /// The memory of one slot of the instance pool, in bytes (`--slot-memory-mib`).
    pub pool_slot_memory: Gauge,
    /// Calls waiting for a slot of the full instance pool (`--pool-full queue`).
    pub pool_waiting: Gauge,
    /// Requests waiting for a processor instance, refreshed at each scrape.
    pub queued: Family<VersionLabels, Gauge>,
    /// Forward passes run by model backends (refreshed at each scrape).
    pub batches: Family<VersionLabels, Counter>,
    /// Requests served by model backends (refreshed at each scrape).
    pub batched_requests: Family<VersionLabels, Counter>,
    /// Requests waiting for a forward pass (refreshed at each scrape).
    pub backend_queued: Family<VersionLabels, Gauge>,
    /// Components compiled from Wasm.
    pub compiles: Counter,
    /// Components loaded from the compiled cache.
    pub cache_hits: Counter,
    /// Distinct components whose compiled code is in memory (shared by every version that
    /// uses them).
    pub components_loaded: Gauge,
    /// Processor instances alive outside the pool, created on demand (refreshed at each
    /// scrape).
    pub overflow_instances: Gauge,
    /// Processor instances created outside the pool since start (refreshed at each
    /// scrape).
    pub overflow_created: Counter,
    /// Files in the data directory that failed their check and were discarded.
    pub integrity_failures: Family<FileLabels, Counter>,
    /// Workers by state, refreshed at each scrape.
    pub workers: Family<WorkerLabels, Gauge>,
    /// Workers the autoscaler wants, refreshed at each scrape.
    pub desired_workers: Family<VersionLabels, Gauge>,
    /// Requests that woke a version with no ready worker (refreshed at each scrape).
    pub cold_starts: Family<VersionLabels, Counter>,
    /// Requests this node forwarded to another node of its cluster.
    pub forwarded: Family<ForwardLabels, Counter>,
    /// How long those requests waited for a worker.
    pub cold_start_seconds: Family<VersionLabels, Histogram>,
    /// Metered usage per tenant, refreshed at each scrape: requests, guest CPU seconds,
    /// model seconds and tokens (see `GET /api/v1/usage`).
    pub tenant_requests: Family<TenantLabels, Counter>,
    /// Time tenants' guest code ran, in seconds.
    pub tenant_guest_seconds: Family<TenantLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Time tenants' requests spent in model backends, in seconds.
    pub tenant_model_seconds: Family<TenantLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    /// Tokens tenants' backends reported.
    pub tenant_tokens: Family<TenantLabels, Counter>,
    /// Generation: time from a request's arrival at the backend to its first token.
    pub ttft: Family<VersionLabels, Histogram>,
    /// Generation: time per output token after the first (inter-token latency).
    pub tpot: Family<VersionLabels, Histogram>,
    /// Generation: prompt tokens read.
    pub prompt_tokens: Family<VersionLabels, Counter>,
    /// Generation: tokens generated (their rate is tokens per second).
    pub completion_tokens: Family<VersionLabels, Counter>,
    /// Generation: sequences in the running batches, refreshed at each scrape.
    pub running_sequences: Family<VersionLabels, Gauge>,
    /// Generation: sequences waiting for room, refreshed at each scrape.
    pub waiting_sequences: Family<VersionLabels, Gauge>,
    /// Generation: KV-cache bytes in use, refreshed at each scrape.
    pub kv_cache_bytes: Family<VersionLabels, Gauge>,
    /// Generation: KV-cache budget in bytes, refreshed at each scrape.
    pub kv_cache_capacity: Family<VersionLabels, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 50 µs to ~100 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 21,
    ))
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wasp");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered on data routes",
            requests.clone(),
        );
        let latency = Family::<VersionLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Latency of data-route requests",
            latency.clone(),
        );
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "processor_failures",
            "Failed processor calls",
            failures.clone(),
        );
        let instances = Family::<InstanceLabels, Gauge>::default();
        registry.register(
            "processor_instances",
            "Processor instances",
            instances.clone(),
        );
        let pool_used = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "instance_pool_slots_used",
            "Slots of the instance pool in use, by kind",
            pool_used.clone(),
        );
        let pool_total = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "instance_pool_slots",
            "Slots of the instance pool in all, by kind (wasp serve --max-instances)",
            pool_total.clone(),
        );
        let pool_slot_memory = Gauge::default();
        registry.register(
            "instance_pool_slot_memory_bytes",
            "Memory of one slot of the instance pool (wasp serve --slot-memory-mib)",
            pool_slot_memory.clone(),
        );
        let pool_waiting = Gauge::default();
        registry.register(
            "instance_pool_waiting",
            "Calls waiting for a slot of the full instance pool (wasp serve --pool-full queue)",
            pool_waiting.clone(),
        );
        let queued = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "queue_depth",
            "Requests waiting for a processor instance",
            queued.clone(),
        );
        let batches = Family::<VersionLabels, Counter>::default();
        registry.register(
            "backend_batches",
            "Forward passes run by model backends",
            batches.clone(),
        );
        let batched_requests = Family::<VersionLabels, Counter>::default();
        registry.register(
            "backend_requests",
            "Requests served by model backends",
            batched_requests.clone(),
        );
        let backend_queued = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "backend_queue_depth",
            "Requests waiting for a forward pass",
            backend_queued.clone(),
        );
        let compiles = Counter::default();
        registry.register(
            "component_compiles",
            "Components compiled from Wasm",
            compiles.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "component_cache_hits",
            "Components loaded from the compiled cache",
            cache_hits.clone(),
        );
        let components_loaded = Gauge::default();
        registry.register(
            "components_loaded",
            "Distinct components in memory, each shared by every version that uses it",
            components_loaded.clone(),
        );
        let overflow_instances = Gauge::default();
        registry.register(
            "overflow_instances",
            "Processor instances alive outside the instance pool (it was full, or their memory \
             cap is larger than its slots), created on demand",
            overflow_instances.clone(),
        );
        let overflow_created = Counter::default();
        registry.register(
            "overflow_instances_created",
            "Processor instances created on demand, outside the instance pool",
            overflow_created.clone(),
        );
        let integrity_failures = Family::<FileLabels, Counter>::default();
        registry.register(
            "integrity_failures",
            "Files in the data directory that failed their check and were discarded",
            integrity_failures.clone(),
        );
        let workers = Family::<WorkerLabels, Gauge>::default();
        registry.register("workers", "Workers by state", workers.clone());
        let desired_workers = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "desired_workers",
            "Workers the autoscaler wants",
            desired_workers.clone(),
        );
        let forwarded = Family::<ForwardLabels, Counter>::default();
        registry.register(
            "forwarded_requests",
            "Requests forwarded to another node of the cluster, which has a ready worker",
            forwarded.clone(),
        );
        let cold_starts = Family::<VersionLabels, Counter>::default();
        registry.register(
            "cold_starts",
            "Requests that woke a version with no ready worker",
            cold_starts.clone(),
        );
        let cold_start_seconds = Family::<VersionLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "cold_start_seconds",
            "How long a request waited for a worker to start",
            cold_start_seconds.clone(),
        );
        let jobs = Family::<JobLabels, Gauge>::default();
        registry.register(
            "jobs",
            "Jobs by state (finished ones until their result TTL passes)",
            jobs.clone(),
        );
        let job_backlog = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "job_backlog",
            "Queued jobs that are due and may scale the endpoint up",
            job_backlog.clone(),
        );
        let tenant_requests = Family::<TenantLabels, Counter>::default();
        registry.register(
            "tenant_requests",
            "Requests served per tenant (each job attempt counts)",
            tenant_requests.clone(),
        );
        let tenant_guest_seconds =
            Family::<TenantLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "tenant_guest_cpu_seconds",
            "Time a tenant's processors' guest code ran",
            tenant_guest_seconds.clone(),
        );
        let tenant_model_seconds =
            Family::<TenantLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "tenant_model_seconds",
            "Time a tenant's requests spent in model backends",
            tenant_model_seconds.clone(),
        );
        let tenant_tokens = Family::<TenantLabels, Counter>::default();
        registry.register(
            "tenant_tokens",
            "Tokens a tenant's backends reported",
            tenant_tokens.clone(),
        );
        let ttft = Family::<VersionLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "generation_time_to_first_token_seconds",
            "Time from a generation request's arrival at the backend to its first token",
            ttft.clone(),
        );
        let tpot = Family::<VersionLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "generation_time_per_output_token_seconds",
            "Mean time per generated token after the first, per request",
            tpot.clone(),
        );
        let prompt_tokens = Family::<VersionLabels, Counter>::default();
        registry.register(
            "generation_prompt_tokens",
            "Prompt tokens read by generation backends",
            prompt_tokens.clone(),
        );
        let completion_tokens = Family::<VersionLabels, Counter>::default();
        registry.register(
            "generation_completion_tokens",
            "Tokens generated (their rate is tokens per second)",
            completion_tokens.clone(),
        );
        let running_sequences = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "generation_running_sequences",
            "Sequences in the generation backends' running batches",
            running_sequences.clone(),
        );
        let waiting_sequences = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "generation_waiting_sequences",
            "Sequences waiting for a running slot or KV-cache memory",
            waiting_sequences.clone(),
        );
        let kv_cache_bytes = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "generation_kv_cache_bytes",
            "KV-cache memory in use by running sequences",
            kv_cache_bytes.clone(),
        );
        let kv_cache_capacity = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "generation_kv_cache_capacity_bytes",
            "KV-cache memory budget of the generation backends",
            kv_cache_capacity.clone(),
        );
        Self {
            registry,
            ttft,
            tpot,
            prompt_tokens,
            completion_tokens,
            running_sequences,
            waiting_sequences,
            kv_cache_bytes,
            kv_cache_capacity,
            tenant_requests,
            tenant_guest_seconds,
            tenant_model_seconds,
            tenant_tokens,
            jobs,
            job_backlog,
            requests,
            latency: latency.clone(),
            failures,
            instances,
            pool_used,
            pool_total,
            pool_slot_memory,
            pool_waiting,
            queued,
            batches,
            batched_requests,
            backend_queued,
            compiles,
            cache_hits,
            components_loaded,
            overflow_instances,
            overflow_created,
            integrity_failures,
            workers,
            desired_workers,
            cold_starts,
            cold_start_seconds,
            forwarded,
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
