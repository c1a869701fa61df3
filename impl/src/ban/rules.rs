//! The kernel rulesets of docs/kernel.md §2 for the configured window, ban time and port: rule G2
//! (banned sources dropped) before rule G1 (one new connection per window, counted from the
//! last *accepted* SYN: `--rcheck` then `--set`, or an nft set `add` that never refreshes).
//!
//! - [`xt_rules`]: iptables and ip6tables rules (the IPv6 tables carry the prefix `--mask`).
//! - [`nft_script`]: an idempotent `nft -f` script for table `inet NAME`: it (re)creates the
//!   chain and the rate sets and keeps the ban sets' elements.

use std::fmt::Write as _;
use std::time::Duration;

use super::backend::nft_time;
use super::config::{NftablesSection, XtRecentSection};
use super::net::ipv6_mask;

/// What the rules are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleParams {
    /// The SMTP port (25 in production).
    pub port: u16,
    /// G1 window.
    pub window: Duration,
    /// G2 ban time (xt_recent: the ban rule's `--seconds`).
    pub ban_time: Duration,
    /// IPv6 sources are keyed by this prefix.
    pub ipv6_prefix: u8,
    /// `size` of the nft rate sets.
    pub rate_size: u32,
}

/// One iptables or ip6tables rule: the program and the arguments after `-A`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XtRule {
    /// `iptables` or `ip6tables`.
    pub program: &'static str,
    /// `INPUT -p tcp ...`.
    pub args: Vec<String>,
}

impl XtRule {
    /// The command that appends it.
    pub fn append_command(&self) -> String {
        format!("{} -A {}", self.program, self.args.join(" "))
    }
}

/// The six rules (three per family), in order.
pub fn xt_rules(cfg: &XtRecentSection, p: &RuleParams) -> Vec<XtRule> {
    let ban = p.ban_time.as_secs().max(1);
    let window = p.window.as_secs().max(1);
    let port = p.port;
    let mask6 = format!("--mask {}", ipv6_mask(p.ipv6_prefix));
    let mut out = Vec::new();
    for (program, ban_table, rate_table, mask) in [
        ("iptables", &cfg.ban_table, &cfg.rate_table, ""),
        ("ip6tables", &cfg.ban_table6, &cfg.rate_table6, mask6.as_str()),
    ] {
        let sp = if mask.is_empty() { String::new() } else { format!(" {mask}") };
        for line in [
            format!(
                "INPUT -p tcp --dport {port} -m recent --name {ban_table}{sp} --rcheck --seconds {ban} --reap -j DROP"
            ),
            format!(
                "INPUT -p tcp --dport {port} --syn -m recent --name {rate_table}{sp} --rcheck --seconds {window} -j DROP"
            ),
            format!("INPUT -p tcp --dport {port} --syn -m recent --name {rate_table}{sp} --set -j ACCEPT"),
        ] {
            out.push(XtRule { program, args: line.split(' ').map(str::to_string).collect() });
        }
    }
    out
}

/// The iptables/ip6tables rules as a shell script with comments.
pub fn xt_script(cfg: &XtRecentSection, p: &RuleParams) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# gatekeeper: xt_recent rules for port {} (docs/kernel.md §2).", p.port);
    let _ = writeln!(
        s,
        "# G2: banned sources ({}, {}) dropped for {} s after the last ban write; the gatekeeper",
        cfg.ban_table,
        cfg.ban_table6,
        p.ban_time.as_secs()
    );
    let _ = writeln!(
        s,
        "#     removes expired bans itself. G1: one new connection per {} s per source,",
        p.window.as_secs()
    );
    let _ = writeln!(s, "#     counted from the last accepted SYN (--rcheck never stamps: not sliding).");
    let _ = writeln!(
        s,
        "# IPv6 sources are keyed by their /{} (the --mask is fixed by the first rule naming a table).",
        p.ipv6_prefix
    );
    let _ = writeln!(s, "# Each table holds ip_list_tot entries (boot parameter xt_recent.ip_list_tot, default 100).");
    for r in xt_rules(cfg, p) {
        let _ = writeln!(s, "{}", r.append_command());
    }
    s
}

/// The nft script: table, chain, sets and rules; safe to load again (ban elements stay, the
/// rate sets and the chain are recreated with the current parameters).
pub fn nft_script(cfg: &NftablesSection, p: &RuleParams) -> String {
    let t = &cfg.table;
    let (b4, b6, r4, r6) = (&cfg.ban_set, &cfg.ban_set6, &cfg.rate_set, &cfg.rate_set6);
    let port = p.port;
    let window = nft_time(p.window);
    let size = p.rate_size;
    let mask = ipv6_mask(p.ipv6_prefix);
    let syn = format!("tcp dport {port} tcp flags syn / syn,ack");
    let mut s = String::new();
    let _ = writeln!(s, "# gatekeeper: nftables ruleset for port {port} (docs/kernel.md §2). Load with `nft -f FILE`;");
    let _ = writeln!(s, "# loading it again keeps the bans and resets the rate sets.");
    let _ = writeln!(s, "# G2: sources in @{b4} / @{b6} dropped (elements carry their own timeout).");
    let _ =
        writeln!(s, "# G1: one new connection per {window} per source (IPv6: per /{}), counted from", p.ipv6_prefix);
    let _ = writeln!(s, "#     the last accepted SYN: `add` never refreshes an element's timeout (not sliding).");
    let _ = writeln!(s, "add table inet {t}");
    let _ = writeln!(s, "add chain inet {t} input {{ type filter hook input priority filter; policy accept; }}");
    let _ = writeln!(s, "flush chain inet {t} input");
    let _ = writeln!(s, "add set inet {t} {b4} {{ type ipv4_addr; flags timeout; }}");
    let _ = writeln!(s, "add set inet {t} {b6} {{ type ipv6_addr; flags interval,timeout; }}");
    for (set, ty) in [(r4, "ipv4_addr"), (r6, "ipv6_addr")] {
        let decl = format!("{{ type {ty}; flags dynamic,timeout; timeout {window}; size {size}; }}");
        // Recreate so that a changed window or size takes effect.
        let _ = writeln!(s, "add set inet {t} {set} {decl}");
        let _ = writeln!(s, "delete set inet {t} {set}");
        let _ = writeln!(s, "add set inet {t} {set} {decl}");
    }
    for rule in [
        format!("tcp dport {port} ip saddr @{b4} drop"),
        format!("tcp dport {port} ip6 saddr @{b6} drop"),
        format!("{syn} ip saddr @{r4} drop"),
        format!("{syn} add @{r4} {{ ip saddr }} accept"),
        format!("{syn} ip6 saddr & {mask} @{r6} drop"),
        format!("{syn} add @{r6} {{ ip6 saddr & {mask} }} accept"),
        format!("{syn} drop"),
    ] {
        let _ = writeln!(s, "add rule inet {t} input {rule}");
    }
    let _ = writeln!(s, "# The last rule is reached only when a rate set is full: fail closed.");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> RuleParams {
        RuleParams {
            port: 25,
            window: Duration::from_secs(60),
            ban_time: Duration::from_secs(345_600),
            ipv6_prefix: 64,
            rate_size: 65_535,
        }
    }

    #[test]
    fn xt_rules_are_kernel_md_section_2() {
        let rules: Vec<String> =
            xt_rules(&XtRecentSection::default(), &params()).iter().map(XtRule::append_command).collect();
        assert_eq!(
            rules[..3],
            [
                "iptables -A INPUT -p tcp --dport 25 -m recent --name SMTPBAN --rcheck --seconds 345600 --reap -j DROP",
                "iptables -A INPUT -p tcp --dport 25 --syn -m recent --name SMTPRATE --rcheck --seconds 60 -j DROP",
                "iptables -A INPUT -p tcp --dport 25 --syn -m recent --name SMTPRATE --set -j ACCEPT",
            ]
        );
        assert_eq!(
            rules[3],
            "ip6tables -A INPUT -p tcp --dport 25 -m recent --name SMTPBAN6 --mask ffff:ffff:ffff:ffff:: --rcheck --seconds 345600 --reap -j DROP"
        );
        assert_eq!(rules.len(), 6);
    }

    #[test]
    fn nft_script_has_the_sets_and_rules() {
        let s =
            nft_script(&NftablesSection::default(), &RuleParams { window: Duration::from_millis(2500), ..params() });
        for needle in [
            "add set inet gatekeeper ban4 { type ipv4_addr; flags timeout; }",
            "add set inet gatekeeper ban6 { type ipv6_addr; flags interval,timeout; }",
            "add set inet gatekeeper rate4 { type ipv4_addr; flags dynamic,timeout; timeout 2s500ms; size 65535; }",
            "add rule inet gatekeeper input tcp dport 25 tcp flags syn / syn,ack add @rate4 { ip saddr } accept",
            "add rule inet gatekeeper input tcp dport 25 tcp flags syn / syn,ack ip6 saddr & ffff:ffff:ffff:ffff:: @rate6 drop",
            "add rule inet gatekeeper input tcp dport 25 tcp flags syn / syn,ack drop",
        ] {
            assert!(s.contains(needle), "missing {needle} in\n{s}");
        }
    }
}
