//! The server's own table of active bans: what G2 enforces in process, whatever a kernel table
//! forgot.
//!
//! Kernel tables are bounded (an xt_recent table holds `ip_list_tot` entries and silently
//! evicts the least recently stamped one, docs/kernel.md §1), so a client whose ban the kernel
//! evicted reaches the server again. This table holds every active ban the ban manager
//! mirrors into it, without a size bound of its own (the manager's store decides what is
//! active), and the server refuses a client it covers with 554 before anything else.
//!
//! It owns only the lookup: networks with their expiry, found by the longest — in fact any —
//! banned prefix that covers an address. It must not do IO or read a clock (time is an
//! argument), and lookups cost one hash probe per prefix length in use (one or two in
//! practice: /32 and the IPv6 ban prefix, plus any wider network an administrator banned).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::Net;

/// Active bans by network, with their expiry.
#[derive(Debug, Default, Clone)]
pub struct ActiveBans {
    until: HashMap<Net, Instant>,
    /// How many networks of each prefix length are held, IPv4 (index 0) and IPv6 (index 1):
    /// the prefix lengths a lookup must try.
    prefixes: [Vec<(u8, usize)>; 2],
}

impl ActiveBans {
    /// An empty table.
    pub fn new() -> Self {
        ActiveBans::default()
    }

    /// Bans `net` from `now` for `remaining` (a shorter remaining time than one already held
    /// shortens it: the ban manager's store is the truth and re-mirrors what it holds).
    /// A zero `remaining` lifts the ban.
    pub fn ban(&mut self, now: Instant, net: Net, remaining: Duration) {
        if remaining.is_zero() {
            self.unban(net);
            return;
        }
        let until = now.checked_add(remaining).unwrap_or(now + Duration::from_secs(100 * 365 * 86_400));
        if self.until.insert(net, until).is_none() {
            let family = &mut self.prefixes[family(net.addr())];
            match family.iter_mut().find(|(p, _)| *p == net.prefix()) {
                Some((_, n)) => *n += 1,
                None => {
                    family.push((net.prefix(), 1));
                    // Longest prefixes first: the common /32 and /64 are tried first.
                    family.sort_unstable_by_key(|&(prefix, _)| std::cmp::Reverse(prefix));
                }
            }
        }
    }

    /// Lifts the ban of `net`. Returns whether there was one (expired or not).
    pub fn unban(&mut self, net: Net) -> bool {
        if self.until.remove(&net).is_none() {
            return false;
        }
        let family = &mut self.prefixes[family(net.addr())];
        if let Some(i) = family.iter().position(|(p, _)| *p == net.prefix()) {
            family[i].1 -= 1;
            if family[i].1 == 0 {
                family.remove(i);
            }
        }
        true
    }

    /// The ban covering `addr` at `now`, if any: its network and expiry.
    pub fn covering(&self, now: Instant, addr: IpAddr) -> Option<(Net, Instant)> {
        let addr = addr.to_canonical();
        self.prefixes[family(addr)].iter().find_map(|&(prefix, _)| {
            let net = Net::new(addr, prefix);
            self.until.get(&net).filter(|&&until| until > now).map(|&until| (net, until))
        })
    }

    /// True if a ban covers `addr` at `now`.
    pub fn is_banned(&self, now: Instant, addr: IpAddr) -> bool {
        self.covering(now, addr).is_some()
    }

    /// Networks held, expired ones included until they are lifted or [`prune`](Self::prune)d.
    pub fn len(&self) -> usize {
        self.until.len()
    }

    /// True if no network is held.
    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }

    /// Active bans at `now`: IPv4 and IPv6 networks.
    pub fn active(&self, now: Instant) -> (usize, usize) {
        let live = self.until.iter().filter(|(_, until)| **until > now);
        live.fold((0, 0), |(v4, v6), (net, _)| if net.addr().is_ipv4() { (v4 + 1, v6) } else { (v4, v6 + 1) })
    }

    /// Forgets bans expired at `now` (the manager lifts them too; this only bounds memory if
    /// it is late). Returns how many were dropped.
    pub fn prune(&mut self, now: Instant) -> usize {
        let expired: Vec<Net> = self.until.iter().filter(|(_, until)| **until <= now).map(|(net, _)| *net).collect();
        for net in &expired {
            self.unban(*net);
        }
        expired.len()
    }
}

fn family(addr: IpAddr) -> usize {
    usize::from(addr.is_ipv6())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn holds_more_bans_than_any_kernel_table_and_forgets_none() {
        let t0 = Instant::now();
        let mut bans = ActiveBans::new();
        for i in 0..100_000u32 {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i));
            bans.ban(t0, Net::ban_key(addr, 64), Duration::from_secs(86_400));
        }
        assert_eq!(bans.len(), 100_000);
        for i in (0..100_000u32).step_by(997) {
            assert!(
                bans.is_banned(
                    t0 + Duration::from_secs(3600),
                    IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i))
                )
            );
        }
        assert!(!bans.is_banned(t0, ip("11.0.0.1")));
    }

    #[test]
    fn expiry_is_exclusive_and_prune_forgets_only_the_expired() {
        let t0 = Instant::now();
        let mut bans = ActiveBans::new();
        bans.ban(t0, Net::ban_key(ip("192.0.2.1"), 64), Duration::from_secs(60));
        bans.ban(t0, Net::ban_key(ip("192.0.2.2"), 64), Duration::from_secs(120));
        assert!(bans.is_banned(t0 + Duration::from_secs(59), ip("192.0.2.1")));
        assert!(!bans.is_banned(t0 + Duration::from_secs(60), ip("192.0.2.1")));
        assert_eq!(bans.active(t0 + Duration::from_secs(60)), (1, 0));
        assert_eq!(bans.prune(t0 + Duration::from_secs(60)), 1);
        assert_eq!(bans.len(), 1);
        assert!(bans.is_banned(t0 + Duration::from_secs(60), ip("192.0.2.2")));
    }

    #[test]
    fn an_ipv6_ban_covers_its_network_and_mapped_ipv4_is_ipv4() {
        let t0 = Instant::now();
        let mut bans = ActiveBans::new();
        bans.ban(t0, Net::ban_key(ip("2001:db8:1:2::1"), 64), Duration::from_secs(60));
        bans.ban(t0, Net::ban_key(ip("::ffff:198.51.100.7"), 64), Duration::from_secs(60));
        assert!(bans.is_banned(t0, ip("2001:db8:1:2:ffff::9")));
        assert!(!bans.is_banned(t0, ip("2001:db8:1:3::1")));
        assert!(bans.is_banned(t0, ip("198.51.100.7")));
        assert!(bans.is_banned(t0, ip("::ffff:198.51.100.7")));
        assert_eq!(bans.active(t0), (1, 1));
    }

    #[test]
    fn wider_networks_are_found_and_lifting_one_keeps_the_others() {
        let t0 = Instant::now();
        let mut bans = ActiveBans::new();
        let wide = Net::new(ip("2001:db8:1::"), 48);
        let host = Net::ban_key(ip("2001:db8:9:1::5"), 64);
        bans.ban(t0, wide, Duration::from_secs(60));
        bans.ban(t0, host, Duration::from_secs(60));
        let (net, _) = bans.covering(t0, ip("2001:db8:1:77::1")).unwrap();
        assert_eq!(net, wide);
        assert!(bans.unban(wide));
        assert!(!bans.unban(wide));
        assert!(!bans.is_banned(t0, ip("2001:db8:1:77::1")));
        assert!(bans.is_banned(t0, ip("2001:db8:9:1::77")));
        bans.ban(t0, host, Duration::ZERO);
        assert!(bans.is_empty());
        assert_eq!(bans.prefixes, [vec![], vec![]]);
    }
}
