//! The async driver: accepts connections, gates them (G1, G2, session limits), runs one
//! [`Session`] per connection as a task, carries out its actions through the edges, and shuts
//! down gracefully. It moves bytes and time; every decision is the session's or the gate's.
//!
//! Generic over its [`Listener`] and built from trait objects for the other edges, so the same
//! code serves real TCP in production and turmoil sockets in the simulation.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::edges::{BanOrder, BanSink, Clock, Downstream, Listener, Observer, Scanner, SystemClock, Verifier};
use crate::gate::{Gate, GateConfig, GateDecision};
use crate::policy::{Directory, OffenceCounter, ScanOutcome, Verification};
use crate::proto::{PROXY_HEADER_MAX, escape};
use crate::session::{Action, ClientInfo, Refusal, Session, SessionConfig};

/// Concurrency and shutdown limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent sessions overall.
    pub max_sessions: usize,
    /// Concurrent sessions per client address.
    pub max_sessions_per_ip: usize,
    /// How long sessions may go on after shutdown begins.
    pub shutdown_grace: Duration,
    /// Enforce G1 in process (embedded default). Off when the kernel gates connections.
    pub in_process_rate: bool,
    /// Peers whose PROXY protocol header is honoured.
    pub proxy_trusted: Vec<IpAddr>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 2000,
            max_sessions_per_ip: 10,
            shutdown_grace: Duration::from_secs(30),
            in_process_rate: true,
            proxy_trusted: Vec::new(),
        }
    }
}

/// Counters, read by `stats()`; monotonically increasing.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted by the listener.
    pub connections: AtomicU64,
    /// Refused by G1 (rate).
    pub refused_rate: AtomicU64,
    /// Refused by G2 (banned).
    pub refused_banned: AtomicU64,
    /// Refused for lack of capacity.
    pub refused_busy: AtomicU64,
    /// Messages handed off.
    pub delivered: AtomicU64,
    /// Bans decided.
    pub bans: AtomicU64,
}

/// Builds a [`Server`].
#[derive(Debug)]
pub struct ServerBuilder {
    session: Arc<SessionConfig>,
    directory: Arc<Directory>,
    downstream: Arc<dyn Downstream>,
    clock: Arc<dyn Clock>,
    gate: GateConfig,
    limits: Limits,
    verifier: Option<Arc<dyn Verifier>>,
    scanner: Option<Arc<dyn Scanner>>,
    ban_sink: Option<Arc<dyn BanSink>>,
    observer: Option<Arc<dyn Observer>>,
}

impl ServerBuilder {
    /// The clock (default: [`SystemClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
    /// The gate's configuration (default: xt_recent semantics, 60 s, 4 days).
    pub fn gate(mut self, gate: GateConfig) -> Self {
        self.gate = gate;
        self
    }
    /// Concurrency limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
    /// Callback verification (C1).
    pub fn verifier(mut self, v: Arc<dyn Verifier>) -> Self {
        self.verifier = Some(v);
        self
    }
    /// Virus scanning (V1).
    pub fn scanner(mut self, s: Arc<dyn Scanner>) -> Self {
        self.scanner = Some(s);
        self
    }
    /// Ban persistence and kernel backends.
    pub fn ban_sink(mut self, b: Arc<dyn BanSink>) -> Self {
        self.ban_sink = Some(b);
        self
    }
    /// Sees every verdict.
    pub fn observer(mut self, o: Arc<dyn Observer>) -> Self {
        self.observer = Some(o);
        self
    }

    /// The server, ready to [`Server::run`].
    pub fn build(self) -> Server {
        let origin = self.clock.now();
        let b4_window = self.session.policy.b4_window;
        Server {
            shared: Arc::new(Shared {
                gate: Mutex::new(Gate::new(self.gate.clone(), origin)),
                gate_config: self.gate,
                offences: Mutex::new(OffenceCounter::new(b4_window, 100_000)),
                active: Mutex::new(HashMap::new()),
                total: AtomicUsize::new(0),
                next_id: AtomicU64::new(1),
                stats: Stats::default(),
                session: self.session,
                directory: self.directory,
                downstream: self.downstream,
                clock: self.clock,
                limits: self.limits,
                verifier: self.verifier,
                scanner: self.scanner,
                ban_sink: self.ban_sink,
                observer: self.observer,
            }),
        }
    }
}

/// The SMTP server. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct Server {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    session: Arc<SessionConfig>,
    directory: Arc<Directory>,
    downstream: Arc<dyn Downstream>,
    clock: Arc<dyn Clock>,
    gate_config: GateConfig,
    gate: Mutex<Gate>,
    offences: Mutex<OffenceCounter>,
    limits: Limits,
    verifier: Option<Arc<dyn Verifier>>,
    scanner: Option<Arc<dyn Scanner>>,
    ban_sink: Option<Arc<dyn BanSink>>,
    observer: Option<Arc<dyn Observer>>,
    active: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicUsize,
    next_id: AtomicU64,
    stats: Stats,
}

impl Server {
    /// A builder with the embedded defaults for everything not given.
    pub fn builder(
        session: Arc<SessionConfig>,
        directory: Arc<Directory>,
        downstream: Arc<dyn Downstream>,
    ) -> ServerBuilder {
        ServerBuilder {
            session,
            directory,
            downstream,
            clock: Arc::new(SystemClock),
            gate: GateConfig::default(),
            limits: Limits::default(),
            verifier: None,
            scanner: None,
            ban_sink: None,
            observer: None,
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// `true` if `addr` is banned in the in-process gate now.
    pub fn is_banned(&self, addr: IpAddr) -> bool {
        let now = self.shared.clock.now();
        self.shared.gate.lock().expect("gate lock").is_banned(now, addr)
    }

    /// Bans `addr` for `duration` (administrator or re-applied from storage).
    pub fn ban(&self, addr: IpAddr, duration: Duration) {
        let now = self.shared.clock.now();
        self.shared.gate.lock().expect("gate lock").ban(now, addr, duration);
    }

    /// Lifts a ban; `true` if there was one.
    pub fn unban(&self, addr: IpAddr) -> bool {
        self.shared.gate.lock().expect("gate lock").unban(addr)
    }

    /// Serves connections from `listener` until `shutdown` completes, then stops accepting,
    /// lets sessions finish for the grace period, tells the rest 421 and returns once all have
    /// ended. A message being handed off is always finished first: nothing is lost.
    pub async fn run<L: Listener>(&self, mut listener: L, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        tracing::info!(listen = %listener.local_addr()?, "serving");
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let shared = self.shared.clone();
                        let stop = stop_rx.clone();
                        tasks.spawn(async move { shared.connection(stream, peer, stop).await });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        drop(listener);
        tracing::info!(sessions = tasks.len(), grace = ?self.shared.limits.shutdown_grace, "shutting down");
        let grace = tokio::time::sleep(self.shared.limits.shutdown_grace);
        tokio::pin!(grace);
        loop {
            tokio::select! {
                biased;
                joined = tasks.join_next() => if joined.is_none() { break },
                () = &mut grace => {
                    let _ = stop_tx.send(true);
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The ban manager keeps the in-process gate in step with the ban store (bans restored on
/// start, added or lifted by `gatekeeper bans`, expired).
impl crate::ban::BanMirror for Server {
    fn ban(&self, addr: IpAddr, remaining: Duration) {
        Server::ban(self, addr, remaining);
    }
    fn unban(&self, addr: IpAddr) {
        Server::unban(self, addr);
    }
}

/// Releases a session slot when the connection ends.
struct Slot<'a> {
    shared: &'a Shared,
    addr: IpAddr,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.shared.total.fetch_sub(1, Ordering::Relaxed);
        let mut active = self.shared.active.lock().expect("active lock");
        if let Some(n) = active.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                active.remove(&self.addr);
            }
        }
    }
}

impl Shared {
    fn take_slot(&self, addr: IpAddr) -> Option<Slot<'_>> {
        let mut active = self.active.lock().expect("active lock");
        let n = active.get(&addr).copied().unwrap_or(0);
        if n >= self.limits.max_sessions_per_ip || self.total.load(Ordering::Relaxed) >= self.limits.max_sessions {
            return None;
        }
        active.insert(addr, n + 1);
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Slot { shared: self, addr })
    }

    async fn connection<S>(self: Arc<Self>, mut stream: S, peer: SocketAddr, stop: watch::Receiver<bool>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let addr = if self.limits.proxy_trusted.contains(&peer.ip()) {
            match read_proxy_header(&mut stream, self.session.command_timeout).await {
                Ok(Some(source)) => source.ip(),
                Ok(None) => peer.ip(),
                Err(e) => {
                    tracing::warn!(peer = %peer, error = %e, "bad PROXY header; closing");
                    return;
                }
            }
        } else {
            peer.ip()
        };
        let span = tracing::info_span!("conn", id, peer = %addr);
        self.clone().serve(stream, addr, id, stop).instrument(span).await;
    }

    async fn serve<S>(self: Arc<Self>, mut stream: S, addr: IpAddr, id: u64, mut stop: watch::Receiver<bool>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let now = self.clock.now();
        let decision = self.gate.lock().expect("gate lock").check(now, addr);
        let unknown_before = self.offences.lock().expect("offences lock").count(now, addr);
        let client = ClientInfo { id, addr, unknown_before };
        let (cfg, dir) = (self.session.clone(), self.directory.clone());
        let slot = self.take_slot(addr);
        let refusal = match decision {
            GateDecision::DropBanned => Some(Refusal::Banned),
            GateDecision::DropRate if self.limits.in_process_rate => Some(Refusal::RateLimited),
            _ if slot.is_none() => Some(Refusal::Busy),
            _ => None,
        };
        let mut session = match refusal {
            Some(why) => {
                let counter = match why {
                    Refusal::Banned => &self.stats.refused_banned,
                    Refusal::RateLimited => &self.stats.refused_rate,
                    Refusal::Busy => &self.stats.refused_busy,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                Session::refused(now, cfg, dir, client, why)
            }
            None => Session::new(now, cfg, dir, client),
        };
        let mut buf = [0u8; 1024];
        let mut out = Vec::with_capacity(512);
        loop {
            let closing = self.carry_out(&mut session, addr, id).await;
            self.log_events(&mut session, addr, id);
            out.clear();
            while let Some(reply) = session.poll_reply() {
                reply.write_to(&mut out);
            }
            if !out.is_empty() {
                let write = tokio::time::timeout(self.session.command_timeout, stream.write_all(&out)).await;
                if !matches!(write, Ok(Ok(()))) {
                    tracing::debug!("write failed or timed out; closing");
                    break;
                }
            }
            if closing {
                let _ = stream.shutdown().await;
                break;
            }
            let deadline = session.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                changed = stop.changed(), if !*stop.borrow() => {
                    if changed.is_ok() {
                        session.handle_shutdown(self.clock.now());
                    }
                }
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => session.handle_eof(self.clock.now()),
                    Ok(n) => session.handle_input(self.clock.now(), &buf[..n]),
                },
                () = sleep_until_opt(deadline) => session.handle_timeout(self.clock.now()),
            }
        }
        let unknown = session.unknown_rcpts();
        if unknown > 0 {
            let mut offences = self.offences.lock().expect("offences lock");
            let now = self.clock.now();
            for _ in 0..unknown {
                offences.record(now, addr);
            }
        }
        drop(slot);
    }

    /// Carries out every pending action; returns `true` once the session asked to close.
    async fn carry_out(&self, session: &mut Session, addr: IpAddr, id: u64) -> bool {
        let mut closing = false;
        while let Some(action) = session.poll_action() {
            match action {
                Action::Ban { addr, session: sid, request } => {
                    let duration = self.gate_config.ban_time;
                    self.gate.lock().expect("gate lock").ban(self.clock.now(), addr, duration);
                    self.stats.bans.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(reason = request.reason.as_str(), evidence = %escape(&request.evidence), ?duration, "ban");
                    if let Some(sink) = &self.ban_sink {
                        let order =
                            BanOrder::from_request(addr, sid, request).decided_at(self.clock.wall()).lasting(duration);
                        sink.ban(order).await;
                    }
                }
                Action::Verify { sender } => {
                    let result = match &self.verifier {
                        Some(v) => v.verify(&sender).await,
                        None => Verification::Unknown { evidence: "no verifier configured".into() },
                    };
                    tracing::info!(sender = %sender, ?result, "callback");
                    session.handle_verified(self.clock.now(), result);
                }
                Action::Scan { message } => {
                    let outcome = match &self.scanner {
                        Some(s) => s.scan(message).await,
                        None => ScanOutcome::Failed { reason: "no scanner configured".into() },
                    };
                    session.handle_scanned(self.clock.now(), outcome);
                }
                Action::Deliver { envelope, message } => {
                    let result = self.downstream.deliver(&envelope, message).await;
                    if result.is_ok() {
                        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    session.handle_delivered(self.clock.now(), result);
                }
                Action::Close => closing = true,
            }
            self.log_events(session, addr, id);
        }
        closing
    }

    fn log_events(&self, session: &mut Session, addr: IpAddr, id: u64) {
        while let Some(ev) = session.poll_event() {
            tracing::info!(
                rule = ev.rule.as_str(),
                verdict = ev.verdict(),
                code = ev.code,
                command = ev.command,
                ban = ev.ban.map_or("none", |b| b.as_str()),
                // Details quote clients and remote servers (evidence, relay errors).
                detail = %escape(&ev.detail),
                "verdict"
            );
            if let Some(o) = &self.observer {
                o.on_event(addr, id, &ev);
            }
        }
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Reads a PROXY protocol v1 or v2 header byte by byte (so nothing after it is consumed).
/// `Ok(None)` for `PROXY UNKNOWN` / v2 LOCAL: use the peer address.
async fn read_proxy_header<S: AsyncRead + Unpin>(stream: &mut S, timeout: Duration) -> io::Result<Option<SocketAddr>> {
    let read = async {
        let mut buf = Vec::with_capacity(64);
        let mut byte = [0u8; 1];
        loop {
            stream.read_exact(&mut byte).await?;
            buf.push(byte[0]);
            match crate::proto::parse_proxy_header(&buf) {
                Ok(Some((_, source))) => return Ok(source),
                Ok(None) if buf.len() < PROXY_HEADER_MAX => continue,
                Ok(None) => return Err(io::Error::new(io::ErrorKind::InvalidData, "PROXY header too long")),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "PROXY header timeout"))?
}
