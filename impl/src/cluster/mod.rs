//! Several MX hosts as one gatekeeper (issue 15, docs/cluster.md): bans decided on any node
//! reach every other node through a shared store ([`ClusterStore`], production: Redis,
//! [`RedisStore`]), and each node applies them to its own backend (kernel or in process)
//! through its ban manager.
//!
//! - **SQLite first.** A node's decisions (rule bans, `gatekeeper bans add|remove`) are
//!   committed to its own database with a row in its outbox, in one transaction
//!   ([`crate::ban::BanStore::set_outbox`]); the [`ClusterSync`] publishes the outbox in
//!   order and deletes what the store took. Expiry is not published: every node holds the same
//!   expiry and expires the ban itself.
//! - **Applied, never re-published.** The sync follows the store's log from a cursor kept in
//!   the node's database and applies other nodes' entries through
//!   [`crate::ban::BanManager::apply_shared`], which writes no outbox row.
//! - **Redis is never a single point of failure.** A store call that fails or takes longer
//!   than `[cluster] timeout` leaves the node alone: it serves and bans as before, its outbox
//!   grows. Once the store answers again the sync drains the outbox, then reconciles both
//!   ways: the store's table is applied here, and any local ban the table lacks or holds
//!   shorter is published. Conflicts resolve by [`crate::edges::cluster::wins`] (the longest
//!   expiry; a lifting beats the bans decided before it). The same reconcile runs on start
//!   (a node killed with -9 catches up), when the store's epoch changes (it lost its data),
//!   and every `reconcile_interval`.
//! - **Shared verdicts.** The callback cache ([`crate::verify::VerifyCache::with_shared`]) and
//!   the B4 counters ([`ClusterSync::with_counts`]) go through the same store, with a local
//!   fallback: a store that does not answer leaves each node with its own.
//! - **Heartbeats.** Every `heartbeat_interval` a node records its name, time, bans in force
//!   and outbox length (`gatekeeper cluster status` reads them).
//!
//! It must not decide whether to ban (the rules did, on the node that published) nor touch the
//! kernel (the ban manager does).

mod config;
mod redis;
mod sync;

pub use self::config::ClusterSection;
pub use self::redis::RedisStore;
pub use self::sync::{ApplyCounts, ClusterStats, ClusterSync, ClusterView, shared_ban, view};

pub use crate::edges::{ClusterError, ClusterStore, NodeBeat, SharedBan};
