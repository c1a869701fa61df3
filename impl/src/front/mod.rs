//! Front ends beside the SMTP server (docs/design.md §6, "Front ends are drivers"): the
//! Postfix policy service and the milter. Each parses its own protocol sans-IO ([`policy`],
//! [`milter`]) and drives the same [`Session`](crate::session::Session), rules, tallies,
//! verifier and ban manager as the SMTP server, through the server's front-end methods; a
//! verdict becomes an `action=` or a milter response only here, at the edge.

pub mod milter;
pub mod milter_service;
pub mod policy;
pub mod policy_service;

pub use self::milter_service::{MilterSection, MilterService};
pub use self::policy::{Answer, PolicyError, PolicyEvent, PolicyReceiver, Request};
pub use self::policy_service::{OnTimeout, PolicySection, PolicyService};
