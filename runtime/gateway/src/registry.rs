//! The endpoint registry: deployed endpoints, their versions and processors, and the
//! operations of the control API (deploy, stop, start, remove).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use wasp_backend::{BackendError, LoadContext, Registry};
use wasp_core::{BackendSpec, ComponentRef, EndpointSpec, Limits};
use wasp_scaling::{Clock, Inventory, Policy, RolloutPlan, SystemClock};
use wasp_wasm::{
    BoxFuture, ErrorCode, GuestError, Level, LogBuffer, ModelInput, ModelOutput, ModelRouter,
    Processor, ProcessorSettings, Role, Runtime, RuntimeConfig,
};

use crate::Error;
use crate::metrics::Metrics;
use crate::rollout::{self, RolloutError};
use crate::store::{Store, StoredEndpoint};
use crate::workers::{EventLog, StartError, WorkerSet, WorkerSetConfig};

/// Largest processor pulled from a registry, in bytes (as large as an upload may be).
const MAX_PULLED_COMPONENT: usize = 256 << 20;

/// Log records kept per endpoint.
const LOG_CAPACITY: usize = 1000;

/// A deployed version.
pub struct DeployedVersion {
    /// Version name.
    pub name: String,
    /// Share of traffic, in percent.
    pub weight: u32,
    /// Its processor; none when requests pass through to a container as they are.
    pub processor: Option<Processor>,
    /// Its limits.
    pub limits: Limits,
    /// Content digest of its component, if it has one.
    pub digest: Option<String>,
    /// The backend kind (`none`, `candle`...).
    pub backend: &'static str,
    /// Its workers, in-flight meter and autoscaler.
    pub workers: Arc<WorkerSet>,
    /// Its count of `200` answers and its latency histogram, looked up once at deploy
    /// rather than by label on every request.
    pub(crate) metrics: VersionMetrics,
    /// Its tenant's usage meter.
    pub(crate) usage: Arc<crate::usage::Meter>,
}

/// The metrics a version updates on every request.
pub(crate) struct VersionMetrics {
    /// `wasp_requests_total` with code 200.
    pub ok: prometheus_client::metrics::counter::Counter,
    /// `wasp_request_duration_seconds` of the version.
    pub latency: prometheus_client::metrics::histogram::Histogram,
    /// Recent mean latency in microseconds (an exponentially weighted average), for the
    /// spillover's estimate of a new request's wait.
    pub mean_us: std::sync::atomic::AtomicU64,
    /// Generation: time to first token.
    pub ttft: prometheus_client::metrics::histogram::Histogram,
    /// Generation: time per output token.
    pub tpot: prometheus_client::metrics::histogram::Histogram,
    /// Generation: prompt tokens.
    pub prompt_tokens: prometheus_client::metrics::counter::Counter,
    /// Generation: completion tokens.
    pub completion_tokens: prometheus_client::metrics::counter::Counter,
    /// This interval's figures, for the short history.
    pub window: Arc<crate::history::Window>,
}

impl VersionMetrics {
    /// Records a generation's figures from its last chunk's metadata (`prompt_tokens`,
    /// `completion_tokens`, `ttft_ms`, `decode_ms`); other metadata is left alone.
    pub fn observe_generation(&self, metadata: Option<&str>) {
        let Some(text) = metadata.filter(|m| m.contains("completion_tokens")) else {
            return;
        };
        let Ok(meta) = serde_json::from_str::<serde_json::Value>(text) else {
            return;
        };
        let count = |key: &str| meta.get(key).and_then(serde_json::Value::as_u64);
        let (Some(prompt), Some(completion)) = (count("prompt_tokens"), count("completion_tokens"))
        else {
            return;
        };
        self.prompt_tokens.inc_by(prompt);
        self.completion_tokens.inc_by(completion);
        let ms = |key: &str| meta.get(key).and_then(serde_json::Value::as_f64);
        let ttft = ms("ttft_ms").map(|ms| ms / 1e3);
        let tpot = ms("decode_ms")
            .filter(|_| completion > 1)
            .map(|ms| ms / 1e3 / (completion - 1) as f64);
        if let Some(s) = ttft {
            self.ttft.observe(s);
        }
        if let Some(s) = tpot {
            self.tpot.observe(s);
        }
        self.window.generation(completion, ttft, tpot);
    }

    /// Folds one request's latency into the recent mean (weight 1/8).
    pub fn observe_mean(&self, us: u64) {
        use std::sync::atomic::Ordering;
        let old = self.mean_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { (old * 7 + us) / 8 };
        self.mean_us.store(new, Ordering::Relaxed);
    }
}

impl DeployedVersion {
    /// Its processor's pool figures (all zero without a processor).
    pub fn processor_stats(&self) -> wasp_wasm::PoolStats {
        self.processor
            .as_ref()
            .map(Processor::stats)
            .unwrap_or_default()
    }

    /// Runs model input through a ready worker's batcher, waking the version if it has
    /// none.
    pub async fn infer(
        &self,
        input: wasp_core::ModelInput,
    ) -> Result<wasp_core::ModelOutput, BackendError> {
        if !self.workers.has_model() {
            return Err(BackendError::Unavailable(format!(
                "version `{}` has no model backend",
                self.name
            )));
        }
        let started = std::time::Instant::now();
        let output = self.workers.infer(input).await;
        self.usage
            .model_call(started.elapsed(), output.as_ref().ok());
        output
    }
}

impl DeployedVersion {
    /// Runs model input through a ready worker and hands back its chunks as they come,
    /// with a guard that keeps the worker counted busy while the stream is read.
    pub(crate) async fn infer_stream(
        &self,
        input: wasp_core::ModelInput,
    ) -> Result<(wasp_backend::OutputStream, crate::workers::InFlight), BackendError> {
        if !self.workers.has_model() {
            return Err(BackendError::Unavailable(format!(
                "version `{}` has no model backend",
                self.name
            )));
        }
        self.workers.infer_stream(input).await
    }
}

/// A node's view of the cluster it belongs to (cluster mode; see the `wasp-cluster`
/// crate): told of every change this node makes to the endpoint registry, in order, and
/// asked who the nodes are.
pub trait Cluster: Send + Sync + 'static {
    /// `record` was written here: a deploy, a replace, a stop or start, a new webhook
    /// secret.
    fn written(&self, record: StoredEndpoint);
    /// Endpoint `name` was removed here.
    fn removed(&self, name: &str);
    /// An access record (tenant, API key, registry login) was written or removed here.
    fn access_changed(&self, change: crate::tenants::AccessChange);
    /// The nodes that have sent a heartbeat lately, this one included.
    fn nodes(&self) -> Vec<NodeInfo>;
    /// This node's name.
    fn node(&self) -> String;
}

/// A node of the cluster, as its heartbeat says.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct NodeInfo {
    /// Its name (`wasp serve --node-name`).
    pub name: String,
    /// Where its API answers.
    pub url: String,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// When its last heartbeat was sent.
    pub seen_at_ms: u64,
    /// The endpoints it serves.
    pub endpoints: usize,
    /// Its workers, starting or ready, over every version.
    pub workers: u32,
    /// Its GPUs, and how many of them no worker owns.
    pub gpus: usize,
    /// Its GPUs no worker owns.
    pub gpus_free: usize,
    /// Its ready workers by endpoint (those with one or more).
    #[serde(default)]
    pub ready: BTreeMap<String, u32>,
    /// The load of its versions that have workers, load or a waiting request: what the
    /// cluster's scaler decides on.
    #[serde(default)]
    pub versions: Vec<crate::VersionLoad>,
    /// The endpoints it cannot run (a failed load: no GPUs, say).
    #[serde(default)]
    pub unable: Vec<String>,
    /// Processor instances alive: in the pool, out of [`NodeInfo::instance_slots`], and
    /// those created on demand outside it while it was full.
    #[serde(default)]
    pub instances: u64,
    /// Slots of its instance pool (`wasp serve --max-instances`); 0 when instances are
    /// allocated on demand.
    #[serde(default)]
    pub instance_slots: u64,
}

tokio::task_local! {
    /// Set while a change another node made is applied here: it is not sent back.
    static FROM_PEER: ();
}

/// A version's processor as built at deploy.
struct BuiltProcessor {
    processor: Processor,
    digest: String,
}

/// A deployed endpoint.
pub struct Deployment {
    /// Its spec (components as digests).
    pub spec: EndpointSpec,
    /// Whether the user stopped it.
    pub stopped: bool,
    /// Its versions, in spec order.
    pub versions: Vec<Arc<DeployedVersion>>,
    /// Log records of its processors.
    pub logs: Arc<LogBuffer>,
    /// Its scaling events (kept across redeploys).
    pub events: Arc<EventLog>,
    /// Why it could not be loaded at start-up, if it could not.
    pub error: Option<String>,
    /// During a rolling update, the versions being replaced: each shares its namesake's
    /// traffic in proportion to their ready workers until its last worker drains.
    pub outgoing: Vec<Arc<DeployedVersion>>,
    /// The key its job webhooks are signed with (HMAC-SHA256).
    pub webhook_secret: String,
}

impl Deployment {
    /// A copy to change one thing of, without outgoing versions (no update under way).
    fn settled(&self) -> Deployment {
        Deployment {
            spec: self.spec.clone(),
            stopped: self.stopped,
            versions: self.versions.clone(),
            logs: self.logs.clone(),
            events: self.events.clone(),
            error: self.error.clone(),
            outgoing: Vec::new(),
            webhook_secret: self.webhook_secret.clone(),
        }
    }

    /// Picks a version for one request; `roll` is uniform in `0..100`.
    pub fn pick(&self, roll: u32) -> Option<&Arc<DeployedVersion>> {
        let mut acc = 0;
        let mut picked = None;
        for v in &self.versions {
            acc += v.weight;
            if roll < acc {
                picked = Some(v);
                break;
            }
        }
        let picked = picked.or_else(|| self.versions.iter().rev().find(|v| v.weight > 0))?;
        if self.outgoing.is_empty() {
            return Some(picked);
        }
        Some(self.during_rollout(picked))
    }

    /// The new version or the one it replaces, in proportion to their ready workers.
    fn during_rollout<'a>(&'a self, new: &'a Arc<DeployedVersion>) -> &'a Arc<DeployedVersion> {
        let Some(old) = self.outgoing.iter().find(|o| o.name == new.name) else {
            return new;
        };
        let (new_ready, old_ready) = (new.workers.ready_now(), old.workers.ready_now());
        if old_ready == 0 {
            new
        } else if new_ready == 0 || rand::random::<u32>() % (new_ready + old_ready) >= new_ready {
            old
        } else {
            new
        }
    }

    /// The version a rolling update is replacing by `v`, if one is.
    pub fn outgoing_of(&self, v: &DeployedVersion) -> Option<&Arc<DeployedVersion>> {
        self.outgoing.iter().find(|o| o.name == v.name)
    }

    /// `ready` (as many ready workers as wanted), `concerning` (some), `notReady` (none),
    /// `scaledToZero` (none wanted: the next request wakes it) or `stopped`.
    pub fn version_status(&self, v: &DeployedVersion) -> &'static str {
        if self.stopped {
            return "stopped";
        }
        let desired = v.workers.desired();
        let ready = v.workers.counts().ready
            + self
                .outgoing_of(v)
                .map_or(0, |old| old.workers.counts().ready);
        if desired == 0 && ready == 0 {
            "scaledToZero"
        } else if ready >= desired {
            "ready"
        } else if ready > 0 {
            "concerning"
        } else {
            "notReady"
        }
    }

    /// The endpoint's status: `stopped`, `ready` (every version ready), `concerning`
    /// (some) or `notReady` (none).
    pub fn status(&self) -> &'static str {
        if self.stopped {
            return "stopped";
        }
        if self.error.is_some() || self.versions.is_empty() {
            return "notReady";
        }
        // A version scaled to zero serves (it wakes up), so it counts as ready.
        let ready = self
            .versions
            .iter()
            .filter(|v| matches!(self.version_status(v), "ready" | "scaledToZero"))
            .count();
        if ready == self.versions.len() {
            "ready"
        } else if ready > 0
            || self
                .versions
                .iter()
                .any(|v| self.version_status(v) == "concerning")
        {
            "concerning"
        } else {
            "notReady"
        }
    }
}

/// The server's state: runtime, store, registry and metrics.
pub struct Gateway {
    pub(crate) runtime: Runtime,
    pub(crate) store: Store,
    pub(crate) metrics: Metrics,
    endpoints: RwLock<BTreeMap<String, Arc<Deployment>>>,
    /// Serialises control operations so two deploys of one name cannot interleave.
    control: tokio::sync::Mutex<()>,
    models: Arc<dyn ModelRouter>,
    backends: Registry,
    load_context: LoadContext,
    /// The autoscalers' clock.
    pub(crate) clock: Arc<dyn Clock>,
    /// The GPUs workers may own.
    pub(crate) inventory: Arc<Inventory>,
    /// Durable async jobs of every endpoint.
    pub(crate) jobs: crate::jobs::Queue,
    /// The jobs running in this process, and their runners.
    pub(crate) running: crate::jobs::Running,
    /// Sends job webhooks.
    pub(crate) webhooks: crate::webhooks::WebhookClient,
    /// The jobs whose webhook this process is sending now.
    pub(crate) sending: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Pulls processors published as OCI artifacts.
    oci: wasp_oci::Client,
    /// The cluster this node belongs to, in cluster mode.
    pub(crate) cluster: std::sync::OnceLock<Arc<dyn Cluster>>,
    /// Batch jobs.
    pub(crate) batches: crate::batches::Batches,
    /// The data directory.
    pub(crate) data_dir: std::path::PathBuf,
    /// When this node started, in milliseconds since the Unix epoch.
    started_ms: u64,
    /// Set while the stored endpoints are loaded at start: a version deployed at zero was
    /// proved when it was deployed, and is not instantiated again.
    restoring: std::sync::atomic::AtomicBool,
    /// Tenants and API keys.
    pub(crate) directory: crate::tenants::Directory,
    /// Each tenant's metered usage.
    pub(crate) usage: crate::usage::Usage,
    /// Rate limits of endpoints and keys.
    pub(crate) limiters: crate::limits::Limiters,
    /// Who changed what.
    pub(crate) audit: crate::audit::AuditLog,
    /// Request records of the endpoints that keep them.
    pub(crate) recorder: crate::records::Recorder,
    /// Where the cluster's scaler placed each version's workers (cluster mode), by
    /// endpoint and version.
    pub(crate) placements: RwLock<HashMap<(String, String), crate::Placement>>,
    /// A short history of every version's metrics, for the console.
    pub(crate) history: crate::history::History,
}

/// Model calls from processors (the `inference` import), answered by the backends of the
/// named endpoint.
struct RegistryModels(Weak<Gateway>);

impl ModelRouter for RegistryModels {
    fn infer(
        &self,
        caller: Arc<str>,
        model: String,
        input: ModelInput,
    ) -> BoxFuture<'static, Result<Vec<ModelOutput>, GuestError>> {
        let gateway = self.0.upgrade();
        Box::pin(async move {
            // Models of the caller's own tenant only: a name is looked up there, and a
            // name with a `/` (another tenant's) names nothing.
            let tenant = crate::tenants::tenant_of(&caller);
            let found = (!model.contains('/'))
                .then(|| crate::tenants::qualify(tenant, &model))
                .and_then(|qualified| gateway.and_then(|g| g.endpoint(&qualified)));
            let Some(deployment) = found else {
                return Err(GuestError::new(
                    ErrorCode::NotFound,
                    format!("model not found: `{model}`"),
                ));
            };
            if deployment.stopped {
                return Err(GuestError::new(
                    ErrorCode::Unavailable,
                    format!("endpoint `{model}` is stopped"),
                ));
            }
            let version = deployment
                .pick(rand::random::<u32>() % 100)
                .filter(|v| v.workers.has_model())
                .ok_or_else(|| {
                    GuestError::new(
                        ErrorCode::Unprocessable,
                        format!("endpoint `{model}` has no model backend (backend `none`)"),
                    )
                })?;
            let output = version.infer(input.into()).await.map_err(guest_error)?;
            Ok(vec![output.into()])
        })
    }
}

/// A backend failure as a guest-visible error.
pub(crate) fn guest_error(e: BackendError) -> GuestError {
    let code = match &e {
        BackendError::BadInput { .. } => ErrorCode::BadRequest,
        BackendError::Unavailable(_) => ErrorCode::Unavailable,
        BackendError::Load(_) | BackendError::Device(_) | BackendError::Inference(_) => {
            ErrorCode::Internal
        }
    };
    let field = match &e {
        BackendError::BadInput { field, .. } => field.clone(),
        _ => None,
    };
    GuestError {
        code,
        message: e.to_string(),
        field,
    }
}

impl Gateway {
    /// Opens the data directory, starts the wasm runtime and loads every stored endpoint.
    /// `backends` are the model backends this build serves; named models are looked up in
    /// `models_dir`.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        data_dir: &Path,
        runtime: RuntimeConfig,
        backends: Registry,
        models_dir: std::path::PathBuf,
        inventory: Arc<Inventory>,
        webhook_roots: &[std::path::PathBuf],
        insecure_registries: &[String],
        jobs: Option<crate::jobs::Queue>,
    ) -> Result<Arc<Self>, Error> {
        let webhooks = crate::webhooks::client(webhook_roots)
            .map_err(|e| Error::Setting(format!("--webhook-ca {e}")))?;
        let oci = wasp_oci::Client::new(
            crate::webhooks::tls_client_config(webhook_roots)
                .map_err(|e| Error::Setting(format!("--webhook-ca {e}")))?,
        )
        .with_insecure(insecure_registries.to_vec());
        let store = Store::open(data_dir)?;
        let directory = crate::tenants::Directory::load(&store)?;
        let usage = crate::usage::Usage::load(&store)?;
        let audit = crate::audit::AuditLog::open(&store)?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock::new());
        let jobs: crate::jobs::Queue = match jobs {
            Some(shared) => shared,
            None => Arc::new(
                wasp_jobs::EmbeddedQueue::open(&data_dir.join("jobs"), clock.clone())
                    .map_err(|e| Error::OpenStore(format!("cannot open the job store: {e}")))?,
            ),
        };
        let runtime = Runtime::new(RuntimeConfig {
            cache_dir: Some(data_dir.join("cache")),
            ..runtime
        })
        .map_err(Error::Runtime)?;
        let gateway = Arc::new_cyclic(|weak| Self {
            runtime,
            store,
            metrics: Metrics::new(),
            endpoints: RwLock::new(BTreeMap::new()),
            control: tokio::sync::Mutex::new(()),
            models: Arc::new(RegistryModels(weak.clone())),
            backends,
            load_context: LoadContext::new(models_dir),
            clock,
            inventory,
            jobs,
            running: crate::jobs::Running::new(),
            webhooks,
            sending: std::sync::Mutex::default(),
            oci,
            cluster: std::sync::OnceLock::new(),
            directory,
            usage,
            limiters: crate::limits::Limiters::default(),
            audit,
            recorder: crate::records::Recorder::start(data_dir.join("records")),
            placements: RwLock::default(),
            history: crate::history::History::default(),
            batches: crate::batches::Batches::default(),
            data_dir: data_dir.to_owned(),
            started_ms: crate::workers::now_ms(),
            restoring: std::sync::atomic::AtomicBool::new(true),
        });
        let weak = Arc::downgrade(&gateway);
        gateway.jobs.on_ended_elsewhere(Box::new(move |job| {
            if let Some(g) = weak.upgrade() {
                // Cancelled on another node of the cluster while its attempt runs here.
                if job.state == wasp_jobs::JobState::Cancelled {
                    g.running.abort(&job.id);
                }
                g.running.announce(job);
            }
        }));
        for tenant in gateway.directory.tenants() {
            if let Some(weight) = tenant.quota.cpu_weight {
                gateway.runtime.set_cpu_weight(&tenant.name, weight);
            }
        }
        for mut stored in gateway.store.endpoints()? {
            let name = stored.spec.name.clone();
            if stored.webhook_secret.is_empty() {
                // Written by a wasp before webhooks: a secret of its own from now on.
                stored.webhook_secret = new_secret();
                gateway.store.put_endpoint(&stored)?;
            }
            match gateway
                .build(
                    stored.spec.clone(),
                    stored.stopped,
                    None,
                    stored.webhook_secret.clone(),
                )
                .await
            {
                Ok((deployment, _)) => {
                    gateway.insert(deployment);
                }
                Err(e) => {
                    tracing::error!(endpoint = %name, "cannot load stored endpoint: {e}");
                    gateway.insert(Deployment {
                        spec: stored.spec,
                        stopped: stored.stopped,
                        versions: Vec::new(),
                        logs: Arc::new(LogBuffer::new(LOG_CAPACITY)),
                        events: Arc::new(EventLog::default()),
                        error: Some(e.to_string()),
                        outgoing: Vec::new(),
                        webhook_secret: stored.webhook_secret,
                    });
                }
            }
        }
        gateway
            .restoring
            .store(false, std::sync::atomic::Ordering::Relaxed);
        gateway.resume_webhooks().await;
        gateway.resume_batches()?;
        Ok(gateway)
    }

    /// The server's own per-request access checks, without HTTP, for benchmarks: checks
    /// the key `token` as a request's `Authorization` header would be, admits a request of
    /// it to endpoint `name` under both rate limits (with `limits`), and stamps the
    /// rate-limit headers. `false` when the key is not valid or a limit refuses.
    #[doc(hidden)]
    pub fn bench_access(&self, token: &str, name: &str, limits: bool) -> bool {
        let Some(key) = self.directory.verify(token) else {
            return false;
        };
        let caller = crate::tenants::Caller {
            tenant: key.tenant.clone(),
            role: Some(key.role),
            key_id: Some(key.id.clone()),
            rate_limit: key.rate_limit.clone(),
        };
        if !limits {
            return caller.role.is_some();
        }
        let Some(deployment) = self.endpoint(&caller.qualify(name)) else {
            return false;
        };
        let Ok(admitted) = crate::api::data::admit(self, Some(&caller), &deployment) else {
            return false;
        };
        let mut headers = axum::http::HeaderMap::new();
        admitted.stamp(&mut headers);
        !headers.is_empty()
    }

    /// The deployed endpoint called `name`.
    pub fn endpoint(&self, name: &str) -> Option<Arc<Deployment>> {
        self.read().get(name).cloned()
    }

    /// Every deployed endpoint, by name.
    pub fn endpoints(&self) -> Vec<Arc<Deployment>> {
        self.read().values().cloned().collect()
    }

    /// Stores component bytes for `tenant`; returns the hex SHA-256 to reference them by.
    pub async fn upload_component(
        self: &Arc<Self>,
        tenant: &str,
        bytes: bytes::Bytes,
    ) -> Result<String, Error> {
        let (this, tenant) = (self.clone(), tenant.to_owned());
        // Not under the control lock, so that one tenant's slow deploy never holds up
        // another's upload: uploads of one tenant at the same instant may pass its
        // stored-bytes quota by what they carry together.
        blocking(move || {
            let digest = wasp_core::files::sha256_hex(&bytes);
            // Bytes the tenant uploaded before count once (and are written again when
            // their stored copy was lost or corrupt).
            let owned = this.store.owns_component(&digest, &tenant)?;
            if !owned
                && let Some(limit) = this.directory.quota(&tenant).and_then(|q| q.stored_bytes)
            {
                let wanted = this.store.owned_bytes(&tenant)? + bytes.len() as u64;
                if wanted > limit {
                    return Err(Error::Quota {
                        quota: "stored_bytes",
                        limit,
                        wanted,
                    });
                }
            }
            let digest = this.store.put_component(&bytes)?;
            // A second upload of the same bytes writes no owner (a full disk allows it).
            if !owned {
                this.store.add_component_owner(&digest, &tenant)?;
            }
            Ok(digest)
        })
        .await
    }

    /// The bytes of a component `tenant` uploaded (else [`Error::UnknownComponent`]).
    pub async fn tenant_component(
        self: &Arc<Self>,
        tenant: &str,
        digest: &str,
    ) -> Result<Vec<u8>, Error> {
        let owned = {
            let (this, digest, tenant) = (self.clone(), digest.to_owned(), tenant.to_owned());
            blocking(move || this.store.owns_component(&digest, &tenant)).await?
        };
        if !owned {
            return Err(Error::UnknownComponent(digest.to_owned()));
        }
        self.download_component(digest).await
    }

    /// The bytes of an uploaded component, checked against its digest (hex SHA-256); a
    /// corrupt copy is removed and counted in `wasp_integrity_failures_total`.
    pub async fn download_component(self: &Arc<Self>, digest: &str) -> Result<Vec<u8>, Error> {
        let (this, key) = (self.clone(), digest.to_owned());
        let result = blocking(move || this.store.component(&key)).await;
        if matches!(result, Err(Error::CorruptComponent(_))) {
            self.integrity_failure("component");
        }
        result
    }

    /// A consistent copy of the store's database (see [`Store::snapshot`]), taken while
    /// serving.
    pub async fn store_snapshot(self: &Arc<Self>) -> Result<Vec<u8>, Error> {
        let this = self.clone();
        blocking(move || this.store.snapshot()).await
    }

    /// Deploys `spec`: builds every version's processor and starts its workers (or, on a
    /// replace, keeps those of a version whose model side is unchanged), writes the spec
    /// to the store, then swaps it in. `replace` allows an existing endpoint of the same
    /// name to be replaced; requests in flight on it finish on the old version.
    ///
    /// A version whose model side changes while it has workers is rolled over: new workers
    /// start beside the old ones within its `rollout` bounds, requests are shared by both
    /// in proportion to their ready workers, and each old worker drains once a new one is
    /// ready. If a new worker fails, or none becomes ready within the cold-start timeout,
    /// the update is rolled back: the old workers serve on and the old spec stays. The
    /// deploy runs to its end even when the client goes away.
    pub async fn deploy(
        self: &Arc<Self>,
        spec: EndpointSpec,
        replace: bool,
    ) -> Result<Arc<Deployment>, Error> {
        // The name was checked before the server qualified it with its tenant.
        let mut local = spec.clone();
        local.name = crate::tenants::local_name(&spec.name).to_owned();
        local.validate()?;
        // Only the host its tenant was granted.
        self.directory
            .policy(crate::tenants::tenant_of(&spec.name))
            .unwrap_or_default()
            .check(&spec)?;
        let this = self.clone();
        tokio::spawn(async move {
            let mut spec = spec;
            this.pull_components(&mut spec).await?;
            this.deploy_now(spec, replace).await
        })
        .await
        .map_err(|e| Error::Store(format!("deploy task failed: {e}")))?
    }

    /// Pulls the processors `spec` names as OCI artifacts (`oci://...`), with the tenant's
    /// login to each registry, keeps them as the tenant's uploads, and names them by
    /// digest in `spec`: the stored spec pins what was pulled, whatever the tag later
    /// points at.
    async fn pull_components(self: &Arc<Self>, spec: &mut EndpointSpec) -> Result<(), Error> {
        let tenant = crate::tenants::tenant_of(&spec.name).to_owned();
        for (i, v) in spec.versions.iter_mut().enumerate() {
            let Some(processor) = v.processor.as_mut() else {
                continue;
            };
            let ComponentRef::Oci(text) = &processor.component else {
                continue;
            };
            let invalid = |message: String| Error::Invalid {
                field: format!("versions[{i}].processor.component"),
                message,
            };
            let reference = wasp_oci::Reference::parse(text).map_err(|e| invalid(e.to_string()))?;
            let login = self
                .directory
                .login(&tenant, &reference.registry)
                .map(|(username, password)| wasp_oci::Login { username, password });
            let pulled = self
                .oci
                .pull(&reference, login.as_ref(), MAX_PULLED_COMPONENT)
                .await
                .map_err(|e| match e {
                    wasp_oci::Error::Unauthorized(m) if login.is_none() => invalid(format!(
                        "{m}; this tenant has no login to `{}` (PUT /api/v1/registries/{})",
                        reference.registry, reference.registry
                    )),
                    other => invalid(other.to_string()),
                })?;
            let digest = self.upload_component(&tenant, pulled.bytes).await?;
            tracing::info!(
                endpoint = %spec.name,
                version = %v.name,
                reference = %reference,
                manifest = %pulled.manifest_digest,
                component = %format!("sha256:{digest}"),
                "processor pulled"
            );
            processor.component = ComponentRef::Digest(digest);
        }
        Ok(())
    }

    async fn deploy_now(
        self: &Arc<Self>,
        spec: EndpointSpec,
        replace: bool,
    ) -> Result<Arc<Deployment>, Error> {
        let _control = self.control.lock().await;
        let existing = self.endpoint(&spec.name);
        if existing.is_some() && !replace {
            return Err(Error::Conflict(spec.name));
        }
        self.check_quota(&spec)?;
        let stopped = existing.as_ref().is_some_and(|d| d.stopped);
        let secret = existing
            .as_ref()
            .map_or_else(new_secret, |d| d.webhook_secret.clone());
        let (deployment, rolls) = self.build(spec, stopped, existing.clone(), secret).await?;
        self.persist(&deployment).await?;
        if rolls.is_empty() {
            return Ok(self.insert(deployment));
        }
        let rolling = self.insert(Deployment {
            outgoing: rolls.iter().map(|r| r.old.clone()).collect(),
            ..deployment
        });
        for roll in &rolls {
            let new = &rolling.versions[roll.index];
            let stall = Duration::from_secs(
                rolling.spec.versions[roll.index]
                    .scaling
                    .cold_start_timeout_s
                    .into(),
            );
            if let Err(e) = rollout::run(&roll.old.workers, &new.workers, roll.plan, stall).await {
                // Rolled back: the old workers serve on, under the old spec.
                for r in &rolls {
                    rolling.versions[r.index].workers.remove_all();
                    r.old.workers.resume();
                }
                if let Some(existing) = existing {
                    self.restore_feeds(&existing, &rolling).await;
                    if let Err(e) = self.persist(&existing).await {
                        tracing::error!(endpoint = %existing.spec.name, "cannot store the old spec back: {e}");
                    }
                    self.write()
                        .insert(existing.spec.name.clone(), existing.clone());
                }
                return Err(match e {
                    RolloutError::Failed(reason) => Error::RolloutFailed {
                        version: new.name.clone(),
                        reason,
                    },
                    RolloutError::Stalled(after, reason) => Error::RolloutStalled {
                        version: new.name.clone(),
                        secs: after.as_secs(),
                        reason,
                    },
                });
            }
        }
        Ok(self.insert(rolling.settled()))
    }

    /// What the tenant of `spec` holds with it deployed (in place of its namesake), against
    /// its quota.
    fn check_quota(&self, spec: &EndpointSpec) -> Result<(), Error> {
        let tenant = crate::tenants::tenant_of(&spec.name);
        let quota = self.directory.quota(tenant).unwrap_or_default();
        if quota == crate::limits::Quota::default() {
            return Ok(());
        }
        let mut after = self.holding(tenant, Some(&spec.name));
        after.add(spec);
        quota.check(&after)
    }

    /// What `tenant`'s endpoints hold (leaving out `except`).
    pub(crate) fn holding(&self, tenant: &str, except: Option<&str>) -> crate::limits::Holding {
        let mut held = crate::limits::Holding::default();
        for d in self.read().values() {
            if crate::tenants::tenant_of(&d.spec.name) == tenant
                && except.is_none_or(|e| e != d.spec.name)
            {
                held.add(&d.spec);
            }
        }
        held
    }

    /// The jobs waiting in `tenant`'s endpoints' queues.
    pub(crate) fn queued_jobs(&self, tenant: &str) -> u64 {
        self.read()
            .values()
            .filter(|d| crate::tenants::tenant_of(&d.spec.name) == tenant)
            .map(|d| self.jobs.counts(&d.spec.name).in_queue)
            .sum()
    }

    /// Refuses a job of `endpoint` when its tenant's queues hold their quota of jobs.
    pub(crate) fn check_job_quota(&self, endpoint: &str) -> Result<(), Error> {
        let tenant = crate::tenants::tenant_of(endpoint);
        let Some(limit) = self.directory.quota(tenant).and_then(|q| q.queued_jobs) else {
            return Ok(());
        };
        let queued = self.queued_jobs(tenant);
        if queued >= limit {
            return Err(Error::Quota {
                quota: "queued_jobs",
                limit,
                wanted: queued + 1,
            });
        }
        Ok(())
    }

    /// After a rolled-back update, versions that kept their workers take their old
    /// processor and policies back.
    async fn restore_feeds(&self, old: &Deployment, new: &Deployment) {
        for (j, v) in old.versions.iter().enumerate() {
            if !new
                .versions
                .iter()
                .any(|n| Arc::ptr_eq(&n.workers, &v.workers))
            {
                continue;
            }
            let spec = &old.spec.versions[j];
            let restored = match Policy::new(&spec.scaling) {
                Ok(policy) => v
                    .workers
                    .replace_feed(v.processor.clone(), policy, &spec.rollout)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = restored {
                tracing::error!(endpoint = %old.spec.name, version = %v.name, "cannot restore the old processor: {e}");
            }
        }
    }

    /// Removes an endpoint; in-flight requests finish.
    pub async fn remove(self: &Arc<Self>, name: &str) -> Result<(), Error> {
        let _control = self.control.lock().await;
        if self.endpoint(name).is_none() {
            return Err(Error::NotFound(name.to_owned()));
        }
        let this = self.clone();
        let key = name.to_owned();
        blocking(move || this.store.delete_endpoint(&key)).await?;
        self.write().remove(name);
        if let Some(cluster) = self.cluster.get()
            && FROM_PEER.try_with(|_| ()).is_err()
        {
            cluster.removed(name);
        }
        self.limiters.forget_endpoint(name);
        self.recorder.remove(name);
        // Its queued jobs cannot run any more.
        if let Err(e) = self.jobs.purge(name).await {
            tracing::warn!(endpoint = %name, "cannot purge the removed endpoint's jobs: {e}");
        }
        Ok(())
    }

    /// Stops (`stopped = true`: instances released, requests refused, spec and URL kept)
    /// or starts an endpoint.
    pub async fn set_stopped(
        self: &Arc<Self>,
        name: &str,
        stopped: bool,
    ) -> Result<Arc<Deployment>, Error> {
        let _control = self.control.lock().await;
        let current = self
            .endpoint(name)
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        let deployment = Deployment {
            stopped,
            ..current.settled()
        };
        self.persist(&deployment).await?;
        let deployment = self.insert(deployment);
        for v in &deployment.versions {
            if stopped {
                v.workers.remove_all();
            } else {
                let count = v.workers.initial();
                v.workers
                    .start_initial(count, true)
                    .await
                    .map_err(|e| start_error(&v.name, e))?;
            }
        }
        Ok(deployment)
    }

    /// Gives the endpoint a new webhook secret; deliveries from now on are signed with it.
    pub async fn rotate_webhook_secret(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<Arc<Deployment>, Error> {
        let _control = self.control.lock().await;
        let current = self
            .endpoint(name)
            .ok_or_else(|| Error::NotFound(name.to_owned()))?;
        let deployment = Deployment {
            webhook_secret: new_secret(),
            ..current.settled()
        };
        self.persist(&deployment).await?;
        Ok(self.insert(deployment))
    }

    /// Periodic upkeep: drops instances idle for a minute beyond what each version's
    /// workers need, and re-creates warm instances lost to failures.
    pub async fn housekeep(&self) {
        if let Err(e) = self.usage.save(&self.store) {
            tracing::warn!("cannot save the usage counters: {e}");
        }
        // Components no version uses any more leave memory.
        let used: std::collections::HashSet<String> = self
            .endpoints()
            .iter()
            .flat_map(|d| d.spec.versions.iter())
            .filter_map(|v| match &v.processor.as_ref()?.component {
                ComponentRef::Digest(hex) => Some(hex.clone()),
                _ => None,
            })
            .collect();
        self.runtime.retain_components(|key| used.contains(key));
        for deployment in self.endpoints() {
            if deployment.stopped {
                continue;
            }
            for v in &deployment.versions {
                v.workers.housekeep().await;
            }
        }
    }

    /// One autoscaler step for every version of every running endpoint; the jobs queued
    /// for an endpoint are a second signal beside its requests in flight.
    pub fn autoscale(&self) {
        for deployment in self.endpoints() {
            if deployment.stopped || deployment.error.is_some() {
                continue;
            }
            // Queued jobs that may scale the endpoint up, shared by the versions' weights.
            let backlog = self.jobs.backlog(&deployment.spec.name).scaling;
            for v in &deployment.versions {
                if let Some(placed) = self.placed_here(&deployment.spec.name, &v.name) {
                    v.workers.follow_placement(&placed);
                    continue;
                }
                let share = crate::workers::backlog_share(backlog, v.weight);
                v.workers.tick(false, share);
            }
        }
    }

    /// Closes every version's interval into its short history (every
    /// [`crate::history::INTERVAL`]), and forgets the versions that are gone.
    pub fn record_history(&self) {
        use crate::history::{Gauges, JobGauges};
        let tick = crate::history::tick_of(crate::workers::now_ms());
        let mut live = std::collections::HashSet::new();
        for d in self.endpoints() {
            let name = &d.spec.name;
            let jobs = self.jobs.counts(name);
            self.history.close_jobs(
                name,
                tick,
                JobGauges {
                    queued: jobs.in_queue,
                    in_progress: jobs.in_progress,
                },
            );
            for v in &d.versions {
                let counts = v.workers.counts();
                let waiting = v.processor_stats().queued as u64 + v.workers.backend_queued() as u64;
                let gauges = Gauges {
                    desired: v.workers.desired(),
                    ready: counts.ready,
                    starting: counts.starting + counts.pending,
                    waiting: u32::try_from(waiting).unwrap_or(u32::MAX),
                };
                let cold = v
                    .workers
                    .cold_starts
                    .count
                    .load(std::sync::atomic::Ordering::Relaxed);
                self.history
                    .close(name, &v.name, &v.metrics.window, tick, gauges, cold);
                live.insert((name.clone(), v.name.clone()));
            }
        }
        self.history.retain(&live);
    }

    async fn persist(self: &Arc<Self>, deployment: &Deployment) -> Result<(), Error> {
        let record = StoredEndpoint {
            spec: deployment.spec.clone(),
            stopped: deployment.stopped,
            webhook_secret: deployment.webhook_secret.clone(),
        };
        let (this, written) = (self.clone(), record.clone());
        blocking(move || this.store.put_endpoint(&written)).await?;
        if let Some(cluster) = self.cluster.get()
            && FROM_PEER.try_with(|_| ()).is_err()
        {
            cluster.written(record);
        }
        Ok(())
    }

    /// Joins `cluster`: this node's changes go to it from now on. Once only.
    pub fn join(&self, cluster: Arc<dyn Cluster>) {
        let access = cluster.clone();
        if self.cluster.set(cluster).is_err() {
            tracing::warn!("this node is in a cluster already");
            return;
        }
        self.directory
            .on_change(Box::new(move |change| access.access_changed(change)));
    }

    /// Every access record here (tenants, API keys, registry logins).
    pub fn access_records(&self) -> Result<Vec<crate::tenants::AccessChange>, Error> {
        self.directory.records(&self.store)
    }

    /// Applies an access record another node wrote or removed: a revoked key stops
    /// working here at once, a tenant's CPU weight applies here too.
    pub fn apply_access_from_peer(
        &self,
        change: &crate::tenants::AccessChange,
    ) -> Result<(), Error> {
        if let Some(revoked) = self.directory.apply(&self.store, change)? {
            self.limiters.forget_key(&revoked);
        }
        if change.table == "tenants"
            && let Some(weight) = self.directory.quota(&change.key).and_then(|q| q.cpu_weight)
        {
            self.runtime.set_cpu_weight(&change.key, weight);
        }
        Ok(())
    }

    /// The nodes of this node's cluster; this node alone outside cluster mode.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let Some(cluster) = self.cluster.get() else {
            return vec![self.node_info("local", "")];
        };
        let me = cluster.node();
        let mut nodes = cluster.nodes();
        // This node as it is now, not as its last heartbeat said.
        for n in nodes.iter_mut().filter(|n| n.name == me) {
            *n = self.node_info(&n.name, &n.url);
        }
        nodes
    }

    /// What this node's heartbeat says of it.
    pub fn node_info(&self, name: &str, url: &str) -> NodeInfo {
        let endpoints = self.endpoints();
        let workers = endpoints
            .iter()
            .flat_map(|d| d.versions.iter())
            .map(|v| v.workers.side().live)
            .sum();
        let now = crate::workers::now_ms();
        let ready = endpoints
            .iter()
            .filter(|d| !d.stopped && d.error.is_none())
            .map(|d| {
                let n: u32 = d.versions.iter().map(|v| v.workers.ready_now()).sum();
                (d.spec.name.clone(), n)
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let (versions, unable) = self.version_loads();
        let pool = self.runtime.pool_slots();
        let components = pool.iter().find(|s| s.kind == "component_instances");
        NodeInfo {
            name: name.to_owned(),
            url: url.to_owned(),
            started_at_ms: self.started_ms,
            seen_at_ms: now,
            endpoints: endpoints.len(),
            workers,
            gpus: self.inventory.total(),
            gpus_free: self.inventory.free(),
            ready,
            versions,
            unable,
            instances: components.map_or(0, |s| s.used)
                + self.runtime.overflow_stats().map_or(0, |o| o.live),
            instance_slots: components.map_or(0, |s| s.total),
        }
    }

    /// This node's name in its cluster, and another node with a ready worker for
    /// `endpoint` (the one with most), in cluster mode.
    pub(crate) fn peer_for(&self, endpoint: &str) -> Option<(String, NodeInfo)> {
        let cluster = self.cluster.get()?;
        let me = cluster.node();
        let peer = cluster
            .nodes()
            .into_iter()
            .filter(|n| n.name != me && n.ready.get(endpoint).is_some_and(|r| *r > 0))
            .max_by_key(|n| n.ready.get(endpoint).copied().unwrap_or(0))?;
        Some((me, peer))
    }

    /// Every endpoint record this node holds, as stored.
    pub fn records(&self) -> Vec<StoredEndpoint> {
        self.endpoints()
            .iter()
            .map(|d| StoredEndpoint {
                spec: d.spec.clone(),
                stopped: d.stopped,
                webhook_secret: d.webhook_secret.clone(),
            })
            .collect()
    }

    /// Whether `tenant` has the component with this hex digest here.
    pub async fn has_component(
        self: &Arc<Self>,
        tenant: &str,
        digest: &str,
    ) -> Result<bool, Error> {
        let (this, digest, tenant) = (self.clone(), digest.to_owned(), tenant.to_owned());
        blocking(move || {
            Ok(this.store.owns_component(&digest, &tenant)?
                && this.store.component(&digest).is_ok())
        })
        .await
    }

    /// Applies an endpoint record another node wrote (its components must be here
    /// already): deploys or replaces it, stops or starts it, with that node's webhook
    /// secret. Nothing is sent back to the cluster.
    pub async fn apply_from_peer(self: &Arc<Self>, record: StoredEndpoint) -> Result<(), Error> {
        FROM_PEER
            .scope((), async {
                let name = record.spec.name.clone();
                let current = self.endpoint(&name);
                let same_spec = current
                    .as_ref()
                    .is_some_and(|d| d.spec == record.spec && d.error.is_none());
                if !same_spec {
                    let _control = self.control.lock().await;
                    let existing = self.endpoint(&name);
                    let built = self
                        .build(
                            record.spec.clone(),
                            record.stopped,
                            existing.clone(),
                            record.webhook_secret.clone(),
                        )
                        .await;
                    let (deployment, rolls) = match built {
                        Ok(built) => built,
                        Err(e) => {
                            // This node cannot run it (no GPUs, no container engine): it
                            // knows of it, says why, and sends its requests to a node
                            // that runs it.
                            if let Some(old) = existing {
                                for v in &old.versions {
                                    v.workers.remove_all();
                                }
                            }
                            let stored = StoredEndpoint {
                                spec: record.spec.clone(),
                                stopped: record.stopped,
                                webhook_secret: record.webhook_secret.clone(),
                            };
                            let this = self.clone();
                            blocking(move || this.store.put_endpoint(&stored)).await?;
                            self.insert(Deployment {
                                spec: record.spec.clone(),
                                stopped: record.stopped,
                                versions: Vec::new(),
                                logs: Arc::new(LogBuffer::new(LOG_CAPACITY)),
                                events: Arc::new(EventLog::default()),
                                error: Some(e.to_string()),
                                outgoing: Vec::new(),
                                webhook_secret: record.webhook_secret.clone(),
                            });
                            return Err(e);
                        }
                    };
                    // The peer rolled its own workers; here the new ones take over at once.
                    for roll in rolls {
                        roll.old.workers.remove_all();
                        let new = &deployment.versions[roll.index];
                        let count = new.workers.initial();
                        new.workers
                            .start_initial(count, true)
                            .await
                            .map_err(|e| start_error(&new.name, e))?;
                    }
                    self.persist(&deployment).await?;
                    self.insert(deployment);
                }
                let current = self.endpoint(&name);
                if current
                    .as_ref()
                    .is_some_and(|d| d.webhook_secret != record.webhook_secret)
                    && let Some(d) = current.as_ref()
                {
                    let _control = self.control.lock().await;
                    let deployment = Deployment {
                        webhook_secret: record.webhook_secret.clone(),
                        ..d.settled()
                    };
                    self.persist(&deployment).await?;
                    self.insert(deployment);
                }
                if self
                    .endpoint(&name)
                    .is_some_and(|d| d.stopped != record.stopped)
                {
                    self.set_stopped(&name, record.stopped).await?;
                }
                Ok(())
            })
            .await
    }

    /// Removes an endpoint another node removed (nothing if it is not here).
    pub async fn remove_from_peer(self: &Arc<Self>, name: &str) -> Result<(), Error> {
        FROM_PEER
            .scope((), async {
                match self.remove(name).await {
                    Err(Error::NotFound(_)) => Ok(()),
                    other => other,
                }
            })
            .await
    }

    fn insert(self: &Arc<Self>, deployment: Deployment) -> Arc<Deployment> {
        let deployment = Arc::new(deployment);
        self.write()
            .insert(deployment.spec.name.clone(), deployment.clone());
        self.running.ensure_runner(self, &deployment.spec.name);
        deployment
    }

    /// Loads (from the compiled cache, or compiles) the processor of version `i` of
    /// `endpoint` and makes its pool; the processor, whether it came from the cache, and its
    /// component's digest.
    async fn build_processor(
        self: &Arc<Self>,
        endpoint: &str,
        i: usize,
        v: &wasp_core::VersionSpec,
        processor: &wasp_core::ProcessorSpec,
        logs: &Arc<LogBuffer>,
        has_model: bool,
    ) -> Result<BuiltProcessor, Error> {
        let at = |field: &str| format!("versions[{i}].{field}");
        let digest = match &processor.component {
            ComponentRef::Digest(hex) => hex.clone(),
            ComponentRef::Oci(reference) => {
                return Err(Error::Invalid {
                    field: at("processor.component"),
                    message: format!("`oci://{reference}` was not pulled"),
                });
            }
            ComponentRef::Path(path) => {
                return Err(Error::Invalid {
                    field: at("processor.component"),
                    message: format!(
                        "`{}` is a path; upload the component (PUT /api/v1/components, or \
                         `wasp deploy`, which does it) and name it by `sha256:` digest",
                        path.display()
                    ),
                });
            }
        };
        let tenant = crate::tenants::tenant_of(endpoint);
        let owned = {
            let (this, digest, tenant) = (self.clone(), digest.clone(), tenant.to_owned());
            blocking(move || this.store.owns_component(&digest, &tenant)).await?
        };
        if !owned {
            // Another tenant's component is as unknown as one never uploaded.
            return Err(Error::Invalid {
                field: at("processor.component"),
                message: Error::UnknownComponent(digest).to_string(),
            });
        }
        for (j, mount) in processor.mounts.iter().enumerate() {
            if !mount.host.is_dir() {
                return Err(Error::Invalid {
                    field: at(&format!("processor.mounts[{j}].host")),
                    message: format!("{} is not a directory", mount.host.display()),
                });
            }
        }
        let settings = ProcessorSettings {
            endpoint: endpoint.to_owned(),
            version: v.name.clone(),
            env: processor.env.clone(),
            mounts: processor.mounts.clone(),
            allow_hosts: processor.allow_hosts.clone(),
            limits: v.limits.clone(),
            logs: logs.clone(),
            models: self.models.clone(),
            group: crate::tenants::tenant_of(endpoint).to_owned(),
            guest_nanos: self
                .usage
                .meter(crate::tenants::tenant_of(endpoint))
                .guest_nanos
                .clone(),
        };
        let role = if has_model {
            Role::Transform
        } else {
            Role::Service
        };
        let component_error = |source| Error::Component {
            version: v.name.clone(),
            source,
        };
        let restoring = self.restoring.load(std::sync::atomic::Ordering::Relaxed);
        if restoring && self.runtime.loaded_component(&digest).is_none() {
            // At start, a stored version's component is loaded by its first instance: a
            // server with many endpoints serves at once, and idle ones never load theirs.
            let (gateway, key) = (Arc::downgrade(self), digest.clone());
            let source: wasp_wasm::ComponentSource = Arc::new(move || {
                let (gateway, key) = (gateway.clone(), key.clone());
                Box::pin(async move {
                    let unavailable = |e: Error| wasp_wasm::Error::Unavailable(e.to_string());
                    let gateway = gateway.upgrade().ok_or_else(|| {
                        unavailable(Error::Store("the server is stopping".into()))
                    })?;
                    gateway.load_component(&key).await.map_err(|e| match e {
                        Error::Component { source, .. } => source,
                        other => unavailable(other),
                    })
                })
            });
            let built = self
                .runtime
                .lazy_processor(&digest, source, role, settings)
                .map_err(component_error)?;
            return Ok(BuiltProcessor {
                processor: built,
                digest,
            });
        }
        let loaded = self.load_component(&digest).await.map_err(|e| match e {
            Error::UnknownComponent(_) | Error::CorruptComponent(_) => Error::Invalid {
                field: at("processor.component"),
                message: e.to_string(),
            },
            Error::Component { source, .. } => component_error(source),
            other => other,
        })?;
        let built = self
            .runtime
            .processor(&loaded, role, settings)
            .map_err(component_error)?;
        Ok(BuiltProcessor {
            processor: built,
            digest,
        })
    }

    /// The compiled component stored under `digest`: the one in memory if another version
    /// loaded it (shared, not read, checked and loaded again), else read from the store and
    /// loaded from the compiled cache or compiled.
    async fn load_component(
        self: &Arc<Self>,
        digest: &str,
    ) -> Result<wasp_wasm::LoadedComponent, Error> {
        if let Some(loaded) = self.runtime.loaded_component(digest) {
            self.metrics.cache_hits.inc();
            return Ok(loaded);
        }
        let bytes = self.download_component(digest).await?;
        // Compiling is CPU-bound for up to seconds: keep it off the async workers.
        let (this, key) = (self.clone(), digest.to_owned());
        let loaded = tokio::task::spawn_blocking(move || this.runtime.load_component(&key, &bytes))
            .await
            .map_err(|e| Error::Store(format!("compile task failed: {e}")))?
            .map_err(|source| Error::Component {
                version: String::new(),
                source,
            })?;
        if loaded.from_cache {
            self.metrics.cache_hits.inc();
        } else {
            self.metrics.compiles.inc();
        }
        if loaded.discarded_cache.is_some() {
            self.integrity_failure("compiled_component");
        }
        Ok(loaded)
    }

    /// The registry logins of `endpoint`'s tenant, looked up as each worker pulls (a login
    /// set or changed later counts from the next pull).
    fn registry_logins(self: &Arc<Self>, endpoint: &str) -> wasp_backend::RegistryLogins {
        let gateway = Arc::downgrade(self);
        let tenant = crate::tenants::tenant_of(endpoint).to_owned();
        Arc::new(move |registry: &str| gateway.upgrade()?.directory.login(&tenant, registry))
    }

    /// Builds every version of `spec`; versions to roll over from `previous` come back as
    /// [`Roll`]s, their new workers not yet started.
    async fn build(
        self: &Arc<Self>,
        spec: EndpointSpec,
        stopped: bool,
        previous: Option<Arc<Deployment>>,
        webhook_secret: String,
    ) -> Result<(Deployment, Vec<Roll>), Error> {
        let mut rolls = Vec::new();
        // Logs and events outlive a redeploy: what the old version wrote while it drained
        // (a container's last lines, say) stays readable.
        let logs = previous
            .as_ref()
            .map(|d| d.logs.clone())
            .unwrap_or_else(|| Arc::new(LogBuffer::new(LOG_CAPACITY)));
        let events = previous
            .as_ref()
            .map(|d| d.events.clone())
            .unwrap_or_default();
        let mut versions = Vec::with_capacity(spec.versions.len());
        for (i, v) in spec.versions.iter().enumerate() {
            let at = |field: &str| format!("versions[{i}].{field}");
            let factory =
                match &v.backend {
                    BackendSpec::None => None,
                    other => Some(self.backends.get(other.kind()).ok_or_else(|| {
                        Error::Invalid {
                            field: at("backend.kind"),
                            message: format!(
                                "backend `{}` is not offered by this server (available: none{}){}",
                                other.kind(),
                                self.backends
                                    .kinds()
                                    .iter()
                                    .map(|k| format!(", {k}"))
                                    .collect::<String>(),
                                if other.kind() == "container" {
                                    "; containers need `wasp serve --container-engine` (or \
                                     --process-containers)"
                                } else {
                                    ""
                                }
                            ),
                        }
                    })?),
                };
            if let Some(factory) = &factory {
                factory.check(&v.backend).map_err(|e| match e {
                    BackendError::BadInput { message, field } => Error::Invalid {
                        field: at(&format!("backend.{}", field.unwrap_or_default()))
                            .trim_end_matches('.')
                            .to_owned(),
                        message,
                    },
                    other => Error::Invalid {
                        field: at("backend"),
                        message: other.to_string(),
                    },
                })?;
            }
            let processor = match &v.processor {
                Some(processor) => Some(
                    self.build_processor(&spec.name, i, v, processor, &logs, factory.is_some())
                        .await?,
                ),
                None => None,
            };
            if let Some(gpus) = v.scaling.gpus_per_worker {
                let total = self.inventory.total();
                if total == 0 {
                    return Err(Error::Invalid {
                        field: at("scaling.gpus_per_worker"),
                        message: "this server has no GPUs (see `wasp serve --gpus`)".into(),
                    });
                }
                if gpus as usize > total {
                    return Err(Error::Invalid {
                        field: at("scaling.gpus_per_worker"),
                        message: format!(
                            "asks for {gpus} GPUs per worker; this server has {total}"
                        ),
                    });
                }
            }
            let policy = Policy::new(&v.scaling).map_err(|e| match e {
                wasp_core::SpecError::Invalid { field, message } => Error::Invalid {
                    field: at(&field),
                    message,
                },
                other => Error::Spec(other),
            })?;
            // A version whose model, batching and GPUs are unchanged keeps its workers (no
            // model is loaded again); only its processor and policies are replaced.
            let same_name = previous
                .as_ref()
                .filter(|d| d.error.is_none())
                .and_then(|d| d.versions.iter().find(|old| old.name == v.name));
            // A model-side change starts as many workers as the old version runs (within
            // the new bounds), so the swap keeps capacity.
            let running = same_name.map_or(0, |old| old.workers.desired());
            let kept = same_name
                .filter(|old| {
                    old.workers
                        .can_keep(&v.backend, &v.batching, v.scaling.gpus_per_worker)
                })
                .map(|old| old.workers.clone());
            let workers = match kept {
                Some(workers) => {
                    workers
                        .replace_feed(
                            processor.as_ref().map(|p| p.processor.clone()),
                            policy,
                            &v.rollout,
                        )
                        .await
                        .map_err(|e| start_error(&v.name, e))?;
                    workers
                }
                None => {
                    let workers = WorkerSet::new(WorkerSetConfig {
                        endpoint: spec.name.clone(),
                        version: v.name.clone(),
                        processor: processor.as_ref().map(|p| p.processor.clone()),
                        model: factory.map(|factory| {
                            (
                                factory,
                                v.backend.clone(),
                                v.batching.clone(),
                                LoadContext {
                                    endpoint: spec.name.clone(),
                                    version: v.name.clone(),
                                    log: Some(backend_log(&logs, &spec.name, &v.name)),
                                    registry_logins: Some(self.registry_logins(&spec.name)),
                                    ..self.load_context.clone()
                                },
                            )
                        }),
                        policy,
                        rollout: v.rollout.clone(),
                        clock: self.clock.clone(),
                        events: events.clone(),
                        inventory: self.inventory.clone(),
                    });
                    let count = workers.initial().max(running.min(v.scaling.max_workers));
                    let serving = same_name.filter(|old| old.workers.side().live > 0);
                    match serving {
                        _ if stopped => {}
                        // Traffic moves over: at least one new worker takes it.
                        Some(old) => rolls.push(Roll {
                            index: i,
                            old: old.clone(),
                            plan: RolloutPlan::new(&v.rollout, count.max(1)),
                        }),
                        None => workers
                            .start_initial(
                                count,
                                !self.restoring.load(std::sync::atomic::Ordering::Relaxed),
                            )
                            .await
                            .map_err(|e| start_error(&v.name, e))?,
                    }
                    workers
                }
            };
            let labels = crate::metrics::VersionLabels {
                endpoint: spec.name.clone(),
                version: v.name.clone(),
            };
            versions.push(Arc::new(DeployedVersion {
                name: v.name.clone(),
                weight: spec.weight(i),
                digest: processor.as_ref().map(|p| p.digest.clone()),
                processor: processor.map(|p| p.processor),
                limits: v.limits.clone(),
                backend: v.backend.kind(),
                workers,
                usage: self.usage.meter(crate::tenants::tenant_of(&spec.name)),
                metrics: VersionMetrics {
                    ok: self
                        .metrics
                        .requests
                        .get_or_create(&crate::metrics::RequestLabels {
                            endpoint: spec.name.clone(),
                            version: v.name.clone(),
                            code: 200,
                        })
                        .clone(),
                    latency: self.metrics.latency.get_or_create(&labels).clone(),
                    mean_us: std::sync::atomic::AtomicU64::new(0),
                    ttft: self.metrics.ttft.get_or_create(&labels).clone(),
                    tpot: self.metrics.tpot.get_or_create(&labels).clone(),
                    prompt_tokens: self.metrics.prompt_tokens.get_or_create(&labels).clone(),
                    completion_tokens: self
                        .metrics
                        .completion_tokens
                        .get_or_create(&labels)
                        .clone(),
                    window: self.history.window(&spec.name, &v.name),
                },
            }));
        }
        Ok((
            Deployment {
                spec,
                stopped,
                versions,
                logs,
                events,
                error: None,
                outgoing: Vec::new(),
                webhook_secret,
            },
            rolls,
        ))
    }

    fn integrity_failure(&self, file: &str) {
        self.metrics
            .integrity_failures
            .get_or_create(&crate::metrics::FileLabels { file: file.into() })
            .inc();
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Deployment>>> {
        // A poisoned lock means a panic elsewhere; the map itself is still consistent.
        self.endpoints.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Deployment>>> {
        self.endpoints.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the job runners and closes the stores so another server may open the data
    /// directory.
    pub fn close(&self) {
        self.running.stop_all();
        // Workers go: container backends are told to stop (SIGTERM) as they are dropped.
        for deployment in self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            for version in &deployment.versions {
                version.workers.remove_all();
            }
        }
        if let Err(e) = self.usage.save(&self.store) {
            tracing::warn!("cannot save the usage counters: {e}");
        }
        self.jobs.close();
        self.store.close();
    }
}

/// A version to roll over from its old workers to new ones.
struct Roll {
    /// Its place in the new spec.
    index: usize,
    /// The version it replaces.
    old: Arc<DeployedVersion>,
    /// How many workers and within which bounds.
    plan: RolloutPlan,
}

/// A worker that could not start at deploy, as the deploy's error.
/// The endpoint logs as a backend's sink: its lines are recorded under the version.
fn backend_log(logs: &Arc<LogBuffer>, endpoint: &str, version: &str) -> wasp_backend::LogSink {
    let (logs, endpoint, version) = (logs.clone(), endpoint.to_owned(), version.to_owned());
    Arc::new(move |error, line| {
        let level = if error { Level::Error } else { Level::Info };
        logs.push(&endpoint, &version, level, line);
    })
}

fn start_error(version: &str, e: StartError) -> Error {
    match e {
        StartError::Warm(source) => Error::Warm {
            version: version.to_owned(),
            source,
        },
        StartError::Backend(source) => Error::Backend {
            version: version.to_owned(),
            source,
        },
        StartError::Task(message) => Error::Store(message),
    }
}

/// A new webhook secret: 256 random bits in hex, prefixed so that it is recognisable.
fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("whsec_{}", wasp_core::files::hex(&bytes))
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Store(format!("store task failed: {e}")))?
}
