//! The bottom layer: time. [`Clock`] is the trait every other layer reads time through, and
//! [`SystemClock`] is the only code in the crate that reads a clock; it uses tokio's clock,
//! which `tokio::time::pause` and turmoil control. This module uses nothing else of the crate,
//! so every layer may use it (docs/design.md §3).

use std::time::{Instant, SystemTime};

/// Monotonic and wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Monotonic now, on the same base as `tokio::time::Instant` (timers are armed with it).
    fn now(&self) -> Instant;
    /// Wall-clock now, for Received headers, spool file names and ban records.
    fn wall(&self) -> SystemTime;
}

/// The production clock: tokio's monotonic clock and the system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}
