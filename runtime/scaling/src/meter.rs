//! The time-weighted count of in-flight requests of a version.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Counts in-flight requests and integrates them over time, so that the average
/// concurrency over any window is the difference of two [`Reading`]s divided by the
/// window: short requests between two ticks are seen, and a long one is counted while it
/// runs, not when it ends.
#[derive(Debug)]
pub struct Meter {
    origin: Instant,
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone, Copy)]
struct State {
    in_flight: u64,
    /// Request-nanoseconds up to `last`.
    busy_ns: u128,
    /// Nanoseconds since the origin of the last change.
    last: u128,
}

impl State {
    fn advance(&mut self, at: u128) {
        if at > self.last {
            self.busy_ns += u128::from(self.in_flight) * (at - self.last);
            self.last = at;
        }
    }
}

/// The meter at one time: requests in flight and request-time so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// When, as time since the meter's origin.
    pub at: Duration,
    /// Requests in flight.
    pub in_flight: u64,
    /// Request-nanoseconds since the origin.
    pub busy_ns: u128,
}

impl Reading {
    /// Average requests in flight between `earlier` and this reading; the in-flight count
    /// when they are at the same time.
    pub fn average_since(&self, earlier: &Reading) -> f64 {
        let span = self.at.saturating_sub(earlier.at).as_nanos();
        if span == 0 {
            return self.in_flight as f64;
        }
        self.busy_ns.saturating_sub(earlier.busy_ns) as f64 / span as f64
    }
}

impl Meter {
    /// A meter with nothing in flight, whose time starts now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            state: Mutex::new(State::default()),
        }
    }

    /// Time since the meter's origin.
    pub fn elapsed(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Counts a request from now until the guard is dropped.
    pub fn enter(&self) -> MeterGuard<'_> {
        self.begin_at(self.elapsed());
        MeterGuard { meter: self }
    }

    /// Counts a request as begun at `at` (time since the origin).
    pub fn begin_at(&self, at: Duration) {
        let mut state = self.lock();
        state.advance(at.as_nanos());
        state.in_flight += 1;
    }

    /// Counts a request as ended at `at`.
    pub fn end_at(&self, at: Duration) {
        let mut state = self.lock();
        state.advance(at.as_nanos());
        state.in_flight = state.in_flight.saturating_sub(1);
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> u64 {
        self.lock().in_flight
    }

    /// The meter at `at` (not before its last change).
    pub fn read_at(&self, at: Duration) -> Reading {
        let mut state = *self.lock();
        state.advance(at.as_nanos());
        Reading {
            at: Duration::from_nanos(u64::try_from(state.last).unwrap_or(u64::MAX)),
            in_flight: state.in_flight,
            busy_ns: state.busy_ns,
        }
    }

    /// The meter now.
    pub fn read(&self) -> Reading {
        self.read_at(self.elapsed())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two counters; a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Meter {
    fn default() -> Self {
        Self::new()
    }
}

/// A request being counted; dropping it ends the request.
#[derive(Debug)]
pub struct MeterGuard<'a> {
    meter: &'a Meter,
}

impl Drop for MeterGuard<'_> {
    fn drop(&mut self) {
        self.meter.end_at(self.meter.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: f64) -> Duration {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn averages_weigh_requests_by_their_time() {
        let m = Meter::new();
        let start = m.read_at(s(0.0));
        // Two requests of 0.5 s and one of 1 s within a 2 s window: 1.0 on average.
        m.begin_at(s(0.0));
        m.begin_at(s(0.2));
        m.end_at(s(0.5));
        m.end_at(s(0.7));
        m.begin_at(s(1.0));
        m.end_at(s(2.0));
        let end = m.read_at(s(2.0));
        assert!((end.average_since(&start) - 1.0).abs() < 1e-9);
        // A request still running counts for the time it has run.
        m.begin_at(s(2.0));
        let later = m.read_at(s(3.0));
        assert!((later.average_since(&end) - 1.0).abs() < 1e-9);
        assert_eq!(later.in_flight, 1);
    }
}
