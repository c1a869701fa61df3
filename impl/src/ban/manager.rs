//! The ban manager's API ([`BanManager`]): open it, ban, unban, list and query, restore the
//! stored bans on start; and the group commit behind every ban (`Inner::record`): the order is
//! durable in SQLite before it is answered, then it goes to the backend and the in-process gate
//! (without the core lock). Here too: the cap on active bans and the widening of many IPv6
//! bans into one /48, and what happens to an order the database refuses.
//!
//! It must not decide whether to ban (the rules did, or an administrator) nor run the periodic
//! work (that is `maintenance.rs`); it never names the server (the gate is a [`BanMirror`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::SystemTime;

use super::config::WIDE_V6_PREFIX;
use super::maintenance::fit_free_slots;
use super::store::{from_ms, parse_reason, to_ms};
use super::{
    Ban, BanBackend, BanConfig, BanError, BanMirror, BanOutcome, BanStats, BanStore, Core, HistoryEvent, HistoryRow,
    Inner, KernelOp, MirrorOp, Net, OutboxRow, Queued, RestoreReport, STATE_DB, StoreError, build_backend, bump,
};
use crate::edges::{BanOrder, BanSink, BoxFuture, Clock, SharedBan};
use crate::gate::GateConfig;
use crate::policy::BanReason;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// The bans and the backend at one moment ([`BanManager::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BanState {
    /// Bans in force as this process knows them: IPv4, IPv6.
    pub active: [usize; 2],
    /// Backend operations waiting for a retry.
    pub pending: usize,
    /// Bans in force whose database commit failed, waiting for a retry.
    pub unsaved: usize,
    /// A kernel backend: the bans written to its tables (IPv4, IPv6). None: no kernel.
    pub applied: Option<[usize; 2]>,
    /// Entries one kernel table holds before it evicts (xt_recent's `ip_list_tot`), if known.
    pub capacity: Option<usize>,
}

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
        // A damaged database must not keep port 25 down: moved aside, started afresh.
        let (store, _aside) = crate::dbfile::open_or_move_aside(
            &state_dir.join(STATE_DB),
            clock.wall(),
            "ban database",
            BanStore::open,
            BanStore::is_damage,
        )?;
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
                widen: cfg.widens(gate.ipv6_prefix) && backend.holds_prefixes(),
                clock,
                backend,
                core: Mutex::new(Core {
                    store,
                    active: super::ledger::Ledger::default(),
                    pending: BTreeMap::new(),
                    applied: BTreeMap::new(),
                    unsaved: BTreeMap::new(),
                    next_ticket: 0,
                    backend_down: false,
                    last_retry: None,
                    last_save: None,
                    last_reconcile: None,
                    last_prune: None,
                    last_refresh: None,
                    last_read: None,
                }),
                queue: Mutex::new(Vec::new()),
                turn: Mutex::new(0),
                turn_cv: Condvar::new(),
                mirror: Mutex::new(None),
                outbox_ready: tokio::sync::Notify::new(),
                clustered: std::sync::atomic::AtomicBool::new(false),
                stats: BanStats::default(),
                // 0.1 ms .. 3.3 s.
                commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            }),
            offload,
        }
    }

    /// Records this node's decisions (bans, extensions, liftings) in the cluster outbox from
    /// now on, for the cluster sync to publish (`crate::cluster`). Bans applied from the
    /// cluster ([`BanManager::apply_shared`]) never go there.
    pub fn enable_cluster(&self) {
        self.inner.clustered.store(true, Ordering::Relaxed);
        self.inner.core.lock().expect("core lock").store.set_outbox(true);
    }

    /// Completes when a decision may have entered the outbox since the last call.
    pub async fn outbox_ready(&self) {
        self.inner.outbox_ready.notified().await;
    }

    /// The oldest `limit` outbox rows.
    pub async fn outbox(&self, limit: usize) -> Result<Vec<OutboxRow>, BanError> {
        self.blocking(move |i| Ok(i.core.lock().expect("core lock").store.outbox(limit)?)).await?
    }

    /// Drops the outbox rows up to `id` (published).
    pub async fn outbox_done(&self, id: i64) -> Result<(), BanError> {
        self.blocking(move |i| Ok(i.core.lock().expect("core lock").store.outbox_done(id).map(|_| ())?)).await?
    }

    /// How many rows wait in the outbox.
    pub async fn outbox_len(&self) -> Result<u64, BanError> {
        self.blocking(|i| Ok(i.core.lock().expect("core lock").store.outbox_len()?)).await?
    }

    /// [`BanManager::outbox_len`] for synchronous callers.
    pub fn outbox_len_blocking(&self) -> Result<u64, BanError> {
        Ok(self.inner.core.lock().expect("core lock").store.outbox_len()?)
    }

    /// A value the cluster sync keeps in the database (its cursor).
    pub async fn cluster_value(&self, key: &'static str) -> Result<Option<String>, BanError> {
        self.blocking(move |i| Ok(i.core.lock().expect("core lock").store.cluster_value(key)?)).await?
    }

    /// Sets a value the cluster sync keeps in the database.
    pub async fn set_cluster_value(&self, key: &'static str, value: String) -> Result<(), BanError> {
        self.blocking(move |i| Ok(i.core.lock().expect("core lock").store.set_cluster_value(key, &value)?)).await?
    }

    /// Applies other nodes' decisions: a ban that is longer than this node's ban of the
    /// network (or the only one) is recorded (without an outbox row: it is never published
    /// again), pushed to the backend and the in-process gate; a lifting lifts this node's ban
    /// if that was decided before it. Expired entries, allowlisted networks and networks that
    /// do not parse are left alone. All in one transaction: nothing is applied if it fails.
    /// Returns how many entries changed something.
    pub async fn apply_shared(&self, entries: Vec<SharedBan>) -> Result<usize, BanError> {
        self.blocking(move |i| i.apply_shared(entries)).await?
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

    /// The ban key for a CLI argument: an address, or a network that is exactly a ban key (or,
    /// when IPv6 bans are widened, an IPv6 /48).
    pub fn key_of(&self, net: Net) -> Result<Net, BanError> {
        if net.is_host() {
            return Ok(self.key(net.addr()));
        }
        let key = self.key(net.addr());
        if key == net || self.inner.is_wide(net) { Ok(net) } else { Err(BanError::BadNet(net, self.inner.ipv6_prefix)) }
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
    /// server's next expiry pass), ordered by network. Bad rows are skipped (and logged).
    pub fn list_blocking(&self) -> Result<Vec<Ban>, BanError> {
        Ok(self.inner.core.lock().expect("core lock").store.all()?)
    }

    /// Bans in force whose commit failed, waiting for a retry (an alarm when not zero).
    pub fn unsaved_len(&self) -> usize {
        self.inner.core.lock().expect("core lock").unsaved.len()
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

    /// Bans in force at `now` (counted in place: no copy of the table).
    pub fn in_force(&self, now: SystemTime) -> usize {
        self.inner.core.lock().expect("core lock").active.values().filter(|b| !b.is_expired(now)).count()
    }

    /// Backend operations waiting for a retry.
    pub fn pending_len(&self) -> usize {
        self.inner.core.lock().expect("core lock").pending.len()
    }

    /// How long ban orders took, request to answer (`gatekeeper_ban_commit_duration_seconds`).
    pub fn commit_seconds(&self) -> &Histogram {
        &self.inner.commit_seconds
    }

    /// The bans and the backend now, for the metrics endpoint.
    pub fn state(&self) -> BanState {
        let core = self.inner.core.lock().expect("core lock");
        let v4 = |nets: &mut dyn Iterator<Item = &Net>| {
            let (mut a, mut b) = (0, 0);
            for n in nets {
                if n.addr().is_ipv4() { a += 1 } else { b += 1 }
            }
            [a, b]
        };
        let kernel = self.inner.backend.capacity().is_some() || self.inner.cfg.backend.is_kernel();
        BanState {
            active: v4(&mut core.active.keys()),
            pending: core.pending.len(),
            unsaved: core.unsaved.len(),
            applied: kernel.then(|| v4(&mut core.applied.keys())),
            capacity: self.inner.backend.capacity(),
        }
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
            let wait = self.inner.cfg.order_timeout;
            let start = self.inner.clock.now();
            let timed = tokio::time::timeout(wait, self.blocking(move |i| i.record(order))).await;
            let took = self.inner.clock.now().saturating_duration_since(start);
            self.inner.commit_seconds.observe(took.as_secs_f64());
            let result = match timed {
                Ok(result) => result.and_then(|r| r),
                Err(_) => {
                    // The order goes on in the background; the in-process gate holds the ban.
                    bump(&self.inner.stats.order_timeouts);
                    tracing::error!(client = %addr, ban = reason.as_str(), timeout = ?wait,
                        "ban order still not recorded; the reply goes on, the order completes in the background");
                    return;
                }
            };
            match result {
                // Logged (and retried) where it happened.
                Err(BanError::Unsaved { .. }) => {}
                Err(e) => tracing::error!(client = %addr, ban = reason.as_str(), error = %e, "ban not recorded"),
                Ok(_) => {}
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
            self.mirror(vec![MirrorOp::Unban(net)]);
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
        let (now, mirror, kernel) = self.commit_orders(&mut core, orders);
        let ticket = (!kernel.is_empty()).then(|| Inner::ticket(&mut core));
        drop(core);
        self.mirror(mirror);
        if let Some(ticket) = ticket {
            // The group goes to the kernel together (nft: one `nft -f` for all), without the
            // core lock: other sessions' bans commit meanwhile.
            self.kernel(ticket, &kernel, now);
        }
        self.wake_outbox();
        answer.lock().expect("answer lock").take().expect("a queued order is answered by its commit")
    }

    /// Tells the cluster sync that the outbox may have grown.
    fn wake_outbox(&self) {
        if self.clustered.load(Ordering::Relaxed) {
            self.outbox_ready.notify_one();
        }
    }

    /// See [`BanManager::apply_shared`].
    fn apply_shared(&self, entries: Vec<SharedBan>) -> Result<usize, BanError> {
        /// One entry's effect, decided in the transaction, carried out after it.
        enum Effect {
            Ban(Ban),
            Lift(Net),
        }
        let mut core = self.core.lock().expect("core lock");
        let now = self.wall(&mut core);
        let now_ms = to_ms(now);
        let Core { store, active, .. } = &mut *core;
        // Room for automatic bans, as `commit_orders` counts it: a whole table from the
        // cluster must not carry the node past `max_active` either.
        let mut room = self.cfg.max_active.saturating_sub(active.len());
        let effects = store.batch(|s| -> Result<Vec<Effect>, StoreError> {
            let mut out: Vec<Effect> = Vec::new();
            // What this batch has done to each network so far (a ban, or `None`: lifted).
            let mut changed: HashMap<Net, Option<Ban>> = HashMap::new();
            for e in &entries {
                let Ok(net) = e.net.parse::<Net>() else {
                    tracing::warn!(net = %crate::proto::escape(&e.net), node = %crate::proto::escape(&e.node),
                        "cluster: an entry for a network that does not parse; ignored");
                    continue;
                };
                // An earlier entry of this batch may have changed the network already.
                let local = match changed.get(&net) {
                    Some(now_local) => now_local.clone(),
                    None => active.get(&net).filter(|b| !b.is_expired(now)).cloned(),
                };
                if e.lifted {
                    let Some(local) = local else { continue };
                    if to_ms(local.start) > e.at_ms {
                        // Banned again after that lifting: the ban stands.
                        continue;
                    }
                    s.remove_synced(net, HistoryEvent::Remove, now)?;
                    changed.insert(net, None);
                    out.push(Effect::Lift(net));
                } else {
                    if e.is_expired(now_ms) || self.allowlisted(net) {
                        continue;
                    }
                    if local.as_ref().is_some_and(|l| to_ms(l.expires) >= e.expires_ms) {
                        continue;
                    }
                    let reason = parse_reason(&e.reason).unwrap_or(BanReason::Manual);
                    if local.is_none() && reason != BanReason::Manual {
                        if room == 0 {
                            continue;
                        }
                        room -= 1;
                    }
                    let ban = Ban {
                        net,
                        reason,
                        session: e.session,
                        evidence: crate::proto::escape(&e.evidence).into_owned(),
                        start: from_ms(e.at_ms),
                        expires: from_ms(e.expires_ms),
                        offence: e.offence.max(1),
                    };
                    let event = if local.is_some() { HistoryEvent::Extend } else { HistoryEvent::Ban };
                    s.put_synced(&ban, event, now)?;
                    changed.insert(net, Some(ban.clone()));
                    out.push(Effect::Ban(ban));
                }
            }
            Ok(out)
        })??;
        let (mut mirror, mut kernel) = (Vec::new(), Vec::new());
        for fx in &effects {
            bump(&self.stats.cluster_applied);
            match fx {
                Effect::Ban(ban) => {
                    tracing::info!(net = %ban.net, ban = ban.reason.as_str(), evidence = %ban.evidence,
                        secs = ban.remaining(now).as_secs(), "ban from the cluster applied");
                    kernel.push(Inner::apply_op(ban, now));
                    mirror.push(MirrorOp::Ban(ban.net, ban.remaining(now)));
                    core.unsaved.remove(&ban.net);
                    core.active.insert(ban.net, ban.clone());
                }
                Effect::Lift(net) => {
                    tracing::info!(net = %net, "ban lifted in the cluster; applied");
                    core.active.remove(net);
                    core.unsaved.remove(net);
                    kernel.push(KernelOp::Remove(*net));
                    mirror.push(MirrorOp::Unban(*net));
                }
            }
        }
        let ticket = (!kernel.is_empty()).then(|| Inner::ticket(&mut core));
        drop(core);
        self.mirror(mirror);
        if let Some(ticket) = ticket {
            self.kernel(ticket, &kernel, now);
        }
        Ok(effects.len())
    }

    /// Commits `orders` in one transaction and answers each; an order the database refused is
    /// enforced anyway and kept for a retry. Returns the time used and the in-process gate and
    /// kernel operations to carry out once the lock is released.
    fn commit_orders(&self, core: &mut Core, orders: Vec<Queued>) -> (SystemTime, Vec<MirrorOp>, Vec<KernelOp>) {
        let now = self.wall(core);
        bump(&self.stats.commits);
        // New automatic bans this group may still add.
        let mut room = self.cfg.max_active.saturating_sub(core.active.len());
        let results =
            match core.store.batch(|store| orders.iter().map(|o| self.stage(store, o, now, &mut room)).collect()) {
                Ok(results) => results,
                Err(e) => {
                    // Nothing of the group was kept: the room its staging took is free again.
                    room = self.cfg.max_active.saturating_sub(core.active.len());
                    tracing::error!(orders = orders.len(), error = %e, "commit of bans failed");
                    orders.iter().map(|_| Err(StoreError::GroupCommit(e.to_string()).into())).collect::<Vec<_>>()
                }
            };
        let (mut mirror, mut kernel) = (Vec::new(), BTreeMap::new());
        let mut touched = BTreeSet::new();
        for (order, result) in orders.into_iter().zip(results) {
            let result = match result {
                Ok((Some(ban), outcome)) => {
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
                    core.unsaved.remove(&ban.net);
                    touched.insert(ban.net);
                    kernel.insert(ban.net, Inner::apply_op(&ban, now));
                    if ban.net != order.net && !self.mirror_holds_prefixes() {
                        // Inside a widened /48 the gate cannot hold: its own key, then.
                        mirror.push(MirrorOp::Ban(order.net, ban.remaining(now)));
                    }
                    mirror.push(MirrorOp::Ban(ban.net, ban.remaining(now)));
                    core.active.insert(ban.net, ban);
                    Ok(outcome)
                }
                Ok((None, outcome)) => {
                    if let BanOutcome::Refused(net) = outcome {
                        self.refused(net, &order.order);
                        // The server banned in process before it asked us; undo that.
                        mirror.push(MirrorOp::Unban(net));
                    }
                    Ok(outcome)
                }
                Err(e) => self.unsaved(core, &order, e, now, &mut room, &mut mirror, &mut kernel),
            };
            // Answered once committed: the kernel is best effort from here (failures retry).
            *order.answer.lock().expect("answer lock") = Some(result);
        }
        let mut kernel: Vec<KernelOp> = kernel.into_values().collect();
        if self.widen {
            let wide: BTreeSet<Net> = touched
                .into_iter()
                .filter(|n| n.addr().is_ipv6() && n.prefix() > WIDE_V6_PREFIX)
                .map(|n| Net::new(n.addr(), WIDE_V6_PREFIX))
                .collect();
            for w in wide {
                self.maybe_widen(core, w, now, &mut mirror, &mut kernel);
            }
        }
        self.warn_capacity(core);
        (now, mirror, kernel)
    }

    /// Logs a refusal for a full table: the first, then every thousandth (it is an alarm, not
    /// a flood of its own).
    fn refused(&self, net: Net, order: &BanOrder) {
        let n = self.stats.refused_full.fetch_add(1, Ordering::Relaxed) + 1;
        if n % 1000 == 1 {
            tracing::error!(
                net = %net,
                ban = order.reason.as_str(),
                max_active = self.cfg.max_active,
                refused_so_far = n,
                "BAN TABLE FULL: new automatic bans are refused (no older ban is evicted); raise bans.max_active \
                 or look at who is being banned"
            );
        }
    }

    /// An order the database refused: enforced anyway (kernel, in-process gate), kept in
    /// `unsaved` for the maintenance pass to commit, answered [`BanError::Unsaved`] (or with
    /// the ban in force that already covers it, or refused if the table is full).
    #[allow(clippy::too_many_arguments)]
    fn unsaved(
        &self,
        core: &mut Core,
        queued: &Queued,
        error: BanError,
        now: SystemTime,
        room: &mut usize,
        mirror: &mut Vec<MirrorOp>,
        kernel: &mut BTreeMap<Net, KernelOp>,
    ) -> Result<BanOutcome, BanError> {
        bump(&self.stats.commit_failures);
        let order = &queued.order;
        let mut net = queued.net;
        if self.widen && net.addr().is_ipv6() {
            let wide = Net::new(net.addr(), WIDE_V6_PREFIX);
            if core.active.get(&wide).is_some_and(|b| !b.is_expired(now)) {
                net = wide;
            }
        }
        let at = order.at.unwrap_or(now);
        let expires = at + order.duration.unwrap_or(self.ban_time);
        let existing = core.active.get(&net).filter(|b| !b.is_expired(now)).cloned();
        if let Some(old) = &existing
            && old.expires >= expires
        {
            // A ban in force covers it already (saved or waiting for its retry).
            return Ok(BanOutcome::Extended(old.clone()));
        }
        if existing.is_none() && order.reason != BanReason::Manual {
            if *room == 0 {
                self.refused(net, order);
                mirror.push(MirrorOp::Unban(net));
                return Ok(BanOutcome::Refused(net));
            }
            *room -= 1;
        }
        let ban = Ban {
            net,
            reason: order.reason,
            session: order.session,
            evidence: order.evidence.clone(),
            start: at,
            expires,
            offence: existing.map_or(1, |b| b.offence),
        };
        tracing::error!(
            net = %net,
            ban = ban.reason.as_str(),
            evidence = %ban.evidence,
            error = %error,
            "BAN NOT SAVED: the database refused it; in force now, committed again every retry_interval"
        );
        kernel.insert(net, Inner::apply_op(&ban, now));
        mirror.push(MirrorOp::Ban(net, ban.remaining(now)));
        core.unsaved.insert(net, ban.clone());
        core.active.insert(net, ban);
        Err(BanError::Unsaved { net, error: error.to_string() })
    }

    /// True if `net` is a /48 this manager bans in place of the IPv6 bans inside it.
    pub(super) fn is_wide(&self, net: Net) -> bool {
        self.widen && net.addr().is_ipv6() && net.prefix() == WIDE_V6_PREFIX
    }

    /// If `widen_v6_after` or more bans in force lie inside `wide`, replaces them by one ban of
    /// `wide` (committed in one transaction): its expiry the latest of theirs. Not if `wide`
    /// overlaps the allowlist. A failure leaves the narrow bans as they are (the next ban in
    /// `wide` tries again).
    fn maybe_widen(
        &self,
        core: &mut Core,
        wide: Net,
        now: SystemTime,
        mirror: &mut Vec<MirrorOp>,
        kernel: &mut Vec<KernelOp>,
    ) {
        let range = Net::new(wide.addr(), WIDE_V6_PREFIX)..=Net::new(wide.last(), 128);
        let narrow: Vec<Ban> = core
            .active
            .range(range)
            .map(|(_, b)| b)
            .filter(|b| b.net.prefix() > WIDE_V6_PREFIX && !b.is_expired(now))
            .cloned()
            .collect();
        if narrow.len() < self.cfg.widen_v6_after || self.allowlisted(wide) {
            return;
        }
        let Some(last) = narrow.iter().max_by_key(|b| (b.start, b.net)) else {
            return;
        };
        let ban = Ban {
            net: wide,
            reason: last.reason,
            session: last.session,
            evidence: format!("widened: {} bans inside {wide} (last: {})", narrow.len(), last.evidence),
            start: now,
            expires: narrow.iter().map(|b| b.expires).max().unwrap_or(now),
            offence: narrow.iter().map(|b| b.offence).max().unwrap_or(1),
        };
        let written = core.store.batch(|s| {
            for b in &narrow {
                s.remove(b.net, HistoryEvent::Widen, now)?;
            }
            s.put(&ban, HistoryEvent::Ban, now)
        });
        if let Err(e) = written.and_then(|r| r) {
            bump(&self.stats.commit_failures);
            tracing::error!(net = %wide, error = %e, "widening to /48 not saved; the narrow bans stay");
            return;
        }
        bump(&self.stats.widened);
        tracing::warn!(net = %wide, replaced = narrow.len(), secs = ban.total().as_secs(), evidence = %ban.evidence,
            "many IPv6 bans in one /48: widened to the /48");
        // A gate that cannot hold the /48 keeps the narrow bans until they run out.
        let gate_widens = self.mirror_holds_prefixes();
        for b in &narrow {
            core.active.remove(&b.net);
            core.unsaved.remove(&b.net);
            kernel.retain(|op| !matches!(op, KernelOp::Apply(n, ..) if *n == b.net));
            kernel.push(KernelOp::Remove(b.net));
            if gate_widens {
                mirror.push(MirrorOp::Unban(b.net));
            }
        }
        kernel.push(Inner::apply_op(&ban, now));
        mirror.push(MirrorOp::Ban(wide, ban.remaining(now)));
        core.active.insert(wide, ban);
    }

    /// The database part of one order, inside the group's transaction: the ban as it now
    /// stands and what happened to it, or no ban if the table is full (`room` new automatic
    /// bans may still go in).
    fn stage(
        &self,
        store: &mut BanStore,
        queued: &Queued,
        now: SystemTime,
        room: &mut usize,
    ) -> Result<(Option<Ban>, BanOutcome), BanError> {
        let (mut net, order) = (queued.net, &queued.order);
        if self.widen && net.addr().is_ipv6() {
            // Inside a widened /48: the order extends that ban.
            let wide = Net::new(net.addr(), WIDE_V6_PREFIX);
            if store.get(wide)?.is_some_and(|b| !b.is_expired(now)) {
                net = wide;
            }
        }
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
        if existing.is_none() && order.reason != BanReason::Manual {
            if *room == 0 {
                return Ok((None, BanOutcome::Refused(net)));
            }
            *room -= 1;
        }
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
            Some(old) if old.expires >= candidate.expires => (Some(old.clone()), BanOutcome::Extended(old)),
            Some(_) => {
                store.put(&candidate, HistoryEvent::Extend, now)?;
                (Some(candidate.clone()), BanOutcome::Extended(candidate))
            }
            None => {
                store.put(&candidate, HistoryEvent::Ban, now)?;
                (Some(candidate.clone()), BanOutcome::Banned(candidate))
            }
        })
    }

    fn lift(&self, net: Net, event: HistoryEvent) -> Result<Option<Ban>, BanError> {
        let mut core = self.core.lock().expect("core lock");
        let now = self.wall(&mut core);
        let old = core.store.remove(net, event, now)?;
        core.active.remove(&net);
        let unsaved = core.unsaved.remove(&net);
        let ticket = Inner::ticket(&mut core);
        drop(core);
        let old = old.or(unsaved);
        if old.is_some() {
            bump(&self.stats.removed);
            tracing::info!(net = %net, "ban lifted");
        }
        self.mirror(vec![MirrorOp::Unban(net)]);
        self.kernel(ticket, &[KernelOp::Remove(net)], now);
        self.wake_outbox();
        Ok(old)
    }

    fn restore(&self) -> Result<RestoreReport, BanError> {
        let mut core = self.core.lock().expect("core lock");
        let now = self.wall(&mut core);
        core.store.changed()?;
        let mut report = RestoreReport::default();
        let mut kernel = Vec::new();
        let mut ops = Vec::new();
        let bans = core.store.all()?;
        self.stats.bad_rows.store(core.store.bad_rows() as u64, Ordering::Relaxed);
        let mut restored = Vec::new();
        for mut ban in bans {
            let key = Net::ban_key(ban.net.addr(), self.ipv6_prefix);
            if key != ban.net && !self.is_wide(ban.net) {
                // The IPv6 prefix changed since the ban was recorded: re-key it.
                core.store.remove(ban.net, HistoryEvent::Remove, now)?;
                ban.net = key;
                core.store.put(&ban, HistoryEvent::Ban, now)?;
            }
            if ban.is_expired(now) {
                core.store.remove(ban.net, HistoryEvent::Expire, now)?;
                if !self.backend.expires_itself() {
                    kernel.push(KernelOp::Remove(ban.net));
                }
                bump(&self.stats.expired);
                report.expired += 1;
                continue;
            }
            restored.push(ban.net);
            ops.push(MirrorOp::Ban(ban.net, ban.remaining(now)));
            core.active.insert(ban.net, ban);
            report.restored += 1;
        }
        let mut fit: Vec<&Ban> = restored.iter().filter_map(|net| core.active.get(net)).collect();
        // Into a table with a capacity, no more bans per family than it holds: each write
        // beyond would evict one written before. The longest-running go in.
        if let Some(cap) = self.backend.capacity() {
            report.held_out = fit_free_slots(&mut fit, [cap, cap]);
        }
        kernel.extend(fit.into_iter().map(|b| Inner::apply_op(b, now)));
        self.warn_capacity(&core);
        let ticket = Inner::ticket(&mut core);
        drop(core);
        self.mirror(ops);
        let results = self.kernel(ticket, &kernel, now);
        report.failed =
            kernel.iter().zip(&results).filter(|(op, r)| matches!(op, KernelOp::Apply(..)) && r.is_err()).count();
        tracing::info!(
            restored = report.restored,
            expired = report.expired,
            failed = report.failed,
            held_out = report.held_out,
            backend = self.backend.kind().as_str(),
            "bans restored"
        );
        Ok(report)
    }
}
