//! The rolling update's next step, as a pure function of the workers on both sides.
//!
//! The bounds are EAS's (and a Kubernetes Deployment's): at most `surge` workers beyond
//! the target are alive at once, and at least `target - unavailable` serve. New workers
//! start while there is room under the surge; old workers drain while the ready ones,
//! old and new, stay above the floor, the old ones that do not serve going first.

use wasp_core::RolloutSpec;

/// A rolling update of one version: how many workers it ends with and its two bounds,
/// resolved against that count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutPlan {
    /// Workers the new spec runs when the update is done.
    pub target: u32,
    /// Workers alive beyond `target` at most.
    pub surge: u32,
    /// Workers of `target` that may be out of service at once.
    pub unavailable: u32,
}

impl RolloutPlan {
    /// The plan for `target` workers: a share of the count is rounded up for the surge and
    /// down for the unavailable; when both come to zero one worker may be unavailable, or
    /// the update could never move (as Kubernetes does).
    pub fn new(spec: &RolloutSpec, target: u32) -> Self {
        let surge = spec.max_surge.of(target, true);
        let mut unavailable = spec.max_unavailable.of(target, false).min(target);
        if surge == 0 && unavailable == 0 {
            unavailable = 1;
        }
        Self {
            target,
            surge,
            unavailable,
        }
    }

    /// The next step, given the workers of the new spec and of the old one.
    pub fn step(&self, new: Side, old: Side) -> RolloutStep {
        if new.ready >= self.target {
            // Done: every old worker goes.
            return RolloutStep {
                start: 0,
                drain: old.live,
                done: true,
            };
        }
        let floor = self.target.saturating_sub(self.unavailable);
        // Ready workers beyond the floor, and old workers that do not serve anyway (old
        // workers beyond the target thus go as soon as the floor allows).
        let spare = (new.ready + old.ready).saturating_sub(floor);
        let drain = (spare + (old.live - old.ready.min(old.live))).min(old.live);
        // What drains now makes room for what starts now.
        let alive = new.live + old.live - drain;
        let room = (self.target + self.surge).saturating_sub(alive);
        let start = room.min(self.target.saturating_sub(new.live));
        RolloutStep {
            start,
            drain,
            done: false,
        }
    }
}

/// The workers of one side of a rolling update.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Side {
    /// Workers starting, ready or waiting for GPUs (not draining, not failed).
    pub live: u32,
    /// Of those, the ready ones.
    pub ready: u32,
}

/// What to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolloutStep {
    /// New workers to start.
    pub start: u32,
    /// Old workers to drain.
    pub drain: u32,
    /// Whether the new side is complete (the drain then takes every old worker).
    pub done: bool,
}
