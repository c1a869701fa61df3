//! The rules as pure functions: every case of docs/design.md §2 (rules) they decide.

use super::*;

fn dir() -> Directory {
    let d = Domain::parse("example.test").unwrap();
    let mut dir = Directory::new([d.clone()], true);
    dir.add_user("alice", &d);
    dir
}
fn rp(s: &str) -> ReversePath {
    ReversePath::parse(s).unwrap()
}
fn fp(s: &str) -> ForwardPath {
    ForwardPath::parse(s).unwrap()
}

#[test]
fn mail_from_rules() {
    let d = dir();
    let cases = [
        ("<>", 250, None),
        ("<alice@example.test>", 250, None),
        ("<ALICE@Example.Test>", 250, None),
        ("<postmaster@example.test>", 250, None),
        ("<nobody@example.test>", 550, Some(BanReason::ForgedLocalSender)),
        ("<someone@elsewhere.test>", 250, None),
    ];
    for (from, code, ban) in cases {
        let v = mail_from(&d, &rp(from));
        assert_eq!((v.reply.code, v.ban.map(|b| b.reason), v.rule), (code, ban, Rule::E1), "{from}");
    }
    assert_eq!(malformed_sender(PathError::NoDomain).reply.code, 553);
    assert!(malformed_sender(PathError::NoDomain).ban.is_none());
}

#[test]
fn rcpt_rules() {
    let d = dir();
    let cfg = PolicyConfig::default();
    let cases = [
        ("<>", "<alice@example.test>", 250, None),
        ("<>", "<Postmaster>", 250, None),
        ("<x@y.test>", "<postmaster@example.test>", 250, None),
        ("<x@y.test>", "<abuse@example.test>", 250, None),
        ("<>", "<nobody@example.test>", 550, None),
        // The client's first unknown recipient: deferred (probe-shaped so far), no ban yet.
        ("<x@y.test>", "<nobody@example.test>", 550, None),
        ("<x@y.test>", "<bob@elsewhere.test>", 554, None),
        ("<x@y.test>", "<bob@[192.0.2.1]>", 554, None),
        ("<x@y.test>", "<alice+news@example.test>", 250, None),
        ("<x@y.test>", "<Alice+a+b@example.test>", 250, None),
        ("<x@y.test>", "<postmaster+x@example.test>", 250, None),
        ("<x@y.test>", "<+alice@example.test>", 550, None),
        ("<x@y.test>", "<alice-news@example.test>", 550, None),
    ];
    let fresh = B4Tally::default();
    for (from, to, code, ban) in cases {
        let v = rcpt_to(&d, &cfg, &rp(from), &fp(to), &fresh);
        assert_eq!((v.reply.code, v.ban.as_ref().map(|b| b.reason)), (code, ban), "{from} {to}");
        assert_eq!(is_b4_unknown(&rp(from), &v), code == 550 && from != "<>", "{from} {to}");
    }
    let mut no_abuse = Directory::new([Domain::parse("example.test").unwrap()], false);
    assert_eq!(rcpt_to(&no_abuse, &cfg, &rp("<>"), &fp("<abuse@example.test>"), &fresh).reply.code, 550);
    assert!(no_abuse.add_list("alice@example.test\n").is_empty());
    for (to, want) in [
        ("<Postmaster>", true),
        ("<POSTMASTER@Example.Test>", true),
        ("<abuse@example.test>", true),
        ("<alice@example.test>", false),
        ("<postmaster@elsewhere.test>", false),
    ] {
        assert_eq!(always_accepted(&d, &fp(to)), want, "{to}");
    }
    assert!(!always_accepted(&no_abuse, &fp("<abuse@example.test>")));
}

#[test]
fn b4_threshold() {
    let d = dir();
    let cfg = PolicyConfig { b4_threshold: 3, ..Default::default() };
    let from = rp("<x@y.test>");
    let to = fp("<nobody@example.test>");
    let earlier = |earlier| B4Tally { earlier, ..B4Tally::default() };
    assert!(rcpt_to(&d, &cfg, &from, &to, &earlier(0)).ban.is_none());
    assert!(rcpt_to(&d, &cfg, &from, &to, &earlier(1)).ban.is_none());
    assert!(rcpt_to(&d, &cfg, &from, &to, &earlier(2)).ban.is_some());
    // In one session: the third unknown recipient.
    let session = |session| B4Tally { session, ..B4Tally::default() };
    assert!(rcpt_to(&d, &cfg, &from, &to, &session(1)).ban.is_none());
    let v = rcpt_to(&d, &cfg, &from, &to, &session(2));
    assert_eq!(
        v.ban.map(|b| b.evidence).as_deref(),
        Some("MAIL FROM:<x@y.test> RCPT TO:<nobody@example.test> (unknown recipient 3 of this session, 0 before)")
    );
}

/// E2: probe-shaped sessions are not offences unless repeated within the window; a
/// dictionary attack (a second unknown recipient, or DATA) is banned at once.
#[test]
fn b4_probe_shaped_sessions() {
    let d = dir();
    let cfg = PolicyConfig::default();
    let from = rp("<double-bounce@remote.test>");
    let to = fp("<q8x7z@example.test>");
    let t = |earlier, earlier_probes, session, data| B4Tally {
        earlier,
        earlier_probes,
        session,
        data,
        ..B4Tally::default()
    };
    // First unknown recipient of a clean client: 550, no ban.
    let v = rcpt_to(&d, &cfg, &from, &to, &t(0, 0, 0, false));
    assert_eq!((v.reply.code, v.ban.is_some()), (550, false));
    assert!(t(0, 0, 1, false).is_probe());
    assert_eq!(t(0, 0, 1, false).offences(), 0);
    // A second one in the same session: a dictionary attack, banned at once.
    assert!(rcpt_to(&d, &cfg, &from, &to, &t(0, 0, 1, false)).ban.is_some());
    // The same client did it before within the window: counted at once.
    assert!(rcpt_to(&d, &cfg, &from, &to, &t(0, 1, 0, false)).ban.is_some());
    assert_eq!(t(0, 1, 1, false).offences(), 2);
    // DATA after the deferred recipient: banned, DATA answered 421.
    let v = data_after_unknown(&cfg, &t(0, 0, 1, false), || format!("MAIL FROM:{from} DATA")).expect("a ban");
    assert_eq!((v.rule, v.reply.code, v.ban.map(|b| b.reason)), (Rule::E2, 421, Some(BanReason::UnknownRecipient)));
    // With a higher threshold DATA counts the one recipient, which is not enough.
    let lenient = PolicyConfig { b4_threshold: 2, ..cfg.clone() };
    assert!(data_after_unknown(&lenient, &t(0, 0, 1, false), String::new).is_none());
    // And a repeat under threshold 3: the earlier probe counts once repeated.
    let three = PolicyConfig { b4_threshold: 3, ..cfg };
    assert!(rcpt_to(&d, &three, &from, &to, &t(1, 1, 0, false)).ban.is_some());
    assert!(rcpt_to(&d, &three, &from, &to, &t(0, 1, 0, false)).ban.is_none());
    // No unknown recipient in the session: nothing to decide.
    assert!(b4(&PolicyConfig::default(), &t(5, 5, 0, false), String::new).is_none());
}

#[test]
fn recipient_delimiter() {
    let d = dir();
    let exists = |d: &Directory, s: &str| d.exists(&Mailbox::parse(s).unwrap());
    assert!(exists(&d, "alice+news@example.test"));
    assert!(exists(&d, "abuse+x@example.test"));
    assert!(!exists(&d, "alice+news@elsewhere.test"));
    // Off: the whole local part must match.
    let off = dir().with_recipient_delimiter("");
    assert!(!exists(&off, "alice+news@example.test"));
    assert!(exists(&off, "alice@example.test"));
    // Several delimiters; a user listed with the delimiter in its name matches as is.
    let mut multi = dir().with_recipient_delimiter("+-");
    assert!(exists(&multi, "alice-news@example.test") && exists(&multi, "alice+news@example.test"));
    let domain = Domain::parse("example.test").unwrap();
    multi.add_user("b-c", &domain);
    assert!(exists(&multi, "b-c@example.test"));
    assert!(!exists(&multi, "b-d@example.test"));
    // A forged local sender with an extension is still forged; a real one is not.
    assert!(mail_from(&d, &rp("<alice+x@example.test>")).ban.is_none());
    assert!(mail_from(&d, &rp("<nobody+x@example.test>")).ban.is_some());
}

#[test]
fn c1_verdicts_evidence_and_unknown_window() {
    let cfg = PolicyConfig::default();
    let from = rp("<s@remote.test>");
    let e = || "evidence".to_string();
    let cases = [
        (Verification::Valid { evidence: e() }, 250, None),
        (Verification::AcceptAll { evidence: e() }, 250, None),
        (Verification::Invalid { evidence: e() }, 550, Some(BanReason::FakeSender)),
        (Verification::Undeliverable { evidence: e() }, 550, None),
        (Verification::Unknown { evidence: e() }, 451, None),
    ];
    for (v, code, ban) in cases {
        let verdict = verified(&v, OnUnknown::Tempfail, &cfg, Duration::ZERO, &from);
        assert_eq!((verdict.reply.code, verdict.ban.map(|b| b.reason)), (code, ban), "{v:?}");
        assert_eq!(v.evidence(), "evidence");
    }
    let unknown = Verification::Unknown { evidence: e() };
    let at = |waited: u64| verified(&unknown, OnUnknown::Tempfail, &cfg, Duration::from_secs(waited), &from);
    assert_eq!(at(29 * 60 + 59).reply.code, 451);
    assert_eq!(at(30 * 60).reply.code, 250, "a retry after the window is accepted");
    assert_eq!(verified(&unknown, OnUnknown::Accept, &cfg, Duration::ZERO, &from).reply.code, 250);
    let never = PolicyConfig { unknown_sender_tempfail_max: Duration::ZERO, ..cfg };
    assert_eq!(verified(&unknown, OnUnknown::Tempfail, &never, Duration::ZERO, &from).reply.code, 250);
}

#[test]
fn v1_no_ban_for_bounces_nor_for_abuse_reports() {
    let d = dir();
    let virus = ScanOutcome::Infected { signature: "Eicar-Test-Signature".into() };
    let ban = |from: &str, to: &[&str]| {
        let rcpts: Vec<ForwardPath> = to.iter().map(|t| fp(t)).collect();
        let v = scanned(&d, &virus, OnScanFailure::Tempfail, &rp(from), &rcpts).expect("a verdict");
        assert_eq!((v.rule, v.reply.code), (Rule::V1, 554));
        v.ban.map(|b| b.reason)
    };
    assert_eq!(ban("<s@remote.test>", &["<alice@example.test>"]), Some(BanReason::Virus));
    assert_eq!(ban("<>", &["<alice@example.test>"]), None, "a bounce carrying the virus back");
    assert_eq!(ban("<s@remote.test>", &["<postmaster@example.test>"]), None);
    assert_eq!(ban("<s@remote.test>", &["<Postmaster>"]), None);
    assert_eq!(ban("<s@remote.test>", &["<alice@example.test>", "<abuse+spam@example.test>"]), None);
    assert!(scanned(&d, &ScanOutcome::Clean, OnScanFailure::Tempfail, &rp("<>"), &[]).is_none());
}

#[test]
fn unknown_senders_window_keep_and_capacity() {
    let t0 = Instant::now();
    let net: IpAddr = "192.0.2.1".parse().unwrap();
    let other: IpAddr = "192.0.2.2".parse().unwrap();
    let mut u = UnknownSenders::new(Duration::from_secs(3600), 2);
    assert_eq!(u.waited(t0, net, "a@remote.test"), Duration::ZERO);
    assert_eq!(u.waited(t0 + Duration::from_secs(60), net, "A@Remote.Test"), Duration::from_secs(60));
    assert_eq!(u.waited(t0 + Duration::from_secs(60), other, "a@remote.test"), Duration::ZERO, "per network");
    assert_eq!(u.len(), 2);
    // Full: the oldest goes, and its sender starts again.
    assert_eq!(u.waited(t0 + Duration::from_secs(70), net, "b@remote.test"), Duration::ZERO);
    assert_eq!(u.len(), 2);
    assert_eq!(u.waited(t0 + Duration::from_secs(80), net, "a@remote.test"), Duration::ZERO);
    // Kept for `keep`, then forgotten.
    assert_eq!(u.waited(t0 + Duration::from_secs(3679), net, "a@remote.test"), Duration::from_secs(3599));
    assert_eq!(u.waited(t0 + Duration::from_secs(3680), net, "a@remote.test"), Duration::ZERO);
    assert!(!u.is_empty());
}

#[test]
fn user_list_reports_every_problem() {
    let mut d = dir();
    let errors = d.add_list("# staff\nbob@example.test\n\ncarol\nx@other.test\ndave@example.test # ok\n");
    assert_eq!(errors.len(), 2);
    assert!(matches!(errors[0], DirectoryError::BadAddress { line: 4, .. }));
    assert!(matches!(errors[1], DirectoryError::NotLocal { line: 5, .. }));
    assert!(d.exists(&Mailbox::parse("Dave@example.test").unwrap()));
}

#[test]
fn offence_counter_window_and_capacity() {
    let t0 = Instant::now();
    let a: IpAddr = "192.0.2.1".parse().unwrap();
    let mut c = OffenceCounter::new(Duration::from_secs(3600), 2);
    c.record(t0, a);
    c.record(t0 + Duration::from_secs(10), a);
    assert_eq!(c.count(t0 + Duration::from_secs(20), a), 2);
    // An offence exactly one window old no longer counts (as `expire` drops it): B4 looks at
    // the hour before now, not a second more (a mutant counting it survived before).
    assert_eq!(c.count(t0 + Duration::from_secs(3600), a), 1);
    assert_eq!(c.count(t0 + Duration::from_secs(3605), a), 1);
    c.record(t0 + Duration::from_secs(30), "192.0.2.2".parse().unwrap());
    c.record(t0 + Duration::from_secs(40), "192.0.2.3".parse().unwrap());
    assert_eq!(c.len(), 2);
    assert_eq!(c.count(t0 + Duration::from_secs(50), a), 0);
    c.record(t0 + Duration::from_secs(7300), a);
    assert_eq!(c.len(), 1);
}

#[test]
fn message_counter_fixed_window_and_capacity() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let [a, b, c]: [IpAddr; 3] = ["192.0.2.1", "192.0.2.2", "192.0.2.3"].map(|x| x.parse().unwrap());
    let mut m = MessageCounter::new(s(3600), 2);
    m.add(t0, a, 3);
    m.add(t0 + s(100), a, 2);
    assert_eq!(m.count(t0 + s(3599), a), 5);
    // Fixed, not sliding: the window that began at t0 ends at t0 + 1 h, all of it at once.
    assert_eq!(m.count(t0 + s(3600), a), 0);
    m.add(t0 + s(3600), a, 1);
    assert_eq!(m.count(t0 + s(3700), a), 1);
    m.add(t0 + s(3700), a, 0);
    assert_eq!(m.len(), 1, "adding nothing tracks nothing");
    // Full: the oldest window goes first.
    m.add(t0 + s(3800), b, 1);
    m.add(t0 + s(3900), c, 1);
    assert_eq!(m.len(), 2);
    assert_eq!(m.count(t0 + s(3950), a), 0);
    assert_eq!((m.count(t0 + s(3950), b), m.count(t0 + s(3950), c)), (1, 1));
    // Ended windows are dropped as time passes: nothing grows without bound.
    m.add(t0 + s(9000), a, 1);
    assert_eq!(m.len(), 1);
    assert!(!m.is_empty());
    // Many new keys inside one window: the table stays at its capacity.
    for i in 0..10_000u32 {
        m.add(t0 + s(9001), IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)), 1);
    }
    assert_eq!(m.len(), 2);
    assert!(m.order.len() <= 2 * 2 + 1, "{}", m.order.len());
}

/// B4's share test (docs/design.md §2): a client whose local recipients in the window were
/// mostly valid (unknown share < 50 %, at least 10 seen) is an MTA whose users mistype: 550,
/// no ban. Below 10 recipients, or at half unknown, the threshold rules as before. (Each
/// client here already gave one unknown recipient, so none of these is probe-shaped.)
#[test]
fn b4_share_test_spares_mtas_whose_recipients_are_mostly_valid() {
    let d = dir();
    let cfg = PolicyConfig::default();
    let from = rp("<newsletter@big.test>");
    let to = fp("<alcie@example.test>");
    let t =
        |earlier, earlier_valid, session_valid| B4Tally { earlier, earlier_valid, session_valid, ..B4Tally::default() };
    // 2 unknown with 8 valid (10 seen, 20 %): spared, still 550.
    let v = rcpt_to(&d, &cfg, &from, &to, &t(1, 5, 3));
    assert_eq!((v.reply.code, v.ban.is_some()), (550, false));
    // 2 unknown with 7 valid: 9 seen, too few to judge a share: banned at threshold 1.
    assert!(rcpt_to(&d, &cfg, &from, &to, &t(1, 7, 0)).ban.is_some());
    // 6 unknown with 6 valid: 50 % unknown is not "below 50 %".
    assert!(rcpt_to(&d, &cfg, &from, &to, &t(5, 6, 0)).ban.is_some());
    // 6 unknown with 7 valid: 46 %: spared.
    assert!(rcpt_to(&d, &cfg, &from, &to, &t(5, 7, 0)).ban.is_none());
    // 0 % turns the test off.
    let off = PolicyConfig { b4_unknown_share_max: 0, ..cfg.clone() };
    assert!(rcpt_to(&d, &off, &from, &to, &t(1, 50, 50)).ban.is_some());
    // A dictionary attack that salts itself with a few valid users is still banned.
    assert!(rcpt_to(&d, &cfg, &from, &to, &t(20, 3, 0)).ban.is_some());
}
