//! The deterministic simulation of the gatekeeper, built on turmoil: what it models and why is
//! docs/simulation.md; its place in the design, docs/design.md §4 (the simulation) and §5
//! (scenarios).
//!
//! The real `gatekeeper::server::Server` runs unchanged on a simulated host, in front of it the
//! kernel firewall model (the gatekeeper's own `gate` code configured like the kernel), and
//! around it the traffic of the seed's situation.
//!
//! Modules, lowest first; each uses only the modules before it (`use crate::…`), so the module
//! graph has no cycle:
//!
//! - [`fmt`] — numbers and durations for humans (a leaf).
//! - [`invariants`] — the invariant kinds and the record of a violation (a leaf).
//! - [`metrics`] — actor classes and their address ranges, counters, metric names.
//! - [`profile`] — seeded randomness: rate profiles, arrivals, address choice.
//! - [`scenario`] — the scenario file format and its validation, and the host table.
//! - [`world`] — what the hosts share: simulated time, the kernel model, the ledgers, and the
//!   invariant checkers that read them as events happen.
//! - [`net`] — turmoil versions of the server's listener and clock.
//! - [`client`] — SYNs through the kernel model, the PROXY v2 header, a checking SMTP client.
//! - [`actors`] — backscatter, spammers, virus senders, callback probers.
//! - [`mta`] — honest and bounce MTAs with real queues (lettre).
//! - [`dns`], [`remote`] — the DNS server and remote MX hosts that callbacks reach.
//! - [`store`] — the cluster store as a simulated host, and the gatekeeper's `ClusterStore` on
//!   it (several gatekeeper hosts sharing bans, docs/cluster.md).
//! - [`gk`] — the gatekeeper host, wired as the binary wires it, with simulated edges.
//! - [`report`] — JSON, Markdown and SVG reports, and the terminal table.
//! - [`runner`] — builds the world, steps it, applies faults, makes the report.
//!
//! Nothing in `gatekeeper` knows this crate; nothing here reads the OS clock or randomness
//! except the runner's wall-time measurement, which never reaches a report.

pub mod actors;
pub mod client;
pub mod dns;
pub mod fmt;
pub mod gk;
pub mod invariants;
pub mod metrics;
pub mod mta;
pub mod net;
pub mod profile;
pub mod remote;
pub mod replay;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod store;
pub mod wake;
pub mod world;
