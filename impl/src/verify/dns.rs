//! The resolver edge of callback verification: where does mail for a domain go?
//!
//! [`MxResolver`] answers with the ordered mail exchangers of a domain, or with the facts that
//! end a probe before it starts: a null MX (RFC 7505), a domain that does not exist (NXDOMAIN),
//! a domain with neither MX nor address records. [`HickoryResolver`] is the production version
//! on hickory-resolver; it is generic over hickory's runtime provider so that the simulation can
//! run the same code over turmoil sockets.
//!
//! hickory's own response cache reads `std::time::Instant`, which simulated time does not move:
//! it is turned off here (zero capacity, zero TTLs). Results are cached one level up, per
//! address, in [`super::cache`].

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig, ServerOrderingStrategy,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData};
use hickory_resolver::{ConnectionProvider, Resolver};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;

use crate::edges::BoxFuture;
use crate::proto::Domain;

/// One mail exchanger of a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    /// Its host name, without the trailing dot.
    pub name: String,
    /// MX preference; lower is tried first.
    pub preference: u16,
}

/// Where mail for a domain goes, or why it goes nowhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxLookup {
    /// MX targets in the order to try: ascending preference, equal preferences shuffled
    /// (RFC 5321 §5.1).
    Hosts(Vec<MxHost>),
    /// No MX records: the domain itself is the implicit MX with these addresses (RFC 5321 §5.1).
    Implicit(Vec<IpAddr>),
    /// A null MX (RFC 7505): the domain accepts no mail, so no address in it can exist.
    NullMx,
    /// NXDOMAIN: the domain does not exist.
    NoDomain,
    /// The domain exists but has neither MX nor A/AAAA records: no host accepts its mail.
    NoMailHost,
}

/// A lookup that could not be answered. The caller reports the sender as unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// SERVFAIL, REFUSED, timeouts, unreachable name servers: try again later.
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
    /// The resolver could not be built (bad system configuration): fix the configuration.
    #[error("resolver configuration: {0}")]
    Config(String),
}

/// Looks up mail exchangers and their addresses. Object-safe; never caches on its own behalf.
pub trait MxResolver: Send + Sync + fmt::Debug {
    /// The mail routing of `domain`.
    fn lookup_mx<'a>(&'a self, domain: &'a Domain) -> BoxFuture<'a, Result<MxLookup, ResolveError>>;
    /// The addresses of an MX host, in the order to try; empty if it has none.
    fn lookup_host<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, ResolveError>>;
}

/// How to reach DNS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// Name servers (UDP, then TCP on truncation). Empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Per-query timeout.
    pub timeout: Duration,
    /// Tries per query.
    pub attempts: usize,
    /// Let the OS (or turmoil) pick source ports instead of hickory's random ports.
    pub os_port_selection: bool,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings { nameservers: Vec::new(), timeout: Duration::from_secs(5), attempts: 2, os_port_selection: false }
    }
}

/// The production resolver on hickory-resolver. `P` is hickory's runtime: tokio here, turmoil
/// in the simulation (any `RuntimeProvider` is a `ConnectionProvider`).
pub struct HickoryResolver<P: ConnectionProvider = TokioRuntimeProvider> {
    resolver: Resolver<P>,
    rng: Mutex<SmallRng>,
}

impl<P: ConnectionProvider> fmt::Debug for HickoryResolver<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HickoryResolver").finish_non_exhaustive()
    }
}

impl HickoryResolver<TokioRuntimeProvider> {
    /// A resolver on tokio. `seed` drives the shuffling of equal MX preferences.
    pub fn tokio(settings: &DnsSettings, seed: u64) -> Result<Self, ResolveError> {
        Self::with_provider(settings, TokioRuntimeProvider::default(), seed)
    }
}

impl<P: ConnectionProvider> HickoryResolver<P> {
    /// A resolver on any hickory runtime (the simulation passes its turmoil provider).
    pub fn with_provider(settings: &DnsSettings, provider: P, seed: u64) -> Result<Self, ResolveError> {
        let mut builder = if settings.nameservers.is_empty() {
            Resolver::builder(provider).map_err(|e| ResolveError::Config(e.to_string()))?
        } else {
            let servers = settings
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                    ns.connections = vec![udp, tcp];
                    ns
                })
                .collect();
            let mut b = Resolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider);
            // Configured servers are the whole truth: no /etc/hosts, the order as given.
            b.options_mut().use_hosts_file = ResolveHosts::Never;
            b.options_mut().server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
            b
        };
        let opts = builder.options_mut();
        opts.timeout = settings.timeout;
        opts.attempts = settings.attempts.max(1);
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.os_port_selection = settings.os_port_selection;
        // hickory's cache runs on std::time::Instant: off, so simulated time stays the only time.
        opts.cache_size = 0;
        opts.positive_max_ttl = Some(Duration::ZERO);
        opts.negative_max_ttl = Some(Duration::ZERO);
        let resolver = builder.build().map_err(|e| ResolveError::Config(e.to_string()))?;
        Ok(HickoryResolver { resolver, rng: Mutex::new(SmallRng::seed_from_u64(seed)) })
    }

    async fn mx(&self, domain: &Domain) -> Result<MxLookup, ResolveError> {
        let name = fqdn(domain.as_str())?;
        let records = match self.resolver.mx_lookup(name.clone()).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.clone())),
                    _ => None,
                })
                .collect::<Vec<_>>(),
            Err(e) if e.is_nx_domain() => return Ok(MxLookup::NoDomain),
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => return Err(temporary(&e)),
        };
        if records.is_empty() {
            // RFC 5321 §5.1: no MX, so the domain is its own (implicit) MX.
            return match self.addresses(name).await? {
                Addresses::Found(addrs) => Ok(MxLookup::Implicit(addrs)),
                Addresses::NoDomain => Ok(MxLookup::NoDomain),
                Addresses::None => Ok(MxLookup::NoMailHost),
            };
        }
        let hosts: Vec<MxHost> = records
            .iter()
            .filter(|(_, exchange)| !exchange.is_root())
            .map(|(preference, exchange)| MxHost {
                name: exchange.to_ascii().trim_end_matches('.').to_ascii_lowercase(),
                preference: *preference,
            })
            .collect();
        if hosts.is_empty() {
            // RFC 7505 §3: only "MX 0 ." records: the domain accepts no mail.
            return Ok(MxLookup::NullMx);
        }
        let mut rng = self.rng.lock().expect("rng lock");
        Ok(MxLookup::Hosts(order_mx(hosts, &mut *rng)))
    }

    async fn addresses(&self, name: Name) -> Result<Addresses, ResolveError> {
        match self.resolver.lookup_ip(name).await {
            Ok(lookup) => {
                let addrs: Vec<IpAddr> = lookup.iter().collect();
                Ok(if addrs.is_empty() { Addresses::None } else { Addresses::Found(addrs) })
            }
            Err(e) if e.is_nx_domain() => Ok(Addresses::NoDomain),
            Err(e) if e.is_no_records_found() => Ok(Addresses::None),
            Err(e) => Err(temporary(&e)),
        }
    }
}

enum Addresses {
    Found(Vec<IpAddr>),
    NoDomain,
    None,
}

impl<P: ConnectionProvider> MxResolver for HickoryResolver<P> {
    fn lookup_mx<'a>(&'a self, domain: &'a Domain) -> BoxFuture<'a, Result<MxLookup, ResolveError>> {
        Box::pin(self.mx(domain))
    }

    fn lookup_host<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, ResolveError>> {
        Box::pin(async move {
            match self.addresses(fqdn(host)?).await? {
                Addresses::Found(addrs) => Ok(addrs),
                Addresses::NoDomain | Addresses::None => Ok(Vec::new()),
            }
        })
    }
}

/// A fully qualified name, so that no search domain is ever appended.
fn fqdn(host: &str) -> Result<Name, ResolveError> {
    let host = host.trim_end_matches('.');
    Name::from_ascii(format!("{host}.")).map_err(|e| ResolveError::Temporary(format!("bad name {host:?}: {e}")))
}

fn temporary(e: &NetError) -> ResolveError {
    ResolveError::Temporary(e.to_string())
}

/// Orders MX hosts for delivery (RFC 5321 §5.1): ascending preference; hosts of equal
/// preference in random order, drawn from `rng` so that a seed reproduces it. The order of
/// the DNS answer does not matter; duplicate names are dropped.
pub fn order_mx<R: rand::Rng + ?Sized>(mut hosts: Vec<MxHost>, rng: &mut R) -> Vec<MxHost> {
    hosts.sort_by(|a, b| a.preference.cmp(&b.preference).then_with(|| a.name.cmp(&b.name)));
    hosts.dedup_by(|b, a| a.name == b.name);
    let mut start = 0;
    while start < hosts.len() {
        let pref = hosts[start].preference;
        let end = start + hosts[start..].iter().take_while(|h| h.preference == pref).count();
        hosts[start..end].shuffle(rng);
        start = end;
    }
    hosts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, preference: u16) -> MxHost {
        MxHost { name: name.into(), preference }
    }

    #[test]
    fn mx_order_is_by_preference_with_seeded_ties() {
        let hosts = vec![host("c", 20), host("a", 10), host("b", 10), host("d", 5), host("a", 10)];
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..32 {
            let ordered = order_mx(hosts.clone(), &mut SmallRng::seed_from_u64(seed));
            let names: Vec<&str> = ordered.iter().map(|h| h.name.as_str()).collect();
            assert_eq!(names.len(), 4, "duplicates dropped");
            assert_eq!(names[0], "d");
            assert_eq!(names[3], "c");
            seen.insert(names[1..3].join(","));
            // Same seed, same order.
            assert_eq!(ordered, order_mx(hosts.clone(), &mut SmallRng::seed_from_u64(seed)));
        }
        assert_eq!(seen.len(), 2, "ties are shuffled: {seen:?}");
    }

    #[test]
    fn names_are_fully_qualified() {
        assert_eq!(fqdn("mx.example.test").unwrap().to_ascii(), "mx.example.test.");
        assert_eq!(fqdn("mx.example.test.").unwrap().to_ascii(), "mx.example.test.");
        assert!(fqdn("mx.example.test").unwrap().is_fqdn());
    }
}
