//! The wasp processor runtime: wasmtime with the component model, the `wasp:processor`
//! WIT contract, compiled-component caching, and a pool of instances per endpoint version.
//!
//! This is the only crate that knows wasmtime. It knows no HTTP and no model backend: the
//! gateway hands it requests, and model calls from guests go out through [`ModelRouter`],
//! which the gateway implements.
//!
//! Every guest call runs under an epoch deadline, a linear-memory cap and an instance cap
//! (see [`Limits`](wasp_core::Limits)). A guest that traps, loops, overflows its stack or
//! allocates too much fails its own call with a [`CallError`] and loses its instance; the
//! host and every other version keep serving.
#![deny(missing_docs)]

mod bindings;
mod engine;
mod fair;
mod host;
mod logs;
mod pool;

pub use bindings::{
    Dtype, ErrorCode, GuestError, Level, ModelInput, ModelOutput, Prepared, Request, Response,
    Tensor,
};
pub use engine::{
    FULL_SLOT_MIB, LoadedComponent, OverflowStats, PoolFull, PoolSlots, Runtime, RuntimeConfig,
    slot_memory_mib,
};
pub use host::{BoxFuture, ModelRouter};
pub use logs::{LogBuffer, LogRecord};
pub use pool::{CallError, ComponentSource, PoolStats, Processor, ProcessorSettings, Role};

/// Errors of setting up the runtime or a processor (not of a call: see [`CallError`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The wasm engine could not be configured.
    #[error("cannot configure the wasm engine: {0}")]
    Engine(String),
    /// The bytes are not a valid Wasm component.
    #[error("not a valid wasm component: {0}")]
    Compile(String),
    /// The component does not fit the `wasp:processor` contract (missing export, unknown
    /// import).
    #[error("component does not fit the wasp:processor contract: {0}")]
    Contract(String),
    /// A lazy processor's component could not be had from where it is kept.
    #[error("cannot read the component: {0}")]
    Unavailable(String),
    /// The compiled-component cache could not be read or written.
    #[error("component cache at {path}: {source}")]
    Cache {
        /// The file or directory at fault.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Result of this crate's setup operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Formats a wasmtime error with its whole chain of causes.
fn chain(e: &wasmtime::Error) -> String {
    format!("{e:#}")
}
