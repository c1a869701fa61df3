//! The reference rulesets of docs/kernel.md §2, evaluated for one SYN.
//!
//! This module owns what a SYN meets in the kernel, rule by rule, for one address family:
//! [`XtRuleset`] (iptables with xt_recent) and [`NftRuleset`] (nftables sets), each turning
//! the tables' answers into a [`GateDecision`]. It must not own tables (the caller passes them,
//! one ban and one rate table per family) nor produce ruleset text: `gatekeeper firewall
//! rules` prints that (`ban::rules`).

use std::net::IpAddr;

use super::GateDecision;
use super::config::Jiffies;
use super::nft::NftSet;
use super::xt_recent::XtRecent;

/// The iptables ruleset of docs/kernel.md §2, for one address family:
///
/// ```text
/// -m recent --name SMTPBAN  --rcheck --seconds BAN --reap -j DROP
/// --syn -m recent --name SMTPRATE --rcheck --seconds WINDOW -j DROP
/// --syn -m recent --name SMTPRATE --set -j ACCEPT
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XtRuleset {
    /// `--seconds` of the ban rule.
    pub ban_secs: u32,
    /// `--seconds` of the rate rule.
    pub window_secs: u32,
}

impl XtRuleset {
    /// Evaluates the three rules for one SYN from `addr` at `now`.
    pub fn eval_syn(&self, ban: &mut XtRecent, rate: &mut XtRecent, now: Jiffies, addr: IpAddr) -> GateDecision {
        if !ban.is_empty() && ban.rcheck(now, addr, Some(self.ban_secs), None, true) {
            return GateDecision::DropBanned;
        }
        if rate.rcheck_or_set(now, addr, self.window_secs) { GateDecision::DropRate } else { GateDecision::Accept }
    }
}

/// The nftables ruleset of docs/kernel.md §2, for one address family:
///
/// ```text
/// ip saddr @ban drop
/// tcp flags syn / syn,ack ip saddr @rate drop
/// tcp flags syn / syn,ack add @rate { ip saddr } accept
/// tcp flags syn / syn,ack drop      # reached only if add failed (set full)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NftRuleset;

impl NftRuleset {
    /// Evaluates the four rules for one SYN from `addr` at `now` (the sets mask the key).
    pub fn eval_syn(&self, ban: &NftSet, rate: &mut NftSet, now: Jiffies, addr: IpAddr) -> GateDecision {
        if !ban.is_empty() && ban.contains(now, addr) {
            return GateDecision::DropBanned;
        }
        if rate.check_or_add(now, addr) { GateDecision::DropRate } else { GateDecision::Accept }
    }
}
