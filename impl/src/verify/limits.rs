//! Probe limits, so that the gatekeeper can never be used to flood a third party (C1): per
//! target domain, at most `domain_concurrency` probes at once and `domain_rate` probes per
//! `rate_window`; overall, at most `max_concurrent` probes at once. Over any limit the probe is
//! not made and the sender is unknown: nothing is queued.
//!
//! The rate window is not sliding: it starts with the first probe after the previous window
//! ended and counts every probe started inside it (like the connection gate, G1). Time is the
//! monotonic `now` from the clock edge, passed in.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeLimits {
    /// Concurrent probes of one domain (2).
    pub domain_concurrency: usize,
    /// Probes of one domain per window (30).
    pub domain_rate: u32,
    /// The rate window (1 minute).
    pub rate_window: Duration,
    /// Concurrent probes overall.
    pub max_concurrent: usize,
    /// Domains tracked at most; beyond it, probes of new domains are refused until old
    /// windows end (a bound on memory, not a limit that should ever be reached).
    pub domains_max: usize,
}

impl Default for ProbeLimits {
    fn default() -> Self {
        ProbeLimits {
            domain_concurrency: 2,
            domain_rate: 30,
            rate_window: Duration::from_secs(60),
            max_concurrent: 50,
            domains_max: 100_000,
        }
    }
}

/// Why a probe was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    /// Too many probes of this domain are running.
    #[error("{0} probes of this domain already running")]
    DomainConcurrency(usize),
    /// This domain's probe budget for the window is spent.
    #[error("{0} probes of this domain in the current window")]
    DomainRate(u32),
    /// Too many probes are running overall.
    #[error("{0} probes already running")]
    Global(usize),
    /// Too many domains are being tracked.
    #[error("too many domains tracked")]
    Domains,
}

#[derive(Debug)]
struct DomainState {
    active: usize,
    window_start: Instant,
    count: u32,
}

#[derive(Debug, Default)]
struct State {
    domains: HashMap<String, DomainState>,
    active: usize,
}

/// Admits probes within the limits. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct ProbeLimiter {
    limits: ProbeLimits,
    state: Arc<Mutex<State>>,
}

/// A running probe's slot; dropping it frees the slot.
pub struct Permit {
    state: Arc<Mutex<State>>,
    domain: String,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").field("domain", &self.domain).finish()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.state.lock().expect("limiter lock");
        state.active = state.active.saturating_sub(1);
        if let Some(d) = state.domains.get_mut(&self.domain) {
            d.active = d.active.saturating_sub(1);
        }
    }
}

impl ProbeLimiter {
    /// A limiter with nothing running.
    pub fn new(limits: ProbeLimits) -> Self {
        ProbeLimiter { limits, state: Arc::default() }
    }

    /// Admits a probe of `domain` at `now`, or says which limit stops it.
    pub fn try_acquire(&self, domain: &str, now: Instant) -> Result<Permit, LimitExceeded> {
        let l = self.limits;
        let mut state = self.state.lock().expect("limiter lock");
        if state.active >= l.max_concurrent {
            return Err(LimitExceeded::Global(state.active));
        }
        if !state.domains.contains_key(domain) && state.domains.len() >= l.domains_max {
            // Forget domains that are idle and whose window has ended; they start afresh anyway.
            state.domains.retain(|_, d| d.active > 0 || now.saturating_duration_since(d.window_start) < l.rate_window);
            if state.domains.len() >= l.domains_max {
                return Err(LimitExceeded::Domains);
            }
        }
        let d =
            state.domains.entry(domain.to_string()).or_insert(DomainState { active: 0, window_start: now, count: 0 });
        if d.active >= l.domain_concurrency {
            return Err(LimitExceeded::DomainConcurrency(d.active));
        }
        if now.saturating_duration_since(d.window_start) >= l.rate_window {
            d.window_start = now;
            d.count = 0;
        }
        if d.count >= l.domain_rate {
            return Err(LimitExceeded::DomainRate(d.count));
        }
        d.count += 1;
        d.active += 1;
        state.active += 1;
        Ok(Permit { state: self.state.clone(), domain: domain.to_string() })
    }

    /// Probes running now.
    pub fn active(&self) -> usize {
        self.state.lock().expect("limiter lock").active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_concurrency_and_global_cap() {
        let limiter = ProbeLimiter::new(ProbeLimits { max_concurrent: 3, ..ProbeLimits::default() });
        let t = Instant::now();
        let a1 = limiter.try_acquire("a.test", t).unwrap();
        let _a2 = limiter.try_acquire("a.test", t).unwrap();
        assert_eq!(limiter.try_acquire("a.test", t).unwrap_err(), LimitExceeded::DomainConcurrency(2));
        let _b = limiter.try_acquire("b.test", t).unwrap();
        assert_eq!(limiter.try_acquire("c.test", t).unwrap_err(), LimitExceeded::Global(3));
        drop(a1);
        assert_eq!(limiter.active(), 2);
        let _a3 = limiter.try_acquire("a.test", t).unwrap();
    }

    #[test]
    fn domain_rate_is_a_fixed_window() {
        let limits = ProbeLimits { domain_rate: 3, rate_window: Duration::from_secs(60), ..ProbeLimits::default() };
        let limiter = ProbeLimiter::new(limits);
        let t0 = Instant::now();
        for i in 0..3 {
            drop(limiter.try_acquire("a.test", t0 + Duration::from_secs(i)).unwrap());
        }
        // Refusals inside the window do not extend it.
        assert_eq!(
            limiter.try_acquire("a.test", t0 + Duration::from_secs(30)).unwrap_err(),
            LimitExceeded::DomainRate(3)
        );
        assert_eq!(
            limiter.try_acquire("a.test", t0 + Duration::from_secs(59)).unwrap_err(),
            LimitExceeded::DomainRate(3)
        );
        drop(limiter.try_acquire("b.test", t0 + Duration::from_secs(59)).unwrap());
        drop(limiter.try_acquire("a.test", t0 + Duration::from_secs(60)).unwrap());
    }

    #[test]
    fn tracked_domains_are_bounded() {
        let limits = ProbeLimits { domains_max: 2, ..ProbeLimits::default() };
        let limiter = ProbeLimiter::new(limits);
        let t0 = Instant::now();
        drop(limiter.try_acquire("a.test", t0).unwrap());
        drop(limiter.try_acquire("b.test", t0).unwrap());
        assert_eq!(limiter.try_acquire("c.test", t0).unwrap_err(), LimitExceeded::Domains);
        drop(limiter.try_acquire("c.test", t0 + Duration::from_secs(60)).unwrap());
    }
}
