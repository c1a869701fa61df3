//! The ban manager: bans B1–B4 and manual bans, recorded durably, pushed to a kernel backend,
//! expired by the gatekeeper itself (rule G2, DESIGN.md §2).
//!
//! A ban covers a network ([`Net`]: an IPv4 address, or the client's IPv6 /64 by default) and
//! carries its reason, its evidence (session id and command), its start and its expiry
//! ([gate] `ban_time`, 4 days; longer for repeat offenders when [`Escalation`] is on).
//! Allowlisted networks are never banned.
//!
//! - **Durable first.** [`BanManager`] implements [`BanSink`]: the ban is committed to SQLite
//!   (`<state_dir>/state.sqlite`, [`store`]) before the server replies to the client, so a
//!   kill -9 loses nothing. Concurrent bans are group-committed: one transaction, one fsync,
//!   for every order queued while the previous commit ran (a flood of forged senders).
//! - **Then the kernel.** The ban goes to one [`BanBackend`] (`memory`, `xt_recent`,
//!   `nftables`, [`backend`]). A backend failure (table missing, permission denied, set full)
//!   is logged and counted, never fatal: the ban stays recorded and is retried every
//!   `retry_interval` until the backend takes it.
//! - **And the in-process gate.** The server's own gate (which answers 554 to banned clients)
//!   is reached through [`BanMirror`], attached by the binary; so are bans added or removed by
//!   `gatekeeper bans` in another process, picked up within `sync_interval` (1 s).
//! - **Restart.** [`BanManager::restore`] re-applies every unexpired ban with its remaining
//!   time (nft: `timeout` + `expires`; xt_recent cannot backdate, so a fresh window which the
//!   manager cuts short) and drops expired ones.
//! - **Expiry.** [`BanManager::tick`] (run every `sync_interval` by [`BanManager::run`])
//!   removes due bans from the database, the kernel (xt_recent cannot expire an entry early)
//!   and the in-process gate; it also retries failures, reads the kernel table back to
//!   re-apply bans a ruleset reload lost, refreshes long (escalated) bans that outlive the xt
//!   rule's `--seconds`, and warns when xt_recent tables approach `ip_list_tot`.
//!
//! SQLite and the backends block: with `offload` the async methods run them on tokio's
//! blocking pool (production); without it, inline (the simulation). The `*_blocking` methods
//! are for synchronous callers (the CLI). All time comes from the [`Clock`].

pub mod backend;
pub mod config;
pub mod net;
pub mod rules;
pub mod store;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub use backend::{BackendError, BanBackend, MemoryBackend, NftBackend, XtRecentBackend};
pub use config::{BackendKind, BanConfig, Escalation, NftablesSection, XtRecentSection};
pub use net::Net;
pub use store::{BanStore, HistoryEvent, HistoryRow, StoreError};

use crate::edges::{BanOrder, BanSink, BoxFuture, Clock};
use crate::gate::GateConfig;
use crate::policy::BanReason;

/// The file, under the state dir, that holds the `bans` and `ban_history` tables.
pub const STATE_DB: &str = "state.sqlite";

/// One ban.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    /// What it covers.
    pub net: Net,
    /// B1–B4 or manual.
    pub reason: BanReason,
    /// The session that proved it (0 for a manual ban).
    pub session: u64,
    /// The command or finding that proves it; for a manual ban, the administrator's text.
    pub evidence: String,
    /// When it was decided.
    pub start: SystemTime,
    /// When it ends.
    pub expires: SystemTime,
    /// 1 for a first ban; n for the n-th within the escalation lookback.
    pub offence: u32,
}

impl Ban {
    /// Time left at `now` (zero once expired).
    pub fn remaining(&self, now: SystemTime) -> Duration {
        self.expires.duration_since(now).unwrap_or(Duration::ZERO)
    }

    /// The whole length of the ban.
    pub fn total(&self) -> Duration {
        self.expires.duration_since(self.start).unwrap_or(Duration::ZERO)
    }

    /// True once `now` has reached the expiry.
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires <= now
    }
}

/// The server's in-process gate, as the ban manager sees it. The binary implements it on top
/// of `Server::ban` / `Server::unban` (the manager lives below the server and never names it).
pub trait BanMirror: Send + Sync + std::fmt::Debug {
    /// Bans `addr` (a network address) for `remaining`.
    fn ban(&self, addr: IpAddr, remaining: Duration);
    /// Lifts the ban of `addr`.
    fn unban(&self, addr: IpAddr);
}

/// Counters, monotonically increasing.
#[derive(Debug, Default)]
pub struct BanStats {
    /// Bans recorded (new or extended).
    pub recorded: AtomicU64,
    /// Group commits of ban orders: database transactions, each holding one or more bans.
    pub commits: AtomicU64,
    /// Bans refused because the network is allowlisted.
    pub allowlisted: AtomicU64,
    /// Backend operations that failed (each retry that fails counts again).
    pub backend_failures: AtomicU64,
    /// Failed backend operations that later succeeded.
    pub backend_recovered: AtomicU64,
    /// Bans found missing from the kernel table and re-applied.
    pub reapplied: AtomicU64,
    /// Warnings that an xt_recent table is near or over `ip_list_tot`.
    pub capacity_warnings: AtomicU64,
    /// Bans expired.
    pub expired: AtomicU64,
    /// Bans lifted by an administrator.
    pub removed: AtomicU64,
    /// Changes picked up from other processes (`gatekeeper bans`).
    pub synced: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What [`BanManager::ban`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BanOutcome {
    /// A new ban.
    Banned(Ban),
    /// The network was banned already; the ban now ends at the later of the two expiries.
    Extended(Ban),
    /// The network is allowlisted: nothing was banned.
    Allowlisted(Net),
}

/// What [`BanManager::restore`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RestoreReport {
    /// Unexpired bans re-applied.
    pub restored: usize,
    /// Expired bans dropped.
    pub expired: usize,
    /// Re-applications the backend refused (queued for retry).
    pub failed: usize,
}

/// A ban-manager failure: the operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BanError {
    /// The database refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The state dir could not be created.
    #[error("state dir {path}: {error}")]
    StateDir {
        /// The directory.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// A network that is not this manager's ban key (e.g. an IPv6 /48 when bans are /64s).
    #[error("{0}: bans are IPv4 addresses or IPv6 /{1} networks")]
    BadNet(Net, u8),
    /// The blocking task panicked or was cancelled.
    #[error("ban task: {0}")]
    Task(String),
}

/// A backend operation to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Apply,
    Remove,
}

/// The in-process gate operations to carry out once the lock is released.
#[derive(Debug)]
enum MirrorOp {
    Ban(IpAddr, Duration),
    Unban(IpAddr),
}

#[derive(Debug)]
struct Core {
    store: BanStore,
    /// The bans as this process knows them (the database is the truth; `sync` catches up).
    active: BTreeMap<Net, Ban>,
    /// Backend operations that failed, by network (the latest wish wins).
    pending: BTreeMap<Net, Pending>,
    /// When each ban was last written to the backend (for refreshing long xt bans).
    applied: BTreeMap<Net, SystemTime>,
    /// The backend failed last time: log its recovery once.
    backend_down: bool,
    last_retry: Option<Instant>,
    last_reconcile: Option<Instant>,
    last_prune: Option<Instant>,
}

#[derive(Debug)]
struct Inner {
    cfg: BanConfig,
    ban_time: Duration,
    ipv6_prefix: u8,
    allowlist: Vec<Net>,
    clock: Arc<dyn Clock>,
    backend: Box<dyn BanBackend>,
    core: Mutex<Core>,
    /// Ban orders waiting for the next group commit (see [`Inner::record`]).
    queue: Mutex<Vec<Queued>>,
    mirror: Mutex<Option<Arc<dyn BanMirror>>>,
    stats: BanStats,
}

/// A ban order waiting to be committed, and where its answer goes.
#[derive(Debug)]
struct Queued {
    net: Net,
    reason: BanReason,
    session: u64,
    evidence: String,
    at: Option<SystemTime>,
    duration: Option<Duration>,
    answer: Arc<Mutex<Option<Result<BanOutcome, BanError>>>>,
}

/// The ban manager. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct BanManager {
    inner: Arc<Inner>,
    offload: bool,
}

/// The backend `[bans]` names, with IPv6 bans of `/ipv6_prefix`.
pub fn build_backend(cfg: &BanConfig, ipv6_prefix: u8) -> Box<dyn BanBackend> {
    match cfg.backend {
        BackendKind::Memory => Box::new(MemoryBackend::new()),
        BackendKind::XtRecent => Box::new(XtRecentBackend::new(&cfg.xt_recent, ipv6_prefix)),
        BackendKind::Nftables => Box::new(NftBackend::new(&cfg.nftables)),
    }
}

impl BanManager {
    /// Opens `<state_dir>/state.sqlite` (creating the directory) with the backend `cfg`
    /// names. Ban time and IPv6 prefix come from `gate`.
    pub fn open(
        cfg: &BanConfig,
        gate: &GateConfig,
        state_dir: &Path,
        clock: Arc<dyn Clock>,
        offload: bool,
    ) -> Result<BanManager, BanError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|error| BanError::StateDir { path: state_dir.display().to_string(), error })?;
        let store = BanStore::open(&state_dir.join(STATE_DB))?;
        let backend = build_backend(cfg, gate.ipv6_prefix);
        Ok(BanManager::new(cfg, gate, store, backend, clock, offload))
    }

    /// A manager over an open store and any backend.
    pub fn new(
        cfg: &BanConfig,
        gate: &GateConfig,
        store: BanStore,
        backend: Box<dyn BanBackend>,
        clock: Arc<dyn Clock>,
        offload: bool,
    ) -> BanManager {
        BanManager {
            inner: Arc::new(Inner {
                allowlist: cfg.allowlist_nets(),
                cfg: cfg.clone(),
                ban_time: gate.ban_time,
                ipv6_prefix: gate.ipv6_prefix,
                clock,
                backend,
                core: Mutex::new(Core {
                    store,
                    active: BTreeMap::new(),
                    pending: BTreeMap::new(),
                    applied: BTreeMap::new(),
                    backend_down: false,
                    last_retry: None,
                    last_reconcile: None,
                    last_prune: None,
                }),
                queue: Mutex::new(Vec::new()),
                mirror: Mutex::new(None),
                stats: BanStats::default(),
            }),
            offload,
        }
    }

    /// Connects the server's in-process gate; call before [`BanManager::restore`].
    pub fn attach_mirror(&self, mirror: Arc<dyn BanMirror>) {
        *self.inner.mirror.lock().expect("mirror lock") = Some(mirror);
    }

    /// The counters.
    pub fn stats(&self) -> &BanStats {
        &self.inner.stats
    }

    /// The backend in use.
    pub fn backend(&self) -> &dyn BanBackend {
        self.inner.backend.as_ref()
    }

    /// The network a ban of `addr` covers.
    pub fn key(&self, addr: IpAddr) -> Net {
        Net::ban_key(addr, self.inner.ipv6_prefix)
    }

    /// The ban key for a CLI argument: an address, or a network that is exactly a ban key.
    pub fn key_of(&self, net: Net) -> Result<Net, BanError> {
        if net.is_host() {
            return Ok(self.key(net.addr()));
        }
        let key = self.key(net.addr());
        if key == net { Ok(key) } else { Err(BanError::BadNet(net, self.inner.ipv6_prefix)) }
    }

    /// True if `addr`'s ban network overlaps the allowlist.
    pub fn is_allowlisted(&self, addr: IpAddr) -> bool {
        self.inner.allowlisted(self.key(addr))
    }

    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&Inner) -> T + Send + 'static) -> Result<T, BanError> {
        if self.offload {
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|e| BanError::Task(e.to_string()))
        } else {
            Ok(f(&self.inner))
        }
    }

    /// Bans `addr` for `duration` (escalated for a repeat offender): committed to the database,
    /// then pushed to the backend and the in-process gate.
    pub async fn ban(
        &self,
        addr: IpAddr,
        reason: BanReason,
        session: u64,
        evidence: String,
        duration: Option<Duration>,
    ) -> Result<BanOutcome, BanError> {
        self.blocking(move |i| i.record(addr, reason, session, evidence, None, duration)).await?
    }

    /// [`BanManager::ban`] for synchronous callers.
    pub fn ban_blocking(
        &self,
        addr: IpAddr,
        reason: BanReason,
        session: u64,
        evidence: String,
        duration: Option<Duration>,
    ) -> Result<BanOutcome, BanError> {
        self.inner.record(addr, reason, session, evidence, None, duration)
    }

    /// Lifts the ban of `net` (a ban key, see [`BanManager::key_of`]); returns it if there was
    /// one.
    pub async fn unban(&self, net: Net) -> Result<Option<Ban>, BanError> {
        self.blocking(move |i| i.lift(net, HistoryEvent::Remove)).await?
    }

    /// [`BanManager::unban`] for synchronous callers.
    pub fn unban_blocking(&self, net: Net) -> Result<Option<Ban>, BanError> {
        self.inner.lift(net, HistoryEvent::Remove)
    }

    /// Every recorded ban, read from the database (expired ones still listed until the
    /// server's next expiry pass), ordered by network.
    pub fn list_blocking(&self) -> Result<Vec<Ban>, BanError> {
        Ok(self.inner.core.lock().expect("core lock").store.all()?)
    }

    /// The latest `limit` history rows, newest first.
    pub fn history_blocking(&self, net: Option<Net>, limit: usize) -> Result<Vec<HistoryRow>, BanError> {
        Ok(self.inner.core.lock().expect("core lock").store.history(net, limit)?)
    }

    /// Bans as this process knows them (the server's view; [`BanManager::list_blocking`] reads
    /// the database).
    pub fn active(&self) -> Vec<Ban> {
        self.inner.core.lock().expect("core lock").active.values().cloned().collect()
    }

    /// Backend operations waiting for a retry.
    pub fn pending_len(&self) -> usize {
        self.inner.core.lock().expect("core lock").pending.len()
    }

    /// On start: re-applies every unexpired ban (remaining time) to the backend and the
    /// in-process gate; drops expired ones.
    pub async fn restore(&self) -> Result<RestoreReport, BanError> {
        self.blocking(Inner::restore).await?
    }

    /// One maintenance pass: pick up other processes' changes, expire due bans, retry failed
    /// backend operations, reconcile with the kernel table, refresh long bans, prune history.
    pub async fn tick(&self) {
        if let Err(e) = self.blocking(Inner::tick).await {
            tracing::error!(error = %e, "ban maintenance failed");
        }
    }

    /// Runs [`BanManager::tick`] every `sync_interval` until `shutdown` completes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let every = self.inner.cfg.sync_interval;
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = tokio::time::sleep(every) => self.tick().await,
            }
        }
    }
}

impl BanSink for BanManager {
    fn ban(&self, order: BanOrder) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let BanOrder { addr, session, request, at, duration } = order;
            let reason = request.reason;
            let result = self
                .blocking(move |i| i.record(addr, reason, session, request.evidence, Some(at), Some(duration)))
                .await
                .and_then(|r| r);
            if let Err(e) = result {
                // The in-process gate holds the ban; only its persistence failed.
                tracing::error!(client = %addr, ban = reason.as_str(), error = %e, "ban not recorded");
            }
        })
    }
}

impl Inner {
    fn allowlisted(&self, net: Net) -> bool {
        self.allowlist.iter().any(|a| a.overlaps(&net))
    }

    fn mirror(&self, ops: Vec<MirrorOp>) {
        if ops.is_empty() {
            return;
        }
        let Some(m) = self.mirror.lock().expect("mirror lock").clone() else {
            return;
        };
        for op in ops {
            match op {
                MirrorOp::Ban(a, d) => m.ban(a, d),
                MirrorOp::Unban(a) => m.unban(a),
            }
        }
    }

    /// Pushes a ban to the backend; a failure is logged, counted and queued.
    fn apply(&self, core: &mut Core, ban: &Ban, now: SystemTime) {
        let result = self.backend.apply(ban.net, ban.remaining(now), ban.total());
        self.settle(core, ban.net, Pending::Apply, result);
        core.applied.insert(ban.net, now);
    }

    fn remove_from_backend(&self, core: &mut Core, net: Net) {
        let result = self.backend.remove(net);
        self.settle(core, net, Pending::Remove, result);
        core.applied.remove(&net);
    }

    fn settle(&self, core: &mut Core, net: Net, op: Pending, result: Result<(), BackendError>) {
        match result {
            Ok(()) => {
                if core.pending.remove(&net).is_some() {
                    bump(&self.stats.backend_recovered);
                }
                if core.backend_down && core.pending.is_empty() {
                    core.backend_down = false;
                    tracing::info!(backend = self.backend.kind().as_str(), "ban backend recovered");
                }
            }
            Err(e) => {
                bump(&self.stats.backend_failures);
                let first = !core.backend_down || !core.pending.contains_key(&net);
                core.pending.insert(net, op);
                core.backend_down = true;
                let what = if op == Pending::Apply { "apply" } else { "remove" };
                if first {
                    tracing::warn!(
                        backend = self.backend.kind().as_str(),
                        net = %net,
                        op = what,
                        error = %e,
                        "ban backend failed; the ban stays recorded and will be retried"
                    );
                } else {
                    tracing::debug!(net = %net, op = what, error = %e, "ban backend still failing");
                }
            }
        }
    }

    fn warn_capacity(&self, core: &Core) {
        let Some(cap) = self.backend.capacity() else {
            return;
        };
        let v4 = core.active.keys().filter(|n| n.addr().is_ipv4()).count();
        let v6 = core.active.len() - v4;
        let warn_at = (cap * self.cfg.xt_recent.warn_percent as usize).div_ceil(100).max(1);
        for (family, n) in [("ipv4", v4), ("ipv6", v6)] {
            if n > cap {
                bump(&self.stats.capacity_warnings);
                tracing::error!(
                    family,
                    active = n,
                    capacity = cap,
                    "more active bans than the xt_recent table holds: the kernel has evicted bans; raise \
                     xt_recent.ip_list_tot (see `gatekeeper check-config`)"
                );
            } else if n >= warn_at {
                bump(&self.stats.capacity_warnings);
                tracing::warn!(
                    family,
                    active = n,
                    capacity = cap,
                    "active bans approach the xt_recent table's ip_list_tot; beyond it the kernel silently evicts bans"
                );
            }
        }
    }

    /// Records one ban order, by group commit: the order joins the queue, and whoever holds
    /// the core lock next commits every queued order in one transaction (one fsync), then
    /// answers each. Concurrent bans (a flood of forged senders) thus share their fsyncs; a
    /// lone ban commits alone, as before. Each answer is given only after its commit.
    fn record(
        &self,
        addr: IpAddr,
        reason: BanReason,
        session: u64,
        evidence: String,
        at: Option<SystemTime>,
        duration: Option<Duration>,
    ) -> Result<BanOutcome, BanError> {
        let net = Net::ban_key(addr, self.ipv6_prefix);
        if self.allowlisted(net) {
            bump(&self.stats.allowlisted);
            tracing::info!(net = %net, ban = reason.as_str(), evidence = %evidence, "allowlisted: not banned");
            // The server bans in process before it asks us; undo that.
            self.mirror(vec![MirrorOp::Unban(net.addr())]);
            return Ok(BanOutcome::Allowlisted(net));
        }
        let answer = Arc::new(Mutex::new(None));
        let order = Queued { net, reason, session, evidence, at, duration, answer: answer.clone() };
        self.queue.lock().expect("queue lock").push(order);
        let mut core = self.core.lock().expect("core lock");
        if let Some(done) = answer.lock().expect("answer lock").take() {
            // An earlier lock holder committed it with its own.
            return done;
        }
        let orders = std::mem::take(&mut *self.queue.lock().expect("queue lock"));
        let ops = self.commit_orders(&mut core, orders);
        drop(core);
        self.mirror(ops);
        answer.lock().expect("answer lock").take().expect("a queued order is answered by its commit")
    }

    /// Commits `orders` in one transaction, then applies each to the backend and answers it.
    /// Returns the in-process gate operations to carry out once the lock is released.
    fn commit_orders(&self, core: &mut Core, orders: Vec<Queued>) -> Vec<MirrorOp> {
        let now = self.clock.wall();
        bump(&self.stats.commits);
        let results = match core.store.batch(|store| orders.iter().map(|o| self.stage(store, o, now)).collect()) {
            Ok(results) => results,
            Err(e) if orders.len() == 1 => vec![Err(e.into())],
            Err(e) => {
                tracing::error!(orders = orders.len(), error = %e, "group commit of bans failed");
                orders.iter().map(|_| Err(StoreError::GroupCommit(e.to_string()).into())).collect::<Vec<_>>()
            }
        };
        let mut ops = Vec::new();
        let mut items = BTreeMap::new();
        for (order, result) in orders.into_iter().zip(results) {
            let result = result.map(|(ban, outcome)| {
                bump(&self.stats.recorded);
                tracing::info!(
                    net = %ban.net,
                    ban = ban.reason.as_str(),
                    session = ban.session,
                    evidence = %ban.evidence,
                    offence = ban.offence,
                    secs = ban.total().as_secs(),
                    extended = matches!(outcome, BanOutcome::Extended(_)),
                    "ban recorded"
                );
                items.insert(ban.net, (ban.remaining(now), ban.total()));
                ops.push(MirrorOp::Ban(ban.net.addr(), ban.remaining(now)));
                core.active.insert(ban.net, ban);
                outcome
            });
            // Answered once committed: the kernel is best effort from here (failures retry).
            *order.answer.lock().expect("answer lock") = Some(result);
        }
        // The group goes to the kernel together too (nft: one `nft -f` for all), each network
        // once, as it now stands.
        let items: Vec<_> = items.into_iter().map(|(n, (r, t))| (n, r, t)).collect();
        let results = self.backend.apply_many(&items);
        for (&(net, ..), result) in items.iter().zip(results) {
            self.settle(core, net, Pending::Apply, result);
            core.applied.insert(net, now);
        }
        self.warn_capacity(core);
        ops
    }

    /// The database part of one order, inside the group's transaction: the ban as it now
    /// stands, and what happened to it.
    fn stage(&self, store: &mut BanStore, order: &Queued, now: SystemTime) -> Result<(Ban, BanOutcome), BanError> {
        let net = order.net;
        let at = order.at.unwrap_or(now);
        let base = order.duration.unwrap_or(self.ban_time);
        let earlier = if self.cfg.escalation.enabled {
            let since = at.checked_sub(self.cfg.escalation.lookback).unwrap_or(std::time::UNIX_EPOCH);
            store.bans_since(net, since)?
        } else {
            0
        };
        let length = self.cfg.escalation.duration(base, earlier);
        let existing = store.get(net)?.filter(|b| !b.is_expired(now));
        let candidate = Ban {
            net,
            reason: order.reason,
            session: order.session,
            evidence: order.evidence.clone(),
            start: at,
            expires: at + length,
            offence: earlier + 1,
        };
        Ok(match existing {
            Some(old) if old.expires >= candidate.expires => (old.clone(), BanOutcome::Extended(old)),
            Some(_) => {
                store.put(&candidate, HistoryEvent::Extend, now)?;
                (candidate.clone(), BanOutcome::Extended(candidate))
            }
            None => {
                store.put(&candidate, HistoryEvent::Ban, now)?;
                (candidate.clone(), BanOutcome::Banned(candidate))
            }
        })
    }

    fn lift(&self, net: Net, event: HistoryEvent) -> Result<Option<Ban>, BanError> {
        let now = self.clock.wall();
        let mut core = self.core.lock().expect("core lock");
        let old = core.store.remove(net, event, now)?;
        core.active.remove(&net);
        self.remove_from_backend(&mut core, net);
        drop(core);
        if old.is_some() {
            bump(&self.stats.removed);
            tracing::info!(net = %net, "ban lifted");
        }
        self.mirror(vec![MirrorOp::Unban(net.addr())]);
        Ok(old)
    }

    fn restore(&self) -> Result<RestoreReport, BanError> {
        let now = self.clock.wall();
        let mut core = self.core.lock().expect("core lock");
        core.store.changed()?;
        let mut report = RestoreReport::default();
        let mut items = Vec::new();
        let mut ops = Vec::new();
        for mut ban in core.store.all()? {
            let key = Net::ban_key(ban.net.addr(), self.ipv6_prefix);
            if key != ban.net {
                // The IPv6 prefix changed since the ban was recorded: re-key it.
                core.store.remove(ban.net, HistoryEvent::Remove, now)?;
                ban.net = key;
                core.store.put(&ban, HistoryEvent::Ban, now)?;
            }
            if ban.is_expired(now) {
                core.store.remove(ban.net, HistoryEvent::Expire, now)?;
                if !self.backend.expires_itself() {
                    self.remove_from_backend(&mut core, ban.net);
                }
                bump(&self.stats.expired);
                report.expired += 1;
                continue;
            }
            items.push((ban.net, ban.remaining(now), ban.total()));
            ops.push(MirrorOp::Ban(ban.net.addr(), ban.remaining(now)));
            core.active.insert(ban.net, ban);
        }
        let results = self.backend.apply_many(&items);
        for (&(net, ..), result) in items.iter().zip(results) {
            if result.is_err() {
                report.failed += 1;
            }
            self.settle(&mut core, net, Pending::Apply, result);
            core.applied.insert(net, now);
        }
        report.restored = items.len();
        self.warn_capacity(&core);
        drop(core);
        self.mirror(ops);
        tracing::info!(
            restored = report.restored,
            expired = report.expired,
            failed = report.failed,
            backend = self.backend.kind().as_str(),
            "bans restored"
        );
        Ok(report)
    }

    fn tick(&self) {
        if let Err(e) = self.maintain() {
            tracing::error!(error = %e, "ban maintenance failed");
        }
    }

    fn maintain(&self) -> Result<(), BanError> {
        let now = self.clock.wall();
        let mono = self.clock.now();
        let mut ops = Vec::new();
        let mut core = self.core.lock().expect("core lock");
        // Changes by other processes (`gatekeeper bans add|remove`).
        if core.store.changed()? {
            let rows: BTreeMap<Net, Ban> = core.store.all()?.into_iter().map(|b| (b.net, b)).collect();
            let gone: Vec<Net> = core.active.keys().filter(|n| !rows.contains_key(n)).copied().collect();
            for net in gone {
                core.active.remove(&net);
                self.remove_from_backend(&mut core, net);
                ops.push(MirrorOp::Unban(net.addr()));
                bump(&self.stats.synced);
                tracing::info!(net = %net, "ban lifted elsewhere; applied");
            }
            for (net, ban) in rows {
                if core.active.get(&net) == Some(&ban) {
                    continue;
                }
                if ban.is_expired(now) {
                    // The expiry pass below removes it everywhere.
                    core.active.insert(net, ban);
                    continue;
                }
                self.apply(&mut core, &ban, now);
                ops.push(MirrorOp::Ban(net.addr(), ban.remaining(now)));
                bump(&self.stats.synced);
                tracing::info!(net = %net, ban = ban.reason.as_str(), evidence = %ban.evidence, "ban added elsewhere; applied");
                core.active.insert(net, ban);
            }
        }
        // Expiry: the gatekeeper's job (xt_recent cannot expire an entry early).
        let due: Vec<Net> = core.active.values().filter(|b| b.is_expired(now)).map(|b| b.net).collect();
        for net in due {
            core.active.remove(&net);
            let removed = core.store.remove_expired(net, now)?;
            if let Some(ban) = core.store.get(net)? {
                // Extended by another process meanwhile.
                core.active.insert(net, ban);
                continue;
            }
            if !self.backend.expires_itself() {
                self.remove_from_backend(&mut core, net);
            }
            core.applied.remove(&net);
            ops.push(MirrorOp::Unban(net.addr()));
            if removed.is_some() {
                bump(&self.stats.expired);
                tracing::info!(net = %net, "ban expired");
            }
        }
        // Retry failed backend operations.
        let due =
            |last: Option<Instant>, every: Duration| last.is_none_or(|l| mono.saturating_duration_since(l) >= every);
        if !core.pending.is_empty() && due(core.last_retry, self.cfg.retry_interval) {
            core.last_retry = Some(mono);
            let pending: Vec<(Net, Pending)> = core.pending.iter().map(|(n, p)| (*n, *p)).collect();
            for (net, op) in pending {
                match (op, core.active.get(&net).cloned()) {
                    (Pending::Apply, Some(ban)) => self.apply(&mut core, &ban, now),
                    (Pending::Remove, None) => self.remove_from_backend(&mut core, net),
                    // Overtaken by events: nothing to do.
                    _ => {
                        core.pending.remove(&net);
                    }
                }
            }
        }
        // Reconcile: a reloaded ruleset or a flushed table loses bans silently.
        if self.backend.kind().is_kernel()
            && core.pending.is_empty()
            && due(core.last_reconcile, self.cfg.reconcile_interval)
        {
            core.last_reconcile = Some(mono);
            match self.backend.list() {
                Ok(Some(present)) => {
                    let missing: Vec<Ban> =
                        core.active.values().filter(|b| !present.contains(&b.net)).cloned().collect();
                    for ban in missing {
                        bump(&self.stats.reapplied);
                        tracing::warn!(net = %ban.net, "ban missing from the kernel table; re-applied");
                        self.apply(&mut core, &ban, now);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    bump(&self.stats.backend_failures);
                    tracing::warn!(error = %e, "cannot read the kernel ban table back");
                }
            }
        }
        // Bans longer than the xt rule's --seconds (escalation) need a fresh stamp in time; so
        // do the in-process gate's (it models the same rule).
        let half = self.ban_time / 2;
        let stale: Vec<Ban> = core
            .active
            .values()
            .filter(|b| b.total() > self.ban_time && b.remaining(now) > Duration::ZERO)
            .filter(|b| core.applied.get(&b.net).is_none_or(|t| now.duration_since(*t).unwrap_or_default() >= half))
            .cloned()
            .collect();
        for ban in stale {
            if !self.backend.expires_itself() {
                self.apply(&mut core, &ban, now);
            } else {
                core.applied.insert(ban.net, now);
            }
            ops.push(MirrorOp::Ban(ban.net.addr(), ban.remaining(now)));
        }
        if due(core.last_prune, Duration::from_secs(3600)) {
            core.last_prune = Some(mono);
            if let Some(before) = now.checked_sub(self.cfg.history_keep) {
                core.store.prune_history(before)?;
            }
        }
        drop(core);
        self.mirror(ops);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
