//! [`ClusterSync`]: the two loops that keep one node's bans and the cluster's together.
//!
//! - The **publisher** publishes the outbox in order (woken at once by a ban decided here,
//!   else every `sync_interval`), beats every `heartbeat_interval` (and reads the store's
//!   epoch), and reconciles the whole table on start, after an outage, when the epoch changes
//!   and every `reconcile_interval`.
//! - The **follower** reads the shared log after its cursor (a blocking read of up to
//!   `sync_interval`), applies the other nodes' entries through the ban manager, and stores the
//!   cursor in the node's database after each batch: a node killed with -9 resumes where it
//!   was (and its start reconcile covers what the log no longer holds).
//!
//! - With shared counters ([`ClusterSync::with_counts`]), the **counters** loops publish each
//!   ended session's B4 delta and add the other nodes' deltas to this node's record, so that a
//!   dictionary attacker spreading its RCPTs over the MX hosts is counted once. They are best
//!   effort: a delta the store does not take is counted here only.
//!
//! A store call that fails leaves the node alone (a warning when it starts, an info when the
//! store is back); nothing here ever holds up a session.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::ClusterSection;
use crate::ban::store::to_ms;
use crate::ban::{Ban, BanManager, OutboxRow};
use crate::edges::cluster::wins;
use crate::edges::{Clock, ClusterError, ClusterStore, CountDelta, NodeBeat, SharedBan};

/// Applies another node's B4 delta to this node's record (the server's tallies).
pub type ApplyCounts = Arc<dyn Fn(&CountDelta) + Send + Sync>;

/// The local side of the shared counters: deltas of this node's sessions, and where the
/// other nodes' go.
struct Counts {
    local: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<CountDelta>>,
    apply: ApplyCounts,
}

impl std::fmt::Debug for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counts").finish_non_exhaustive()
    }
}

/// Where the follower's cursor is kept (`cluster_state`).
const CURSOR_KEY: &str = "log_cursor";
/// Outbox rows published per round, log entries applied per batch.
const BATCH: usize = 256;

/// The shared form of a ban this node holds.
pub fn shared_ban(ban: &Ban, node: &str) -> SharedBan {
    SharedBan {
        net: ban.net.to_string(),
        lifted: false,
        at_ms: to_ms(ban.start),
        expires_ms: to_ms(ban.expires),
        reason: ban.reason.as_str().to_string(),
        session: ban.session,
        evidence: ban.evidence.clone(),
        offence: ban.offence,
        node: node.to_string(),
    }
}

/// The shared form of an outbox row: a ban, or a tombstone kept as long as the ban it lifted.
fn outbox_entry(row: &OutboxRow, node: &str) -> SharedBan {
    let mut e = shared_ban(&row.ban, node);
    if row.lifted {
        e.lifted = true;
        e.at_ms = to_ms(row.at);
        e.expires_ms = e.expires_ms.max(e.at_ms);
    }
    e
}

/// Counters and state of the sync, for `gatekeeper cluster status` and the metrics.
#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Entries of this node that won in the table (bans, extensions, liftings).
    pub published: AtomicU64,
    /// Other nodes' entries read from the log.
    pub received: AtomicU64,
    /// Whole-table reconciles done.
    pub reconciles: AtomicU64,
    /// Store calls that failed (the node went on alone).
    pub failures: AtomicU64,
    /// The store answered the publisher's last round.
    pub connected: AtomicBool,
}

/// The cluster sync of one node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ClusterSync {
    bans: BanManager,
    store: Arc<dyn ClusterStore>,
    clock: Arc<dyn Clock>,
    node: String,
    sync_interval: Duration,
    heartbeat_interval: Duration,
    reconcile_interval: Duration,
    stats: Arc<ClusterStats>,
    counts: Option<Arc<Counts>>,
}

impl ClusterSync {
    /// The sync of `bans` through `store`, as `section` says. Turns the ban manager's outbox
    /// on ([`BanManager::enable_cluster`]).
    pub fn new(
        bans: BanManager,
        store: Arc<dyn ClusterStore>,
        clock: Arc<dyn Clock>,
        section: &ClusterSection,
    ) -> Self {
        bans.enable_cluster();
        ClusterSync {
            bans,
            store,
            clock,
            node: section.node.clone(),
            sync_interval: section.sync_interval,
            heartbeat_interval: section.heartbeat_interval,
            reconcile_interval: section.reconcile_interval,
            stats: Arc::new(ClusterStats::default()),
            counts: None,
        }
    }

    /// Shares the B4 counters too: this node's deltas come from `local` (the server's
    /// [`crate::server::ServerBuilder::share_counts`]), the others' go to `apply`.
    pub fn with_counts(mut self, local: tokio::sync::mpsc::Receiver<CountDelta>, apply: ApplyCounts) -> Self {
        self.counts = Some(Arc::new(Counts { local: tokio::sync::Mutex::new(local), apply }));
        self
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<ClusterStats> {
        &self.stats
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn ClusterStore> {
        &self.store
    }

    /// Runs the publisher and the follower until `shutdown` completes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let (publisher, follower, counter, count_follower) = (self.clone(), self.clone(), self.clone(), self);
        tokio::select! {
            biased;
            () = &mut shutdown => {}
            () = publisher.publish_loop() => {}
            () = follower.follow_loop() => {}
            () = counter.count_loop() => {}
            () = count_follower.follow_counts_loop() => {}
        }
    }

    /// Publishes this node's B4 deltas, in batches, as they come.
    async fn count_loop(self) {
        let Some(counts) = self.counts.clone() else {
            return std::future::pending().await;
        };
        let mut local = counts.local.lock().await;
        let mut batch = Vec::new();
        loop {
            if local.recv_many(&mut batch, BATCH).await == 0 {
                return std::future::pending().await;
            }
            for d in &mut batch {
                d.node.clone_from(&self.node);
            }
            if let Err(e) = self.store.count(std::mem::take(&mut batch)).await {
                // Counted here only; the publisher says when the store is away.
                tracing::debug!(error = %e, "cluster: B4 counts not shared");
            }
        }
    }

    /// Adds the other nodes' B4 deltas to this node's record, from the moment it started.
    async fn follow_counts_loop(self) {
        let Some(counts) = self.counts.clone() else {
            return std::future::pending().await;
        };
        let mut cursor = "$".to_string();
        loop {
            match self.store.follow_counts(cursor.clone(), BATCH, self.sync_interval).await {
                Ok(entries) => {
                    for (id, delta) in entries {
                        if let Some(d) = delta.filter(|d| d.node != self.node) {
                            (counts.apply)(&d);
                        }
                        cursor = id;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cluster counts: no read");
                    tokio::time::sleep(self.sync_interval).await;
                }
            }
        }
    }

    /// The publisher (see the module documentation).
    async fn publish_loop(self) {
        let mut healthy = false;
        let mut warned = false;
        let mut epoch: Option<String> = None;
        let mut reconcile_due = true;
        let mut last_beat: Option<Instant> = None;
        let mut last_reconcile: Option<Instant> = None;
        loop {
            let now = self.clock.now();
            let beat = last_beat.is_none_or(|t| now.saturating_duration_since(t) >= self.heartbeat_interval);
            if last_reconcile.is_some_and(|t| now.saturating_duration_since(t) >= self.reconcile_interval) {
                reconcile_due = true;
            }
            let round = async {
                if beat || !healthy {
                    let proposal = format!("{}-{}", self.node, to_ms(self.clock.wall()));
                    let e = self.store.epoch(proposal).await?;
                    if epoch.as_ref().is_some_and(|old| *old != e) {
                        tracing::warn!(epoch = %e, "cluster store lost its data (new epoch): publishing the bans again");
                        reconcile_due = true;
                    }
                    epoch = Some(e);
                    self.heartbeat().await?;
                    last_beat = Some(now);
                }
                self.drain().await?;
                if reconcile_due {
                    self.reconcile().await?;
                    reconcile_due = false;
                    last_reconcile = Some(now);
                }
                Ok::<(), ClusterError>(())
            };
            match round.await {
                Ok(()) => {
                    if !healthy && warned {
                        tracing::info!(node = %self.node, "cluster store reachable again: outbox drained, bans reconciled");
                    }
                    healthy = true;
                    warned = false;
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    if healthy || !warned {
                        tracing::warn!(node = %self.node, error = %e,
                            "cluster store unreachable: serving and banning alone; decisions wait in the outbox");
                        warned = true;
                    }
                    healthy = false;
                    reconcile_due = true;
                }
            }
            self.stats.connected.store(healthy, Ordering::Relaxed);
            tokio::select! {
                biased;
                () = self.bans.outbox_ready(), if healthy => {}
                () = tokio::time::sleep(self.sync_interval) => {}
            }
        }
    }

    /// Publishes the outbox in order; rows go once the store took them (a row published twice
    /// after a failure loses to itself: nothing is logged twice).
    async fn drain(&self) -> Result<(), ClusterError> {
        loop {
            let rows = self.bans.outbox(BATCH).await.map_err(|e| ClusterError(format!("outbox: {e}")))?;
            let Some(last) = rows.last().map(|r| r.id) else {
                return Ok(());
            };
            let entries = rows.iter().map(|r| outbox_entry(r, &self.node)).collect();
            let won = self.store.publish_many(entries).await?;
            self.stats.published.fetch_add(won.iter().filter(|w| **w).count() as u64, Ordering::Relaxed);
            self.bans.outbox_done(last).await.map_err(|e| ClusterError(format!("outbox: {e}")))?;
        }
    }

    /// The whole table against the local bans, both ways; expired entries are purged.
    async fn reconcile(&self) -> Result<(), ClusterError> {
        let table = self.store.table().await?;
        let now_ms = to_ms(self.clock.wall());
        let (expired, live): (Vec<SharedBan>, Vec<SharedBan>) = table.into_iter().partition(|e| e.is_expired(now_ms));
        self.store.purge(expired.into_iter().map(|e| e.net).collect(), now_ms).await?;
        let applied = self.bans.apply_shared(live.clone()).await.map_err(|e| ClusterError(format!("applying: {e}")))?;
        let by_net: HashMap<&str, &SharedBan> = live.iter().map(|e| (e.net.as_str(), e)).collect();
        let mine: Vec<SharedBan> = self
            .bans
            .active()
            .iter()
            .filter(|b| to_ms(b.expires) > now_ms)
            .map(|b| shared_ban(b, &self.node))
            .filter(|e| wins(e, by_net.get(e.net.as_str()).copied()))
            .collect();
        let mut published = 0;
        for chunk in mine.chunks(BATCH) {
            published += self.store.publish_many(chunk.to_vec()).await?.iter().filter(|w| **w).count();
        }
        self.stats.published.fetch_add(published as u64, Ordering::Relaxed);
        self.stats.reconciles.fetch_add(1, Ordering::Relaxed);
        tracing::info!(node = %self.node, table = live.len(), applied, published, "cluster bans reconciled");
        Ok(())
    }

    async fn heartbeat(&self) -> Result<(), ClusterError> {
        let now = self.clock.wall();
        let bans = self.bans.in_force(now) as u64;
        let outbox = self.bans.outbox_len().await.unwrap_or(0);
        let beat = NodeBeat { node: self.node.clone(), at_ms: to_ms(now), bans, outbox };
        self.store.heartbeat(beat).await
    }

    /// The follower (see the module documentation).
    async fn follow_loop(self) {
        // No cursor yet (a first start): the whole log, which is bounded and applies
        // idempotently, in the order it was written.
        let mut cursor = match self.bans.cluster_value(CURSOR_KEY).await {
            Ok(c) => c.unwrap_or_else(|| "0-0".to_string()),
            Err(e) => {
                tracing::error!(error = %e, "cluster: cannot read the log cursor; following from the start");
                "0-0".to_string()
            }
        };
        loop {
            let entries = match self.store.follow(cursor.clone(), BATCH, self.sync_interval).await {
                Ok(entries) => entries,
                Err(e) => {
                    // The publisher says when the store is away; the follower just waits.
                    tracing::debug!(error = %e, "cluster log: no read");
                    tokio::time::sleep(self.sync_interval).await;
                    continue;
                }
            };
            let Some(last) = entries.last().map(|(id, _)| id.clone()) else {
                continue;
            };
            let theirs: Vec<SharedBan> =
                entries.into_iter().filter_map(|(_, e)| e).filter(|e| e.node != self.node).collect();
            self.stats.received.fetch_add(theirs.len() as u64, Ordering::Relaxed);
            if !theirs.is_empty()
                && let Err(e) = self.bans.apply_shared(theirs).await
            {
                // Not applied: read again from the same cursor.
                tracing::error!(error = %e, "cluster: bans from the log not applied; retrying");
                tokio::time::sleep(self.sync_interval).await;
                continue;
            }
            if let Err(e) = self.bans.set_cluster_value(CURSOR_KEY, last.clone()).await {
                tracing::error!(error = %e, "cluster: cannot save the log cursor");
            }
            cursor = last;
        }
    }
}

/// A node's view of the cluster, for `gatekeeper cluster status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// Every node's last heartbeat.
    pub nodes: Vec<NodeBeat>,
    /// Bans in force in the shared table.
    pub table_bans: usize,
    /// Tombstones (liftings) the table still keeps.
    pub table_lifted: usize,
    /// Bans in force in this node's database.
    pub local_bans: usize,
    /// Bans in force here that the table lacks or holds shorter, and table bans missing here.
    pub differences: usize,
}

/// Compares this node's bans (`local`, from its database) with the store's table.
pub async fn view(
    store: &dyn ClusterStore,
    local: &[Ban],
    now: std::time::SystemTime,
) -> Result<ClusterView, ClusterError> {
    let now_ms = to_ms(now);
    let table: Vec<SharedBan> = store.table().await?.into_iter().filter(|e| !e.is_expired(now_ms)).collect();
    let nodes = store.nodes().await?;
    let live: Vec<&Ban> = local.iter().filter(|b| !b.is_expired(now)).collect();
    let by_net: HashMap<&str, &SharedBan> = table.iter().map(|e| (e.net.as_str(), e)).collect();
    let mut differences = 0;
    for b in &live {
        let e = shared_ban(b, "");
        match by_net.get(e.net.as_str()) {
            Some(t) if !t.lifted && t.expires_ms == e.expires_ms => {}
            _ => differences += 1,
        }
    }
    let local_nets: std::collections::HashSet<String> = live.iter().map(|b| b.net.to_string()).collect();
    let table_bans = table.iter().filter(|e| !e.lifted).count();
    differences += table.iter().filter(|e| !e.lifted && !local_nets.contains(&e.net)).count();
    Ok(ClusterView { nodes, table_bans, table_lifted: table.len() - table_bans, local_bans: live.len(), differences })
}
