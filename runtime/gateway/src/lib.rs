//! The wasp server: the HTTP gateway (data routes, control API, health, metrics), the
//! endpoint registry, and the embedded store that lets endpoints survive a restart.
//!
//! It sits above `wasp-core` (specs), `wasp-wasm` (processors) and `wasp-backend` (the
//! backend trait and batcher) and below the `wasp` binary, which parses flags, registers
//! the concrete backends it was built with, and calls [`Server::start`].
#![deny(missing_docs)]

pub mod api;
mod audit;
mod batches;
mod history;
mod jobs;
mod kserve;
mod limits;
pub mod metrics;
mod placement;
mod records;
mod registry;
mod rollout;
mod server;
pub mod store;
mod tenants;
mod tls;
mod usage;
mod webhooks;
pub mod workers;

pub use audit::AuditEntry;
pub use limits::{Holding, Quota};
pub use placement::{Placement, Placer, VersionLoad};
pub use records::RequestRecord;
pub use registry::{Cluster, DeployedVersion, Deployment, Gateway, NodeInfo};
pub use server::{
    Api, ClientAddr, HttpLimits, OPERATOR_KEY_FILE, Server, ServerConfig, SharedQueue,
};
pub use store::StoredEndpoint;
pub use tenants::{AccessChange, DEFAULT as DEFAULT_TENANT};
pub use tls::TlsFiles;
pub use wasp_backend::Registry as BackendRegistry;
pub use wasp_scaling::Inventory;
pub use wasp_wasm::{PoolFull, RuntimeConfig};
pub use webhooks::tls_client_config;

use wasp_core::SpecError;
use wasp_wasm::CallError;

/// Errors of the gateway's operations; each maps to an HTTP status in the API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec did not parse or validate.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A value is not acceptable to this server (a backend it lacks, a name mismatch).
    #[error("`{field}`: {message}")]
    Invalid {
        /// The field at fault.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// No endpoint of that name.
    #[error("no endpoint named `{0}`")]
    NotFound(String),
    /// An endpoint of that name exists already.
    #[error("endpoint `{0}` exists already; PUT /api/v1/endpoints/{{name}} replaces it")]
    Conflict(String),
    /// No uploaded component has that digest.
    #[error("no component with digest sha256:{0}; upload it with PUT /api/v1/components")]
    UnknownComponent(String),
    /// The component is not valid or does not fit the contract.
    #[error("version `{version}`: {source}")]
    Component {
        /// The version whose component failed.
        version: String,
        /// Why.
        #[source]
        source: wasp_wasm::Error,
    },
    /// The processor could not start its warm instances.
    #[error("version `{version}`: {source}")]
    Warm {
        /// The version whose processor failed.
        version: String,
        /// Why.
        #[source]
        source: CallError,
    },
    /// The model backend could not be loaded.
    #[error("version `{version}`: {source}")]
    Backend {
        /// The version whose backend failed.
        version: String,
        /// Why.
        #[source]
        source: wasp_backend::BackendError,
    },
    /// A rolling update stopped because a new worker failed to start; the old workers
    /// serve on and the old spec stays.
    #[error(
        "version `{version}`: the rolling update failed and was rolled back: a new worker \
         failed to start: {reason}"
    )]
    RolloutFailed {
        /// The version being updated.
        version: String,
        /// The worker's failure.
        reason: String,
    },
    /// A rolling update made no progress (no room for a new worker beside the old ones);
    /// the old workers serve on and the old spec stays.
    #[error(
        "version `{version}`: the rolling update made no progress in {secs}s and was rolled \
         back: {reason}; raise `rollout.max_unavailable` to stop old workers first and free \
         what new ones need"
    )]
    RolloutStalled {
        /// The version being updated.
        version: String,
        /// Seconds without a new worker becoming ready.
        secs: u64,
        /// What the new workers wait for.
        reason: String,
    },
    /// The embedded store failed.
    #[error("store: {0}")]
    Store(String),
    /// The store is out of use for now (it is reopened after an I/O error); retrying later
    /// helps.
    #[error("{0}")]
    StoreUnavailable(String),
    /// The store could not be opened at start; the message says what to do.
    #[error("{0}")]
    OpenStore(String),
    /// Something of that name exists already (a tenant, say).
    #[error("{0}")]
    AlreadyExists(String),
    /// A server setting is wrong (a flag of `wasp serve`); the message names it.
    #[error("{0}")]
    Setting(String),
    /// The data directory is full: nothing was written, what was there is intact.
    #[error("{what}: the data directory is full; free space or grow its volume, then retry")]
    StorageFull {
        /// The operation that needed the space.
        what: String,
        /// The file it was writing, for the server's log (never shown to clients).
        path: Option<std::path::PathBuf>,
    },
    /// A file in the data directory could not be read or written. The message names the
    /// operation, never the host path.
    #[error("{what}: {}", wasp_core::files::describe_io(source))]
    Io {
        /// The operation that failed.
        what: String,
        /// The file, for the server's log (never shown to clients).
        path: Option<std::path::PathBuf>,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The tenant would hold more than its quota allows; an operator raises it with
    /// `PUT /api/v1/tenants/{tenant}/quota`.
    #[error(
        "this tenant's quota allows {limit} {quota}; this would make {wanted} (an operator \
         raises it with `wasp tenant quota`)"
    )]
    Quota {
        /// Which quota (`endpoints`, `instances`...).
        quota: &'static str,
        /// Its value.
        limit: u64,
        /// What the tenant would hold.
        wanted: u64,
    },
    /// A stored component no longer matched its digest; it was removed.
    #[error(
        "the stored copy of component sha256:{0} was corrupt (its bytes no longer match their \
         digest) and has been removed; upload it again with PUT /api/v1/components"
    )]
    CorruptComponent(String),
    /// The wasm runtime could not start.
    #[error(transparent)]
    Runtime(wasp_wasm::Error),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// A failed read or write in the data directory: [`Error::StorageFull`] when the disk
    /// is full, else [`Error::Io`]. `what` names the operation for the client.
    pub fn io(what: &str, path: Option<std::path::PathBuf>, source: std::io::Error) -> Self {
        if wasp_core::files::is_storage_full(&source) {
            Self::StorageFull {
                what: what.to_owned(),
                path,
            }
        } else {
            Self::Io {
                what: what.to_owned(),
                path,
                source,
            }
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Self::Spec(SpecError::Parse(_)) => 400,
            // Something the backend needs is down (a container engine): try again later.
            Self::Backend {
                source: wasp_backend::BackendError::Unavailable(_),
                ..
            } => 503,
            // The server is full: a capacity limit, not the spec's fault.
            Self::Warm {
                source: CallError::Capacity(_),
                ..
            } => 503,
            Self::Spec(SpecError::Invalid { .. })
            | Self::Invalid { .. }
            | Self::UnknownComponent(_)
            | Self::CorruptComponent(_)
            | Self::Component { .. }
            | Self::Warm { .. }
            | Self::Backend { .. }
            | Self::RolloutFailed { .. } => 422,
            Self::RolloutStalled { .. } => 409,
            // Jobs leave the queue: waiting helps.
            Self::Quota {
                quota: "queued_jobs",
                ..
            } => 429,
            Self::Quota { .. } => 403,
            Self::NotFound(_) => 404,
            Self::Conflict(_) | Self::AlreadyExists(_) => 409,
            Self::StorageFull { .. } => 507,
            Self::StoreUnavailable(_) => 503,
            Self::Store(_)
            | Self::OpenStore(_)
            | Self::Setting(_)
            | Self::Io { .. }
            | Self::Runtime(_)
            | Self::Bind { .. } => 500,
        }
    }

    /// The field at fault, when there is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Spec(e) => e.field(),
            Self::Invalid { field, .. } => Some(field),
            Self::Quota { quota, .. } => Some(match *quota {
                "endpoints" => "quota.endpoints",
                "versions" => "quota.versions",
                "instances" => "quota.instances",
                "workers" => "quota.workers",
                "gpus" => "quota.gpus",
                "memory_mib" => "quota.memory_mib",
                "stored_bytes" => "quota.stored_bytes",
                _ => "quota.queued_jobs",
            }),
            _ => None,
        }
    }

    /// A short machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Spec(SpecError::Parse(_)) => "invalid_spec",
            Self::Spec(SpecError::Invalid { .. }) | Self::Invalid { .. } => "invalid_field",
            Self::NotFound(_) => "endpoint_not_found",
            Self::Quota { .. } => "quota_exceeded",
            Self::Conflict(_) => "endpoint_exists",
            Self::AlreadyExists(_) => "already_exists",
            Self::UnknownComponent(_) => "unknown_component",
            Self::CorruptComponent(_) => "corrupt_component",
            Self::StorageFull { .. } => "insufficient_storage",
            Self::StoreUnavailable(_) => "store_unavailable",
            Self::Io { .. } => "storage_error",
            Self::Component { .. } => "invalid_component",
            Self::Warm {
                source: CallError::Capacity(_),
                ..
            } => "server_full",
            Self::Warm { .. } => "processor_failed",
            Self::Backend { .. } => "backend_failed",
            Self::RolloutFailed { .. } => "rollout_failed",
            Self::RolloutStalled { .. } => "rollout_stalled",
            Self::Store(_)
            | Self::OpenStore(_)
            | Self::Setting(_)
            | Self::Runtime(_)
            | Self::Bind { .. } => "internal",
        }
    }
}
