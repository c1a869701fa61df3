//! The load benchmark (issue [load bench]) and the criterion benches' support.
//!
//! The load benchmark drives real SMTP servers over real TCP on loopback, each session from
//! its own source address in 127.0.0.0/8, and reads the server's CPU and memory from /proc.
//! It measures; it never asserts a time. Modules, lowest first:
//!
//! - [`sources`] — the 127.0.0.0/8 source addresses, one per session, and their cursor.
//! - [`procfs`] — CPU time and resident memory of a server process (and its children).
//! - [`client`] — one SMTP session of a workload class, as a client, with its checks;
//!   optionally over STARTTLS (a full TLS handshake per session).
//! - [`load`] — the drivers: closed loop (N sessions at concurrency C), open loop (a rate
//!   for a duration), hold (C sessions open at once), and an external client's run.
//! - [`report`] — the result of a run (one JSON line) and the side-by-side table.
//! - [`null_smtpd`] — the do-nothing SMTP responder: the same replies without the logic,
//!   the ceiling of what loopback and this client allow.
//!
//! The binary `loadgen` is the command line over these; `ci/bench-peers.sh` runs it against
//! the gatekeeper, Postfix and the responder side by side.

pub mod client;
pub mod load;
pub mod null_smtpd;
pub mod procfs;
pub mod report;
pub mod sources;
