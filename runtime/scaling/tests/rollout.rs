//! Rolling updates stepped in a simulated machine: the bounds hold at every step and the
//! update finishes, or stalls where the machine has no room and says so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use wasp_core::{RolloutSpec, WorkerCount};
use wasp_scaling::{RolloutPlan, Side};

/// A machine with room for `slots` workers (GPUs), running `old` ready workers of the old
/// spec. A started worker takes a slot if one is free (else it waits, pending) and is
/// ready one step later; a drained worker frees its slot at once.
struct Machine {
    slots: u32,
    old_ready: u32,
    new_pending: u32,
    new_starting: u32,
    new_ready: u32,
}

/// What was seen at each step: workers alive (old and new, pending included) and ready.
struct Trace {
    alive: Vec<u32>,
    ready: Vec<u32>,
    done: bool,
}

fn roll(spec: &RolloutSpec, old: u32, target: u32, slots: u32) -> Trace {
    let plan = RolloutPlan::new(spec, target);
    let mut m = Machine {
        slots,
        old_ready: old,
        new_pending: 0,
        new_starting: 0,
        new_ready: 0,
    };
    let mut trace = Trace {
        alive: Vec::new(),
        ready: Vec::new(),
        done: false,
    };
    for _ in 0..100 {
        // Workers started last step are ready; pending ones take freed slots.
        m.new_ready += m.new_starting;
        m.new_starting = 0;
        let used = m.old_ready + m.new_ready;
        let take = m.new_pending.min(m.slots.saturating_sub(used));
        m.new_pending -= take;
        m.new_starting += take;
        let new = Side {
            live: m.new_pending + m.new_starting + m.new_ready,
            ready: m.new_ready,
        };
        let old_side = Side {
            live: m.old_ready,
            ready: m.old_ready,
        };
        let step = plan.step(new, old_side);
        m.old_ready -= step.drain;
        if step.done {
            trace.done = true;
            assert_eq!(m.old_ready, 0);
            break;
        }
        m.new_pending += step.start;
        let used = m.old_ready + m.new_ready + m.new_starting;
        let take = m.new_pending.min(m.slots.saturating_sub(used));
        m.new_pending -= take;
        m.new_starting += take;
        trace
            .alive
            .push(m.old_ready + m.new_pending + m.new_starting + m.new_ready);
        trace.ready.push(m.old_ready + m.new_ready);
    }
    trace
}

fn spec(surge: WorkerCount, unavailable: WorkerCount) -> RolloutSpec {
    RolloutSpec {
        max_surge: surge,
        max_unavailable: unavailable,
        ..RolloutSpec::default()
    }
}

#[test]
fn the_default_keeps_every_worker_serving_and_adds_one_at_a_time() {
    let t = roll(&RolloutSpec::default(), 4, 4, 100);
    assert!(t.done);
    assert!(t.alive.iter().all(|&a| a <= 5), "{:?}", t.alive);
    assert!(t.ready.iter().all(|&r| r >= 4), "{:?}", t.ready);
    // One new worker at a time: four rounds of start, ready, drain.
    assert_eq!(t.alive.len(), 4, "{:?}", t.alive);
}

#[test]
fn a_larger_surge_goes_faster_within_its_bound() {
    let t = roll(
        &spec(WorkerCount::Percent(50), WorkerCount::Workers(0)),
        8,
        8,
        100,
    );
    assert!(t.done);
    assert!(t.alive.iter().all(|&a| a <= 12), "{:?}", t.alive);
    assert!(t.ready.iter().all(|&r| r >= 8), "{:?}", t.ready);
    assert_eq!(t.alive.len(), 2, "{:?}", t.alive);
}

#[test]
fn unavailable_workers_make_room_where_there_is_none() {
    // Four slots, all taken by the old spec: a surge alone cannot move.
    let stalled = roll(&RolloutSpec::default(), 4, 4, 4);
    assert!(!stalled.done);
    assert!(stalled.ready.iter().all(|&r| r == 4));
    let t = roll(
        &spec(WorkerCount::Percent(2), WorkerCount::Workers(1)),
        4,
        4,
        4,
    );
    assert!(t.done);
    assert!(t.alive.iter().all(|&a| a <= 5), "{:?}", t.alive);
    assert!(t.ready.iter().all(|&r| r >= 3), "{:?}", t.ready);
}

#[test]
fn no_surge_replaces_in_place() {
    let t = roll(
        &spec(WorkerCount::Workers(0), WorkerCount::Percent(50)),
        4,
        4,
        4,
    );
    assert!(t.done);
    assert!(t.alive.iter().all(|&a| a <= 4), "{:?}", t.alive);
    assert!(t.ready.iter().all(|&r| r >= 2), "{:?}", t.ready);
}

#[test]
fn bounds_resolve_against_the_target() {
    let plan = RolloutPlan::new(
        &spec(WorkerCount::Percent(25), WorkerCount::Percent(25)),
        10,
    );
    assert_eq!((plan.surge, plan.unavailable), (3, 2));
    // Both zero after rounding: one may be unavailable, or nothing could move.
    let plan = RolloutPlan::new(&spec(WorkerCount::Percent(0), WorkerCount::Percent(10)), 4);
    assert_eq!((plan.surge, plan.unavailable), (0, 1));
}

#[test]
fn a_shrinking_version_drains_its_extra_workers_first() {
    // Six old workers, the new spec runs two.
    let t = roll(&RolloutSpec::default(), 6, 2, 100);
    assert!(t.done);
    assert!(t.ready.iter().all(|&r| r >= 2), "{:?}", t.ready);
    assert!(t.alive[0] <= 3, "{:?}", t.alive);
}

#[test]
fn growing_from_nothing_starts_the_target() {
    let t = roll(&RolloutSpec::default(), 0, 3, 100);
    assert!(t.done);
    // Started all at once: the surge bounds what is alive beyond the target, and nothing
    // old is alive.
    assert_eq!(t.alive, vec![3]);
}
