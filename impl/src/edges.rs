//! The IO edges: traits for everything the server touches outside itself, and their production
//! implementations. The simulation supplies its own versions of the same traits.
//!
//! - [`Clock`]: monotonic and wall time. [`SystemClock`] is the only code in the crate that
//!   reads a clock; it uses tokio's clock, which `tokio::time::pause` and turmoil control.
//! - [`Listener`]: accepts connections ([`tokio::net::TcpListener`] here).
//! - [`Downstream`]: the durable handoff of an accepted message ([`MaildirSpool`],
//!   [`SmtpRelay`]).
//! - [`Verifier`], [`Scanner`], [`BanSink`]: callback verification, virus scanning and ban
//!   persistence, plugged in by the issues that build them.
//! - [`Observer`]: sees every verdict event (the simulation counts them).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::policy::{BanReason, BanRequest, ScanOutcome, Verification};
use crate::proto::{ForwardPath, Mailbox, ReversePath};
use crate::session::{DeliveryError, Envelope, Event};

/// A boxed future, for the object-safe edges.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Monotonic and wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Monotonic now, on the same base as `tokio::time::Instant` (timers are armed with it).
    fn now(&self) -> Instant;
    /// Wall-clock now, for Received headers, spool file names and ban records.
    fn wall(&self) -> SystemTime;
}

/// The production clock: tokio's monotonic clock and the system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Accepts connections. The stream is anything tokio can read and write.
pub trait Listener: Send + 'static {
    /// A connected stream.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Waits for the next connection and its peer address.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
    /// The address listened on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// Listen backlog of [`tcp_listener`]: room for a burst of SYNs while the accept loop is busy
/// (the kernel caps it at `net.core.somaxconn`, 4096 since Linux 5.4). tokio's and std's
/// `bind` ask for 128, which a flood overflows: the overflowing clients' SYNs are dropped and
/// only retransmitted a second later (measured by the load benchmark: 500 clients connecting at
/// once, 127 of them waited 1 s).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener on `addr` with [`LISTEN_BACKLOG`] and `SO_REUSEADDR` (as std does).
/// Must be called inside a tokio runtime.
pub fn tcp_listener(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        // Replies are small and written once per batch: no Nagle delay.
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::TcpListener::local_addr(self)
    }
}

/// The durable handoff of an accepted message. `Ok` means the message is safe (fsync'd or
/// accepted by the next hop): only then does the client get 250.
pub trait Downstream: Send + Sync + std::fmt::Debug {
    /// Hands the message off; returns a queue id.
    fn deliver<'a>(&'a self, envelope: &'a Envelope, message: Bytes) -> BoxFuture<'a, Result<String, DeliveryError>>;
}

/// Callback verification of a sender (C1).
pub trait Verifier: Send + Sync + std::fmt::Debug {
    /// Probes the sender's MX; never fails, an error is `Verification::Unknown`.
    fn verify<'a>(&'a self, sender: &'a Mailbox) -> BoxFuture<'a, Verification>;
}

/// Virus scanning (V1).
pub trait Scanner: Send + Sync + std::fmt::Debug {
    /// Scans a message; an error is `ScanOutcome::Failed`.
    fn scan(&self, message: Bytes) -> BoxFuture<'_, ScanOutcome>;
}

/// One ban order: which client, why, proven by what, decided when, for how long. The one shape
/// of a ban request, whoever gives it: the server for a rule's ban (through [`BanSink`]), an
/// administrator (`gatekeeper bans add`, [`BanOrder::manual`]), the ban manager's own API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanOrder {
    /// The client; the ban covers its network (the address, or its IPv6 /64 by default).
    pub addr: IpAddr,
    /// B1–B4, or manual.
    pub reason: BanReason,
    /// The session that proved it (0 for a manual ban).
    pub session: u64,
    /// The command or finding that proves it; for a manual ban, the administrator's text.
    pub evidence: String,
    /// When it was decided (wall clock); `None`: when it is recorded.
    pub at: Option<SystemTime>,
    /// How long it lasts, before any escalation; `None`: the configured `gate.ban_time`.
    pub duration: Option<Duration>,
}

impl BanOrder {
    /// The ban the rules asked for in session `session` (`request`: reason and evidence); say
    /// when and for how long with [`Self::decided_at`] and [`Self::lasting`].
    pub fn from_request(addr: IpAddr, session: u64, request: BanRequest) -> Self {
        let BanRequest { reason, evidence } = request;
        BanOrder { addr, reason, session, evidence, at: None, duration: None }
    }

    /// A manual ban of `addr` by an administrator, who says why in `evidence`: decided when
    /// recorded, for the configured ban time.
    pub fn manual(addr: IpAddr, evidence: impl Into<String>) -> Self {
        BanOrder { addr, reason: BanReason::Manual, session: 0, evidence: evidence.into(), at: None, duration: None }
    }

    /// The same order, decided at `at`.
    pub fn decided_at(self, at: SystemTime) -> Self {
        BanOrder { at: Some(at), ..self }
    }

    /// The same order, lasting `duration` (before any escalation).
    pub fn lasting(self, duration: Duration) -> Self {
        BanOrder { duration: Some(duration), ..self }
    }
}

/// Where bans go beyond the in-process gate: persistence and the kernel (the ban manager).
pub trait BanSink: Send + Sync + std::fmt::Debug {
    /// Records the ban durably; the client's reply waits for this.
    fn ban(&self, order: BanOrder) -> BoxFuture<'_, ()>;
}

/// Sees every verdict event with its client, after it is logged.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// One verdict.
    fn on_event(&self, client: IpAddr, session: u64, event: &Event);
}

/// The embedded default downstream: a Maildir (`new/`, `tmp/`, `cur/`) under the state dir.
///
/// Each message is written to `tmp/`, fsync'd, renamed into `new/`, and `new/` is fsync'd, so
/// a 250 is never given for a message a crash could lose. The envelope is kept in the message
/// as `Return-Path:` and `X-Gatekeeper-Rcpt:` headers above a `Received:` trace header.
///
/// The fsync of `new/` is a group commit ([`DirSync`]): messages renamed while one is running
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
    /// Creates the Maildir at `root` if needed. With `offload`, the blocking writes run on
    /// tokio's blocking pool (production); without it, inline (the simulation, which has no
    /// real threads).
    pub fn open(root: impl Into<PathBuf>, hostname: &str, clock: Arc<dyn Clock>, offload: bool) -> io::Result<Self> {
        let root = root.into();
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let new_sync = Arc::new(DirSync::new(root.join("new")));
        Ok(MaildirSpool { root, hostname: hostname.to_string(), clock, counter: AtomicU64::new(0), offload, new_sync })
    }

    /// The Maildir's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn write(root: &Path, new_sync: &DirSync, name: &str, content: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let tmp = root.join("tmp").join(name);
        let new = root.join("new").join(name);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(content)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &new)?;
        new_sync.sync()
    }
}

/// The trace and envelope headers put above a delivered message.
pub fn trace_headers(envelope: &Envelope, hostname: &str, id: &str, wall: SystemTime) -> String {
    let rcpts: Vec<String> = envelope.rcpts.iter().map(ForwardPath::to_string).collect();
    format!(
        "Return-Path: {}\r\nX-Gatekeeper-Rcpt: {}\r\nReceived: from {} ([{}])\r\n\tby {hostname} (Gatekeeper) with ESMTP id {id};\r\n\t{}\r\n",
        envelope.from,
        rcpts.join(", "),
        if envelope.helo.is_empty() { "unknown" } else { &envelope.helo },
        envelope.client,
        rfc5322_date(wall),
    )
}

impl Downstream for MaildirSpool {
    fn deliver<'a>(&'a self, envelope: &'a Envelope, message: Bytes) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
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
            let mut content = trace_headers(envelope, &self.hostname, &name, wall).into_bytes();
            content.extend_from_slice(&message);
            let result = if self.offload {
                let (root, new_sync, file) = (self.root.clone(), self.new_sync.clone(), name.clone());
                tokio::task::spawn_blocking(move || Self::write(&root, &new_sync, &file, &content))
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)))
            } else {
                Self::write(&self.root, &self.new_sync, &name, &content)
            };
            result.map(|()| name).map_err(|e| DeliveryError::Temporary(format!("spool write failed: {e}")))
        })
    }
}

/// Relays accepted messages to a downstream SMTP server (the real MTA) with lettre. The 250
/// is given only once the downstream has said 250 itself.
#[derive(Debug)]
pub struct SmtpRelay {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    hostname: String,
    clock: Arc<dyn Clock>,
}

impl SmtpRelay {
    /// A relay to `addr` (plain SMTP, as to a local MTA on loopback) with a per-message timeout.
    pub fn new(addr: SocketAddr, hostname: &str, timeout: Duration, clock: Arc<dyn Clock>) -> Self {
        let transport = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(addr.ip().to_string())
            .port(addr.port())
            .timeout(Some(timeout))
            .hello_name(lettre::transport::smtp::extension::ClientId::Domain(hostname.to_string()))
            .build();
        SmtpRelay { transport, hostname: hostname.to_string(), clock }
    }
}

fn lettre_address(m: &Mailbox) -> Result<lettre::Address, DeliveryError> {
    m.to_string().parse().map_err(|e| DeliveryError::Permanent(format!("address {m} not relayable: {e}")))
}

impl Downstream for SmtpRelay {
    fn deliver<'a>(&'a self, envelope: &'a Envelope, message: Bytes) -> BoxFuture<'a, Result<String, DeliveryError>> {
        use lettre::AsyncTransport;
        Box::pin(async move {
            let from = match &envelope.from {
                ReversePath::Null => None,
                ReversePath::Mailbox(m) => Some(lettre_address(m)?),
            };
            let mut to = Vec::with_capacity(envelope.rcpts.len());
            for r in &envelope.rcpts {
                match r {
                    ForwardPath::Mailbox(m) => to.push(lettre_address(m)?),
                    ForwardPath::Postmaster => to.push("postmaster@localhost".parse().expect("valid address")),
                }
            }
            let lettre_envelope = lettre::address::Envelope::new(from, to)
                .map_err(|e| DeliveryError::Permanent(format!("bad envelope: {e}")))?;
            let id = format!("G{}", envelope.session);
            let mut content = trace_headers(envelope, &self.hostname, &id, self.clock.wall()).into_bytes();
            content.extend_from_slice(&message);
            match self.transport.send_raw(&lettre_envelope, &content).await {
                Ok(response) => Ok(format!("{id} ({})", response.message().collect::<Vec<_>>().join(" "))),
                Err(e) if e.is_permanent() => Err(DeliveryError::Permanent(e.to_string())),
                Err(e) => Err(DeliveryError::Temporary(e.to_string())),
            }
        })
    }
}

/// An RFC 5322 date (`Fri, 27 Nov 2026 06:41:27 +0000`) from a wall-clock time, in UTC.
pub fn rfc5322_date(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm), days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 +0000");
        let t = UNIX_EPOCH + Duration::from_secs(1_795_761_687);
        assert_eq!(rfc5322_date(t), "Fri, 27 Nov 2026 06:41:27 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

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
                };
                spool.deliver(&envelope, Bytes::from_static(b"Subject: hi\r\n\r\nbody\r\n")).await.unwrap()
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
    async fn tcp_listener_accepts() {
        let listener = tcp_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_stream, peer) = tokio::net::TcpListener::accept(&listener).await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
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
        };
        let id = spool.deliver(&envelope, Bytes::from_static(b"Subject: hi\r\n\r\nbody\r\n")).await.unwrap();
        let stored = std::fs::read_to_string(spool.root().join("new").join(&id)).unwrap();
        assert!(stored.starts_with(
            "Return-Path: <>\r\nX-Gatekeeper-Rcpt: <alice@example.test>\r\nReceived: from client.test ([192.0.2.1])"
        ));
        assert!(stored.ends_with("Subject: hi\r\n\r\nbody\r\n"));
        assert_eq!(std::fs::read_dir(spool.root().join("tmp")).unwrap().count(), 0);
    }
}
