//! turmoil versions of the server's IO edges: a listener over turmoil TCP and a clock on
//! simulated time.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use gatekeeper::edges::{Clock, Listener};

/// A turmoil TCP listener as the server's [`Listener`].
pub struct SimListener(pub turmoil::net::TcpListener);

impl std::fmt::Debug for SimListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SimListener").field(&self.0.local_addr().ok()).finish()
    }
}

impl SimListener {
    /// Binds `addr` on the current simulated host.
    pub async fn bind(addr: SocketAddr) -> io::Result<Self> {
        turmoil::net::TcpListener::bind(addr).await.map(SimListener)
    }
}

impl Listener for SimListener {
    type Stream = turmoil::net::TcpStream;
    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        self.0.accept().await
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// Simulated time: tokio's (paused) clock for `now`, and the simulation's epoch plus elapsed
/// simulated time, plus the steps of `clock_jump` faults, for the wall clock.
#[derive(Debug, Clone)]
pub struct SimClock {
    epoch: SystemTime,
    step_ms: Arc<AtomicI64>,
}

impl SimClock {
    /// A clock whose wall time starts at `epoch` (the turmoil builder's epoch) and is stepped
    /// by `step_ms` milliseconds (the world's `wall_step_ms`), while `now` never jumps.
    pub fn new(epoch: SystemTime, step_ms: Arc<AtomicI64>) -> Self {
        SimClock { epoch, step_ms }
    }
}

impl Clock for SimClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
    fn wall(&self) -> SystemTime {
        let t = self.epoch + turmoil::sim_elapsed().unwrap_or(Duration::ZERO);
        let step = self.step_ms.load(Ordering::Relaxed);
        let by = Duration::from_millis(step.unsigned_abs());
        if step < 0 { t - by } else { t + by }
    }
}
