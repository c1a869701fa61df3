//! One nft set with `flags timeout`: elements, their expirations, and garbage collection.
//!
//! This module owns [`NftSet`]: the packet-path `add` / `update` and lookups, the control-plane
//! `add element` / `create element` / `delete element` with Linux 6.12 semantics, `size`, and
//! the expiry queue that lets garbage collection find what expired without a walk, as
//! docs/kernel.md §2 describes them. Expired elements still count against `size` until gc
//! removes them. Storage is the shared [`Table`]. It must not read a clock (time is a jiffy
//! argument that never goes backwards) nor let the hash order show: listings follow the slab.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use super::config::{Jiffies, NftSetConfig, nft_duration_to_jiffies};
use super::table::{Key, Node, Table, prefix_mask128};

/// Options of a control-plane `nft add element` / `nft create element`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ElementOpts {
    /// `timeout T`; `None`: the set's default timeout, or permanent if it has none.
    pub timeout: Option<Duration>,
    /// `expires E` (must not exceed the timeout).
    pub expires: Option<Duration>,
    /// `create` instead of `add`: an existing element is an error (`EEXIST`).
    pub create: bool,
}

/// Errors of control-plane set operations, with the kernel's errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NftError {
    /// `ENFILE`: the set holds `size` elements (expired ones count until gc). Retry after gc
    /// or raise `size`.
    #[error("ENFILE: set is full")]
    SetFull,
    /// `EEXIST`: `create element` of an element that exists. Use `add` to update it.
    #[error("EEXIST: element exists")]
    Exists,
    /// `ERANGE`: `expires` is greater than `timeout`.
    #[error("ERANGE: expires exceeds timeout")]
    Range,
    /// `EOPNOTSUPP`: `expires` on an element without a timeout.
    #[error("EOPNOTSUPP: expires without timeout")]
    NotSupported,
    /// `ENOENT`: no such (unexpired) element to delete.
    #[error("ENOENT: no such element")]
    NotFound,
}

impl NftError {
    /// The errno the kernel returns.
    pub fn errno(self) -> i32 {
        match self {
            NftError::SetFull => 23,
            NftError::Exists => 17,
            NftError::Range => 34,
            NftError::NotSupported => 95,
            NftError::NotFound => 2,
        }
    }
}

/// One nft element record in the slab: the current element for a key, plus the number of
/// expired elements with that key that garbage collection has not removed yet.
#[derive(Debug, Clone, Copy)]
pub(super) struct NftNode {
    hi: u64,
    lo: u64,
    expiration: Jiffies,
    /// Element timeout in jiffies (0: never expires).
    timeout: Jiffies,
    zombies: u32,
    /// The current element exists (it may be expired).
    live: bool,
    /// The element carries a timeout extension (`timeout > 0` at creation).
    has_timeout: bool,
    v6: bool,
}

impl Node for NftNode {
    #[inline]
    fn key(&self) -> Key {
        Key { hi: self.hi, lo: self.lo, v6: self.v6 }
    }
}

impl NftNode {
    /// `__nft_set_elem_expired`: `now >= expiration` for an element with a non-zero timeout.
    #[inline]
    fn expired(&self, now: Jiffies) -> bool {
        self.has_timeout && self.timeout != 0 && now >= self.expiration
    }

    #[inline]
    fn present(&self, now: Jiffies) -> bool {
        self.live && !self.expired(now)
    }

    #[inline]
    fn in_use(&self) -> bool {
        self.live || self.zombies > 0
    }
}

/// A live element as `nft list set` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NftElement {
    /// The (masked) key.
    pub addr: IpAddr,
    /// The element's timeout in jiffies; `None` if permanent.
    pub timeout: Option<Jiffies>,
    /// Jiffies until it expires; `None` if permanent.
    pub expires_in: Option<Jiffies>,
}

/// One nft set with `flags timeout` (`flags dynamic` for the packet-path operations).
///
/// Presence is exact (`now < expiration`); the set's count `nelems` also includes expired
/// elements until garbage collection removes them, which is what makes a full set refuse adds
/// while listing empty. Call [`maybe_gc`](Self::maybe_gc) with the current time before each
/// operation to run gc on the kernel's schedule (or [`gc`](Self::gc) to force one). Time is in
/// jiffies and must not go backwards. The model accepts both families; nft itself types a set
/// to one, so use one set per family as docs/kernel.md §2 does.
#[derive(Debug, Clone)]
pub struct NftSet {
    cfg: NftSetConfig,
    default_timeout: Jiffies,
    gc_interval: Jiffies,
    next_gc: Jiffies,
    v6_mask: u128,
    /// The element records; a slot is freed when its key has neither an element nor zombies.
    table: Table<NftNode>,
    nelems: u32,
    /// Expirations pushed in non-decreasing order (the common case: one set timeout).
    expiry_fifo: VecDeque<(Jiffies, u32)>,
    /// Expirations pushed out of order (control-plane timeouts of varying length).
    expiry_heap: BinaryHeap<Reverse<(Jiffies, u32)>>,
}

impl NftSet {
    /// Creates an empty set at jiffy 0 (its first gc runs at `gc_interval`).
    ///
    /// # Panics
    /// If `cfg` fails [`NftSetConfig::validate`].
    pub fn new(cfg: NftSetConfig) -> NftSet {
        if let Err(e) = cfg.validate() {
            panic!("invalid nft set config: {e}");
        }
        let gc_interval = nft_duration_to_jiffies(cfg.gc_interval, cfg.hz);
        NftSet {
            default_timeout: cfg.timeout.map_or(0, |t| nft_duration_to_jiffies(t, cfg.hz)),
            gc_interval,
            next_gc: gc_interval,
            v6_mask: prefix_mask128(cfg.ipv6_prefix.unwrap_or(128)),
            cfg,
            table: Table::new(),
            nelems: 0,
            expiry_fifo: VecDeque::new(),
            expiry_heap: BinaryHeap::new(),
        }
    }

    /// The set's declaration.
    pub fn config(&self) -> &NftSetConfig {
        &self.cfg
    }

    /// `nelems`: elements counted against `size`, including expired ones not yet collected.
    pub fn len(&self) -> usize {
        self.nelems as usize
    }

    /// True if `nelems` is 0.
    pub fn is_empty(&self) -> bool {
        self.nelems == 0
    }

    /// `size`, if the set has one.
    pub fn capacity(&self) -> Option<usize> {
        self.cfg.size.map(|s| s as usize)
    }

    /// The set's default timeout in jiffies (0: none).
    pub fn default_timeout_jiffies(&self) -> Jiffies {
        self.default_timeout
    }

    /// Live (unexpired) elements at `now`, in slab order (deterministic, not sorted).
    pub fn iter(&self, now: Jiffies) -> impl Iterator<Item = NftElement> + '_ {
        self.table.slab().iter().filter(move |n| n.present(now)).map(move |n| {
            let timed = n.has_timeout && n.timeout != 0;
            NftElement {
                addr: n.key().addr(),
                timeout: timed.then_some(n.timeout),
                expires_in: timed.then(|| n.expiration - now),
            }
        })
    }

    /// Number of live elements at `now` (O(n)).
    pub fn live_len(&self, now: Jiffies) -> usize {
        self.iter(now).count()
    }

    /// Estimated heap bytes held (slab, index, expiry queue, free list).
    pub fn memory_bytes(&self) -> usize {
        self.table.memory_bytes()
            + self.expiry_fifo.capacity() * size_of::<(Jiffies, u32)>()
            + self.expiry_heap.capacity() * size_of::<Reverse<(Jiffies, u32)>>()
    }

    /// `ip saddr @set`: is there an unexpired element for `addr` (masked)?
    pub fn contains(&self, now: Jiffies, addr: IpAddr) -> bool {
        let k = self.mask(addr);
        self.table.lookup(&k).is_some_and(|i| self.table.node(i).present(now))
    }

    /// Packet-path `add @set { ip saddr }`: true if an element is present afterwards.
    ///
    /// A present element is left alone (its timeout is **not** refreshed). An absent one is
    /// inserted with the set's timeout if `nelems < size`; otherwise the expression is false
    /// and the rule does not match.
    pub fn add(&mut self, now: Jiffies, addr: IpAddr) -> bool {
        let k = self.mask(addr);
        let tag = self.table.tag(&k);
        let found = self.table.lookup_tagged(&k, tag);
        if let Some(i) = found
            && self.table.node(i).present(now)
        {
            return true;
        }
        self.insert_packet(now, k, tag, found)
    }

    /// Packet-path `update @set { ip saddr }`: like [`add`](Self::add), but a present element
    /// with a timeout gets `expiration = now + set timeout` (a sliding window).
    pub fn update(&mut self, now: Jiffies, addr: IpAddr) -> bool {
        let k = self.mask(addr);
        let tag = self.table.tag(&k);
        let found = self.table.lookup_tagged(&k, tag);
        if let Some(i) = found {
            let n = self.table.node_mut(i);
            if n.present(now) {
                if n.has_timeout && n.timeout != 0 {
                    n.expiration = now.saturating_add(self.default_timeout);
                    let exp = n.expiration;
                    self.schedule(exp, i);
                }
                return true;
            }
        }
        self.insert_packet(now, k, tag, found)
    }

    /// The G1 fast path of [`NftRuleset`](super::NftRuleset): `ip saddr @set drop`, then
    /// `add @set { ip saddr } accept`, then the final `drop`. True (drop) if an element is
    /// present or the set is full; false (accept) once added. One lookup.
    #[inline]
    pub(super) fn check_or_add(&mut self, now: Jiffies, addr: IpAddr) -> bool {
        let k = self.mask(addr);
        let tag = self.table.tag(&k);
        let found = self.table.lookup_tagged(&k, tag);
        if let Some(i) = found
            && self.table.node(i).present(now)
        {
            return true;
        }
        !self.insert_packet(now, k, tag, found)
    }

    /// Control-plane `nft add element` (or `create element` with [`ElementOpts::create`]),
    /// with the semantics of Linux 6.12+.
    ///
    /// An existing unexpired element: `create` → `EEXIST`; else, if it has a timeout, the
    /// same timeout is a no-op, `expires` resets its expiry, a different timeout resets both
    /// (expiry = now + new timeout unless `expires` is given). An absent (or expired)
    /// element is inserted if `nelems < size`, else `ENFILE`. `expires` > `timeout` →
    /// `ERANGE`; `expires` without any timeout → `EOPNOTSUPP`.
    pub fn add_element(&mut self, now: Jiffies, addr: IpAddr, opts: ElementOpts) -> Result<(), NftError> {
        let hz = self.cfg.hz;
        let timeout = opts.timeout.map_or(self.default_timeout, |t| nft_duration_to_jiffies(t, hz));
        let mut expiration = 0;
        if let Some(e) = opts.expires {
            if timeout == 0 {
                return Err(NftError::NotSupported);
            }
            expiration = nft_duration_to_jiffies(e, hz);
            if expiration > timeout {
                return Err(NftError::Range);
            }
        }
        let k = self.mask(addr);
        let tag = self.table.tag(&k);
        let found = self.table.lookup_tagged(&k, tag);
        if let Some(i) = found {
            let n = self.table.node_mut(i);
            if n.present(now) {
                if opts.create {
                    return Err(NftError::Exists);
                }
                if n.has_timeout {
                    if timeout != n.timeout {
                        n.timeout = timeout;
                        if expiration == 0 {
                            expiration = timeout;
                        }
                    }
                    if expiration != 0 {
                        n.expiration = now.saturating_add(expiration);
                        let exp = n.expiration;
                        self.schedule(exp, i);
                    }
                }
                return Ok(());
            }
        }
        if !self.has_room() {
            return Err(NftError::SetFull);
        }
        let first = if expiration != 0 { expiration } else { timeout };
        self.insert_element(now, k, tag, found, timeout, first);
        Ok(())
    }

    /// Control-plane `nft delete element`: removes an unexpired element (`ENOENT` otherwise;
    /// an expired one stays counted until gc, as in the kernel).
    pub fn delete_element(&mut self, now: Jiffies, addr: IpAddr) -> Result<(), NftError> {
        let k = self.mask(addr);
        let Some(i) = self.table.lookup(&k) else {
            return Err(NftError::NotFound);
        };
        let n = self.table.node_mut(i);
        if !n.present(now) {
            return Err(NftError::NotFound);
        }
        n.live = false;
        self.nelems -= 1;
        if !n.in_use() {
            self.table.remove(i);
        }
        Ok(())
    }

    /// `nft flush set`: remove every element.
    pub fn flush(&mut self) {
        self.table.clear();
        self.nelems = 0;
        self.expiry_fifo.clear();
        self.expiry_heap.clear();
    }

    /// Run garbage collection if one was due at or before `now`: the kernel runs it at every
    /// multiple of `gc_interval`; the last such run at or before `now` removes everything that
    /// had expired by then (earlier runs' work is a subset of it).
    pub fn maybe_gc(&mut self, now: Jiffies) {
        if now >= self.next_gc {
            let at = now - now % self.gc_interval;
            self.gc(at);
            self.next_gc = at + self.gc_interval;
        }
    }

    /// Garbage collection at `now`: remove every expired element. `now` must not be earlier
    /// than an operation already applied.
    pub fn gc(&mut self, now: Jiffies) {
        loop {
            let fifo = self.expiry_fifo.front().map(|&(e, _)| e);
            let heap = self.expiry_heap.peek().map(|&Reverse((e, _))| e);
            let i = match (fifo, heap) {
                (Some(f), h) if f <= now && h.is_none_or(|h| f <= h) => self.expiry_fifo.pop_front().map(|(_, i)| i),
                (_, Some(h)) if h <= now => self.expiry_heap.pop().map(|Reverse((_, i))| i),
                _ => None,
            };
            let Some(i) = i else { break };
            self.collect(now, i);
        }
    }

    // --- internals ---

    #[inline]
    fn mask(&self, addr: IpAddr) -> Key {
        let k = Key::from_addr(addr);
        if k.v6 { Key::v6(k.bits128() & self.v6_mask) } else { k }
    }

    #[inline]
    fn has_room(&self) -> bool {
        self.cfg.size.is_none_or(|s| self.nelems < s)
    }

    /// The packet path's insert of an absent element (`nft_dynset_new`).
    #[inline]
    fn insert_packet(&mut self, now: Jiffies, k: Key, tag: u32, found: Option<u32>) -> bool {
        if !self.has_room() {
            return false;
        }
        let t = self.default_timeout;
        self.insert_element(now, k, tag, found, t, t);
        true
    }

    /// Adds a new element for `k`; `found` is its node if an expired element or zombies
    /// exist (the expired element then becomes a zombie that still counts).
    fn insert_element(
        &mut self,
        now: Jiffies,
        k: Key,
        tag: u32,
        found: Option<u32>,
        timeout: Jiffies,
        expires: Jiffies,
    ) {
        let expiration = now.saturating_add(expires);
        let i = match found {
            Some(i) => {
                let n = self.table.node_mut(i);
                if n.live {
                    n.zombies += 1;
                }
                n.live = true;
                n.has_timeout = timeout > 0;
                n.timeout = timeout;
                n.expiration = expiration;
                i
            }
            None => {
                let node = NftNode {
                    hi: k.hi,
                    lo: k.lo,
                    expiration,
                    timeout,
                    zombies: 0,
                    live: true,
                    has_timeout: timeout > 0,
                    v6: k.v6,
                };
                self.table.insert(tag, |n| *n = node, || node)
            }
        };
        self.nelems += 1;
        if timeout > 0 {
            self.schedule(expiration, i);
        }
    }

    #[inline]
    fn schedule(&mut self, expiration: Jiffies, i: u32) {
        if self.expiry_fifo.back().is_none_or(|&(b, _)| b <= expiration) {
            self.expiry_fifo.push_back((expiration, i));
        } else {
            self.expiry_heap.push(Reverse((expiration, i)));
        }
    }

    /// gc's visit of node `i` (named by an expiry entry that is due; the node may since have
    /// been refreshed or reused, which is harmless: gc removes whatever has expired).
    fn collect(&mut self, now: Jiffies, i: u32) {
        let n = self.table.node_mut(i);
        if !n.in_use() {
            return;
        }
        self.nelems -= n.zombies;
        n.zombies = 0;
        if n.live && n.expired(now) {
            n.live = false;
            self.nelems -= 1;
        }
        if !n.in_use() {
            self.table.remove(i);
        }
    }
}
