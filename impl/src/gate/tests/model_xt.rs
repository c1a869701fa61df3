//! xt_recent against an O(n) transcription of xt_recent.c: results, LRU order, stamps and the
//! ring's write index agree after every operation.

use super::*;

/// xt_recent as the C code reads, O(n): entries in LRU order, a full ring per entry.
#[derive(Debug, Clone)]
struct RefEntry {
    key: Key,
    stamps: Vec<u64>,
    index: u32,
    nstamps: u32,
}

#[derive(Debug)]
struct RefXt {
    cap: usize,
    rmask: u32,
    mask: XtMask,
    lru: Vec<RefEntry>,
}

#[derive(Debug, Clone, Copy)]
enum XtOp {
    Set,
    Remove,
    Check { update: bool, seconds: u32, hitcount: u32, reap: bool },
    ProcAdd,
    ProcRemove,
    RcheckOrSet { seconds: u32 },
    Flush,
}

impl RefXt {
    fn find(&self, k: Key) -> Option<usize> {
        self.lru.iter().position(|e| e.key == k)
    }

    fn init(&mut self, k: Key, now: u64) {
        if self.lru.len() >= self.cap {
            self.lru.remove(0);
        }
        let mut stamps = vec![0; self.rmask as usize + 1];
        stamps[0] = now;
        self.lru.push(RefEntry { key: k, stamps, index: 1, nstamps: 1 });
    }

    fn update(&mut self, p: usize, now: u64) {
        let mut e = self.lru.remove(p);
        e.index &= self.rmask;
        e.stamps[e.index as usize] = now;
        e.index += 1;
        e.nstamps = e.nstamps.max(e.index);
        self.lru.push(e);
    }

    fn set(&mut self, k: Key, now: u64) {
        match self.find(k) {
            None => self.init(k, now),
            Some(p) => self.update(p, now),
        }
    }

    fn check(&mut self, k: Key, now: u64, update: bool, seconds: u32, hitcount: u32, reap: bool) -> bool {
        let Some(p) = self.find(k) else { return false };
        let time = now.wrapping_sub(u64::from(seconds) * HZ);
        let e = &self.lru[p];
        let mut ret = false;
        let mut hits = 0;
        for i in 0..e.nstamps as usize {
            if seconds != 0 && time_after(time, e.stamps[i]) {
                continue;
            }
            hits += 1;
            if hitcount == 0 || hits >= hitcount {
                ret = true;
                break;
            }
        }
        let mut p = Some(p);
        if reap && !(p == Some(0) && update && ret) {
            let h = &self.lru[0];
            if time_after(time, h.stamps[h.index as usize - 1]) {
                self.lru.remove(0);
                p = p.and_then(|p| p.checked_sub(1));
            }
        }
        if update && ret {
            self.update(p.expect("matched entry still present"), now);
        }
        ret
    }

    fn apply(&mut self, now: u64, addr: IpAddr, op: XtOp) -> bool {
        let raw = Key::from_addr(addr);
        let k = self.mask.apply(raw);
        match op {
            XtOp::Set => {
                self.set(k, now);
                true
            }
            XtOp::Remove | XtOp::ProcRemove => {
                let k = if matches!(op, XtOp::Remove) { k } else { raw };
                match self.find(k) {
                    Some(p) => {
                        self.lru.remove(p);
                        true
                    }
                    None => false,
                }
            }
            XtOp::Check { update, seconds, hitcount, reap } => self.check(k, now, update, seconds, hitcount, reap),
            XtOp::ProcAdd => {
                self.set(raw, now);
                true
            }
            XtOp::RcheckOrSet { seconds } => {
                let dropped = self.check(k, now, false, seconds, 0, false);
                if !dropped {
                    self.set(k, now);
                }
                dropped
            }
            XtOp::Flush => {
                self.lru.clear();
                true
            }
        }
    }

    fn listing(&self) -> Vec<(IpAddr, Vec<u64>, u32)> {
        self.lru.iter().map(|e| (e.key.addr(), e.stamps[..e.nstamps as usize].to_vec(), e.index)).collect()
    }
}

fn apply_xt(t: &mut XtRecent, now: u64, addr: IpAddr, op: XtOp) -> bool {
    let secs = |s: u32| (s != 0).then_some(s);
    match op {
        XtOp::Set => t.set(now, addr),
        XtOp::Remove => t.remove(addr),
        XtOp::Check { update: false, seconds, hitcount, reap } => {
            t.rcheck(now, addr, secs(seconds), secs(hitcount), reap)
        }
        XtOp::Check { update: true, seconds, hitcount, reap } => {
            t.update(now, addr, secs(seconds), secs(hitcount), reap)
        }
        XtOp::ProcAdd => {
            t.proc_add(now, addr);
            true
        }
        XtOp::ProcRemove => t.proc_remove(addr),
        XtOp::RcheckOrSet { seconds } => t.rcheck_or_set(now, addr, seconds),
        XtOp::Flush => {
            t.flush();
            true
        }
    }
}

fn listing(t: &XtRecent) -> Vec<(IpAddr, Vec<u64>, u32)> {
    t.iter().map(|e| (e.addr(), e.stamps().collect(), e.oldest_pkt())).collect()
}

fn xt_op() -> impl Strategy<Value = XtOp> {
    prop_oneof![
        4 => Just(XtOp::Set),
        1 => Just(XtOp::Remove),
        6 => (any::<bool>(), 0u32..4, 0u32..5, any::<bool>()).prop_map(|(update, seconds, hitcount, reap)| {
            XtOp::Check { update, seconds, hitcount, reap: reap && seconds != 0 }
        }),
        2 => Just(XtOp::ProcAdd),
        1 => Just(XtOp::ProcRemove),
        4 => (1u32..4).prop_map(|seconds| XtOp::RcheckOrSet { seconds }),
        1 => Just(XtOp::Flush),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every operation's result and the whole table (LRU order, stamps, write index) agree
    /// with an O(n) transcription of xt_recent.c; the table never exceeds ip_list_tot.
    #[test]
    fn xt_matches_reference_model(
        cap in 1u32..6,
        ring_log in 0u32..4,
        mask_kind in 0u8..3,
        ops in proptest::collection::vec((0usize..POOL.len(), 0u64..400, xt_op()), 1..120),
    ) {
        let mask = [XtMask::ALL, XtMask::ipv6_prefix(64), XtMask::ipv4_prefix(24)][mask_kind as usize];
        let ring = 1 << ring_log;
        let mut t = xt_with(cap, ring, mask);
        let mut r = RefXt { cap: cap as usize, rmask: ring - 1, mask, lru: Vec::new() };
        let mut now = 0;
        for (a, dt, op) in ops {
            now += dt;
            let addr = ip(POOL[a]);
            let got = apply_xt(&mut t, now, addr, op);
            let want = r.apply(now, addr, op);
            prop_assert_eq!(got, want, "{:?} {} at {}", op, addr, now);
            prop_assert_eq!(listing(&t), r.listing());
            prop_assert!(t.len() <= t.capacity());
        }
    }

    /// When a full table takes a new address, the entry that goes is the one stamped least
    /// recently (rcheck hits never count as stamps).
    #[test]
    fn eviction_picks_least_recently_stamped(
        cap in 1usize..8,
        ops in proptest::collection::vec((0u32..20, any::<bool>()), 1..200),
    ) {
        let mut t = xt(cap as u32);
        let mut last_stamp: Vec<(u32, u64)> = Vec::new(); // (addr, time of last stamp)
        for (now, (a, is_set)) in (1u64..).zip(ops) {
            let addr = IpAddr::V4(Ipv4Addr::from(0xc000_0200 + a));
            if !is_set {
                let present = last_stamp.iter().any(|&(x, _)| x == a);
                prop_assert_eq!(t.rcheck(now, addr, None, None, false), present);
                continue;
            }
            if let Some(e) = last_stamp.iter_mut().find(|(x, _)| *x == a) {
                e.1 = now;
            } else {
                if last_stamp.len() == cap {
                    let victim = last_stamp.iter().enumerate().min_by_key(|(_, e)| e.1).map(|(i, _)| i).unwrap();
                    last_stamp.remove(victim);
                }
                last_stamp.push((a, now));
            }
            t.set(now, addr);
            let mut want: Vec<u32> = last_stamp.iter().map(|e| e.0).collect();
            let mut got: Vec<u32> = t.iter().map(|e| match e.addr() { IpAddr::V4(v) => u32::from(v) - 0xc000_0200, IpAddr::V6(_) => unreachable!() }).collect();
            want.sort_unstable();
            got.sort_unstable();
            prop_assert_eq!(got, want);
            prop_assert!(t.len() <= cap);
        }
    }
}
