//! Where a callback probe may connect (DESIGN §2 C1): only to global unicast addresses, so
//! that nobody can point a sender domain's MX at an inside network (loopback, RFC 1918, link
//! local, ULA, the carrier-grade NAT range …) and use the gatekeeper to scan it or to talk to
//! services that trust local peers. The gatekeeper's own public addresses are refused by the
//! production connector ([`super::TokioConnector`]), which knows the host's interfaces.
//!
//! `IpAddr::is_global` is not stable yet; this is the IANA special-purpose registries
//! (RFC 6890 and successors) as they stand, for the blocks that are not globally reachable.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether `ip` is a globally reachable unicast address, per the IANA special-purpose
/// address registries. An IPv4-mapped IPv6 address is judged as its IPv4 address.
pub fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_global_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_global_v4(v4),
            None => is_global_v6(v6),
        },
    }
}

fn is_global_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                   // "this network" 0.0.0.0/8
        || a == 10                             // private, RFC 1918
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGN), RFC 6598
        || a == 127                            // loopback
        || (a == 169 && b == 254)              // link local
        || (a == 172 && (16..32).contains(&b)) // private, RFC 1918
        || (a == 192 && b == 0 && c == 0)      // IETF protocol assignments, RFC 6890
        || (a == 192 && b == 0 && c == 2)      // TEST-NET-1, documentation
        || (a == 192 && b == 88 && c == 99)    // deprecated 6to4 relay anycast, RFC 7526
        || (a == 192 && b == 168)              // private, RFC 1918
        || (a == 198 && (18..20).contains(&b)) // benchmarking, RFC 2544
        || (a == 198 && b == 51 && c == 100)   // TEST-NET-2
        || (a == 203 && b == 0 && c == 113)    // TEST-NET-3
        || a >= 224) // multicast, reserved (240/4) and broadcast
}

fn is_global_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || (s[0] == 0 && s[1] == 0 && s[2] == 0 && s[3] == 0 && s[4] == 0 && s[5] == 0) // IPv4-compatible (deprecated)
        || (s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001) // local-use NAT64, RFC 8215
        || (s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0) // discard-only, RFC 6666
        || (s[0] == 0x2001 && s[1] < 0x0200 && s[1] != 0x0000) // IETF protocol assignments (Teredo 2001::/32 aside)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || (s[0] & 0xfff0) == 0x3ff0 // documentation, RFC 9637 (3fff::/20)
        || (s[0] & 0xfe00) == 0xfc00 // unique local, RFC 4193
        || (s[0] & 0xffc0) == 0xfe80 // link local
        || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated)
        || (s[0] & 0xff00) == 0xff00) // multicast
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global(s: &str) -> bool {
        is_global(s.parse().unwrap())
    }

    #[test]
    fn inside_networks_are_not_global() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.0.2.25",
            "169.254.169.254", // cloud metadata services live here
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.25",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:127.0.0.1",
            "64:ff9b:1::1",
            "100::1",
            "2001:2::1",
            "2001:db8::25",
            "3fff::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
        ] {
            assert!(!global(ip), "{ip} was taken for global");
        }
    }

    #[test]
    fn the_internet_is_global() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.1",
            "192.0.3.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.254",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808", // well-known NAT64 prefix: a global address behind it
            "2001::1",          // Teredo
            "2001:4860:4860::8888",
            "2a00:1450:4001::1b",
            "2600::1",
        ] {
            assert!(global(ip), "{ip} was taken for an inside address");
        }
    }
}
