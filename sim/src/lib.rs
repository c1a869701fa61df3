//! The deterministic simulation of the gatekeeper (DESIGN.md §4–5), built on turmoil.
//!
//! The real `gatekeeper::server::Server` runs unchanged on a simulated host, in front of it the
//! kernel firewall model (the gatekeeper's own `gate` code configured like the kernel), and
//! around it the traffic of the seed's situation. Modules, lowest first:
//!
//! - [`scenario`] — the scenario file format and its validation.
//! - [`metrics`] — actor classes and their address ranges, counters, metric names.
//! - [`profile`] — seeded randomness: rate profiles, arrivals, address choice.
//! - [`world`] — what the hosts share: simulated time, the kernel model, the ledgers, and the
//!   invariant checkers that read them as events happen.
//! - [`net`] — turmoil versions of the server's listener and clock.
//! - [`client`] — SYNs through the kernel model, the PROXY v2 header, a checking SMTP client.
//! - [`actors`] — backscatter, spammers, virus senders, callback probers.
//! - [`mta`] — honest and bounce MTAs with real queues (lettre).
//! - [`dns`], [`remote`] — the DNS server and remote MX hosts that callbacks reach.
//! - [`gk`] — the gatekeeper host, wired as the binary wires it, with simulated edges.
//! - [`runner`] — builds the world, steps it, applies faults, makes the report.
//! - [`report`] — JSON, Markdown and SVG reports, and the terminal table.
//!
//! Nothing in `gatekeeper` knows this crate; nothing here reads the OS clock or randomness
//! except the runner's wall-time measurement, which never reaches a report.

pub mod actors;
pub mod client;
pub mod dns;
pub mod gk;
pub mod metrics;
pub mod mta;
pub mod net;
pub mod profile;
pub mod remote;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod world;
