//! Endpoint specs: what a user deploys, as TOML (or the equivalent JSON).
//!
//! Every struct refuses unknown keys, so a typo is an error that names the key, and
//! [`EndpointSpec::validate`] checks what serde cannot (names, weights, bounds), naming the
//! offending field as a path such as `versions[1].weight`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest endpoint name, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest version name, in characters.
pub const MAX_VERSION_NAME_CHARS: usize = 64;

/// A spec that could not be parsed or is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The text is not valid TOML or JSON for a spec (the message names the key or line).
    #[error("invalid spec: {0}")]
    Parse(String),
    /// A field holds a value the runtime cannot accept.
    #[error("invalid spec: `{field}`: {message}")]
    Invalid {
        /// Path of the field, such as `versions[0].limits.timeout_ms`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl SpecError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The field at fault, when the error names one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Parse(_) => None,
            Self::Invalid { field, .. } => Some(field),
        }
    }
}

/// A deployable endpoint: a name and one or more versions sharing its traffic.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// Unique name (UTF-8, at most 128 characters, no `/` or control characters).
    pub name: String,
    /// Free text shown in listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The versions; traffic is split over them by `weight`.
    pub versions: Vec<VersionSpec>,
    /// How the endpoint's async jobs run (the defaults for each job; a job's own policy
    /// may override them).
    #[serde(default)]
    pub jobs: JobsSpec,
    /// Whether anyone may call its data routes (invoke, OpenAI, KServe, jobs) without an
    /// API key. Managing it always takes a key of its tenant.
    #[serde(default, skip_serializing_if = "is_false")]
    pub public: bool,
    /// How fast and how much at once its data routes may be called (every caller
    /// together); beyond it the gateway answers `429` with `Retry-After`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Whether (and how much of) its traffic is saved as request records, for
    /// `wasp replay`; absent saves nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<RecordsSpec>,
}

/// Request records of an endpoint: a sample of its requests and responses (bodies up to a
/// size, headers without credentials), its latency, version and status, as JSONL files
/// that rotate by size and are kept by count.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordsSpec {
    /// Percent of requests saved (100).
    pub sample_percent: f64,
    /// Largest body kept of a request or response, in bytes; longer ones are cut and
    /// marked (64 KiB).
    pub max_body_bytes: u32,
    /// A file is closed and a new one begun past this size, in bytes (64 MiB).
    pub rotate_bytes: u64,
    /// Files kept; the oldest go first (10).
    pub keep_files: u32,
}

impl Default for RecordsSpec {
    fn default() -> Self {
        Self {
            sample_percent: 100.0,
            max_body_bytes: 64 * 1024,
            rotate_bytes: 64 * 1024 * 1024,
            keep_files: 10,
        }
    }
}

impl RecordsSpec {
    fn validate(&self) -> Result<(), SpecError> {
        if !(self.sample_percent > 0.0 && self.sample_percent <= 100.0) {
            return Err(SpecError::invalid(
                "records.sample_percent",
                "must be more than 0 and at most 100",
            ));
        }
        range_at(
            "records.max_body_bytes",
            self.max_body_bytes.into(),
            0,
            16 * 1024 * 1024,
        )?;
        range_at(
            "records.rotate_bytes",
            self.rotate_bytes,
            4096,
            16 * 1024 * 1024 * 1024,
        )?;
        range_at("records.keep_files", self.keep_files.into(), 1, 10_000)
    }
}

/// A token bucket and a cap on requests in flight: for an endpoint (every caller
/// together) or for one API key (every endpoint together).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests per second, sustained (the bucket's refill rate); absent for no rate cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// Requests that may come at once after a quiet spell (the bucket's size); at least
    /// one second's worth of `requests_per_second` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Most requests in flight at once; absent for no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
}

impl RateLimit {
    /// Checks the bounds, naming fields below `at` (`rate_limit`, say).
    pub fn validate(&self, at: &str) -> Result<(), SpecError> {
        if let Some(rps) = self.requests_per_second
            && !(rps.is_finite() && rps > 0.0 && rps <= 1e6)
        {
            return Err(SpecError::invalid(
                format!("{at}.requests_per_second"),
                "must be more than 0 and at most 1000000",
            ));
        }
        if let Some(burst) = self.burst {
            if self.requests_per_second.is_none() {
                return Err(SpecError::invalid(
                    format!("{at}.burst"),
                    "needs requests_per_second",
                ));
            }
            range_at(&format!("{at}.burst"), burst.into(), 1, 1_000_000)?;
        }
        if let Some(n) = self.max_concurrent {
            range_at(&format!("{at}.max_concurrent"), n.into(), 1, 1_000_000)?;
        }
        Ok(())
    }

    /// The bucket's size: `burst`, else one second's worth of the rate (at least 1).
    pub fn bucket(&self) -> Option<(f64, f64)> {
        let rate = self.requests_per_second?;
        let size = self.burst.map_or_else(|| rate.ceil().max(1.0), f64::from);
        Some((rate, size))
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Async jobs of an endpoint: how many run at once, and the policy each job gets unless it
/// brings its own.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsSpec {
    /// Jobs run at once per ready worker (one at zero workers, to wake the endpoint).
    pub concurrency_per_worker: u32,
    /// Longest one attempt may run, in seconds; then it is retried, or `TIMED_OUT`.
    pub execution_timeout_s: u32,
    /// Attempts before a job is dead-lettered (`FAILED` with every attempt's error).
    pub max_attempts: u32,
    /// Delay before the second attempt, in milliseconds; doubled for each further one.
    pub retry_delay_ms: u64,
    /// Longest delay between attempts, in milliseconds.
    pub retry_delay_max_ms: u64,
    /// How long a finished job and its result are kept, in seconds (24 h).
    pub result_ttl_s: u64,
    /// Whether a sync invoke that finds the endpoint cold, or would wait past its
    /// deadline, is answered `202` with a job instead (as if the client had sent `Prefer:
    /// respond-async`).
    pub spillover: bool,
}

impl Default for JobsSpec {
    fn default() -> Self {
        Self {
            concurrency_per_worker: 32,
            execution_timeout_s: 600,
            max_attempts: 3,
            retry_delay_ms: 1_000,
            retry_delay_max_ms: 300_000,
            result_ttl_s: 86_400,
            spillover: false,
        }
    }
}

impl JobsSpec {
    fn validate(&self) -> Result<(), SpecError> {
        range_at(
            "jobs.concurrency_per_worker",
            self.concurrency_per_worker.into(),
            1,
            4096,
        )?;
        range_at(
            "jobs.execution_timeout_s",
            self.execution_timeout_s.into(),
            1,
            7 * 86_400,
        )?;
        range_at("jobs.max_attempts", self.max_attempts.into(), 1, 100)?;
        range_at("jobs.retry_delay_ms", self.retry_delay_ms, 0, 86_400_000)?;
        range_at(
            "jobs.retry_delay_max_ms",
            self.retry_delay_max_ms,
            0,
            86_400_000,
        )?;
        range_at("jobs.result_ttl_s", self.result_ttl_s, 1, 90 * 86_400)
    }
}

/// One deployable revision of an endpoint.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionSpec {
    /// Version name, unique within the endpoint (`v1`, `blue`).
    pub name: String,
    /// Share of the endpoint's traffic in percent; the weights of all versions sum to 100.
    /// May be left out when the endpoint has a single version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// What does the model work; `none` lets the processor answer alone.
    #[serde(default)]
    pub backend: BackendSpec,
    /// The Wasm processor; required unless the backend is a container, which then takes
    /// requests as they come (method, path, headers, body) and answers them itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processor: Option<ProcessorSpec>,
    /// Per-request limits.
    #[serde(default)]
    pub limits: Limits,
    /// Worker scaling.
    #[serde(default)]
    pub scaling: ScalingSpec,
    /// Dynamic batching in front of the backend.
    #[serde(default)]
    pub batching: BatchingSpec,
    /// How a new spec replaces this version's workers, and how long a worker that goes
    /// may finish its requests.
    #[serde(default)]
    pub rollout: RolloutSpec,
}

/// Rolling update and graceful exit of a version's workers (the bounds of EAS's rolling
/// strategy).
///
/// A new spec that changes the model side (backend, batching, GPUs per worker) starts new
/// workers beside the old ones: at most `max_surge` beyond the version's count, with at
/// most `max_unavailable` of that count not serving; each old worker drains once a new
/// one is ready. A processor-only change keeps the workers and rolls nothing.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutSpec {
    /// Workers started beyond the version's count during a rolling update: a number
    /// (`2`) or a share of the count (`"25%"`, rounded up).
    pub max_surge: WorkerCount,
    /// Workers of the version's count that may be out of service during a rolling update:
    /// a number (`1`) or a share (`"10%"`, rounded down). Raise it when the machine has no
    /// room (GPUs) for a new worker beside the old ones.
    pub max_unavailable: WorkerCount,
    /// Seconds a draining worker (rolled over or scaled in) may finish the requests it
    /// holds before it stops.
    pub grace_period_s: u32,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_surge: WorkerCount::Percent(2),
            max_unavailable: WorkerCount::Workers(0),
            grace_period_s: 30,
        }
    }
}

/// A number of workers, absolute or as a share of a version's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerCount {
    /// This many workers.
    Workers(u32),
    /// This percentage of the count.
    Percent(u32),
}

impl WorkerCount {
    /// The number of workers out of `count`, a share rounded up (`round_up`) or down.
    pub fn of(self, count: u32, round_up: bool) -> u32 {
        match self {
            Self::Workers(n) => n,
            Self::Percent(p) => {
                let scaled = u64::from(count) * u64::from(p);
                let n = if round_up {
                    scaled.div_ceil(100)
                } else {
                    scaled / 100
                };
                u32::try_from(n).unwrap_or(u32::MAX)
            }
        }
    }

    /// Whether it is zero whatever the count.
    pub fn is_zero(self) -> bool {
        matches!(self, Self::Workers(0) | Self::Percent(0))
    }
}

impl fmt::Display for WorkerCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Workers(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for WorkerCount {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .minimum(Some(0))
                    .maximum(Some(1024)),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some("^(100|[1-9]?[0-9])%$")),
            )
            .description(Some(
                "A number of workers (`2`) or a percentage of the count (`\"25%\"`).",
            ))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for WorkerCount {}

impl Serialize for WorkerCount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Workers(n) => s.serialize_u32(*n),
            Self::Percent(_) => s.collect_str(self),
        }
    }
}

impl<'de> Deserialize<'de> for WorkerCount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = WorkerCount;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of workers (`2`) or a percentage (`\"25%\"`)")
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<WorkerCount, E> {
                u32::try_from(n)
                    .map(WorkerCount::Workers)
                    .map_err(|_| E::custom(format!("{n} workers is too many")))
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<WorkerCount, E> {
                u64::try_from(n)
                    .map_err(|_| E::custom(format!("{n}: a number of workers is not negative")))
                    .and_then(|n| self.visit_u64(n))
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<WorkerCount, E> {
                let bad = || {
                    E::custom(format!(
                        "`{text}` is not a number of workers or a percentage such as `25%`"
                    ))
                };
                match text.strip_suffix('%') {
                    Some(digits)
                        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) =>
                    {
                        let p: u32 = digits.parse().map_err(|_| bad())?;
                        if p > 100 {
                            return Err(E::custom(format!(
                                "`{text}`: a percentage is at most 100%"
                            )));
                        }
                        Ok(WorkerCount::Percent(p))
                    }
                    Some(_) => Err(bad()),
                    None => text.parse().map(WorkerCount::Workers).map_err(|_| bad()),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Dynamic batching: concurrent requests merged into one forward pass.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchingSpec {
    /// Most rows (sequences) in one forward pass; 1 turns batching off.
    pub max_batch: u32,
    /// Longest a request waits for others to join its batch, in milliseconds.
    pub max_batch_delay_ms: u64,
}

impl Default for BatchingSpec {
    fn default() -> Self {
        Self {
            max_batch: 32,
            max_batch_delay_ms: 2,
        }
    }
}

/// The backend of a version.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum BackendSpec {
    /// No model: the processor's `handle` answers each request.
    #[default]
    None,
    /// A native candle model.
    Candle(CandleBackend),
    /// An OCI container that listens on one HTTP port.
    Container(Box<ContainerBackend>),
}

impl BackendSpec {
    /// The `kind` key of this backend.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Candle(_) => "candle",
            Self::Container(_) => "container",
        }
    }
}

/// A native candle model backend.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CandleBackend {
    /// A local directory with config.json and weights (model.safetensors or
    /// pytorch_model.bin), or the name of one in the server's models directory.
    pub model: String,
    /// What the model does: `embeddings` or `generate`.
    pub task: String,
    /// `cpu`, `cuda:N` or `auto`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `generate`: most sequences decoded together in one running batch (continuous
    /// batching); 1 runs one sequence at a time. Default 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequences: Option<u32>,
    /// `generate`: KV-cache memory for all running sequences, in MiB; sequences beyond it
    /// wait. Default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_mib: Option<u32>,
}

fn default_device() -> String {
    "auto".to_owned()
}

/// An OCI container backend: each worker is one container (or, with the server's `process`
/// driver, one local process) that answers HTTP on one port.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerBackend {
    /// Image reference (`registry/name:tag` or `name@sha256:...`). The `process` driver
    /// runs `command` on the host instead and ignores it.
    pub image: String,
    /// Start command, run by `shell -c`; the image's entrypoint when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Shell that runs `command`.
    #[serde(default = "default_shell")]
    pub shell: String,
    /// The one HTTP port the container listens on (1-65535). The `process` driver picks a
    /// free port and passes it as `PORT`.
    pub port: u32,
    /// Environment variables of the container.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A volume to mount: an absolute host path under the server's allowed roots
    /// (`wasp serve --volume-root`), or the name of an engine volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Where the volume is mounted in the container (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_path: Option<String>,
    /// Memory limit of each container, in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// CPU limit of each container, in cores (fractions allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// When to pull the image: `missing` (default), `always` or `never`.
    #[serde(default = "default_pull")]
    pub pull: String,
    /// The probe that gates the worker's `ready`: requests reach the container only once
    /// it answers 2xx.
    #[serde(default)]
    pub readiness: Probe,
    /// A probe that restarts the container after `failure_threshold` failures in a row;
    /// none when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
    /// Longest a container may take to become ready, in seconds, before the worker fails
    /// with its last log lines. Default 120.
    #[serde(default = "default_start_timeout")]
    pub start_timeout_s: u64,
    /// Seconds between SIGTERM and SIGKILL when a worker stops. Default 30.
    #[serde(default = "default_grace")]
    pub grace_period_s: u64,
    /// Where a processor's model input is POSTed, as a KServe v2 inference request.
    #[serde(default = "default_inference_path")]
    pub inference_path: String,
    /// The GPUs of the server's inventory this worker owns (`scaling.gpus_per_worker`), set
    /// by the server for each worker, never by a spec.
    #[serde(skip)]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub gpus: Vec<u32>,
}

/// An HTTP probe of a container.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Probe {
    /// Path answered with 2xx when healthy.
    pub path: String,
    /// Wait before the first probe, in milliseconds.
    pub initial_delay_ms: u64,
    /// Time between probes, in milliseconds.
    pub period_ms: u64,
    /// Longest one probe may take, in milliseconds.
    pub timeout_ms: u64,
    /// Failures in a row that count (liveness: restart the container).
    pub failure_threshold: u32,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            path: "/v2/health/ready".to_owned(),
            initial_delay_ms: 0,
            period_ms: 200,
            timeout_ms: 1000,
            failure_threshold: 3,
        }
    }
}

fn default_pull() -> String {
    "missing".to_owned()
}

fn default_start_timeout() -> u64 {
    120
}

fn default_grace() -> u64 {
    30
}

fn default_inference_path() -> String {
    "/v2/models/model/infer".to_owned()
}

impl ContainerBackend {
    fn validate(&self, at: &dyn Fn(&str) -> String) -> Result<(), SpecError> {
        if self.image.trim().is_empty() {
            return Err(SpecError::invalid(at("backend.image"), "required"));
        }
        if !(1..=65535).contains(&self.port) {
            return Err(SpecError::invalid(
                at("backend.port"),
                format!("{} is not a port: use 1-65535", self.port),
            ));
        }
        if !matches!(self.pull.as_str(), "missing" | "always" | "never") {
            return Err(SpecError::invalid(
                at("backend.pull"),
                format!("`{}` is not `missing`, `always` or `never`", self.pull),
            ));
        }
        if self.command.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return Err(SpecError::invalid(
                at("backend.command"),
                "is empty: leave it out to run the image's entrypoint",
            ));
        }
        match (&self.volume, &self.mount_path) {
            (Some(_), None) => {
                return Err(SpecError::invalid(
                    at("backend.mount_path"),
                    "a volume needs the path to mount it at",
                ));
            }
            (None, Some(_)) => {
                return Err(SpecError::invalid(
                    at("backend.volume"),
                    "mount_path is set but there is no volume",
                ));
            }
            (Some(_), Some(path)) if !path.starts_with('/') => {
                return Err(SpecError::invalid(
                    at("backend.mount_path"),
                    "must be an absolute path",
                ));
            }
            _ => {}
        }
        if self.memory_mib == Some(0) {
            return Err(SpecError::invalid(
                at("backend.memory_mib"),
                "must be at least 1",
            ));
        }
        if let Some(cpus) = self.cpus
            && !(cpus.is_finite() && cpus > 0.0 && cpus <= 1024.0)
        {
            return Err(SpecError::invalid(
                at("backend.cpus"),
                "must be more than 0 and at most 1024",
            ));
        }
        if !self.inference_path.starts_with('/') {
            return Err(SpecError::invalid(
                at("backend.inference_path"),
                "must start with `/`",
            ));
        }
        if !(1..=3600).contains(&self.start_timeout_s) {
            return Err(SpecError::invalid(
                at("backend.start_timeout_s"),
                "must be between 1 and 3600",
            ));
        }
        if self.grace_period_s > 3600 {
            return Err(SpecError::invalid(
                at("backend.grace_period_s"),
                "must be at most 3600",
            ));
        }
        let probes = std::iter::once(("readiness", &self.readiness))
            .chain(self.liveness.iter().map(|p| ("liveness", p)));
        for (name, probe) in probes {
            if !probe.path.starts_with('/') {
                return Err(SpecError::invalid(
                    at(&format!("backend.{name}.path")),
                    "must start with `/`",
                ));
            }
            if !(10..=600_000).contains(&probe.period_ms) {
                return Err(SpecError::invalid(
                    at(&format!("backend.{name}.period_ms")),
                    "must be between 10 and 600000",
                ));
            }
            if !(1..=600_000).contains(&probe.timeout_ms) {
                return Err(SpecError::invalid(
                    at(&format!("backend.{name}.timeout_ms")),
                    "must be between 1 and 600000",
                ));
            }
            if probe.failure_threshold == 0 {
                return Err(SpecError::invalid(
                    at(&format!("backend.{name}.failure_threshold")),
                    "must be at least 1",
                ));
            }
        }
        Ok(())
    }
}

fn default_shell() -> String {
    "/bin/sh".to_owned()
}

/// The Wasm processor of a version and what it is granted.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorSpec {
    /// The component: a path (resolved and uploaded by the CLI) or `sha256:<hex>` of an
    /// uploaded component.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"))]
    pub component: ComponentRef,
    /// Configuration, read by the processor through the `config` import (and visible as
    /// its WASI environment). The host's own environment is never passed.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Host directories the processor may read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Socket addresses the processor may connect to, as `IP:PORT` or `IP:*`. Empty means
    /// no network at all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_hosts: Vec<String>,
}

/// A read-only directory mount.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Directory on the host.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub host: PathBuf,
    /// Absolute path the processor sees it at.
    pub guest: String,
}

/// Where a processor component comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ComponentRef {
    /// Content address of an uploaded component: 64 lower-case hex digits of its SHA-256.
    Digest(String),
    /// A file, relative to the spec's directory.
    Path(PathBuf),
    /// A component published as an OCI artifact, `oci://registry/repository[:tag][@digest]`
    /// (the reference without the scheme): the server pulls it at deploy, with the
    /// tenant's login to that registry, and keeps it as if uploaded.
    Oci(String),
}

impl ComponentRef {
    /// Parses `sha256:<hex>` as a digest, `oci://<reference>` as an OCI artifact, and
    /// anything else as a path.
    pub fn parse(s: &str) -> Self {
        if let Some(hex) = s.strip_prefix("sha256:") {
            Self::Digest(hex.to_owned())
        } else if let Some(reference) = s.strip_prefix("oci://") {
            Self::Oci(reference.to_owned())
        } else {
            Self::Path(PathBuf::from(s))
        }
    }
}

impl fmt::Display for ComponentRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Digest(hex) => write!(f, "sha256:{hex}"),
            Self::Path(path) => write!(f, "{}", path.display()),
            Self::Oci(reference) => write!(f, "oci://{reference}"),
        }
    }
}

impl Serialize for ComponentRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ComponentRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Self::parse(&s))
    }
}

/// Per-request limits of a version.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Deadline of one processor call, in milliseconds.
    pub timeout_ms: u64,
    /// Linear memory cap of one processor instance, in MiB.
    pub memory_mib: u32,
    /// Most processor instances alive at once (and so most requests in a processor at once).
    pub max_instances: u32,
    /// Most requests waiting for an instance; beyond it the gateway answers 429.
    pub max_queue: u32,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// Largest response body a processor may answer, in bytes; more is answered `502`.
    pub max_response_bytes: u64,
    /// Whether an instance serves many requests (`pooled`) or each request gets a
    /// brand-new one (`per-request`, so that nothing one request leaves in memory reaches
    /// the next).
    pub isolation: Isolation,
    /// In `pooled` mode, how many calls one instance serves before it is replaced (0: no
    /// bound).
    pub max_requests_per_instance: u32,
}

/// How processor instances are shared between requests.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// Instances are reused from a pool (up to `max_requests_per_instance` calls each).
    #[default]
    Pooled,
    /// A fresh instance for every call, dropped after it.
    PerRequest,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_ms: 5_000,
            memory_mib: 128,
            max_instances: 32,
            max_queue: 256,
            max_body_bytes: 10 * 1024 * 1024,
            max_response_bytes: 64 * 1024 * 1024,
            isolation: Isolation::Pooled,
            max_requests_per_instance: 0,
        }
    }
}

/// Worker scaling of a version (defaults from the managed services users know).
///
/// Target tracking on in-flight requests per worker is always on; `step` policies can
/// only make it scale out sooner or scale in later, and `schedule` windows change
/// `min_workers` and `max_workers` for a time.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScalingSpec {
    /// Workers always running (0 allows scale to zero: the first request then waits for a
    /// worker to start).
    pub min_workers: u32,
    /// Most workers.
    pub max_workers: u32,
    /// Workers started at deploy (Knative's initial scale); by default `min_workers`,
    /// and at least one, so that a deploy proves the version can start. 0 (with
    /// `min_workers = 0`) deploys the version scaled to zero: its processor is instantiated
    /// once to prove it and dropped, so an idle endpoint holds no instance from the start,
    /// and a model backend is first loaded by the first request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_workers: Option<u32>,
    /// Target in-flight requests per worker (target tracking).
    pub target_concurrency: u32,
    /// Processor instances made ready for each worker (for backend `none`, a worker is
    /// this many warm instances).
    pub instances_per_worker: u32,
    /// GPUs each worker owns (1–8); absent for CPU workers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus_per_worker: Option<u32>,
    /// Seconds over which in-flight requests are averaged for target tracking.
    pub stable_window_s: u32,
    /// Seconds of the short window that detects bursts.
    pub panic_window_s: u32,
    /// Load over the short window, in percent of what the current workers are meant to
    /// carry, at which the version scales up at once and stops scaling down until the
    /// burst has been over for a stable window.
    pub panic_threshold_percent: u32,
    /// Most workers added within 60 s, in percent of the workers there were at its start
    /// (200: two workers become at most six).
    pub max_scale_up_percent: u32,
    /// Seconds the load must stay below target before a worker is removed.
    pub scale_down_delay_s: u32,
    /// Workers removed in one scale-down.
    pub scale_down_step: u32,
    /// Seconds after a scale-up before the next one (bursts over the panic threshold do
    /// not wait).
    pub scale_up_cooldown_s: u64,
    /// Seconds after a scale-down before the next one.
    pub scale_down_cooldown_s: u64,
    /// Whether load may remove workers at all (`false`: only `max_workers` or a schedule
    /// lowers the count, and the version never scales to zero).
    pub scale_in: bool,
    /// Seconds a request may wait for a worker to start when the version has none; beyond
    /// it the answer is 503 with `Retry-After`.
    pub cold_start_timeout_s: u32,
    /// Step policies: bands of in-flight requests per worker and the change each asks for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub step: Vec<StepPolicy>,
    /// Scheduled changes of `min_workers` and `max_workers`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub schedule: Vec<SchedulePolicy>,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            min_workers: 1,
            max_workers: 1,
            initial_workers: None,
            target_concurrency: 100,
            instances_per_worker: 1,
            gpus_per_worker: None,
            stable_window_s: 60,
            panic_window_s: 6,
            panic_threshold_percent: 200,
            max_scale_up_percent: 200,
            scale_down_delay_s: 60,
            scale_down_step: 1,
            scale_up_cooldown_s: 300,
            scale_down_cooldown_s: 300,
            scale_in: true,
            cold_start_timeout_s: 120,
            step: Vec::new(),
            schedule: Vec::new(),
        }
    }
}

/// A step policy: while the in-flight requests per worker, averaged over the stable
/// window, lie in `[lower, upper)`, the version asks for `change` workers more or fewer.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepPolicy {
    /// Lowest load of the band, inclusive; absent for no lower bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower: Option<f64>,
    /// Load where the band ends, exclusive; absent for no upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<f64>,
    /// The change: `+2`, `-1` (workers) or `+50%`, `-25%` (of the current workers, at
    /// least one).
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "+50%"))]
    pub change: StepChange,
}

/// How many workers a step policy adds or removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepChange {
    /// This many workers (negative removes).
    Workers(i32),
    /// This percentage of the current workers, rounded away from zero (negative removes).
    Percent(i32),
}

impl StepChange {
    /// The signed change in workers when `current` are running.
    pub fn workers(self, current: u32) -> i64 {
        match self {
            Self::Workers(n) => i64::from(n),
            Self::Percent(p) => {
                let magnitude = (i64::from(current) * i64::from(p.unsigned_abs()) + 99) / 100;
                magnitude.max(1) * i64::from(p.signum())
            }
        }
    }
}

impl fmt::Display for StepChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Workers(n) => write!(f, "{n:+}"),
            Self::Percent(p) => write!(f, "{p:+}%"),
        }
    }
}

impl std::str::FromStr for StepChange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a change such as `+2`, `-1`, `+50%` or `-25%`");
        let (sign, rest) = match text.as_bytes().first() {
            Some(b'+') => (1, &text[1..]),
            Some(b'-') => (-1, &text[1..]),
            _ => return Err(bad()),
        };
        let (digits, percent) = match rest.strip_suffix('%') {
            Some(digits) => (digits, true),
            None => (rest, false),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: i32 = digits.parse().map_err(|_| bad())?;
        if n == 0 || n > 1000 {
            return Err(format!("`{text}`: the change must be between 1 and 1000"));
        }
        Ok(if percent {
            Self::Percent(sign * n)
        } else {
            Self::Workers(sign * n)
        })
    }
}

impl Serialize for StepChange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StepChange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A scheduled window: from each time `cron` matches, for `duration_s`, the version's
/// `min_workers` and `max_workers` are these (a field left out keeps the version's own).
/// Where windows overlap, the one that began last wins.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulePolicy {
    /// When each window begins: five fields (minute hour day-of-month month day-of-week),
    /// such as `0 8 * * MON-FRI`.
    pub cron: String,
    /// The time zone `cron` is read in: `UTC` (default) or a name such as `Europe/Berlin`.
    #[serde(default = "utc")]
    pub timezone: String,
    /// How long each window lasts, in seconds.
    pub duration_s: u64,
    /// `min_workers` during the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_workers: Option<u32>,
    /// `max_workers` during the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u32>,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// A parsed schedule: when its windows begin, in which time zone, for how long.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: croner::Cron,
    zone: jiff::tz::TimeZone,
    duration: jiff::SignedDuration,
}

impl Schedule {
    /// Parses `cron` and `timezone`; the error says what is wrong with which of the two
    /// (`Err((field, message))`).
    pub fn parse(policy: &SchedulePolicy) -> Result<Self, (&'static str, String)> {
        let fields = policy.cron.split_whitespace().count();
        if fields != 5 {
            return Err((
                "cron",
                format!(
                    "`{}` has {fields} fields; a schedule has five (minute hour day-of-month \
                     month day-of-week)",
                    policy.cron
                ),
            ));
        }
        let cron: croner::Cron = policy
            .cron
            .parse()
            .map_err(|e| ("cron", format!("`{}`: {e}", policy.cron)))?;
        let zone = jiff::tz::TimeZone::get(&policy.timezone).map_err(|_| {
            (
                "timezone",
                format!(
                    "`{}` is not a time zone (use `UTC` or a name such as `Europe/Berlin`)",
                    policy.timezone
                ),
            )
        })?;
        let seconds = i64::try_from(policy.duration_s).unwrap_or(i64::MAX);
        Ok(Self {
            cron,
            zone,
            duration: jiff::SignedDuration::from_secs(seconds),
        })
    }

    /// When the window that contains `now` began, if one does.
    pub fn active_since(&self, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
        // A window is `[begin, begin + duration)`: the last beginning at or before `now`
        // counts, when it is less than `duration` ago.
        let zoned = now.to_zoned(self.zone.clone());
        let begin = self
            .cron
            .find_previous_occurrence(&zoned, true)
            .ok()?
            .timestamp();
        let end = begin.checked_add(self.duration).ok()?;
        (now < end).then_some(begin)
    }
}

impl EndpointSpec {
    /// Parses and validates a TOML spec.
    pub fn from_toml(text: &str) -> Result<Self, SpecError> {
        let spec: Self = toml::from_str(text).map_err(|e| SpecError::Parse(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Parses and validates a JSON spec.
    pub fn from_json(text: &[u8]) -> Result<Self, SpecError> {
        let spec: Self =
            serde_json::from_slice(text).map_err(|e| SpecError::Parse(e.to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The weight of version `index`, after defaults.
    pub fn weight(&self, index: usize) -> u32 {
        match self.versions.get(index) {
            Some(v) => v
                .weight
                .unwrap_or(if self.versions.len() == 1 { 100 } else { 0 }),
            None => 0,
        }
    }

    /// Checks what the types alone cannot: names, weights, bounds and requirements.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name("name", &self.name, MAX_NAME_CHARS)?;
        if self.versions.is_empty() {
            return Err(SpecError::invalid(
                "versions",
                "at least one version is required",
            ));
        }
        let mut total = 0u64;
        for (i, version) in self.versions.iter().enumerate() {
            let at = |field: &str| format!("versions[{i}].{field}");
            check_name(&at("name"), &version.name, MAX_VERSION_NAME_CHARS)?;
            if self.versions[..i].iter().any(|v| v.name == version.name) {
                return Err(SpecError::invalid(
                    at("name"),
                    format!("version `{}` appears twice", version.name),
                ));
            }
            match version.weight {
                Some(w) if w > 100 => {
                    return Err(SpecError::invalid(
                        at("weight"),
                        "must be between 0 and 100",
                    ));
                }
                None if self.versions.len() > 1 => {
                    return Err(SpecError::invalid(
                        at("weight"),
                        "required when an endpoint has more than one version",
                    ));
                }
                _ => {}
            }
            total += u64::from(self.weight(i));
            version.validate(&at)?;
        }
        if total != 100 {
            return Err(SpecError::invalid(
                "versions[].weight",
                format!("weights must sum to 100, not {total}"),
            ));
        }
        if let Some(limit) = &self.rate_limit {
            limit.validate("rate_limit")?;
        }
        if let Some(records) = &self.records {
            records.validate()?;
        }
        self.jobs.validate()
    }
}

impl VersionSpec {
    fn validate(&self, at: &dyn Fn(&str) -> String) -> Result<(), SpecError> {
        if matches!(self.backend, BackendSpec::None) && self.processor.is_none() {
            return Err(SpecError::invalid(
                at("processor"),
                "a version with backend `none` needs a processor to answer requests",
            ));
        }
        if let BackendSpec::Container(container) = &self.backend {
            container.validate(at)?;
        }
        if let Some(processor) = &self.processor {
            if let ComponentRef::Digest(hex) = &processor.component
                && (hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            {
                return Err(SpecError::invalid(
                    at("processor.component"),
                    "a digest is `sha256:` and 64 lower-case hex digits",
                ));
            }
            for (j, mount) in processor.mounts.iter().enumerate() {
                if !mount.guest.starts_with('/') {
                    return Err(SpecError::invalid(
                        at(&format!("processor.mounts[{j}].guest")),
                        "must be an absolute path",
                    ));
                }
            }
            for (j, addr) in processor.allow_hosts.iter().enumerate() {
                if parse_allow_host(addr).is_none() {
                    return Err(SpecError::invalid(
                        at(&format!("processor.allow_hosts[{j}]")),
                        format!("`{addr}` is not `IP:PORT` or `IP:*`"),
                    ));
                }
            }
        }
        let limits = &self.limits;
        if !(1..=600_000).contains(&limits.timeout_ms) {
            return Err(SpecError::invalid(
                at("limits.timeout_ms"),
                "must be between 1 and 600000",
            ));
        }
        if !(1..=4096).contains(&limits.memory_mib) {
            return Err(SpecError::invalid(
                at("limits.memory_mib"),
                "must be between 1 and 4096",
            ));
        }
        if !(1..=1024).contains(&limits.max_instances) {
            return Err(SpecError::invalid(
                at("limits.max_instances"),
                "must be between 1 and 1024",
            ));
        }
        if limits.max_body_bytes == 0 {
            return Err(SpecError::invalid(
                at("limits.max_body_bytes"),
                "must be positive",
            ));
        }
        if limits.max_response_bytes == 0 {
            return Err(SpecError::invalid(
                at("limits.max_response_bytes"),
                "must be positive",
            ));
        }
        if limits.isolation == Isolation::PerRequest && limits.max_requests_per_instance > 0 {
            return Err(SpecError::invalid(
                at("limits.max_requests_per_instance"),
                "applies to `pooled` isolation only (a `per-request` instance serves one call)",
            ));
        }
        if !(1..=4096).contains(&self.batching.max_batch) {
            return Err(SpecError::invalid(
                at("batching.max_batch"),
                "must be between 1 and 4096",
            ));
        }
        if self.batching.max_batch_delay_ms > 10_000 {
            return Err(SpecError::invalid(
                at("batching.max_batch_delay_ms"),
                "must be at most 10000",
            ));
        }
        if let BackendSpec::Candle(candle) = &self.backend {
            if !matches!(candle.task.as_str(), "embeddings" | "generate") {
                return Err(SpecError::invalid(
                    at("backend.task"),
                    format!(
                        "`{}` is not a candle task (embeddings, generate)",
                        candle.task
                    ),
                ));
            }
            if candle.task != "generate"
                && (candle.max_sequences.is_some() || candle.kv_cache_mib.is_some())
            {
                return Err(SpecError::invalid(
                    at("backend.max_sequences"),
                    "`max_sequences` and `kv_cache_mib` apply to task `generate` only",
                ));
            }
            if candle
                .max_sequences
                .is_some_and(|n| !(1..=256).contains(&n))
            {
                return Err(SpecError::invalid(
                    at("backend.max_sequences"),
                    "must be between 1 and 256",
                ));
            }
            if candle
                .kv_cache_mib
                .is_some_and(|n| !(1..=1_048_576).contains(&n))
            {
                return Err(SpecError::invalid(
                    at("backend.kv_cache_mib"),
                    "must be between 1 and 1048576",
                ));
            }
            if self.processor.is_none() {
                return Err(SpecError::invalid(
                    at("processor"),
                    "a candle backend needs a processor that turns requests into tensors",
                ));
            }
        }
        self.scaling.validate(at, &self.backend, limits)?;
        self.rollout.validate(at)
    }
}

impl RolloutSpec {
    fn validate(&self, at: &dyn Fn(&str) -> String) -> Result<(), SpecError> {
        if self.max_surge.is_zero() && self.max_unavailable.is_zero() {
            return Err(SpecError::invalid(
                at("rollout.max_surge"),
                "max_surge and max_unavailable cannot both be 0: a rolling update could \
                 neither add a worker nor free one",
            ));
        }
        for (name, count) in [
            ("max_surge", self.max_surge),
            ("max_unavailable", self.max_unavailable),
        ] {
            if let WorkerCount::Workers(n) = count {
                range_at(&at(&format!("rollout.{name}")), n.into(), 0, 1024)?;
            }
        }
        range_at(
            &at("rollout.grace_period_s"),
            self.grace_period_s.into(),
            0,
            3600,
        )
    }
}

impl ScalingSpec {
    fn validate(
        &self,
        at: &dyn Fn(&str) -> String,
        backend: &BackendSpec,
        limits: &Limits,
    ) -> Result<(), SpecError> {
        let field = |name: &str| at(&format!("scaling.{name}"));
        let range =
            |name: &str, value: u64, low: u64, high: u64| range_at(&field(name), value, low, high);
        range("max_workers", self.max_workers.into(), 1, 1024)?;
        if self.min_workers > self.max_workers {
            return Err(SpecError::invalid(
                field("min_workers"),
                format!(
                    "{} is more than max_workers ({})",
                    self.min_workers, self.max_workers
                ),
            ));
        }
        if let Some(initial) = self.initial_workers
            && !(self.min_workers..=self.max_workers).contains(&initial)
        {
            return Err(SpecError::invalid(
                field("initial_workers"),
                format!(
                    "{initial} is not within min_workers ({}) and max_workers ({})",
                    self.min_workers, self.max_workers
                ),
            ));
        }
        range(
            "target_concurrency",
            self.target_concurrency.into(),
            1,
            1_000_000,
        )?;
        range(
            "instances_per_worker",
            self.instances_per_worker.into(),
            1,
            1024,
        )?;
        if matches!(backend, BackendSpec::None)
            && u64::from(self.min_workers) * u64::from(self.instances_per_worker)
                > u64::from(limits.max_instances)
        {
            return Err(SpecError::invalid(
                field("min_workers"),
                format!(
                    "{} workers of {} instances each exceed limits.max_instances ({})",
                    self.min_workers, self.instances_per_worker, limits.max_instances
                ),
            ));
        }
        if let Some(gpus) = self.gpus_per_worker {
            range("gpus_per_worker", gpus.into(), 1, 8)?;
        }
        range("stable_window_s", self.stable_window_s.into(), 1, 3600)?;
        range("panic_window_s", self.panic_window_s.into(), 1, 3600)?;
        if self.panic_window_s > self.stable_window_s {
            return Err(SpecError::invalid(
                field("panic_window_s"),
                format!(
                    "{} is longer than stable_window_s ({})",
                    self.panic_window_s, self.stable_window_s
                ),
            ));
        }
        range(
            "panic_threshold_percent",
            self.panic_threshold_percent.into(),
            101,
            10_000,
        )?;
        range(
            "max_scale_up_percent",
            self.max_scale_up_percent.into(),
            1,
            100_000,
        )?;
        range(
            "scale_down_delay_s",
            self.scale_down_delay_s.into(),
            0,
            86_400,
        )?;
        range("scale_down_step", self.scale_down_step.into(), 1, 1024)?;
        range("scale_up_cooldown_s", self.scale_up_cooldown_s, 0, 86_400)?;
        range(
            "scale_down_cooldown_s",
            self.scale_down_cooldown_s,
            0,
            86_400,
        )?;
        range(
            "cold_start_timeout_s",
            self.cold_start_timeout_s.into(),
            1,
            3600,
        )?;
        for (j, step) in self.step.iter().enumerate() {
            let at = |name: &str| field(&format!("step[{j}].{name}"));
            if step.lower.is_none() && step.upper.is_none() {
                return Err(SpecError::invalid(
                    at("lower"),
                    "a step needs `lower`, `upper` or both",
                ));
            }
            for (name, bound) in [("lower", step.lower), ("upper", step.upper)] {
                if bound.is_some_and(|b| !b.is_finite() || b < 0.0) {
                    return Err(SpecError::invalid(at(name), "must be a number >= 0"));
                }
            }
            if let (Some(lower), Some(upper)) = (step.lower, step.upper)
                && lower >= upper
            {
                return Err(SpecError::invalid(
                    at("upper"),
                    format!("{upper} is not above lower ({lower})"),
                ));
            }
            let (lo, hi) = step.band();
            for (k, other) in self.step.iter().enumerate().take(j) {
                let (olo, ohi) = other.band();
                if lo < ohi && olo < hi {
                    return Err(SpecError::invalid(
                        at("lower"),
                        format!("the band overlaps step[{k}]'s"),
                    ));
                }
            }
        }
        for (j, window) in self.schedule.iter().enumerate() {
            let at = |name: &str| field(&format!("schedule[{j}].{name}"));
            Schedule::parse(window)
                .map_err(|(name, message)| SpecError::invalid(at(name), message))?;
            range_at(&at("duration_s"), window.duration_s, 60, 366 * 86_400)?;
            if window.min_workers.is_none() && window.max_workers.is_none() {
                return Err(SpecError::invalid(
                    at("min_workers"),
                    "a schedule sets `min_workers`, `max_workers` or both",
                ));
            }
            if let Some(max) = window.max_workers {
                range_at(&at("max_workers"), max.into(), 1, 1024)?;
            }
            if let Some(min) = window.min_workers {
                range_at(&at("min_workers"), min.into(), 0, 1024)?;
                if min > window.max_workers.unwrap_or(u32::MAX) {
                    return Err(SpecError::invalid(
                        at("min_workers"),
                        "is more than this schedule's max_workers",
                    ));
                }
            }
        }
        Ok(())
    }
}

impl StepPolicy {
    /// The band as `[lower, upper)`, open ends as infinities.
    pub fn band(&self) -> (f64, f64) {
        (
            self.lower.unwrap_or(f64::NEG_INFINITY),
            self.upper.unwrap_or(f64::INFINITY),
        )
    }
}

fn range_at(field: &str, value: u64, low: u64, high: u64) -> Result<(), SpecError> {
    if (low..=high).contains(&value) {
        Ok(())
    } else {
        Err(SpecError::invalid(
            field,
            format!("must be between {low} and {high}"),
        ))
    }
}

/// Parses an allow-list entry: `IP:PORT` or `IP:*` (IPv6 in brackets). Returns the address
/// and the port, `None` standing for any port.
pub fn parse_allow_host(entry: &str) -> Option<(std::net::IpAddr, Option<u16>)> {
    let (host, port) = entry.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let ip = host.parse().ok()?;
    let port = match port {
        "*" => None,
        p => Some(p.parse().ok()?),
    };
    Some((ip, port))
}

fn check_name(field: &str, name: &str, max: usize) -> Result<(), SpecError> {
    let chars = name.chars().count();
    if chars == 0 {
        return Err(SpecError::invalid(field, "must not be empty"));
    }
    if chars > max {
        return Err(SpecError::invalid(
            field,
            format!("is {chars} characters long; the limit is {max}"),
        ));
    }
    if name.chars().any(|c| c == '/' || c.is_control()) {
        return Err(SpecError::invalid(
            field,
            "must not contain `/` or control characters",
        ));
    }
    if name.trim() != name {
        return Err(SpecError::invalid(
            field,
            "must not start or end with whitespace",
        ));
    }
    if name == "." || name == ".." {
        return Err(SpecError::invalid(
            field,
            "must not be `.` or `..`, which URL normalisation removes",
        ));
    }
    Ok(())
}

/// Longest tenant name.
pub const MAX_TENANT_CHARS: usize = 32;

/// Checks a tenant name: 1 to 32 lowercase ASCII letters, digits and `-`, starting with a
/// letter and not ending with `-` (it appears in paths and qualified endpoint names).
pub fn check_tenant_name(field: &str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TENANT_CHARS
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(SpecError::invalid(
            field,
            format!(
                "`{}` is not a tenant name: 1 to {MAX_TENANT_CHARS} lowercase letters, digits \
                 and `-`, starting with a letter, not ending with `-`",
                name.chars().take(64).collect::<String>()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "redact"
        [[versions]]
        name = "v1"
        processor = { component = "pii_redact.wasm" }
    "#;

    #[test]
    fn minimal_spec_gets_defaults() {
        let spec = EndpointSpec::from_toml(MINIMAL).unwrap();
        assert_eq!(spec.weight(0), 100);
        assert_eq!(spec.versions[0].backend, BackendSpec::None);
        assert_eq!(spec.versions[0].limits.timeout_ms, 5_000);
        assert_eq!(spec.versions[0].scaling.min_workers, 1);
        assert_eq!(spec.versions[0].scaling.target_concurrency, 100);
        assert_eq!(spec.versions[0].scaling.scale_up_cooldown_s, 300);
        assert_eq!(
            spec.versions[0].processor.as_ref().unwrap().component,
            ComponentRef::Path("pii_redact.wasm".into())
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("name = \"v1\"", "name = \"v1\"\nwieght = 3");
        let err = EndpointSpec::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `wieght`"), "{err}");
    }

    #[test]
    fn tenant_names_are_checked() {
        for ok in ["a", "acme", "team-7", &"a".repeat(32)] {
            assert!(check_tenant_name("tenant", ok).is_ok(), "{ok}");
        }
        for bad in ["", "7up", "Acme", "a-", "a/b", "a.b", "é", &"a".repeat(33)] {
            let err = check_tenant_name("tenant", bad).unwrap_err();
            assert_eq!(err.field(), Some("tenant"), "{bad}");
        }
    }

    #[test]
    fn names_are_checked() {
        let long = "é".repeat(129);
        let err = EndpointSpec::from_toml(&MINIMAL.replace("redact", &long)).unwrap_err();
        assert_eq!(err.field(), Some("name"));
        let ok = "é".repeat(128);
        assert!(EndpointSpec::from_toml(&MINIMAL.replace("redact", &ok)).is_ok());
        let err = EndpointSpec::from_toml(&MINIMAL.replace("redact", "a/b")).unwrap_err();
        assert_eq!(err.field(), Some("name"));
        for dots in [".", ".."] {
            let err = EndpointSpec::from_toml(&MINIMAL.replace("redact", dots)).unwrap_err();
            assert_eq!(err.field(), Some("name"), "{dots}");
            assert!(err.to_string().contains("URL normalisation"), "{err}");
        }
        assert!(EndpointSpec::from_toml(&MINIMAL.replace("redact", "...")).is_ok());
    }

    #[test]
    fn weights_must_sum_to_100() {
        let text = r#"
            name = "e"
            [[versions]]
            name = "a"
            weight = 60
            processor = { component = "a.wasm" }
            [[versions]]
            name = "b"
            weight = 30
            processor = { component = "b.wasm" }
        "#;
        let err = EndpointSpec::from_toml(text).unwrap_err();
        assert!(err.to_string().contains("sum to 100, not 90"), "{err}");
        assert!(EndpointSpec::from_toml(&text.replace("30", "40")).is_ok());
        let err = EndpointSpec::from_toml(&text.replace("weight = 30\n", "")).unwrap_err();
        assert_eq!(err.field(), Some("versions[1].weight"));
        let err =
            EndpointSpec::from_toml(&text.replace("name = \"b\"", "name = \"a\"")).unwrap_err();
        assert_eq!(err.field(), Some("versions[1].name"));
    }

    #[test]
    fn bounds_are_checked() {
        let with = |extra: &str| format!("{MINIMAL}\n{extra}");
        let err = EndpointSpec::from_toml(&with("[versions.limits]\ntimeout_ms = 0")).unwrap_err();
        assert_eq!(err.field(), Some("versions[0].limits.timeout_ms"));
        let err =
            EndpointSpec::from_toml(&with("[versions.scaling]\ngpus_per_worker = 9")).unwrap_err();
        assert_eq!(err.field(), Some("versions[0].scaling.gpus_per_worker"));
        let err =
            EndpointSpec::from_toml(&with("[versions.scaling]\nmin_workers = 3")).unwrap_err();
        assert_eq!(err.field(), Some("versions[0].scaling.min_workers"));
    }

    #[test]
    fn none_backend_needs_a_processor() {
        let err = EndpointSpec::from_toml("name = \"x\"\n[[versions]]\nname = \"v\"").unwrap_err();
        assert_eq!(err.field(), Some("versions[0].processor"));
    }

    #[test]
    fn digests_and_allow_list_are_checked() {
        let err =
            EndpointSpec::from_toml(&MINIMAL.replace("pii_redact.wasm", "sha256:abc")).unwrap_err();
        assert_eq!(err.field(), Some("versions[0].processor.component"));
        assert_eq!(
            parse_allow_host("127.0.0.1:*"),
            Some(("127.0.0.1".parse().unwrap(), None))
        );
        assert_eq!(
            parse_allow_host("[::1]:443"),
            Some(("::1".parse().unwrap(), Some(443)))
        );
        assert_eq!(parse_allow_host("example.com:80"), None);
    }

    #[test]
    fn json_round_trip() {
        let spec = EndpointSpec::from_toml(MINIMAL).unwrap();
        let json = serde_json::to_vec(&spec).unwrap();
        assert_eq!(EndpointSpec::from_json(&json).unwrap(), spec);
    }

    fn scaling(extra: &str) -> Result<EndpointSpec, SpecError> {
        EndpointSpec::from_toml(&format!("{MINIMAL}\n[versions.scaling]\n{extra}"))
    }

    #[test]
    fn scaling_defaults_are_the_seeds() {
        let s = scaling("").unwrap().versions[0].scaling.clone();
        assert_eq!(
            (s.min_workers, s.max_workers, s.target_concurrency),
            (1, 1, 100)
        );
        assert_eq!((s.stable_window_s, s.panic_window_s), (60, 6));
        assert_eq!(
            (
                s.max_scale_up_percent,
                s.scale_down_delay_s,
                s.scale_down_step
            ),
            (200, 60, 1)
        );
        assert_eq!((s.scale_up_cooldown_s, s.scale_down_cooldown_s), (300, 300));
        assert!(s.scale_in);
    }

    #[test]
    fn scaling_policies_parse_and_round_trip() {
        let spec = scaling(
            "min_workers = 0\nmax_workers = 8\n\
             [[versions.scaling.step]]\nlower = 150\nupper = 300\nchange = \"+2\"\n\
             [[versions.scaling.step]]\nlower = 300\nchange = \"+50%\"\n\
             [[versions.scaling.schedule]]\ncron = \"0 8 * * MON-FRI\"\n\
             timezone = \"Europe/Berlin\"\nduration_s = 36000\nmin_workers = 4\n",
        )
        .unwrap();
        let s = &spec.versions[0].scaling;
        assert_eq!(s.step[0].change, StepChange::Workers(2));
        assert_eq!(s.step[1].change, StepChange::Percent(50));
        assert_eq!(s.schedule[0].timezone, "Europe/Berlin");
        let json = serde_json::to_vec(&spec).unwrap();
        assert_eq!(EndpointSpec::from_json(&json).unwrap(), spec);
        assert_eq!(StepChange::Percent(-25).workers(3), -1);
        assert_eq!(StepChange::Percent(50).workers(5), 3);
        assert_eq!(StepChange::Percent(50).workers(0), 1);
    }

    #[test]
    fn bad_scaling_names_the_field() {
        let cases = [
            (
                "min_workers = 3\nmax_workers = 2",
                "versions[0].scaling.min_workers",
            ),
            ("gpus_per_worker = 9", "versions[0].scaling.gpus_per_worker"),
            ("max_workers = 0", "versions[0].scaling.max_workers"),
            (
                "min_workers = 1\ninitial_workers = 0",
                "versions[0].scaling.initial_workers",
            ),
            (
                "max_workers = 2\ninitial_workers = 3",
                "versions[0].scaling.initial_workers",
            ),
            ("panic_window_s = 90", "versions[0].scaling.panic_window_s"),
            (
                "panic_threshold_percent = 100",
                "versions[0].scaling.panic_threshold_percent",
            ),
            (
                "max_workers = 64\nmin_workers = 40",
                "versions[0].scaling.min_workers",
            ),
            (
                "[[versions.scaling.step]]\nchange = \"+1\"",
                "versions[0].scaling.step[0].lower",
            ),
            (
                "[[versions.scaling.step]]\nlower = 5\nupper = 5\nchange = \"+1\"",
                "versions[0].scaling.step[0].upper",
            ),
            (
                "[[versions.scaling.step]]\nlower = 5\nchange = \"+1\"\n\
                 [[versions.scaling.step]]\nlower = 1\nupper = 6\nchange = \"+1\"",
                "versions[0].scaling.step[1].lower",
            ),
            (
                "max_workers = 4\n[[versions.scaling.schedule]]\ncron = \"0 8 * *\"\n\
                 duration_s = 600\nmin_workers = 2",
                "versions[0].scaling.schedule[0].cron",
            ),
            (
                "max_workers = 4\n[[versions.scaling.schedule]]\ncron = \"0 8 * * *\"\n\
                 duration_s = 600\nmin_workers = 2\n\
                 [[versions.scaling.schedule]]\ncron = \"61 8 * * *\"\n\
                 duration_s = 600\nmin_workers = 2",
                "versions[0].scaling.schedule[1].cron",
            ),
            (
                "[[versions.scaling.schedule]]\ncron = \"0 8 * * *\"\n\
                 timezone = \"Mars/Olympus\"\nduration_s = 600\nmin_workers = 2",
                "versions[0].scaling.schedule[0].timezone",
            ),
            (
                "[[versions.scaling.schedule]]\ncron = \"0 8 * * *\"\nduration_s = 600",
                "versions[0].scaling.schedule[0].min_workers",
            ),
            (
                "[[versions.scaling.schedule]]\ncron = \"0 8 * * *\"\nduration_s = 5\n\
                 min_workers = 1",
                "versions[0].scaling.schedule[0].duration_s",
            ),
        ];
        for (extra, field) in cases {
            let err = scaling(extra).unwrap_err();
            assert_eq!(err.field(), Some(field), "{extra}: {err}");
        }
        let err = scaling("[[versions.scaling.step]]\nlower = 1\nchange = \"2\"").unwrap_err();
        assert!(err.to_string().contains("`2` is not a change"), "{err}");
    }

    fn rollout(extra: &str) -> Result<EndpointSpec, SpecError> {
        EndpointSpec::from_toml(&format!("{MINIMAL}\n[versions.rollout]\n{extra}"))
    }

    #[test]
    fn rollout_defaults_are_eas_and_counts_parse() {
        let r = &rollout("").unwrap().versions[0].rollout;
        assert_eq!(r.max_surge, WorkerCount::Percent(2));
        assert_eq!(r.max_unavailable, WorkerCount::Workers(0));
        assert_eq!(r.grace_period_s, 30);
        // 2% of any count up to 50 still surges by one worker: the default keeps capacity.
        assert_eq!(r.max_surge.of(4, true), 1);
        assert_eq!(r.max_surge.of(0, true), 0);
        assert_eq!(WorkerCount::Percent(25).of(10, true), 3);
        assert_eq!(WorkerCount::Percent(25).of(10, false), 2);
        let spec = rollout("max_surge = \"50%\"\nmax_unavailable = 1\ngrace_period_s = 5").unwrap();
        let r = &spec.versions[0].rollout;
        assert_eq!(
            (r.max_surge, r.max_unavailable, r.grace_period_s),
            (WorkerCount::Percent(50), WorkerCount::Workers(1), 5)
        );
        let json = serde_json::to_string(&spec).unwrap();
        assert!(
            json.contains(r#""max_surge":"50%","max_unavailable":1"#),
            "{json}"
        );
        assert_eq!(EndpointSpec::from_json(json.as_bytes()).unwrap(), spec);
    }

    #[test]
    fn bad_rollout_names_the_field() {
        let cases = [
            (
                "max_surge = 0\nmax_unavailable = \"0%\"",
                "versions[0].rollout.max_surge",
            ),
            (
                "max_unavailable = 5000",
                "versions[0].rollout.max_unavailable",
            ),
            (
                "grace_period_s = 7200",
                "versions[0].rollout.grace_period_s",
            ),
        ];
        for (extra, field) in cases {
            let err = rollout(extra).unwrap_err();
            assert_eq!(err.field(), Some(field), "{extra}: {err}");
        }
        for (extra, message) in [
            ("max_surge = \"150%\"", "at most 100%"),
            ("max_surge = \"lots\"", "`lots` is not a number of workers"),
            ("max_surge = -1", "not negative"),
        ] {
            let err = rollout(extra).unwrap_err();
            assert!(err.to_string().contains(message), "{extra}: {err}");
            assert!(err.to_string().contains("max_surge"), "{extra}: {err}");
        }
    }

    #[test]
    fn a_schedule_window_is_found_in_its_time_zone() {
        let policy = SchedulePolicy {
            cron: "0 8 * * MON-FRI".into(),
            timezone: "Europe/Berlin".into(),
            duration_s: 3600,
            min_workers: Some(2),
            max_workers: None,
        };
        let schedule = Schedule::parse(&policy).unwrap();
        // Monday 2026-11-23, 08:00 in Berlin is 07:00 UTC.
        let at = |t: &str| t.parse::<jiff::Timestamp>().unwrap();
        assert_eq!(schedule.active_since(at("2026-11-23T06:59:59Z")), None);
        assert_eq!(
            schedule.active_since(at("2026-11-23T07:30:00Z")),
            Some(at("2026-11-23T07:00:00Z"))
        );
        assert_eq!(schedule.active_since(at("2026-11-23T08:00:00Z")), None);
        // Saturday: no window.
        assert_eq!(schedule.active_since(at("2026-11-28T07:30:00Z")), None);
    }
}
