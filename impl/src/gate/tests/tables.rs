//! The two table types, case by case: docs/kernel.md's measured behaviours ([T], with their
//! experiment names), the `/proc` protocol, the kernel's address parsers, and the index's
//! probe lengths.

use super::*;

// --- [T] A1/A2: non-sliding --rcheck vs sliding --update ------------------------------

#[test]
fn rcheck_is_non_sliding_update_slides_w3() {
    let a = ip("192.0.2.1");
    // (sliding, [(ms, accepted)]): docs/kernel.md §2, W=3 s.
    let cases: [(bool, &[(u64, bool)]); 2] = [
        (false, &[(0, true), (1000, false), (2000, false), (3200, true)]),
        (true, &[(0, true), (1000, false), (2000, false), (3200, false), (6400, true)]),
    ];
    for (sliding, steps) in cases {
        let mut t = xt(100);
        for &(at, accepted) in steps {
            let now = ms(at);
            let dropped =
                if sliding { t.update(now, a, Some(3), None, false) } else { t.rcheck(now, a, Some(3), None, false) };
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
    let el = |t: Option<u64>, e: Option<u64>| ElementOpts { timeout: t.map(secs), expires: e.map(secs), create: false };
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
        let mask = t.table.index.slots.len() - 1;
        let used = t.table.index.slots.iter().enumerate().filter(|(_, s)| s.idx != NIL);
        let displacement: usize = used.map(|(pos, s)| pos.wrapping_sub(s.tag as usize & mask) & mask).sum();
        let mean = displacement as f64 / t.len() as f64;
        assert!(mean < if dense { 6.0 } else { 1.0 }, "dense={dense}: mean displacement {mean}");
        let mut probes = 0;
        for _ in 0..10_000 {
            let mut p = rnd() as usize & mask;
            probes += 1;
            while t.table.index.slots[p].idx != NIL {
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

#[test]
fn nft_flush_set_empties_it_and_it_takes_elements_again() {
    let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
    let mut s = nft(Some(2), Some(Duration::from_secs(60)));
    assert_eq!(s.capacity(), Some(2));
    assert!(s.add(0, a) && s.add(0, b));
    assert_eq!((s.len(), s.live_len(1)), (2, 2));
    s.flush();
    assert_eq!((s.len(), s.live_len(1)), (0, 0));
    assert!(!s.contains(1, a));
    // Nothing of the flushed elements is left to expire or to fill the set.
    assert!(s.add(2, a) && s.add(2, b));
    s.gc(60 * HZ + 10);
    assert_eq!(s.len(), 0, "the new elements expired on their own schedule");
}

#[test]
fn memory_estimates_count_stamp_rings_and_expiry_queues() {
    // An xt_recent entry's stamps beyond its first live in a ring of 8-byte jiffies.
    let mut t = xt_with(10, 32, XtMask::ALL);
    t.set(ms(4), ip("192.0.2.1"));
    let one_stamp = t.memory_bytes();
    for i in 2..=32 {
        t.set(ms(4 * i), ip("192.0.2.1"));
    }
    assert!(t.memory_bytes() >= one_stamp + 31 * 8, "{} vs {one_stamp}", t.memory_bytes());
    // An nft set with a timeout queues each element's expiry; one without does not.
    let (mut timed, mut plain) = (nft(None, Some(Duration::from_secs(60))), nft(None, None));
    for i in 0..100u8 {
        let addr = IpAddr::from([192, 0, 2, i]);
        assert!(timed.add(0, addr) && plain.add(0, addr));
    }
    let queue = timed.memory_bytes() - plain.memory_bytes();
    assert!(queue >= 100 * std::mem::size_of::<(Jiffies, u32)>(), "expiry queue {queue} bytes");
}
