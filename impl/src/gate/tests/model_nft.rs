//! nft sets against an O(n) model in which every element, expired or not, is a record until
//! garbage collection removes it: results, `nelems` and listings agree after every operation.

use super::*;

/// nft set semantics, O(n): every element (including expired ones) is a record until gc.
#[derive(Debug, Clone)]
struct RefElem {
    key: Key,
    timeout: u64,
    has_timeout: bool,
    expiration: u64,
}

#[derive(Debug)]
struct RefNft {
    size: Option<u32>,
    default_timeout: u64,
    gc_iv: u64,
    next_gc: u64,
    v6mask: u128,
    elems: Vec<RefElem>,
}

#[derive(Debug, Clone, Copy)]
enum NftOp {
    Contains,
    Add,
    Update,
    AddElement(ElementOpts),
    Delete,
    Gc,
}

impl RefElem {
    fn expired(&self, now: u64) -> bool {
        self.has_timeout && self.timeout != 0 && now >= self.expiration
    }
}

impl RefNft {
    fn key(&self, addr: IpAddr) -> Key {
        let k = Key::from_addr(addr);
        if k.v6 { Key::v6(k.bits128() & self.v6mask) } else { k }
    }

    fn present(&self, k: Key, now: u64) -> Option<usize> {
        self.elems.iter().position(|e| e.key == k && !e.expired(now))
    }

    fn room(&self) -> bool {
        self.size.is_none_or(|s| (self.elems.len() as u32) < s)
    }

    fn gc(&mut self, now: u64) {
        self.elems.retain(|e| !e.expired(now));
    }

    fn maybe_gc(&mut self, now: u64) {
        if now >= self.next_gc {
            let at = now - now % self.gc_iv;
            self.gc(at);
            self.next_gc = at + self.gc_iv;
        }
    }

    fn insert(&mut self, k: Key, now: u64, timeout: u64, first: u64) {
        self.elems.push(RefElem { key: k, timeout, has_timeout: timeout > 0, expiration: now + first });
    }

    fn apply(&mut self, now: u64, addr: IpAddr, op: NftOp) -> Result<bool, NftError> {
        let k = self.key(addr);
        let p = self.present(k, now);
        match op {
            NftOp::Contains => Ok(p.is_some()),
            NftOp::Add | NftOp::Update => {
                if let Some(p) = p {
                    let e = &mut self.elems[p];
                    if matches!(op, NftOp::Update) && e.has_timeout && e.timeout != 0 {
                        e.expiration = now + self.default_timeout;
                    }
                    return Ok(true);
                }
                if !self.room() {
                    return Ok(false);
                }
                let t = self.default_timeout;
                self.insert(k, now, t, t);
                Ok(true)
            }
            NftOp::AddElement(o) => {
                let timeout = o.timeout.map_or(self.default_timeout, |d| nft_duration_to_jiffies(d, 250));
                let mut exp = 0;
                if let Some(e) = o.expires {
                    if timeout == 0 {
                        return Err(NftError::NotSupported);
                    }
                    exp = nft_duration_to_jiffies(e, 250);
                    if exp > timeout {
                        return Err(NftError::Range);
                    }
                }
                if let Some(p) = p {
                    if o.create {
                        return Err(NftError::Exists);
                    }
                    let e = &mut self.elems[p];
                    if e.has_timeout {
                        if timeout != e.timeout {
                            e.timeout = timeout;
                            if exp == 0 {
                                exp = timeout;
                            }
                        }
                        if exp != 0 {
                            e.expiration = now + exp;
                        }
                    }
                    return Ok(true);
                }
                if !self.room() {
                    return Err(NftError::SetFull);
                }
                self.insert(k, now, timeout, if exp != 0 { exp } else { timeout });
                Ok(true)
            }
            NftOp::Delete => match p {
                Some(p) => {
                    self.elems.remove(p);
                    Ok(true)
                }
                None => Err(NftError::NotFound),
            },
            NftOp::Gc => {
                self.gc(now);
                Ok(true)
            }
        }
    }

    fn live(&self, now: u64) -> Vec<(IpAddr, Option<u64>, Option<u64>)> {
        let mut v: Vec<_> = self
            .elems
            .iter()
            .filter(|e| !e.expired(now))
            .map(|e| {
                let timed = e.has_timeout && e.timeout != 0;
                (e.key.addr(), timed.then_some(e.timeout), timed.then(|| e.expiration - now))
            })
            .collect();
        v.sort();
        v
    }
}

fn apply_nft(s: &mut NftSet, now: u64, addr: IpAddr, op: NftOp) -> Result<bool, NftError> {
    match op {
        NftOp::Contains => Ok(s.contains(now, addr)),
        NftOp::Add => Ok(s.add(now, addr)),
        NftOp::Update => Ok(s.update(now, addr)),
        NftOp::AddElement(o) => s.add_element(now, addr, o).map(|()| true),
        NftOp::Delete => s.delete_element(now, addr).map(|()| true),
        NftOp::Gc => {
            s.gc(now);
            Ok(true)
        }
    }
}

fn nft_op() -> impl Strategy<Value = NftOp> {
    let secs = proptest::option::of((1u64..6).prop_map(Duration::from_secs));
    prop_oneof![
        3 => Just(NftOp::Contains),
        6 => Just(NftOp::Add),
        2 => Just(NftOp::Update),
        3 => (secs.clone(), secs, any::<bool>()).prop_map(|(timeout, expires, create)| NftOp::AddElement(ElementOpts { timeout, expires, create })),
        1 => Just(NftOp::Delete),
        1 => Just(NftOp::Gc),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Results, `nelems` and the live listing agree with an O(n) model in which every
    /// element is a record until gc removes it; `nelems` never exceeds `size`.
    #[test]
    fn nft_matches_reference_model(
        size in proptest::option::of(1u32..6),
        timeout_s in proptest::option::of(1u64..4),
        prefix in proptest::option::of(Just(64u8)),
        ops in proptest::collection::vec((0usize..POOL.len(), 0u64..400, nft_op()), 1..120),
    ) {
        let cfg = NftSetConfig { size, timeout: timeout_s.map(Duration::from_secs), ipv6_prefix: prefix, ..NftSetConfig::default() };
        let mut s = NftSet::new(cfg);
        let mut r = RefNft {
            size,
            default_timeout: timeout_s.map_or(0, |t| t * HZ),
            gc_iv: HZ,
            next_gc: HZ,
            v6mask: prefix_mask128(prefix.unwrap_or(128)),
            elems: Vec::new(),
        };
        let mut now = 0;
        for (a, dt, op) in ops {
            now += dt;
            s.maybe_gc(now);
            r.maybe_gc(now);
            let addr = ip(POOL[a]);
            prop_assert_eq!(apply_nft(&mut s, now, addr, op), r.apply(now, addr, op), "{:?} {} at {}", op, addr, now);
            prop_assert_eq!(s.len(), r.elems.len(), "nelems after {:?} at {}", op, now);
            let mut live: Vec<_> = s.iter(now).map(|e| (e.addr, e.timeout, e.expires_in)).collect();
            live.sort();
            prop_assert_eq!(live, r.live(now));
            if let Some(size) = size {
                prop_assert!(s.len() <= size as usize);
            }
        }
    }
}
