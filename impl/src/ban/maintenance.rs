//! The ban manager's periodic maintenance: [`BanManager::tick`], run every `sync_interval` by
//! [`BanManager::run`]. One pass runs these phases, each its own function, in this order:
//!
//! 1. **sync from store**: bans added or lifted by another process (`gatekeeper bans`);
//! 2. **expire**: due bans leave the database, the kernel (xt_recent cannot expire an entry
//!    early) and the in-process gate;
//! 3. **retry**: backend operations that failed, and commits the database refused (bans in
//!    force but unsaved), every `retry_interval`;
//! 4. **refresh long bans**: bans longer than `ban_time` (escalated) get a fresh stamp before
//!    the xt rule's `--seconds` (and the in-process gate, which models it) forgets them;
//! 5. **prune history**: history older than `history_keep`, hourly;
//! 6. **reconcile the kernel**: read the kernel table back and re-apply the bans a ruleset
//!    reload or a flushed table lost, every `reconcile_interval`, once nothing awaits a retry;
//!    into a table with a capacity (xt_recent's `ip_list_tot`) no more than its free slots.
//!
//! Phases 1–5 run under the core lock and only *decide* kernel operations; the pass then
//! releases the lock and, in its turn (a ticket, so kernel batches keep their order), carries
//! them out, settles their results under the lock, and runs phase 6 the same way (the table
//! is read and re-applied without the lock). The order matters: sync leaves already expired
//! rows for the expiry phase to remove everywhere, and the kernel is reconciled only once the
//! retries have left nothing pending. The in-process gate's operations are carried out in the
//! order decided, after the lock is released. A phase that fails (the database) ends the
//! pass; the next tick starts over.
//!
//! Maintenance must not record new bans (only re-apply recorded ones) nor decide anything a
//! ban order decides; it reads time only from the [`Clock`](crate::edges::Clock), once a pass.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use super::{Ban, BanError, BanManager, Core, HistoryEvent, Inner, KernelOp, MirrorOp, Net, NetList, Pending, bump};

/// The longest wait between two scans for long bans to refresh.
const REFRESH_EVERY_MAX: Duration = Duration::from_secs(3600);

/// How often history older than `history_keep` is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

impl BanManager {
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

/// One maintenance pass under way: its times, read once at its start, and the in-process gate
/// operations its phases decided.
#[derive(Debug)]
struct Pass {
    /// Wall-clock now: ban expiry, the backend's remaining times, history.
    now: SystemTime,
    /// Monotonic now: the retry, reconcile and prune intervals.
    mono: Instant,
    /// For the in-process gate, in order, once the core lock is released.
    ops: Vec<MirrorOp>,
    /// For the kernel, in order, once the core lock is released.
    kernel: Vec<KernelOp>,
}

impl Pass {
    /// True if a periodic phase last run at `last` is due: it never ran, or `every` has passed.
    fn due(&self, last: Option<Instant>, every: Duration) -> bool {
        last.is_none_or(|l| self.mono.saturating_duration_since(l) >= every)
    }
}

impl Inner {
    fn tick(&self) {
        if let Err(e) = self.maintain() {
            tracing::error!(error = %e, "ban maintenance failed");
        }
    }

    /// The phases, in order (see the module documentation).
    fn maintain(&self) -> Result<(), BanError> {
        let mut core = self.core.lock().expect("core lock");
        // Through the step check: the bans have moved with a stepped clock before expiry.
        let now = self.wall(&mut core);
        let mut pass = Pass { now, mono: self.clock.now(), ops: Vec::new(), kernel: Vec::new() };
        // The decisions are carried out even if a later phase fails.
        let decided = self
            .sync_from_store(&mut core, &mut pass)
            .and_then(|()| self.expire(&mut core, &mut pass))
            .map(|()| {
                self.retry(&mut core, &mut pass);
                self.save_unsaved(&mut core, &pass);
                self.refresh_long_bans(&mut core, &mut pass);
            })
            .and_then(|()| self.prune_history(&mut core, &pass));
        let reconcile = decided.is_ok()
            && self.backend.kind().is_kernel()
            && pass.due(core.last_reconcile, self.cfg.reconcile_interval);
        let ticket = Inner::ticket(&mut core);
        drop(core);
        self.mirror(std::mem::take(&mut pass.ops));
        self.in_turn(ticket, || {
            let results = self.run_ops(&pass.kernel);
            let mut core = self.core.lock().expect("core lock");
            self.settle_ops(&mut core, &pass.kernel, &results, pass.now);
            // Only once the retries have left nothing pending.
            if reconcile && core.pending.is_empty() {
                core.last_reconcile = Some(pass.mono);
                drop(core);
                self.reconcile_kernel(pass.now);
            }
        });
        decided
    }

    /// Phase 1: changes by other processes (`gatekeeper bans add|remove`), if the database
    /// changed since we last looked.
    fn sync_from_store(&self, core: &mut Core, pass: &mut Pass) -> Result<(), BanError> {
        if !core.store.changed()? {
            return Ok(());
        }
        let now = pass.now;
        let rows: BTreeMap<Net, Ban> = core.store.all()?.into_iter().map(|b| (b.net, b)).collect();
        self.stats.bad_rows.store(core.store.bad_rows() as u64, std::sync::atomic::Ordering::Relaxed);
        // A ban waiting for its commit is not in the database yet: not lifted.
        let gone: Vec<Net> =
            core.active.keys().filter(|n| !rows.contains_key(n) && !core.unsaved.contains_key(n)).copied().collect();
        for net in gone {
            core.active.remove(&net);
            pass.kernel.push(KernelOp::Remove(net));
            pass.ops.push(MirrorOp::Unban(net));
            bump(&self.stats.synced);
            tracing::info!(net = %net, "ban lifted elsewhere; applied");
        }
        for (net, ban) in rows {
            if core.active.get(&net) == Some(&ban) {
                continue;
            }
            if ban.is_expired(now) {
                // The expiry phase removes it everywhere.
                core.active.insert(net, ban);
                continue;
            }
            pass.kernel.push(Inner::apply_op(&ban, now));
            pass.ops.push(MirrorOp::Ban(net, ban.remaining(now)));
            core.unsaved.remove(&net);
            bump(&self.stats.synced);
            tracing::info!(net = %net, ban = ban.reason.as_str(), evidence = %ban.evidence, "ban added elsewhere; applied");
            core.active.insert(net, ban);
        }
        Ok(())
    }

    /// Phase 2: expiry, the gatekeeper's job (xt_recent cannot expire an entry early).
    fn expire(&self, core: &mut Core, pass: &mut Pass) -> Result<(), BanError> {
        let now = pass.now;
        let due = core.active.due(now);
        for net in due {
            core.active.remove(&net);
            core.unsaved.remove(&net);
            let removed = core.store.remove_expired(net, now)?;
            if let Some(ban) = core.store.get(net)? {
                // Extended by another process meanwhile.
                core.active.insert(net, ban);
                continue;
            }
            if !self.backend.expires_itself() {
                pass.kernel.push(KernelOp::Remove(net));
            }
            core.applied.remove(&net);
            pass.ops.push(MirrorOp::Unban(net));
            if removed.is_some() {
                bump(&self.stats.expired);
                tracing::info!(net = %net, "ban expired");
            }
        }
        Ok(())
    }

    /// Phase 3: retry failed backend operations, every `retry_interval`.
    fn retry(&self, core: &mut Core, pass: &mut Pass) {
        if core.pending.is_empty() || !pass.due(core.last_retry, self.cfg.retry_interval) {
            return;
        }
        core.last_retry = Some(pass.mono);
        let pending: Vec<(Net, Pending)> = core.pending.iter().map(|(n, p)| (*n, *p)).collect();
        for (net, op) in pending {
            match (op, core.active.get(&net)) {
                (Pending::Apply, Some(ban)) => pass.kernel.push(Inner::apply_op(ban, pass.now)),
                (Pending::Remove, None) => pass.kernel.push(KernelOp::Remove(net)),
                // Overtaken by events: nothing to do.
                _ => {
                    core.pending.remove(&net);
                }
            }
        }
    }

    /// Phase 3, continued: commit again the bans the database refused, every
    /// `retry_interval`; each failure counts and is logged as an error (an alarm).
    fn save_unsaved(&self, core: &mut Core, pass: &Pass) {
        if core.unsaved.is_empty() || !pass.due(core.last_save, self.cfg.retry_interval) {
            return;
        }
        core.last_save = Some(pass.mono);
        let bans: Vec<Ban> = core.unsaved.values().filter(|b| !b.is_expired(pass.now)).cloned().collect();
        let now = pass.now;
        let written = core.store.batch(|s| {
            bans.iter()
                .map(|b| {
                    // Another process may hold a later ban of the network meanwhile.
                    match s.get(b.net)? {
                        Some(old) if old.expires >= b.expires => Ok(()),
                        _ => s.put(b, HistoryEvent::Ban, now),
                    }
                })
                .collect::<Vec<_>>()
        });
        match written {
            Ok(results) => {
                let mut failed = None;
                for (ban, r) in bans.iter().zip(results) {
                    match r {
                        Ok(()) => {
                            core.unsaved.remove(&ban.net);
                            bump(&self.stats.commit_recovered);
                        }
                        Err(e) => failed = Some(e),
                    }
                }
                core.unsaved.retain(|_, b| !b.is_expired(now));
                match failed {
                    None => tracing::warn!(saved = bans.len(), "bans that the database had refused are now saved"),
                    Some(e) => {
                        bump(&self.stats.commit_failures);
                        tracing::error!(unsaved = core.unsaved.len(), error = %e, "BANS STILL NOT SAVED");
                    }
                }
            }
            Err(e) => {
                bump(&self.stats.commit_failures);
                tracing::error!(unsaved = core.unsaved.len(), error = %e, "BANS STILL NOT SAVED: the database refuses");
            }
        }
    }

    /// Phase 6: reconcile with the kernel table, every `reconcile_interval` while nothing
    /// awaits a retry: a reloaded ruleset or a flushed table loses bans silently. Runs in the
    /// pass's kernel turn, without the core lock (taken only to compare and to settle).
    ///
    /// A full xt_recent table is another matter: the kernel evicted bans to make room, and
    /// writing them back would evict as many others, every reconcile (1,300 writes every 30 s
    /// with 1,400 bans and the default `ip_list_tot = 100`). Only the free slots are filled;
    /// the server still refuses every banned client with 554 (its own gate holds them all),
    /// and the capacity warnings say to raise `ip_list_tot`.
    fn reconcile_kernel(&self, now: SystemTime) {
        if !self.backend.may_have_lost() {
            return;
        }
        match self.backend.list() {
            Ok(Some(present)) => {
                let (missing, held_out) = {
                    let core = self.core.lock().expect("core lock");
                    // Both in network order: one walk along the two, not a lookup per ban.
                    let mut listed = present.iter().peekable();
                    let mut lost: Vec<&Ban> = core
                        .active
                        .values()
                        .filter(|b| {
                            while listed.next_if(|p| **p < b.net).is_some() {}
                            listed.peek() != Some(&&b.net) && !b.is_expired(now)
                        })
                        .collect();
                    let held_out =
                        self.backend.capacity().map_or(0, |cap| fit_free_slots(&mut lost, free_slots(&present, cap)));
                    (lost.into_iter().map(|b| Inner::apply_op(b, now)).collect::<Vec<_>>(), held_out)
                };
                if held_out > 0 {
                    tracing::debug!(
                        held_out,
                        "bans missing from the full xt_recent table not re-applied: each would evict another"
                    );
                }
                for op in &missing {
                    if let KernelOp::Apply(net, ..) = op {
                        bump(&self.stats.reapplied);
                        tracing::warn!(net = %net, "ban missing from the kernel table; re-applied");
                    }
                }
                let results = self.run_ops(&missing);
                let mut core = self.core.lock().expect("core lock");
                self.settle_ops(&mut core, &missing, &results, now);
            }
            Ok(None) => {}
            Err(e) => {
                bump(&self.stats.backend_failures);
                tracing::warn!(error = %e, "cannot read the kernel ban table back");
            }
        }
    }

    /// Phase 4: bans longer than the xt rule's `--seconds` (escalation) need a fresh stamp in
    /// time, every half `ban_time`; so do the in-process gate's (it models the same rule). A
    /// backend that expires entries itself (nft) holds the whole length already.
    ///
    /// The scan reads every active ban, so it runs every eighth of `ban_time` (at most hourly),
    /// not every pass: a stamp is then refreshed between half and five eighths of `ban_time`
    /// old, in time, and a table of a million bans is not read every second.
    fn refresh_long_bans(&self, core: &mut Core, pass: &mut Pass) {
        if !pass.due(core.last_refresh, (self.ban_time / 8).min(REFRESH_EVERY_MAX)) {
            return;
        }
        core.last_refresh = Some(pass.mono);
        let now = pass.now;
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
                pass.kernel.push(Inner::apply_op(&ban, now));
            }
            // Stamped now, so that the next pass does not pick it again before it settles.
            core.applied.insert(ban.net, now);
            pass.ops.push(MirrorOp::Ban(ban.net, ban.remaining(now)));
        }
    }

    /// Phase 5: drop history older than `history_keep`, hourly.
    fn prune_history(&self, core: &mut Core, pass: &Pass) -> Result<(), BanError> {
        if !pass.due(core.last_prune, PRUNE_EVERY) {
            return Ok(());
        }
        core.last_prune = Some(pass.mono);
        if let Some(before) = pass.now.checked_sub(self.cfg.history_keep) {
            core.store.prune_history(before)?;
        }
        Ok(())
    }
}

/// The free slots of each family's table (IPv4, IPv6) of `capacity` entries, given what the
/// kernel lists (ours or not).
fn free_slots(present: &NetList, capacity: usize) -> [usize; 2] {
    let v4 = present.iter().filter(|n| n.addr().is_ipv4()).count();
    [capacity.saturating_sub(v4), capacity.saturating_sub(present.len() - v4)]
}

/// Keeps in `lost` (in network order) only as many bans per address family as `free` slots
/// (IPv4, IPv6): those that run longest. Returns how many it held out. The reconcile and the
/// restore at start use it.
pub(super) fn fit_free_slots(lost: &mut Vec<&Ban>, free: [usize; 2]) -> usize {
    let before = lost.len();
    let (mut ipv4, mut ipv6): (Vec<&Ban>, Vec<&Ban>) = lost.drain(..).partition(|b| b.net.addr().is_ipv4());
    for (family, slots) in [(&mut ipv4, free[0]), (&mut ipv6, free[1])] {
        if family.len() > slots {
            if slots > 0 {
                family.select_nth_unstable_by_key(slots - 1, |b| std::cmp::Reverse(b.expires));
            }
            family.truncate(slots);
            family.sort_unstable_by_key(|b| b.net);
        }
    }
    lost.extend(ipv4.into_iter().chain(ipv6));
    before - lost.len()
}
