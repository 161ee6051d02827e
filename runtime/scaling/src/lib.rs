//! Autoscaling of wasp versions, without I/O: a [`Meter`] of in-flight requests on the
//! request path, and a pure [`decide`] function from the scaling state, the measured load,
//! the version's [`Policy`] and the time to the number of workers it should have. The
//! [`Autoscaler`] keeps the state and the metric windows between ticks; a [`Clock`] gives
//! it the time, so that tests run it in virtual time.
//!
//! The policies and their defaults are those of the managed services users know (see
//! [`wasp_core::ScalingSpec`]): target tracking on in-flight requests per worker over a
//! stable window with a panic window for bursts, a scale-up rate limit, a delay and a step
//! for scale-down, cooldowns, step policies, scheduled windows, and scale to zero. A
//! [`RolloutPlan`] steps a rolling update between its surge and unavailable bounds.
#![deny(missing_docs)]

mod clock;
mod decide;
mod inventory;
mod meter;
mod rollout;

pub use clock::{Clock, Moment, SystemClock, VirtualClock};
pub use decide::{Autoscaler, Decision, Load, Policy, ScaleState, Trigger, decide};
pub use inventory::{GpuSlot, Inventory};
pub use meter::{Meter, MeterGuard, Reading};
pub use rollout::{RolloutPlan, RolloutStep, Side};
