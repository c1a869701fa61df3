//! Sessions from whole transcripts: Postfix (smtpd + postscreen + queue), sendmail, and
//! malformed input that must be counted, never fatal.

use super::*;

fn sessions(format: Format, text: &str) -> (Vec<LoggedSession>, LineStats) {
    let mut r = LogReader::new(format, 2026, 0);
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        r.line(l, Loc { file: 0, line: i as u32 + 1 });
        out.extend(std::iter::from_fn(|| r.next_session()));
    }
    r.finish();
    out.extend(std::iter::from_fn(|| r.next_session()));
    (out, r.stats)
}

const POSTFIX: &str = "\
Dec  6 10:00:00 mx postfix/postscreen[10]: CONNECT from [192.0.2.9]:40000 to [198.51.100.1]:25
Dec  6 10:00:00 mx postfix/postscreen[10]: PASS OLD [192.0.2.9]:40000
Dec  6 10:00:00 mx postfix/smtpd[21]: connect from honest.remote.test[192.0.2.9]
Dec  6 10:00:01 mx postfix/smtpd[21]: NOQUEUE: reject: RCPT from honest.remote.test[192.0.2.9]: 550 5.1.1 <carol@example.test>: Recipient address rejected: User unknown in local recipient table; from=<ann@remote.test> to=<carol@example.test> proto=ESMTP helo=<honest.remote.test>
Dec  6 10:00:01 mx postfix/smtpd[21]: 4F2B31C0A1: client=honest.remote.test[192.0.2.9]
Dec  6 10:00:01 mx postfix/cleanup[30]: 4F2B31C0A1: message-id=<1@remote.test>
Dec  6 10:00:01 mx postfix/qmgr[31]: 4F2B31C0A1: from=<ann@remote.test>, size=900, nrcpt=2 (queue active)
Dec  6 10:00:01 mx postfix/smtpd[22]: connect from unknown[203.0.113.5]
Dec  6 10:00:02 mx postfix/local[32]: 4F2B31C0A1: to=<alice@example.test>, relay=local, delay=1, dsn=2.0.0, status=sent (delivered to mailbox)
Dec  6 10:00:02 mx postfix/smtpd[21]: disconnect from honest.remote.test[192.0.2.9] ehlo=1 mail=1 rcpt=2/3 data=1 quit=1 commands=6/7
Dec  6 10:00:02 mx postfix/smtpd[22]: NOQUEUE: reject: MAIL from unknown[203.0.113.5]: 553 5.7.1 <alice@example.test>: Sender address rejected: not logged in; from=<alice@example.test> proto=ESMTP helo=<x>
Dec  6 10:00:03 mx postfix/local[32]: 4F2B31C0A1: to=<bob@example.test>, orig_to=<postmaster@example.test>, relay=local, delay=2, dsn=2.0.0, status=sent (delivered to mailbox)
Dec  6 10:00:03 mx postfix/qmgr[31]: 4F2B31C0A1: removed
Dec  6 10:00:03 mx postfix/smtpd[22]: disconnect from unknown[203.0.113.5] ehlo=1 mail=0/1 quit=1 commands=2/3
Dec  6 10:00:04 mx postfix/postscreen[10]: CONNECT from [203.0.113.77]:5000 to [198.51.100.1]:25
Dec  6 10:00:05 mx postfix/postscreen[10]: NOQUEUE: reject: RCPT from [203.0.113.77]:5000: 550 5.7.1 Service unavailable; client [203.0.113.77] blocked using zen.spamhaus.org; from=<x@spam.test>, to=<alice@example.test>, proto=ESMTP, helo=<spam.test>
Dec  6 10:00:05 mx postfix/postscreen[10]: DISCONNECT [203.0.113.77]:5000
Dec  6 10:00:06 mx dovecot: imap-login: Login: user=<alice>
this is not a log line
";

#[test]
fn postfix_sessions() {
    let (s, stats) = sessions(Format::Postfix, POSTFIX);
    assert_eq!(s.len(), 3, "{s:#?}");
    assert_eq!((stats.lines, stats.unknown), (19, 2));
    let honest = &s[0];
    assert_eq!(honest.client.to_string(), "192.0.2.9");
    assert_eq!(honest.helo.as_deref(), Some("honest.remote.test"));
    assert_eq!(honest.txns.len(), 1, "{honest:#?}");
    let t = &honest.txns[0];
    assert_eq!(t.from.as_deref(), Some("ann@remote.test"));
    assert!(t.queued && t.complete);
    let rcpts: Vec<(&str, u16)> = t.rcpts.iter().map(|r| (&*r.addr, r.code)).collect();
    assert_eq!(rcpts, [("carol@example.test", 550), ("alice@example.test", 250), ("postmaster@example.test", 250)]);
    assert_eq!(honest.commands.map(|c| c.rcpt), Some((2, 3)));
    assert_eq!(honest.lines[0], Loc { file: 0, line: 3 });
    assert_eq!(honest.end_ms - honest.start_ms, 2000);

    let forged = &s[1];
    assert_eq!(forged.client.to_string(), "203.0.113.5");
    assert_eq!(forged.txns[0].refused, Some((event::Stage::Mail, 553)));
    assert_eq!(forged.lines, [Loc { file: 0, line: 8 }, Loc { file: 0, line: 11 }]);

    let screened = &s[2];
    assert_eq!(screened.client.to_string(), "203.0.113.77");
    assert_eq!(screened.txns[0].rcpts[0].code, 550);
    assert_eq!(screened.txns[0].from.as_deref(), Some("x@spam.test"));
}

#[test]
fn sessions_come_out_in_start_order_and_wait_for_deliveries() {
    // Session A starts first, but its message's delivery line comes after B ended.
    let log = "\
Dec  6 10:00:00 mx postfix/smtpd[1]: connect from a[192.0.2.1]
Dec  6 10:00:01 mx postfix/smtpd[1]: 1111111111: client=a[192.0.2.1]
Dec  6 10:00:01 mx postfix/qmgr[3]: 1111111111: from=<a@r.test>, size=1, nrcpt=1 (queue active)
Dec  6 10:00:01 mx postfix/smtpd[1]: disconnect from a[192.0.2.1] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5
Dec  6 10:00:02 mx postfix/smtpd[2]: connect from b[192.0.2.2]
Dec  6 10:00:03 mx postfix/smtpd[2]: disconnect from b[192.0.2.2] ehlo=1 quit=1 commands=2
Dec  6 10:00:20 mx postfix/lmtp[4]: 1111111111: to=<u@example.test>, relay=store[10.0.0.1]:24, dsn=4.4.1, status=deferred (timeout)
";
    let (s, _) = sessions(Format::Auto, log);
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].client.to_string(), "192.0.2.1");
    assert_eq!(s[0].txns[0].rcpts[0].addr.as_ref(), "u@example.test");
    assert!(s[0].start_ms < s[1].start_ms);
}

#[test]
fn sendmail_sessions() {
    let log = "\
Dec  6 10:00:01 mx sm-mta[500]: 0B6A01aB000001: ruleset=check_rcpt, arg1=<nobody@example.test>, relay=spam.test [203.0.113.9], reject=550 5.1.1 <nobody@example.test>... User unknown
Dec  6 10:00:01 mx sm-mta[500]: 0B6A01aB000001: from=<x@spam.test>, size=0, class=0, nrcpts=0, proto=ESMTP, daemon=MTA-v4, relay=spam.test [203.0.113.9]
Dec  6 10:00:05 mx sm-mta[501]: 0B6A01aB000002: from=<ann@remote.test>, size=812, class=0, nrcpts=1, msgid=<x@y>, proto=ESMTP, daemon=MTA-v4, relay=r.remote.test [192.0.2.3]
Dec  6 10:00:06 mx sm-mta[502]: 0B6A01aB000002: to=<alice@example.test>, delay=00:00:01, mailer=local, pri=30, dsn=2.0.0, stat=Sent
";
    let (s, stats) = sessions(Format::Sendmail, log);
    assert_eq!(stats.unknown, 0);
    assert_eq!(s.len(), 2, "{s:#?}");
    assert_eq!(s[0].txns[0].from.as_deref(), Some("x@spam.test"));
    assert_eq!(s[0].txns[0].rcpts[0].code, 550);
    assert!(!s[0].txns[0].queued);
    assert_eq!(s[1].txns[0].accepted().count(), 1);
}

#[test]
fn garbage_is_counted_never_fatal() {
    let mut text = String::new();
    for l in [
        "",
        "\u{0}\u{1}\u{2}",
        "Dec  6 10:00:01 mx postfix/smtpd[1]: connect from [not an address]",
        "Dec  6 10:00:01 mx postfix/smtpd[1]: NOQUEUE: reject: RCPT from",
        "Dec  6 10:00:01 mx postfix/qmgr[1]: ZZ: from=<",
        "Dec 99 10:00:01 mx postfix/smtpd[1]: connect from a[192.0.2.1]",
        "{\"timestamp\": 3}",
        "2026-12-06T10:00:01+01:00 mx postfix/smtpd[1]: disconnect from a[192.0.2.1] ehlo=x",
        "Dec  6 10:00:01 mx sm-mta[1]: 0B6: ruleset=check_rcpt, arg1=<a>, relay=[1.2.3.4]",
    ] {
        text.push_str(l);
        text.push('\n');
    }
    let (s, stats) = sessions(Format::Auto, &text);
    assert_eq!(stats.lines, 9);
    assert!(stats.unknown >= 7, "{stats:?}");
    assert!(s.is_empty(), "{s:?}");
}

/// What the fuzz target `logline` checks, over seeded mutations of real lines (the fuzz target
/// needs nightly; this runs with every `cargo test`).
#[test]
fn mutated_lines_never_panic_and_are_counted_once() {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    let sample = include_str!("../../tests/data/postfix-sample.log");
    let mut base: Vec<&str> = POSTFIX.lines().chain(sample.lines().take(400)).collect();
    base.push("Dec  6 10:00:01 mx sm-mta[500]: 0B6A01aB000001: ruleset=check_rcpt, arg1=<n@example.test>, relay=s.test [203.0.113.9], reject=550 5.1.1 <n@example.test>... User unknown");
    base.push("Dec  6 10:00:05 mx sm-mta[501]: 0B6A01aB000002: from=<a@r.test>, size=812, class=0, nrcpts=1, proto=ESMTP, daemon=MTA-v4, relay=r.test [192.0.2.3]");
    base.push(r#"{"timestamp":"2026-12-06T10:00:01Z","message":"verdict","rule":"E2","code":550,"command":"RCPT","span":{"id":7,"peer":"192.0.2.1:4"}}"#);
    let mut r = SmallRng::seed_from_u64(17);
    for _ in 0..1500 {
        let mut text = String::new();
        for _ in 0..r.random_range(1..40) {
            let mut l: Vec<u8> = base[r.random_range(0..base.len())].as_bytes().to_vec();
            for _ in 0..r.random_range(0..4) {
                let at = r.random_range(0..=l.len());
                match r.random_range(0..4) {
                    0 if at < l.len() => l[at] = r.random(),
                    1 => l.truncate(at),
                    2 => l.insert(at, b"[]<>=:;, /0"[r.random_range(0..11)]),
                    _ => {
                        let tail = l[at..].to_vec();
                        l.extend_from_slice(&tail);
                    }
                }
            }
            text.push_str(&String::from_utf8_lossy(&l));
            text.push('\n');
        }
        for format in [Format::Auto, Format::Postfix, Format::Sendmail, Format::Gatekeeper] {
            let mut rd = LogReader::new(format, 2026, 0);
            let mut sessions = 0u64;
            let mut n = 0u32;
            for line in text.split('\n') {
                n += 1;
                rd.line(line, Loc { file: 0, line: n });
                while let Some(s) = rd.next_session() {
                    assert!(s.end_ms >= s.start_ms && s.lines.len() <= assemble::LINES_KEPT, "{s:?}");
                    sessions += 1;
                }
            }
            rd.finish();
            sessions += std::iter::from_fn(|| rd.next_session()).count() as u64;
            let st = rd.stats;
            assert_eq!((st.used + st.ignored + st.unknown, st.lines), (u64::from(n), u64::from(n)));
            assert!(sessions <= st.used);
            assert_eq!(rd.asm.held(), 0);
        }
    }
}
