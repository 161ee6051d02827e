//! The decision function and the autoscaler that keeps its state between ticks.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use wasp_core::{ScalingSpec, Schedule, SpecError, StepPolicy};

use crate::clock::Moment;
use crate::meter::Reading;

/// The window of the scale-up rate limit.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// A version's scaling policy, ready to evaluate: the spec with its schedules parsed.
#[derive(Debug, Clone)]
pub struct Policy {
    spec: ScalingSpec,
    schedules: Vec<Schedule>,
}

impl Policy {
    /// The policy of a validated spec (the error names the schedule at fault).
    pub fn new(spec: &ScalingSpec) -> Result<Self, SpecError> {
        let schedules = spec
            .schedule
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Schedule::parse(s).map_err(|(field, message)| SpecError::Invalid {
                    field: format!("scaling.schedule[{i}].{field}"),
                    message,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            spec: spec.clone(),
            schedules,
        })
    }

    /// The spec it was made from.
    pub fn spec(&self) -> &ScalingSpec {
        &self.spec
    }

    /// The stable window.
    pub fn stable_window(&self) -> Duration {
        Duration::from_secs(self.spec.stable_window_s.into())
    }

    /// The panic window.
    pub fn panic_window(&self) -> Duration {
        Duration::from_secs(self.spec.panic_window_s.into())
    }

    /// `min_workers` and `max_workers` at `now`, and the schedule that set them, if one.
    pub fn bounds(&self, now: jiff::Timestamp) -> (u32, u32, Option<usize>) {
        let active = self
            .schedules
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.active_since(now).map(|since| (since, i)))
            .max();
        let (mut min, mut max) = (self.spec.min_workers, self.spec.max_workers);
        if let Some((_, i)) = active {
            let window = &self.spec.schedule[i];
            min = window.min_workers.unwrap_or(min);
            max = window.max_workers.unwrap_or(max);
            // A window's own bound wins over the version's other one.
            if window.min_workers.is_some() {
                max = max.max(min);
            } else {
                min = min.min(max);
            }
        }
        (min, max, active.map(|(_, i)| i))
    }
}

/// Requests in flight, averaged over the two windows.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// Over the stable window.
    pub stable: f64,
    /// Over the panic window.
    pub panic: f64,
    /// Whether a request is waiting for a worker (at zero workers).
    pub waiting: bool,
}

/// What the scaler remembers between decisions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScaleState {
    /// Workers wanted now (starting or ready).
    pub workers: u32,
    /// When workers were last added.
    pub last_scale_up: Option<Duration>,
    /// When workers were last removed.
    pub last_scale_down: Option<Duration>,
    /// Since when the load has asked for fewer workers without a break.
    pub below_since: Option<Duration>,
    /// Until when bursts hold the version in panic mode.
    pub panic_until: Option<Duration>,
    /// Worker counts of the last minute and when each took effect, oldest first.
    pub history: VecDeque<(Duration, u32)>,
}

/// What made a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Nothing changes.
    Steady,
    /// Target tracking on the stable window.
    TargetTracking,
    /// A burst over the panic threshold.
    Panic,
    /// The step policy at this index.
    Step(usize),
    /// `min_workers` or `max_workers` (of the version, or of the schedule at this index).
    Bounds(Option<usize>),
    /// A request arrived at a version with no workers.
    Wake,
    /// The cluster's scaler placed this many of the version's workers on this node
    /// (cluster mode).
    Placement,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Steady => f.write_str("steady"),
            Self::TargetTracking => f.write_str("target_tracking"),
            Self::Panic => f.write_str("panic"),
            Self::Step(i) => write!(f, "step[{i}]"),
            Self::Bounds(None) => f.write_str("bounds"),
            Self::Bounds(Some(i)) => write!(f, "schedule[{i}]"),
            Self::Wake => f.write_str("wake"),
            Self::Placement => f.write_str("placement"),
        }
    }
}

/// The outcome of one decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Workers before.
    pub from: u32,
    /// Workers wanted.
    pub to: u32,
    /// The policy that decided.
    pub trigger: Trigger,
    /// Why, for people: the load, the target and what held the change back.
    pub reason: String,
}

/// Decides how many workers a version should have: a pure function of the state, the
/// load over its windows, the policy and the time; it returns the decision and the state
/// to keep for the next one.
///
/// - Target tracking asks for `ceil(load / target_concurrency)` workers over the stable
///   window. A burst whose panic-window load needs `panic_threshold_percent` of the
///   current workers or more starts panic mode: scale up to what the panic window needs,
///   never down, until a stable window passes without a burst.
/// - Step policies whose band holds the stable load per worker ask for their change. The
///   version scales out when any policy asks, and in only as far as every one allows.
/// - Scale-up: at most `max_scale_up_percent` more workers than the fewest of the last
///   60 s (from zero, counting one), and not within `scale_up_cooldown_s` of the last
///   scale-up unless in panic.
/// - Scale-down: only after `scale_down_delay_s` of asking for fewer, `scale_down_step`
///   at a time, not within `scale_down_cooldown_s` of the last, never in panic, never when
///   `scale_in` is off.
/// - The result stays within `min_workers`..=`max_workers` as schedules set them; a version
///   with no workers and a waiting request gets one at once.
pub fn decide(
    state: &ScaleState,
    load: &Load,
    policy: &Policy,
    now: Moment,
) -> (Decision, ScaleState) {
    let spec = &policy.spec;
    let mut next = state.clone();
    let current = state.workers;
    let target = f64::from(spec.target_concurrency);
    let (min, max, schedule) = policy.bounds(now.wall);
    let t = now.mono;

    // Panic mode.
    let panic_needs = (load.panic / target).ceil();
    let burst = current > 0
        && panic_needs * 100.0 >= f64::from(current) * f64::from(spec.panic_threshold_percent);
    if burst {
        next.panic_until = Some(t + policy.stable_window());
    }
    let panicking = next.panic_until.is_some_and(|until| t < until);
    if !panicking {
        next.panic_until = None;
    }

    // What the load asks for.
    let stable_needs = (load.stable / target).ceil() as u32;
    let (mut wanted, mut trigger) = if panicking {
        (current.max(panic_needs as u32), Trigger::Panic)
    } else {
        (stable_needs, Trigger::TargetTracking)
    };
    let per_worker = load.stable / f64::from(current.max(1));
    for (i, step) in spec.step.iter().enumerate() {
        if in_band(step, per_worker) {
            let asked = (i64::from(current) + step.change.workers(current))
                .clamp(0, i64::from(u32::MAX)) as u32;
            if asked > wanted {
                wanted = asked;
                trigger = Trigger::Step(i);
            }
        }
    }
    let mut reason = format!(
        "{:.1} in flight over the stable window, {:.1} over the panic window; target {} per worker",
        load.stable, load.panic, spec.target_concurrency
    );

    // Below target, continuously, since when.
    if wanted < current {
        next.below_since.get_or_insert(t);
    } else {
        next.below_since = None;
    }

    let mut to = current;
    if wanted > current {
        let base = fewest_since(state, t.checked_sub(RATE_WINDOW)).max(1);
        let limit = base.saturating_add(
            ((u64::from(base) * u64::from(spec.max_scale_up_percent)).div_ceil(100))
                .min(u64::from(u32::MAX)) as u32,
        );
        let cooling = !panicking
            && state
                .last_scale_up
                .is_some_and(|last| t < last + Duration::from_secs(spec.scale_up_cooldown_s));
        if cooling && current > 0 {
            reason.push_str("; scale-up cooldown");
        } else {
            to = wanted.min(limit);
            if to < wanted {
                reason.push_str(&format!("; asks for {wanted}, at most {limit} within 60 s"));
            }
        }
    } else if wanted < current {
        let delay = Duration::from_secs(spec.scale_down_delay_s.into());
        let waited = next.below_since.is_some_and(|since| t >= since + delay);
        let cooling = state
            .last_scale_down
            .is_some_and(|last| t < last + Duration::from_secs(spec.scale_down_cooldown_s));
        if !spec.scale_in {
            reason.push_str("; scale_in is off");
        } else if panicking {
            reason.push_str("; no scale-down in panic mode");
        } else if !waited {
            reason.push_str("; waiting out scale_down_delay_s");
        } else if cooling {
            reason.push_str("; scale-down cooldown");
        } else {
            to = wanted.max(current.saturating_sub(spec.scale_down_step));
        }
    }

    // Bounds, and a request waiting at zero.
    if to < min || to > max {
        to = to.clamp(min, max);
        trigger = Trigger::Bounds(schedule);
        reason = format!(
            "min_workers {min}, max_workers {max}{}",
            schedule
                .map(|i| format!(" (schedule[{i}])"))
                .unwrap_or_default()
        );
    }
    if current == 0 && load.waiting && max > 0 {
        to = to.max(1);
        trigger = Trigger::Wake;
        reason = "a request or job is waiting and no worker runs".to_owned();
    }

    if to > current {
        next.last_scale_up = Some(t);
        next.below_since = None;
    } else if to < current {
        // The next scale-down waits a whole delay again.
        next.last_scale_down = Some(t);
        next.below_since = Some(t);
    } else {
        trigger = Trigger::Steady;
    }
    if to != current {
        next.workers = to;
        next.history.push_back((t, to));
    }
    if let Some(since) = t.checked_sub(RATE_WINDOW) {
        prune(&mut next.history, since);
    }
    (
        Decision {
            from: current,
            to,
            trigger,
            reason,
        },
        next,
    )
}

fn in_band(step: &StepPolicy, load: f64) -> bool {
    let (lower, upper) = step.band();
    lower <= load && load < upper
}

/// The fewest workers in effect at any time since `since` (`None`: in all the history).
fn fewest_since(state: &ScaleState, since: Option<Duration>) -> u32 {
    let mut fewest = state.workers;
    let mut in_effect_at_start = None;
    for &(at, workers) in &state.history {
        if since.is_some_and(|since| at <= since) {
            in_effect_at_start = Some(workers);
        } else {
            fewest = fewest.min(workers);
        }
    }
    in_effect_at_start.map_or(fewest, |w| fewest.min(w))
}

/// Drops history older than `since`, keeping the entry in effect at `since`.
fn prune(history: &mut VecDeque<(Duration, u32)>, since: Duration) {
    while history.len() > 1 && history[1].0 <= since {
        history.pop_front();
    }
}

/// The scaler of one version: its policy, its state, and the meter readings of the
/// stable window.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    policy: Policy,
    state: ScaleState,
    readings: VecDeque<Reading>,
}

impl Autoscaler {
    /// A scaler with `workers` workers at `now`.
    pub fn new(policy: Policy, workers: u32, now: Moment) -> Self {
        Self {
            policy,
            state: ScaleState {
                workers,
                history: VecDeque::from([(now.mono, workers)]),
                ..ScaleState::default()
            },
            readings: VecDeque::new(),
        }
    }

    /// Its policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Its state.
    pub fn state(&self) -> &ScaleState {
        &self.state
    }

    /// Starts over at `workers` workers (a deploy, a stop, a start), keeping the windows.
    pub fn reset(&mut self, workers: u32, now: Moment) {
        self.state = ScaleState {
            workers,
            history: VecDeque::from([(now.mono, workers)]),
            ..ScaleState::default()
        };
    }

    /// Replaces the policy (a new spec for the same version), keeping state and windows.
    pub fn set_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    /// Takes a meter reading, and decides. `waiting` tells whether a request waits for a
    /// worker; `backlog` counts queued jobs that may scale the version up, which count as
    /// load in both windows (they would be in flight if there were room) and wake a
    /// version at zero.
    pub fn tick(&mut self, reading: Reading, waiting: bool, backlog: u64, now: Moment) -> Decision {
        let load = self.observe(reading, waiting);
        self.decide_load(load, backlog, now)
    }

    /// Takes a meter reading into the windows without deciding; returns the load over
    /// both windows (what a cluster node reports to the cluster's scaler).
    pub fn observe(&mut self, reading: Reading, waiting: bool) -> Load {
        let load = self.load(&reading, waiting);
        self.readings.push_back(reading);
        let keep = self.policy.stable_window() + Duration::from_secs(1);
        while self
            .readings
            .front()
            .is_some_and(|r| reading.at.saturating_sub(r.at) > keep)
        {
            self.readings.pop_front();
        }
        load
    }

    /// Decides on a load measured elsewhere (the sum of a cluster's nodes), with `backlog`
    /// queued jobs counted as in [`Autoscaler::tick`].
    pub fn decide_load(&mut self, mut load: Load, backlog: u64, now: Moment) -> Decision {
        load.stable += backlog as f64;
        load.panic += backlog as f64;
        load.waiting |= backlog > 0;
        let (decision, state) = decide(&self.state, &load, &self.policy, now);
        self.state = state;
        decision
    }

    /// The load over both windows, from the readings kept and this one.
    pub fn load(&self, reading: &Reading, waiting: bool) -> Load {
        let over = |window: Duration| {
            let since = reading.at.saturating_sub(window);
            // The latest reading at or before the window's start, else the oldest kept.
            let earlier = self
                .readings
                .iter()
                .rev()
                .find(|r| r.at <= since)
                .or(self.readings.front());
            match earlier {
                Some(earlier) => reading.average_since(earlier),
                None => reading.in_flight as f64,
            }
        };
        Load {
            stable: over(self.policy.stable_window()),
            panic: over(self.policy.panic_window()),
            waiting,
        }
    }
}
