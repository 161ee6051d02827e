//! Time as the scaler sees it, real or virtual.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A point in time: monotonic time for windows and cooldowns, wall-clock time for
/// schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    /// Time since the clock's origin.
    pub mono: Duration,
    /// The wall-clock time.
    pub wall: jiff::Timestamp,
}

impl Moment {
    /// This moment moved `by` later on both clocks.
    pub fn after(self, by: Duration) -> Self {
        let wall = jiff::SignedDuration::try_from(by)
            .ok()
            .and_then(|d| self.wall.checked_add(d).ok())
            .unwrap_or(self.wall);
        Self {
            mono: self.mono + by,
            wall,
        }
    }
}

/// A source of [`Moment`]s.
pub trait Clock: Send + Sync + 'static {
    /// The time now.
    fn now(&self) -> Moment;
}

/// The system's clocks.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    /// A clock whose monotonic time starts now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Moment {
        Moment {
            mono: self.origin.elapsed(),
            wall: jiff::Timestamp::now(),
        }
    }
}

/// A clock that moves only when told to; clones share the time.
#[derive(Debug, Clone)]
pub struct VirtualClock {
    now: Arc<Mutex<Moment>>,
}

impl VirtualClock {
    /// A clock at monotonic time zero and the given wall-clock time.
    pub fn new(wall: jiff::Timestamp) -> Self {
        Self {
            now: Arc::new(Mutex::new(Moment {
                mono: Duration::ZERO,
                wall,
            })),
        }
    }

    /// Moves the clock `by` later.
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now = now.after(by);
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Moment {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}
