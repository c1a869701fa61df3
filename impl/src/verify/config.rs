//! The `[callbacks]` table: how callback probes (C1) resolve, connect, time out, cache and
//! limit themselves. Used only when `rules.verify_senders` is on. `examples/gatekeeper.toml`
//! documents each field.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use super::cache::CacheTtls;
use super::dns::DnsSettings;
use super::limits::ProbeLimits;
use crate::proto::Domain;

/// Where cached results live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// `<state_dir>/state.sqlite`: survives restarts (the default).
    #[default]
    Sqlite,
    /// In memory: lost on restart (tests, the simulation).
    Memory,
}

/// `[callbacks]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbacksConfig {
    /// Name servers as `ip` or `ip:port`; empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<String>,
    /// Per DNS query.
    #[serde(with = "humantime_serde")]
    pub dns_timeout: Duration,
    /// Tries per DNS query.
    pub dns_attempts: usize,
    /// The remote SMTP port (25; other values are for tests).
    pub port: u16,
    /// Connecting to an MX.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Each remote reply (greeting, EHLO, MAIL, RCPT).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// A whole probe, DNS included; the client waits this long for its RCPT reply at most.
    #[serde(with = "humantime_serde")]
    pub budget: Duration,
    /// MX hosts tried at most, in preference order.
    pub max_mx: usize,
    /// Our EHLO name; unset: `server.hostname`.
    pub hello_name: Option<String>,
    /// `sqlite` (under the state directory) or `memory`.
    pub cache: CacheMode,
    /// Cached addresses at most.
    pub cache_entries_max: usize,
    /// How long a valid sender is cached.
    #[serde(with = "humantime_serde")]
    pub positive_ttl: Duration,
    /// How long a sender that cannot exist is cached.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// How long an inconclusive result (and an undeliverable domain: NXDOMAIN may be our
    /// resolver's fault) is cached.
    #[serde(with = "humantime_serde")]
    pub unknown_ttl: Duration,
    /// How long a domain found accepting any address (and each such sender) is remembered.
    #[serde(with = "humantime_serde")]
    pub accept_all_ttl: Duration,
    /// Concurrent probes of one domain.
    pub domain_concurrency: usize,
    /// Probes of one domain per `rate_window`.
    pub domain_rate: u32,
    /// The per-domain rate window (fixed, not sliding).
    #[serde(with = "humantime_serde")]
    pub rate_window: Duration,
    /// Concurrent probes overall.
    pub max_concurrent: usize,
    /// Domains never probed: their senders are valid. Subdomains are included.
    pub allowlist: Vec<String>,
    /// Probe MX addresses that are not global too (loopback, RFC 1918, link local, ULA …).
    /// Off (the default), an MX pointing inside is never connected to and its sender stays
    /// unverified (never banned for it): nobody can use the gatekeeper to scan an inside
    /// network. For labs and tests only. Our own addresses are never probed either way.
    pub allow_private_mx: bool,
    /// Seed for MX tie shuffling and the accept-all check's random local parts; unset: drawn
    /// from the wall clock at start.
    pub seed: Option<u64>,
}

impl Default for CallbacksConfig {
    fn default() -> Self {
        let ttls = CacheTtls::default();
        let limits = ProbeLimits::default();
        let dns = DnsSettings::default();
        CallbacksConfig {
            nameservers: Vec::new(),
            dns_timeout: dns.timeout,
            dns_attempts: dns.attempts,
            port: 25,
            connect_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
            budget: Duration::from_secs(60),
            max_mx: 2,
            hello_name: None,
            cache: CacheMode::Sqlite,
            cache_entries_max: 1_000_000,
            positive_ttl: ttls.positive,
            negative_ttl: ttls.negative,
            unknown_ttl: ttls.unknown,
            accept_all_ttl: ttls.accept_all,
            domain_concurrency: limits.domain_concurrency,
            domain_rate: limits.domain_rate,
            rate_window: limits.rate_window,
            max_concurrent: limits.max_concurrent,
            allowlist: Vec::new(),
            allow_private_mx: false,
            seed: None,
        }
    }
}

impl CallbacksConfig {
    /// Every problem, each naming its field (without the `callbacks.` prefix).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for ns in &self.nameservers {
            if parse_nameserver(ns).is_none() {
                problems.push(format!("nameservers: {ns:?} is not an ip or ip:port"));
            }
        }
        for (name, d) in [
            ("dns_timeout", self.dns_timeout),
            ("connect_timeout", self.connect_timeout),
            ("command_timeout", self.command_timeout),
            ("budget", self.budget),
            ("positive_ttl", self.positive_ttl),
            ("negative_ttl", self.negative_ttl),
            ("unknown_ttl", self.unknown_ttl),
            ("accept_all_ttl", self.accept_all_ttl),
            ("rate_window", self.rate_window),
        ] {
            if d.is_zero() {
                problems.push(format!("{name}: must be longer than 0s"));
            }
        }
        for (name, n) in [
            ("dns_attempts", self.dns_attempts),
            ("max_mx", self.max_mx),
            ("cache_entries_max", self.cache_entries_max),
            ("domain_concurrency", self.domain_concurrency),
            ("domain_rate", self.domain_rate as usize),
            ("max_concurrent", self.max_concurrent),
        ] {
            if n == 0 {
                problems.push(format!("{name}: must be at least 1"));
            }
        }
        if self.port == 0 {
            problems.push("port: must not be 0".into());
        }
        if let Some(h) = self.hello_name.as_ref().filter(|h| Domain::parse(h).is_err()) {
            problems.push(format!("hello_name: {h:?} is not a domain name"));
        }
        for d in &self.allowlist {
            if let Err(e) = Domain::parse(d) {
                problems.push(format!("allowlist: {d:?}: {e}"));
            }
        }
        problems
    }

    /// The DNS settings (valid once [`CallbacksConfig::problems`] is empty).
    pub fn dns(&self) -> DnsSettings {
        DnsSettings {
            nameservers: self.nameservers.iter().filter_map(|n| parse_nameserver(n)).collect(),
            timeout: self.dns_timeout,
            attempts: self.dns_attempts,
            os_port_selection: false,
        }
    }

    /// The cache TTLs.
    pub fn ttls(&self) -> CacheTtls {
        CacheTtls {
            positive: self.positive_ttl,
            negative: self.negative_ttl,
            unknown: self.unknown_ttl,
            accept_all: self.accept_all_ttl,
        }
    }

    /// The probe limits.
    pub fn limits(&self) -> ProbeLimits {
        ProbeLimits {
            domain_concurrency: self.domain_concurrency,
            domain_rate: self.domain_rate,
            rate_window: self.rate_window,
            max_concurrent: self.max_concurrent,
            ..ProbeLimits::default()
        }
    }

    /// The allowlisted domains that parse.
    pub fn allowlist_domains(&self) -> Vec<Domain> {
        self.allowlist.iter().filter_map(|d| Domain::parse(d).ok()).collect()
    }
}

/// `192.0.2.53` (port 53) or `192.0.2.53:5353` or `[2001:db8::53]:53`.
fn parse_nameserver(s: &str) -> Option<SocketAddr> {
    s.parse::<SocketAddr>().ok().or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_design() {
        let c = CallbacksConfig::default();
        assert!(c.problems().is_empty());
        assert_eq!(c.positive_ttl, Duration::from_secs(7 * 86_400));
        assert_eq!(c.negative_ttl, Duration::from_secs(86_400));
        assert_eq!(c.unknown_ttl, Duration::from_secs(300));
        assert_eq!((c.domain_concurrency, c.domain_rate), (2, 30));
    }

    #[test]
    fn parses_and_lists_problems() {
        let c: CallbacksConfig = toml::from_str(
            r#"
            nameservers = ["127.0.0.1:5353", "::1", "dns.example"]
            budget = "0s"
            command_timeout = "2s 500ms"
            max_mx = 0
            allowlist = ["example.com", "-bad"]
            cache = "memory"
            "#,
        )
        .unwrap();
        assert_eq!(c.command_timeout, Duration::from_millis(2500));
        assert_eq!(c.cache, CacheMode::Memory);
        assert_eq!(c.dns().nameservers, vec!["127.0.0.1:5353".parse().unwrap(), "[::1]:53".parse().unwrap()]);
        let p = c.problems().join("\n");
        for needle in ["nameservers: \"dns.example\"", "budget", "max_mx", "allowlist: \"-bad\""] {
            assert!(p.contains(needle), "{needle} missing in {p}");
        }
        assert_eq!(c.problems().len(), 4, "{p}");
        assert!(toml::from_str::<CallbacksConfig>("budgets = \"1s\"").is_err());
    }
}
