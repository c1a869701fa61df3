//! The IO edges: the traits for everything the core touches outside itself, and their
//! production implementations. The simulation supplies its own versions of the same traits.
//!
//! Two layers live here (docs/design.md §3), each in its own module:
//!
//! - [`clock`], the bottom of the crate: [`Clock`], monotonic and wall time, and
//!   [`SystemClock`], the only code in the crate that reads a clock. It uses nothing else of
//!   the crate, so every layer may read time through it.
//! - [`ports`], above `session`: the server-level traits [`Listener`] (accepts connections),
//!   [`Downstream`] (the durable handoff of an accepted message), [`Verifier`] (C1),
//!   [`Scanner`] (V1), [`BanSink`] (ban persistence and the kernel) and [`Observer`] (sees
//!   every verdict; the simulation counts them), with [`BanOrder`] and [`BoxFuture`].
//!   A message travels between them as a [`MessageFile`] ([`message`]): written as it
//!   arrives, read back in chunks, removed unless committed.
//!   Their production versions, on the same layer: [`tcp`] (the TCP listener), [`spool`]
//!   ([`MaildirSpool`]) and [`relay`] ([`SmtpRelay`]), with the headers both write in
//!   [`trace`], and STARTTLS in [`tls`] (a stream wrapper beneath the session). The verifier,
//!   scanner and ban sink are built by `verify`, `scan` and `ban`, which sit above this layer.
//! - [`cluster`]: [`ClusterStore`], the store several MX hosts share their bans through
//!   (production: Redis, `crate::cluster`; the simulation: a simulated host).
//! - [`systemd`]: the service manager's notifications (`READY`, `RELOADING`, `STOPPING`,
//!   `WATCHDOG`) for `gatekeeper serve`; `RELOADING` carries systemd's monotonic timestamp,
//!   the one clock read outside [`SystemClock`], and only for systemd.
//!
//! Everything is re-exported here, so users name `edges::Clock`, `edges::Downstream`, ….

pub mod clock;
pub mod cluster;
pub mod message;
pub mod ports;
pub mod relay;
pub mod spool;
pub mod systemd;
pub mod tcp;
pub mod tls;
pub mod trace;

pub use self::clock::{Clock, SystemClock};
pub use self::cluster::{ClusterError, ClusterStore, CountDelta, NodeBeat, SharedBan};
pub use self::message::{Content, MessageFile, available_space};
pub use self::ports::{BanOrder, BanSink, BoxFuture, Downstream, Listener, Observer, Scanner, Verifier};
pub use self::relay::{AnyCertificate, RelayTls, RelayTlsMode, SmtpRelay};
pub use self::spool::MaildirSpool;
pub use self::tcp::{LISTEN_BACKLOG, NOFILE_SPARE, NofileLimit, raise_nofile_limit, tcp_listener};
pub use self::tls::{Conn, Tls, TlsSection};
pub use self::trace::{received_header, rfc5322_date, trace_headers};
