//! Configuration of the gate and of its tables, with the kernel's defaults and limits.
//!
//! This module owns the `[gate]` table ([`GateConfig`], [`GateKind`]), the per-table
//! declarations ([`XtRecentConfig`], [`NftSetConfig`]), their validation ([`GateConfigError`]),
//! the kernel's constants (HZ, `ip_list_tot`, ring and set sizes) and the conversion of
//! durations to jiffies. It must not hold table state or decide anything about packets.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::table::XtMask;

/// Kernel time: ticks of `HZ` per second since the model's origin.
pub type Jiffies = u64;

/// The kernel's HZ on the project's machines (docs/kernel.md §1: HZ=250, 4 ms per jiffy).
pub const DEFAULT_HZ: u32 = 250;
/// xt_recent's default `ip_list_tot`: entries per table.
pub const DEFAULT_IP_LIST_TOT: u32 = 100;
/// xt_recent's default timestamp ring size R (no `--hitcount`, `ip_pkt_list_tot=0`).
pub const DEFAULT_RING_SIZE: u32 = 32;
/// Largest ring xt_recent builds (`XT_RECENT_MAX_NSTAMPS`).
pub const MAX_RING_SIZE: u32 = 65_536;
/// Largest `--hitcount` the kernel accepts.
pub const MAX_HITCOUNT: u32 = MAX_RING_SIZE - 1;
/// Size an nft dynamic set gets when declared without `size` (docs/kernel.md §2, tested).
pub const NFT_DEFAULT_DYNSET_SIZE: u32 = 65_535;
/// nft's default `gc-interval`.
pub const NFT_DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(1);
/// Largest table the model accepts (slab indices are `u32`, with room for the probe index).
pub const MAX_TABLE_ENTRIES: u32 = 1 << 30;

/// Converts a duration to jiffies the way nf_tables does for timeouts and expirations:
/// milliseconds (truncated), then `nsecs_to_jiffies64` rounded down, but at least 1 for a
/// non-zero value (`nf_msecs_to_jiffies64`).
pub fn nft_duration_to_jiffies(d: Duration, hz: u32) -> Jiffies {
    let ms = d.as_millis();
    if ms == 0 {
        return 0;
    }
    let j = ms.saturating_mul(u128::from(hz)) / 1000;
    u64::try_from(j).unwrap_or(u64::MAX).max(1)
}

// ---------------------------------------------------------------------------------------------
// xt_recent
// ---------------------------------------------------------------------------------------------

/// How an xt_recent table is created: fixed by the first rule that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XtRecentConfig {
    /// `xt_recent.ip_list_tot`: most entries the table holds (IPv4 and IPv6 together).
    pub ip_list_tot: u32,
    /// Kernel HZ: `--seconds s` means a window of `s * hz` jiffies.
    pub hz: u32,
    /// Timestamp ring size R, a power of two (see [`XtRecentConfig::ring_size_for`]).
    pub ring_size: u32,
    /// The `--mask` of the first rule that named the table.
    pub mask: XtMask,
}

impl Default for XtRecentConfig {
    fn default() -> Self {
        XtRecentConfig {
            ip_list_tot: DEFAULT_IP_LIST_TOT,
            hz: DEFAULT_HZ,
            ring_size: DEFAULT_RING_SIZE,
            mask: XtMask::ALL,
        }
    }
}

impl XtRecentConfig {
    /// The ring size a rule creates (`recent_mt_check`): `ip_pkt_list_tot` (0 = automatic)
    /// when it is set and larger than the hitcount, else the hitcount, else 32, rounded up to
    /// a power of two.
    pub fn ring_size_for(hit_count: u32, ip_pkt_list_tot: u32) -> u32 {
        let n = if ip_pkt_list_tot != 0 && hit_count < ip_pkt_list_tot {
            ip_pkt_list_tot
        } else if hit_count != 0 {
            hit_count
        } else {
            DEFAULT_RING_SIZE
        };
        n.min(MAX_RING_SIZE).next_power_of_two()
    }

    /// Checks the limits the model relies on.
    pub fn validate(&self) -> Result<(), GateConfigError> {
        if self.ip_list_tot == 0 || self.ip_list_tot > MAX_TABLE_ENTRIES {
            return Err(GateConfigError::TableSize(self.ip_list_tot));
        }
        if self.hz == 0 {
            return Err(GateConfigError::Hz);
        }
        if !self.ring_size.is_power_of_two() || self.ring_size > MAX_RING_SIZE {
            return Err(GateConfigError::RingSize(self.ring_size));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// nft sets
// ---------------------------------------------------------------------------------------------

/// How an nft set with `flags timeout` is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NftSetConfig {
    /// Kernel HZ.
    pub hz: u32,
    /// `size`: most elements, counting expired ones not yet collected. `None`: no limit (a
    /// non-dynamic set declared without `size`; a dynamic one gets
    /// [`NFT_DEFAULT_DYNSET_SIZE`]).
    pub size: Option<u32>,
    /// The set's default `timeout`; `None`: elements without their own timeout are permanent.
    pub timeout: Option<Duration>,
    /// `gc-interval`: garbage collection runs at every multiple of it (from jiffy 0).
    pub gc_interval: Duration,
    /// Mask IPv6 keys to this prefix (an interval set holding /64s, or
    /// `ip6 saddr & ffff:ffff:ffff:ffff::`). `None`: full addresses.
    pub ipv6_prefix: Option<u8>,
}

impl Default for NftSetConfig {
    fn default() -> Self {
        NftSetConfig {
            hz: DEFAULT_HZ,
            size: Some(NFT_DEFAULT_DYNSET_SIZE),
            timeout: None,
            gc_interval: NFT_DEFAULT_GC_INTERVAL,
            ipv6_prefix: None,
        }
    }
}

impl NftSetConfig {
    /// Checks the limits the model relies on.
    pub fn validate(&self) -> Result<(), GateConfigError> {
        if self.hz == 0 {
            return Err(GateConfigError::Hz);
        }
        if let Some(s) = self.size
            && (s == 0 || s > MAX_TABLE_ENTRIES)
        {
            return Err(GateConfigError::TableSize(s));
        }
        if nft_duration_to_jiffies(self.gc_interval, self.hz) == 0 {
            return Err(GateConfigError::GcInterval);
        }
        if self.ipv6_prefix.is_some_and(|p| p > 128) {
            return Err(GateConfigError::Ipv6Prefix(self.ipv6_prefix.unwrap_or(0)));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Gate
// ---------------------------------------------------------------------------------------------

/// Which kernel mechanism the gate models, with its kernel-side parameters.
///
/// In TOML: `kind = { backend = "xt_recent", ip_list_tot = 100, hz = 250 }` or
/// `kind = { backend = "nft", size = 65535, hz = 250 }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum GateKind {
    /// xt_recent tables (`ip_list_tot` entries each, LRU eviction when full).
    XtRecent {
        /// `xt_recent.ip_list_tot` (a boot-time kernel parameter).
        #[serde(default = "default_ip_list_tot")]
        ip_list_tot: u32,
        /// Kernel HZ.
        #[serde(default = "default_hz")]
        hz: u32,
    },
    /// nft sets (the rate set refuses new elements when full: fail closed).
    Nft {
        /// `size` of the rate sets.
        #[serde(default = "default_nft_size")]
        size: u32,
        /// Kernel HZ.
        #[serde(default = "default_hz")]
        hz: u32,
    },
}

fn default_ip_list_tot() -> u32 {
    DEFAULT_IP_LIST_TOT
}

fn default_hz() -> u32 {
    DEFAULT_HZ
}

fn default_nft_size() -> u32 {
    NFT_DEFAULT_DYNSET_SIZE
}

impl Default for GateKind {
    fn default() -> Self {
        GateKind::XtRecent { ip_list_tot: DEFAULT_IP_LIST_TOT, hz: DEFAULT_HZ }
    }
}

impl GateKind {
    /// Kernel HZ of either kind.
    pub fn hz(&self) -> u32 {
        match *self {
            GateKind::XtRecent { hz, .. } | GateKind::Nft { hz, .. } => hz,
        }
    }
}

/// Configuration of the connection gate (rules G1 and G2): the `[gate]` table.
///
/// Durations are written the human way, like the rest of the configuration; missing fields
/// take the defaults; unknown fields are errors. Example (TOML):
///
/// ```toml
/// [gate]
/// window = "60s"        # G1
/// ban_time = "4d"       # G2
/// ipv6_prefix = 64
/// [gate.kind]
/// backend = "xt_recent" # or "nft" (then `size = 65535` instead of `ip_list_tot`)
/// ip_list_tot = 100
/// hz = 250
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    /// The kernel mechanism and its parameters.
    pub kind: GateKind,
    /// G1: at most one new connection per source per window, counted from the last accepted
    /// one (non-sliding). xt_recent needs whole seconds (`--seconds`).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// G2: how long a ban drops a source. xt_recent needs whole seconds.
    #[serde(with = "humantime_serde")]
    pub ban_time: Duration,
    /// IPv6 sources are keyed (rate-limited and banned) by this prefix length.
    pub ipv6_prefix: u8,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            kind: GateKind::default(),
            window: Duration::from_secs(60),
            ban_time: Duration::from_secs(4 * 24 * 3600),
            ipv6_prefix: 64,
        }
    }
}

impl GateConfig {
    /// Every problem with the configuration, each as `field: what is wrong` (empty if none).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let hz = self.kind.hz();
        if hz == 0 || hz > 100_000 {
            out.push(format!("kind.hz: {hz} is not between 1 and 100000"));
        }
        let (xt, size_name, size) = match self.kind {
            GateKind::XtRecent { ip_list_tot, .. } => (true, "kind.ip_list_tot", ip_list_tot),
            GateKind::Nft { size, .. } => (false, "kind.size", size),
        };
        if size == 0 || size > MAX_TABLE_ENTRIES {
            out.push(format!("{size_name}: {size} is not between 1 and {MAX_TABLE_ENTRIES}"));
        }
        for (name, d) in [("window", self.window), ("ban_time", self.ban_time)] {
            if d.as_secs() > u64::from(u32::MAX) {
                out.push(format!("{name}: longer than {} s", u32::MAX));
            } else if xt && (d.subsec_nanos() != 0 || d.as_secs() == 0) {
                out.push(format!("{name}: xt_recent needs whole seconds, at least 1s (--seconds)"));
            } else if d.as_millis() == 0 {
                out.push(format!("{name}: must be at least 1ms"));
            }
        }
        if self.ipv6_prefix > 128 {
            out.push(format!("ipv6_prefix: /{} is longer than 128", self.ipv6_prefix));
        }
        out
    }

    /// Checks that the configuration can be expressed in the kernel model.
    pub fn validate(&self) -> Result<(), GateConfigError> {
        let problems = self.problems();
        if problems.is_empty() { Ok(()) } else { Err(GateConfigError::Gate(problems.join("; "))) }
    }
}

/// A configuration the model cannot express.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateConfigError {
    /// HZ must be at least 1.
    #[error("hz must be at least 1")]
    Hz,
    /// `ip_list_tot` / `size` must be between 1 and 2^30.
    #[error("table size {0} out of range 1..=2^30")]
    TableSize(u32),
    /// The ring size must be a power of two up to 65536.
    #[error("ring size {0} is not a power of two up to 65536")]
    RingSize(u32),
    /// `--hitcount` above 65535 is refused by the kernel.
    #[error("hitcount {0} exceeds 65535")]
    Hitcount(u32),
    /// The gc interval must be at least one jiffy.
    #[error("gc interval must be at least one jiffy")]
    GcInterval,
    /// An IPv6 prefix longer than 128 bits.
    #[error("ipv6 prefix /{0} is longer than 128")]
    Ipv6Prefix(u8),
    /// A [`GateConfig`] problem list (see [`GateConfig::problems`]).
    #[error("{0}")]
    Gate(String),
}
