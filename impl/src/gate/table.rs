//! The table both backends are built on: keys, masks, and a slab indexed by an open-addressing
//! hash index, with a free list for reuse.
//!
//! This module owns how entries are stored and found: [`Key`] (family plus address bits),
//! the masks ([`XtMask`], [`prefix_mask128`]), the hash index and [`Table`], the slab of
//! per-backend nodes with lookup, insert, remove and flush. It must not know what a node means
//! (stamps, expirations, LRU order belong to `xt_recent` and `nft`), and nothing observable may
//! depend on the hash: the index is never iterated, and the slab's order is a pure function of
//! the operations applied. Every operation is O(1) (amortized over index growth).

use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// "No slab slot".
pub(super) const NIL: u32 = u32::MAX;

/// A table key: family plus address bits (IPv4 in `lo`, IPv6 as `hi:lo`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) struct Key {
    pub(super) hi: u64,
    pub(super) lo: u64,
    pub(super) v6: bool,
}

impl Key {
    #[inline]
    pub(super) fn v4(bits: u32) -> Key {
        Key { hi: 0, lo: u64::from(bits), v6: false }
    }

    #[inline]
    pub(super) fn v6(bits: u128) -> Key {
        Key { hi: (bits >> 64) as u64, lo: bits as u64, v6: true }
    }

    #[inline]
    pub(super) fn from_addr(addr: IpAddr) -> Key {
        match addr {
            IpAddr::V4(a) => Key::v4(u32::from(a)),
            IpAddr::V6(a) => Key::v6(u128::from(a)),
        }
    }

    #[inline]
    pub(super) fn bits128(self) -> u128 {
        (u128::from(self.hi) << 64) | u128::from(self.lo)
    }

    pub(super) fn addr(self) -> IpAddr {
        if self.v6 { IpAddr::V6(Ipv6Addr::from(self.bits128())) } else { IpAddr::V4(Ipv4Addr::from(self.lo as u32)) }
    }
}

/// Network-order mask of `len` leading one bits over 128 bits.
pub(super) fn prefix_mask128(len: u8) -> u128 {
    match len {
        0 => 0,
        l if l >= 128 => u128::MAX,
        l => u128::MAX << (128 - u32::from(l)),
    }
}

/// The 16-byte `--mask` of an xt_recent table (`union nf_inet_addr`).
///
/// The kernel applies the same 16 bytes to both families: an IPv4 address is ANDed with the
/// first 4 bytes, an IPv6 address with all 16. iptables starts from all ones
/// (`libxt_recent`'s `recent_init`), so [`XtMask::ALL`] is the mask of a rule without `--mask`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct XtMask(u128);

impl XtMask {
    /// No masking (the mask of a rule without `--mask`).
    pub const ALL: XtMask = XtMask(u128::MAX);

    /// The raw 16 bytes, network order.
    pub fn from_bytes(bytes: [u8; 16]) -> XtMask {
        XtMask(u128::from_be_bytes(bytes))
    }

    /// `ip6tables ... --mask <prefix as address>`: e.g. 64 gives `ffff:ffff:ffff:ffff::`.
    pub fn ipv6_prefix(len: u8) -> XtMask {
        XtMask(prefix_mask128(len))
    }

    /// `iptables ... --mask <prefix as address>`: the first 4 bytes hold the IPv4 mask; the
    /// other 12 stay all ones (they only matter to IPv6 packets sharing the table).
    pub fn ipv4_prefix(len: u8) -> XtMask {
        let v4 = if len >= 32 { u32::MAX } else { !(u32::MAX >> len) };
        XtMask((u128::from(v4) << 96) | (u128::MAX >> 32))
    }

    #[inline]
    pub(super) fn apply(self, k: Key) -> Key {
        if k.v6 { Key::v6(k.bits128() & self.0) } else { Key::v4((k.lo as u32) & ((self.0 >> 96) as u32)) }
    }
}

impl Default for XtMask {
    fn default() -> Self {
        XtMask::ALL
    }
}

/// Random hash seeds for one table: random per process, like the kernel's `hash_rnd`.
fn random_seeds() -> [u64; 3] {
    let s = RandomState::new();
    [s.hash_one(0u64), s.hash_one(1u64), s.hash_one(2u64)]
}

#[inline]
fn fold_mul(a: u64, b: u64) -> u64 {
    let p = u128::from(a).wrapping_mul(u128::from(b));
    (p as u64) ^ ((p >> 64) as u64)
}

/// Addresses that differ only in their low `GROUP_BITS` bits get adjacent home positions, so
/// a dense range (a /29 worth of neighbours) shares one cache line of the index instead of
/// costing one cache miss each. Sparse addresses hash as usual; a fully dense table raises
/// the mean displacement from 0.45 to 3.6 slots (still within one 64-byte line), which the
/// probe-length test pins.
const GROUP_BITS: u32 = 3;

/// One probe slot: the upper 32 hash bits (its low bits are the home position) and a slab slot.
#[derive(Clone, Copy, Debug)]
pub(super) struct Slot {
    pub(super) tag: u32,
    pub(super) idx: u32,
}

const EMPTY_SLOT: Slot = Slot { tag: 0, idx: NIL };

/// Open-addressing index (linear probing, backward-shift deletion) from [`Key`] to slab slot.
///
/// The keys live in the slab; a probe compares the 32-bit tag first and only then the key.
/// Load factor is kept at or below 1/2. Never iterated, so its order is never observable.
#[derive(Clone, Debug)]
pub(super) struct Index {
    pub(super) slots: Vec<Slot>,
    pub(super) len: usize,
    seed: [u64; 3],
}

impl Index {
    fn new() -> Index {
        Index { slots: Vec::new(), len: 0, seed: random_seeds() }
    }

    /// Hash of `k`: its low bits are the home position. Keyed by a per-process random seed.
    #[inline]
    fn tag(&self, k: &Key) -> u32 {
        let fam = if k.v6 { 0x9e37_79b9_7f4a_7c15 } else { 0 };
        let h = fold_mul((k.lo >> GROUP_BITS) ^ self.seed[0], k.hi ^ fam ^ self.seed[1]);
        ((fold_mul(h ^ self.seed[2], 0x2d35_8dcc_aa6c_78a5) >> 32) as u32)
            .wrapping_add((k.lo & ((1 << GROUP_BITS) - 1)) as u32)
    }

    /// Position of the slot holding `k`.
    #[inline]
    fn find(&self, k: &Key, tag: u32, key_at: impl Fn(u32) -> Key) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut pos = tag as usize & mask;
        loop {
            let s = self.slots[pos];
            if s.idx == NIL {
                return None;
            }
            if s.tag == tag && key_at(s.idx) == *k {
                return Some(pos);
            }
            pos = (pos + 1) & mask;
        }
    }

    /// Position of the slot pointing at slab slot `idx` (which must be indexed).
    fn find_idx(&self, tag: u32, idx: u32) -> usize {
        let mask = self.slots.len() - 1;
        let mut pos = tag as usize & mask;
        while self.slots[pos].idx != idx {
            debug_assert!(self.slots[pos].idx != NIL, "slab slot missing from index");
            pos = (pos + 1) & mask;
        }
        pos
    }

    /// Adds a key known to be absent.
    fn insert(&mut self, tag: u32, idx: u32) {
        if (self.len + 1) * 2 > self.slots.len() {
            self.grow();
        }
        self.place(Slot { tag, idx });
        self.len += 1;
    }

    fn place(&mut self, slot: Slot) {
        let mask = self.slots.len() - 1;
        let mut pos = slot.tag as usize & mask;
        while self.slots[pos].idx != NIL {
            pos = (pos + 1) & mask;
        }
        self.slots[pos] = slot;
    }

    fn grow(&mut self) {
        let new_len = (self.slots.len() * 2).max(16);
        let old = std::mem::replace(&mut self.slots, vec![EMPTY_SLOT; new_len]);
        for s in old.into_iter().filter(|s| s.idx != NIL) {
            self.place(s);
        }
    }

    fn remove_at(&mut self, pos: usize) {
        let mask = self.slots.len() - 1;
        let mut hole = pos;
        let mut j = (pos + 1) & mask;
        loop {
            let s = self.slots[j];
            if s.idx == NIL {
                break;
            }
            let home = s.tag as usize & mask;
            // Move `s` back into the hole unless its home lies cyclically in (hole, j].
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = s;
                hole = j;
            }
            j = (j + 1) & mask;
        }
        self.slots[hole] = EMPTY_SLOT;
        self.len -= 1;
    }

    fn clear(&mut self) {
        self.slots = Vec::new();
        self.len = 0;
    }

    fn memory_bytes(&self) -> usize {
        self.slots.capacity() * size_of::<Slot>()
    }
}

/// A slab node: whatever a backend stores per key, able to say which key it holds.
pub(super) trait Node {
    /// The key the node holds (meaningful only while the node is indexed).
    fn key(&self) -> Key;
}

/// The slab of nodes of one table, its hash index and its free list.
///
/// Slab slots are stable `u32` handles: a node keeps its slot until [`Table::remove`], and a
/// removed slot is reused (last freed, first reused) by the next [`Table::insert`], so the
/// slab's order depends only on the operations applied. The backends chain their own lists
/// (LRU, expiry) through these handles.
#[derive(Clone, Debug)]
pub(super) struct Table<N> {
    nodes: Vec<N>,
    free: Vec<u32>,
    pub(super) index: Index,
}

impl<N: Node> Table<N> {
    pub(super) fn new() -> Table<N> {
        Table { nodes: Vec::new(), free: Vec::new(), index: Index::new() }
    }

    /// Number of indexed nodes.
    #[inline]
    pub(super) fn len(&self) -> usize {
        self.index.len
    }

    /// The node in slot `i`.
    #[inline]
    pub(super) fn node(&self, i: u32) -> &N {
        &self.nodes[i as usize]
    }

    /// The node in slot `i`, to change (not its key: that would orphan its index entry).
    #[inline]
    pub(super) fn node_mut(&mut self, i: u32) -> &mut N {
        &mut self.nodes[i as usize]
    }

    /// Every slab slot in slot order, free ones included (the backend tells them apart).
    pub(super) fn slab(&self) -> &[N] {
        &self.nodes
    }

    /// The hash tag of `k`, to pass to [`lookup_tagged`](Self::lookup_tagged) and
    /// [`insert`](Self::insert) when one operation does both (one hash per packet).
    #[inline]
    pub(super) fn tag(&self, k: &Key) -> u32 {
        self.index.tag(k)
    }

    /// The slot holding `k`, given its tag.
    #[inline]
    pub(super) fn lookup_tagged(&self, k: &Key, tag: u32) -> Option<u32> {
        let nodes = &self.nodes;
        self.index.find(k, tag, |i| nodes[i as usize].key()).map(|pos| self.index.slots[pos].idx)
    }

    /// The slot holding `k`.
    #[inline]
    pub(super) fn lookup(&self, k: &Key) -> Option<u32> {
        if self.index.len == 0 {
            return None;
        }
        self.lookup_tagged(k, self.index.tag(k))
    }

    /// Indexes a new node for a key known to be absent (whose tag is `tag`): the last freed
    /// slot is handed to `reuse` (which must store the key; it may keep the slot's
    /// allocations), or else a node made by `fresh` is appended. Returns its slot.
    #[inline]
    pub(super) fn insert(&mut self, tag: u32, reuse: impl FnOnce(&mut N), fresh: impl FnOnce() -> N) -> u32 {
        let i = match self.free.pop() {
            Some(i) => {
                reuse(&mut self.nodes[i as usize]);
                i
            }
            None => {
                self.nodes.push(fresh());
                (self.nodes.len() - 1) as u32
            }
        };
        self.index.insert(tag, i);
        i
    }

    /// Unindexes the node in slot `i` and frees the slot (the node's contents stay until
    /// reuse).
    pub(super) fn remove(&mut self, i: u32) {
        let k = self.nodes[i as usize].key();
        let pos = self.index.find_idx(self.index.tag(&k), i);
        self.index.remove_at(pos);
        self.free.push(i);
    }

    /// Removes every node (the slab keeps its capacity for reuse; the index is released).
    pub(super) fn clear(&mut self) {
        self.nodes.clear();
        self.free.clear();
        self.index.clear();
    }

    /// Heap bytes of the slab, free list and index (not what nodes own themselves).
    pub(super) fn memory_bytes(&self) -> usize {
        self.nodes.capacity() * size_of::<N>() + self.free.capacity() * 4 + self.index.memory_bytes()
    }
}
