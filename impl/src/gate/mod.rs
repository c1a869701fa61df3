//! The kernel `recent` table model: exact xt_recent and nft-set semantics for rules G1 and G2.
//!
//! This module owns the in-process connection gate ([`Gate`]) that the server uses when it runs
//! on embedded defaults, and that the simulation puts in front of the gatekeeper host as its
//! kernel firewall model. It reproduces docs/kernel.md to the jiffy:
//!
//! - [`XtRecent`]: one xt_recent table (`--set`, `--rcheck`, `--update`, `--remove`,
//!   `--seconds`, `--hitcount`, `--reap`, `--mask`, the `ip_list_tot` LRU, the timestamp ring,
//!   `/proc/net/xt_recent/NAME` reads and writes).
//! - [`NftSet`]: one nft set with `flags timeout` (packet-path `add` / `update`, lookups,
//!   control-plane `add element` / `create element` / `delete element` with 6.12 semantics,
//!   `size`, expired elements that still count until garbage collection).
//! - [`XtRuleset`] and [`NftRuleset`]: the docs/kernel.md §2 rulesets evaluated for one SYN.
//! - [`Gate`]: rules G2 then G1 on top of either backend, driven by [`Instant`]s (or kernel
//!   jiffies, to replay a kernel trace).
//!
//! The rooms: `config` (the `[gate]` table, table declarations, kernel constants), `table`
//! (keys, masks, and the slab + hash index both backends store their entries in),
//! `xt_recent`, `nft`, `ruleset`, and `xt_proc` (the `/proc` text protocol with the kernel's
//! address parsers). Reference models of both backends and the proptests that hold the tables
//! to them live in `tests`.
//!
//! It must not do IO, read a clock, or let anything observable depend on hash order: time is
//! always an argument (`now`, in jiffies for the table types and as an [`Instant`] for
//! [`Gate`]), and tables are a slab plus an open-addressing index plus intrusive lists, so
//! iteration order is a pure function of the operations applied. The hash seed is random per
//! process (like the kernel's `hash_rnd`), which affects speed only, never results. Every
//! packet-path operation is O(1) (amortized for the nft expiry queue; a control-plane add
//! whose expiry is earlier than one already queued is O(log n)). Time must never go
//! backwards, as kernel jiffies never do; [`Gate`] enforces that for its callers. Nothing
//! outside this module sees the tables behind a [`Gate`]: it answers for them.
//!
//! Not modelled: `--rttl` and stored TTLs (rendered as `ttl: 0`), `--rdest`, `!` (invert),
//! the 16-bit `index` overflow of a 65536-slot ring, and kernel memory-allocation failures.

mod config;
mod nft;
mod ruleset;
mod table;
#[cfg(test)]
mod tests;
mod xt_proc;
mod xt_recent;

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

pub use config::{
    DEFAULT_HZ, DEFAULT_IP_LIST_TOT, DEFAULT_RING_SIZE, GateConfig, GateConfigError, GateKind, Jiffies, MAX_HITCOUNT,
    MAX_RING_SIZE, MAX_TABLE_ENTRIES, NFT_DEFAULT_DYNSET_SIZE, NFT_DEFAULT_GC_INTERVAL, NftSetConfig, XtRecentConfig,
    nft_duration_to_jiffies,
};
pub use nft::{ElementOpts, NftElement, NftError, NftSet};
pub use ruleset::{NftRuleset, XtRuleset};
pub use table::XtMask;
pub use xt_proc::ProcError;
pub use xt_recent::{XtEntry, XtIter, XtRecent};

use table::prefix_mask128;

/// What the firewall does with one SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateDecision {
    /// Let it through: the connection reaches the server.
    Accept,
    /// Dropped by the connection-rate rule (G1). With nft this includes the final `drop` of a
    /// SYN whose `add` failed because the rate set was full.
    DropRate,
    /// Dropped because the source is banned (G2).
    DropBanned,
}

impl GateDecision {
    /// A stable lower-case name for logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            GateDecision::Accept => "accept",
            GateDecision::DropRate => "drop_rate",
            GateDecision::DropBanned => "drop_banned",
        }
    }
}

impl fmt::Display for GateDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The tables behind a [`Gate`], one per address family as in docs/kernel.md §2 (iptables and
/// ip6tables use separate table names; nft sets are typed per family). Private: callers ask
/// the [`Gate`], so which tables exist stays this module's business.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant, reason = "one per gate, never moved on a hot path")]
enum GateBackend {
    /// xt_recent: ban tables checked with `--rcheck --seconds BAN --reap`, rate tables with
    /// `--rcheck --seconds WINDOW` then `--set`. The IPv6 tables carry the prefix mask.
    XtRecent {
        /// IPv4 ban table (`SMTPBAN`).
        ban4: XtRecent,
        /// IPv6 ban table (`SMTPBAN6`).
        ban6: XtRecent,
        /// IPv4 rate table (`SMTPRATE`).
        rate4: XtRecent,
        /// IPv6 rate table (`SMTPRATE6`).
        rate6: XtRecent,
        /// The rules' `--seconds`.
        rules: XtRuleset,
    },
    /// nft: ban sets without size (elements carry their own timeout), rate sets with
    /// `timeout WINDOW; size N`.
    Nft {
        /// `ban4`.
        ban4: NftSet,
        /// `ban6` (interval set of prefixes).
        ban6: NftSet,
        /// `rate4`.
        rate4: NftSet,
        /// `rate6` (keyed by the masked prefix).
        rate6: NftSet,
    },
}

/// The in-process connection gate: G2 (ban) then G1 (rate), exactly as the kernel would apply
/// them, on the xt_recent or nft model.
///
/// Time enters as [`Instant`]s, converted to jiffies since `origin` (rounded down, and never
/// earlier than the latest jiffy already seen, as kernel time never goes backwards); the gate
/// never reads a clock. IPv4-mapped IPv6 sources are treated as IPv4 (the kernel sees IPv4
/// packets); IPv6 sources are keyed by their `ipv6_prefix`.
#[derive(Debug, Clone)]
pub struct Gate {
    cfg: GateConfig,
    origin: Instant,
    hz: u32,
    /// The latest jiffy seen, for operations without a `now` ([`Gate::unban`]).
    last_jiffies: Jiffies,
    v6_mask: u128,
    backend: GateBackend,
}

impl Gate {
    /// Creates a gate whose jiffy 0 is `origin`.
    ///
    /// # Panics
    /// If `cfg` fails [`GateConfig::validate`]; use [`Gate::try_new`] for untrusted input.
    pub fn new(cfg: GateConfig, origin: Instant) -> Self {
        match Gate::try_new(cfg, origin) {
            Ok(g) => g,
            Err(e) => panic!("invalid gate config: {e}"),
        }
    }

    /// Creates a gate whose jiffy 0 is `origin`, checking the configuration first.
    pub fn try_new(cfg: GateConfig, origin: Instant) -> Result<Self, GateConfigError> {
        cfg.validate()?;
        let hz = cfg.kind.hz();
        let backend = match cfg.kind {
            GateKind::XtRecent { ip_list_tot, hz } => {
                let v4 = XtRecentConfig { ip_list_tot, hz, ring_size: DEFAULT_RING_SIZE, mask: XtMask::ALL };
                let v6 = XtRecentConfig { mask: XtMask::ipv6_prefix(cfg.ipv6_prefix), ..v4 };
                GateBackend::XtRecent {
                    ban4: XtRecent::new(v4),
                    ban6: XtRecent::new(v6),
                    rate4: XtRecent::new(v4),
                    rate6: XtRecent::new(v6),
                    rules: XtRuleset {
                        ban_secs: cfg.ban_time.as_secs() as u32,
                        window_secs: cfg.window.as_secs() as u32,
                    },
                }
            }
            GateKind::Nft { size, hz } => {
                let ban = NftSetConfig {
                    hz,
                    size: None,
                    timeout: None,
                    gc_interval: NFT_DEFAULT_GC_INTERVAL,
                    ipv6_prefix: None,
                };
                let rate = NftSetConfig { size: Some(size), timeout: Some(cfg.window), ..ban };
                let v6 = Some(cfg.ipv6_prefix);
                GateBackend::Nft {
                    ban4: NftSet::new(ban),
                    ban6: NftSet::new(NftSetConfig { ipv6_prefix: v6, ..ban }),
                    rate4: NftSet::new(rate),
                    rate6: NftSet::new(NftSetConfig { ipv6_prefix: v6, ..rate }),
                }
            }
        };
        Ok(Gate { v6_mask: prefix_mask128(cfg.ipv6_prefix), cfg, origin, hz, last_jiffies: 0, backend })
    }

    /// The configuration.
    pub fn config(&self) -> &GateConfig {
        &self.cfg
    }

    /// The instant of jiffy 0.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// `now` in jiffies since the origin, rounded down (0 before the origin).
    pub fn jiffies(&self, now: Instant) -> Jiffies {
        let d = now.saturating_duration_since(self.origin);
        let hz = u64::from(self.hz);
        d.as_secs().saturating_mul(hz).saturating_add(u64::from(d.subsec_nanos()) * hz / 1_000_000_000)
    }

    /// One new connection attempt (a SYN) from `addr`: G2 then G1, non-sliding.
    #[inline]
    pub fn check(&mut self, now: Instant, addr: IpAddr) -> GateDecision {
        self.check_at(self.jiffies(now), addr)
    }

    /// [`check`](Self::check) at kernel jiffy `j` (as `/proc/net/xt_recent` shows it), for
    /// replaying a kernel trace. Like every operation, `j` is taken as the latest jiffy seen
    /// if it is earlier.
    pub fn check_at(&mut self, j: Jiffies, addr: IpAddr) -> GateDecision {
        let j = self.advance(j);
        let addr = addr.to_canonical();
        match &mut self.backend {
            GateBackend::XtRecent { ban4, ban6, rate4, rate6, rules } => {
                if addr.is_ipv4() {
                    rules.eval_syn(ban4, rate4, j, addr)
                } else {
                    rules.eval_syn(ban6, rate6, j, addr)
                }
            }
            GateBackend::Nft { ban4, ban6, rate4, rate6 } => {
                for s in [&mut *ban4, &mut *ban6, &mut *rate4, &mut *rate6] {
                    s.maybe_gc(j);
                }
                if addr.is_ipv4() {
                    NftRuleset.eval_syn(ban4, rate4, j, addr)
                } else {
                    NftRuleset.eval_syn(ban6, rate6, j, addr)
                }
            }
        }
    }

    /// Push a ban, as the kernel backends would. Returns whether the ban is in the table.
    ///
    /// - xt_recent: write `+addr` (pre-masked) to the ban table: a new entry (which may evict
    ///   the least recently stamped entry of a full table, possibly another ban) or a fresh
    ///   stamp. The ban lasts the configured `ban_time` from now, whatever `for_` says:
    ///   `--seconds` is per rule, not per entry (the ban manager enforces shorter bans by
    ///   unbanning).
    /// - nft: `add element … { addr timeout for_ expires for_ }`: a new element, or an existing
    ///   one whose expiry (and timeout) restart.
    ///
    /// A ban shorter than 1 ms bans nothing (and returns false) with either kind.
    pub fn ban(&mut self, now: Instant, addr: IpAddr, for_: Duration) -> bool {
        let j = self.tick(now);
        let addr = self.ban_key(addr);
        if for_.as_millis() == 0 {
            return false;
        }
        match &mut self.backend {
            GateBackend::XtRecent { ban4, ban6, .. } => {
                let t = if addr.is_ipv4() { ban4 } else { ban6 };
                t.proc_add(j, addr);
                true
            }
            GateBackend::Nft { ban4, ban6, rate4, rate6 } => {
                for s in [&mut *ban4, &mut *ban6, &mut *rate4, &mut *rate6] {
                    s.maybe_gc(j);
                }
                let t = if addr.is_ipv4() { ban4 } else { ban6 };
                let opts = ElementOpts { timeout: Some(for_), expires: Some(for_), create: false };
                t.add_element(j, addr, opts).is_ok()
            }
        }
    }

    /// Lift a ban (`-addr` / `delete element`). Returns whether there was one. nft judges
    /// expiry at the latest time the gate has seen.
    pub fn unban(&mut self, addr: IpAddr) -> bool {
        let addr = self.ban_key(addr);
        let j = self.last_jiffies;
        match &mut self.backend {
            GateBackend::XtRecent { ban4, ban6, .. } => {
                if addr.is_ipv4() {
                    ban4.proc_remove(addr)
                } else {
                    ban6.proc_remove(addr)
                }
            }
            GateBackend::Nft { ban4, ban6, .. } => {
                let t = if addr.is_ipv4() { ban4 } else { ban6 };
                t.delete_element(j, addr).is_ok()
            }
        }
    }

    /// Would a SYN from `addr` at `now` be dropped as banned? (No side effects.)
    pub fn is_banned(&self, now: Instant, addr: IpAddr) -> bool {
        let j = self.jiffies(now).max(self.last_jiffies);
        let addr = self.ban_key(addr);
        match &self.backend {
            GateBackend::XtRecent { ban4, ban6, rules, .. } => {
                let t = if addr.is_ipv4() { ban4 } else { ban6 };
                t.peek(j, addr, Some(rules.ban_secs), None)
            }
            GateBackend::Nft { ban4, ban6, .. } => {
                let t = if addr.is_ipv4() { ban4 } else { ban6 };
                t.contains(j, addr)
            }
        }
    }

    /// What the ban tables hold at `now`, IPv4 first: banned addresses, and banned IPv6
    /// networks by their first address (bans are written pre-masked).
    ///
    /// - xt_recent: every entry in LRU order, stale ones included (they hold a slot until
    ///   reaped or evicted), as `/proc/net/xt_recent/NAME` lists them.
    /// - nft: the unexpired elements in slab order, as `nft list set` shows them (expiry
    ///   judged at `now`, or the latest time the gate has seen if later).
    pub fn banned(&self, now: Instant) -> impl Iterator<Item = IpAddr> + '_ {
        let j = self.jiffies(now).max(self.last_jiffies);
        let (xt, nft) = match &self.backend {
            GateBackend::XtRecent { ban4, ban6, .. } => (Some(ban4.iter().chain(ban6.iter()).map(|e| e.addr())), None),
            GateBackend::Nft { ban4, ban6, .. } => (None, Some(ban4.iter(j).chain(ban6.iter(j)).map(|e| e.addr))),
        };
        xt.into_iter().flatten().chain(nft.into_iter().flatten())
    }

    /// Occupancy of the ban tables (both families): xt_recent entries, including stale ones
    /// that still hold a slot; nft `nelems`, including expired elements not yet collected.
    pub fn banned_len(&self) -> usize {
        match &self.backend {
            GateBackend::XtRecent { ban4, ban6, .. } => ban4.len() + ban6.len(),
            GateBackend::Nft { ban4, ban6, .. } => ban4.len() + ban6.len(),
        }
    }

    /// Would a SYN from `addr` at `now`, if G1 let it in, make a full rate table forget a
    /// source that is still inside its window? True for xt_recent when the family's table is
    /// full, `addr` is not in it and the least recently stamped entry (the eviction victim) was
    /// stamped within the window; always false for nft, whose full set refuses instead. (No
    /// side effects.)
    pub fn rate_would_forget_live(&self, now: Instant, addr: IpAddr) -> bool {
        let j = self.jiffies(now).max(self.last_jiffies);
        let addr = addr.to_canonical();
        match &self.backend {
            GateBackend::XtRecent { rate4, rate6, rules, .. } => {
                let t = if addr.is_ipv4() { rate4 } else { rate6 };
                let window = u64::from(rules.window_secs) * u64::from(self.hz);
                t.len() >= t.capacity()
                    && t.get(addr).is_none()
                    && t.iter().next().is_some_and(|victim| j.saturating_sub(victim.last_seen()) < window)
            }
            GateBackend::Nft { .. } => false,
        }
    }

    /// Occupancy of the rate tables (both families), counted like [`Gate::banned_len`].
    pub fn rate_len(&self) -> usize {
        match &self.backend {
            GateBackend::XtRecent { rate4, rate6, .. } => rate4.len() + rate6.len(),
            GateBackend::Nft { rate4, rate6, .. } => rate4.len() + rate6.len(),
        }
    }

    /// Estimated heap bytes held by all tables.
    pub fn memory_bytes(&self) -> usize {
        match &self.backend {
            GateBackend::XtRecent { ban4, ban6, rate4, rate6, .. } => {
                ban4.memory_bytes() + ban6.memory_bytes() + rate4.memory_bytes() + rate6.memory_bytes()
            }
            GateBackend::Nft { ban4, ban6, rate4, rate6 } => {
                ban4.memory_bytes() + ban6.memory_bytes() + rate4.memory_bytes() + rate6.memory_bytes()
            }
        }
    }

    /// Jiffies for an operation, never earlier than any before: kernel jiffies do not go
    /// backwards, and callers that read a clock before taking a lock may hand in slightly
    /// out-of-order instants.
    #[inline]
    fn tick(&mut self, now: Instant) -> Jiffies {
        self.advance(self.jiffies(now))
    }

    /// `j`, or the latest jiffy seen if that is later; remembered as the latest.
    #[inline]
    fn advance(&mut self, j: Jiffies) -> Jiffies {
        let j = j.max(self.last_jiffies);
        self.last_jiffies = j;
        j
    }

    /// The key a ban is written under: canonical family, IPv6 masked to the prefix (the
    /// `/proc` protocol is not masked, so the writer pre-masks).
    fn ban_key(&self, addr: IpAddr) -> IpAddr {
        match addr.to_canonical() {
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & self.v6_mask)),
            v4 => v4,
        }
    }
}
