//! The callback cache: per-address results and per-domain accept-all flags, with expiry, in
//! SQLite (`<state_dir>/callbacks.sqlite`, tables `callback_*`) or in memory (the simulation,
//! tests).
//!
//! Times are wall-clock seconds since the epoch, supplied by the caller from the clock edge,
//! so a cached result survives a restart and expires on the same schedule in simulated time.
//! The cache is an optimisation: a database error is logged and treated as a miss, never as a
//! verdict, and a damaged file is moved aside at start ([`VerifyCache::open_sqlite_or_fresh`],
//! [`crate::dbfile`]). SQLite calls block; with `offload` they run on tokio's blocking pool
//! (production), without it inline (the simulation, which has no real threads). In memory,
//! entries are indexed by expiry too, so that a full cache evicts in O(log n), not by a scan.
//!
//! With a cluster ([`VerifyCache::with_shared`], docs/cluster.md) the cache is also shared
//! through the cluster store: a local miss asks the store (bounded by the store's timeout; a
//! store that failed is left alone for [`SHARED_PAUSE`] seconds), a hit there is kept locally,
//! and every result stored here is also written there (in the background: nothing waits for
//! it), so that a third-party domain is probed once for the cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};

use crate::edges::ClusterStore;
use crate::policy::Verification;

/// How long each kind of result is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheTtls {
    /// Valid senders (7 days).
    pub positive: Duration,
    /// Senders that cannot exist (1 day).
    pub negative: Duration,
    /// Inconclusive probes (5 minutes): long enough to stop a burst re-probing.
    pub unknown: Duration,
    /// A domain found accepting any address (1 day).
    pub accept_all: Duration,
}

impl Default for CacheTtls {
    fn default() -> Self {
        CacheTtls {
            positive: Duration::from_secs(7 * 86_400),
            negative: Duration::from_secs(86_400),
            unknown: Duration::from_secs(300),
            accept_all: Duration::from_secs(86_400),
        }
    }
}

/// What the cache knows about a sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheHit {
    /// A stored result for the address, with its original evidence.
    Result(Verification),
    /// The sender's domain accepts any address; the evidence that showed it.
    AcceptAll(String),
}

/// The cache could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The database could not be opened or its tables created: check the state directory.
    #[error("callback cache {path}: {source}")]
    Open {
        /// The database file.
        path: String,
        /// Why.
        source: rusqlite::Error,
    },
}

/// Stores written between two purges of expired rows.
const PURGE_EVERY: u64 = 256;

/// How long the shared cache is left alone after it failed to answer (seconds).
pub const SHARED_PAUSE: u64 = 5;

/// The cluster's share of the cache.
#[derive(Debug)]
struct Shared {
    store: Arc<dyn ClusterStore>,
    /// Wall seconds before which the store is not asked (it failed).
    paused_until: AtomicU64,
}

/// The callback cache. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct VerifyCache {
    store: Store,
    ttls: CacheTtls,
    max_entries: usize,
    offload: bool,
    writes: AtomicU64,
    shared: Option<Shared>,
}

#[derive(Debug, Clone)]
enum Store {
    Sqlite(Arc<Mutex<Connection>>),
    Memory(Arc<Mutex<Memory>>),
}

#[derive(Debug, Default)]
struct Memory {
    /// address → result.
    results: Expiring<Verification>,
    /// domain → evidence.
    accept_all: Expiring<String>,
}

/// Values by key with an expiry each, also indexed by (expiry, key): purging what expired and
/// evicting what expires first cost O(log n) per entry removed, never a scan of all.
#[derive(Debug)]
struct Expiring<V> {
    /// key → (value, expires_at).
    map: BTreeMap<String, (V, u64)>,
    /// (expires_at, key) for every entry of `map`.
    order: BTreeSet<(u64, String)>,
}

impl<V> Default for Expiring<V> {
    fn default() -> Self {
        Expiring { map: BTreeMap::new(), order: BTreeSet::new() }
    }
}

impl<V> Expiring<V> {
    fn get(&self, key: &str, now: u64) -> Option<&V> {
        self.map.get(key).filter(|(_, exp)| *exp > now).map(|(v, _)| v)
    }

    /// Stores `value` under `key` until `expires`; then, if over `max` entries, drops the
    /// expired ones and then those that expire first.
    fn insert(&mut self, key: &str, value: V, expires: u64, now: u64, max: usize) {
        if let Some((_, old)) = self.map.insert(key.to_string(), (value, expires)) {
            self.order.remove(&(old, key.to_string()));
        }
        self.order.insert((expires, key.to_string()));
        if self.map.len() > max {
            while self.order.first().is_some_and(|(exp, _)| *exp <= now) {
                self.pop_first();
            }
        }
        while self.map.len() > max {
            self.pop_first();
        }
    }

    fn pop_first(&mut self) {
        if let Some((_, key)) = self.order.pop_first() {
            self.map.remove(&key);
        }
    }

    fn live(&self, now: u64) -> usize {
        self.map.len() - self.order.range(..(now.saturating_add(1), String::new())).count()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS callback_results (
    address    TEXT PRIMARY KEY NOT NULL,
    verdict    TEXT NOT NULL CHECK (verdict IN ('valid', 'accept_all', 'invalid', 'undeliverable', 'unknown')),
    evidence   TEXT NOT NULL,
    checked_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS callback_results_expires ON callback_results (expires_at);
CREATE TABLE IF NOT EXISTS callback_accept_all (
    domain     TEXT PRIMARY KEY NOT NULL,
    evidence   TEXT NOT NULL,
    checked_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
";

impl VerifyCache {
    /// Opens (creating if needed) the SQLite database at `path` in WAL mode with a busy
    /// timeout, so that the ban store can use the same file.
    pub fn open_sqlite(path: &Path, ttls: CacheTtls, max_entries: usize, offload: bool) -> Result<Self, CacheError> {
        let err = |source| CacheError::Open { path: path.display().to_string(), source };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(err)?;
        conn.execute_batch("PRAGMA synchronous = NORMAL;").map_err(err)?;
        crate::dbfile::quick_check(&conn).map_err(err)?;
        // A cache from before the `accept_all` and `undeliverable` kinds: its CHECK would
        // refuse them, and SQLite cannot alter a constraint. It is only a cache: start afresh.
        let old: Option<String> = conn
            .query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'callback_results'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(err)?;
        if old.is_some_and(|sql| !sql.contains("'undeliverable'")) {
            conn.execute_batch("DROP TABLE callback_results;").map_err(err)?;
        }
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(VerifyCache {
            store: Store::Sqlite(Arc::new(Mutex::new(conn))),
            ttls,
            max_entries: max_entries.max(1),
            offload,
            writes: AtomicU64::new(0),
            shared: None,
        })
    }

    /// [`VerifyCache::open_sqlite`], but a file SQLite finds damaged or unreadable is moved aside
    /// (`<path>.corrupt-<now>`, a loud error log) and a fresh cache opened: the cache must never
    /// keep the server down. Returns where the damaged file went, if it was moved.
    pub fn open_sqlite_or_fresh(
        path: &Path,
        ttls: CacheTtls,
        max_entries: usize,
        offload: bool,
        now: SystemTime,
    ) -> Result<(Self, Option<PathBuf>), CacheError> {
        crate::dbfile::open_or_move_aside(
            path,
            now,
            "callback cache",
            |p| VerifyCache::open_sqlite(p, ttls, max_entries, offload),
            |CacheError::Open { source, .. }| crate::dbfile::is_damage(source),
        )
    }

    /// An in-memory cache holding at most `max_entries` addresses.
    pub fn memory(ttls: CacheTtls, max_entries: usize) -> Self {
        VerifyCache {
            store: Store::Memory(Arc::default()),
            ttls,
            max_entries: max_entries.max(1),
            offload: false,
            writes: AtomicU64::new(0),
            shared: None,
        }
    }

    /// Shares the cache with the other nodes of a cluster through `store`.
    pub fn with_shared(mut self, store: Arc<dyn ClusterStore>) -> Self {
        self.shared = Some(Shared { store, paused_until: AtomicU64::new(0) });
        self
    }

    /// The shared cache's answer for `address` and `domain`, kept locally when there is one.
    async fn lookup_shared(&self, address: &str, domain: &str, now: u64) -> Option<CacheHit> {
        let shared = self.shared.as_ref()?;
        if now < shared.paused_until.load(Ordering::Relaxed) {
            return None;
        }
        let keys = vec![format!("r:{address}"), format!("a:{domain}")];
        let values = match shared.store.cache_get(keys).await {
            Ok(v) => v,
            Err(e) => {
                shared.paused_until.store(now + SHARED_PAUSE, Ordering::Relaxed);
                tracing::debug!(error = %e, "shared callback cache: no answer; local only for a while");
                return None;
            }
        };
        let mut values = values.into_iter();
        let (result, flag) = (values.next().flatten(), values.next().flatten());
        if let Some(v) = result {
            let mut it = v.splitn(3, ' ');
            let (kind, expires, evidence) = (it.next()?, it.next()?.parse::<u64>().ok()?, it.next().unwrap_or(""));
            let result = from_row(kind, evidence.to_string())?;
            if expires > now {
                self.store_until(address, &result, now, expires).await;
                return Some(CacheHit::Result(result));
            }
        }
        if let Some(v) = flag {
            let (expires, evidence) = v.split_once(' ').unwrap_or((&v, ""));
            let expires = expires.parse::<u64>().ok()?;
            if expires > now {
                self.accept_all_until(domain, evidence, now, expires).await;
                return Some(CacheHit::AcceptAll(evidence.to_string()));
            }
        }
        None
    }

    /// Writes `key` to the shared cache until `expires` (wall seconds), in the background.
    fn share(&self, key: String, value: String, now: u64, expires: u64) {
        let Some(shared) = &self.shared else { return };
        if now < shared.paused_until.load(Ordering::Relaxed) {
            return;
        }
        let store = shared.store.clone();
        let ttl = Duration::from_secs(expires.saturating_sub(now).max(1));
        tokio::spawn(async move {
            if let Err(e) = store.cache_put(key, value, ttl).await {
                tracing::debug!(error = %e, "shared callback cache: not written");
            }
        });
    }

    /// The TTLs in force.
    pub fn ttls(&self) -> CacheTtls {
        self.ttls
    }

    /// What is known about `address` (lower-cased `local@domain`) and its `domain` at `now`
    /// (wall seconds). An address result wins over the domain's accept-all flag.
    pub async fn lookup(&self, address: &str, domain: &str, now: u64) -> Option<CacheHit> {
        match self.lookup_local(address, domain, now).await {
            Some(hit) => Some(hit),
            None => self.lookup_shared(address, domain, now).await,
        }
    }

    async fn lookup_local(&self, address: &str, domain: &str, now: u64) -> Option<CacheHit> {
        let (address, domain) = (address.to_string(), domain.to_string());
        match &self.store {
            Store::Memory(m) => {
                let m = m.lock().expect("cache lock");
                if let Some(result) = m.results.get(&address, now) {
                    return Some(CacheHit::Result(result.clone()));
                }
                m.accept_all.get(&domain, now).map(|ev| CacheHit::AcceptAll(ev.clone()))
            }
            Store::Sqlite(conn) => {
                let result = self
                    .blocking(conn, move |c| {
                        let now = secs_i64(now);
                        let row: Option<(String, String)> = c
                            .prepare_cached(
                                "SELECT verdict, evidence FROM callback_results WHERE address = ?1 AND expires_at > ?2",
                            )?
                            .query_row(params![address, now], |r| Ok((r.get(0)?, r.get(1)?)))
                            .optional()?;
                        if let Some((verdict, evidence)) = row {
                            return Ok(from_row(&verdict, evidence).map(CacheHit::Result));
                        }
                        let flag: Option<String> = c
                            .prepare_cached(
                                "SELECT evidence FROM callback_accept_all WHERE domain = ?1 AND expires_at > ?2",
                            )?
                            .query_row(params![domain, now], |r| r.get(0))
                            .optional()?;
                        Ok(flag.map(CacheHit::AcceptAll))
                    })
                    .await;
                result.unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "callback cache read failed");
                    None
                })
            }
        }
    }

    /// Stores the result of a probe of `address` at `now`, kept for the TTL of its kind.
    pub async fn store(&self, address: &str, result: &Verification, now: u64) {
        let ttl = match result {
            Verification::Valid { .. } => self.ttls.positive,
            Verification::AcceptAll { .. } => self.ttls.accept_all,
            Verification::Invalid { .. } => self.ttls.negative,
            // NXDOMAIN may be a local resolver's fault: asked again as soon as an unknown.
            Verification::Undeliverable { .. } | Verification::Unknown { .. } => self.ttls.unknown,
        };
        let expires = now.saturating_add(ttl.as_secs());
        self.store_until(address, result, now, expires).await;
        self.share(format!("r:{address}"), format!("{} {expires} {}", result.kind(), result.evidence()), now, expires);
    }

    /// Stores `result` for `address` until `expires` (wall seconds).
    async fn store_until(&self, address: &str, result: &Verification, now: u64, expires: u64) {
        let purge = self.writes.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY == PURGE_EVERY - 1;
        let max = self.max_entries;
        match &self.store {
            Store::Memory(m) => {
                // Full: the expired go first, then (still full of live entries) those that
                // expire first.
                m.lock().expect("cache lock").results.insert(address, result.clone(), expires, now, max);
            }
            Store::Sqlite(conn) => {
                let (address, (verdict, evidence)) = (address.to_string(), to_row(result));
                let r = self
                    .blocking(conn, move |c| {
                        c.prepare_cached(
                            "INSERT INTO callback_results (address, verdict, evidence, checked_at, expires_at)
                             VALUES (?1, ?2, ?3, ?4, ?5)
                             ON CONFLICT (address) DO UPDATE SET verdict = excluded.verdict,
                                 evidence = excluded.evidence, checked_at = excluded.checked_at,
                                 expires_at = excluded.expires_at",
                        )?
                        .execute(params![
                            address,
                            verdict,
                            evidence,
                            secs_i64(now),
                            secs_i64(expires)
                        ])?;
                        if purge {
                            purge_sqlite(c, now, max)?;
                        }
                        Ok(())
                    })
                    .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "callback cache write failed");
                }
            }
        }
    }

    /// Flags `domain` as accepting any address, with the evidence, at `now`.
    pub async fn set_accept_all(&self, domain: &str, evidence: &str, now: u64) {
        let expires = now.saturating_add(self.ttls.accept_all.as_secs());
        self.accept_all_until(domain, evidence, now, expires).await;
        self.share(format!("a:{domain}"), format!("{expires} {evidence}"), now, expires);
    }

    /// Flags `domain` as accepting any address until `expires` (wall seconds).
    async fn accept_all_until(&self, domain: &str, evidence: &str, now: u64, expires: u64) {
        match &self.store {
            Store::Memory(m) => {
                let mut m = m.lock().expect("cache lock");
                m.accept_all.insert(domain, evidence.to_string(), expires, now, self.max_entries);
            }
            Store::Sqlite(conn) => {
                let (domain, evidence) = (domain.to_string(), evidence.to_string());
                let r = self
                    .blocking(conn, move |c| {
                        c.prepare_cached(
                            "INSERT INTO callback_accept_all (domain, evidence, checked_at, expires_at)
                             VALUES (?1, ?2, ?3, ?4)
                             ON CONFLICT (domain) DO UPDATE SET evidence = excluded.evidence,
                                 checked_at = excluded.checked_at, expires_at = excluded.expires_at",
                        )?
                        .execute(params![
                            domain,
                            evidence,
                            secs_i64(now),
                            secs_i64(expires)
                        ])?;
                        Ok(())
                    })
                    .await;
                if let Err(e) = r {
                    tracing::warn!(error = %e, "callback cache write failed");
                }
            }
        }
    }

    /// Addresses with a live entry at `now` (for tests and status output).
    pub async fn len(&self, now: u64) -> usize {
        match &self.store {
            Store::Memory(m) => m.lock().expect("cache lock").results.live(now),
            Store::Sqlite(conn) => self
                .blocking(conn, move |c| {
                    c.query_row(
                        "SELECT COUNT(*) FROM callback_results WHERE expires_at > ?1",
                        params![secs_i64(now)],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .await
                .map_or(0, |n| usize::try_from(n).unwrap_or(0)),
        }
    }

    /// `true` if no address has a live entry at `now`.
    pub async fn is_empty(&self, now: u64) -> bool {
        self.len(now).await == 0
    }

    async fn blocking<T, F>(&self, conn: &Arc<Mutex<Connection>>, f: F) -> rusqlite::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = conn.clone();
        let run = move || f(&conn.lock().expect("cache lock"));
        if self.offload {
            tokio::task::spawn_blocking(run).await.unwrap_or_else(|e| {
                Err(rusqlite::Error::ToSqlConversionFailure(Box::new(std::io::Error::other(format!(
                    "cache task failed: {e}"
                )))))
            })
        } else {
            run()
        }
    }
}

/// Deletes expired rows; then, if still over `max` addresses, those that expire first.
fn purge_sqlite(c: &Connection, now: u64, max: usize) -> rusqlite::Result<()> {
    let now = secs_i64(now);
    c.execute("DELETE FROM callback_results WHERE expires_at <= ?1", params![now])?;
    c.execute("DELETE FROM callback_accept_all WHERE expires_at <= ?1", params![now])?;
    let count: i64 = c.query_row("SELECT COUNT(*) FROM callback_results", [], |r| r.get(0))?;
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    if count > max {
        c.execute(
            "DELETE FROM callback_results WHERE address IN
                 (SELECT address FROM callback_results ORDER BY expires_at, address LIMIT ?1)",
            params![count - max],
        )?;
    }
    Ok(())
}

fn secs_i64(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
}

fn to_row(v: &Verification) -> (&'static str, String) {
    (v.kind(), v.evidence().to_string())
}

fn from_row(verdict: &str, evidence: String) -> Option<Verification> {
    match verdict {
        "valid" => Some(Verification::Valid { evidence }),
        "accept_all" => Some(Verification::AcceptAll { evidence }),
        "invalid" => Some(Verification::Invalid { evidence }),
        "undeliverable" => Some(Verification::Undeliverable { evidence }),
        "unknown" => Some(Verification::Unknown { evidence }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(e: &str) -> Verification {
        Verification::Valid { evidence: e.into() }
    }

    async fn exercise(cache: &VerifyCache) {
        let t0 = 1_800_000_000;
        assert_eq!(cache.lookup("a@x.test", "x.test", t0).await, None);
        cache.store("a@x.test", &valid("250 ok"), t0).await;
        cache.store("b@x.test", &Verification::Invalid { evidence: "550 no".into() }, t0).await;
        cache.store("c@x.test", &Verification::Unknown { evidence: "451".into() }, t0).await;
        assert_eq!(cache.lookup("a@x.test", "x.test", t0 + 1).await, Some(CacheHit::Result(valid("250 ok"))));
        assert_eq!(cache.len(t0 + 1).await, 3);
        // Unknown expires after 5 minutes, invalid after a day, valid after a week.
        assert!(cache.lookup("c@x.test", "x.test", t0 + 299).await.is_some());
        assert_eq!(cache.lookup("c@x.test", "x.test", t0 + 300).await, None);
        assert!(cache.lookup("b@x.test", "x.test", t0 + 86_399).await.is_some());
        assert_eq!(cache.lookup("b@x.test", "x.test", t0 + 86_400).await, None);
        assert!(cache.lookup("a@x.test", "x.test", t0 + 7 * 86_400 - 1).await.is_some());
        assert_eq!(cache.lookup("a@x.test", "x.test", t0 + 7 * 86_400).await, None);
        // Accept-all flags are per domain; an address result wins.
        cache.set_accept_all("y.test", "RCPT TO:<random@y.test>: 250", t0).await;
        assert_eq!(
            cache.lookup("new@y.test", "y.test", t0 + 10).await,
            Some(CacheHit::AcceptAll("RCPT TO:<random@y.test>: 250".into()))
        );
        assert_eq!(cache.lookup("new@y.test", "y.test", t0 + 86_400).await, None);
        // Accept-all senders for a day, undeliverable (NXDOMAIN) ones as briefly as unknown.
        let accept_all = Verification::AcceptAll { evidence: "250 to random".into() };
        let undeliverable = Verification::Undeliverable { evidence: "NXDOMAIN".into() };
        cache.store("d@z.test", &accept_all, t0).await;
        cache.store("e@z.test", &undeliverable, t0).await;
        assert_eq!(cache.lookup("d@z.test", "z.test", t0 + 86_399).await, Some(CacheHit::Result(accept_all)));
        assert_eq!(cache.lookup("e@z.test", "z.test", t0 + 299).await, Some(CacheHit::Result(undeliverable)));
        assert_eq!(cache.lookup("e@z.test", "z.test", t0 + 300).await, None);
        // Overwrite.
        cache.store("a@x.test", &Verification::Invalid { evidence: "now gone".into() }, t0 + 5).await;
        assert!(matches!(
            cache.lookup("a@x.test", "x.test", t0 + 6).await,
            Some(CacheHit::Result(Verification::Invalid { .. }))
        ));
    }

    #[tokio::test]
    async fn memory_cache_expires_by_kind() {
        exercise(&VerifyCache::memory(CacheTtls::default(), 1000)).await;
    }

    #[tokio::test]
    async fn sqlite_cache_expires_by_kind_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let cache = VerifyCache::open_sqlite(&path, CacheTtls::default(), 1000, true).unwrap();
        exercise(&cache).await;
        drop(cache);
        let again = VerifyCache::open_sqlite(&path, CacheTtls::default(), 1000, false).unwrap();
        assert!(matches!(
            again.lookup("a@x.test", "x.test", 1_800_000_010).await,
            Some(CacheHit::Result(Verification::Invalid { .. }))
        ));
    }

    #[tokio::test]
    async fn a_cache_from_before_the_new_kinds_is_started_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callbacks.sqlite");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE callback_results (address TEXT PRIMARY KEY NOT NULL, verdict TEXT NOT NULL CHECK \
             (verdict IN ('valid', 'invalid', 'unknown')), evidence TEXT NOT NULL, checked_at INTEGER NOT NULL, \
             expires_at INTEGER NOT NULL);
             INSERT INTO callback_results VALUES ('a@x.test', 'valid', '250', 0, 9999999999);",
        )
        .unwrap();
        drop(old);
        let cache = VerifyCache::open_sqlite(&path, CacheTtls::default(), 1000, false).unwrap();
        let t0 = 1_800_000_000;
        assert_eq!(cache.lookup("a@x.test", "x.test", t0).await, None, "dropped with its table");
        let v = Verification::Undeliverable { evidence: "NXDOMAIN".into() };
        cache.store("b@x.test", &v, t0).await;
        assert_eq!(cache.lookup("b@x.test", "x.test", t0 + 1).await, Some(CacheHit::Result(v)));
        drop(cache);
        // Reopening the new schema keeps its rows.
        let cache = VerifyCache::open_sqlite(&path, CacheTtls::default(), 1000, false).unwrap();
        assert!(cache.lookup("b@x.test", "x.test", t0 + 2).await.is_some());
    }

    #[test]
    fn a_full_memory_cache_evicts_by_expiry_index() {
        let mut e: Expiring<u32> = Expiring::default();
        e.insert("a", 1, 100, 0, 3);
        e.insert("b", 2, 50, 0, 3);
        e.insert("c", 3, 200, 0, 3);
        // Overwriting moves the entry in the index.
        e.insert("b", 4, 300, 0, 3);
        e.insert("d", 5, 150, 0, 3);
        // Full of live entries: the one that expires first (a, at 100) went.
        assert_eq!(e.map.keys().map(String::as_str).collect::<Vec<_>>(), ["b", "c", "d"]);
        assert_eq!(e.map.len(), e.order.len());
        // At 160 d has expired: it goes first, and the new entry fits.
        e.insert("f", 6, 400, 160, 3);
        assert_eq!(e.map.keys().map(String::as_str).collect::<Vec<_>>(), ["b", "c", "f"]);
        assert_eq!(e.live(250), 2);
        assert_eq!(e.get("c", 199), Some(&3));
        assert_eq!(e.get("c", 200), None);
    }

    #[tokio::test]
    async fn a_damaged_cache_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callbacks.sqlite");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert!(VerifyCache::open_sqlite(&path, CacheTtls::default(), 10, false).is_err());
        let (cache, aside) = VerifyCache::open_sqlite_or_fresh(&path, CacheTtls::default(), 10, false, now).unwrap();
        assert_eq!(aside, Some(dir.path().join("callbacks.sqlite.corrupt-1800000000")));
        cache.store("a@x.test", &valid("250"), 1_800_000_000).await;
        assert!(cache.lookup("a@x.test", "x.test", 1_800_000_001).await.is_some());
    }

    #[tokio::test]
    async fn caches_are_bounded() {
        let t0 = 1_800_000_000;
        let memory = VerifyCache::memory(CacheTtls::default(), 10);
        let dir = tempfile::tempdir().unwrap();
        let sqlite = VerifyCache::open_sqlite(&dir.path().join("s.sqlite"), CacheTtls::default(), 10, false).unwrap();
        for cache in [&memory, &sqlite] {
            for i in 0..(2 * PURGE_EVERY) {
                cache.store(&format!("u{i}@x.test"), &valid("250"), t0 + i).await;
            }
            assert!(cache.len(t0).await <= 10, "{}", cache.len(t0).await);
            // The newest survive.
            let last = format!("u{}@x.test", 2 * PURGE_EVERY - 1);
            assert!(cache.lookup(&last, "x.test", t0 + 1000).await.is_some());
        }
    }
}
