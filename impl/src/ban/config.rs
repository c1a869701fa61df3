//! The `[bans]` configuration table: which backend holds the bans, its table and set names,
//! the allowlist, escalation for repeat offenders and the maintenance intervals.
//!
//! The ban time and the IPv6 prefix are not repeated here: they are `[gate]`'s `ban_time` and
//! `ipv6_prefix`, so the kernel rules, the in-process gate and the ban records cannot disagree.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::net::Net;
use crate::gate::{DEFAULT_IP_LIST_TOT, GateConfig, GateKind, NFT_DEFAULT_DYNSET_SIZE};

/// Where bans are pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Only the in-process gate (the server answers banned clients 554). Embedded default.
    #[default]
    Memory,
    /// xt_recent tables written through `/proc/net/xt_recent/NAME`.
    XtRecent,
    /// nft sets in table `inet gatekeeper`, through the `nft` binary.
    Nftables,
}

impl BackendKind {
    /// The name used in the configuration and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Memory => "memory",
            BackendKind::XtRecent => "xt_recent",
            BackendKind::Nftables => "nftables",
        }
    }

    /// True if the kernel drops banned (and rate-limited) clients: the server then leaves G1 to
    /// the kernel.
    pub fn is_kernel(self) -> bool {
        self != BackendKind::Memory
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[bans]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BanConfig {
    /// `memory` (embedded default), `xt_recent` or `nftables`.
    pub backend: BackendKind,
    /// Networks never banned (`192.0.2.0/24`, `2001:db8::/32`, single addresses). A ban whose
    /// network overlaps one of them is not recorded.
    pub allowlist: Vec<String>,
    /// The xt_recent backend.
    pub xt_recent: XtRecentSection,
    /// The nftables backend.
    pub nftables: NftablesSection,
    /// Longer bans for repeat offenders.
    pub escalation: Escalation,
    /// How often the server picks up bans added or removed by `gatekeeper bans` and expires
    /// due bans.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// How often a failed backend operation is retried.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// How often the kernel table is read back and missing bans re-applied (a reloaded
    /// ruleset or a flushed table loses them silently, docs/kernel.md §4.2).
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Ban history older than this is deleted.
    #[serde(with = "humantime_serde")]
    pub history_keep: Duration,
    /// The deadline of one kernel call (an `nft` run, a `/proc/net/xt_recent` write): a hung
    /// `nft` is killed and the operation retried like any backend failure. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub kernel_timeout: Duration,
    /// How long a session waits for its ban to be recorded before its reply goes on (the
    /// in-process gate holds the ban already; the order completes in the background). 15 s.
    #[serde(with = "humantime_serde")]
    pub order_timeout: Duration,
    /// The most active bans. Beyond it new automatic bans (B1–B4) are refused with an error
    /// log (older bans are never evicted to make room); manual bans still go in. 1,000,000.
    pub max_active: usize,
    /// This many active IPv6 bans inside one /48 are widened to one ban of the /48, which
    /// replaces them (a holder of a large prefix cannot fill the table one /64 at a time).
    /// 0 turns it off; it is off anyway with xt_recent (its table's `--mask` is fixed) and
    /// when `gate.ipv6_prefix` is 48 or shorter. Default 16.
    pub widen_v6_after: usize,
}

impl Default for BanConfig {
    fn default() -> Self {
        BanConfig {
            backend: BackendKind::Memory,
            allowlist: Vec::new(),
            xt_recent: XtRecentSection::default(),
            nftables: NftablesSection::default(),
            escalation: Escalation::default(),
            sync_interval: Duration::from_secs(1),
            retry_interval: Duration::from_secs(5),
            reconcile_interval: Duration::from_secs(30),
            history_keep: Duration::from_secs(365 * 86_400),
            kernel_timeout: super::backend::DEFAULT_KERNEL_TIMEOUT,
            order_timeout: Duration::from_secs(15),
            max_active: DEFAULT_MAX_ACTIVE,
            widen_v6_after: 16,
        }
    }
}

/// `[bans] max_active` unless configured.
pub const DEFAULT_MAX_ACTIVE: usize = 1_000_000;

/// The prefix many IPv6 bans are widened to.
pub const WIDE_V6_PREFIX: u8 = 48;

/// `[bans.xt_recent]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct XtRecentSection {
    /// Where the tables appear (`/proc/net/xt_recent`; a test may point elsewhere).
    pub proc_dir: PathBuf,
    /// IPv4 ban table (`iptables ... --name SMTPBAN`).
    pub ban_table: String,
    /// IPv6 ban table (`ip6tables ... --name SMTPBAN6 --mask <prefix>`).
    pub ban_table6: String,
    /// IPv4 rate table (G1).
    pub rate_table: String,
    /// IPv6 rate table (G1).
    pub rate_table6: String,
    /// The kernel's `ip_list_tot`: entries one table holds. Beyond it the kernel silently
    /// evicts the least recently stamped entry, which may be a ban (docs/kernel.md §4.1).
    pub capacity: u32,
    /// Warn when the active bans of one table reach this percentage of `capacity`.
    pub warn_percent: u32,
}

impl Default for XtRecentSection {
    fn default() -> Self {
        XtRecentSection {
            proc_dir: PathBuf::from("/proc/net/xt_recent"),
            ban_table: "SMTPBAN".into(),
            ban_table6: "SMTPBAN6".into(),
            rate_table: "SMTPRATE".into(),
            rate_table6: "SMTPRATE6".into(),
            capacity: DEFAULT_IP_LIST_TOT,
            warn_percent: 80,
        }
    }
}

/// `[bans.nftables]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NftablesSection {
    /// The `nft` binary.
    pub nft: PathBuf,
    /// The table (family `inet`).
    pub table: String,
    /// IPv4 ban set.
    pub ban_set: String,
    /// IPv6 ban set (an interval set: bans are prefixes).
    pub ban_set6: String,
    /// IPv4 rate set (G1).
    pub rate_set: String,
    /// IPv6 rate set (G1, keyed by the prefix).
    pub rate_set6: String,
}

impl Default for NftablesSection {
    fn default() -> Self {
        NftablesSection {
            nft: PathBuf::from("nft"),
            table: "gatekeeper".into(),
            ban_set: "ban4".into(),
            ban_set6: "ban6".into(),
            rate_set: "rate4".into(),
            rate_set6: "rate6".into(),
        }
    }
}

/// `[bans.escalation]`: a client banned again within `lookback` of an earlier ban gets
/// `ban_time × factor^(earlier bans)`, at most `max`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Escalation {
    /// Off by default: every ban lasts `[gate] ban_time`.
    pub enabled: bool,
    /// Multiplier per earlier ban.
    pub factor: u32,
    /// Longest ban.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Earlier bans that started longer ago than this are forgiven.
    #[serde(with = "humantime_serde")]
    pub lookback: Duration,
}

impl Default for Escalation {
    fn default() -> Self {
        Escalation {
            enabled: false,
            factor: 2,
            max: Duration::from_secs(30 * 86_400),
            lookback: Duration::from_secs(30 * 86_400),
        }
    }
}

impl Escalation {
    /// The ban time for a client with `earlier` bans inside the lookback.
    pub fn duration(&self, base: Duration, earlier: u32) -> Duration {
        if !self.enabled || earlier == 0 {
            return base;
        }
        let mult = u64::from(self.factor).saturating_pow(earlier.min(64));
        let secs = base.as_secs_f64() * mult as f64;
        let d =
            if secs.is_finite() && secs < self.max.as_secs_f64() { Duration::from_secs_f64(secs) } else { self.max };
        d.max(base)
    }
}

/// xt_recent table names: the kernel allows up to 199 bytes without `/`; we also keep them
/// shell-safe.
fn valid_xt_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// nft identifiers: a letter, then letters, digits and `_`.
fn valid_nft_name(s: &str) -> bool {
    let mut b = s.bytes();
    s.len() <= 64
        && b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

impl BanConfig {
    /// The allowlist, parsed (entries that do not parse are in [`BanConfig::problems`]).
    pub fn allowlist_nets(&self) -> Vec<Net> {
        self.allowlist.iter().filter_map(|s| s.parse().ok()).collect()
    }

    /// Every problem with this table alone, each as `field: what is wrong` (empty if none).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for a in &self.allowlist {
            if let Err(e) = a.parse::<Net>() {
                out.push(format!("allowlist: {e}"));
            }
        }
        let x = &self.xt_recent;
        for (name, v) in [
            ("xt_recent.ban_table", &x.ban_table),
            ("xt_recent.ban_table6", &x.ban_table6),
            ("xt_recent.rate_table", &x.rate_table),
            ("xt_recent.rate_table6", &x.rate_table6),
        ] {
            if !valid_xt_name(v) {
                out.push(format!("{name}: {v:?} is not a table name (1-64 of A-Z a-z 0-9 _ -)"));
            }
        }
        let names = [&x.ban_table, &x.ban_table6, &x.rate_table, &x.rate_table6];
        if (1..names.len()).any(|i| names[..i].contains(&names[i])) {
            out.push("xt_recent: the four table names must differ (a table's mask is fixed by its first rule)".into());
        }
        if x.capacity == 0 {
            out.push("xt_recent.capacity: must be at least 1 (the kernel's ip_list_tot)".into());
        }
        if x.warn_percent == 0 || x.warn_percent > 100 {
            out.push(format!("xt_recent.warn_percent: {} is not between 1 and 100", x.warn_percent));
        }
        let n = &self.nftables;
        for (name, v) in [
            ("nftables.table", &n.table),
            ("nftables.ban_set", &n.ban_set),
            ("nftables.ban_set6", &n.ban_set6),
            ("nftables.rate_set", &n.rate_set),
            ("nftables.rate_set6", &n.rate_set6),
        ] {
            if !valid_nft_name(v) {
                out.push(format!("{name}: {v:?} is not an nft identifier (a letter, then A-Z a-z 0-9 _)"));
            }
        }
        let sets = [&n.ban_set, &n.ban_set6, &n.rate_set, &n.rate_set6];
        if (1..sets.len()).any(|i| sets[..i].contains(&sets[i])) {
            out.push("nftables: the four set names must differ".into());
        }
        if n.nft.as_os_str().is_empty() {
            out.push("nftables.nft: empty path".into());
        }
        let e = &self.escalation;
        if e.enabled && e.factor < 2 {
            out.push(format!("escalation.factor: {} must be at least 2", e.factor));
        }
        for (name, d) in [
            ("sync_interval", self.sync_interval),
            ("retry_interval", self.retry_interval),
            ("reconcile_interval", self.reconcile_interval),
            ("history_keep", self.history_keep),
            ("escalation.max", e.max),
            ("escalation.lookback", e.lookback),
        ] {
            if d.is_zero() {
                out.push(format!("{name}: must be longer than 0s"));
            }
        }
        if self.sync_interval > Duration::from_secs(60) {
            out.push("sync_interval: at most 60s (bans added by `gatekeeper bans` wait this long)".into());
        }
        for (name, d, min, max) in [
            ("kernel_timeout", self.kernel_timeout, Duration::from_millis(100), Duration::from_secs(600)),
            ("order_timeout", self.order_timeout, Duration::from_millis(100), Duration::from_secs(600)),
        ] {
            if d < min || d > max {
                out.push(format!(
                    "{name}: {} is not between {} and {}",
                    humantime_serde::re::humantime::format_duration(d),
                    humantime_serde::re::humantime::format_duration(min),
                    humantime_serde::re::humantime::format_duration(max)
                ));
            }
        }
        if self.max_active == 0 {
            out.push("max_active: must be at least 1".into());
        }
        if self.widen_v6_after == 1 {
            out.push("widen_v6_after: 1 would ban a /48 for its first /64; use 0 (off) or at least 2".into());
        }
        out
    }

    /// True if many IPv6 bans in one /48 are widened to the /48 with this backend and prefix.
    pub fn widens(&self, ipv6_prefix: u8) -> bool {
        self.widen_v6_after >= 2 && self.backend != BackendKind::XtRecent && ipv6_prefix > WIDE_V6_PREFIX
    }

    /// Problems that involve `[gate]` as well, each naming its field from the top.
    pub fn problems_with_gate(&self, gate: &GateConfig) -> Vec<String> {
        let mut out = Vec::new();
        match (self.backend, &gate.kind) {
            (BackendKind::XtRecent, GateKind::Nft { .. }) => out.push(
                "bans.backend: xt_recent needs gate.kind.backend = \"xt_recent\" (the in-process model must match the kernel)".into(),
            ),
            (BackendKind::Nftables, GateKind::XtRecent { .. }) => out.push(
                "bans.backend: nftables needs gate.kind.backend = \"nft\" (the in-process model must match the kernel)".into(),
            ),
            _ => {}
        }
        if self.escalation.enabled && self.escalation.max < gate.ban_time {
            out.push("bans.escalation.max: shorter than gate.ban_time".into());
        }
        if self.backend == BackendKind::XtRecent
            && (gate.window.subsec_nanos() != 0 || gate.ban_time.subsec_nanos() != 0)
        {
            out.push("gate.window, gate.ban_time: xt_recent needs whole seconds (--seconds)".into());
        }
        out
    }

    /// The nft rate sets' `size`: `[gate.kind] size` when the gate models nft.
    pub fn nft_rate_size(gate: &GateConfig) -> u32 {
        match gate.kind {
            GateKind::Nft { size, .. } => size,
            GateKind::XtRecent { .. } => NFT_DEFAULT_DYNSET_SIZE,
        }
    }

    /// Advice for `check-config`: what the chosen backend needs from the kernel.
    pub fn notes(&self, gate: &GateConfig) -> Vec<String> {
        let mut out = Vec::new();
        match self.backend {
            BackendKind::Memory => out.push(
                "bans: backend memory — bans are enforced by the server (554 greeting), not the kernel; \
                 set bans.backend = \"xt_recent\" or \"nftables\" to drop banned clients' SYNs"
                    .into(),
            ),
            BackendKind::XtRecent => {
                let x = &self.xt_recent;
                out.push(format!(
                    "bans: backend xt_recent, tables {}/{} (bans) and {}/{} (rate) in {}; install the rules with \
                     `gatekeeper firewall rules --backend xt_recent --config FILE`",
                    x.ban_table,
                    x.ban_table6,
                    x.rate_table,
                    x.rate_table6,
                    x.proc_dir.display()
                ));
                out.push(format!(
                    "bans: an xt_recent table holds at most ip_list_tot = {} entries (bans.xt_recent.capacity); the \
                     kernel silently evicts the least recently stamped entry when a table is full, unbanning a \
                     client. The gatekeeper warns at {}% of it. To raise it, add `xt_recent.ip_list_tot=N` to the \
                     kernel command line when xt_recent is built in, or `options xt_recent ip_list_tot=N` in \
                     /etc/modprobe.d/ when it is a module (reload it with no table in use), check \
                     /sys/module/xt_recent/parameters/ip_list_tot, and set bans.xt_recent.capacity = N",
                    x.capacity, x.warn_percent
                ));
                if let GateKind::XtRecent { ip_list_tot, .. } = gate.kind
                    && ip_list_tot != x.capacity
                {
                    out.push(format!(
                        "bans: gate.kind.ip_list_tot ({ip_list_tot}) differs from bans.xt_recent.capacity ({}); \
                         the in-process model should use the kernel's value",
                        x.capacity
                    ));
                }
            }
            BackendKind::Nftables => {
                let n = &self.nftables;
                out.push(format!(
                    "bans: backend nftables, table inet {} (sets {}, {}, {}, {}); install it with \
                     `gatekeeper firewall apply --config FILE`; ban elements carry their own timeout, so they \
                     survive with their remaining time when re-applied",
                    n.table, n.ban_set, n.ban_set6, n.rate_set, n.rate_set6
                ));
            }
        }
        out.push(format!(
            "bans: at most {} active bans (bans.max_active); beyond it new automatic bans are refused and logged",
            self.max_active
        ));
        if self.widens(gate.ipv6_prefix) {
            out.push(format!(
                "bans: {} or more IPv6 bans inside one /48 are replaced by one ban of the /48 (bans.widen_v6_after)",
                self.widen_v6_after
            ));
        } else if self.backend == BackendKind::XtRecent && self.widen_v6_after >= 2 {
            out.push(
                "bans: IPv6 bans are not widened to /48 with xt_recent (the table's --mask is fixed); \
                 bans.max_active still caps them"
                    .into(),
            );
        }
        if self.escalation.enabled {
            out.push(format!(
                "bans: escalation on: a repeat offender within {} gets gate.ban_time × {}^earlier bans, at most {}",
                humantime_serde::re::humantime::format_duration(self.escalation.lookback),
                self.escalation.factor,
                humantime_serde::re::humantime::format_duration(self.escalation.max)
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_memory() {
        let c = BanConfig::default();
        assert_eq!(c.backend, BackendKind::Memory);
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert!(c.problems_with_gate(&GateConfig::default()).is_empty());
    }

    #[test]
    fn parses_from_toml_with_human_durations() {
        let c: BanConfig = toml::from_str(
            r#"
            backend = "xt_recent"
            allowlist = ["192.0.2.0/24", "2001:db8::1"]
            sync_interval = "500ms"
            [xt_recent]
            capacity = 1000
            [escalation]
            enabled = true
            max = "60d"
            "#,
        )
        .unwrap();
        assert_eq!(c.backend, BackendKind::XtRecent);
        assert_eq!(c.xt_recent.capacity, 1000);
        assert_eq!(c.xt_recent.ban_table, "SMTPBAN");
        assert_eq!(c.sync_interval, Duration::from_millis(500));
        assert_eq!(c.escalation.max, Duration::from_secs(60 * 86_400));
        assert_eq!(c.allowlist_nets().len(), 2);
        assert!(toml::from_str::<BanConfig>("nonsense = 1").is_err());
        assert!(toml::from_str::<BanConfig>("[xt_recent]\nip_list_tot = 1").is_err());
    }

    #[test]
    fn problems_are_listed() {
        let mut c = BanConfig { allowlist: vec!["10.0.0.0/40".into()], ..BanConfig::default() };
        c.xt_recent.ban_table = "bad name".into();
        c.xt_recent.rate_table = "SMTPBAN6".into();
        c.xt_recent.capacity = 0;
        c.nftables.ban_set = "1x".into();
        c.escalation = Escalation { enabled: true, factor: 1, ..Escalation::default() };
        c.sync_interval = Duration::ZERO;
        let all = c.problems().join("\n");
        for needle in [
            "allowlist",
            "xt_recent.ban_table",
            "must differ",
            "xt_recent.capacity",
            "nftables.ban_set",
            "escalation.factor",
            "sync_interval",
        ] {
            assert!(all.contains(needle), "missing {needle} in\n{all}");
        }
        let c = BanConfig { backend: BackendKind::Nftables, ..BanConfig::default() };
        assert!(c.problems_with_gate(&GateConfig::default())[0].contains("gate.kind.backend"));
    }

    #[test]
    fn escalation_multiplies_up_to_max() {
        let day = Duration::from_secs(86_400);
        let e = Escalation { enabled: true, factor: 2, max: 10 * day, lookback: 30 * day };
        assert_eq!(e.duration(4 * day, 0), 4 * day);
        assert_eq!(e.duration(4 * day, 1), 8 * day);
        assert_eq!(e.duration(4 * day, 2), 10 * day);
        assert_eq!(e.duration(4 * day, 1000), 10 * day);
        assert_eq!(Escalation::default().duration(4 * day, 5), 4 * day);
    }

    #[test]
    fn notes_explain_ip_list_tot() {
        let c = BanConfig { backend: BackendKind::XtRecent, ..BanConfig::default() };
        let notes = c.notes(&GateConfig::default()).join("\n");
        assert!(notes.contains("xt_recent.ip_list_tot=N"), "{notes}");
        assert!(notes.contains("kernel command line"), "{notes}");
    }
}
