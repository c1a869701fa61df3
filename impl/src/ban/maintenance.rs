//! The ban manager's periodic maintenance: [`BanManager::tick`], run every `sync_interval` by
//! [`BanManager::run`]. One pass holds the core lock and runs these phases, each its own
//! function, in this order:
//!
//! 1. **sync from store**: bans added or lifted by another process (`gatekeeper bans`);
//! 2. **expire**: due bans leave the database, the kernel (xt_recent cannot expire an entry
//!    early) and the in-process gate;
//! 3. **retry**: backend operations that failed, every `retry_interval`;
//! 4. **reconcile the kernel**: read the kernel table back and re-apply the bans a ruleset
//!    reload or a flushed table lost, every `reconcile_interval`, once nothing awaits a retry;
//! 5. **refresh long bans**: bans longer than `ban_time` (escalated) get a fresh stamp before
//!    the xt rule's `--seconds` (and the in-process gate, which models it) forgets them;
//! 6. **prune history**: history older than `history_keep`, hourly.
//!
//! The order matters: sync leaves already expired rows for the expiry phase to remove
//! everywhere, and the kernel is reconciled only once the retry phase has left nothing pending.
//! The in-process gate's operations the phases decide are carried out in the order decided,
//! after the lock is released. A phase that fails (the database) ends the pass; the next tick
//! starts over.
//!
//! Maintenance must not record new bans (only re-apply recorded ones) nor decide anything a
//! ban order decides; it reads time only from the [`Clock`](crate::edges::Clock), once a pass.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use super::{Ban, BanError, BanManager, Core, Inner, MirrorOp, Net, Pending, bump};

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
        let mut pass = Pass { now: self.clock.wall(), mono: self.clock.now(), ops: Vec::new() };
        let mut core = self.core.lock().expect("core lock");
        self.sync_from_store(&mut core, &mut pass)?;
        self.expire(&mut core, &mut pass)?;
        self.retry(&mut core, &pass);
        self.reconcile_kernel(&mut core, &pass);
        self.refresh_long_bans(&mut core, &mut pass);
        self.prune_history(&mut core, &pass)?;
        drop(core);
        self.mirror(pass.ops);
        Ok(())
    }

    /// Phase 1: changes by other processes (`gatekeeper bans add|remove`), if the database
    /// changed since we last looked.
    fn sync_from_store(&self, core: &mut Core, pass: &mut Pass) -> Result<(), BanError> {
        if !core.store.changed()? {
            return Ok(());
        }
        let now = pass.now;
        let rows: BTreeMap<Net, Ban> = core.store.all()?.into_iter().map(|b| (b.net, b)).collect();
        let gone: Vec<Net> = core.active.keys().filter(|n| !rows.contains_key(n)).copied().collect();
        for net in gone {
            core.active.remove(&net);
            self.remove_from_backend(core, net);
            pass.ops.push(MirrorOp::Unban(net.addr()));
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
            self.apply(core, &ban, now);
            pass.ops.push(MirrorOp::Ban(net.addr(), ban.remaining(now)));
            bump(&self.stats.synced);
            tracing::info!(net = %net, ban = ban.reason.as_str(), evidence = %ban.evidence, "ban added elsewhere; applied");
            core.active.insert(net, ban);
        }
        Ok(())
    }

    /// Phase 2: expiry, the gatekeeper's job (xt_recent cannot expire an entry early).
    fn expire(&self, core: &mut Core, pass: &mut Pass) -> Result<(), BanError> {
        let now = pass.now;
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
                self.remove_from_backend(core, net);
            }
            core.applied.remove(&net);
            pass.ops.push(MirrorOp::Unban(net.addr()));
            if removed.is_some() {
                bump(&self.stats.expired);
                tracing::info!(net = %net, "ban expired");
            }
        }
        Ok(())
    }

    /// Phase 3: retry failed backend operations, every `retry_interval`.
    fn retry(&self, core: &mut Core, pass: &Pass) {
        if core.pending.is_empty() || !pass.due(core.last_retry, self.cfg.retry_interval) {
            return;
        }
        core.last_retry = Some(pass.mono);
        let pending: Vec<(Net, Pending)> = core.pending.iter().map(|(n, p)| (*n, *p)).collect();
        for (net, op) in pending {
            match (op, core.active.get(&net).cloned()) {
                (Pending::Apply, Some(ban)) => self.apply(core, &ban, pass.now),
                (Pending::Remove, None) => self.remove_from_backend(core, net),
                // Overtaken by events: nothing to do.
                _ => {
                    core.pending.remove(&net);
                }
            }
        }
    }

    /// Phase 4: reconcile with the kernel table, every `reconcile_interval` while nothing
    /// awaits a retry: a reloaded ruleset or a flushed table loses bans silently.
    fn reconcile_kernel(&self, core: &mut Core, pass: &Pass) {
        if !self.backend.kind().is_kernel()
            || !core.pending.is_empty()
            || !pass.due(core.last_reconcile, self.cfg.reconcile_interval)
        {
            return;
        }
        core.last_reconcile = Some(pass.mono);
        match self.backend.list() {
            Ok(Some(present)) => {
                let missing: Vec<Ban> = core.active.values().filter(|b| !present.contains(&b.net)).cloned().collect();
                for ban in missing {
                    bump(&self.stats.reapplied);
                    tracing::warn!(net = %ban.net, "ban missing from the kernel table; re-applied");
                    self.apply(core, &ban, pass.now);
                }
            }
            Ok(None) => {}
            Err(e) => {
                bump(&self.stats.backend_failures);
                tracing::warn!(error = %e, "cannot read the kernel ban table back");
            }
        }
    }

    /// Phase 5: bans longer than the xt rule's `--seconds` (escalation) need a fresh stamp in
    /// time, every half `ban_time`; so do the in-process gate's (it models the same rule). A
    /// backend that expires entries itself (nft) holds the whole length already.
    fn refresh_long_bans(&self, core: &mut Core, pass: &mut Pass) {
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
                self.apply(core, &ban, now);
            } else {
                core.applied.insert(ban.net, now);
            }
            pass.ops.push(MirrorOp::Ban(ban.net.addr(), ban.remaining(now)));
        }
    }

    /// Phase 6: drop history older than `history_keep`, hourly.
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
