//! Ban persistence in SQLite (`<state_dir>/state.sqlite`, shared with other state; this module
//! owns the tables `bans` and `ban_history`).
//!
//! - `bans`: one row per active ban, keyed by its network. A row is committed (WAL,
//!   `synchronous = FULL`) before the client gets its reply, so a kill -9 or a power loss
//!   loses no ban.
//! - `ban_history`: an append-only log of what happened to bans (`ban`, `extend`, `remove`,
//!   `expire`), which escalation counts and `gatekeeper bans list --history` shows.
//!
//! - `cluster_outbox` (with a `[cluster]`, [`BanStore::set_outbox`]): every ban, extension
//!   and lifting this node decided, written in the same transaction as the ban itself, until
//!   the cluster sync has published it (`crate::cluster`). Bans applied from the cluster are
//!   written with [`BanStore::put_synced`] / [`BanStore::remove_synced`], which leave no
//!   outbox row: they are never published again. `cluster_state` holds the sync's cursor.
//!
//! Several processes share the file (the server and `gatekeeper bans`): WAL mode lets readers
//! and one writer work at once, a busy timeout waits out the other writer, and
//! `PRAGMA data_version` tells the server that another connection changed something.
//!
//! Blocking: callers on an async runtime run this on the blocking pool.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

use super::Ban;
use super::net::Net;
use crate::policy::BanReason;

/// A persistence failure. The caller logs it; a failed write means the ban was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused (disk full, database locked beyond the busy timeout, corrupt file).
    #[error("ban database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A row that does not parse (written by a newer version, or edited by hand).
    #[error("ban database: bad row: {0}")]
    BadRow(String),
    /// The group commit this write belonged to failed (the message is SQLite's), so none of
    /// the group's writes were kept.
    #[error("ban database: group commit failed: {0}")]
    GroupCommit(String),
}

/// What happened to a ban, as logged in `ban_history`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryEvent {
    /// A new ban.
    Ban,
    /// A ban of an already banned network: the later expiry wins.
    Extend,
    /// Lifted by an administrator.
    Remove,
    /// Ran out.
    Expire,
    /// Replaced by the ban of the IPv6 /48 around it (`[bans] widen_v6_after`).
    Widen,
    /// Moved with a step of the wall clock (its length in real time kept).
    Shift,
}

impl HistoryEvent {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            HistoryEvent::Ban => "ban",
            HistoryEvent::Extend => "extend",
            HistoryEvent::Remove => "remove",
            HistoryEvent::Expire => "expire",
            HistoryEvent::Widen => "widen",
            HistoryEvent::Shift => "shift",
        }
    }
}

/// One `ban_history` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    /// When it happened.
    pub at: SystemTime,
    /// `ban`, `extend`, `remove` or `expire`.
    pub event: String,
    /// The ban as it was then.
    pub ban: Ban,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bans (
    net        TEXT PRIMARY KEY,   -- network: '192.0.2.1', '2001:db8:1:2::/64'
    reason     TEXT NOT NULL,      -- B1..B4, manual
    session    INTEGER NOT NULL,   -- session id of the evidence (0: manual)
    evidence   TEXT NOT NULL,      -- the command or finding
    start_ms   INTEGER NOT NULL,   -- unix ms
    expires_ms INTEGER NOT NULL,   -- unix ms
    offence    INTEGER NOT NULL    -- 1 for a first ban; escalation level after
);
CREATE TABLE IF NOT EXISTS ban_history (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms      INTEGER NOT NULL,
    event      TEXT NOT NULL,      -- ban, extend, remove, expire
    net        TEXT NOT NULL,
    reason     TEXT NOT NULL,
    session    INTEGER NOT NULL,
    evidence   TEXT NOT NULL,
    start_ms   INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    offence    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ban_history_net ON ban_history (net, at_ms);
CREATE INDEX IF NOT EXISTS ban_history_at ON ban_history (at_ms);
CREATE TABLE IF NOT EXISTS cluster_outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    lifted     INTEGER NOT NULL,   -- 0: a ban or extension; 1: a lifting
    at_ms      INTEGER NOT NULL,   -- a ban: its start; a lifting: when
    net        TEXT NOT NULL,
    reason     TEXT NOT NULL,
    session    INTEGER NOT NULL,
    evidence   TEXT NOT NULL,
    start_ms   INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    offence    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cluster_state (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL
);
";

/// One `cluster_outbox` row: a decision of this node waiting to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Its place in the outbox (publish in this order, then [`BanStore::outbox_done`]).
    pub id: i64,
    /// A lifting (a tombstone) rather than a ban.
    pub lifted: bool,
    /// A ban: its start. A lifting: when it happened.
    pub at: SystemTime,
    /// The ban (for a lifting: the ban lifted).
    pub ban: Ban,
}

/// Unix milliseconds (0 before the epoch).
pub fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The time of unix milliseconds (the epoch for negative values).
pub fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Parses a stored reason.
pub fn parse_reason(s: &str) -> Option<BanReason> {
    Some(match s {
        "B1" => BanReason::ForgedLocalSender,
        "B2" => BanReason::FakeSender,
        "B3" => BanReason::Virus,
        "B4" => BanReason::UnknownRecipient,
        "manual" => BanReason::Manual,
        _ => return None,
    })
}

/// Bytes of the first copy of the WAL-index header (`WalIndexHdr`) in a `-shm` file.
const WAL_INDEX_HEADER: usize = 48;

/// The ban database.
#[derive(Debug)]
pub struct BanStore {
    conn: Connection,
    data_version: Option<i64>,
    /// The `-shm` file of a database in WAL mode, and its WAL-index header as last read
    /// ([`changed`](Self::changed)).
    shm: Option<std::fs::File>,
    shm_header: Option<[u8; WAL_INDEX_HEADER]>,
    /// Bad rows skipped by the last full read, and the count last logged (logged once per
    /// change, not on every read).
    bad_rows: usize,
    bad_rows_logged: usize,
    /// Record this node's decisions in `cluster_outbox` (a `[cluster]` is configured).
    outbox: bool,
}

impl BanStore {
    /// Opens (creating if needed) the database at `path`: WAL, full sync, 5 s busy timeout,
    /// checked with `PRAGMA quick_check`. A damaged file is an error here that
    /// [`crate::dbfile::is_damage`] recognises ([`BanStore::is_damage`]): the ban manager then
    /// moves it aside and starts afresh.
    pub fn open(path: &Path) -> Result<BanStore, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL may be refused on some filesystems; the rollback journal is correct too.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        crate::dbfile::quick_check(&conn)?;
        let mut store = BanStore::init(conn)?;
        if mode.eq_ignore_ascii_case("wal") {
            // There once the connection has read in WAL mode (init did); without it, changed()
            // asks the pragma every time.
            let mut shm = path.as_os_str().to_owned();
            shm.push("-shm");
            store.shm = std::fs::File::open(shm).ok();
        }
        Ok(store)
    }

    /// True if `e` says the database file is damaged or unreadable (a fresh file would do).
    pub fn is_damage(e: &StoreError) -> bool {
        matches!(e, StoreError::Sqlite(e) if crate::dbfile::is_damage(e))
    }

    /// Bad rows (unparseable network or reason, wrong column types) the last full read of the
    /// bans skipped.
    pub fn bad_rows(&self) -> usize {
        self.bad_rows
    }

    /// A private database in memory (tests, and the simulation when it needs no restart).
    pub fn in_memory() -> Result<BanStore, StoreError> {
        BanStore::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<BanStore, StoreError> {
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        let mut store = BanStore {
            conn,
            data_version: None,
            shm: None,
            shm_header: None,
            bad_rows: 0,
            bad_rows_logged: 0,
            outbox: false,
        };
        store.changed()?;
        Ok(store)
    }

    /// A row as a ban, or why it is bad (a value that does not parse or has the wrong type);
    /// an `Err` of the outer result is SQLite's own failure.
    fn row_to_ban(r: &rusqlite::Row<'_>, base: usize) -> rusqlite::Result<Result<Ban, String>> {
        use rusqlite::Error::{FromSqlConversionFailure, IntegralValueOutOfRange, InvalidColumnType};
        match BanStore::parse_row(r, base) {
            Err(e @ (InvalidColumnType(..) | FromSqlConversionFailure(..) | IntegralValueOutOfRange(..))) => {
                Ok(Err(e.to_string()))
            }
            other => other,
        }
    }

    fn parse_row(r: &rusqlite::Row<'_>, base: usize) -> rusqlite::Result<Result<Ban, String>> {
        let net: String = r.get(base)?;
        let reason: String = r.get(base + 1)?;
        let session: i64 = r.get(base + 2)?;
        // Escaped on the way in since issue 12; rows written before (or by hand) are escaped
        // here, so that no ban in memory, in a log or on a terminal carries a control character.
        let evidence: String = r.get(base + 3)?;
        let evidence = crate::proto::escape(&evidence).into_owned();
        let start: i64 = r.get(base + 4)?;
        let expires: i64 = r.get(base + 5)?;
        let offence: i64 = r.get(base + 6)?;
        let Ok(net) = net.parse::<Net>() else {
            return Ok(Err(format!("net {net:?}")));
        };
        let Some(reason) = parse_reason(&reason) else {
            return Ok(Err(format!("reason {reason:?} of {net}")));
        };
        Ok(Ok(Ban {
            net,
            reason,
            session: session as u64,
            evidence,
            start: from_ms(start),
            expires: from_ms(expires),
            offence: u32::try_from(offence).unwrap_or(1),
        }))
    }

    /// Every active ban (expired ones included until [`BanStore::remove`]), ordered by network.
    /// Bad rows are skipped and counted ([`BanStore::bad_rows`]); a change in their number is
    /// logged once, as an error: one row written by hand or by a newer version must not keep
    /// the server from starting or from seeing the other bans.
    pub fn all(&mut self) -> Result<Vec<Ban>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT net, reason, session, evidence, start_ms, expires_ms, offence FROM bans ORDER BY net",
        )?;
        let rows = stmt.query_map([], |r| BanStore::row_to_ban(r, 0))?;
        let mut out = Vec::new();
        let (mut bad, mut first) = (0, None);
        for row in rows {
            match row? {
                Ok(ban) => out.push(ban),
                Err(why) => {
                    bad += 1;
                    first.get_or_insert(why);
                }
            }
        }
        drop(stmt);
        self.bad_rows = bad;
        if bad != self.bad_rows_logged {
            self.bad_rows_logged = bad;
            if bad > 0 {
                tracing::error!(
                    bad_rows = bad,
                    first = %crate::proto::escape(first.as_deref().unwrap_or("")),
                    "ban database: bad rows skipped (not applied; `gatekeeper bans remove` or sqlite3 to fix)"
                );
            }
        }
        out.sort_by_key(|b| b.net);
        Ok(out)
    }

    /// The ban of `net`, if any.
    pub fn get(&self, net: Net) -> Result<Option<Ban>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT net, reason, session, evidence, start_ms, expires_ms, offence FROM bans WHERE net = ?1",
        )?;
        let row = stmt.query_row([net.to_string()], |r| BanStore::row_to_ban(r, 0)).optional()?;
        // A bad row counts as no ban: the next ban of the network replaces it.
        Ok(row.and_then(Result::ok))
    }

    /// Runs `f` inside one write transaction and commits once: one fsync for all the writes
    /// `f` makes (group commit). Inside, [`BanStore::put`] writes under a savepoint, so a
    /// failed put undoes only itself. If the commit fails, nothing `f` wrote is kept.
    pub fn batch<T>(&mut self, f: impl FnOnce(&mut BanStore) -> T) -> Result<T, StoreError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let out = f(self);
        match self.conn.execute_batch("COMMIT") {
            Ok(()) => Ok(out),
            Err(e) => {
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                Err(e.into())
            }
        }
    }

    /// Records this node's bans, extensions and liftings in `cluster_outbox` from now on (with
    /// a `[cluster]`; the server and `gatekeeper bans` alike).
    pub fn set_outbox(&mut self, on: bool) {
        self.outbox = on;
    }

    /// Records `ban` (replacing the row of its network) and logs `event`, in one transaction
    /// (a savepoint inside [`BanStore::batch`]). With the outbox on, a ban or extension also
    /// goes to `cluster_outbox`, in the same transaction.
    pub fn put(&mut self, ban: &Ban, event: HistoryEvent, at: SystemTime) -> Result<(), StoreError> {
        let publish = self.outbox;
        self.put_with(ban, event, at, publish)
    }

    /// [`BanStore::put`] for a ban that came from the cluster: no outbox row (it is never
    /// published again).
    pub fn put_synced(&mut self, ban: &Ban, event: HistoryEvent, at: SystemTime) -> Result<(), StoreError> {
        self.put_with(ban, event, at, false)
    }

    fn put_with(&mut self, ban: &Ban, event: HistoryEvent, at: SystemTime, publish: bool) -> Result<(), StoreError> {
        if self.conn.is_autocommit() {
            let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            write_ban(&tx, ban, event, at, publish)?;
            tx.commit()?;
        } else {
            let sp = self.conn.savepoint()?;
            write_ban(&sp, ban, event, at, publish)?;
            sp.commit()?;
        }
        Ok(())
    }

    /// Deletes the ban of `net` and logs `event`; returns it if there was one. Inside
    /// [`BanStore::batch`] it writes under a savepoint, like [`BanStore::put`]. With the
    /// outbox on, a lifting ([`HistoryEvent::Remove`]) goes to `cluster_outbox` too.
    pub fn remove(&mut self, net: Net, event: HistoryEvent, at: SystemTime) -> Result<Option<Ban>, StoreError> {
        let publish = self.outbox;
        self.remove_if(net, event, at, None, publish)
    }

    /// [`BanStore::remove`] for a lifting that came from the cluster: no outbox row.
    pub fn remove_synced(&mut self, net: Net, event: HistoryEvent, at: SystemTime) -> Result<Option<Ban>, StoreError> {
        self.remove_if(net, event, at, None, false)
    }

    /// The oldest `limit` outbox rows, in order.
    pub fn outbox(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, lifted, at_ms, net, reason, session, evidence, start_ms, expires_ms, offence
             FROM cluster_outbox ORDER BY id LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            let (id, lifted, at): (i64, i64, i64) = (r.get(0)?, r.get(1)?, r.get(2)?);
            Ok(BanStore::row_to_ban(r, 3)?.map(|ban| OutboxRow { id, lifted: lifted != 0, at: from_ms(at), ban }))
        })?;
        let mut out = Vec::new();
        for row in rows {
            match row? {
                Ok(row) => out.push(row),
                // A bad row cannot be published; it is dropped with the rows around it.
                Err(why) => tracing::error!(why = %crate::proto::escape(&why), "cluster outbox: bad row skipped"),
            }
        }
        Ok(out)
    }

    /// Deletes the outbox rows up to `id` (published).
    pub fn outbox_done(&mut self, id: i64) -> Result<usize, StoreError> {
        Ok(self.conn.execute("DELETE FROM cluster_outbox WHERE id <= ?1", [id])?)
    }

    /// How many rows wait in the outbox.
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let n: i64 = self.conn.query_row("SELECT count(*) FROM cluster_outbox", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// A value of `cluster_state` (the sync's cursor, the store's epoch).
    pub fn cluster_value(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.conn.query_row("SELECT value FROM cluster_state WHERE key = ?1", [key], |r| r.get(0)).optional()?)
    }

    /// Sets a value of `cluster_state`.
    pub fn set_cluster_value(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute("INSERT OR REPLACE INTO cluster_state (key, value) VALUES (?1, ?2)", [key, value])?;
        Ok(())
    }

    /// Deletes the ban of `net`, if it expires by `expired_by` when that is given.
    fn remove_if(
        &mut self,
        net: Net,
        event: HistoryEvent,
        at: SystemTime,
        expired_by: Option<SystemTime>,
        publish: bool,
    ) -> Result<Option<Ban>, StoreError> {
        if self.conn.is_autocommit() {
            let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let old = remove_in(&tx, net, event, at, expired_by, publish)?;
            tx.commit()?;
            Ok(old)
        } else {
            let sp = self.conn.savepoint()?;
            let old = remove_in(&sp, net, event, at, expired_by, publish)?;
            sp.commit()?;
            Ok(old)
        }
    }

    /// Deletes the ban of `net` if it has expired by `now` (another process may have extended
    /// it) and logs `expire`; returns it if it was deleted.
    pub fn remove_expired(&mut self, net: Net, now: SystemTime) -> Result<Option<Ban>, StoreError> {
        self.remove_if(net, HistoryEvent::Expire, now, Some(now), false)
    }

    /// How many bans of `net` started at or after `since` (for escalation).
    pub fn bans_since(&self, net: Net, since: SystemTime) -> Result<u32, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT count(*) FROM ban_history WHERE net = ?1 AND event = 'ban' AND start_ms >= ?2")?
            .query_row(params![net.to_string(), to_ms(since)], |r| r.get(0))?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// The latest `limit` history rows, newest first, optionally for one network only.
    pub fn history(&self, net: Option<Net>, limit: usize) -> Result<Vec<HistoryRow>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT at_ms, event, net, reason, session, evidence, start_ms, expires_ms, offence FROM ban_history
             WHERE ?1 IS NULL OR net = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![net.map(|n| n.to_string()), limit as i64], |r| {
            let at: i64 = r.get(0)?;
            let event: String = r.get(1)?;
            Ok(BanStore::row_to_ban(r, 2)?.map(|ban| HistoryRow { at: from_ms(at), event, ban }))
        })?;
        // Bad history rows are left out of the listing (they never stop it).
        let mut out = Vec::new();
        for row in rows {
            if let Ok(row) = row? {
                out.push(row);
            }
        }
        Ok(out)
    }

    /// Deletes history rows older than `before`; returns how many.
    pub fn prune_history(&mut self, before: SystemTime) -> Result<usize, StoreError> {
        Ok(self.conn.execute("DELETE FROM ban_history WHERE at_ms < ?1", [to_ms(before)])?)
    }

    /// True if another connection committed a change since the last call (the first call
    /// after opening says false).
    pub fn changed(&mut self) -> Result<bool, StoreError> {
        // Every commit, by any connection, rewrites the WAL-index header at the start of the
        // -shm file (its change counter, last frame and salts: SQLite's file format, §4.5).
        // While it reads the same, nothing was committed, and the pragma's read transaction (a
        // lock round trip on that file) is saved: every pass, each second, asks. A read racing
        // a commit can only look old or different: the next pass, or the pragma, sees it.
        if let Some(shm) = &self.shm {
            let mut header = [0; WAL_INDEX_HEADER];
            if std::os::unix::fs::FileExt::read_exact_at(shm, &mut header, 0).is_ok() {
                if self.shm_header == Some(header) {
                    return Ok(false);
                }
                self.shm_header = Some(header);
            } else {
                self.shm_header = None;
            }
        }
        // A statement prepared once, not parsed each time.
        let v: i64 = self.conn.prepare_cached("PRAGMA data_version")?.query_row([], |r| r.get(0))?;
        let before = self.data_version.replace(v);
        Ok(before.is_some_and(|b| b != v))
    }
}

/// A ban's columns in table order: net, reason, session, evidence, start_ms, expires_ms,
/// offence (the tail of a `ban_history` row too).
fn ban_values(ban: &Ban) -> [Value; 7] {
    [
        Value::Text(ban.net.to_string()),
        Value::Text(ban.reason.as_str().into()),
        Value::Integer(ban.session as i64),
        Value::Text(ban.evidence.clone()),
        Value::Integer(to_ms(ban.start)),
        Value::Integer(to_ms(ban.expires)),
        Value::Integer(i64::from(ban.offence)),
    ]
}

/// The body of [`BanStore::remove_if`] inside its transaction or savepoint.
fn remove_in(
    tx: &Connection,
    net: Net,
    event: HistoryEvent,
    at: SystemTime,
    expired_by: Option<SystemTime>,
    publish: bool,
) -> Result<Option<Ban>, StoreError> {
    let old = {
        let mut stmt = tx.prepare_cached(
            "SELECT net, reason, session, evidence, start_ms, expires_ms, offence FROM bans
                 WHERE net = ?1 AND (?2 IS NULL OR expires_ms <= ?2)",
        )?;
        stmt.query_row(params![net.to_string(), expired_by.map(to_ms)], |r| BanStore::row_to_ban(r, 0)).optional()?
    };
    // A bad row is deleted without a history line (it cannot be written back as a ban).
    let (old, bad) = match old {
        Some(Ok(b)) => (Some(b), false),
        Some(Err(_)) => (None, expired_by.is_none()),
        None => (None, false),
    };
    if bad {
        tx.execute("DELETE FROM bans WHERE net = ?1", [net.to_string()])?;
    }
    if let Some(b) = &old {
        tx.execute("DELETE FROM bans WHERE net = ?1", [net.to_string()])?;
        log(tx, b, event, at)?;
        if publish && event == HistoryEvent::Remove {
            outbox(tx, b, true, at)?;
        }
    }
    Ok(old)
}

fn write_ban(
    conn: &Connection,
    ban: &Ban,
    event: HistoryEvent,
    at: SystemTime,
    publish: bool,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO bans (net, reason, session, evidence, start_ms, expires_ms, offence)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params_from_iter(ban_values(ban)))?;
    log(conn, ban, event, at)?;
    if publish && matches!(event, HistoryEvent::Ban | HistoryEvent::Extend) {
        outbox(conn, ban, false, ban.start)?;
    }
    Ok(())
}

/// Queues a decision of this node for the cluster (in the caller's transaction).
fn outbox(conn: &Connection, ban: &Ban, lifted: bool, at: SystemTime) -> Result<(), StoreError> {
    let head = [Value::Integer(i64::from(lifted)), Value::Integer(to_ms(at))];
    conn.prepare_cached(
        "INSERT INTO cluster_outbox (lifted, at_ms, net, reason, session, evidence, start_ms, expires_ms, offence)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params_from_iter(head.into_iter().chain(ban_values(ban))))?;
    Ok(())
}

fn log(conn: &Connection, ban: &Ban, event: HistoryEvent, at: SystemTime) -> Result<(), StoreError> {
    let head = [Value::Integer(to_ms(at)), Value::Text(event.as_str().into())];
    conn.prepare_cached(
        "INSERT INTO ban_history (at_ms, event, net, reason, session, evidence, start_ms, expires_ms, offence)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params_from_iter(head.into_iter().chain(ban_values(ban))))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ban(net: &str, start: u64, secs: u64) -> Ban {
        Ban {
            net: net.parse().unwrap(),
            reason: BanReason::ForgedLocalSender,
            session: 7,
            evidence: "MAIL FROM:<nobody@example.test>".into(),
            start: UNIX_EPOCH + Duration::from_secs(start),
            expires: UNIX_EPOCH + Duration::from_secs(start + secs),
            offence: 1,
        }
    }

    #[test]
    fn put_get_remove_and_history() {
        let mut s = BanStore::in_memory().unwrap();
        let b = ban("192.0.2.1", 1000, 60);
        s.put(&b, HistoryEvent::Ban, b.start).unwrap();
        s.put(&ban("2001:db8:1:2::/64", 1000, 60), HistoryEvent::Ban, b.start).unwrap();
        assert_eq!(s.get(b.net).unwrap(), Some(b.clone()));
        assert_eq!(s.all().unwrap().len(), 2);
        assert_eq!(s.bans_since(b.net, UNIX_EPOCH).unwrap(), 1);
        assert_eq!(s.bans_since(b.net, UNIX_EPOCH + Duration::from_secs(1001)).unwrap(), 0);
        let removed = s.remove(b.net, HistoryEvent::Remove, UNIX_EPOCH + Duration::from_secs(1010)).unwrap();
        assert_eq!(removed, Some(b.clone()));
        assert_eq!(s.remove(b.net, HistoryEvent::Remove, UNIX_EPOCH).unwrap(), None);
        let h = s.history(Some(b.net), 10).unwrap();
        assert_eq!(h.iter().map(|r| r.event.as_str()).collect::<Vec<_>>(), ["remove", "ban"]);
        assert_eq!(s.history(None, 10).unwrap().len(), 3);
        assert_eq!(s.prune_history(UNIX_EPOCH + Duration::from_secs(1005)).unwrap(), 2);
    }

    #[test]
    fn data_version_sees_other_connections_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let mut a = BanStore::open(&path).unwrap();
        let mut b = BanStore::open(&path).unwrap();
        assert!(!a.changed().unwrap());
        let x = ban("192.0.2.1", 1000, 60);
        a.put(&x, HistoryEvent::Ban, x.start).unwrap();
        assert!(!a.changed().unwrap(), "own commits do not count");
        assert!(b.changed().unwrap());
        assert!(!b.changed().unwrap());
        assert_eq!(b.get(x.net).unwrap(), Some(x));
        // Through the -shm header's fast path: every commit seen, also once a checkpoint has
        // emptied the WAL and the next commit starts it over.
        assert!(b.shm.is_some(), "WAL mode on a file has a -shm file");
        for i in 2..6 {
            let y = ban(&format!("192.0.2.{i}"), 1000, 60);
            a.put(&y, HistoryEvent::Ban, y.start).unwrap();
            if i == 4 {
                a.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
            }
            assert!(b.changed().unwrap(), "commit {i}");
            assert!(!b.changed().unwrap(), "nothing since commit {i}");
        }
        assert!(!a.changed().unwrap(), "own commits do not count");
    }
}
