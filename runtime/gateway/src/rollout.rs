//! Rolling updates: a version's workers replaced by those of its new spec, within the
//! spec's surge and unavailable bounds, each old worker draining once a new one is ready.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasp_scaling::RolloutPlan;

use crate::workers::WorkerSet;

/// How often the update looks at its workers.
const POLL: Duration = Duration::from_millis(25);

/// Why a rolling update stopped.
#[derive(Debug)]
pub(crate) enum RolloutError {
    /// A new worker failed to start.
    Failed(String),
    /// No new worker became ready for this long.
    Stalled(Duration, String),
}

/// Replaces the workers of `old` by workers of `new`; returns when every new worker is
/// ready and every old one drains. A new worker that fails, or no progress for `stall`,
/// ends the update with an error; the caller then stops `new` and resumes `old`.
pub(crate) async fn run(
    old: &Arc<WorkerSet>,
    new: &Arc<WorkerSet>,
    plan: RolloutPlan,
    stall: Duration,
) -> Result<(), RolloutError> {
    let from = old.side().live;
    new.begin_rollout(plan.target);
    old.retire(new);
    new.note(
        "rollout",
        from,
        plan.target,
        format!(
            "rolling update: {from} old workers to {} new, at most {} beyond and {} \
             unavailable",
            plan.target, plan.surge, plan.unavailable
        ),
    );
    let mut ready = 0;
    let mut progress = Instant::now();
    loop {
        if let Some(reason) = new.failure() {
            new.note(
                "rollout",
                plan.target,
                from,
                format!("rolling update failed: a new worker failed to start: {reason}"),
            );
            return Err(RolloutError::Failed(reason));
        }
        let step = plan.step(new.side(), old.side());
        if step.drain > 0 {
            old.drain(step.drain);
        }
        if step.done {
            new.end_rollout(plan.target);
            new.note(
                "rollout",
                from,
                plan.target,
                format!("rolling update done: {} new workers ready", plan.target),
            );
            return Ok(());
        }
        new.start_workers(step.start);
        new.retry_pending();
        let now_ready = new.side().ready;
        if now_ready > ready {
            ready = now_ready;
            progress = Instant::now();
        } else if progress.elapsed() >= stall {
            let why = new
                .pending_reason()
                .unwrap_or_else(|| format!("{ready} of {} new workers are ready", plan.target));
            new.note(
                "rollout",
                plan.target,
                from,
                format!(
                    "rolling update stalled: no new worker became ready in {}s; {why}",
                    stall.as_secs()
                ),
            );
            return Err(RolloutError::Stalled(stall, why));
        }
        tokio::time::sleep(POLL).await;
    }
}
