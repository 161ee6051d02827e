//! The decision function in virtual time against the seeds' numbers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use wasp_core::{ScalingSpec, SchedulePolicy, StepChange, StepPolicy};
use wasp_scaling::{Autoscaler, Clock, Decision, Policy, Reading, Trigger, VirtualClock};

/// A version under a simulated load, ticking once a second in virtual time.
struct Sim {
    scaler: Autoscaler,
    clock: VirtualClock,
    busy_ns: u128,
}

impl Sim {
    fn new(spec: ScalingSpec, workers: u32) -> Self {
        Self::at(spec, workers, "2026-11-23T12:00:00Z")
    }

    fn at(spec: ScalingSpec, workers: u32, wall: &str) -> Self {
        let policy = Policy::new(&spec).unwrap();
        let clock = VirtualClock::new(wall.parse().unwrap());
        Self {
            scaler: Autoscaler::new(policy, workers, clock.now()),
            clock,
            busy_ns: 0,
        }
    }

    /// Seconds since the start.
    fn t(&self) -> u64 {
        self.clock.now().mono.as_secs()
    }

    fn workers(&self) -> u32 {
        self.scaler.state().workers
    }

    /// One tick now, with `in_flight` requests since the last one; then a second passes.
    fn tick(&mut self, in_flight: u64, waiting: bool) -> Decision {
        let now = self.clock.now();
        let reading = Reading {
            at: now.mono,
            in_flight,
            busy_ns: self.busy_ns,
        };
        let decision = self.scaler.tick(reading, waiting, 0, now);
        self.busy_ns += u128::from(in_flight) * 1_000_000_000;
        self.clock.advance(Duration::from_secs(1));
        decision
    }

    /// `secs` ticks at a steady load; the changes, with their times.
    fn run(&mut self, secs: u64, in_flight: u64) -> Vec<(u64, Decision)> {
        let mut changes = Vec::new();
        for _ in 0..secs {
            let t = self.t();
            let d = self.tick(in_flight, false);
            if d.to != d.from {
                changes.push((t, d));
            }
        }
        changes
    }
}

fn spec(min: u32, max: u32) -> ScalingSpec {
    ScalingSpec {
        min_workers: min,
        max_workers: max,
        ..ScalingSpec::default()
    }
}

fn times(changes: &[(u64, Decision)]) -> Vec<(u64, u32)> {
    changes.iter().map(|(t, d)| (*t, d.to)).collect()
}

#[test]
fn two_workers_at_450_in_flight_each_reach_six_within_a_minute_not_more() {
    let mut sim = Sim::new(spec(1, 20), 2);
    let changes = sim.run(60, 900);
    assert_eq!(times(&changes), [(0, 6)], "{changes:#?}");
    assert_eq!(changes[0].1.trigger, Trigger::Panic);
    assert!(
        changes[0].1.reason.contains("at most 6 within 60 s"),
        "{changes:#?}"
    );
    // 9 needed of 6 is no longer a burst: the rest waits for the scale-up cooldown.
    let changes = sim.run(300, 900);
    assert_eq!(times(&changes), [(300, 9)], "{changes:#?}");
}

#[test]
fn scale_down_is_one_worker_a_minute_after_a_minute_below_target() {
    let mut sim = Sim::new(
        ScalingSpec {
            scale_down_cooldown_s: 0,
            ..spec(1, 8)
        },
        4,
    );
    let changes = sim.run(600, 0);
    assert_eq!(
        times(&changes),
        [(60, 3), (120, 2), (180, 1)],
        "{changes:#?}"
    );
    assert!(
        changes
            .iter()
            .all(|(_, d)| d.trigger == Trigger::TargetTracking)
    );
}

#[test]
fn the_default_cooldown_spaces_scale_downs_by_five_minutes() {
    let mut sim = Sim::new(spec(1, 8), 3);
    let changes = sim.run(1000, 0);
    assert_eq!(times(&changes), [(60, 2), (360, 1)], "{changes:#?}");
}

#[test]
fn scale_up_cooldown_is_honoured_outside_bursts() {
    let mut sim = Sim::new(spec(1, 20), 4);
    // 500 in flight on 4 workers: 125 each, not a burst (needs 5 of 4, under 200%).
    let first = sim.run(10, 500);
    assert_eq!(times(&first), [(0, 5)]);
    assert_eq!(first[0].1.trigger, Trigger::TargetTracking);
    // 700 needs 7, under the panic threshold of 10: it waits for the cooldown.
    let second = sim.run(400, 700);
    assert_eq!(times(&second), [(300, 7)], "{second:#?}");
    assert!(sim.workers() == 7);
}

#[test]
fn a_burst_scales_up_through_the_cooldown_and_holds_off_scale_down() {
    let mut sim = Sim::new(
        ScalingSpec {
            scale_down_cooldown_s: 0,
            ..spec(1, 20)
        },
        2,
    );
    sim.run(5, 100);
    let mut burst = Vec::new();
    let mut panic_until = Duration::ZERO;
    for _ in 0..10 {
        burst.extend(sim.run(1, 1000));
        panic_until = panic_until.max(sim.scaler.state().panic_until.unwrap_or_default());
    }
    // Target tracking moves first, then the burst outruns it and panic mode takes over,
    // through the scale-up cooldown.
    assert_eq!(times(&burst), [(6, 3), (8, 6)], "{burst:#?}");
    assert_eq!(burst[0].1.trigger, Trigger::TargetTracking);
    assert_eq!(burst[1].1.trigger, Trigger::Panic);
    // The burst ends: no scale-down while in panic mode (a stable window after it).
    let quiet = sim.run(200, 0);
    let first_down = quiet
        .iter()
        .find(|(_, d)| d.to < d.from)
        .map(|(t, _)| *t)
        .unwrap();
    assert!(panic_until.as_secs() >= 15 + 50, "{panic_until:?}");
    assert!(
        first_down >= panic_until.as_secs(),
        "scaled down at {first_down}: {quiet:#?}"
    );
}

#[test]
fn scale_to_zero_only_when_min_workers_is_zero() {
    let mut sim = Sim::new(spec(0, 4), 1);
    let changes = sim.run(120, 0);
    assert_eq!(times(&changes), [(60, 0)], "{changes:#?}");
    let mut sim = Sim::new(spec(1, 4), 1);
    assert!(sim.run(1000, 0).is_empty());
}

#[test]
fn a_waiting_request_wakes_a_version_at_zero() {
    let mut sim = Sim::new(spec(0, 4), 0);
    assert!(sim.run(30, 0).is_empty());
    let wake = sim.tick(0, true);
    assert_eq!((wake.from, wake.to, wake.trigger), (0, 1, Trigger::Wake));
    // Served, then idle again: back to zero a delay later.
    let changes = sim.run(100, 0);
    assert_eq!(times(&changes), [(91, 0)], "{changes:#?}");
}

#[test]
fn scale_in_off_never_removes_workers() {
    let mut sim = Sim::new(
        ScalingSpec {
            scale_in: false,
            ..spec(0, 8)
        },
        5,
    );
    assert!(sim.run(1000, 0).is_empty());
}

#[test]
fn step_policies_scale_out_when_target_tracking_would_not() {
    let step = |lower: f64, change: StepChange| StepPolicy {
        lower: Some(lower),
        upper: None,
        change,
    };
    let mut s = spec(1, 20);
    s.scale_up_cooldown_s = 30;
    s.step = vec![step(50.0, StepChange::Workers(2))];
    let mut sim = Sim::new(s.clone(), 2);
    // 60 per worker: target tracking (100) is content, the step adds two.
    let changes = sim.run(1, 120);
    assert_eq!(times(&changes), [(0, 4)]);
    assert_eq!(changes[0].1.trigger, Trigger::Step(0));
    s.step = vec![step(50.0, StepChange::Percent(50))];
    let mut sim = Sim::new(s, 4);
    // 240 on 4 is 60 each: +50% of 4; then 240 on 6 is 40 each, under the band.
    let changes = sim.run(50, 240);
    assert_eq!(times(&changes), [(0, 6)], "{changes:#?}");
}

#[test]
fn a_schedule_raises_min_workers_for_its_window_in_its_time_zone() {
    let mut s = ScalingSpec {
        scale_down_cooldown_s: 0,
        ..spec(1, 10)
    };
    s.schedule = vec![SchedulePolicy {
        cron: "0 9 * * MON-FRI".into(),
        timezone: "Europe/Berlin".into(),
        duration_s: 3600,
        min_workers: Some(5),
        max_workers: None,
    }];
    // Monday 07:59 UTC is 08:59 in Berlin.
    let mut sim = Sim::at(s, 1, "2026-11-23T07:59:00Z");
    let changes = sim.run(3600 + 60 + 240, 0);
    let got = times(&changes);
    assert_eq!(got[0], (60, 5), "{changes:#?}");
    assert_eq!(changes[0].1.trigger, Trigger::Bounds(Some(0)));
    // The window ends at 09:00 UTC; the load has been below target all along, so one
    // worker a minute comes off from then on.
    assert_eq!(
        &got[1..],
        [(3660, 4), (3720, 3), (3780, 2), (3840, 1)],
        "{changes:#?}"
    );
}

#[test]
fn a_schedule_lowering_max_workers_applies_at_once() {
    let mut s = spec(1, 10);
    s.schedule = vec![SchedulePolicy {
        cron: "30 12 * * *".into(),
        timezone: "UTC".into(),
        duration_s: 600,
        min_workers: None,
        max_workers: Some(2),
    }];
    let mut sim = Sim::new(s, 6);
    let changes = sim.run(30 * 60 + 1, 600);
    assert_eq!(times(&changes), [(1800, 2)], "{changes:#?}");
    assert_eq!(changes[0].1.trigger, Trigger::Bounds(Some(0)));
}

#[test]
fn scale_down_step_removes_that_many_workers_at_a_time() {
    let mut sim = Sim::new(
        ScalingSpec {
            scale_down_step: 2,
            scale_down_cooldown_s: 0,
            ..spec(1, 8)
        },
        6,
    );
    let changes = sim.run(300, 0);
    assert_eq!(
        times(&changes),
        [(60, 4), (120, 2), (180, 1)],
        "{changes:#?}"
    );
}

#[test]
fn a_job_backlog_wakes_a_version_and_scales_it_like_load() {
    let policy = Policy::new(&ScalingSpec {
        target_concurrency: 10,
        ..spec(0, 8)
    })
    .unwrap();
    let clock = VirtualClock::new("2026-11-23T12:00:00Z".parse().unwrap());
    let mut scaler = Autoscaler::new(policy, 0, clock.now());
    let reading = |at: Duration| Reading {
        at,
        in_flight: 0,
        busy_ns: 0,
    };
    // Nothing queued: it stays at zero.
    let idle = scaler.tick(reading(clock.now().mono), false, 0, clock.now());
    assert_eq!(idle.to, 0);
    clock.advance(Duration::from_secs(1));
    // Queued jobs wake it.
    let wake = scaler.tick(reading(clock.now().mono), false, 5, clock.now());
    assert_eq!((wake.from, wake.to, wake.trigger), (0, 1, Trigger::Wake));
    clock.advance(Duration::from_secs(1));
    // 45 queued for one worker at a target of 10: a burst; at most +200% at once.
    let up = scaler.tick(reading(clock.now().mono), false, 45, clock.now());
    assert_eq!(
        (up.from, up.to, up.trigger),
        (1, 3, Trigger::Panic),
        "{up:?}"
    );
}
