//! The ban manager's API ([`BanManager`]): open it, ban, unban, list and query, restore the
//! stored bans on start; and the group commit behind every ban (`Inner::record`): the order is
//! durable in SQLite before it is answered, then it goes to the backend and the in-process gate.
//!
//! It must not decide whether to ban (the rules did, or an administrator) nor run the periodic
//! work (that is `maintenance.rs`); it never names the server (the gate is a [`BanMirror`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use super::{
    Ban, BanBackend, BanConfig, BanError, BanMirror, BanOutcome, BanStats, BanStore, Core, HistoryEvent, HistoryRow,
    Inner, MirrorOp, Net, Pending, Queued, RestoreReport, STATE_DB, StoreError, build_backend, bump,
};
use crate::edges::{BanOrder, BanSink, BoxFuture, Clock};
use crate::gate::GateConfig;

/// The ban manager. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct BanManager {
    pub(super) inner: Arc<Inner>,
    offload: bool,
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
        BanManager::open_with(cfg, gate, state_dir, build_backend(cfg, gate.ipv6_prefix), clock, offload)
    }

    /// [`Self::open`] with any backend (the application's edge: the kernel, or the
    /// simulation's model of it).
    pub fn open_with(
        cfg: &BanConfig,
        gate: &GateConfig,
        state_dir: &Path,
        backend: Box<dyn BanBackend>,
        clock: Arc<dyn Clock>,
        offload: bool,
    ) -> Result<BanManager, BanError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|error| BanError::StateDir { path: state_dir.display().to_string(), error })?;
        let store = BanStore::open(&state_dir.join(STATE_DB))?;
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

    /// Runs `f` on tokio's blocking pool with `offload`, inline without.
    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> T + Send + 'static,
    ) -> Result<T, BanError> {
        if self.offload {
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || f(&inner)).await.map_err(|e| BanError::Task(e.to_string()))
        } else {
            Ok(f(&self.inner))
        }
    }

    /// Carries out `order` (its `duration` escalated for a repeat offender): committed to the
    /// database, then pushed to the backend and the in-process gate.
    pub async fn ban(&self, order: BanOrder) -> Result<BanOutcome, BanError> {
        self.blocking(move |i| i.record(order)).await?
    }

    /// [`BanManager::ban`] for synchronous callers.
    pub fn ban_blocking(&self, order: BanOrder) -> Result<BanOutcome, BanError> {
        self.inner.record(order)
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
}

impl BanSink for BanManager {
    fn exempt(&self, addr: IpAddr) -> bool {
        self.is_allowlisted(addr)
    }

    fn ban(&self, order: BanOrder) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let (addr, reason) = (order.addr, order.reason);
            let result = self.blocking(move |i| i.record(order)).await.and_then(|r| r);
            if let Err(e) = result {
                // The in-process gate holds the ban; only its persistence failed.
                tracing::error!(client = %addr, ban = reason.as_str(), error = %e, "ban not recorded");
            }
        })
    }
}

impl Inner {
    /// Records one ban order, by group commit: the order joins the queue, and whoever holds
    /// the core lock next commits every queued order in one transaction (one fsync), then
    /// answers each. Concurrent bans (a flood of forged senders) thus share their fsyncs; a
    /// lone ban commits alone, as before. Each answer is given only after its commit.
    fn record(&self, mut order: BanOrder) -> Result<BanOutcome, BanError> {
        // The evidence may quote a remote server's reply or an operator's text: no control
        // character goes into the logs or the database.
        order.evidence = crate::proto::escape(&order.evidence).into_owned();
        let net = Net::ban_key(order.addr, self.ipv6_prefix);
        if self.allowlisted(net) {
            bump(&self.stats.allowlisted);
            tracing::info!(net = %net, ban = order.reason.as_str(), evidence = %order.evidence, "allowlisted: not banned");
            // The server bans in process before it asks us; undo that.
            self.mirror(vec![MirrorOp::Unban(net.addr())]);
            return Ok(BanOutcome::Allowlisted(net));
        }
        let answer = Arc::new(Mutex::new(None));
        self.queue.lock().expect("queue lock").push(Queued { net, order, answer: answer.clone() });
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
    fn stage(&self, store: &mut BanStore, queued: &Queued, now: SystemTime) -> Result<(Ban, BanOutcome), BanError> {
        let (net, order) = (queued.net, &queued.order);
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
}
