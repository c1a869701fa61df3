//! Networks: what a ban (and an allowlist entry) covers. An IPv4 client is banned as its /32,
//! an IPv6 client as its /64 by default (one subscriber or server usually holds a whole /64,
//! so a /128 ban is useless, docs/kernel.md §4.5). IPv4-mapped IPv6 addresses are IPv4: the kernel
//! sees IPv4 packets.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A network: an address with its host bits cleared and a prefix length.
///
/// Ordered by family, then address, then prefix, so listings are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

/// A network that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or network (a.b.c.d, a.b.c.d/n, x:y::z, x:y::/n)")]
pub struct NetParseError(pub String);

impl Net {
    /// The network of `prefix` bits around `addr` (IPv4-mapped IPv6 counts as IPv4; the
    /// prefix is clamped to the family's width).
    pub fn new(addr: IpAddr, prefix: u8) -> Net {
        match addr.to_canonical() {
            IpAddr::V4(a) => {
                let p = prefix.min(32);
                Net { addr: IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(p))), prefix: p }
            }
            IpAddr::V6(a) => {
                let p = prefix.min(128);
                Net { addr: IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(p))), prefix: p }
            }
        }
    }

    /// The network a ban of `addr` covers: IPv4 /32, IPv6 /`ipv6_prefix`.
    pub fn ban_key(addr: IpAddr, ipv6_prefix: u8) -> Net {
        let addr = addr.to_canonical();
        let prefix = if addr.is_ipv4() { 32 } else { ipv6_prefix };
        Net::new(addr, prefix)
    }

    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The last address of the network (all host bits set).
    pub fn last(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) | !mask32(self.prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) | !mask128(self.prefix))),
        }
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// True for a single address (/32 or /128).
    pub fn is_host(&self) -> bool {
        self.prefix == self.max_prefix()
    }

    fn max_prefix(&self) -> u8 {
        if self.addr.is_ipv4() { 32 } else { 128 }
    }

    /// True if `addr` (IPv4-mapped counts as IPv4) lies in this network.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = addr.to_canonical();
        addr.is_ipv4() == self.addr.is_ipv4() && Net::new(addr, self.prefix).addr == self.addr
    }

    /// True if the two networks share at least one address (one contains the other).
    pub fn overlaps(&self, other: &Net) -> bool {
        if self.addr.is_ipv4() != other.addr.is_ipv4() {
            return false;
        }
        let p = self.prefix.min(other.prefix);
        Net::new(self.addr, p).addr == Net::new(other.addr, p).addr
    }
}

fn mask32(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) }
}

fn mask128(prefix: u8) -> u128 {
    if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix.min(128))) }
}

/// The IPv6 address whose bits are the mask of `prefix` (e.g. 64 → `ffff:ffff:ffff:ffff::`),
/// as `ip6tables --mask` and nft's `ip6 saddr & MASK` write it.
pub fn ipv6_mask(prefix: u8) -> Ipv6Addr {
    Ipv6Addr::from(mask128(prefix))
}

impl fmt::Display for Net {
    /// `a.b.c.d` or `x:y::` for a single address, else `addr/prefix`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() { write!(f, "{}", self.addr) } else { write!(f, "{}/{}", self.addr, self.prefix) }
    }
}

impl FromStr for Net {
    type Err = NetParseError;

    /// `addr` (a single address) or `addr/prefix`; host bits are cleared.
    fn from_str(s: &str) -> Result<Net, NetParseError> {
        let err = || NetParseError(s.to_string());
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| err())?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => match p.trim().parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(err()),
            },
        };
        Ok(Net::new(addr, prefix))
    }
}

impl serde::Serialize for Net {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Net {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Net, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Networks in [`Net`]'s order, each once: a ban table as the kernel lists it, ready to be
/// walked alongside another sorted sequence (the reconcile's merged walk).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetList(Vec<Net>);

impl NetList {
    /// The networks, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Net> {
        self.0.iter()
    }

    /// How many networks.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True if there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `net` is listed.
    pub fn contains(&self, net: &Net) -> bool {
        self.0.binary_search(net).is_ok()
    }
}

impl From<Vec<Net>> for NetList {
    /// Sorts and deduplicates by integer keys, IPv4 before IPv6 as in `Net`'s order: comparing
    /// `IpAddr` enums is several times slower, and the simulation reads a table of thousands of
    /// bans back every 30 simulated seconds. Already sorted input costs one pass.
    fn from(mut nets: Vec<Net>) -> NetList {
        let mut v4: Vec<u64> = Vec::with_capacity(nets.len());
        let mut v6: Vec<(u128, u8)> = Vec::new();
        for n in &nets {
            match n.addr {
                IpAddr::V4(a) => v4.push((u64::from(a.to_bits()) << 8) | u64::from(n.prefix)),
                IpAddr::V6(a) => v6.push((a.to_bits(), n.prefix)),
            }
        }
        v4.sort_unstable();
        v4.dedup();
        v6.sort_unstable();
        v6.dedup();
        nets.clear();
        nets.extend(
            v4.into_iter().map(|k| Net { addr: IpAddr::V4(Ipv4Addr::from_bits((k >> 8) as u32)), prefix: k as u8 }),
        );
        nets.extend(v6.into_iter().map(|(a, prefix)| Net { addr: IpAddr::V6(Ipv6Addr::from_bits(a)), prefix }));
        NetList(nets)
    }
}

impl FromIterator<Net> for NetList {
    fn from_iter<I: IntoIterator<Item = Net>>(iter: I) -> NetList {
        NetList::from(iter.into_iter().collect::<Vec<_>>())
    }
}

impl<'a> IntoIterator for &'a NetList {
    type Item = &'a Net;
    type IntoIter = std::slice::Iter<'a, Net>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ban_keys_mask_ipv6_only() {
        assert_eq!(Net::ban_key(ip("192.0.2.77"), 64).to_string(), "192.0.2.77");
        assert_eq!(Net::ban_key(ip("2001:db8:1:2:3:4:5:6"), 64).to_string(), "2001:db8:1:2::/64");
        assert_eq!(Net::ban_key(ip("2001:db8:1:2:3:4:5:6"), 48).to_string(), "2001:db8:1::/48");
        assert_eq!(Net::ban_key(ip("2001:db8::1"), 128).to_string(), "2001:db8::1");
        // IPv4-mapped is IPv4, never an IPv6 /64.
        assert_eq!(Net::ban_key(ip("::ffff:192.0.2.9"), 64).to_string(), "192.0.2.9");
    }

    #[test]
    fn parse_and_display_round_trip() {
        for (s, shown) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("10.1.2.3", "10.1.2.3"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("2001:db8::7", "2001:db8::7"),
            ("::ffff:10.1.2.3", "10.1.2.3"),
            ("0.0.0.0/0", "0.0.0.0/0"),
        ] {
            let n: Net = s.parse().unwrap();
            assert_eq!(n.to_string(), shown, "{s}");
            assert_eq!(n.to_string().parse::<Net>().unwrap(), n);
        }
        for bad in ["", "10.0.0.0/33", "2001:db8::/129", "x", "10.0.0.0/", "10.0.0.0/-1"] {
            assert!(bad.parse::<Net>().is_err(), "{bad}");
        }
    }

    #[test]
    fn contains_and_overlaps() {
        let n: Net = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(ip("10.200.0.1")));
        assert!(n.contains(ip("::ffff:10.200.0.1")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(!n.contains(ip("::a00:1")));
        let v6: Net = "2001:db8:1:2::/64".parse().unwrap();
        let host: Net = "2001:db8:1:2::99".parse().unwrap();
        assert!(v6.overlaps(&host) && host.overlaps(&v6));
        assert!(!v6.overlaps(&"2001:db8:1:3::/64".parse().unwrap()));
        assert!(!n.overlaps(&v6));
        assert_eq!(ipv6_mask(64).to_string(), "ffff:ffff:ffff:ffff::");
        assert_eq!(ipv6_mask(0).to_string(), "::");
    }

    #[test]
    fn a_list_is_in_net_order_once_each() {
        let nets: Vec<Net> =
            ["2001:db8::/64", "10.0.0.2", "10.0.0.0/8", "10.0.0.2", "192.0.2.1", "2001:db8::/48", "9.255.255.255"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
        let mut expected = nets.clone();
        expected.sort();
        expected.dedup();
        let list: NetList = nets.iter().copied().collect();
        assert_eq!(list.iter().copied().collect::<Vec<_>>(), expected);
        assert_eq!(list.len(), 6);
        assert!(list.contains(&"10.0.0.0/8".parse().unwrap()));
        assert!(!list.contains(&"10.0.0.0/9".parse().unwrap()));
        assert!(NetList::default().is_empty());
    }
}
