//! Gatekeeper: an SMTP front end for port 25 that protects a mail server from backscatter
//! floods and the spammers hiding in them (see docs/design.md §3 for the architecture).
//!
//! Layers, lowest first; each uses only the layers before it:
//!
//! - [`edges::clock`] — the clock: monotonic and wall time behind one trait.
//! - [`proto`] — SMTP wire types: commands, paths, replies, line and DATA receivers (sans-IO).
//! - [`policy`] — the rules E1, E2, C1, V1 and the B1–B4 ban requests as pure functions.
//! - [`gate`] — the kernel `recent` table model (xt_recent, nft sets): rules G1 and G2.
//! - [`session`] — the per-connection state machine, `handle_*` / `poll_*`, sans-IO.
//! - [`edges`] — the server-level ports (listener, downstream, verifier, scanner, ban sink,
//!   observer) and the production listener, Maildir spool and SMTP relay.
//! - [`ban`] — the ban manager: bans recorded in SQLite, pushed to the kernel (xt_recent,
//!   nftables) or kept in process, expired and restored by the gatekeeper.
//! - [`verify`] — callback verification (C1): resolver and connector edges, probe, cache, limits.
//! - [`scan`] — virus scanning (V1): the clamd client and the builtin test-signature scanner.
//! - [`cluster`] — several MX hosts as one gatekeeper: bans shared through a store (Redis),
//!   published from an outbox, applied through the ban manager.
//! - [`config`] — the TOML configuration, loaded with overrides, validated with every problem
//!   listed.
//! - [`server`] — the async driver: accept loop, gate, limits, timeouts, shutdown.
//! - [`front`] — the other front ends, drivers of the same session and rules: the Postfix
//!   policy service.
//! - [`app`] — the application assembled from settings and edges, for `gatekeeper serve` and
//!   the simulation alike.
//! - [`reload`] — SIGHUP: the configuration read again, the live part applied.
//! - [`metrics`] — the Prometheus endpoint (`[metrics] listen`): what the application counts,
//!   served at `GET /metrics`.
//!
//! Beside the layers, `testing` (in unit tests, and with the `testing` feature) is the test
//! kit: fixtures and one session driver for the tests, fuzz targets and benches.
//!
//! Nothing here reads a clock except `edges::SystemClock`; the simulation (`gatekeeper-sim`)
//! supplies its own edges and assembles the same application.

pub mod app;
pub mod ban;
pub mod cluster;
pub mod config;
pub mod dbfile;
pub mod edges;
pub mod front;
pub mod gate;
pub mod metrics;
pub mod policy;
pub mod privilege;
pub mod proto;
pub mod reload;
pub mod scan;
pub mod server;
pub mod session;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod verify;
