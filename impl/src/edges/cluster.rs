//! The cluster store (docs/design.md §6, docs/cluster.md): the edge through which several MX
//! hosts share their bans. Production implements [`ClusterStore`] with Redis
//! (`crate::cluster::RedisStore`), the simulation with a simulated host; each node's SQLite
//! database stays the durable record of what that node decided.
//!
//! The store holds a **table** of shared bans (one [`SharedBan`] per network: a ban, or a
//! tombstone saying it was lifted) and a **log** of the entries that changed the table, which
//! every node follows from a cursor of its own. An entry enters the table (and the log) only
//! if it [`wins`] over the one there: the longest expiry among bans, the later of a ban's
//! decision and a lifting. The rule is a pure function here; the Redis implementation runs the
//! same rule in a server-side script, so that two nodes publishing at once cannot lose one
//! another's entry.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ports::BoxFuture;

/// One entry of the shared ban table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedBan {
    /// The network, as [`crate::ban::Net`] prints it.
    pub net: String,
    /// A tombstone: the ban of `net` was lifted by an administrator at `at_ms`.
    pub lifted: bool,
    /// A ban: when it was decided (its start). A tombstone: when the ban was lifted.
    pub at_ms: i64,
    /// A ban: when it ends. A tombstone: until when it is kept (the lifted ban's expiry).
    pub expires_ms: i64,
    /// B1–B4 or `manual`.
    pub reason: String,
    /// The session that proved it (0 for a manual ban).
    pub session: u64,
    /// The command or finding that proves it.
    pub evidence: String,
    /// 1 for a first ban; n for the n-th within the escalation lookback.
    pub offence: u32,
    /// The node that decided it.
    pub node: String,
}

impl SharedBan {
    /// The form stored in the table and the log: `ban|del EXPIRES_MS AT_MS JSON`, whose head
    /// the store's merge script reads without a JSON parser.
    pub fn encode(&self) -> String {
        let json = serde_json::to_string(self).expect("a shared ban serialises");
        format!("{} {} {} {json}", if self.lifted { "del" } else { "ban" }, self.expires_ms, self.at_ms)
    }

    /// Parses [`SharedBan::encode`]'s form; `None` for anything else (a newer version's entry).
    pub fn decode(s: &str) -> Option<SharedBan> {
        let mut parts = s.splitn(4, ' ');
        let (kind, _, _, json) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let entry: SharedBan = serde_json::from_str(json).ok()?;
        (entry.lifted == (kind == "del")).then_some(entry)
    }

    /// True once the entry is of no use at `now_ms`: an expired ban, an outlived tombstone.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_ms <= now_ms
    }
}

/// The merge rule: true if `new` replaces `old` (none: it always does).
///
/// - ban over ban: the longer expiry wins (an equal one changes nothing);
/// - ban over tombstone: the ban wins if it was decided after the lifting;
/// - tombstone over ban: the lifting wins if it is not older than the ban's decision;
/// - tombstone over tombstone: the later lifting wins.
///
/// `crate::cluster::redis`'s script implements exactly this (a test compares them).
pub fn wins(new: &SharedBan, old: Option<&SharedBan>) -> bool {
    let Some(old) = old else {
        return true;
    };
    match (new.lifted, old.lifted) {
        (false, false) => new.expires_ms > old.expires_ms,
        (false, true) => new.at_ms > old.at_ms,
        (true, false) => new.at_ms >= old.at_ms,
        (true, true) => new.at_ms > old.at_ms,
    }
}

/// One entry of the log: its id (the cursor to resume after it) and the entry, if it decodes.
pub type LogEntry = (String, Option<SharedBan>);

/// What one ended session added to a client's B4 record (docs/design.md §2), shared so that a
/// dictionary attacker spreading its RCPTs over the MX hosts is counted once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountDelta {
    /// The client key (an IPv4 address, the address of an IPv6 network), as printed.
    pub key: String,
    /// Unknown local recipients counted towards B4.
    pub unknown: u32,
    /// Probe-shaped sessions (counted only if repeated).
    pub probes: u32,
    /// Valid local recipients (B4's share test).
    pub valid: u32,
    /// The node whose session it was.
    pub node: String,
}

/// One entry of the counters' log: its id and the delta, if it decodes.
pub type CountEntry = (String, Option<CountDelta>);

/// A node's heartbeat, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBeat {
    /// The node's name (`[cluster] node`).
    pub node: String,
    /// When it beat, unix ms (the node's clock).
    pub at_ms: i64,
    /// Bans in force on the node.
    pub bans: u64,
    /// Entries waiting in its outbox (not yet published).
    pub outbox: u64,
}

/// The store could not be reached or refused: the caller goes on alone and retries.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cluster store: {0}")]
pub struct ClusterError(pub String);

/// The shared store of a cluster of gatekeepers. Every call may fail (the store is down, a
/// partition): the caller then serves and bans alone and retries later; nothing waits on the
/// store for longer than the implementation's own timeout.
pub trait ClusterStore: Send + Sync + fmt::Debug {
    /// Merges `entry` into the table by [`wins`]; if it won, appends it to the log. Returns
    /// whether it won.
    fn publish(&self, entry: SharedBan) -> BoxFuture<'_, Result<bool, ClusterError>>;

    /// [`ClusterStore::publish`] for several entries, in order (one round trip where the store
    /// can: a flood bans thousands of clients a second). Returns whether each won.
    fn publish_many(&self, entries: Vec<SharedBan>) -> BoxFuture<'_, Result<Vec<bool>, ClusterError>> {
        Box::pin(async move {
            let mut won = Vec::with_capacity(entries.len());
            for e in entries {
                won.push(self.publish(e).await?);
            }
            Ok(won)
        })
    }

    /// Log entries after `cursor` (at most `max`), waiting up to `wait` for the first. Each
    /// comes with its id, the cursor to resume after it. An entry that does not decode is
    /// skipped (its id is still returned, as `None`).
    fn follow(&self, cursor: String, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<LogEntry>, ClusterError>>;

    /// The id of the log's last entry (`0-0` when empty): where a node that reads the table
    /// whole starts following.
    fn log_head(&self) -> BoxFuture<'_, Result<String, ClusterError>>;

    /// Every entry of the table (ones that do not decode are left out).
    fn table(&self) -> BoxFuture<'_, Result<Vec<SharedBan>, ClusterError>>;

    /// Removes the entries of `nets` that are still expired at `now_ms` (another node may have
    /// replaced one meanwhile). Returns how many went.
    fn purge(&self, nets: Vec<String>, now_ms: i64) -> BoxFuture<'_, Result<usize, ClusterError>>;

    /// Records `beat` under its node.
    fn heartbeat(&self, beat: NodeBeat) -> BoxFuture<'_, Result<(), ClusterError>>;

    /// Every node's last heartbeat.
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeBeat>, ClusterError>>;

    /// The identity of the store's data: it changes when the store lost its data (a Redis
    /// restarted without persistence), which tells the nodes to publish their bans again. A
    /// store without one takes `proposal` (unique: the node's name and time).
    fn epoch(&self, proposal: String) -> BoxFuture<'_, Result<String, ClusterError>>;

    /// The shared callback cache: the values of `keys` (none for a key missing or expired).
    fn cache_get(&self, keys: Vec<String>) -> BoxFuture<'_, Result<Vec<Option<String>>, ClusterError>>;

    /// Stores `value` under `key` in the shared callback cache for `ttl`.
    fn cache_put(&self, key: String, value: String, ttl: Duration) -> BoxFuture<'_, Result<(), ClusterError>>;

    /// Appends B4 deltas to the counters' log (bounded like the bans' log).
    fn count(&self, deltas: Vec<CountDelta>) -> BoxFuture<'_, Result<(), ClusterError>>;

    /// Counters' log entries after `cursor` (`$`: only new ones), waiting up to `wait`.
    fn follow_counts(
        &self,
        cursor: String,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<CountEntry>, ClusterError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(lifted: bool, at: i64, expires: i64) -> SharedBan {
        SharedBan {
            net: "192.0.2.1".into(),
            lifted,
            at_ms: at,
            expires_ms: expires,
            reason: "B1".into(),
            session: 7,
            evidence: "MAIL FROM:<a b@example.test>".into(),
            offence: 1,
            node: "mx1".into(),
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        for e in [entry(false, 10, 20), entry(true, 15, 20)] {
            let s = e.encode();
            assert!(s.starts_with(if e.lifted { "del 20 " } else { "ban 20 " }), "{s}");
            assert_eq!(SharedBan::decode(&s), Some(e));
        }
        assert_eq!(SharedBan::decode("ban 1 2 {"), None);
        assert_eq!(SharedBan::decode("del 20 10 ".to_string().as_str()), None);
        let mut wrong = entry(false, 1, 2).encode();
        wrong.replace_range(0..3, "del");
        assert_eq!(SharedBan::decode(&wrong), None, "head and body disagree");
    }

    #[test]
    fn merge_rule() {
        let ban = |at, exp| entry(false, at, exp);
        let del = |at, exp| entry(true, at, exp);
        assert!(wins(&ban(1, 10), None));
        assert!(wins(&ban(5, 20), Some(&ban(1, 10))), "longer expiry wins");
        assert!(!wins(&ban(5, 10), Some(&ban(1, 10))), "equal expiry changes nothing");
        assert!(!wins(&ban(0, 5), Some(&ban(1, 10))));
        assert!(wins(&del(2, 10), Some(&ban(1, 10))), "a lifting after the decision wins");
        assert!(wins(&del(1, 10), Some(&ban(1, 10))));
        assert!(!wins(&del(0, 10), Some(&ban(1, 10))), "a ban decided after the lifting stands");
        assert!(wins(&ban(3, 10), Some(&del(2, 10))));
        assert!(!wins(&ban(2, 99), Some(&del(2, 10))), "however long, a ban decided before the lifting is lifted");
        assert!(wins(&del(3, 10), Some(&del(2, 10))));
        assert!(!wins(&del(2, 10), Some(&del(2, 10))));
    }
}
