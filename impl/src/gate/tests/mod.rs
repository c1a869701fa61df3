//! Tests of the kernel model: the tables against docs/kernel.md's measured cases, the
//! [`Gate`] facade, and reference models of both backends with the proptests that hold the
//! tables to them.
//!
//! These tests are the proof that the model is exact: each table type is compared operation by
//! operation with an O(n) transcription of the kernel code (`model_xt`, `model_nft`), and the
//! measured cases ([T] in docs/kernel.md) are pinned one by one (`tables`). They must not
//! depend on hash order or on the wall clock beyond an arbitrary origin.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::table::{Key, NIL, prefix_mask128};
use super::xt_proc::{in4_pton, in6_pton};
use super::xt_recent::time_after;
use super::*;

mod facade;
mod model_nft;
mod model_xt;
mod tables;

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

/// Addresses the proptests draw from: neighbours, other networks, one /64 and its neighbour.
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
