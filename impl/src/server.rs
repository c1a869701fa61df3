//! The async driver: accepts connections, gates them (G1, G2, session limits), runs one
//! [`Session`] per connection as a task, carries out its actions through the edges, and shuts
//! down gracefully. It moves bytes and time; every decision is the session's or the gate's.
//!
//! G2 is enforced here from the server's own [`ActiveBans`], which holds every active ban
//! (the ban manager mirrors its store into it) whatever a kernel table evicted: a banned
//! client that reaches the server is refused with 554. The in-process [`Gate`] does G1 only
//! (when no kernel gates): an LRU table of `rate_sources_max` sources whose overflow forgets
//! the least recently seen source — G1 fails open for it, with a warning — and never a ban.
//!
//! Generic over its [`Listener`] and built from trait objects for the other edges, so the same
//! code serves real TCP in production and turmoil sockets in the simulation.
//!
//! Addresses are canonical before any comparison (an IPv4 client seen as `::ffff:a.b.c.d` on
//! a `[::]` listener is IPv4), and every per-client count (sessions, B4 offences and probes,
//! C1's unknown senders) is keyed like the bans: the IPv4 address, the IPv6 network of the
//! gate's `ipv6_prefix`. A PROXY `UNKNOWN` / v2 `LOCAL` connection (a health check) names no
//! client: it gets a greeting and no rule, and is neither gated, counted nor banned as the
//! proxy.
//!
//! Every connection counts: sessions against `max_sessions`, connections the gate refuses
//! (554 banned, 421 rate-limited or busy) against `max_refused`, and all of them together
//! against the sum, checked before anything else is done for a connection. A refused one
//! lasts at most [`REFUSED_WAIT`]; one over its cap gets a 421 written without waiting and is
//! closed at once. So a flood of refused clients holds a bounded number of descriptors and
//! never takes a session slot from an honest client.
//!
//! A message is written to a file (the downstream's [`MessageFile`]) as it arrives, scanned
//! and handed off from there: no connection holds more than one read of it in memory. Below
//! `queue_minfree` free octets (the downstream says how many there are) MAIL gets 452 4.3.1.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::ban::{ActiveBans, Net};
use crate::edges::{
    BanSink, Clock, Conn, CountDelta, Downstream, Listener, MessageFile, Observer, Scanner, SystemClock, Tls, Verifier,
};
use crate::gate::{Gate, GateConfig, GateDecision, GateKind};
use crate::policy::{Directory, MessageCounter, OffenceCounter, ScanOutcome, UnknownSenders};
use crate::proto::Reply;
use crate::proto::{PROXY_HEADER_MAX, escape};
use crate::session::{Action, ClientInfo, Mode, REFUSED_WAIT, Refusal, Session, SessionConfig};

mod front;
mod metrics;

use self::metrics::Marks;
pub use self::metrics::{ObservedLabels, OutcomeLabel, ReasonLabel, ResultLabel, ServerMetrics, VerdictLabels};

/// Concurrency and shutdown limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent sessions overall (connections greeted 220).
    pub max_sessions: usize,
    /// Concurrent connections being refused (554 banned, 421 rate-limited or busy), each for
    /// at most [`REFUSED_WAIT`]; beyond it a connection gets a 421 and is closed at once.
    /// Connections overall: at most `max_sessions + max_refused`.
    pub max_refused: usize,
    /// Concurrent sessions per client address.
    pub max_sessions_per_ip: usize,
    /// Free octets the downstream must keep ([`Downstream::available`]); below, MAIL gets
    /// 452 4.3.1. 0: no threshold.
    pub queue_minfree: u64,
    /// How long sessions may go on after shutdown begins.
    pub shutdown_grace: Duration,
    /// After the grace period: how long sessions get for their 421 and a hand-off in progress
    /// before those still running are dropped.
    pub shutdown_hard: Duration,
    /// Enforce G1 in process (embedded default). Off when the kernel gates connections.
    pub in_process_rate: bool,
    /// Sources the in-process G1 table remembers; when full, the least recently seen is
    /// forgotten (G1 fails open for it, counted in [`Stats::rate_overflow`] and warned).
    pub rate_sources_max: u32,
    /// Peers whose PROXY protocol header is honoured; never banned.
    pub proxy_trusted: Vec<IpAddr>,
}

/// [`Limits::shutdown_hard`] unless configured.
pub const DEFAULT_SHUTDOWN_HARD: Duration = Duration::from_secs(10);

/// The in-process G1 table's default size: a day of the seed's worst spike (4,500 sources an
/// hour) fits many times over, in about 5 MiB.
pub const DEFAULT_RATE_SOURCES_MAX: u32 = 65_536;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 2000,
            max_refused: DEFAULT_MAX_REFUSED,
            max_sessions_per_ip: 10,
            queue_minfree: crate::config::DEFAULT_QUEUE_MINFREE,
            shutdown_grace: Duration::from_secs(30),
            shutdown_hard: DEFAULT_SHUTDOWN_HARD,
            in_process_rate: true,
            rate_sources_max: DEFAULT_RATE_SOURCES_MAX,
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
    /// Sources accepted although the full in-process G1 table had to forget a source still
    /// inside its window (G1 failed open for that one).
    pub rate_overflow: AtomicU64,
    /// Messages handed off.
    pub delivered: AtomicU64,
    /// Bans decided.
    pub bans: AtomicU64,
    /// Observe mode: refusals not given (`would_reject`).
    pub would_reject: AtomicU64,
    /// Observe mode: bans not requested (`would_ban`).
    pub would_ban: AtomicU64,
}

/// What is open now ([`Server::load`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    /// Sessions holding a slot (against `max_sessions`).
    pub sessions: usize,
    /// Connections open, whatever their state.
    pub connections: usize,
    /// Connections being refused (against `max_refused`).
    pub refused: usize,
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
    tls: Option<Arc<Tls>>,
    counts: Option<tokio::sync::mpsc::Sender<CountDelta>>,
}

impl ServerBuilder {
    /// Shares the B4 record with a cluster: what each ended session added goes to `counts`
    /// (dropped when the channel is full: the local record holds it either way), and
    /// [`Server::add_shared_counts`] adds what the other nodes saw.
    pub fn share_counts(mut self, counts: tokio::sync::mpsc::Sender<CountDelta>) -> Self {
        self.counts = Some(counts);
        self
    }
    /// STARTTLS (RFC 3207): offered in EHLO, handshakes done by `tls`.
    pub fn tls(mut self, tls: Arc<Tls>) -> Self {
        self.tls = Some(tls);
        self
    }
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
        let policy = &self.session.policy;
        let tallies = Tallies {
            offences: OffenceCounter::new(policy.b4_window, TALLY_KEYS_MAX),
            probes: OffenceCounter::new(policy.b4_window, TALLY_KEYS_MAX),
            valid: OffenceCounter::new(policy.b4_window, TALLY_KEYS_MAX),
            unknown_senders: UnknownSenders::new(
                policy.unknown_sender_tempfail_max + UNKNOWN_SENDER_KEEP,
                TALLY_KEYS_MAX,
            ),
            messages: MessageCounter::new(CLIENT_MESSAGES_WINDOW, TALLY_KEYS_MAX),
        };
        let mut limits = self.limits;
        for p in &mut limits.proxy_trusted {
            *p = p.to_canonical();
        }
        // G1 only, so always the fail-open LRU semantics of xt_recent (an nft set refuses new
        // sources when full: fail closed), sized for the traffic rather than the kernel.
        let rate_gate = GateConfig {
            kind: GateKind::XtRecent { ip_list_tot: limits.rate_sources_max.max(1), hz: self.gate.kind.hz() },
            ..self.gate.clone()
        };
        Server {
            shared: Arc::new(Shared {
                gate: Mutex::new(Gate::new(rate_gate, origin)),
                bans: Mutex::new(ActiveBans::new()),
                rate_warned: Mutex::new(None),
                gate_config: self.gate,
                tallies: Mutex::new(tallies),
                active: Mutex::new(HashMap::new()),
                connections: AtomicUsize::new(0),
                refused: AtomicUsize::new(0),
                storage: Mutex::new(None),
                total: AtomicUsize::new(0),
                next_id: AtomicU64::new(1),
                stats: Stats::default(),
                metrics: ServerMetrics::default(),
                live: RwLock::new((self.session, self.directory)),
                downstream: self.downstream,
                clock: self.clock,
                limits,
                verifier: self.verifier,
                scanner: self.scanner,
                ban_sink: self.ban_sink,
                observer: self.observer,
                tls: self.tls,
                counts: self.counts,
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
    /// The session configuration and the directory of new sessions: swapped by
    /// [`Server::reload`] (SIGHUP), while running sessions keep theirs.
    live: RwLock<(Arc<SessionConfig>, Arc<Directory>)>,
    downstream: Arc<dyn Downstream>,
    clock: Arc<dyn Clock>,
    gate_config: GateConfig,
    /// G1 in process (see the module doc).
    gate: Mutex<Gate>,
    /// G2: every active ban.
    bans: Mutex<ActiveBans>,
    /// When the G1 overflow was last warned about (at most once a minute).
    rate_warned: Mutex<Option<Instant>>,
    tallies: Mutex<Tallies>,
    limits: Limits,
    verifier: Option<Arc<dyn Verifier>>,
    scanner: Option<Arc<dyn Scanner>>,
    ban_sink: Option<Arc<dyn BanSink>>,
    observer: Option<Arc<dyn Observer>>,
    tls: Option<Arc<Tls>>,
    /// Where each ended session's B4 delta goes for the cluster, if there is one.
    counts: Option<tokio::sync::mpsc::Sender<CountDelta>>,
    /// Sessions per client key.
    active: Mutex<HashMap<IpAddr, usize>>,
    /// Connections open, whatever their state.
    connections: AtomicUsize,
    /// Connections being refused.
    refused: AtomicUsize,
    /// The last free-space check: when, and whether it was below `queue_minfree`.
    storage: Mutex<Option<(Instant, bool)>>,
    total: AtomicUsize,
    next_id: AtomicU64,
    stats: Stats,
    metrics: ServerMetrics,
}

/// `server.max_refused` by default.
pub const DEFAULT_MAX_REFUSED: usize = 500;

/// How long a 421 to a connection over the caps may take to write: it goes into an empty
/// socket buffer, so only a broken peer makes it wait.
const OVERLOAD_WRITE: Duration = Duration::from_secs(1);

/// How long a free-space check holds (a statvfs per read would be wasted).
const STORAGE_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Socket reads while no message is coming in: commands are short, and an idle connection
/// must stay small.
const READ_IDLE: usize = 1024;
/// Socket reads while a message is coming in: fewer, bigger writes to its file.
const READ_DATA: usize = 16 * 1024;

/// The message being received: its file, or why there is none (it could not be created or
/// written; the end of data is then answered 452 4.3.1).
type Incoming = Option<Result<MessageFile, String>>;

/// Keys each per-client table holds at most (the least recently seen go first).
const TALLY_KEYS_MAX: usize = 100_000;
/// The window of `smtp.client_messages_max` (per hour, fixed, like G1's minute).
const CLIENT_MESSAGES_WINDOW: Duration = Duration::from_secs(3600);

/// How long past `unknown_sender_tempfail_max` a first attempt is remembered: as long as an
/// honest queue retries (5 days), so that its retries after the window are recognised.
const UNKNOWN_SENDER_KEEP: Duration = Duration::from_secs(5 * 86_400);

/// The per-client memory of the rules, keyed like the bans.
#[derive(Debug)]
struct Tallies {
    /// B4: counted unknown recipients.
    offences: OffenceCounter,
    /// B4: probe-shaped sessions, not counted unless repeated.
    probes: OffenceCounter,
    /// B4's share test: valid local recipients.
    valid: OffenceCounter,
    /// C1: first attempts of (client network, sender) with an unknown result.
    unknown_senders: UnknownSenders,
    /// `smtp.client_messages_max`: messages per client and hour.
    messages: MessageCounter,
}

/// Who a connection is from, once the PROXY header (if any) is read.
#[derive(Debug, Clone, Copy)]
enum Peer {
    /// A client address: the rules apply.
    Client(IpAddr),
    /// PROXY `UNKNOWN` / v2 `LOCAL` from a trusted proxy at this address (a health check).
    Unidentified(IpAddr),
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
            tls: None,
            counts: None,
        }
    }

    /// STARTTLS, if configured: its counters, and [`Tls::reload`] for a new certificate.
    pub fn tls(&self) -> Option<&Arc<Tls>> {
        self.shared.tls.as_ref()
    }

    /// A reloaded configuration (SIGHUP): sessions from now on get `session` and `directory`
    /// (users, rule tunables, observe mode, SMTP limits); running sessions keep theirs. What
    /// the server was built with otherwise (limits, gate, B4 window) stays until restart.
    pub fn reload(&self, session: Arc<SessionConfig>, directory: Arc<Directory>) {
        *self.shared.live.write().expect("live lock") = (session, directory);
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The labelled metrics and latencies (`GET /metrics`).
    pub fn metrics(&self) -> &ServerMetrics {
        &self.shared.metrics
    }

    /// What is open now: sessions (holding a slot), connections (any state), connections being
    /// refused.
    pub fn load(&self) -> Load {
        let s = &self.shared;
        Load {
            sessions: s.total.load(Ordering::Relaxed),
            connections: s.connections.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
        }
    }

    /// `true` if a ban covers `addr` now.
    pub fn is_banned(&self, addr: IpAddr) -> bool {
        let now = self.shared.clock.now();
        self.shared.bans.lock().expect("bans lock").is_banned(now, addr)
    }

    /// Bans `addr`'s ban key (its IPv4 address, its IPv6 network) for `duration`.
    pub fn ban(&self, addr: IpAddr, duration: Duration) {
        self.ban_net(self.shared.ban_key(addr), duration);
    }

    /// Bans `net` for `duration`.
    pub fn ban_net(&self, net: Net, duration: Duration) {
        let now = self.shared.clock.now();
        self.shared.bans.lock().expect("bans lock").ban(now, net, duration);
    }

    /// Adds what another node of the cluster saw of a client to its B4 record (unknown
    /// recipients, probe-shaped sessions, valid recipients), as if it had been seen here.
    pub fn add_shared_counts(&self, delta: &CountDelta) {
        self.shared.add_shared_counts(delta);
    }

    /// Lifts the ban of `addr`'s ban key; `true` if there was one.
    pub fn unban(&self, addr: IpAddr) -> bool {
        self.unban_net(self.shared.ban_key(addr))
    }

    /// Lifts the ban of `net`; `true` if there was one.
    pub fn unban_net(&self, net: Net) -> bool {
        self.shared.bans.lock().expect("bans lock").unban(net)
    }

    /// Active bans held now (IPv4, IPv6).
    pub fn active_bans(&self) -> (usize, usize) {
        let now = self.shared.clock.now();
        self.shared.bans.lock().expect("bans lock").active(now)
    }

    /// Serves connections from `listener` until `shutdown` completes, then stops accepting,
    /// lets sessions finish for the grace period, tells the rest 421 and returns once all have
    /// ended, or at the hard deadline ([`Limits::shutdown_hard`]) after the grace period,
    /// dropping sessions still stuck then. A message being handed off is finished first if it
    /// can be within the deadline; one dropped was never acknowledged: nothing is lost.
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
                        // Boxed: the connection's future (a few KiB, the session inside) is
                        // then moved once, not at each step of the task's life (issue 18).
                        tasks.spawn(Box::pin(async move { shared.connection(stream, peer, stop).await }));
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
                    // The rest are told 421; one handing a message off finishes that first (its
                    // 250, then the 421). All of it within the hard deadline: a session stuck on
                    // a client that does not read, a hung scanner or relay, is dropped then.
                    let _ = stop_tx.send(true);
                    let hard = tokio::time::sleep(self.shared.limits.shutdown_hard);
                    tokio::pin!(hard);
                    loop {
                        tokio::select! {
                            biased;
                            joined = tasks.join_next() => if joined.is_none() { break },
                            () = &mut hard => {
                                tracing::error!(
                                    sessions = tasks.len(),
                                    deadline = ?self.shared.limits.shutdown_hard,
                                    "sessions still running at the shutdown deadline: dropped (a message not yet \
                                     handed off was not acknowledged, so its client sends it again)"
                                );
                                tasks.abort_all();
                                while tasks.join_next().await.is_some() {}
                                break;
                            }
                        }
                    }
                    break;
                }
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The ban manager keeps the server's ban table in step with the ban store (bans restored on
/// start, decided, added or lifted by `gatekeeper bans`, expired).
impl crate::ban::BanMirror for Server {
    fn ban(&self, net: Net, remaining: Duration) {
        self.ban_net(net, remaining);
    }
    fn unban(&self, net: Net) {
        self.unban_net(net);
    }
    /// [`ActiveBans`] finds any banned prefix: a widened IPv6 /48 is held as such.
    fn holds_prefixes(&self) -> bool {
        true
    }
}

/// Releases a session slot when the connection ends.
struct Slot<'a> {
    shared: &'a Shared,
    /// The client key counted, if any (not for an unidentified connection).
    key: Option<IpAddr>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.shared.total.fetch_sub(1, Ordering::Relaxed);
        let Some(key) = self.key else { return };
        let mut active = self.shared.active.lock().expect("active lock");
        if let Some(n) = active.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                active.remove(&key);
            }
        }
    }
}

/// One place in a counted pool ([`Shared::count`]), given back when dropped.
struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// The session configuration of new sessions.
    fn cfg(&self) -> Arc<SessionConfig> {
        self.live.read().expect("live lock").0.clone()
    }

    /// A place in `pool` if it holds fewer than `max`.
    fn count<'a>(&self, pool: &'a AtomicUsize, max: usize) -> Option<Counted<'a>> {
        pool.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Counted(pool))
    }

    /// Over a cap: a 421 written without waiting for the client, and the connection closed.
    async fn overloaded<S: AsyncWrite + Unpin>(&self, stream: &mut S) {
        self.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
        let reply = Reply::busy(&self.cfg().hostname).to_wire();
        let _ = tokio::time::timeout(OVERLOAD_WRITE, async {
            stream.write_all(reply.as_bytes()).await?;
            stream.shutdown().await
        })
        .await;
    }

    /// The key of every per-client count: what a ban of `addr` covers (the IPv4 address, or
    /// the IPv6 network of the gate's prefix).
    fn client_key(&self, addr: IpAddr) -> IpAddr {
        self.ban_key(addr).addr()
    }

    /// The network a ban of `addr` covers.
    fn ban_key(&self, addr: IpAddr) -> Net {
        Net::ban_key(addr, self.gate_config.ipv6_prefix)
    }

    /// G2 from the ban table, then G1 in the in-process gate (counted there even when the
    /// kernel gates: it is not consulted then). Warns, at most once a minute, when G1 had to
    /// forget a source inside its window.
    fn gate_check(&self, now: Instant, addr: IpAddr) -> GateDecision {
        if self.bans.lock().expect("bans lock").is_banned(now, addr) {
            return GateDecision::DropBanned;
        }
        if !self.limits.in_process_rate {
            return GateDecision::Accept;
        }
        let mut gate = self.gate.lock().expect("gate lock");
        let overflow = gate.rate_would_forget_live(now, addr);
        let decision = gate.check(now, addr);
        drop(gate);
        if overflow && decision == GateDecision::Accept {
            self.stats.rate_overflow.fetch_add(1, Ordering::Relaxed);
            let mut warned = self.rate_warned.lock().expect("rate_warned lock");
            if warned.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(60)) {
                *warned = Some(now);
                tracing::warn!(
                    rate_sources_max = self.limits.rate_sources_max,
                    overflows = self.stats.rate_overflow.load(Ordering::Relaxed),
                    "the in-process G1 table is full of sources inside their window: the least recently seen \
                     is forgotten and may reconnect early (bans are not affected); raise server.rate_sources_max"
                );
            }
        }
        decision
    }

    /// A session slot: overall, and per client key unless `key` is `None`.
    fn take_slot(&self, key: Option<IpAddr>) -> Option<Slot<'_>> {
        let mut active = self.active.lock().expect("active lock");
        if self.total.load(Ordering::Relaxed) >= self.limits.max_sessions {
            return None;
        }
        if let Some(key) = key {
            let n = active.get(&key).copied().unwrap_or(0);
            if n >= self.limits.max_sessions_per_ip {
                return None;
            }
            active.insert(key, n + 1);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Slot { shared: self, key })
    }

    /// Trusted proxies and (through the ban sink) allowlisted networks are never banned.
    fn exempt(&self, addr: IpAddr) -> bool {
        self.limits.proxy_trusted.contains(&addr) || self.ban_sink.as_ref().is_some_and(|s| s.exempt(addr))
    }

    async fn connection<S>(self: Arc<Self>, mut stream: S, peer: SocketAddr, stop: watch::Receiver<bool>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        // Before anything else (a PROXY header may take a while): every connection counts.
        let cap = self.limits.max_sessions + self.limits.max_refused;
        let Some(_connection) = self.count(&self.connections, cap) else {
            tracing::debug!(peer = %peer, cap, "over the connection cap; closing");
            return self.overloaded(&mut stream).await;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let peer_ip = peer.ip().to_canonical();
        let from = if self.limits.proxy_trusted.contains(&peer_ip) {
            match read_proxy_header(&mut stream, self.cfg().command_timeout).await {
                Ok(Some(source)) => Peer::Client(source.ip().to_canonical()),
                Ok(None) => Peer::Unidentified(peer_ip),
                Err(e) => {
                    tracing::warn!(peer = %peer, error = %e, "bad PROXY header; closing");
                    return;
                }
            }
        } else {
            Peer::Client(peer_ip)
        };
        let addr = match from {
            Peer::Client(a) | Peer::Unidentified(a) => a,
        };
        let span = tracing::info_span!("conn", id, peer = %addr);
        self.clone().serve(stream, from, id, stop).instrument(span).await;
    }

    async fn serve<S>(self: Arc<Self>, stream: S, from: Peer, id: u64, mut stop: watch::Receiver<bool>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut stream = Conn::Plain(stream);
        let now = self.clock.now();
        let (addr, key) = match from {
            Peer::Client(addr) => (addr, Some(self.client_key(addr))),
            Peer::Unidentified(addr) => (addr, None),
        };
        let mut slot = self.take_slot(key);
        let mut session = self.open_session(now, id, addr, key, slot.is_some());
        if self.tls.is_some() && !session.is_refused() {
            session.offer_tls();
        }
        // A refused connection never holds a session slot, only a place among the refused.
        let _refusal = if session.is_refused() {
            slot = None;
            match self.count(&self.refused, self.limits.max_refused) {
                Some(place) => Some(place),
                None => {
                    tracing::debug!(max_refused = self.limits.max_refused, "too many refused connections; closing");
                    return self.overloaded(&mut stream).await;
                }
            }
        } else {
            None
        };
        // A refused client gets no patience: its replies are small, and so is the wait.
        let write_timeout = if session.is_refused() { REFUSED_WAIT } else { session.config().command_timeout };
        let mut buf = vec![0u8; READ_IDLE];
        let mut out = Vec::with_capacity(512);
        let mut incoming: Incoming = None;
        // Told of the shutdown already. Not `*stop.borrow()`: a stop sent while the session was
        // busy (a hand-off) must still reach it once it is back here.
        let mut told = false;
        // STARTTLS granted: the handshake follows our 220.
        let mut upgrade = None;
        let refused = session.is_refused();
        if !refused {
            self.metrics.sessions_opened.inc();
        }
        let mut marks = Marks::default();
        loop {
            let closing = self.carry_out(&mut session, addr, id, &mut incoming, &mut upgrade, &mut marks).await;
            marks.merge(self.log_events(&mut session, addr, id));
            out.clear();
            while let Some(reply) = session.poll_reply() {
                reply.write_to(&mut out);
            }
            if !out.is_empty() {
                let write = tokio::time::timeout(write_timeout, async {
                    stream.write_all(&out).await?;
                    stream.flush().await
                })
                .await;
                if !matches!(write, Ok(Ok(()))) {
                    tracing::debug!("write failed or timed out; closing");
                    break;
                }
            }
            if closing {
                let _ = stream.shutdown().await;
                break;
            }
            if let (Some(permit), Some(tls)) = (upgrade.take(), &self.tls) {
                match stream.upgrade(tls, permit).await {
                    Ok(()) => {
                        tracing::debug!("TLS on");
                        session.handle_tls_started(self.clock.now());
                        continue;
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "TLS handshake failed; closing");
                        break;
                    }
                }
            }
            let want = if incoming.is_some() { READ_DATA } else { READ_IDLE };
            if buf.len() != want {
                buf = vec![0u8; want];
            }
            let deadline = session.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                biased;
                changed = stop.changed(), if !told => {
                    told = true;
                    if changed.is_ok() && *stop.borrow() {
                        session.handle_shutdown(self.clock.now());
                    }
                }
                read = stream.read(&mut buf) => match read {
                    Ok(0) | Err(_) => session.handle_eof(self.clock.now()),
                    Ok(n) => {
                        let now = self.clock.now();
                        session.set_storage_short(self.storage_short(now));
                        session.handle_input(now, &buf[..n]);
                    }
                },
                () = sleep_until_opt(deadline) => session.handle_timeout(self.clock.now()),
            }
        }
        if let Some(key) = key
            && !session.is_refused()
        {
            self.record_b4(&session, key);
        }
        if !refused {
            self.metrics.sessions_closed.get_or_create(&OutcomeLabel { outcome: marks.outcome() }).inc();
        }
        drop(slot);
    }

    /// The session for a new connection: refused by the gate (G2, G1) or for lack of a slot;
    /// greeting-only for a connection without a client address; else a fresh one that knows
    /// the client's B4 record and whether it may be banned.
    fn open_session(&self, now: Instant, id: u64, addr: IpAddr, key: Option<IpAddr>, has_slot: bool) -> Session {
        let (cfg, dir) = self.live.read().expect("live lock").clone();
        let Some(key) = key else {
            if !has_slot {
                self.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
                return Session::refused(now, cfg, dir, ClientInfo::new(id, addr), Refusal::Busy);
            }
            tracing::debug!("PROXY UNKNOWN/LOCAL: no client address; greeting only");
            return Session::unidentified(now, cfg, dir, ClientInfo { exempt: true, ..ClientInfo::new(id, addr) });
        };
        let decision = self.gate_check(now, addr);
        let client = {
            let t = self.tallies.lock().expect("tallies lock");
            ClientInfo {
                unknown_before: t.offences.count(now, key),
                probes_before: t.probes.count(now, key),
                valid_before: t.valid.count(now, key),
                messages_before: t.messages.count(now, key),
                exempt: self.exempt(addr),
                ..ClientInfo::new(id, addr)
            }
        };
        let refusal = match decision {
            GateDecision::DropBanned => Some(Refusal::Banned),
            GateDecision::DropRate if cfg.mode == Mode::Observe && has_slot => {
                // Observe mode: G1 would have refused this connection; it is served.
                self.stats.would_reject.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    rule = "G1",
                    would_reject = 421,
                    command = "connect",
                    would_ban = "none",
                    "observed verdict"
                );
                None
            }
            GateDecision::DropRate => Some(Refusal::RateLimited),
            _ if !has_slot => Some(Refusal::Busy),
            _ => None,
        };
        match refusal {
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
        }
    }

    /// Adds another node's B4 delta (see [`ServerBuilder::share_counts`]).
    fn add_shared_counts(&self, d: &CountDelta) {
        let Ok(key) = d.key.parse::<IpAddr>() else { return };
        let now = self.clock.now();
        let mut t = self.tallies.lock().expect("tallies lock");
        for _ in 0..d.valid.min(64) {
            t.valid.record(now, key);
        }
        for _ in 0..d.probes.min(64) {
            t.probes.record(now, key);
        }
        for _ in 0..d.unknown.min(1024) {
            t.offences.record(now, key);
        }
    }

    /// Remembers, under the client key, what the ended session did towards B4 (a
    /// probe-shaped session as a probe: it counts only if repeated; otherwise each unknown
    /// recipient) and the messages it gave (`smtp.client_messages_max`: counted as sessions
    /// end, so a client's concurrent sessions can overshoot by their `messages_max` each).
    fn record_b4(&self, session: &Session, key: IpAddr) {
        let tally = session.b4_tally();
        let messages = u32::try_from(session.transactions()).unwrap_or(u32::MAX);
        if tally.session == 0 && tally.session_valid == 0 && messages == 0 {
            return;
        }
        let now = self.clock.now();
        let mut t = self.tallies.lock().expect("tallies lock");
        t.messages.add(now, key, messages);
        // The counter keeps 64 stamps a client at most: enough for any share it judges.
        for _ in 0..tally.session_valid.min(64) {
            t.valid.record(now, key);
        }
        let (unknown, probes) = match (tally.session, tally.is_probe()) {
            (0, _) => (0, 0),
            (_, true) => (0, 1),
            (n, false) => (n, 0),
        };
        if probes > 0 {
            t.probes.record(now, key);
        }
        for _ in 0..unknown {
            t.offences.record(now, key);
        }
        drop(t);
        if let Some(tx) = &self.counts
            && (unknown > 0 || probes > 0 || tally.session_valid > 0)
        {
            let valid = tally.session_valid.min(64);
            let _ = tx.try_send(CountDelta { key: key.to_string(), unknown, probes, valid, node: String::new() });
        }
    }

    /// `true` while the downstream's free space is below `queue_minfree` (checked at most
    /// once per [`STORAGE_CHECK_EVERY`]; a downstream that cannot tell is never short).
    fn storage_short(&self, now: Instant) -> bool {
        if self.limits.queue_minfree == 0 {
            return false;
        }
        let mut last = self.storage.lock().expect("storage lock");
        if let Some((at, short)) = *last
            && now.saturating_duration_since(at) < STORAGE_CHECK_EVERY
        {
            return short;
        }
        let available = self.downstream.available();
        let short = available.is_some_and(|free| free < self.limits.queue_minfree);
        if short != last.is_some_and(|(_, was)| was) {
            if short {
                tracing::warn!(available, queue_minfree = self.limits.queue_minfree, "free space low: refusing mail");
            } else {
                tracing::info!(available, queue_minfree = self.limits.queue_minfree, "free space back: accepting mail");
            }
        }
        *last = Some((now, short));
        short
    }

    /// Carries out every pending action; returns `true` once the session asked to close.
    async fn carry_out(
        &self,
        session: &mut Session,
        addr: IpAddr,
        id: u64,
        incoming: &mut Incoming,
        upgrade: &mut Option<tokio::sync::OwnedSemaphorePermit>,
        marks: &mut Marks,
    ) -> bool {
        let mut closing = false;
        while let Some(action) = session.poll_action() {
            match action {
                Action::Ban { addr, session: sid, request } => self.apply_ban(addr, sid, request).await,
                Action::Verify { sender } => {
                    let result = self.probe(&sender).await;
                    let waited = self.unknown_waited(&result, &sender, addr, session.config().on_unknown);
                    session.handle_verified(self.clock.now(), result, waited);
                }
                Action::Receive { envelope } => {
                    *incoming = Some(if self.storage_short(self.clock.now()) {
                        Err("free space below server.queue_minfree".into())
                    } else {
                        self.downstream.create(&envelope).map_err(|e| {
                            tracing::warn!(error = %e, "cannot create the message file");
                            format!("cannot create the message file: {e}")
                        })
                    });
                }
                Action::Append { chunk } => {
                    if let Some(Ok(file)) = incoming
                        && let Err(e) = file.append(&chunk)
                    {
                        // Dropping the file removes it; the rest of the message is discarded.
                        tracing::warn!(error = %e, file = %file.path().display(), "cannot write the message");
                        *incoming = Some(Err(format!("cannot write the message: {e}")));
                    }
                }
                Action::Discard => *incoming = None,
                Action::Scan => match incoming {
                    Some(Ok(file)) => {
                        let outcome = self.scan(file).await;
                        session.handle_scanned(self.clock.now(), outcome);
                    }
                    _ => {
                        let why = match incoming.take() {
                            Some(Err(why)) => why,
                            _ => "no message file".into(),
                        };
                        session.handle_store_failed(self.clock.now(), why);
                    }
                },
                Action::Deliver { envelope } => match incoming.take() {
                    Some(Ok(file)) => {
                        let start = self.clock.now();
                        let result = self.downstream.deliver(&envelope, file).await;
                        let took = self.clock.now().saturating_duration_since(start);
                        self.metrics.delivery_seconds.observe(took.as_secs_f64());
                        let label = match &result {
                            Ok(_) => "ok",
                            Err(crate::session::DeliveryError::Temporary(_)) => "tempfail",
                            Err(crate::session::DeliveryError::Permanent(_)) => "reject",
                        };
                        self.metrics.deliveries.get_or_create(&ResultLabel { result: label }).inc();
                        if result.is_ok() {
                            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                            marks.delivered = true;
                        }
                        session.handle_delivered(self.clock.now(), result);
                    }
                    Some(Err(why)) => session.handle_store_failed(self.clock.now(), why),
                    None => session.handle_store_failed(self.clock.now(), "no message file".into()),
                },
                Action::StartTls => {
                    *upgrade = self.tls.as_ref().and_then(|tls| tls.permit());
                    if upgrade.is_none() {
                        tracing::info!("STARTTLS refused: tls.max_handshakes under way");
                    }
                    session.handle_tls_permit(self.clock.now(), upgrade.is_some());
                }
                Action::Close => closing = true,
            }
            marks.merge(self.log_events(session, addr, id));
        }
        closing
    }

    /// Scans a message file (V1), counted by result; `Failed` without a scanner.
    async fn scan(&self, file: &MessageFile) -> ScanOutcome {
        let outcome = match &self.scanner {
            Some(s) => s.scan(file).await,
            None => ScanOutcome::Failed { reason: "no scanner configured".into() },
        };
        let result = match &outcome {
            ScanOutcome::Clean => "clean",
            ScanOutcome::Infected { .. } => "infected",
            ScanOutcome::Failed { .. } => "failed",
        };
        self.metrics.scans.get_or_create(&ResultLabel { result }).inc();
        outcome
    }

    /// Logs, counts and hands to the observer every verdict event the session has; what they
    /// did to the session's outcome.
    fn log_events(&self, session: &mut Session, addr: IpAddr, id: u64) -> Marks {
        let mut marks = Marks::default();
        while let Some(ev) = session.poll_event() {
            self.metrics.event(&ev);
            if !ev.observed && ev.code >= 400 {
                marks.rejected = true;
                marks.banned |= ev.ban.is_some();
            }
            if ev.observed {
                // Observe mode: what would have been done, and was not.
                self.stats.would_reject.fetch_add(1, Ordering::Relaxed);
                if ev.ban.is_some() {
                    self.stats.would_ban.fetch_add(1, Ordering::Relaxed);
                }
                tracing::info!(
                    rule = ev.rule.as_str(),
                    would_reject = ev.code,
                    command = ev.command,
                    would_ban = ev.ban.map_or("none", |b| b.as_str()),
                    detail = %escape(&ev.detail),
                    "observed verdict"
                );
            } else {
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
            }
            if let Some(o) = &self.observer {
                o.on_event(addr, id, &ev);
            }
        }
        marks
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
