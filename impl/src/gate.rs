//! The kernel `recent` table model: exact xt_recent and nft-set semantics for rules G1 and G2.
//!
//! This module owns the in-process connection gate ([`Gate`]) that the server uses when it runs
//! on embedded defaults, and that the simulation puts in front of the gatekeeper host as its
//! kernel firewall model. It reproduces `/work/shared/KERNEL.md` to the jiffy:
//!
//! - [`XtRecent`]: one xt_recent table (`--set`, `--rcheck`, `--update`, `--remove`,
//!   `--seconds`, `--hitcount`, `--reap`, `--mask`, the `ip_list_tot` LRU, the timestamp ring,
//!   `/proc/net/xt_recent/NAME` reads and writes).
//! - [`NftSet`]: one nft set with `flags timeout` (packet-path `add` / `update`, lookups,
//!   control-plane `add element` / `create element` / `delete element` with 6.12 semantics,
//!   `size`, expired elements that still count until garbage collection).
//! - [`XtRuleset`] and [`NftRuleset`]: the KERNEL.md §2 rulesets evaluated for one SYN.
//! - [`Gate`]: rules G2 then G1 on top of either backend, driven by [`Instant`]s.
//!
//! It must not do IO, read a clock, or let anything observable depend on hash order: time is
//! always an argument (`now`, in jiffies for the table types and as an [`Instant`] for
//! [`Gate`]), and tables are a slab plus an open-addressing index plus intrusive lists, so
//! iteration order is a pure function of the operations applied. The hash seed is random per
//! process (like the kernel's `hash_rnd`), which affects speed only, never results. Every
//! packet-path operation is O(1) (amortized for the nft expiry queue; a control-plane add
//! whose expiry is earlier than one already queued is O(log n)). Time must never go
//! backwards, as kernel jiffies never do; [`Gate`] enforces that for its callers.
//!
//! Not modelled: `--rttl` and stored TTLs (rendered as `ttl: 0`), `--rdest`, `!` (invert),
//! the 16-bit `index` overflow of a 65536-slot ring, and kernel memory-allocation failures.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt::{self, Write as _};
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Kernel time: ticks of `HZ` per second since the model's origin.
pub type Jiffies = u64;

/// The kernel's HZ on the project's machines (KERNEL.md: HZ=250, 4 ms per jiffy).
pub const DEFAULT_HZ: u32 = 250;
/// xt_recent's default `ip_list_tot`: entries per table.
pub const DEFAULT_IP_LIST_TOT: u32 = 100;
/// xt_recent's default timestamp ring size R (no `--hitcount`, `ip_pkt_list_tot=0`).
pub const DEFAULT_RING_SIZE: u32 = 32;
/// Largest ring xt_recent builds (`XT_RECENT_MAX_NSTAMPS`).
pub const MAX_RING_SIZE: u32 = 65_536;
/// Largest `--hitcount` the kernel accepts.
pub const MAX_HITCOUNT: u32 = MAX_RING_SIZE - 1;
/// Size an nft dynamic set gets when declared without `size` (KERNEL.md §2, tested).
pub const NFT_DEFAULT_DYNSET_SIZE: u32 = 65_535;
/// nft's default `gc-interval`.
pub const NFT_DEFAULT_GC_INTERVAL: Duration = Duration::from_secs(1);
/// Largest table the model accepts (slab indices are `u32`, with room for the probe index).
pub const MAX_TABLE_ENTRIES: u32 = 1 << 30;

/// `sizeof("+b335:1d35:1e55:dead:c0de:1715:255.255.255.255")`: the proc write buffer.
const PROC_BUF_LEN: usize = 47;
/// "No slab slot".
const NIL: u32 = u32::MAX;

/// The kernel's `time_after(a, b)`: `a` is later than `b`, with wrapping arithmetic.
#[inline]
fn time_after(a: Jiffies, b: Jiffies) -> bool {
    (b.wrapping_sub(a) as i64) < 0
}

/// Converts a duration to jiffies the way nf_tables does for timeouts and expirations:
/// milliseconds (truncated), then `nsecs_to_jiffies64` rounded down, but at least 1 for a
/// non-zero value (`nf_msecs_to_jiffies64`).
pub fn nft_duration_to_jiffies(d: Duration, hz: u32) -> Jiffies {
    let ms = d.as_millis();
    if ms == 0 {
        return 0;
    }
    let j = ms.saturating_mul(u128::from(hz)) / 1000;
    u64::try_from(j).unwrap_or(u64::MAX).max(1)
}

// ---------------------------------------------------------------------------------------------
// Keys, masks and the hash index
// ---------------------------------------------------------------------------------------------

/// A table key: family plus address bits (IPv4 in `lo`, IPv6 as `hi:lo`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Key {
    hi: u64,
    lo: u64,
    v6: bool,
}

impl Key {
    #[inline]
    fn v4(bits: u32) -> Key {
        Key { hi: 0, lo: u64::from(bits), v6: false }
    }

    #[inline]
    fn v6(bits: u128) -> Key {
        Key { hi: (bits >> 64) as u64, lo: bits as u64, v6: true }
    }

    #[inline]
    fn from_addr(addr: IpAddr) -> Key {
        match addr {
            IpAddr::V4(a) => Key::v4(u32::from(a)),
            IpAddr::V6(a) => Key::v6(u128::from(a)),
        }
    }

    #[inline]
    fn bits128(self) -> u128 {
        (u128::from(self.hi) << 64) | u128::from(self.lo)
    }

    fn addr(self) -> IpAddr {
        if self.v6 { IpAddr::V6(Ipv6Addr::from(self.bits128())) } else { IpAddr::V4(Ipv4Addr::from(self.lo as u32)) }
    }
}

/// Network-order mask of `len` leading one bits over 128 bits.
fn prefix_mask128(len: u8) -> u128 {
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
    fn apply(self, k: Key) -> Key {
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
struct Slot {
    tag: u32,
    idx: u32,
}

const EMPTY_SLOT: Slot = Slot { tag: 0, idx: NIL };

/// Open-addressing index (linear probing, backward-shift deletion) from [`Key`] to slab slot.
///
/// The keys live in the slab; a probe compares the 32-bit tag first and only then the key.
/// Load factor is kept at or below 1/2. Never iterated, so its order is never observable.
#[derive(Clone, Debug)]
struct Index {
    slots: Vec<Slot>,
    len: usize,
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

// ---------------------------------------------------------------------------------------------
// Kernel address parsers (net/core/utils.c), used by the /proc write protocol
// ---------------------------------------------------------------------------------------------

const IN6PTON_XDIGIT: i32 = 0x0001_0000;
const IN6PTON_DIGIT: i32 = 0x0002_0000;
const IN6PTON_COLON_MASK: i32 = 0x0070_0000;
const IN6PTON_COLON_1: i32 = 0x0010_0000;
const IN6PTON_COLON_2: i32 = 0x0020_0000;
const IN6PTON_COLON_1_2: i32 = 0x0040_0000;
const IN6PTON_DOT: i32 = 0x0080_0000;
const IN6PTON_DELIM: i32 = 0x1000_0000;
const IN6PTON_NULL: i32 = 0x2000_0000;
const IN6PTON_UNKNOWN: i32 = 0x4000_0000;

fn xdigit2bin(c: u8, delim: u8) -> i32 {
    if c == delim || c == 0 {
        return IN6PTON_DELIM;
    }
    if c == b':' {
        return IN6PTON_COLON_MASK;
    }
    if c == b'.' {
        return IN6PTON_DOT;
    }
    let val = match c {
        b'0'..=b'9' => i32::from(c - b'0'),
        b'a'..=b'f' => i32::from(c - b'a' + 10),
        b'A'..=b'F' => i32::from(c - b'A' + 10),
        _ => return IN6PTON_UNKNOWN,
    };
    val | IN6PTON_XDIGIT | if val < 10 { IN6PTON_DIGIT } else { 0 }
}

/// `in4_pton(src, src.len(), dst, delim, NULL)`: bytes past the end read as NUL.
fn in4_pton(src: &[u8], delim: u8) -> Option<[u8; 4]> {
    let mut s = 0usize;
    let mut d = [0u8; 4];
    let mut i = 0usize;
    let mut w: i32 = 0;
    loop {
        let ch = src.get(s).copied().unwrap_or(0);
        let c = xdigit2bin(ch, delim);
        if c & (IN6PTON_DIGIT | IN6PTON_DOT | IN6PTON_DELIM | IN6PTON_COLON_MASK) == 0 {
            return None;
        }
        if c & (IN6PTON_DOT | IN6PTON_DELIM | IN6PTON_COLON_MASK) != 0 {
            if w == 0 {
                return None;
            }
            d[i] = (w & 0xff) as u8;
            w = 0;
            i += 1;
            if c & (IN6PTON_DELIM | IN6PTON_COLON_MASK) != 0 {
                if i != 4 {
                    return None;
                }
                return Some(d);
            }
        } else {
            // The flag bits ride along in the high half (the kernel builds with -fwrapv).
            w = w.wrapping_mul(10).wrapping_add(c);
            if (w & 0xffff) > 255 {
                return None;
            }
        }
        if i >= 4 {
            return None;
        }
        s += 1;
    }
}

/// `in6_pton(src, src.len(), dst, delim, NULL)`: bytes past the end read as NUL.
fn in6_pton(src: &[u8], delim: u8) -> Option<[u8; 16]> {
    let mut s = 0usize;
    let mut tok: Option<usize> = None;
    let mut dbuf = [0u8; 16];
    let mut d = 0usize;
    let mut dc: Option<usize> = None;
    let mut state = IN6PTON_COLON_1_2 | IN6PTON_XDIGIT | IN6PTON_NULL;
    let mut w: i32 = 0;
    loop {
        let ch = src.get(s).copied().unwrap_or(0);
        let c = xdigit2bin(ch, delim);
        if c & state == 0 {
            return None;
        }
        if c & (IN6PTON_DELIM | IN6PTON_COLON_MASK) != 0 {
            // Process one 16-bit word.
            if state & IN6PTON_NULL == 0 {
                *dbuf.get_mut(d)? = (w >> 8) as u8;
                *dbuf.get_mut(d + 1)? = w as u8;
                d += 2;
            }
            w = 0;
            if c & IN6PTON_DELIM != 0 {
                break;
            }
            state = match state & IN6PTON_COLON_MASK {
                IN6PTON_COLON_2 => {
                    dc = Some(d);
                    let mut st = IN6PTON_XDIGIT | IN6PTON_DELIM;
                    if d >= 16 {
                        st |= IN6PTON_NULL;
                    }
                    st
                }
                x if x == IN6PTON_COLON_1 | IN6PTON_COLON_1_2 => IN6PTON_XDIGIT | IN6PTON_COLON_2,
                IN6PTON_COLON_1 => IN6PTON_XDIGIT,
                IN6PTON_COLON_1_2 => IN6PTON_COLON_2,
                _ => 0,
            };
            tok = Some(s + 1);
        } else if c & IN6PTON_DOT != 0 {
            // DOT is only ever allowed after a colon, so `tok` is set.
            let start = tok.unwrap_or(s);
            let v4 = in4_pton(src.get(start..).unwrap_or(&[]), delim)?;
            dbuf.get_mut(d..d + 4)?.copy_from_slice(&v4);
            d += 4;
            break;
        } else {
            w = (w << 4) | (0xff & c);
            state = IN6PTON_COLON_1 | IN6PTON_DELIM;
            if w & 0xf000 == 0 {
                state |= IN6PTON_XDIGIT;
            }
            if dc.is_none() && d + 2 < 16 {
                state |= IN6PTON_COLON_1_2;
                state &= !IN6PTON_DELIM;
            }
            if d + 2 >= 16 {
                state &= !(IN6PTON_COLON_1 | IN6PTON_COLON_1_2);
            }
        }
        if (dc.is_some() && d + 4 < 16) || d + 4 == 16 {
            state |= IN6PTON_DOT;
        }
        if d >= 16 {
            state &= !(IN6PTON_XDIGIT | IN6PTON_COLON_MASK);
        }
        s += 1;
    }
    let Some(dc) = dc else {
        return Some(dbuf);
    };
    let mut out = [0u8; 16];
    let mut i = 15isize;
    let mut dd = d as isize - 1;
    let dc = dc as isize;
    while dd >= dc {
        out[i as usize] = dbuf[dd as usize];
        i -= 1;
        dd -= 1;
    }
    while i >= dc {
        out[i as usize] = 0;
        i -= 1;
    }
    while i >= 0 {
        out[i as usize] = dbuf[dd as usize];
        i -= 1;
        dd -= 1;
    }
    Some(out)
}

/// The kernel's `strnchr`: stops at NUL.
fn strnchr(buf: &[u8], c: u8) -> bool {
    for &b in buf {
        if b == 0 {
            return false;
        }
        if b == c {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------
// xt_recent
// ---------------------------------------------------------------------------------------------

/// How an xt_recent table is created: fixed by the first rule that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XtRecentConfig {
    /// `xt_recent.ip_list_tot`: most entries the table holds (IPv4 and IPv6 together).
    pub ip_list_tot: u32,
    /// Kernel HZ: `--seconds s` means a window of `s * hz` jiffies.
    pub hz: u32,
    /// Timestamp ring size R, a power of two (see [`XtRecentConfig::ring_size_for`]).
    pub ring_size: u32,
    /// The `--mask` of the first rule that named the table.
    pub mask: XtMask,
}

impl Default for XtRecentConfig {
    fn default() -> Self {
        XtRecentConfig {
            ip_list_tot: DEFAULT_IP_LIST_TOT,
            hz: DEFAULT_HZ,
            ring_size: DEFAULT_RING_SIZE,
            mask: XtMask::ALL,
        }
    }
}

impl XtRecentConfig {
    /// The ring size a rule creates (`recent_mt_check`): `ip_pkt_list_tot` (0 = automatic)
    /// when it is set and larger than the hitcount, else the hitcount, else 32, rounded up to
    /// a power of two.
    pub fn ring_size_for(hit_count: u32, ip_pkt_list_tot: u32) -> u32 {
        let n = if ip_pkt_list_tot != 0 && hit_count < ip_pkt_list_tot {
            ip_pkt_list_tot
        } else if hit_count != 0 {
            hit_count
        } else {
            DEFAULT_RING_SIZE
        };
        n.min(MAX_RING_SIZE).next_power_of_two()
    }

    /// Checks the limits the model relies on.
    pub fn validate(&self) -> Result<(), GateConfigError> {
        if self.ip_list_tot == 0 || self.ip_list_tot > MAX_TABLE_ENTRIES {
            return Err(GateConfigError::TableSize(self.ip_list_tot));
        }
        if self.hz == 0 {
            return Err(GateConfigError::Hz);
        }
        if !self.ring_size.is_power_of_two() || self.ring_size > MAX_RING_SIZE {
            return Err(GateConfigError::RingSize(self.ring_size));
        }
        Ok(())
    }
}

/// One xt_recent entry in the slab.
#[derive(Debug, Clone)]
struct XtNode {
    hi: u64,
    lo: u64,
    /// `stamps[0]`.
    first: Jiffies,
    /// `stamps[index - 1]`, the most recent stamp, kept here so checks need not touch the ring.
    last: Jiffies,
    /// `stamps[1..nstamps]`, grown lazily up to R-1 (most entries never get a second stamp).
    more: Vec<Jiffies>,
    /// LRU neighbours (`NIL` at the ends; free nodes chain through `next`).
    prev: u32,
    next: u32,
    /// The kernel's `e->index`: one past the slot written last (1..=R).
    index: u32,
    v6: bool,
}

impl XtNode {
    #[inline]
    fn key(&self) -> Key {
        Key { hi: self.hi, lo: self.lo, v6: self.v6 }
    }

    #[inline]
    fn nstamps(&self) -> u32 {
        1 + self.more.len() as u32
    }

    #[inline]
    fn stamp(&self, slot: u32) -> Jiffies {
        if slot == 0 { self.first } else { self.more[slot as usize - 1] }
    }

    /// `stamps[index - 1]`: the most recent stamp (what `--reap` and `last_seen` read).
    #[inline]
    fn last(&self) -> Jiffies {
        debug_assert_eq!(self.last, self.stamp(self.index - 1));
        self.last
    }

    /// `recent_entry_update`'s ring write: `index &= mask; stamps[index++] = now`.
    #[inline]
    fn push_stamp(&mut self, now: Jiffies, ring_mask: u32) {
        let i = self.index & ring_mask;
        if i == 0 {
            self.first = now;
        } else if i as usize - 1 == self.more.len() {
            self.more.push(now);
        } else {
            self.more[i as usize - 1] = now;
        }
        self.index = i + 1;
        self.last = now;
    }

    /// The `--rcheck`/`--update` loop: `time` is `now - seconds * HZ`.
    ///
    /// Without `--hitcount` the loop asks whether any stamp is in the window; stamps are
    /// pushed in non-decreasing time, so that is whether the last one is, which needs no
    /// walk over the ring.
    #[inline]
    fn matches(&self, time: Jiffies, windowed: bool, hit_count: u32) -> bool {
        if hit_count == 0 {
            return !windowed || !time_after(time, self.last);
        }
        let mut hits = 0u32;
        for slot in 0..self.nstamps() {
            if windowed && time_after(time, self.stamp(slot)) {
                continue;
            }
            hits += 1;
            if hit_count == 0 || hits >= hit_count {
                return true;
            }
        }
        false
    }
}

/// A read-only view of one [`XtRecent`] entry.
#[derive(Debug, Clone, Copy)]
pub struct XtEntry<'a> {
    node: &'a XtNode,
}

impl<'a> XtEntry<'a> {
    /// The stored (masked) address.
    pub fn addr(&self) -> IpAddr {
        self.node.key().addr()
    }

    /// The stored TTL: always 0 here (`--rttl` is not modelled; `/proc` writes store 0).
    pub fn ttl(&self) -> u8 {
        0
    }

    /// The most recent stamp (`last_seen`).
    pub fn last_seen(&self) -> Jiffies {
        self.node.last()
    }

    /// The kernel's `oldest_pkt` field, which is really the ring write index (1..=R).
    pub fn oldest_pkt(&self) -> u32 {
        self.node.index
    }

    /// Number of stamps held (at most R).
    pub fn nstamps(&self) -> u32 {
        self.node.nstamps()
    }

    /// The stamps in ring-slot order, as `/proc` prints them.
    pub fn stamps(&self) -> impl Iterator<Item = Jiffies> + 'a {
        let node = self.node;
        (0..node.nstamps()).map(move |i| node.stamp(i))
    }
}

/// Iterator over an [`XtRecent`] table in LRU order (least recently stamped first).
#[derive(Debug, Clone)]
pub struct XtIter<'a> {
    table: &'a XtRecent,
    at: u32,
}

impl<'a> Iterator for XtIter<'a> {
    type Item = XtEntry<'a>;

    fn next(&mut self) -> Option<XtEntry<'a>> {
        if self.at == NIL {
            return None;
        }
        let node = &self.table.nodes[self.at as usize];
        self.at = node.next;
        Some(XtEntry { node })
    }
}

/// One xt_recent table (one `--name` in one network namespace).
///
/// Addresses given to the packet-path operations ([`rcheck`](Self::rcheck),
/// [`update`](Self::update), [`set`](Self::set), [`remove`](Self::remove)) are masked with
/// the table's mask; `/proc` writes ([`proc_write`](Self::proc_write),
/// [`proc_add`](Self::proc_add), [`proc_remove`](Self::proc_remove)) are not. IPv4 and IPv6
/// entries are keyed separately (`::ffff:a.b.c.d` is an IPv6 entry) and share the capacity.
/// Time is in jiffies and must not go backwards.
#[derive(Debug, Clone)]
pub struct XtRecent {
    cfg: XtRecentConfig,
    ring_mask: u32,
    nodes: Vec<XtNode>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
    index: Index,
}

impl XtRecent {
    /// Creates an empty table.
    ///
    /// # Panics
    /// If `cfg` fails [`XtRecentConfig::validate`].
    pub fn new(cfg: XtRecentConfig) -> XtRecent {
        if let Err(e) = cfg.validate() {
            panic!("invalid xt_recent config: {e}");
        }
        XtRecent {
            cfg,
            ring_mask: cfg.ring_size - 1,
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            index: Index::new(),
        }
    }

    /// The table's configuration (its ring size reflects [`require_hitcount`](Self::require_hitcount)).
    pub fn config(&self) -> &XtRecentConfig {
        &self.cfg
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.index.len
    }

    /// True if the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.index.len == 0
    }

    /// `ip_list_tot`: the most entries the table holds.
    pub fn capacity(&self) -> usize {
        self.cfg.ip_list_tot as usize
    }

    /// Timestamp ring size R.
    pub fn ring_size(&self) -> u32 {
        self.ring_mask + 1
    }

    /// Entries in LRU order: the next eviction victim first, the last stamped last.
    pub fn iter(&self) -> XtIter<'_> {
        XtIter { table: self, at: self.head }
    }

    /// The entry for `addr` (masked), if any.
    pub fn get(&self, addr: IpAddr) -> Option<XtEntry<'_>> {
        let k = self.cfg.mask.apply(Key::from_addr(addr));
        self.lookup(&k).map(|i| XtEntry { node: &self.nodes[i as usize] })
    }

    /// Estimated heap bytes held (slab, index, stamp rings, free list).
    pub fn memory_bytes(&self) -> usize {
        let rings: usize = self.nodes.iter().map(|n| n.more.capacity() * 8).sum();
        self.nodes.capacity() * size_of::<XtNode>() + self.free.capacity() * 4 + self.index.memory_bytes() + rings
    }

    /// Models loading another rule that names this table with `--hitcount hit_count`: if it
    /// needs a bigger ring, the kernel **flushes** the table and grows R. Returns whether the
    /// table was flushed.
    pub fn require_hitcount(&mut self, hit_count: u32) -> Result<bool, GateConfigError> {
        if hit_count > MAX_HITCOUNT {
            return Err(GateConfigError::Hitcount(hit_count));
        }
        let r = XtRecentConfig::ring_size_for(hit_count, 0);
        if r > self.ring_size() {
            self.flush();
            self.ring_mask = r - 1;
            self.cfg.ring_size = r;
            return Ok(true);
        }
        Ok(false)
    }

    /// `-m recent --rcheck [--seconds s] [--hitcount n] [--reap]`: does `addr` match?
    ///
    /// `Some(0)` means the same as `None`, as in the kernel. With `--reap`, if `addr` has an
    /// entry, the LRU head is deleted when its last stamp is older than the window (at most
    /// one deletion per packet).
    ///
    /// # Panics
    /// If `reap` is set without `seconds` (iptables and the kernel refuse that rule).
    pub fn rcheck(
        &mut self,
        now: Jiffies,
        addr: IpAddr,
        seconds: Option<u32>,
        hitcount: Option<u32>,
        reap: bool,
    ) -> bool {
        self.check(now, addr, seconds, hitcount, reap, false)
    }

    /// `-m recent --update [--seconds s] [--hitcount n] [--reap]`: like
    /// [`rcheck`](Self::rcheck), and a match stamps the entry and moves it to the LRU tail
    /// (which makes a drop rule a sliding window).
    ///
    /// # Panics
    /// If `reap` is set without `seconds`.
    pub fn update(
        &mut self,
        now: Jiffies,
        addr: IpAddr,
        seconds: Option<u32>,
        hitcount: Option<u32>,
        reap: bool,
    ) -> bool {
        self.check(now, addr, seconds, hitcount, reap, true)
    }

    /// `-m recent --set`: insert `{[now]}` (evicting the LRU head of a full table) or push a
    /// stamp and move to the LRU tail. Always matches.
    pub fn set(&mut self, now: Jiffies, addr: IpAddr) -> bool {
        let k = self.cfg.mask.apply(Key::from_addr(addr));
        self.set_key(now, k);
        true
    }

    /// `-m recent --remove`: delete the entry. Matches (returns true) iff there was one.
    pub fn remove(&mut self, addr: IpAddr) -> bool {
        let k = self.cfg.mask.apply(Key::from_addr(addr));
        self.remove_key(&k)
    }

    /// Write `+addr` to `/proc/net/xt_recent/NAME`: like `--set`, but not masked.
    pub fn proc_add(&mut self, now: Jiffies, addr: IpAddr) {
        self.set_key(now, Key::from_addr(addr));
    }

    /// Write `-addr`: delete the (unmasked) entry; returns whether there was one (the write
    /// itself succeeds either way).
    pub fn proc_remove(&mut self, addr: IpAddr) -> bool {
        self.remove_key(&Key::from_addr(addr))
    }

    /// Delete every entry (`/` written to `/proc`, or the table recreated).
    pub fn flush(&mut self) {
        self.nodes.clear();
        self.free.clear();
        self.index.clear();
        self.head = NIL;
        self.tail = NIL;
    }

    /// One `write()` at offset 0 to `/proc/net/xt_recent/NAME` (`recent_mt_proc_write`).
    ///
    /// `+addr` adds or stamps, `-addr` deletes (fine if absent), `/` flushes. The address is
    /// IPv6 if a `:` appears anywhere in the (47-byte) buffer before a NUL, else IPv4; only a
    /// `\n` (or NUL, or the end) may follow it, and anything after that `\n` is ignored (a
    /// multi-line buffer adds only its first address). Not masked. An empty write does
    /// nothing. The kernel's `ESPIPE` for writes at a non-zero offset is the caller's concern.
    pub fn proc_write(&mut self, now: Jiffies, line: &str) -> Result<(), ProcError> {
        self.proc_write_bytes(now, line.as_bytes())
    }

    /// [`proc_write`](Self::proc_write) for arbitrary bytes.
    pub fn proc_write_bytes(&mut self, now: Jiffies, buf: &[u8]) -> Result<(), ProcError> {
        if buf.is_empty() {
            return Ok(());
        }
        let buf = &buf[..buf.len().min(PROC_BUF_LEN)];
        let add = match buf[0] {
            b'/' => {
                self.flush();
                return Ok(());
            }
            b'-' => false,
            b'+' => true,
            _ => return Err(ProcError::InvalidArgument),
        };
        let rest = &buf[1..];
        let key = if strnchr(rest, b':') {
            Key::v6(u128::from_be_bytes(in6_pton(rest, b'\n').ok_or(ProcError::InvalidArgument)?))
        } else {
            Key::v4(u32::from_be_bytes(in4_pton(rest, b'\n').ok_or(ProcError::InvalidArgument)?))
        };
        if add {
            self.set_key(now, key);
        } else {
            self.remove_key(&key);
        }
        Ok(())
    }

    /// The text of `/proc/net/xt_recent/NAME`, one line per entry:
    /// `src=<addr> ttl: 0 last_seen: J oldest_pkt: I s0, s1, …`.
    ///
    /// IPv4 prints dotted, IPv6 as 8 zero-padded hex groups (`%pI6`); stamps are in ring-slot
    /// order. The kernel lists entries in hash-bucket order; this model lists them in LRU
    /// order (next eviction victim first), which is deterministic.
    pub fn proc_read(&self) -> String {
        let mut out = String::new();
        for e in self.iter() {
            match e.addr() {
                IpAddr::V4(a) => {
                    let _ = write!(out, "src={a}");
                }
                IpAddr::V6(a) => {
                    let s = a.segments();
                    let _ = write!(
                        out,
                        "src={:04x}:{:04x}:{:04x}:{:04x}:{:04x}:{:04x}:{:04x}:{:04x}",
                        s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]
                    );
                }
            }
            let _ = write!(out, " ttl: {} last_seen: {} oldest_pkt: {}", e.ttl(), e.last_seen(), e.oldest_pkt());
            for (i, s) in e.stamps().enumerate() {
                let _ = write!(out, "{} {s}", if i == 0 { "" } else { "," });
            }
            out.push('\n');
        }
        out
    }

    /// Would `--rcheck --seconds s --hitcount n` match, without reaping anything?
    pub fn peek(&self, now: Jiffies, addr: IpAddr, seconds: Option<u32>, hitcount: Option<u32>) -> bool {
        let k = self.cfg.mask.apply(Key::from_addr(addr));
        let Some(e) = self.lookup(&k) else {
            return false;
        };
        let (time, windowed) = self.window_start(now, seconds);
        self.nodes[e as usize].matches(time, windowed, hitcount.unwrap_or(0))
    }

    // --- internals ---

    #[inline]
    fn window_start(&self, now: Jiffies, seconds: Option<u32>) -> (Jiffies, bool) {
        match seconds {
            Some(s) if s != 0 => (now.wrapping_sub(u64::from(s) * u64::from(self.cfg.hz)), true),
            _ => (now, false),
        }
    }

    #[inline]
    fn lookup_tagged(&self, k: &Key, tag: u32) -> Option<u32> {
        let nodes = &self.nodes;
        self.index.find(k, tag, |i| nodes[i as usize].key()).map(|pos| self.index.slots[pos].idx)
    }

    #[inline]
    fn lookup(&self, k: &Key) -> Option<u32> {
        if self.index.len == 0 {
            return None;
        }
        self.lookup_tagged(k, self.index.tag(k))
    }

    fn check(
        &mut self,
        now: Jiffies,
        addr: IpAddr,
        seconds: Option<u32>,
        hitcount: Option<u32>,
        reap: bool,
        update: bool,
    ) -> bool {
        assert!(
            !reap || seconds.is_some_and(|s| s != 0),
            "--reap requires --seconds (the kernel refuses the rule with EINVAL)"
        );
        let k = self.cfg.mask.apply(Key::from_addr(addr));
        let Some(e) = self.lookup(&k) else {
            return false;
        };
        let (time, windowed) = self.window_start(now, seconds);
        let matched = self.nodes[e as usize].matches(time, windowed, hitcount.unwrap_or(0));
        if reap {
            self.reap(time, e, update && matched);
        }
        if update && matched {
            self.stamp(e, now);
        }
        matched
    }

    /// `recent_entry_reap`: delete the LRU head if its last stamp is before `time`, unless it
    /// is the entry being matched and `--update` is about to stamp it.
    fn reap(&mut self, time: Jiffies, working: u32, updating: bool) {
        let h = self.head;
        if h == working && updating {
            return;
        }
        if time_after(time, self.nodes[h as usize].last()) {
            self.remove_node(h);
        }
    }

    /// The G1 fast path: `--rcheck --seconds s` (no reap) → true (drop); else `--set` →
    /// false (accept). Equivalent to the two rules, with one lookup when the entry exists.
    fn rcheck_or_set(&mut self, now: Jiffies, addr: IpAddr, seconds: u32) -> bool {
        let k = self.cfg.mask.apply(Key::from_addr(addr));
        let tag = self.index.tag(&k);
        match self.lookup_tagged(&k, tag) {
            Some(e) => {
                let (time, windowed) = self.window_start(now, Some(seconds));
                if self.nodes[e as usize].matches(time, windowed, 0) {
                    return true;
                }
                self.stamp(e, now);
                false
            }
            None => {
                self.insert_new(now, k, tag);
                false
            }
        }
    }

    fn set_key(&mut self, now: Jiffies, k: Key) {
        let tag = self.index.tag(&k);
        match self.lookup_tagged(&k, tag) {
            Some(e) => self.stamp(e, now),
            None => self.insert_new(now, k, tag),
        }
    }

    fn remove_key(&mut self, k: &Key) -> bool {
        match self.lookup(k) {
            Some(e) => {
                self.remove_node(e);
                true
            }
            None => false,
        }
    }

    /// `recent_entry_update`: push a stamp, move to the LRU tail.
    #[inline]
    fn stamp(&mut self, e: u32, now: Jiffies) {
        self.nodes[e as usize].push_stamp(now, self.ring_mask);
        if self.tail != e {
            self.unlink(e);
            self.link_tail(e);
        }
    }

    /// `recent_entry_init`: evict the LRU head of a full table, then add `{[now]}` at the tail.
    fn insert_new(&mut self, now: Jiffies, k: Key, tag: u32) {
        if self.index.len >= self.cfg.ip_list_tot as usize {
            self.remove_node(self.head);
        }
        let i = match self.free.pop() {
            Some(i) => {
                let n = &mut self.nodes[i as usize];
                n.hi = k.hi;
                n.lo = k.lo;
                n.v6 = k.v6;
                n.first = now;
                n.last = now;
                n.more.clear();
                n.index = 1;
                i
            }
            None => {
                let i = self.nodes.len() as u32;
                self.nodes.push(XtNode {
                    hi: k.hi,
                    lo: k.lo,
                    first: now,
                    last: now,
                    more: Vec::new(),
                    prev: NIL,
                    next: NIL,
                    index: 1,
                    v6: k.v6,
                });
                i
            }
        };
        self.link_tail(i);
        self.index.insert(tag, i);
    }

    fn remove_node(&mut self, e: u32) {
        let k = self.nodes[e as usize].key();
        let pos = self.index.find_idx(self.index.tag(&k), e);
        self.index.remove_at(pos);
        self.unlink(e);
        // The node keeps its ring allocation for reuse by the next insert.
        self.free.push(e);
    }

    #[inline]
    fn unlink(&mut self, e: u32) {
        let (prev, next) = {
            let n = &self.nodes[e as usize];
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
    }

    #[inline]
    fn link_tail(&mut self, e: u32) {
        let tail = self.tail;
        {
            let n = &mut self.nodes[e as usize];
            n.prev = tail;
            n.next = NIL;
        }
        if tail == NIL {
            self.head = e;
        } else {
            self.nodes[tail as usize].next = e;
        }
        self.tail = e;
    }
}

/// Errors of the `/proc/net/xt_recent/NAME` write protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProcError {
    /// `EINVAL`: not `+addr`, `-addr` or `/`, or an address the kernel's parser refuses
    /// (trailing space, `+ addr`, bad octet, …). Fix the line; nothing was changed.
    #[error("EINVAL: need \"+addr\", \"-addr\" or \"/\" with a literal address")]
    InvalidArgument,
}

impl ProcError {
    /// The errno the kernel returns.
    pub fn errno(self) -> i32 {
        match self {
            ProcError::InvalidArgument => 22,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// nft sets
// ---------------------------------------------------------------------------------------------

/// How an nft set with `flags timeout` is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NftSetConfig {
    /// Kernel HZ.
    pub hz: u32,
    /// `size`: most elements, counting expired ones not yet collected. `None`: no limit (a
    /// non-dynamic set declared without `size`; a dynamic one gets
    /// [`NFT_DEFAULT_DYNSET_SIZE`]).
    pub size: Option<u32>,
    /// The set's default `timeout`; `None`: elements without their own timeout are permanent.
    pub timeout: Option<Duration>,
    /// `gc-interval`: garbage collection runs at every multiple of it (from jiffy 0).
    pub gc_interval: Duration,
    /// Mask IPv6 keys to this prefix (an interval set holding /64s, or
    /// `ip6 saddr & ffff:ffff:ffff:ffff::`). `None`: full addresses.
    pub ipv6_prefix: Option<u8>,
}

impl Default for NftSetConfig {
    fn default() -> Self {
        NftSetConfig {
            hz: DEFAULT_HZ,
            size: Some(NFT_DEFAULT_DYNSET_SIZE),
            timeout: None,
            gc_interval: NFT_DEFAULT_GC_INTERVAL,
            ipv6_prefix: None,
        }
    }
}

impl NftSetConfig {
    /// Checks the limits the model relies on.
    pub fn validate(&self) -> Result<(), GateConfigError> {
        if self.hz == 0 {
            return Err(GateConfigError::Hz);
        }
        if let Some(s) = self.size
            && (s == 0 || s > MAX_TABLE_ENTRIES)
        {
            return Err(GateConfigError::TableSize(s));
        }
        if nft_duration_to_jiffies(self.gc_interval, self.hz) == 0 {
            return Err(GateConfigError::GcInterval);
        }
        if self.ipv6_prefix.is_some_and(|p| p > 128) {
            return Err(GateConfigError::Ipv6Prefix(self.ipv6_prefix.unwrap_or(0)));
        }
        Ok(())
    }
}

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
#[derive(Debug, Clone)]
struct NftNode {
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

impl NftNode {
    #[inline]
    fn key(&self) -> Key {
        Key { hi: self.hi, lo: self.lo, v6: self.v6 }
    }

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
/// to one, so use one set per family as KERNEL.md §2 does.
#[derive(Debug, Clone)]
pub struct NftSet {
    cfg: NftSetConfig,
    default_timeout: Jiffies,
    gc_interval: Jiffies,
    next_gc: Jiffies,
    v6_mask: u128,
    nodes: Vec<NftNode>,
    free: Vec<u32>,
    index: Index,
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
            nodes: Vec::new(),
            free: Vec::new(),
            index: Index::new(),
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
        self.nodes.iter().filter(move |n| n.present(now)).map(move |n| {
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
        self.nodes.capacity() * size_of::<NftNode>()
            + self.free.capacity() * 4
            + self.index.memory_bytes()
            + self.expiry_fifo.capacity() * size_of::<(Jiffies, u32)>()
            + self.expiry_heap.capacity() * size_of::<Reverse<(Jiffies, u32)>>()
    }

    /// `ip saddr @set`: is there an unexpired element for `addr` (masked)?
    pub fn contains(&self, now: Jiffies, addr: IpAddr) -> bool {
        let k = self.mask(addr);
        self.lookup(&k).is_some_and(|i| self.nodes[i as usize].present(now))
    }

    /// Packet-path `add @set { ip saddr }`: true if an element is present afterwards.
    ///
    /// A present element is left alone (its timeout is **not** refreshed). An absent one is
    /// inserted with the set's timeout if `nelems < size`; otherwise the expression is false
    /// and the rule does not match.
    pub fn add(&mut self, now: Jiffies, addr: IpAddr) -> bool {
        let k = self.mask(addr);
        let tag = self.index.tag(&k);
        let found = self.lookup_tagged(&k, tag);
        if let Some(i) = found
            && self.nodes[i as usize].present(now)
        {
            return true;
        }
        self.insert_packet(now, k, tag, found)
    }

    /// Packet-path `update @set { ip saddr }`: like [`add`](Self::add), but a present element
    /// with a timeout gets `expiration = now + set timeout` (a sliding window).
    pub fn update(&mut self, now: Jiffies, addr: IpAddr) -> bool {
        let k = self.mask(addr);
        let tag = self.index.tag(&k);
        let found = self.lookup_tagged(&k, tag);
        if let Some(i) = found {
            let n = &mut self.nodes[i as usize];
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
        let tag = self.index.tag(&k);
        let found = self.lookup_tagged(&k, tag);
        if let Some(i) = found {
            let n = &mut self.nodes[i as usize];
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
        let Some(i) = self.lookup(&k) else {
            return Err(NftError::NotFound);
        };
        let n = &mut self.nodes[i as usize];
        if !n.present(now) {
            return Err(NftError::NotFound);
        }
        n.live = false;
        self.nelems -= 1;
        if !n.in_use() {
            self.free_node(i);
        }
        Ok(())
    }

    /// `nft flush set`: remove every element.
    pub fn flush(&mut self) {
        self.nodes.clear();
        self.free.clear();
        self.index.clear();
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

    #[inline]
    fn lookup_tagged(&self, k: &Key, tag: u32) -> Option<u32> {
        let nodes = &self.nodes;
        self.index.find(k, tag, |i| nodes[i as usize].key()).map(|pos| self.index.slots[pos].idx)
    }

    #[inline]
    fn lookup(&self, k: &Key) -> Option<u32> {
        if self.index.len == 0 {
            return None;
        }
        self.lookup_tagged(k, self.index.tag(k))
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
                let n = &mut self.nodes[i as usize];
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
                let i = match self.free.pop() {
                    Some(i) => {
                        self.nodes[i as usize] = node;
                        i
                    }
                    None => {
                        self.nodes.push(node);
                        (self.nodes.len() - 1) as u32
                    }
                };
                self.index.insert(tag, i);
                i
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
        let n = &mut self.nodes[i as usize];
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
            self.free_node(i);
        }
    }

    fn free_node(&mut self, i: u32) {
        let k = self.nodes[i as usize].key();
        let pos = self.index.find_idx(self.index.tag(&k), i);
        self.index.remove_at(pos);
        self.free.push(i);
    }
}

// ---------------------------------------------------------------------------------------------
// The KERNEL.md §2 rulesets
// ---------------------------------------------------------------------------------------------

/// What the firewall does with one SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateDecision {
    /// Let it through: the connection reaches the server.
    Accept,
    /// Dropped by the connection-rate rule (G1). With nft this includes the final `drop` of a
    /// SYN whose `add` failed because the rate set was full.
    DropRate,
    /// Dropped because the source is banned (G2).
    DropBanned,
}

impl GateDecision {
    /// A stable lower-case name for logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            GateDecision::Accept => "accept",
            GateDecision::DropRate => "drop_rate",
            GateDecision::DropBanned => "drop_banned",
        }
    }
}

impl fmt::Display for GateDecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The iptables ruleset of KERNEL.md §2, for one address family:
///
/// ```text
/// -m recent --name SMTPBAN  --rcheck --seconds BAN --reap -j DROP
/// --syn -m recent --name SMTPRATE --rcheck --seconds WINDOW -j DROP
/// --syn -m recent --name SMTPRATE --set -j ACCEPT
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XtRuleset {
    /// `--seconds` of the ban rule.
    pub ban_secs: u32,
    /// `--seconds` of the rate rule.
    pub window_secs: u32,
}

impl XtRuleset {
    /// Evaluates the three rules for one SYN from `addr` at `now`.
    pub fn eval_syn(&self, ban: &mut XtRecent, rate: &mut XtRecent, now: Jiffies, addr: IpAddr) -> GateDecision {
        if !ban.is_empty() && ban.rcheck(now, addr, Some(self.ban_secs), None, true) {
            return GateDecision::DropBanned;
        }
        if rate.rcheck_or_set(now, addr, self.window_secs) { GateDecision::DropRate } else { GateDecision::Accept }
    }
}

/// The nftables ruleset of KERNEL.md §2, for one address family:
///
/// ```text
/// ip saddr @ban drop
/// tcp flags syn / syn,ack ip saddr @rate drop
/// tcp flags syn / syn,ack add @rate { ip saddr } accept
/// tcp flags syn / syn,ack drop      # reached only if add failed (set full)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NftRuleset;

impl NftRuleset {
    /// Evaluates the four rules for one SYN from `addr` at `now` (the sets mask the key).
    pub fn eval_syn(&self, ban: &NftSet, rate: &mut NftSet, now: Jiffies, addr: IpAddr) -> GateDecision {
        if !ban.is_empty() && ban.contains(now, addr) {
            return GateDecision::DropBanned;
        }
        let k = rate.mask(addr);
        let tag = rate.index.tag(&k);
        let found = rate.lookup_tagged(&k, tag);
        if let Some(i) = found
            && rate.nodes[i as usize].present(now)
        {
            return GateDecision::DropRate;
        }
        if rate.insert_packet(now, k, tag, found) { GateDecision::Accept } else { GateDecision::DropRate }
    }
}

// ---------------------------------------------------------------------------------------------
// Gate
// ---------------------------------------------------------------------------------------------

/// Which kernel mechanism the gate models, with its kernel-side parameters.
///
/// In TOML: `kind = { backend = "xt_recent", ip_list_tot = 100, hz = 250 }` or
/// `kind = { backend = "nft", size = 65535, hz = 250 }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum GateKind {
    /// xt_recent tables (`ip_list_tot` entries each, LRU eviction when full).
    XtRecent {
        /// `xt_recent.ip_list_tot` (a boot-time kernel parameter).
        #[serde(default = "default_ip_list_tot")]
        ip_list_tot: u32,
        /// Kernel HZ.
        #[serde(default = "default_hz")]
        hz: u32,
    },
    /// nft sets (the rate set refuses new elements when full: fail closed).
    Nft {
        /// `size` of the rate sets.
        #[serde(default = "default_nft_size")]
        size: u32,
        /// Kernel HZ.
        #[serde(default = "default_hz")]
        hz: u32,
    },
}

fn default_ip_list_tot() -> u32 {
    DEFAULT_IP_LIST_TOT
}

fn default_hz() -> u32 {
    DEFAULT_HZ
}

fn default_nft_size() -> u32 {
    NFT_DEFAULT_DYNSET_SIZE
}

impl Default for GateKind {
    fn default() -> Self {
        GateKind::XtRecent { ip_list_tot: DEFAULT_IP_LIST_TOT, hz: DEFAULT_HZ }
    }
}

impl GateKind {
    /// Kernel HZ of either kind.
    pub fn hz(&self) -> u32 {
        match *self {
            GateKind::XtRecent { hz, .. } | GateKind::Nft { hz, .. } => hz,
        }
    }
}

/// Configuration of the connection gate (rules G1 and G2): the `[gate]` table.
///
/// Durations are written the human way, like the rest of the configuration; missing fields
/// take the defaults; unknown fields are errors. Example (TOML):
///
/// ```toml
/// [gate]
/// window = "60s"        # G1
/// ban_time = "4d"       # G2
/// ipv6_prefix = 64
/// [gate.kind]
/// backend = "xt_recent" # or "nft" (then `size = 65535` instead of `ip_list_tot`)
/// ip_list_tot = 100
/// hz = 250
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct GateConfig {
    /// The kernel mechanism and its parameters.
    pub kind: GateKind,
    /// G1: at most one new connection per source per window, counted from the last accepted
    /// one (non-sliding). xt_recent needs whole seconds (`--seconds`).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// G2: how long a ban drops a source. xt_recent needs whole seconds.
    #[serde(with = "humantime_serde")]
    pub ban_time: Duration,
    /// IPv6 sources are keyed (rate-limited and banned) by this prefix length.
    pub ipv6_prefix: u8,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            kind: GateKind::default(),
            window: Duration::from_secs(60),
            ban_time: Duration::from_secs(4 * 24 * 3600),
            ipv6_prefix: 64,
        }
    }
}

impl GateConfig {
    /// Every problem with the configuration, each as `field: what is wrong` (empty if none).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let hz = self.kind.hz();
        if hz == 0 || hz > 100_000 {
            out.push(format!("kind.hz: {hz} is not between 1 and 100000"));
        }
        let (xt, size_name, size) = match self.kind {
            GateKind::XtRecent { ip_list_tot, .. } => (true, "kind.ip_list_tot", ip_list_tot),
            GateKind::Nft { size, .. } => (false, "kind.size", size),
        };
        if size == 0 || size > MAX_TABLE_ENTRIES {
            out.push(format!("{size_name}: {size} is not between 1 and {MAX_TABLE_ENTRIES}"));
        }
        for (name, d) in [("window", self.window), ("ban_time", self.ban_time)] {
            if d.as_secs() > u64::from(u32::MAX) {
                out.push(format!("{name}: longer than {} s", u32::MAX));
            } else if xt && (d.subsec_nanos() != 0 || d.as_secs() == 0) {
                out.push(format!("{name}: xt_recent needs whole seconds, at least 1s (--seconds)"));
            } else if d.as_millis() == 0 {
                out.push(format!("{name}: must be at least 1ms"));
            }
        }
        if self.ipv6_prefix > 128 {
            out.push(format!("ipv6_prefix: /{} is longer than 128", self.ipv6_prefix));
        }
        out
    }

    /// Checks that the configuration can be expressed in the kernel model.
    pub fn validate(&self) -> Result<(), GateConfigError> {
        let problems = self.problems();
        if problems.is_empty() { Ok(()) } else { Err(GateConfigError::Gate(problems.join("; "))) }
    }
}

/// A configuration the model cannot express.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateConfigError {
    /// HZ must be at least 1.
    #[error("hz must be at least 1")]
    Hz,
    /// `ip_list_tot` / `size` must be between 1 and 2^30.
    #[error("table size {0} out of range 1..=2^30")]
    TableSize(u32),
    /// The ring size must be a power of two up to 65536.
    #[error("ring size {0} is not a power of two up to 65536")]
    RingSize(u32),
    /// `--hitcount` above 65535 is refused by the kernel.
    #[error("hitcount {0} exceeds 65535")]
    Hitcount(u32),
    /// The gc interval must be at least one jiffy.
    #[error("gc interval must be at least one jiffy")]
    GcInterval,
    /// An IPv6 prefix longer than 128 bits.
    #[error("ipv6 prefix /{0} is longer than 128")]
    Ipv6Prefix(u8),
    /// A [`GateConfig`] problem list (see [`GateConfig::problems`]).
    #[error("{0}")]
    Gate(String),
}

/// The tables behind a [`Gate`], one per address family as in KERNEL.md §2 (iptables and
/// ip6tables use separate table names; nft sets are typed per family).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant, reason = "one per gate, never moved on a hot path")]
pub enum GateBackend {
    /// xt_recent: ban tables checked with `--rcheck --seconds BAN --reap`, rate tables with
    /// `--rcheck --seconds WINDOW` then `--set`. The IPv6 tables carry the prefix mask.
    XtRecent {
        /// IPv4 ban table (`SMTPBAN`).
        ban4: XtRecent,
        /// IPv6 ban table (`SMTPBAN6`).
        ban6: XtRecent,
        /// IPv4 rate table (`SMTPRATE`).
        rate4: XtRecent,
        /// IPv6 rate table (`SMTPRATE6`).
        rate6: XtRecent,
        /// The rules' `--seconds`.
        rules: XtRuleset,
    },
    /// nft: ban sets without size (elements carry their own timeout), rate sets with
    /// `timeout WINDOW; size N`.
    Nft {
        /// `ban4`.
        ban4: NftSet,
        /// `ban6` (interval set of prefixes).
        ban6: NftSet,
        /// `rate4`.
        rate4: NftSet,
        /// `rate6` (keyed by the masked prefix).
        rate6: NftSet,
    },
}

/// The in-process connection gate: G2 (ban) then G1 (rate), exactly as the kernel would apply
/// them, on the xt_recent or nft model.
///
/// Time enters as [`Instant`]s, converted to jiffies since `origin` (rounded down, and never
/// earlier than the latest jiffy already seen, as kernel time never goes backwards); the gate
/// never reads a clock. IPv4-mapped IPv6 sources are treated as IPv4 (the kernel sees IPv4
/// packets); IPv6 sources are keyed by their `ipv6_prefix`.
#[derive(Debug, Clone)]
pub struct Gate {
    cfg: GateConfig,
    origin: Instant,
    hz: u32,
    /// The latest jiffy seen, for operations without a `now` ([`Gate::unban`]).
    last_jiffies: Jiffies,
    v6_mask: u128,
    backend: GateBackend,
}

impl Gate {
    /// Creates a gate whose jiffy 0 is `origin`.
    ///
    /// # Panics
    /// If `cfg` fails [`GateConfig::validate`]; use [`Gate::try_new`] for untrusted input.
    pub fn new(cfg: GateConfig, origin: Instant) -> Self {
        match Gate::try_new(cfg, origin) {
            Ok(g) => g,
            Err(e) => panic!("invalid gate config: {e}"),
        }
    }

    /// Creates a gate whose jiffy 0 is `origin`, checking the configuration first.
    pub fn try_new(cfg: GateConfig, origin: Instant) -> Result<Self, GateConfigError> {
        cfg.validate()?;
        let hz = cfg.kind.hz();
        let backend = match cfg.kind {
            GateKind::XtRecent { ip_list_tot, hz } => {
                let v4 = XtRecentConfig { ip_list_tot, hz, ring_size: DEFAULT_RING_SIZE, mask: XtMask::ALL };
                let v6 = XtRecentConfig { mask: XtMask::ipv6_prefix(cfg.ipv6_prefix), ..v4 };
                GateBackend::XtRecent {
                    ban4: XtRecent::new(v4),
                    ban6: XtRecent::new(v6),
                    rate4: XtRecent::new(v4),
                    rate6: XtRecent::new(v6),
                    rules: XtRuleset {
                        ban_secs: cfg.ban_time.as_secs() as u32,
                        window_secs: cfg.window.as_secs() as u32,
                    },
                }
            }
            GateKind::Nft { size, hz } => {
                let ban = NftSetConfig {
                    hz,
                    size: None,
                    timeout: None,
                    gc_interval: NFT_DEFAULT_GC_INTERVAL,
                    ipv6_prefix: None,
                };
                let rate = NftSetConfig { size: Some(size), timeout: Some(cfg.window), ..ban };
                let v6 = Some(cfg.ipv6_prefix);
                GateBackend::Nft {
                    ban4: NftSet::new(ban),
                    ban6: NftSet::new(NftSetConfig { ipv6_prefix: v6, ..ban }),
                    rate4: NftSet::new(rate),
                    rate6: NftSet::new(NftSetConfig { ipv6_prefix: v6, ..rate }),
                }
            }
        };
        Ok(Gate { v6_mask: prefix_mask128(cfg.ipv6_prefix), cfg, origin, hz, last_jiffies: 0, backend })
    }

    /// The configuration.
    pub fn config(&self) -> &GateConfig {
        &self.cfg
    }

    /// The instant of jiffy 0.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// The tables, for inspection (`/proc` text, listings, occupancy).
    pub fn backend(&self) -> &GateBackend {
        &self.backend
    }

    /// `now` in jiffies since the origin, rounded down (0 before the origin).
    pub fn jiffies(&self, now: Instant) -> Jiffies {
        let d = now.saturating_duration_since(self.origin);
        let hz = u64::from(self.hz);
        d.as_secs().saturating_mul(hz).saturating_add(u64::from(d.subsec_nanos()) * hz / 1_000_000_000)
    }

    /// One new connection attempt (a SYN) from `addr`: G2 then G1, non-sliding.
    pub fn check(&mut self, now: Instant, addr: IpAddr) -> GateDecision {
        let j = self.tick(now);
        let addr = addr.to_canonical();
        match &mut self.backend {
            GateBackend::XtRecent { ban4, ban6, rate4, rate6, rules } => {
                if addr.is_ipv4() {
                    rules.eval_syn(ban4, rate4, j, addr)
                } else {
                    rules.eval_syn(ban6, rate6, j, addr)
                }
            }
            GateBackend::Nft { ban4, ban6, rate4, rate6 } => {
                for s in [&mut *ban4, &mut *ban6, &mut *rate4, &mut *rate6] {
                    s.maybe_gc(j);
                }
                if addr.is_ipv4() {
                    NftRuleset.eval_syn(ban4, rate4, j, addr)
                } else {
                    NftRuleset.eval_syn(ban6, rate6, j, addr)
                }
            }
        }
    }

    /// Push a ban, as the kernel backends would. Returns whether the ban is in the table.
    ///
    /// - xt_recent: write `+addr` (pre-masked) to the ban table: a new entry (which may evict
    ///   the least recently stamped entry of a full table, possibly another ban) or a fresh
    ///   stamp. The ban lasts the configured `ban_time` from now, whatever `for_` says:
    ///   `--seconds` is per rule, not per entry (the ban manager enforces shorter bans by
    ///   unbanning).
    /// - nft: `add element … { addr timeout for_ expires for_ }`: a new element, or an existing
    ///   one whose expiry (and timeout) restart.
    ///
    /// A ban shorter than 1 ms bans nothing (and returns false) with either kind.
    pub fn ban(&mut self, now: Instant, addr: IpAddr, for_: Duration) -> bool {
        let j = self.tick(now);
        let addr = self.ban_key(addr);
        if for_.as_millis() == 0 {
            return false;
        }
        match &mut self.backend {
            GateBackend::XtRecent { ban4, ban6, .. } => {
                let t = if addr.is_ipv4() { ban4 } else { ban6 };
                t.proc_add(j, addr);
                true
            }
            GateBackend::Nft { ban4, ban6, rate4, rate6 } => {
                for s in [&mut *ban4, &mut *ban6, &mut *rate4, &mut *rate6] {
                    s.maybe_gc(j);
                }
                let t = if addr.is_ipv4() { ban4 } else { ban6 };
                let opts = ElementOpts { timeout: Some(for_), expires: Some(for_), create: false };
                t.add_element(j, addr, opts).is_ok()
            }
        }
    }

    /// Lift a ban (`-addr` / `delete element`). Returns whether there was one. nft judges
    /// expiry at the latest time the gate has seen.
    pub fn unban(&mut self, addr: IpAddr) -> bool {
        let addr = self.ban_key(addr);
        let j = self.last_jiffies;
        match &mut self.backend {
            GateBackend::XtRecent { ban4, ban6, .. } => {
                if addr.is_ipv4() {
                    ban4.proc_remove(addr)
                } else {
                    ban6.proc_remove(addr)
                }
            }
            GateBackend::Nft { ban4, ban6, .. } => {
                let t = if addr.is_ipv4() { ban4 } else { ban6 };
                t.delete_element(j, addr).is_ok()
            }
        }
    }

    /// Would a SYN from `addr` at `now` be dropped as banned? (No side effects.)
    pub fn is_banned(&self, now: Instant, addr: IpAddr) -> bool {
        let j = self.jiffies(now).max(self.last_jiffies);
        let addr = self.ban_key(addr);
        match &self.backend {
            GateBackend::XtRecent { ban4, ban6, rules, .. } => {
                let t = if addr.is_ipv4() { ban4 } else { ban6 };
                t.peek(j, addr, Some(rules.ban_secs), None)
            }
            GateBackend::Nft { ban4, ban6, .. } => {
                let t = if addr.is_ipv4() { ban4 } else { ban6 };
                t.contains(j, addr)
            }
        }
    }

    /// Occupancy of the ban tables (both families): xt_recent entries, including stale ones
    /// that still hold a slot; nft `nelems`, including expired elements not yet collected.
    pub fn banned_len(&self) -> usize {
        match &self.backend {
            GateBackend::XtRecent { ban4, ban6, .. } => ban4.len() + ban6.len(),
            GateBackend::Nft { ban4, ban6, .. } => ban4.len() + ban6.len(),
        }
    }

    /// Occupancy of the rate tables (both families), counted like [`Gate::banned_len`].
    pub fn rate_len(&self) -> usize {
        match &self.backend {
            GateBackend::XtRecent { rate4, rate6, .. } => rate4.len() + rate6.len(),
            GateBackend::Nft { rate4, rate6, .. } => rate4.len() + rate6.len(),
        }
    }

    /// Estimated heap bytes held by all tables.
    pub fn memory_bytes(&self) -> usize {
        match &self.backend {
            GateBackend::XtRecent { ban4, ban6, rate4, rate6, .. } => {
                ban4.memory_bytes() + ban6.memory_bytes() + rate4.memory_bytes() + rate6.memory_bytes()
            }
            GateBackend::Nft { ban4, ban6, rate4, rate6 } => {
                ban4.memory_bytes() + ban6.memory_bytes() + rate4.memory_bytes() + rate6.memory_bytes()
            }
        }
    }

    /// Jiffies for an operation, never earlier than any before: kernel jiffies do not go
    /// backwards, and callers that read a clock before taking a lock may hand in slightly
    /// out-of-order instants.
    #[inline]
    fn tick(&mut self, now: Instant) -> Jiffies {
        let j = self.jiffies(now).max(self.last_jiffies);
        self.last_jiffies = j;
        j
    }

    /// The key a ban is written under: canonical family, IPv6 masked to the prefix (the
    /// `/proc` protocol is not masked, so the writer pre-masks).
    fn ban_key(&self, addr: IpAddr) -> IpAddr {
        match addr.to_canonical() {
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & self.v6_mask)),
            v4 => v4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HZ: u64 = 250;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Milliseconds to jiffies at HZ=250 (exact for multiples of 4 ms).
    fn ms(ms: u64) -> Jiffies {
        ms * HZ / 1000
    }

    fn xt(cap: u32) -> XtRecent {
        XtRecent::new(XtRecentConfig { ip_list_tot: cap, ..XtRecentConfig::default() })
    }

    fn xt_with(cap: u32, ring: u32, mask: XtMask) -> XtRecent {
        XtRecent::new(XtRecentConfig { ip_list_tot: cap, hz: 250, ring_size: ring, mask })
    }

    fn nft(size: Option<u32>, timeout: Option<Duration>) -> NftSet {
        NftSet::new(NftSetConfig { size, timeout, ..NftSetConfig::default() })
    }

    fn addrs(t: &XtRecent) -> Vec<IpAddr> {
        t.iter().map(|e| e.addr()).collect()
    }

    // --- [T] A1/A2: non-sliding --rcheck vs sliding --update ------------------------------

    #[test]
    fn rcheck_is_non_sliding_update_slides_w3() {
        let a = ip("192.0.2.1");
        // (sliding, [(ms, accepted)]): KERNEL.md §2, W=3 s.
        let cases: [(bool, &[(u64, bool)]); 2] = [
            (false, &[(0, true), (1000, false), (2000, false), (3200, true)]),
            (true, &[(0, true), (1000, false), (2000, false), (3200, false), (6400, true)]),
        ];
        for (sliding, steps) in cases {
            let mut t = xt(100);
            for &(at, accepted) in steps {
                let now = ms(at);
                let dropped = if sliding {
                    t.update(now, a, Some(3), None, false)
                } else {
                    t.rcheck(now, a, Some(3), None, false)
                };
                if !dropped {
                    assert!(t.set(now, a));
                }
                assert_eq!(!dropped, accepted, "sliding={sliding} at {at} ms");
            }
        }
    }

    #[test]
    fn nft_add_is_non_sliding_update_slides_w3() {
        let a = ip("192.0.2.1");
        let cases: [(bool, &[(u64, bool)]); 2] = [
            (false, &[(0, true), (1000, false), (2000, false), (3200, true)]),
            (true, &[(0, true), (1000, false), (2000, false), (3200, false), (6400, true)]),
        ];
        for (sliding, steps) in cases {
            let mut s = nft(Some(10), Some(Duration::from_secs(3)));
            let ban = nft(None, None);
            for &(at, accepted) in steps {
                let now = ms(at);
                s.maybe_gc(now);
                let got = if sliding {
                    // `ip saddr @rate update @rate { ip saddr } drop`, then `add … accept`.
                    if s.contains(now, a) {
                        s.update(now, a);
                        GateDecision::DropRate
                    } else {
                        assert!(s.add(now, a));
                        GateDecision::Accept
                    }
                } else {
                    NftRuleset.eval_syn(&ban, &mut s, now, a)
                };
                assert_eq!(got == GateDecision::Accept, accepted, "sliding={sliding} at {at} ms");
            }
        }
    }

    // --- [T] boundaries ---------------------------------------------------------------------

    #[test]
    fn xt_window_boundary_hz250_w1s() {
        let a = ip("198.51.100.7");
        for s in [0, 1, 4_999, 123_456_789] {
            let mut t = xt(100);
            t.set(s, a);
            // (offset, matches): S+250 still in the window (dropped), S+251 allowed.
            for (off, matched) in [(0, true), (249, true), (250, true), (251, false), (1000, false)] {
                assert_eq!(t.rcheck(s + off, a, Some(1), None, false), matched, "S={s} +{off}");
            }
        }
    }

    #[test]
    fn nft_window_boundary_w750() {
        let a = ip("198.51.100.7");
        for s in [0, 1, 4_999, 123_456_789] {
            let mut set = nft(Some(10), Some(Duration::from_secs(3))); // 750 jiffies
            assert_eq!(set.default_timeout_jiffies(), 750);
            assert!(set.add(s, a));
            for (off, present) in [(0, true), (749, true), (750, false), (751, false)] {
                assert_eq!(set.contains(s + off, a), present, "S={s} +{off}");
            }
            let ban = nft(None, None);
            assert_eq!(NftRuleset.eval_syn(&ban, &mut set, s + 749, a), GateDecision::DropRate);
            assert_eq!(NftRuleset.eval_syn(&ban, &mut set, s + 750, a), GateDecision::Accept);
        }
    }

    #[test]
    fn nft_ms_to_jiffies_rounds_down_min_1() {
        for (d, hz, j) in [
            (Duration::ZERO, 250, 0),
            (Duration::from_millis(1), 250, 1),
            (Duration::from_millis(5), 250, 1),
            (Duration::from_millis(8), 250, 2),
            (Duration::from_millis(3999), 250, 999),
            (Duration::from_micros(999), 250, 0),
            (Duration::from_millis(1), 1000, 1),
            (Duration::from_millis(1500), 100, 150),
            (Duration::from_secs(60), 250, 15_000),
        ] {
            assert_eq!(nft_duration_to_jiffies(d, hz), j, "{d:?} at HZ {hz}");
        }
    }

    // --- [T] D2: overflow evicts the least recently stamped entry -----------------------------

    #[test]
    fn overflow_101st_ban_evicts_hammering_client_d2() {
        let ban_secs = Some(345_600);
        let mut ban = xt(100);
        let victim = ip("10.0.0.1");
        ban.proc_write(0, "+10.0.0.1\n").unwrap();
        for i in 2..=100 {
            ban.proc_write(i, &format!("+10.0.0.{i}\n")).unwrap();
        }
        assert_eq!(ban.len(), 100);
        // The banned client hammers: every SYN is dropped, none refreshes its LRU position.
        for now in 200..400 {
            assert!(ban.rcheck(now, victim, ban_secs, None, true));
        }
        assert_eq!(addrs(&ban)[0], victim);
        ban.proc_write(500, "+10.0.1.1\n").unwrap();
        assert_eq!(ban.len(), 100);
        assert!(ban.get(victim).is_none());
        assert!(!ban.rcheck(501, victim, ban_secs, None, true), "evicted, then connected");
    }

    #[test]
    fn eviction_victim_is_least_recently_stamped_not_inserted() {
        let mut t = xt(3);
        for (now, a) in [(1, "192.0.2.1"), (2, "192.0.2.2"), (3, "192.0.2.3")] {
            t.proc_write(now, &format!("+{a}")).unwrap();
        }
        t.proc_write(4, "+192.0.2.1").unwrap(); // re-stamp: moves to the tail
        assert!(t.rcheck(5, ip("192.0.2.2"), None, None, false)); // rcheck: no move
        t.proc_write(6, "+192.0.2.4").unwrap();
        assert_eq!(addrs(&t), [ip("192.0.2.3"), ip("192.0.2.1"), ip("192.0.2.4")]);
    }

    #[test]
    fn ipv4_and_ipv6_share_capacity() {
        let mut t = xt(2);
        t.set(1, ip("192.0.2.1"));
        t.set(2, ip("2001:db8::1"));
        t.set(3, ip("192.0.2.3"));
        assert_eq!(addrs(&t), [ip("2001:db8::1"), ip("192.0.2.3")]);
        assert_eq!(t.len(), t.capacity());
    }

    // --- --reap -------------------------------------------------------------------------------

    #[test]
    fn reap_rules() {
        let (a, b, c, d) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"), ip("192.0.2.4"));
        let w = Some(1); // 250 jiffies
        let fresh = || {
            let mut t = xt(100);
            t.set(0, a);
            t.set(10, b);
            t.set(20, c);
            t
        };
        // A source without an entry reaps nothing, even with stale entries at the head.
        let mut t = fresh();
        assert!(!t.rcheck(1000, d, w, None, true));
        assert_eq!(t.len(), 3);
        // A source with an entry reaps the head only: one deletion per packet.
        assert!(!t.rcheck(1000, c, w, None, true));
        assert_eq!(addrs(&t), [b, c]);
        assert!(!t.rcheck(1000, c, w, None, true));
        assert_eq!(addrs(&t), [c]);
        // The head is the matched entry itself: deleted too (rcheck never re-stamps).
        assert!(!t.rcheck(1000, c, w, None, true));
        assert!(t.is_empty());

        // Boundary: now − last(h) > W. At last+250 the head stays, at last+251 it goes.
        let mut t = fresh();
        t.rcheck(250, c, w, None, true);
        assert_eq!(t.len(), 3);
        t.rcheck(251, c, w, None, true);
        assert_eq!(addrs(&t), [b, c]);

        // --update that matches stamps the head and keeps it (h == e, update re-stamps).
        let mut t = xt(100);
        t.set(0, a);
        t.set(10, b);
        assert!(t.update(200, a, w, None, true));
        assert_eq!(addrs(&t), [b, a]);
        // A packet from b at 300 reaps nothing (b's last stamp 10 is 290 old: > 250 → b goes).
        assert!(!t.update(300, b, w, None, true));
        assert_eq!(addrs(&t), [a]);
    }

    #[test]
    #[should_panic(expected = "--reap requires --seconds")]
    fn reap_without_seconds_is_refused() {
        let mut t = xt(1);
        t.set(0, ip("192.0.2.1"));
        t.rcheck(1, ip("192.0.2.1"), None, None, true);
    }

    // --- hitcount and ring --------------------------------------------------------------------

    #[test]
    fn hitcount_counts_stamps_in_window() {
        let a = ip("192.0.2.1");
        let mut t = xt(10);
        for now in [0, 10, 20] {
            t.set(now, a);
        }
        for (now, secs, hits, want) in [
            (100, Some(1), Some(3), true),
            (100, Some(1), Some(4), false),
            (255, Some(1), Some(3), false), // stamp 0 is 255 old
            (255, Some(1), Some(2), true),
            (261, Some(1), Some(2), false), // stamp 10 is 251 old too
            (10_000, None, Some(3), true),  // no --seconds: every stamp counts
            (10_000, Some(0), Some(3), true),
        ] {
            assert_eq!(t.rcheck(now, a, secs, hits, false), want, "{now} {secs:?} {hits:?}");
        }
    }

    #[test]
    fn ring_sizes_and_bigger_hitcount_flushes() {
        for (hit, pkt, r) in
            [(0, 0, 32), (3, 0, 4), (32, 0, 32), (33, 0, 64), (0, 20, 32), (5, 100, 128), (65_535, 0, 65_536)]
        {
            assert_eq!(XtRecentConfig::ring_size_for(hit, pkt), r, "hitcount {hit} pkt {pkt}");
        }
        let mut t = xt(10);
        t.set(0, ip("192.0.2.1"));
        assert_eq!(t.require_hitcount(32), Ok(false));
        assert_eq!(t.len(), 1);
        assert_eq!(t.require_hitcount(33), Ok(true));
        assert!(t.is_empty());
        assert_eq!(t.ring_size(), 64);
        assert_eq!(t.require_hitcount(65_536), Err(GateConfigError::Hitcount(65_536)));
    }

    #[test]
    fn ring_wraps_and_proc_read_shows_slots_and_write_index() {
        let a = ip("192.0.2.1");
        let mut t = xt_with(10, 4, XtMask::ALL);
        for now in 1..=6 {
            t.set(now, a);
        }
        assert_eq!(t.proc_read(), "src=192.0.2.1 ttl: 0 last_seen: 6 oldest_pkt: 2 5, 6, 3, 4\n");
        let e = t.get(a).unwrap();
        assert_eq!((e.nstamps(), e.last_seen(), e.oldest_pkt()), (4, 6, 2));
    }

    #[test]
    fn proc_read_format() {
        let mut t = xt(10);
        t.proc_write(100, "+1.2.3.4\n").unwrap();
        t.proc_write(200, "+1.2.3.4\n").unwrap();
        t.proc_write(300, "+2001:db8::1\n").unwrap();
        assert_eq!(
            t.proc_read(),
            "src=1.2.3.4 ttl: 0 last_seen: 200 oldest_pkt: 2 100, 200\n\
             src=2001:0db8:0000:0000:0000:0000:0000:0001 ttl: 0 last_seen: 300 oldest_pkt: 1 300\n"
        );
    }

    // --- /proc writes ---------------------------------------------------------------------------

    #[test]
    fn proc_write_cases() {
        const E: Result<(), ProcError> = Err(ProcError::InvalidArgument);
        const OK: Result<(), ProcError> = Ok(());
        let long_v4 = format!("+1.2.3.4\n{}:", "x".repeat(60)); // ':' beyond the 47-byte buffer
        // (write, result, entries afterwards); the table starts with 9.9.9.9.
        let cases: Vec<(&str, Result<(), ProcError>, Vec<&str>)> = vec![
            ("+1.2.3.4", OK, vec!["9.9.9.9", "1.2.3.4"]),
            ("+1.2.3.4\n", OK, vec!["9.9.9.9", "1.2.3.4"]),
            ("+001.02.3.4\n", OK, vec!["9.9.9.9", "1.2.3.4"]),
            ("+1.2.3.4\n5.6.7.8\n", OK, vec!["9.9.9.9", "1.2.3.4"]),
            ("+1.2.3.4\0junk", OK, vec!["9.9.9.9", "1.2.3.4"]),
            (long_v4.as_str(), OK, vec!["9.9.9.9", "1.2.3.4"]),
            ("+1.2.3.4\n::", E, vec!["9.9.9.9"]), // a ':' anywhere selects IPv6
            ("+1.2.3.4 ", E, vec!["9.9.9.9"]),
            ("+1.2.3.4 \n", E, vec!["9.9.9.9"]),
            ("+ 1.2.3.4", E, vec!["9.9.9.9"]),
            ("+1.2.3.256", E, vec!["9.9.9.9"]),
            ("+1.2.3", E, vec!["9.9.9.9"]),
            ("+1.2.3.4.5", E, vec!["9.9.9.9"]),
            ("+1..3.4", E, vec!["9.9.9.9"]),
            ("+a.b.c.d", E, vec!["9.9.9.9"]),
            ("+1.2.3.4:25", E, vec!["9.9.9.9"]),
            ("1.2.3.4", E, vec!["9.9.9.9"]),
            ("+", E, vec!["9.9.9.9"]),
            ("", OK, vec!["9.9.9.9"]),
            ("-9.9.9.9\n", OK, vec![]),
            ("-1.2.3.4\n", OK, vec!["9.9.9.9"]),
            ("/", OK, vec![]),
            ("/anything", OK, vec![]),
            ("+::1", OK, vec!["9.9.9.9", "::1"]),
            ("+::", OK, vec!["9.9.9.9", "::"]),
            ("+1::", OK, vec!["9.9.9.9", "1::"]),
            ("+2001:db8::1\n", OK, vec!["9.9.9.9", "2001:db8::1"]),
            ("+2001:DB8:0:0:0:0:0:1", OK, vec!["9.9.9.9", "2001:db8::1"]),
            ("+1:2:3:4:5:6:7:8", OK, vec!["9.9.9.9", "1:2:3:4:5:6:7:8"]),
            ("+::ffff:1.2.3.4", OK, vec!["9.9.9.9", "::ffff:1.2.3.4"]),
            ("+64:ff9b::192.0.2.33\n", OK, vec!["9.9.9.9", "64:ff9b::c000:221"]),
            ("+2001:db8::g", E, vec!["9.9.9.9"]),
            ("+:::1", E, vec!["9.9.9.9"]),
            ("+1:2:3:4:5:6:7:8:9", E, vec!["9.9.9.9"]),
            ("+1:2", E, vec!["9.9.9.9"]),
            ("+2001:db8::1 ", E, vec!["9.9.9.9"]),
        ];
        for (line, want, entries) in cases {
            let mut t = xt(10);
            t.proc_write(0, "+9.9.9.9").unwrap();
            assert_eq!(t.proc_write(1, line), want, "{line:?}");
            let want_entries: Vec<IpAddr> = entries.iter().map(|s| ip(s)).collect();
            assert_eq!(addrs(&t), want_entries, "{line:?}");
        }
        assert_eq!(ProcError::InvalidArgument.errno(), 22);
    }

    #[test]
    fn proc_writes_are_not_masked_and_v4_mapped_stays_ipv6() {
        let mut t = xt_with(10, 32, XtMask::ipv4_prefix(24));
        t.proc_write(0, "+1.2.3.4").unwrap();
        assert!(!t.rcheck(1, ip("1.2.3.4"), None, None, false), "packets are masked to 1.2.3.0");
        t.set(2, ip("1.2.3.77"));
        assert_eq!(addrs(&t), [ip("1.2.3.4"), ip("1.2.3.0")]);

        let mut t = xt(10);
        t.proc_write(0, "+::ffff:1.2.3.4").unwrap();
        assert!(!t.rcheck(1, ip("1.2.3.4"), None, None, false));
        assert!(t.rcheck(1, ip("::ffff:1.2.3.4"), None, None, false));
    }

    #[test]
    fn table_mask_applies_to_packets_of_both_families() {
        let mut t = xt_with(10, 32, XtMask::ipv6_prefix(64));
        t.set(0, ip("2001:db8::1"));
        assert!(t.rcheck(1, ip("2001:db8::ffff"), None, None, false));
        assert!(!t.rcheck(1, ip("2001:db8:0:1::1"), None, None, false));
        // IPv4 uses the first 4 bytes of the mask: all ones here.
        t.set(2, ip("192.0.2.1"));
        assert!(!t.rcheck(3, ip("192.0.2.2"), None, None, false));
        assert_eq!(addrs(&t), [ip("2001:db8::"), ip("192.0.2.1")]);
        assert!(t.remove(ip("2001:db8::42")));
        assert!(!t.remove(ip("2001:db8::42")));
    }

    // --- nft sets -------------------------------------------------------------------------------

    #[test]
    fn nft_full_set_refuses_and_final_rule_drops() {
        let (a, b, c) = (ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3"));
        let mut rate = nft(Some(2), Some(Duration::from_secs(60)));
        let ban = nft(None, None);
        assert!(rate.add(0, a));
        assert!(rate.add(1, b));
        assert!(!rate.add(2, c));
        assert!(rate.add(2, a), "present: true, no insert");
        assert_eq!(NftRuleset.eval_syn(&ban, &mut rate, 3, c), GateDecision::DropRate);
        assert_eq!(rate.add_element(4, c, ElementOpts::default()), Err(NftError::SetFull));
        assert_eq!(NftError::SetFull.errno(), 23);
        assert_eq!(rate.len(), 2);
    }

    #[test]
    fn nft_expired_elements_count_until_gc_e5() {
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let mut s = nft(Some(1), Some(Duration::from_secs(3))); // 750 jiffies, gc every 250
        assert!(s.add(0, a));
        s.maybe_gc(749); // gc at 500: nothing expired
        assert_eq!(s.len(), 1);
        assert!(!s.contains(750, a));
        assert_eq!((s.len(), s.live_len(750)), (1, 0), "listing empty, set full");
        assert!(!s.add(750, b));
        assert!(!s.add(750, a), "the expired element of the same key counts too");
        assert_eq!(s.add_element(750, b, ElementOpts::default()), Err(NftError::SetFull));
        s.maybe_gc(751); // gc at 750
        assert_eq!(s.len(), 0);
        assert!(s.add(751, b));
    }

    #[test]
    fn nft_readd_of_expired_key_leaves_a_counted_zombie() {
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let mut s = nft(Some(2), Some(Duration::from_secs(3)));
        assert!(s.add(0, a));
        assert!(s.add(800, a));
        assert_eq!(s.len(), 2);
        assert!(!s.add(800, b));
        s.gc(1000);
        assert_eq!(s.len(), 1);
        assert!(s.contains(1000, a));
        assert!(s.add(1000, b));
    }

    #[test]
    fn nft_packet_add_never_refreshes_update_does() {
        let a = ip("192.0.2.1");
        let mut s = nft(Some(10), Some(Duration::from_secs(3)));
        assert!(s.add(0, a));
        assert!(s.add(500, a));
        let exp = |s: &NftSet, now| s.iter(now).next().and_then(|e| e.expires_in).map(|r| r + now);
        assert_eq!(exp(&s, 500), Some(750));
        assert!(s.update(600, a));
        assert_eq!(exp(&s, 600), Some(1350));
    }

    #[test]
    fn nft_control_plane_add_variants_6_12() {
        let a = ip("192.0.2.1");
        let secs = Duration::from_secs;
        let el =
            |t: Option<u64>, e: Option<u64>| ElementOpts { timeout: t.map(secs), expires: e.map(secs), create: false };
        let mut s = nft(None, None);
        let state = |s: &NftSet, now| {
            let e = s.iter(now).next().unwrap();
            (e.timeout, e.expires_in.map(|r| r + now))
        };
        s.add_element(0, a, el(Some(10), None)).unwrap();
        assert_eq!(state(&s, 0), (Some(2500), Some(2500)));
        // (now, opts, result, (timeout, expiration) afterwards)
        let steps = [
            (100, el(Some(10), None), Ok(()), (Some(2500), Some(2500))), // same timeout: no-op
            (200, el(Some(10), Some(5)), Ok(()), (Some(2500), Some(1450))), // expires: reset expiry
            (300, el(Some(20), None), Ok(()), (Some(5000), Some(5300))), // new timeout: both
            (400, el(Some(20), Some(1)), Ok(()), (Some(5000), Some(650))),
            (500, el(Some(30), Some(2)), Ok(()), (Some(7500), Some(1000))),
            (600, el(Some(30), Some(40)), Err(NftError::Range), (Some(7500), Some(1000))),
            (600, el(None, Some(1)), Err(NftError::NotSupported), (Some(7500), Some(1000))),
            (600, ElementOpts { create: true, ..el(Some(30), None) }, Err(NftError::Exists), (Some(7500), Some(1000))),
        ];
        for (now, opts, want, after) in steps {
            assert_eq!(s.add_element(now, a, opts), want, "{opts:?}");
            assert_eq!(state(&s, now), after, "{opts:?}");
        }
        // Expired: `create` works again, and the expired element still counts until gc.
        let b = ip("192.0.2.2");
        s.add_element(0, b, el(Some(1), None)).unwrap();
        assert_eq!(s.add_element(250, b, ElementOpts { create: true, ..el(Some(1), None) }), Ok(()));
        assert_eq!(s.len(), 3);

        // No timeout and no set default: permanent, and a later timeout does not change it.
        let c = ip("192.0.2.3");
        s.add_element(0, c, ElementOpts::default()).unwrap();
        s.add_element(1, c, el(Some(1), None)).unwrap();
        assert!(s.contains(u64::MAX - 1, c));
        assert_eq!(s.iter(5).find(|e| e.addr == c).unwrap().timeout, None);

        // delete: present → ok; absent or expired → ENOENT (the expired one stays counted).
        assert_eq!(s.delete_element(10, c), Ok(()));
        assert_eq!(s.delete_element(10, c), Err(NftError::NotFound));
        let n = s.len();
        assert_eq!(s.delete_element(2000, a), Err(NftError::NotFound));
        assert_eq!(s.len(), n);
    }

    #[test]
    fn nft_ipv6_prefix_keys() {
        let mut s = NftSet::new(NftSetConfig {
            ipv6_prefix: Some(64),
            timeout: Some(Duration::from_secs(60)),
            ..NftSetConfig::default()
        });
        assert!(s.add(0, ip("2001:db8::1")));
        assert!(s.contains(1, ip("2001:db8::2:3")));
        assert!(!s.contains(1, ip("2001:db8:0:1::1")));
        assert_eq!(s.iter(1).next().unwrap().addr, ip("2001:db8::"));
    }

    // --- Gate ---------------------------------------------------------------------------------

    fn gate(kind: GateKind) -> (Gate, Instant) {
        let origin = Instant::now();
        (Gate::new(GateConfig { kind, ..GateConfig::default() }, origin), origin)
    }

    fn kinds() -> [GateKind; 2] {
        [GateKind::default(), GateKind::Nft { size: 65_535, hz: 250 }]
    }

    fn at(origin: Instant, ms: u64) -> Instant {
        origin + Duration::from_millis(ms)
    }

    #[test]
    fn gate_defaults() {
        let c = GateConfig::default();
        assert_eq!(c.kind, GateKind::XtRecent { ip_list_tot: 100, hz: 250 });
        assert_eq!((c.window, c.ban_time, c.ipv6_prefix), (Duration::from_secs(60), Duration::from_secs(345_600), 64));
        assert!(c.problems().is_empty());
    }

    #[test]
    fn gate_jiffies_round_down() {
        let (g, o) = gate(GateKind::default());
        assert_eq!(g.jiffies(o), 0);
        assert_eq!(g.jiffies(o + Duration::from_micros(3_999)), 0);
        assert_eq!(g.jiffies(o + Duration::from_millis(4)), 1);
        assert_eq!(g.jiffies(o + Duration::from_secs(60)), 15_000);
        assert_eq!(g.jiffies(o.checked_sub(Duration::from_secs(1)).unwrap_or(o)), 0);
    }

    #[test]
    fn gate_g1_boundary_per_kind() {
        let a = ip("203.0.113.5");
        // xt opens at S+W+1 jiffies, nft at S+W. S = 1 s = jiffy 250; W = 15000 jiffies.
        for (kind, at_w, at_w1) in [
            (GateKind::default(), GateDecision::DropRate, GateDecision::Accept),
            (GateKind::Nft { size: 10, hz: 250 }, GateDecision::Accept, GateDecision::Accept),
        ] {
            let (mut g, o) = gate(kind.clone());
            assert_eq!(g.check(at(o, 1000), a), GateDecision::Accept);
            assert_eq!(g.check(at(o, 30_000), a), GateDecision::DropRate);
            assert_eq!(g.check(at(o, 60_996), a), GateDecision::DropRate);
            let (mut g2, _) = (g.clone(), ());
            assert_eq!(g.check(at(o, 61_000), a), at_w, "{kind:?} at S+W");
            assert_eq!(g2.check(at(o, 61_004), a), at_w1, "{kind:?} at S+W+1");
        }
    }

    #[test]
    fn gate_ban_unban_and_expiry() {
        let a = ip("203.0.113.9");
        let four_days = Duration::from_secs(345_600);
        for kind in kinds() {
            let (mut g, o) = gate(kind.clone());
            assert!(!g.ban(o, a, Duration::ZERO), "a zero-length ban bans nothing");
            assert!(!g.is_banned(o, a));
            assert!(g.ban(o, a, four_days));
            assert!(g.is_banned(at(o, 1), a));
            assert_eq!(g.check(at(o, 1000), a), GateDecision::DropBanned);
            assert_eq!(g.banned_len(), 1);
            assert!(g.unban(a));
            assert!(!g.unban(a));
            assert_eq!(g.check(at(o, 2000), a), GateDecision::Accept, "{kind:?}");

            // Expiry: xt still bans at exactly S+W and lets go at S+W+1; nft lets go at S+W.
            // Time never runs backwards in a gate: a ban "at o" now lands at the latest jiffy.
            let b = ip("203.0.113.10");
            g.ban(o, b, four_days);
            let s_ms = 2000;
            let w_ms = s_ms + four_days.as_millis() as u64;
            let xt = matches!(kind, GateKind::XtRecent { .. });
            assert_eq!(g.is_banned(at(o, w_ms), b), xt, "{kind:?}");
            assert!(!g.is_banned(at(o, w_ms + 4), b));
            assert_eq!(g.check(at(o, w_ms + 4), b), GateDecision::Accept);
        }
    }

    #[test]
    fn gate_xt_overflow_evicts_a_ban_nft_does_not() {
        let victim = ip("10.0.0.0");
        for kind in kinds() {
            let (mut g, o) = gate(kind.clone());
            for i in 0..100u32 {
                g.ban(at(o, u64::from(i)), IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), Duration::from_secs(345_600));
            }
            for t in 0..50 {
                assert_eq!(g.check(at(o, 1000 + t), victim), GateDecision::DropBanned);
            }
            g.ban(at(o, 2000), ip("10.0.1.0"), Duration::from_secs(345_600));
            let want = match kind {
                GateKind::XtRecent { .. } => GateDecision::Accept,
                GateKind::Nft { .. } => GateDecision::DropBanned,
            };
            assert_eq!(g.check(at(o, 3000), victim), want, "{kind:?}");
        }
    }

    #[test]
    fn gate_v4_mapped_is_ipv4_and_ipv6_is_keyed_by_prefix() {
        for kind in kinds() {
            let (mut g, o) = gate(kind.clone());
            g.ban(o, ip("::ffff:192.0.2.1"), Duration::from_secs(3600));
            assert_eq!(g.check(at(o, 1), ip("192.0.2.1")), GateDecision::DropBanned, "{kind:?}");
            assert_eq!(g.check(at(o, 1), ip("::ffff:192.0.2.1")), GateDecision::DropBanned);

            g.ban(o, ip("2001:db8::1"), Duration::from_secs(3600));
            assert_eq!(g.check(at(o, 2), ip("2001:db8::ffff:1")), GateDecision::DropBanned);
            assert_eq!(g.check(at(o, 3), ip("2001:db8:0:1::1")), GateDecision::Accept);
            assert_eq!(g.check(at(o, 4), ip("2001:db8:0:1::2")), GateDecision::DropRate);
            assert!(g.unban(ip("2001:db8::42")));
        }
    }

    #[test]
    fn gate_nft_full_rate_set_fails_closed() {
        let (mut g, o) = gate(GateKind::Nft { size: 2, hz: 250 });
        assert_eq!(g.check(o, ip("192.0.2.1")), GateDecision::Accept);
        assert_eq!(g.check(o, ip("192.0.2.2")), GateDecision::Accept);
        assert_eq!(g.check(o, ip("192.0.2.3")), GateDecision::DropRate);
        // After the window and the next gc run, there is room again.
        assert_eq!(g.check(at(o, 61_000), ip("192.0.2.3")), GateDecision::Accept);
        // xt with a full rate table fails open instead: the LRU entry is evicted.
        let (mut g, o) = gate(GateKind::XtRecent { ip_list_tot: 2, hz: 250 });
        for a in ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.1"] {
            assert_eq!(g.check(o, ip(a)), GateDecision::Accept, "{a}");
        }
    }

    #[test]
    fn gate_config_serde() {
        let c = GateConfig::default();
        let text = toml::to_string(&c).unwrap();
        assert_eq!(toml::from_str::<GateConfig>(&text).unwrap(), c, "{text}");
        assert_eq!(toml::from_str::<GateConfig>("").unwrap(), c);
        let nft: GateConfig = toml::from_str(
            "window = \"90s\"\nban_time = \"1d\"\nipv6_prefix = 56\n[kind]\nbackend = \"nft\"\nsize = 1000\n",
        )
        .unwrap();
        assert_eq!(nft.kind, GateKind::Nft { size: 1000, hz: 250 });
        assert_eq!(
            (nft.window, nft.ban_time, nft.ipv6_prefix),
            (Duration::from_secs(90), Duration::from_secs(86_400), 56)
        );
        for bad in ["windw = \"1s\"", "[kind]\nbackend = \"xt_recent\"\nsize = 5", "[kind]\nbackend = \"pf\""] {
            assert!(toml::from_str::<GateConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gate_config_problems() {
        let bad = GateConfig {
            kind: GateKind::XtRecent { ip_list_tot: 0, hz: 0 },
            window: Duration::from_millis(1500),
            ban_time: Duration::ZERO,
            ipv6_prefix: 129,
        };
        let p = bad.problems();
        for needle in
            ["kind.hz", "kind.ip_list_tot", "window: xt_recent needs whole seconds", "ban_time", "ipv6_prefix"]
        {
            assert!(p.iter().any(|s| s.starts_with(needle)), "missing {needle} in {p:?}");
        }
        assert_eq!(p.len(), 5);
        assert!(Gate::try_new(bad, Instant::now()).is_err());
        let nft_ms = GateConfig {
            kind: GateKind::Nft { size: 10, hz: 250 },
            window: Duration::from_millis(1500),
            ..GateConfig::default()
        };
        assert!(nft_ms.problems().is_empty());
    }

    /// The index stays short for dense ranges (the grouping) and for random addresses.
    #[test]
    fn index_probe_lengths_stay_short() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u32
        };
        for dense in [true, false] {
            let n = 1u32 << 17;
            let mut t = xt(n);
            for i in 0..n {
                let a = if dense { 0x0a00_0000 + i } else { rnd() };
                t.set(0, IpAddr::V4(Ipv4Addr::from(a)));
            }
            let mask = t.index.slots.len() - 1;
            let used = t.index.slots.iter().enumerate().filter(|(_, s)| s.idx != NIL);
            let displacement: usize = used.map(|(pos, s)| pos.wrapping_sub(s.tag as usize & mask) & mask).sum();
            let mean = displacement as f64 / t.len() as f64;
            assert!(mean < if dense { 6.0 } else { 1.0 }, "dense={dense}: mean displacement {mean}");
            let mut probes = 0;
            for _ in 0..10_000 {
                let mut p = rnd() as usize & mask;
                probes += 1;
                while t.index.slots[p].idx != NIL {
                    p = (p + 1) & mask;
                    probes += 1;
                }
            }
            let miss = f64::from(probes) / 10_000.0;
            assert!(miss < if dense { 16.0 } else { 4.0 }, "dense={dense}: miss probe {miss}");
        }
    }

    // --- parsers ---------------------------------------------------------------------------------

    proptest! {
        #[test]
        fn pton_agrees_with_std_on_valid_addresses(v4 in any::<u32>(), v6 in any::<u128>(), style in 0u8..3) {
            let a4 = Ipv4Addr::from(v4);
            prop_assert_eq!(in4_pton(format!("{a4}\n").as_bytes(), b'\n'), Some(a4.octets()));
            let a6 = Ipv6Addr::from(v6);
            let s = a6.segments();
            let text = match style {
                0 => a6.to_string(),
                1 => s.iter().map(|g| format!("{g:x}")).collect::<Vec<_>>().join(":"),
                _ => format!("{:04X}:{:04X}:{:04X}:{:04X}:{:04X}:{:04X}:{}", s[0], s[1], s[2], s[3], s[4], s[5], Ipv4Addr::from(v6 as u32)),
            };
            prop_assert_eq!(in6_pton(text.as_bytes(), b'\n'), Some(a6.octets()), "{}", text);
        }

        #[test]
        fn proc_write_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut t = xt(4);
            let _ = t.proc_write_bytes(0, &bytes);
            prop_assert!(t.len() <= 1);
        }
    }

    // --- reference models ------------------------------------------------------------------------

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

    const POOL: [&str; 9] = [
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.3",
        "192.0.2.130",
        "198.51.100.1",
        "198.51.100.2",
        "2001:db8::1",
        "2001:db8::2",
        "2001:db8:0:1::1",
    ];

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

        /// G1 is non-sliding for both kinds: an attempt is accepted iff it comes at or after
        /// the time computed from the last *accepted* attempt (xt: S+W+1 jiffies, nft: S+W);
        /// dropped attempts never move it. Tables are large enough never to evict.
        #[test]
        fn g1_dropped_attempts_never_move_next_allowed_time(
            nft_kind in any::<bool>(),
            window_s in 1u64..5,
            attempts in proptest::collection::vec((0usize..POOL.len(), 0u64..3000), 1..150),
        ) {
            let kind = if nft_kind { GateKind::Nft { size: 1000, hz: 250 } } else { GateKind::XtRecent { ip_list_tot: 1000, hz: 250 } };
            let origin = Instant::now();
            let mut g = Gate::new(GateConfig { kind, window: Duration::from_secs(window_s), ..GateConfig::default() }, origin);
            let w = window_s * HZ;
            let mut next_allowed: std::collections::BTreeMap<IpAddr, u64> = Default::default();
            let mut t_ms = 0;
            for (a, dt) in attempts {
                t_ms += dt;
                let addr = ip(POOL[a]);
                let j = g.jiffies(origin + Duration::from_millis(t_ms));
                let key = match addr {
                    IpAddr::V6(v) => IpAddr::V6(Ipv6Addr::from(u128::from(v) & prefix_mask128(64))),
                    v4 => v4,
                };
                let allowed = next_allowed.get(&key).is_none_or(|&n| j >= n);
                let got = g.check(origin + Duration::from_millis(t_ms), addr);
                prop_assert_eq!(got == GateDecision::Accept, allowed, "{} at {} ms", addr, t_ms);
                if allowed {
                    next_allowed.insert(key, j + w + u64::from(!nft_kind));
                }
            }
        }

        /// Under any mix of checks, bans and unbans, no table holds more than its capacity.
        #[test]
        fn gate_tables_never_exceed_capacity(
            nft_kind in any::<bool>(),
            cap in 1u32..8,
            ops in proptest::collection::vec((0u32..40, 0u8..4, 0u64..20_000), 1..200),
        ) {
            let kind = if nft_kind { GateKind::Nft { size: cap, hz: 250 } } else { GateKind::XtRecent { ip_list_tot: cap, hz: 250 } };
            let origin = Instant::now();
            let mut g = Gate::new(GateConfig { kind, ..GateConfig::default() }, origin);
            let mut t = origin;
            for (a, op, dt) in ops {
                t += Duration::from_millis(dt);
                let addr = if a % 4 == 0 { IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(a) << 64)) } else { IpAddr::V4(Ipv4Addr::from(0xc000_0200 + a)) };
                match op {
                    0 | 1 => { g.check(t, addr); }
                    2 => { g.ban(t, addr, Duration::from_secs(3600)); }
                    _ => { g.unban(addr); }
                }
                match g.backend() {
                    GateBackend::XtRecent { ban4, ban6, rate4, rate6, .. } => {
                        for x in [ban4, ban6, rate4, rate6] {
                            prop_assert!(x.len() <= cap as usize);
                        }
                    }
                    GateBackend::Nft { rate4, rate6, .. } => {
                        prop_assert!(rate4.len() <= cap as usize && rate6.len() <= cap as usize);
                    }
                }
            }
        }
    }
}
