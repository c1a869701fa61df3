//! The server-level ports: the traits through which the server reaches everything outside
//! itself besides time ([`Listener`], [`Downstream`], [`Verifier`], [`Scanner`], [`BanSink`],
//! [`Observer`]), and [`BanOrder`], what the server hands the ban sink. Only the traits live
//! here: the production implementations are in the sibling modules (and in `verify`, `scan`
//! and `ban`), the simulation's in `gatekeeper-sim`.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite};

use super::message::MessageFile;
use crate::policy::{BanReason, BanRequest, ScanOutcome, Verification};
use crate::proto::Mailbox;
use crate::session::{DeliveryError, Envelope, Event};

/// A boxed future, for the object-safe edges.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Accepts connections. The stream is anything tokio can read and write.
pub trait Listener: Send + 'static {
    /// A connected stream.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Waits for the next connection and its peer address.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;
    /// The address listened on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// Where accepted messages go: the file a message is written to while it arrives, and its
/// durable handoff. `Ok` from [`Downstream::deliver`] means the message is safe (fsync'd or
/// accepted by the next hop): only then does the client get 250.
pub trait Downstream: Send + Sync + std::fmt::Debug {
    /// A new, empty file in the downstream's `tmp/` for the message `envelope` announces
    /// (after DATA); the driver appends the content as it arrives. Blocking but quick (a
    /// file creation).
    fn create(&self, envelope: &Envelope) -> io::Result<MessageFile>;

    /// Hands the received message off; returns a queue id. The file is the downstream's from
    /// here: committed into place, or removed (dropped) on failure.
    fn deliver<'a>(
        &'a self,
        envelope: &'a Envelope,
        message: MessageFile,
    ) -> BoxFuture<'a, Result<String, DeliveryError>>;

    /// Free octets on the filesystem messages are written to, for the free-space threshold
    /// (`server.queue_minfree`); `None` when the downstream cannot tell (the default).
    fn available(&self) -> Option<u64> {
        None
    }
}

/// Callback verification of a sender (C1).
pub trait Verifier: Send + Sync + std::fmt::Debug {
    /// Probes the sender's MX; never fails, an error is `Verification::Unknown`.
    fn verify<'a>(&'a self, sender: &'a Mailbox) -> BoxFuture<'a, Verification>;
}

/// Virus scanning (V1).
pub trait Scanner: Send + Sync + std::fmt::Debug {
    /// Scans a received message, reading its file in chunks (never whole into memory); an
    /// error is `ScanOutcome::Failed`.
    fn scan<'a>(&'a self, message: &'a MessageFile) -> BoxFuture<'a, ScanOutcome>;
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

    /// `true` if `addr` is never banned (its network is allowlisted): the server then asks
    /// for no ban and does not end its sessions for one.
    fn exempt(&self, addr: IpAddr) -> bool {
        let _ = addr;
        false
    }
}

/// Sees every verdict event with its client, after it is logged.
pub trait Observer: Send + Sync + std::fmt::Debug {
    /// One verdict.
    fn on_event(&self, client: IpAddr, session: u64, event: &Event);
}
