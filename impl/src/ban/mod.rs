//! The ban manager: bans B1–B4 and manual bans, recorded durably, pushed to a kernel backend,
//! expired by the gatekeeper itself (rule G2, docs/design.md §2).
//!
//! A ban covers a network ([`Net`]: an IPv4 address, or the client's IPv6 /64 by default) and
//! carries its reason, its evidence (session id and command), its start and its expiry
//! ([gate] `ban_time`, 4 days; longer for repeat offenders when [`Escalation`] is on).
//! Allowlisted networks are never banned. A ban is asked for with one [`BanOrder`].
//!
//! - **Durable first.** [`BanManager`] implements [`BanSink`](crate::edges::BanSink): the ban is committed to SQLite
//!   (`<state_dir>/state.sqlite`, [`store`]) before the server replies to the client, so a
//!   kill -9 loses nothing. Concurrent bans are group-committed: one transaction, one fsync,
//!   for every order queued while the previous commit ran (a flood of forged senders).
//! - **When the database refuses** (disk full, I/O error): the ban is still enforced (the
//!   kernel, the in-process gate) but its order is answered [`BanError::Unsaved`], counted
//!   (`commit_failures`) and logged as an error, and the ban is kept in memory and committed
//!   again every `retry_interval` until the database takes it (`commit_recovered`). The
//!   client's reply ("your address is banned") stays true: the ban is in force; only a
//!   restart before the retry succeeds would lose it. A session waits for its order at most
//!   `order_timeout`. A damaged `state.sqlite` is moved aside at start ([`crate::dbfile`]);
//!   bad rows are skipped and counted.
//! - **Bounded.** At most `max_active` bans: beyond it new automatic bans are refused
//!   ([`BanOutcome::Refused`], an error log), never older ones evicted. `widen_v6_after` IPv6
//!   bans inside one /48 are replaced by one ban of the /48 (not with xt_recent, whose mask is
//!   fixed): the kernel and the in-process gate ([`BanMirror`] carries networks) see the /48.
//! - **Then the kernel.** The ban goes to one [`BanBackend`] (`memory`, `xt_recent`,
//!   `nftables`, [`backend`]). A backend failure (table missing, permission denied, set full,
//!   timed out) is logged and counted, never fatal: the ban stays recorded and is retried every
//!   `retry_interval` until the backend takes it. Kernel calls are never made under the
//!   manager's lock: the work is decided under it, carried out without it (in the order it
//!   was decided: a ticket per batch), and its results settled under it again; each call has
//!   a deadline (`kernel_timeout`).
//! - **And the in-process gate.** The server's own gate (which answers 554 to banned clients)
//!   is reached through [`BanMirror`], attached by the binary; so are bans added or removed by
//!   `gatekeeper bans` in another process, picked up within `sync_interval` (1 s).
//! - **Restart.** [`BanManager::restore`] re-applies every unexpired ban with its remaining
//!   time (nft: `timeout` + `expires`; xt_recent cannot backdate, so a fresh window which the
//!   manager cuts short) and drops expired ones.
//! - **Maintenance.** [`BanManager::tick`] (run every `sync_interval` by [`BanManager::run`])
//!   runs named phases in order: sync from the store, expire (xt_recent cannot expire an entry
//!   early), retry failed backend operations, reconcile the kernel table (re-apply bans a
//!   ruleset reload or a flush lost), refresh long (escalated) bans that outlive the xt rule's
//!   `--seconds`, prune old history. Recording and restoring warn when xt_recent tables
//!   approach `ip_list_tot`.
//!
//! The rooms: this file holds what a ban is, the manager's shared state and how that state
//! reaches the backend and the in-process gate; `manager.rs` the API (ban, unban, list,
//! queries, restore, group commit); `maintenance.rs` the periodic phases. Nothing here decides
//! *whether* to ban (that is `policy`) or names the server (the gate is a [`BanMirror`]).
//!
//! SQLite and the backends block: with `offload` the async methods run them on tokio's
//! blocking pool (production); without it, inline (the simulation). The `*_blocking` methods
//! are for synchronous callers (the CLI). All time comes from the [`Clock`].

mod active;
pub mod backend;
mod clock_step;
pub mod config;
mod ledger;
mod maintenance;
mod manager;
pub mod net;
pub mod rules;
pub mod store;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

pub use active::ActiveBans;
pub use backend::{BackendError, BanBackend, MemoryBackend, NftBackend, XtRecentBackend};
pub use config::{BackendKind, BanConfig, Escalation, NftablesSection, XtRecentSection};
pub use manager::{BanManager, BanState};
pub use net::{Net, NetList};
pub use store::{BanStore, HistoryEvent, HistoryRow, OutboxRow, StoreError};

use crate::edges::{BanOrder, Clock};
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

/// The server's own ban table ([`ActiveBans`]), as the ban manager sees it: every active ban
/// is mirrored there, whatever a kernel table holds. The server implements it (the manager
/// lives below the server and never names it).
///
/// It is given networks: a ban key (an IPv4 address, an IPv6 `/gate.ipv6_prefix`) or, when
/// many IPv6 bans were widened (`[bans] widen_v6_after`), an IPv6 /48 that covers every ban key
/// inside it.
pub trait BanMirror: Send + Sync + std::fmt::Debug {
    /// Bans `net` for `remaining`.
    fn ban(&self, net: Net, remaining: Duration);
    /// Lifts the ban of `net` (exactly that network: a /48's lifting does not touch the ban
    /// keys inside it, which the manager lifted when it widened).
    fn unban(&self, net: Net);
    /// True if [`BanMirror::ban`] can hold a network wider than a ban key (a /48). If not, the
    /// manager gives it only ban keys: a widened /48 stays, in process, the ban keys banned
    /// before it (they run out on their own), and a later offence inside it bans its own key.
    fn holds_prefixes(&self) -> bool {
        false
    }
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
    /// Bans and liftings applied from the cluster (other nodes' decisions).
    pub cluster_applied: AtomicU64,
    /// Commits of bans the database refused (each retry that fails counts again): an alarm.
    pub commit_failures: AtomicU64,
    /// Bans committed by a retry after their first commit failed.
    pub commit_recovered: AtomicU64,
    /// Automatic bans refused because `max_active` bans are in force.
    pub refused_full: AtomicU64,
    /// IPv6 /48s banned in place of the many bans inside them.
    pub widened: AtomicU64,
    /// Ban orders a session stopped waiting for after `order_timeout`.
    pub order_timeouts: AtomicU64,
    /// Bad rows skipped by the last full read of the database (a gauge).
    pub bad_rows: AtomicU64,
    /// Steps of the wall clock the active bans moved with.
    pub clock_steps: AtomicU64,
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
    /// `max_active` bans are in force: this automatic ban was refused (older bans are never
    /// evicted to make room).
    Refused(Net),
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
    /// Unexpired bans not written into the kernel because its table was full (xt_recent's
    /// `ip_list_tot`): the server still refuses them.
    pub held_out: usize,
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
    /// The database refused the ban: it is in force (the kernel, the in-process gate of this
    /// process) but not saved; a running server commits it again every `retry_interval`.
    #[error("ban of {net} in force but NOT saved (retried every retry_interval by a running server): {error}")]
    Unsaved {
        /// The network banned.
        net: Net,
        /// SQLite's refusal.
        error: String,
    },
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
    Ban(Net, Duration),
    Unban(Net),
}

/// A kernel operation decided under the core lock, carried out without it.
#[derive(Debug, Clone, Copy)]
enum KernelOp {
    /// Network, remaining time, whole length.
    Apply(Net, Duration, Duration),
    Remove(Net),
}

/// The turn to carry out one batch of kernel operations, taken under the core lock so that
/// batches reach the kernel (and are settled) in the order they were decided. Every ticket
/// taken must be passed to [`Inner::in_turn`], or the batches after it wait forever.
#[derive(Debug)]
#[must_use]
struct Ticket(u64);

#[derive(Debug)]
struct Core {
    store: BanStore,
    /// The bans as this process knows them (the database is the truth; `sync` catches up).
    active: ledger::Ledger,
    /// Backend operations that failed, by network (the latest wish wins).
    pending: BTreeMap<Net, Pending>,
    /// When each ban was last written to the backend (for refreshing long xt bans).
    applied: BTreeMap<Net, SystemTime>,
    /// Bans in force whose commit failed, to be committed again (see [`BanError::Unsaved`]).
    unsaved: BTreeMap<Net, Ban>,
    /// The next kernel batch's [`Ticket`].
    next_ticket: u64,
    /// The backend failed last time: log its recovery once.
    backend_down: bool,
    last_retry: Option<Instant>,
    last_save: Option<Instant>,
    last_reconcile: Option<Instant>,
    last_prune: Option<Instant>,
    /// The last scan for long bans to refresh.
    last_refresh: Option<Instant>,
    /// The last reading of the wall and monotonic clocks ([`Inner::wall`]: steps).
    last_read: Option<(SystemTime, Instant)>,
}

#[derive(Debug)]
struct Inner {
    cfg: BanConfig,
    ban_time: Duration,
    ipv6_prefix: u8,
    /// Many IPv6 bans in one /48 are widened ([`BanConfig::widens`]).
    widen: bool,
    allowlist: Vec<Net>,
    clock: Arc<dyn Clock>,
    backend: Box<dyn BanBackend>,
    core: Mutex<Core>,
    /// Ban orders waiting for the next group commit (see [`Inner::record`]).
    queue: Mutex<Vec<Queued>>,
    /// The ticket whose kernel batch may run now.
    turn: Mutex<u64>,
    turn_cv: Condvar,
    mirror: Mutex<Option<Arc<dyn BanMirror>>>,
    /// Woken when a decision of this node enters the cluster outbox (the sync publishes it).
    outbox_ready: tokio::sync::Notify,
    /// A `[cluster]` is configured: decisions go to the outbox.
    clustered: std::sync::atomic::AtomicBool,
    stats: BanStats,
    /// How long a ban order took from the session's request to its answer (group commit,
    /// fsync, kernel), on the manager's clock.
    commit_seconds: prometheus_client::metrics::histogram::Histogram,
}

/// A ban order waiting to be committed, and where its answer goes.
#[derive(Debug)]
struct Queued {
    /// The network the order's address bans.
    net: Net,
    order: BanOrder,
    answer: Arc<Mutex<Option<Result<BanOutcome, BanError>>>>,
}

/// The backend `[bans]` names, with IPv6 bans of `/ipv6_prefix`.
pub fn build_backend(cfg: &BanConfig, ipv6_prefix: u8) -> Box<dyn BanBackend> {
    match cfg.backend {
        BackendKind::Memory => Box::new(MemoryBackend::new()),
        BackendKind::XtRecent => {
            Box::new(XtRecentBackend::new(&cfg.xt_recent, ipv6_prefix).with_timeout(cfg.kernel_timeout))
        }
        BackendKind::Nftables => Box::new(NftBackend::new(&cfg.nftables).with_timeout(cfg.kernel_timeout)),
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
        let wide = m.holds_prefixes();
        for op in ops {
            match op {
                MirrorOp::Ban(n, _) | MirrorOp::Unban(n) if !wide && !self.is_key(n) => {}
                MirrorOp::Ban(n, d) => m.ban(n, d),
                MirrorOp::Unban(n) => m.unban(n),
            }
        }
    }

    /// True if `net` is a ban key (what a ban of one client covers).
    fn is_key(&self, net: Net) -> bool {
        Net::ban_key(net.addr(), self.ipv6_prefix) == net
    }

    /// True if the attached in-process gate can hold a /48 ([`BanMirror::holds_prefixes`]).
    fn mirror_holds_prefixes(&self) -> bool {
        self.mirror.lock().expect("mirror lock").as_ref().is_some_and(|m| m.holds_prefixes())
    }

    /// The kernel operation that puts `ban` in the table at `now`.
    fn apply_op(ban: &Ban, now: SystemTime) -> KernelOp {
        KernelOp::Apply(ban.net, ban.remaining(now), ban.total())
    }

    /// The next kernel batch's turn; call with the core lock held, then [`Inner::in_turn`]
    /// (or [`Inner::kernel`]) without it.
    fn ticket(core: &mut Core) -> Ticket {
        core.next_ticket += 1;
        Ticket(core.next_ticket - 1)
    }

    /// Waits for `ticket`'s turn, runs `f`, and passes the turn on (also if `f` panics). Call
    /// it without the core lock: the batch before may need it to settle.
    fn in_turn<T>(&self, ticket: Ticket, f: impl FnOnce() -> T) -> T {
        struct PassOn<'a>(&'a Inner);
        impl Drop for PassOn<'_> {
            fn drop(&mut self) {
                *self.0.turn.lock().unwrap_or_else(PoisonError::into_inner) += 1;
                self.0.turn_cv.notify_all();
            }
        }
        let mut turn = self.turn.lock().unwrap_or_else(PoisonError::into_inner);
        while *turn != ticket.0 {
            turn = self.turn_cv.wait(turn).unwrap_or_else(PoisonError::into_inner);
        }
        drop(turn);
        let _pass_on = PassOn(self);
        f()
    }

    /// Carries out `ops` in `ticket`'s turn, without the core lock, and settles their results
    /// under it (still in turn, so that results settle in the order the work was decided).
    fn kernel(&self, ticket: Ticket, ops: &[KernelOp], now: SystemTime) -> Vec<Result<(), BackendError>> {
        self.in_turn(ticket, || {
            let results = self.run_ops(ops);
            let mut core = self.core.lock().expect("core lock");
            self.settle_ops(&mut core, ops, &results, now);
            results
        })
    }

    /// The kernel calls themselves: consecutive applies as one batch (nft: one `nft -f`).
    fn run_ops(&self, ops: &[KernelOp]) -> Vec<Result<(), BackendError>> {
        let mut out = Vec::with_capacity(ops.len());
        let mut i = 0;
        while i < ops.len() {
            let run: Vec<(Net, Duration, Duration)> = ops[i..]
                .iter()
                .map_while(|op| match *op {
                    KernelOp::Apply(n, r, t) => Some((n, r, t)),
                    KernelOp::Remove(_) => None,
                })
                .collect();
            if run.is_empty() {
                if let KernelOp::Remove(net) = ops[i] {
                    out.push(self.backend.remove(net));
                }
                i += 1;
            } else {
                i += run.len();
                out.extend(self.backend.apply_many(&run));
            }
        }
        out
    }

    /// Books the results of `ops`: failures queued for retry, recoveries counted.
    fn settle_ops(&self, core: &mut Core, ops: &[KernelOp], results: &[Result<(), BackendError>], now: SystemTime) {
        for (op, result) in ops.iter().zip(results) {
            match *op {
                KernelOp::Apply(net, ..) => {
                    self.settle(core, net, Pending::Apply, result.clone());
                    core.applied.insert(net, now);
                }
                KernelOp::Remove(net) => {
                    self.settle(core, net, Pending::Remove, result.clone());
                    core.applied.remove(&net);
                }
            }
        }
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
                    "more active bans than the xt_recent table holds: the kernel has evicted some and lets those \
                     clients connect (the server still refuses them with 554); raise xt_recent.ip_list_tot (see \
                     `gatekeeper check-config`)"
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
}

#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod tests;
