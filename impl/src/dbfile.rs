//! Opening the state's SQLite files (`state.sqlite`, `callbacks.sqlite`) so that a damaged one
//! never keeps the server down: a file SQLite finds corrupt, not a database, or unreadable is
//! moved aside (renamed with a timestamp suffix, its `-wal` and `-shm` with it), a loud error
//! is logged, and a fresh database is opened in its place (docs/design.md §5, issue 12).
//!
//! It owns only that decision and the rename. It must not move a file aside for a transient
//! error (busy or locked: another process, such as `gatekeeper bans`, is writing) nor for a
//! problem a fresh file would not fix (the directory is unwritable, the disk is full): those
//! are returned as they are. Damage found while running is not handled here: a write that
//! fails is the caller's to retry and alarm.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::ErrorCode;

/// True if `e` says the file itself is damaged or unreadable, so that a fresh file would do.
pub fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseCorrupt
                | ErrorCode::NotADatabase
                | ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen
                | ErrorCode::PermissionDenied
                | ErrorCode::ReadOnly
        )
    )
}

/// Runs SQLite's `PRAGMA quick_check` on an open database: an error if it reports damage.
/// It reads every page (a few seconds for a very large file), once at start.
pub fn quick_check(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare("PRAGMA quick_check")?;
    let lines: Vec<String> = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    if lines.len() == 1 && lines[0] == "ok" {
        return Ok(());
    }
    let detail = lines.into_iter().take(3).collect::<Vec<_>>().join("; ");
    Err(rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
        Some(format!("quick_check: {detail}")),
    ))
}

/// The name a damaged `path` is moved to: `<name>.corrupt-<unix seconds>`.
pub fn aside_name(path: &Path, now: SystemTime) -> PathBuf {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{secs}"));
    PathBuf::from(name)
}

/// Opens `path` with `open`; if that fails and `damaged` says the file is at fault, moves the
/// file (and its `-wal`, `-shm`) aside with a loud error log and opens a fresh one. Returns
/// what `open` returned, and where the damaged file went if it was moved. `what` names the
/// database in the log.
pub fn open_or_move_aside<T, E: std::fmt::Display>(
    path: &Path,
    now: SystemTime,
    what: &str,
    open: impl Fn(&Path) -> Result<T, E>,
    damaged: impl Fn(&E) -> bool,
) -> Result<(T, Option<PathBuf>), E> {
    let error = match open(path) {
        Ok(t) => return Ok((t, None)),
        Err(e) if damaged(&e) && path.exists() => e,
        Err(e) => return Err(e),
    };
    let aside = aside_name(path, now);
    if let Err(rename) = std::fs::rename(path, &aside) {
        tracing::error!(database = what, path = %path.display(), error = %error, rename = %rename,
            "database damaged and cannot be moved aside");
        return Err(error);
    }
    for suffix in ["-wal", "-shm"] {
        let mut from = path.as_os_str().to_owned();
        from.push(suffix);
        let mut to = aside.as_os_str().to_owned();
        to.push(suffix);
        // Absent unless the damaged file was in WAL mode and not closed cleanly.
        let _ = std::fs::rename(&from, &to);
    }
    tracing::error!(
        database = what,
        path = %path.display(),
        moved_to = %aside.display(),
        error = %error,
        "DATABASE DAMAGED OR UNREADABLE: moved aside, starting with a fresh one (its contents are lost to \
         this server; inspect the moved file with sqlite3)"
    );
    open(path).map(|t| (t, Some(aside)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
        let c = rusqlite::Connection::open(path)?;
        c.execute_batch("CREATE TABLE IF NOT EXISTS t (x INTEGER)")?;
        quick_check(&c)?;
        Ok(c)
    }

    #[test]
    fn garbage_is_moved_aside_and_a_fresh_file_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        let (conn, aside) = open_or_move_aside(&path, now, "test", open, is_damage).unwrap();
        let aside = aside.expect("moved");
        assert_eq!(aside, dir.path().join("state.sqlite.corrupt-1800000000"));
        assert_eq!(std::fs::read(&aside).unwrap(), vec![0x5a; 8192], "kept for inspection");
        conn.execute("INSERT INTO t VALUES (1)", []).unwrap();
    }

    #[test]
    fn a_healthy_file_and_a_transient_error_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        drop(open(&path).unwrap());
        let now = SystemTime::now();
        let (_, aside) = open_or_move_aside(&path, now, "test", open, is_damage).unwrap();
        assert_eq!(aside, None);
        let busy = |_: &Path| -> rusqlite::Result<()> {
            Err(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None))
        };
        assert!(open_or_move_aside(&path, now, "test", busy, is_damage).is_err());
        assert!(path.exists(), "a busy database is not moved");
    }
}
