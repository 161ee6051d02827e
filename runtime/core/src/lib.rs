//! Shared vocabulary of the wasp runtime: endpoint specs, their validation, and names.
//!
//! This crate sits at the bottom of the stack. It knows neither wasmtime nor any model
//! backend, so the gateway, the processor runtime and the backends can all depend on it
//! without pulling each other in.
#![deny(missing_docs)]

pub mod credentials;
pub mod files;
pub mod kserve;
pub mod spec;
pub mod tensor;
pub mod time;

pub use spec::{
    BackendSpec, BatchingSpec, CandleBackend, ComponentRef, ContainerBackend, EndpointSpec,
    Isolation, JobsSpec, Limits, Mount, Probe, ProcessorSpec, RateLimit, RecordsSpec, RolloutSpec,
    ScalingSpec, Schedule, SchedulePolicy, SpecError, StepChange, StepPolicy, VersionSpec,
    WorkerCount,
};
pub use tensor::{DType, ModelInput, ModelOutput, Tensor, TensorError};
