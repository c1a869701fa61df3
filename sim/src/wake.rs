//! The simulated world's timers, so the runner can skip quiet time (issue 16, item 5).
//!
//! turmoil ticks every host every tick, even when nothing happens for minutes; at a 250 ms
//! tick an idle day is 345,600 steps of every host's runtime. The runner skips such a stretch
//! in one step ([`turmoil::Sim::step_by`]) when the network is quiet — nothing on any link, no
//! TCP connection open ([`turmoil::Sim::network_quiet`]) — up to the next timer that could put
//! something on the network. Those timers are the world's own: a client's next arrival, a
//! retransmitted SYN, a queue's retry, a resolver's timeout. Each is set through this module,
//! which notes its deadline in the run's [`Wakes`] before sleeping on tokio's clock.
//!
//! Timers that only act on an open connection (a session's timeout, a reply's delay) need not
//! be noted: an open connection keeps the network from being quiet. Nor do a host's timers that
//! touch nothing outside it (the gatekeeper's ban maintenance): a host's paused clock fires them
//! in order, exactly on time, within one long step. A deadline noted for a timer that was then
//! cancelled costs one ordinary step, never correctness. So a run that skips quiet time is the
//! same, step for step, as one that ticks through it (`sim/tests/quiet_time.rs`).

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::time::Duration;

use tokio::time::{Instant, error::Elapsed};

thread_local! {
    /// The run's deadlines, as simulated time since the run's start (one run per thread at a
    /// time: [`Wakes::install`]).
    static WAKES: RefCell<Option<BinaryHeap<Reverse<Duration>>>> = const { RefCell::new(None) };
}

/// The deadlines of one run's timers, for the runner that steps it.
#[derive(Debug)]
pub struct Wakes(());

impl Wakes {
    /// Starts noting deadlines on this thread, for the run about to be built here.
    pub fn install() -> Wakes {
        WAKES.with(|w| *w.borrow_mut() = Some(BinaryHeap::new()));
        Wakes(())
    }

    /// The deadlines around `now` (simulated time since the run's start): the latest one
    /// passed, if any, and the earliest one to come. Forgets those passed.
    pub fn around(&self, now: Duration) -> (Option<Duration>, Option<Duration>) {
        WAKES.with(|w| {
            let mut w = w.borrow_mut();
            let Some(heap) = w.as_mut() else { return (None, None) };
            let mut passed = None;
            while let Some(&Reverse(t)) = heap.peek().filter(|Reverse(t)| *t <= now) {
                passed = Some(t);
                heap.pop();
            }
            (passed, heap.peek().map(|Reverse(t)| *t))
        })
    }
}

impl Drop for Wakes {
    fn drop(&mut self) {
        WAKES.with(|w| *w.borrow_mut() = None);
    }
}

/// Notes `deadline`, on the current host's clock, in the run's deadlines (if a runner that
/// skips quiet time is stepping this thread's simulation).
fn note(deadline: Instant) {
    let Some(elapsed) = turmoil::sim_elapsed() else { return };
    let at = elapsed + deadline.saturating_duration_since(Instant::now());
    WAKES.with(|w| {
        if let Some(heap) = w.borrow_mut().as_mut() {
            heap.push(Reverse(at));
        }
    });
}

/// [`tokio::time::sleep_until`], noted.
pub async fn sleep_until(deadline: Instant) {
    note(deadline);
    tokio::time::sleep_until(deadline).await;
}

/// [`tokio::time::sleep`], noted.
pub async fn sleep(duration: Duration) {
    sleep_until(Instant::now() + duration).await;
}

/// [`tokio::time::timeout`], noted.
pub async fn timeout<F: Future>(duration: Duration, future: F) -> Result<F::Output, Elapsed> {
    note(Instant::now() + duration);
    tokio::time::timeout(duration, future).await
}
