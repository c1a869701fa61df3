//! The invariants every run checks: their kinds and the record of a violation.
//!
//! A leaf: it knows no other module of the crate. The checkers themselves live where the
//! events happen (the world's ban ledger, the clients, the MTAs, the gatekeeper host); they
//! name an [`Invariant`] and the world keeps the first [`Violation`]s for the report.

/// Invariant kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Invariant {
    /// An honest message was refused for good (5xx, not a mistyped recipient).
    HonestRejected,
    /// An honest message was lost: given up after its queue lifetime, or a 250 without the
    /// message in the spool.
    HonestLost,
    /// A backscatter source, bounce MTA, callback prober or honest MTA was banned.
    ProtectedBanned,
    /// A forged-local, fake-sender, virus or dictionary client was not banned in the session
    /// that proved it.
    OffenderNotBanned,
    /// A connection was dropped or refused as banned after the ban's expiry.
    BanOutlived,
    /// The kernel let a banned client in although its ban table had room (the ban never
    /// reached the firewall).
    BanNotEnforced,
    /// A reply RFC 5321 (or the rules) forbid in that state.
    BadReply,
    /// Spam got further than the rules allow (a forged local sender accepted, a fake sender's
    /// recipient accepted).
    SpamAccepted,
}

impl Invariant {
    /// Every kind.
    pub const ALL: [Invariant; 8] = [
        Invariant::HonestRejected,
        Invariant::HonestLost,
        Invariant::ProtectedBanned,
        Invariant::OffenderNotBanned,
        Invariant::BanOutlived,
        Invariant::BanNotEnforced,
        Invariant::BadReply,
        Invariant::SpamAccepted,
    ];

    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Invariant::HonestRejected => "honest_rejected",
            Invariant::HonestLost => "honest_lost",
            Invariant::ProtectedBanned => "protected_banned",
            Invariant::OffenderNotBanned => "offender_not_banned",
            Invariant::BanOutlived => "ban_outlived",
            Invariant::BanNotEnforced => "ban_not_enforced",
            Invariant::BadReply => "bad_reply",
            Invariant::SpamAccepted => "spam_accepted",
        }
    }
}

/// A violation, as first seen.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Violation {
    /// Simulated seconds.
    pub at_secs: f64,
    /// Which invariant.
    pub invariant: Invariant,
    /// The client.
    pub client: String,
    /// What happened.
    pub detail: String,
}
