//! The embedded default downstream: [`MaildirSpool`], a Maildir under the state dir written
//! with fsyncs so that a 250 is never given for a message a crash could lose, and the group
//! commit of its directory fsyncs. A message is written into `tmp/` as it arrives (a
//! [`MessageFile`]) and only renamed into `new/` at its handoff.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::UNIX_EPOCH;

use super::clock::Clock;
use super::message::{MessageFile, available_space};
use super::ports::{BoxFuture, Downstream};
use super::trace::trace_headers;
use crate::session::{DeliveryError, Envelope};

/// The embedded default downstream: a Maildir (`new/`, `tmp/`, `cur/`) under the state dir.
///
/// Each message is written to `tmp/` while it arrives, then fsync'd, renamed into `new/`, and
/// `new/` is fsync'd, so a 250 is never given for a message a crash could lose. The envelope
/// is kept in the message as `Return-Path:` and `X-Gatekeeper-Rcpt:` headers above a
/// `Received:` trace header, written first (when DATA begins, as Postfix stamps its own).
/// A message that is not delivered (too big, connection lost, write failed) is removed from
/// `tmp/`; leftovers of a crash are removed when the spool is opened.
///
/// The fsync of `new/` is a group commit (`DirSync`): messages renamed while one is running
/// share the next one. Each message's own file is still fsync'd by its own writer.
#[derive(Debug)]
pub struct MaildirSpool {
    root: PathBuf,
    hostname: String,
    clock: Arc<dyn Clock>,
    counter: AtomicU64,
    offload: bool,
    new_sync: Arc<DirSync>,
}

/// Group commit of a directory's fsync. One fsync of a directory makes durable every entry
/// change (here: every rename into it) completed before the fsync began, so writers whose
/// rename is done join the next round; the first of them to find no round running leads it
/// (fsyncs the directory) and the others wait for its result. Alone, a writer pays one fsync
/// as before; under load, one fsync covers every message renamed during the previous one.
/// Blocking: run it on a blocking thread.
#[derive(Debug)]
struct DirSync {
    dir: PathBuf,
    state: Mutex<DirSyncState>,
    finished: Condvar,
}

#[derive(Debug)]
struct DirSyncState {
    /// A round's fsync is in progress.
    running: bool,
    /// The round new writers join; it has not started.
    next: Arc<SyncRound>,
}

#[derive(Debug, Default)]
struct SyncRound {
    /// Set once, by the round's leader, before it wakes the others.
    result: OnceLock<Result<(), (io::ErrorKind, String)>>,
}

impl DirSync {
    fn new(dir: PathBuf) -> Self {
        let state = DirSyncState { running: false, next: Arc::new(SyncRound::default()) };
        DirSync { dir, state: Mutex::new(state), finished: Condvar::new() }
    }

    /// Returns once an fsync of the directory that began after this call has succeeded (or
    /// with its error). Call it after the change to make durable has completed.
    fn sync(&self) -> io::Result<()> {
        let mut state = self.state.lock().expect("dir sync lock");
        let round = state.next.clone();
        loop {
            if let Some(result) = round.result.get() {
                return result.clone().map_err(|(kind, msg)| io::Error::new(kind, msg));
            }
            if !state.running && Arc::ptr_eq(&state.next, &round) {
                // Lead this round: every member joined it after its rename, before this fsync.
                state.running = true;
                state.next = Arc::new(SyncRound::default());
                drop(state);
                let result = std::fs::File::open(&self.dir).and_then(|d| d.sync_all());
                let _ = round.result.set(result.as_ref().map(|_| ()).map_err(|e| (e.kind(), e.to_string())));
                let mut state = self.state.lock().expect("dir sync lock");
                state.running = false;
                self.finished.notify_all();
                drop(state);
                return result;
            }
            state = self.finished.wait(state).expect("dir sync lock");
        }
    }
}

impl MaildirSpool {
    /// Creates the Maildir at `root` if needed and empties its `tmp/` (messages a crash cut
    /// short: none was acknowledged). With `offload`, the blocking fsyncs run on tokio's
    /// blocking pool (production); without it, inline (the simulation, which has no real
    /// threads). Only one process may use a Maildir as its spool.
    pub fn open(root: impl Into<PathBuf>, hostname: &str, clock: Arc<dyn Clock>, offload: bool) -> io::Result<Self> {
        let root = root.into();
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let mut removed = 0;
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::warn!(removed, dir = %root.join("tmp").display(), "removed unfinished messages left by a crash");
        }
        let new_sync = Arc::new(DirSync::new(root.join("new")));
        Ok(MaildirSpool { root, hostname: hostname.to_string(), clock, counter: AtomicU64::new(0), offload, new_sync })
    }

    /// The Maildir's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// fsync, rename into `new/`, fsync `new/` (group commit). Blocking.
    fn commit(root: &Path, new_sync: &DirSync, message: MessageFile) -> io::Result<()> {
        let new = root.join("new").join(message.id());
        message.commit(&new)?;
        new_sync.sync()
    }
}

impl Downstream for MaildirSpool {
    fn create(&self, envelope: &Envelope) -> io::Result<MessageFile> {
        let wall = self.clock.wall();
        let secs = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}.M{}P{}Q{n}S{}.{}",
            secs.as_secs(),
            secs.subsec_micros(),
            std::process::id(),
            envelope.session,
            self.hostname
        );
        let head = trace_headers(envelope, &self.hostname, &name, wall);
        MessageFile::create(&self.root.join("tmp"), &name, head.as_bytes())
    }

    fn deliver<'a>(
        &'a self,
        _envelope: &'a Envelope,
        message: MessageFile,
    ) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            let name = message.id().to_string();
            let result = if self.offload {
                let (root, new_sync) = (self.root.clone(), self.new_sync.clone());
                tokio::task::spawn_blocking(move || Self::commit(&root, &new_sync, message))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)))
            } else {
                Self::commit(&self.root, &self.new_sync, message)
            };
            result.map(|()| name).map_err(|e| DeliveryError::Temporary(format!("spool write failed: {e}")))
        })
    }

    fn available(&self) -> Option<u64> {
        available_space(&self.root).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edges::SystemClock;
    use crate::proto::{ForwardPath, ReversePath};

    #[test]
    fn dir_sync_rounds_cover_every_writer() {
        let dir = tempfile::tempdir().unwrap();
        let sync = Arc::new(DirSync::new(dir.path().to_path_buf()));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (sync, path) = (sync.clone(), dir.path().to_path_buf());
                std::thread::spawn(move || {
                    for j in 0..20 {
                        std::fs::write(path.join(format!("f{i}-{j}")), b"x").unwrap();
                        sync.sync().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let state = sync.state.lock().unwrap();
        assert!(!state.running && state.next.result.get().is_none());
        drop(state);
        // A failing fsync fails every member of its round, and the next round runs again.
        let gone = DirSync::new(dir.path().join("missing"));
        assert_eq!(gone.sync().unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(gone.sync().unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn maildir_spool_concurrent_deliveries_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let spool =
            Arc::new(MaildirSpool::open(dir.path().join("Maildir"), "mx.test", Arc::new(SystemClock), true).unwrap());
        let mut tasks = tokio::task::JoinSet::new();
        for session in 0..64 {
            let spool = spool.clone();
            tasks.spawn(async move {
                let envelope = Envelope {
                    session,
                    client: "192.0.2.1".parse().unwrap(),
                    helo: "client.test".into(),
                    from: ReversePath::Null,
                    rcpts: vec![ForwardPath::parse("<alice@example.test>").unwrap()],
                    tls: false,
                };
                let mut message = spool.create(&envelope).unwrap();
                message.append(b"Subject: hi\r\n\r\nbody\r\n").unwrap();
                spool.deliver(&envelope, message).await.unwrap()
            });
        }
        let mut ids = std::collections::HashSet::new();
        while let Some(id) = tasks.join_next().await {
            let id = id.unwrap();
            assert!(spool.root().join("new").join(&id).is_file());
            assert!(ids.insert(id));
        }
        assert_eq!(std::fs::read_dir(spool.root().join("new")).unwrap().count(), 64);
        assert_eq!(std::fs::read_dir(spool.root().join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn maildir_spool_is_durable_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let spool = MaildirSpool::open(dir.path().join("Maildir"), "mx.test", Arc::new(SystemClock), true).unwrap();
        let envelope = Envelope {
            session: 7,
            client: "192.0.2.1".parse().unwrap(),
            helo: "client.test".into(),
            from: ReversePath::Null,
            rcpts: vec![ForwardPath::parse("<alice@example.test>").unwrap()],
            tls: false,
        };
        let mut message = spool.create(&envelope).unwrap();
        // Written into tmp/ as it arrives; the head (trace headers) is not content.
        message.append(b"Subject: hi\r\n").unwrap();
        message.append(b"\r\nbody\r\n").unwrap();
        assert!(message.path().starts_with(spool.root().join("tmp")));
        assert_eq!(message.len(), 21);
        let id = spool.deliver(&envelope, message).await.unwrap();
        let stored = std::fs::read_to_string(spool.root().join("new").join(&id)).unwrap();
        assert!(stored.starts_with(
            "Return-Path: <>\r\nX-Gatekeeper-Rcpt: <alice@example.test>\r\nReceived: from client.test ([192.0.2.1])"
        ));
        assert!(stored.ends_with("Subject: hi\r\n\r\nbody\r\n"));
        assert_eq!(std::fs::read_dir(spool.root().join("tmp")).unwrap().count(), 0);
        assert!(spool.available().is_some_and(|n| n > 0));
    }

    #[test]
    fn unfinished_messages_leave_nothing_in_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("Maildir");
        let spool = MaildirSpool::open(&root, "mx.test", Arc::new(SystemClock), false).unwrap();
        let envelope = Envelope {
            session: 8,
            client: "192.0.2.1".parse().unwrap(),
            helo: "client.test".into(),
            from: ReversePath::Null,
            rcpts: vec![ForwardPath::parse("<alice@example.test>").unwrap()],
            tls: false,
        };
        // A message dropped half-way (too big, connection lost, write error) is removed.
        let mut message = spool.create(&envelope).unwrap();
        message.append(b"Subject: cut\r\n").unwrap();
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 1);
        drop(message);
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        // What a crash leaves in tmp/ is removed when the spool is opened again.
        std::fs::write(root.join("tmp").join("1.crashed"), b"partial").unwrap();
        std::fs::write(root.join("new").join("2.delivered"), b"whole").unwrap();
        drop(spool);
        let _spool = MaildirSpool::open(&root, "mx.test", Arc::new(SystemClock), false).unwrap();
        assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);
        assert!(root.join("new").join("2.delivered").is_file(), "delivered mail is kept");
    }
}
