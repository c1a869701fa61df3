//! The deterministic simulation of the gatekeeper (DESIGN.md §4), built on turmoil.
//!
//! This crate supplies turmoil versions of the server's edges ([`net`]) so that the real
//! `gatekeeper::server::Server` runs unchanged on a simulated host under simulated time.
//! Nothing in `gatekeeper` knows this crate.

pub mod net;
