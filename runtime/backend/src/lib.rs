//! The backend contract of wasp: what does the model work.
//!
//! [`Backend`] runs a batch of [`ModelInput`]s; a [`BackendFactory`] loads one from a
//! version's spec; the [`Registry`] maps backend kinds (`candle`, ...) to factories; a
//! [`Batcher`] sits in front of each loaded backend and merges concurrent requests into one
//! forward pass. This crate knows neither wasmtime nor candle: the binary registers the
//! concrete backends it was built with.
#![deny(missing_docs)]

mod batcher;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub use batcher::{BatchStats, Batcher, merge_chunks};
use wasp_core::{BackendSpec, ModelInput, ModelOutput};

/// Why a backend could not load or run.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// The input does not fit the model (missing tensor, wrong type or shape).
    #[error("{message}")]
    BadInput {
        /// What is wrong.
        message: String,
        /// The tensor or field at fault, if known.
        field: Option<String>,
    },
    /// The model could not be found or loaded.
    #[error("cannot load model: {0}")]
    Load(String),
    /// The device asked for is not available to this build or machine.
    #[error("{0}")]
    Device(String),
    /// The forward pass failed.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The backend is shutting down or its worker is gone.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
}

impl BackendError {
    /// A bad-input error naming `field`.
    pub fn bad_input(message: impl Into<String>, field: impl Into<String>) -> Self {
        Self::BadInput {
            message: message.into(),
            field: Some(field.into()),
        }
    }
}

/// Result of backend operations.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// The output chunks of one streamed inference, in order; the last has `last` set. Dropping
/// the receiver cancels the work (a client that went away frees its sequence).
pub type OutputStream = tokio::sync::mpsc::UnboundedReceiver<Result<ModelOutput>>;

/// An HTTP request handed to a backend as the client sent it: a container endpoint
/// without a processor (an image deployment) answers requests itself.
#[derive(Debug, Clone, Default)]
pub struct RawRequest {
    /// HTTP method.
    pub method: String,
    /// Path below the endpoint's invoke route, with the query string (`/` when none).
    pub path: String,
    /// Request headers, minus the gateway's own credentials and hop-by-hop headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Request body.
    pub body: Vec<u8>,
}

/// A backend's answer to a [`RawRequest`]: its head at once, its body as it comes.
#[derive(Debug)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Response headers, minus hop-by-hop headers and the length (the body streams).
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body's chunks, in order; the channel closes after the last. Dropping the
    /// receiver abandons the rest (a client that went away).
    pub body: tokio::sync::mpsc::Receiver<Result<Vec<u8>>>,
}

/// A [`RawResponse`] on its way.
pub type Forwarded =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<RawResponse>> + Send + 'static>>;

/// What a backend that schedules its own work (text generation) is doing now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerationLoad {
    /// Sequences in the running batch.
    pub running: usize,
    /// Sequences waiting for room (a running slot or KV-cache memory).
    pub waiting: usize,
    /// Bytes of KV cache reserved by the running sequences.
    pub kv_cache_bytes: u64,
    /// The KV-cache budget, in bytes.
    pub kv_cache_capacity: u64,
}

/// One tensor a model takes or gives, as KServe model metadata describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Its name.
    pub name: String,
    /// Its KServe datatype (`FP32`, `INT64`, `BYTES`...).
    pub datatype: &'static str,
    /// Its dimensions; `-1` for one that varies.
    pub shape: Vec<i64>,
    /// Whether a request may leave it out.
    pub optional: bool,
}

impl TensorSpec {
    /// A tensor spec that a request must hold.
    pub fn new(name: &str, datatype: &'static str, shape: &[i64]) -> Self {
        Self {
            name: name.to_owned(),
            datatype,
            shape: shape.to_vec(),
            optional: false,
        }
    }

    /// The same, optional.
    pub fn optional(mut self) -> Self {
        self.optional = true;
        self
    }
}

/// The tensors a model takes and gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signature {
    /// Its inputs.
    pub inputs: Vec<TensorSpec>,
    /// Its outputs.
    pub outputs: Vec<TensorSpec>,
}

/// A loaded model on its device.
pub trait Backend: Send + Sync + 'static {
    /// Runs one batch and returns one output per input, in order. It blocks (CPU or GPU
    /// work): the batcher calls it on a blocking thread.
    fn infer_batch(&self, inputs: &[ModelInput]) -> Result<Vec<ModelOutput>>;

    /// Rows (sequences) `input` adds to a batch; `max_batch` counts these.
    fn rows(&self, input: &ModelInput) -> usize {
        let _ = input;
        1
    }

    /// What is loaded where, for status pages (`all-MiniLM-L6-v2 on cpu`).
    fn describe(&self) -> String;

    /// The tensors it takes and gives, when it knows them (KServe model metadata).
    fn signature(&self) -> Option<Signature> {
        None
    }

    /// Whether this backend produces its output step by step ([`Backend::stream`]) and
    /// schedules its own batches, rather than answering whole batches.
    fn streams(&self) -> bool {
        false
    }

    /// Starts a streamed inference of `input`; its chunks arrive on the returned stream as
    /// they are made. Only backends whose [`Backend::streams`] is true implement it.
    fn stream(&self, input: ModelInput) -> Result<OutputStream> {
        let _ = input;
        Err(BackendError::Unavailable(format!(
            "{} does not stream",
            self.describe()
        )))
    }

    /// What a self-scheduling backend is doing now, for metrics and scaling.
    fn load(&self) -> Option<GenerationLoad> {
        None
    }

    /// Whether this backend answers HTTP requests as they are ([`Backend::forward`]), so
    /// that a version may leave out its processor.
    fn forwards(&self) -> bool {
        false
    }

    /// Sends `request` as it came to the model and hands back its answer. Only backends
    /// whose [`Backend::forwards`] is true implement it.
    fn forward(&self, request: RawRequest) -> Forwarded {
        let _ = request;
        let message = format!("{} does not take requests as they are", self.describe());
        Box::pin(async move { Err(BackendError::Unavailable(message)) })
    }

    /// Why this backend cannot serve now although it loaded (a container being restarted
    /// after failing its liveness probe), if it cannot. The gateway takes such a worker out
    /// of `ready` until it can again.
    fn unhealthy(&self) -> Option<String> {
        None
    }
}

/// Where a backend's own output lines go (a container's stdout and stderr, its restarts):
/// the endpoint's logs. Called with `true` for lines that are errors.
pub type LogSink = Arc<dyn Fn(bool, String) + Send + Sync>;

/// Looks up the deploying tenant's login to an image registry, by the registry's host:
/// its user name and password.
pub type RegistryLogins = Arc<dyn Fn(&str) -> Option<(String, String)> + Send + Sync>;

/// What a factory may use while loading.
#[derive(Clone)]
pub struct LoadContext {
    /// Where named models are cached (`<data dir>/models`).
    pub models_dir: PathBuf,
    /// The endpoint the backend serves (empty outside a deployment).
    pub endpoint: String,
    /// Its version.
    pub version: String,
    /// The endpoint's logs.
    pub log: Option<LogSink>,
    /// The endpoint's tenant's registry logins (container images).
    pub registry_logins: Option<RegistryLogins>,
}

impl std::fmt::Debug for LoadContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadContext")
            .field("models_dir", &self.models_dir)
            .field("endpoint", &self.endpoint)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl LoadContext {
    /// A context with only a models directory (tools and tests).
    pub fn new(models_dir: PathBuf) -> Self {
        Self {
            models_dir,
            endpoint: String::new(),
            version: String::new(),
            log: None,
            registry_logins: None,
        }
    }

    /// Writes a line to the endpoint's logs, if it has any.
    pub fn log(&self, error: bool, line: String) {
        if let Some(sink) = &self.log {
            sink(error, line);
        }
    }
}

/// Loads backends of one kind.
pub trait BackendFactory: Send + Sync + 'static {
    /// The `backend.kind` this factory serves.
    fn kind(&self) -> &'static str;

    /// Loads a backend for `spec` (blocking: model files are read and weights placed on
    /// the device; call it from a blocking thread).
    fn load(&self, spec: &BackendSpec, context: &LoadContext) -> Result<Arc<dyn Backend>>;

    /// Checks at deploy time what the spec alone cannot tell (the server's own policies,
    /// such as where volumes may come from), so that a bad spec is refused with the field at
    /// fault before any worker starts. [`BackendError::BadInput`] names the field below
    /// `backend`.
    fn check(&self, spec: &BackendSpec) -> Result<()> {
        let _ = spec;
        Ok(())
    }
}

/// The backend kinds this build can serve.
#[derive(Clone, Default)]
pub struct Registry {
    factories: BTreeMap<&'static str, Arc<dyn BackendFactory>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a factory, replacing one of the same kind.
    pub fn register(&mut self, factory: Arc<dyn BackendFactory>) {
        self.factories.insert(factory.kind(), factory);
    }

    /// The factory for `kind`.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn BackendFactory>> {
        self.factories.get(kind).cloned()
    }

    /// Registered kinds, sorted.
    pub fn kinds(&self) -> Vec<&'static str> {
        self.factories.keys().copied().collect()
    }
}
