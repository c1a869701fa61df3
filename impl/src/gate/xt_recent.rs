//! One xt_recent table: its entries, their timestamp rings, and the LRU list.
//!
//! This module owns [`XtRecent`], the packet-path modes (`--set`, `--rcheck`, `--update`,
//! `--remove` with `--seconds`, `--hitcount`, `--reap`, `--mask`), the `ip_list_tot` LRU
//! eviction and the timestamp ring, as docs/kernel.md §1 describes them, plus applying the
//! `/proc` writes that [`super::xt_proc`] parses. Storage is the shared [`Table`]; the LRU list
//! is chained through its slots. It must not read a clock (time is a jiffy argument that never
//! goes backwards) nor let the hash order show: listings follow the LRU list.

use std::net::IpAddr;

use super::config::{GateConfigError, Jiffies, MAX_HITCOUNT, XtRecentConfig};
use super::table::{Key, NIL, Node, Table};
use super::xt_proc::{self, ProcError, ProcWrite};

/// The kernel's `time_after(a, b)`: `a` is later than `b`, with wrapping arithmetic.
#[inline]
pub(super) fn time_after(a: Jiffies, b: Jiffies) -> bool {
    (b.wrapping_sub(a) as i64) < 0
}

/// One xt_recent entry in the slab.
#[derive(Debug, Clone)]
pub(super) struct XtNode {
    hi: u64,
    lo: u64,
    /// `stamps[0]`.
    first: Jiffies,
    /// `stamps[index - 1]`, the most recent stamp, kept here so checks need not touch the ring.
    last: Jiffies,
    /// `stamps[1..nstamps]`, grown lazily up to R-1 (most entries never get a second stamp).
    more: Vec<Jiffies>,
    /// LRU neighbours (`NIL` at the ends).
    prev: u32,
    next: u32,
    /// The kernel's `e->index`: one past the slot written last (1..=R).
    index: u32,
    v6: bool,
}

impl Node for XtNode {
    #[inline]
    fn key(&self) -> Key {
        Key { hi: self.hi, lo: self.lo, v6: self.v6 }
    }
}

impl XtNode {
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
    xt: &'a XtRecent,
    at: u32,
}

impl<'a> Iterator for XtIter<'a> {
    type Item = XtEntry<'a>;

    fn next(&mut self) -> Option<XtEntry<'a>> {
        if self.at == NIL {
            return None;
        }
        let node = self.xt.table.node(self.at);
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
    /// The entries; the LRU list runs from `head` to `tail` through their slots.
    pub(super) table: Table<XtNode>,
    head: u32,
    tail: u32,
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
        XtRecent { cfg, ring_mask: cfg.ring_size - 1, table: Table::new(), head: NIL, tail: NIL }
    }

    /// The table's configuration (its ring size reflects [`require_hitcount`](Self::require_hitcount)).
    pub fn config(&self) -> &XtRecentConfig {
        &self.cfg
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True if the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.table.len() == 0
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
        XtIter { xt: self, at: self.head }
    }

    /// The entry for `addr` (masked), if any.
    pub fn get(&self, addr: IpAddr) -> Option<XtEntry<'_>> {
        let k = self.cfg.mask.apply(Key::from_addr(addr));
        self.table.lookup(&k).map(|i| XtEntry { node: self.table.node(i) })
    }

    /// Estimated heap bytes held (slab, index, stamp rings, free list).
    pub fn memory_bytes(&self) -> usize {
        let rings: usize = self.table.slab().iter().map(|n| n.more.capacity() * 8).sum();
        self.table.memory_bytes() + rings
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
        self.table.clear();
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
        match xt_proc::parse_write(buf)? {
            ProcWrite::Nothing => {}
            ProcWrite::Flush => self.flush(),
            ProcWrite::Add(key) => self.set_key(now, key),
            ProcWrite::Remove(key) => {
                self.remove_key(&key);
            }
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
        xt_proc::render(self.iter())
    }

    /// Would `--rcheck --seconds s --hitcount n` match, without reaping anything?
    pub fn peek(&self, now: Jiffies, addr: IpAddr, seconds: Option<u32>, hitcount: Option<u32>) -> bool {
        let k = self.cfg.mask.apply(Key::from_addr(addr));
        let Some(e) = self.table.lookup(&k) else {
            return false;
        };
        let (time, windowed) = self.window_start(now, seconds);
        self.table.node(e).matches(time, windowed, hitcount.unwrap_or(0))
    }

    // --- internals ---

    #[inline]
    fn window_start(&self, now: Jiffies, seconds: Option<u32>) -> (Jiffies, bool) {
        match seconds {
            Some(s) if s != 0 => (now.wrapping_sub(u64::from(s) * u64::from(self.cfg.hz)), true),
            _ => (now, false),
        }
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
        let Some(e) = self.table.lookup(&k) else {
            return false;
        };
        let (time, windowed) = self.window_start(now, seconds);
        let matched = self.table.node(e).matches(time, windowed, hitcount.unwrap_or(0));
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
        if time_after(time, self.table.node(h).last()) {
            self.remove_node(h);
        }
    }

    /// The G1 fast path: `--rcheck --seconds s` (no reap) → true (drop); else `--set` →
    /// false (accept). Equivalent to the two rules, with one lookup when the entry exists.
    pub(super) fn rcheck_or_set(&mut self, now: Jiffies, addr: IpAddr, seconds: u32) -> bool {
        let k = self.cfg.mask.apply(Key::from_addr(addr));
        let tag = self.table.tag(&k);
        match self.table.lookup_tagged(&k, tag) {
            Some(e) => {
                let (time, windowed) = self.window_start(now, Some(seconds));
                if self.table.node(e).matches(time, windowed, 0) {
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
        let tag = self.table.tag(&k);
        match self.table.lookup_tagged(&k, tag) {
            Some(e) => self.stamp(e, now),
            None => self.insert_new(now, k, tag),
        }
    }

    fn remove_key(&mut self, k: &Key) -> bool {
        match self.table.lookup(k) {
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
        self.table.node_mut(e).push_stamp(now, self.ring_mask);
        if self.tail != e {
            self.unlink(e);
            self.link_tail(e);
        }
    }

    /// `recent_entry_init`: evict the LRU head of a full table, then add `{[now]}` at the tail.
    fn insert_new(&mut self, now: Jiffies, k: Key, tag: u32) {
        if self.table.len() >= self.cfg.ip_list_tot as usize {
            self.remove_node(self.head);
        }
        let i = self.table.insert(
            tag,
            |n| {
                // The slot keeps its ring allocation.
                n.hi = k.hi;
                n.lo = k.lo;
                n.v6 = k.v6;
                n.first = now;
                n.last = now;
                n.more.clear();
                n.index = 1;
            },
            || XtNode {
                hi: k.hi,
                lo: k.lo,
                first: now,
                last: now,
                more: Vec::new(),
                prev: NIL,
                next: NIL,
                index: 1,
                v6: k.v6,
            },
        );
        self.link_tail(i);
    }

    fn remove_node(&mut self, e: u32) {
        self.unlink(e);
        // The node keeps its ring allocation for reuse by the next insert.
        self.table.remove(e);
    }

    #[inline]
    fn unlink(&mut self, e: u32) {
        let (prev, next) = {
            let n = self.table.node(e);
            (n.prev, n.next)
        };
        if prev == NIL {
            self.head = next;
        } else {
            self.table.node_mut(prev).next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.table.node_mut(next).prev = prev;
        }
    }

    #[inline]
    fn link_tail(&mut self, e: u32) {
        let tail = self.tail;
        {
            let n = self.table.node_mut(e);
            n.prev = tail;
            n.next = NIL;
        }
        if tail == NIL {
            self.head = e;
        } else {
            self.table.node_mut(tail).next = e;
        }
        self.tail = e;
    }
}
