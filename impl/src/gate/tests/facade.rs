//! The [`Gate`] facade: rules G2 then G1 on either backend, time as instants, keys by family
//! and prefix, configuration; and the proptests that hold G1 non-sliding and the tables within
//! their capacity under any mix of operations.

use super::*;

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
fn gate_check_at_is_check_in_jiffies_and_never_goes_back() {
    let a = ip("203.0.113.5");
    for kind in kinds() {
        let (mut by_instant, o) = gate(kind.clone());
        let (mut by_jiffy, _) = gate(kind.clone());
        for ms in [0, 1_000, 30_000, 60_996, 61_000, 61_004, 200_000] {
            let now = at(o, ms);
            assert_eq!(by_jiffy.check_at(by_instant.jiffies(now), a), by_instant.check(now, a), "{kind:?} at {ms}");
        }
        // An earlier jiffy counts as the latest seen: still inside the window just opened.
        assert_eq!(by_jiffy.check_at(0, a), GateDecision::DropRate, "{kind:?}");
    }
}

#[test]
fn gate_banned_lists_the_ban_tables() {
    let (v4, v6) = (ip("192.0.2.7"), ip("2001:db8::1"));
    let hour = Duration::from_secs(3600);
    for kind in kinds() {
        let (mut g, o) = gate(kind.clone());
        assert_eq!(g.banned(o).count(), 0);
        g.ban(o, v6, hour);
        g.ban(o, ip("::ffff:192.0.2.7"), hour);
        g.check(o, ip("198.51.100.1")); // rate tables are not listed
        let want = [v4, ip("2001:db8::")];
        assert_eq!(g.banned(o).collect::<Vec<_>>(), want, "{kind:?}: IPv4 first, IPv6 by its network");
        // Past the ban: nft lists only unexpired elements; xt_recent lists every entry until it
        // is reaped or evicted (with a 4-day `--seconds`, the 1-hour ban still matches).
        let later = at(o, 2 * 3600 * 1000);
        let listed: Vec<_> = g.banned(later).collect();
        match kind {
            GateKind::XtRecent { .. } => assert_eq!(listed, want),
            GateKind::Nft { .. } => assert!(listed.is_empty(), "{listed:?}"),
        }
        assert!(g.unban(v4));
        let after_unban = g.banned(o).collect::<Vec<_>>();
        assert!(!after_unban.contains(&v4), "{kind:?}: {after_unban:?}");
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
    assert_eq!((nft.window, nft.ban_time, nft.ipv6_prefix), (Duration::from_secs(90), Duration::from_secs(86_400), 56));
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
    for needle in ["kind.hz", "kind.ip_list_tot", "window: xt_recent needs whole seconds", "ban_time", "ipv6_prefix"] {
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

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
            match &g.backend {
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
