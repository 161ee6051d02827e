//! What a guest's store holds, and the host side of the `log`, `config` and `inference`
//! imports.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::bindings::wasp::processor::{config, inference, log, types};
use crate::{ErrorCode, GuestError, LogBuffer, ModelInput, ModelOutput};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the `inference` import sends a guest's model calls. The gateway implements it
/// over its registry; the runtime itself knows no backend.
pub trait ModelRouter: Send + Sync + 'static {
    /// Runs `input` through the model of the endpoint named `model`, on behalf of a
    /// processor of endpoint `caller`.
    fn infer(
        &self,
        caller: Arc<str>,
        model: String,
        input: ModelInput,
    ) -> BoxFuture<'static, Result<Vec<ModelOutput>, GuestError>>;
}

/// Per-store memory and table limits; remembers whether it refused a memory growth so a
/// later trap can be reported as "out of memory".
pub(crate) struct Limiter {
    pub memory_bytes: usize,
    pub memory_refused: bool,
}

/// Largest table a guest may grow to, in elements.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.memory_refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        32
    }

    fn tables(&self) -> usize {
        32
    }

    fn memories(&self) -> usize {
        4
    }
}

/// Identity and configuration shared by every instance of one version.
pub(crate) struct VersionContext {
    pub endpoint: Arc<str>,
    pub version: String,
    /// The version's environment, sorted by key.
    pub env: Vec<(String, String)>,
    pub logs: Arc<LogBuffer>,
    pub models: Arc<dyn ModelRouter>,
}

/// The data of one instance's store.
pub(crate) struct HostState {
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: Limiter,
    pub version: Arc<VersionContext>,
    /// When the current call must end; `None` between calls.
    pub deadline: Option<Instant>,
    /// Epoch ticks the current call has run through.
    pub ticks: u32,
    /// The turn on a core the current call holds past its first tick (see `fair`).
    pub turn: Arc<std::sync::Mutex<Option<crate::fair::Turn>>>,
}

impl HostState {
    /// The call ended: its turn goes to the next guest, and the next call starts afresh.
    pub fn end_call(&mut self) {
        self.deadline = None;
        self.ticks = 0;
        drop(self.turn.lock().unwrap_or_else(|e| e.into_inner()).take());
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl log::Host for HostState {
    async fn log(&mut self, level: log::Level, message: String) {
        let v = &self.version;
        v.logs.push(&v.endpoint, &v.version, level, message);
    }
}

impl config::Host for HostState {
    async fn get(&mut self, key: String) -> Option<String> {
        let env = &self.version.env;
        env.binary_search_by(|(k, _)| k.as_str().cmp(&key))
            .ok()
            .map(|i| env[i].1.clone())
    }

    async fn get_all(&mut self) -> Vec<(String, String)> {
        self.version.env.clone()
    }
}

impl inference::Host for HostState {
    async fn infer(
        &mut self,
        model: String,
        input: ModelInput,
    ) -> Result<Vec<ModelOutput>, GuestError> {
        if model.is_empty() {
            return Err(GuestError::new(
                ErrorCode::BadRequest,
                "model name is empty",
            ));
        }
        let v = &self.version;
        let call = v.models.infer(v.endpoint.clone(), model, input);
        match self.deadline {
            // The epoch deadline only runs while wasm runs, so a host call is bounded here.
            Some(deadline) => tokio::time::timeout_at(deadline.into(), call)
                .await
                .unwrap_or_else(|_| {
                    Err(GuestError::new(
                        ErrorCode::Unavailable,
                        "model call outlasted the processor's deadline",
                    ))
                }),
            None => call.await,
        }
    }
}
