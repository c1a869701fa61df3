//! The ban manager's own table of bans in force, indexed by network and by expiry.
//!
//! The expiry phase runs every `sync_interval` (a second by default). Scanning every active
//! ban on each pass costs O(active) — thousands of bans, each second, for nothing on almost
//! every pass. The expiry index makes a pass O(due): the bans that expire next are the first
//! entries of an ordered set. Reads go through [`Deref`] to the map; every change goes through
//! [`Ledger::insert`], [`Ledger::remove`] or [`Ledger::shift`], which keep the index in step.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::time::SystemTime;

use super::{Ban, Net};

/// Bans in force by network, with an index by expiry.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    bans: BTreeMap<Net, Ban>,
    by_expiry: BTreeSet<(SystemTime, Net)>,
}

impl Ledger {
    /// Records `ban` for `net`, replacing (and returning) the one held.
    pub(super) fn insert(&mut self, net: Net, ban: Ban) -> Option<Ban> {
        self.by_expiry.insert((ban.expires, net));
        let old = self.bans.insert(net, ban)?;
        if old.expires != self.bans[&net].expires {
            self.by_expiry.remove(&(old.expires, net));
        }
        Some(old)
    }

    /// Forgets the ban of `net`, returning it.
    pub(super) fn remove(&mut self, net: &Net) -> Option<Ban> {
        let old = self.bans.remove(net)?;
        self.by_expiry.remove(&(old.expires, *net));
        Some(old)
    }

    /// The networks whose ban has expired at `now` (`expires <= now`), soonest first.
    pub(super) fn due(&self, now: SystemTime) -> Vec<Net> {
        self.by_expiry.iter().take_while(|(expires, _)| *expires <= now).map(|&(_, net)| net).collect()
    }

    /// Applies `f` to every ban (a stepped wall clock moves them all) and rebuilds the index.
    pub(super) fn shift(&mut self, mut f: impl FnMut(&mut Ban)) {
        self.bans.values_mut().for_each(&mut f);
        self.by_expiry = self.bans.iter().map(|(net, ban)| (ban.expires, *net)).collect();
    }
}

impl Deref for Ledger {
    type Target = BTreeMap<Net, Ban>;

    fn deref(&self) -> &Self::Target {
        &self.bans
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::BanReason;

    fn ban(net: &str, expires_s: u64) -> (Net, Ban) {
        let net: Net = net.parse().unwrap();
        let t0 = SystemTime::UNIX_EPOCH;
        let ban = Ban {
            net,
            reason: BanReason::ForgedLocalSender,
            session: 1,
            evidence: String::new(),
            start: t0,
            expires: t0 + Duration::from_secs(expires_s),
            offence: 1,
        };
        (net, ban)
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn due_follows_inserts_replacements_and_removals() {
        let mut l = Ledger::default();
        for (net, b) in [ban("192.0.2.1", 10), ban("192.0.2.2", 20), ban("192.0.2.3", 30)] {
            assert!(l.insert(net, b).is_none());
        }
        assert_eq!(l.due(at(9)), Vec::<Net>::new());
        assert_eq!(l.due(at(20)), vec!["192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap()]);
        // Extended: the old expiry no longer counts.
        let (net, longer) = ban("192.0.2.1", 100);
        assert_eq!(l.insert(net, longer).map(|b| b.expires), Some(at(10)));
        assert_eq!(l.due(at(30)), vec!["192.0.2.2".parse().unwrap(), "192.0.2.3".parse().unwrap()]);
        // Re-recorded with the same expiry: still indexed once.
        let (net, same) = ban("192.0.2.2", 20);
        l.insert(net, same);
        assert_eq!(l.due(at(20)), vec![net]);
        assert!(l.remove(&net).is_some());
        assert!(l.remove(&net).is_none());
        assert_eq!(l.due(at(1000)), vec!["192.0.2.3".parse().unwrap(), "192.0.2.1".parse().unwrap()]);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn shift_moves_the_index_with_the_bans() {
        let mut l = Ledger::default();
        let (net, b) = ban("192.0.2.1", 10);
        l.insert(net, b);
        l.shift(|b| b.expires += Duration::from_secs(86_400));
        assert!(l.due(at(10)).is_empty());
        assert_eq!(l.due(at(86_410)), vec![net]);
    }
}
