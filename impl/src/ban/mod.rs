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

pub mod backend;
pub mod config;
mod maintenance;
mod manager;
pub mod net;
pub mod rules;
pub mod store;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub use backend::{BackendError, BanBackend, MemoryBackend, NftBackend, XtRecentBackend};
pub use config::{BackendKind, BanConfig, Escalation, NftablesSection, XtRecentSection};
pub use manager::BanManager;
pub use net::Net;
pub use store::{BanStore, HistoryEvent, HistoryRow, StoreError};

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
    /// The network the order's address bans.
    net: Net,
    order: BanOrder,
    answer: Arc<Mutex<Option<Result<BanOutcome, BanError>>>>,
}

/// The backend `[bans]` names, with IPv6 bans of `/ipv6_prefix`.
pub fn build_backend(cfg: &BanConfig, ipv6_prefix: u8) -> Box<dyn BanBackend> {
    match cfg.backend {
        BackendKind::Memory => Box::new(MemoryBackend::new()),
        BackendKind::XtRecent => Box::new(XtRecentBackend::new(&cfg.xt_recent, ipv6_prefix)),
        BackendKind::Nftables => Box::new(NftBackend::new(&cfg.nftables)),
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
}

#[cfg(test)]
mod tests;
