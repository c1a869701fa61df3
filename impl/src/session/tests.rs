//! Scripted dialogues (mailin style): feed lines, collect the replies, actions and events, and
//! check every rule of docs/design.md §2 and every limit of the session. Each test fails if the
//! rule or limit it names is broken.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::policy::{BanReason, OnScanFailure, OnUnknown, PolicyConfig, Rule, ScanOutcome, Verification};
use crate::proto::Reply;
use crate::testing::{
    Answers, CLIENT, Driver, HOSTNAME, SESSION_ID, client, codes, directory, session_config, t0, wire,
};

/// What an action was, in a form tests can compare.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Act {
    Ban(BanReason, String),
    Verify(String),
    Scan(Vec<u8>),
    Deliver { from: String, rcpts: Vec<String>, helo: String, message: Vec<u8> },
    StartTls,
    Close,
}

/// The action as tests compare it (`None`: the message file's bookkeeping, checked on its
/// own); `contents` gives the message of each scan and handoff in turn.
fn act(a: Action, contents: &mut impl Iterator<Item = Vec<u8>>) -> Option<Act> {
    Some(match a {
        Action::Ban { addr, session, request } => {
            assert_eq!(addr, CLIENT, "ban names the client");
            assert_eq!(session, SESSION_ID, "ban names the session");
            Act::Ban(request.reason, request.evidence)
        }
        Action::Verify { sender } => Act::Verify(sender.to_string()),
        Action::Scan => Act::Scan(contents.next().expect("a content per scan")),
        Action::Deliver { envelope } => {
            assert_eq!(envelope.session, SESSION_ID);
            assert_eq!(envelope.client, CLIENT);
            Act::Deliver {
                from: envelope.from.to_string(),
                rcpts: envelope.rcpts.iter().map(ToString::to_string).collect(),
                helo: envelope.helo,
                message: contents.next().expect("a content per handoff"),
            }
        }
        Action::StartTls => Act::StartTls,
        Action::Close => Act::Close,
        Action::Receive { .. } | Action::Append { .. } | Action::Discard => return None,
    })
}

/// One session of the standard site, driven by the test kit; nothing is answered for it: each
/// test answers callbacks, scans and handoffs itself, when it wants to.
type T = Driver;

/// A session greeted with 220, with `unknown_before` unknown recipients already against the client.
fn open_with(cfg: SessionConfig, unknown_before: u32) -> T {
    let mut t = Driver::standard(cfg, unknown_before, Answers::held());
    let greeting = t.replies();
    assert_eq!(codes(&greeting), [220]);
    t
}

/// A session of the standard configuration, greeted.
fn open() -> T {
    open_with(session_config(), 0)
}

/// A session greeted with 220 for `client` (history, exemption) with `cfg`.
fn open_client(cfg: SessionConfig, client: ClientInfo) -> T {
    let session = Session::new(t0(), Arc::new(cfg), directory(), client);
    let mut t = Driver::new(session, t0(), Answers::held());
    assert_eq!(codes(&t.replies()), [220]);
    t
}

/// A session past EHLO.
fn ehlo(cfg: SessionConfig) -> T {
    let mut t = open_with(cfg, 0);
    assert_eq!(t.codes("EHLO client.example.org\r\n"), [250]);
    t
}

/// A session the gate refused.
fn refused(why: Refusal) -> T {
    let s = Session::refused(t0(), Arc::new(session_config()), directory(), client(0), why);
    Driver::new(s, t0(), Answers::held())
}

/// The actions in comparable form, and the bans among them.
trait Acts {
    fn acts(&mut self) -> Vec<Act>;
    fn bans(&mut self) -> Vec<BanReason>;
}

impl Acts for Driver {
    fn acts(&mut self) -> Vec<Act> {
        let actions = self.actions();
        let mut contents = self.contents().into_iter();
        actions.into_iter().filter_map(|a| act(a, &mut contents)).collect()
    }

    fn bans(&mut self) -> Vec<BanReason> {
        self.acts()
            .into_iter()
            .filter_map(|a| match a {
                Act::Ban(r, _) => Some(r),
                _ => None,
            })
            .collect()
    }
}

fn enhanced(r: &Reply) -> String {
    r.enhanced.map(|e| e.to_string()).unwrap_or_default()
}

fn text(r: &Reply) -> String {
    r.lines.join("\n")
}

fn rules(events: &[Event]) -> Vec<(Rule, u16, Option<BanReason>)> {
    events.iter().map(|e| (e.rule, e.code, e.ban)).collect()
}

// ---------------------------------------------------------------------------------------------
// Greeting, EHLO, HELO, enhanced status codes

#[test]
fn greeting_is_220_with_our_name() {
    let mut s = Session::new(t0(), Arc::new(session_config()), directory(), client(0));
    let r = s.poll_reply().unwrap();
    assert_eq!(r.to_wire(), format!("220 {HOSTNAME} ESMTP Gatekeeper\r\n"));
    assert!(s.poll_reply().is_none());
    assert!(s.poll_action().is_none());
    assert!(s.wants_input());
}

#[test]
fn ehlo_advertises_pipelining_size_8bitmime_enhancedstatuscodes() {
    let mut cfg = session_config();
    cfg.size_max = 1234;
    let mut t = open_with(cfg, 0);
    let r = t.send("EHLO client.example.org\r\n");
    assert_eq!(r.len(), 1);
    assert_eq!(
        r[0].to_wire(),
        format!(
            "250-{HOSTNAME} greets client.example.org\r\n250-PIPELINING\r\n250-SIZE 1234\r\n250-8BITMIME\r\n\
             250 ENHANCEDSTATUSCODES\r\n"
        )
    );
    assert_eq!(t.codes("MAIL FROM:<>\r\n"), [250]);
}

#[test]
fn helo_is_accepted_and_opens_the_session() {
    let mut t = open();
    let r = t.send("HELO client.example.org\r\n");
    assert_eq!(codes(&r), [250]);
    assert!(!text(&r[0]).contains("PIPELINING"), "HELO lists no extensions");
    assert_eq!(t.codes("MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nhi\r\n.\r\n"), [250, 250, 354]);
    match t.acts().as_slice() {
        [Act::Deliver { helo, .. }] => assert_eq!(helo, "client.example.org"),
        other => panic!("{other:?}"),
    }
}

/// RFC 2034 §3: once ENHANCEDSTATUSCODES is advertised every reply but the greeting and the
/// EHLO/HELO reply carries one, whose class is the reply's first digit. The 354 intermediate
/// reply is left bare as Postfix, Exim and Gmail do (see the report to the lead).
#[test]
fn enhanced_status_code_on_every_other_reply() {
    let mut cfg = session_config();
    cfg.errors_max = 100;
    // Exempt from bans, so the forged sender's 550 does not end the session.
    let mut t = open_client(cfg, ClientInfo { exempt: true, ..client(0) });
    let script = "MAIL FROM:<>\r\nEHLO c.example.org\r\nHELO c.example.org\r\nEHLO c.example.org\r\nNOOP\r\nVRFY alice\r\n\
                  HELP\r\nEXPN x\r\nSTARTTLS\r\nFOO\r\nEHLO\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n\
                  MAIL FROM:<foo>\r\nMAIL FROM:<a@b.test> X=1\r\nMAIL FROM:<a@b.test> SIZE=999999999999\r\n\
                  MAIL FROM:<nobody@example.test>\r\nMAIL FROM:<x@elsewhere.test>\r\nMAIL FROM:<>\r\n\
                  RCPT TO:<bob>\r\nRCPT TO:<bob@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\n\
                  RCPT TO:<alice@example.test>\r\nDATA\r\nhello\r\n.\r\n";
    let mut replies = t.send(script);
    t.acts();
    t.session.handle_delivered(t.now, Err(DeliveryError::Temporary("disk full".into())));
    replies.extend(t.replies());
    replies.extend(t.send(&format!("{}\r\n", "X".repeat(600))));
    replies.extend(t.send("RSET\r\nQUIT\r\n"));
    assert!(replies.len() > 25, "{replies:?}");
    let mut seen = std::collections::BTreeSet::new();
    for r in &replies {
        seen.insert(r.code);
        let bare = r.code == 354 || (r.code == 250 && r.enhanced.is_none() && text(r).starts_with(HOSTNAME));
        if bare {
            continue;
        }
        let e = r.enhanced.unwrap_or_else(|| panic!("no enhanced code: {r}"));
        assert_eq!(u16::from(e.0), r.code / 100, "class matches: {r}");
        let wire = r.to_wire();
        assert!(wire.starts_with(&format!("{} {e} ", r.code)), "{wire:?}");
    }
    for code in [221, 214, 250, 252, 354, 451, 500, 501, 502, 503, 550, 552, 553, 554, 555] {
        assert!(seen.contains(&code), "script covers {code}: {seen:?}");
    }
    // The timeout reply and the refusals carry one too.
    let mut t = open();
    t.session.handle_timeout(t.at(300));
    assert_eq!(enhanced(&t.replies()[0]), "4.4.2");
    for why in [Refusal::Banned, Refusal::RateLimited, Refusal::Busy] {
        let mut t = refused(why);
        assert!(t.replies().iter().all(|r| r.enhanced.is_some()), "{why:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// E1: MAIL FROM

#[test]
fn e1_sender_without_domain_553_no_ban() {
    let mut t = ehlo(session_config());
    let r = t.send("MAIL FROM:<foo>\r\n");
    assert_eq!((r[0].code, enhanced(&r[0])), (553, "5.1.7".into()));
    assert!(t.acts().is_empty());
    assert_eq!(rules(&t.events()), [(Rule::E1, 553, None)]);
    // The transaction did not start.
    assert_eq!(t.codes("RCPT TO:<alice@example.test>\r\n"), [503]);
}

#[test]
fn e1_malformed_sender_5xx_no_ban() {
    let long = format!("MAIL FROM:<{}@example.test>\r\n", "a".repeat(65));
    for line in [
        "MAIL FROM:nobody@example.test\r\n",
        "MAIL FROM:<a b@example.test>\r\n",
        "MAIL FROM:<.x@example.test>\r\n",
        "MAIL FROM:<x@-bad.test>\r\n",
        "MAIL FROM:<x@[300.1.1.1]>\r\n",
        "MAIL FROM:<@bad route:x@y.test>\r\n",
        &long,
    ] {
        let mut t = ehlo(session_config());
        let r = t.send(line);
        assert_eq!(r.len(), 1, "{line}");
        assert!(r[0].is_permanent(), "{line}: {}", r[0]);
        assert!(t.acts().is_empty(), "{line}: no ban");
        assert!(t.events().iter().all(|e| e.ban.is_none()));
    }
}

#[test]
fn e1_null_sender_accepted() {
    let mut t = ehlo(session_config());
    let r = t.send("MAIL FROM:<>\r\n");
    assert_eq!((r[0].code, enhanced(&r[0])), (250, "2.1.0".into()));
    assert!(t.acts().is_empty());
    assert_eq!(rules(&t.events()), [(Rule::E1, 250, None)]);
}

#[test]
fn e1_forged_local_sender_550_and_exactly_one_ban_before_the_reply() {
    let mut t = ehlo(session_config());
    t.session.handle_input(t.now, b"MAIL FROM:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\n");
    // Driver contract: the ban is there to be recorded when the reply is there to be written.
    let actions = t.acts();
    let replies = t.replies();
    // A ban ends the session that earned it: 421 after the reply, and the pipelined RCPT is
    // never answered.
    assert_eq!(codes(&replies), [550, 421]);
    assert_eq!(enhanced(&replies[0]), "5.7.1");
    assert_eq!(enhanced(&replies[1]), "4.7.0");
    assert_eq!(actions, [Act::Ban(BanReason::ForgedLocalSender, "MAIL FROM:<nobody@example.test>".into()), Act::Close]);
    let events = t.events();
    assert_eq!(rules(&events), [(Rule::E1, 550, Some(BanReason::ForgedLocalSender))]);
    assert_eq!(events[0].command, "MAIL");
    assert!(events[0].detail.contains("MAIL FROM:<nobody@example.test>"));
    assert_eq!(events[0].verdict(), "reject");
    assert!(t.session.is_closed());
    assert!(t.send("RSET\r\nMAIL FROM:<>\r\n").is_empty());
    assert!(t.acts().is_empty());
}

/// An allowlisted client (or a trusted proxy) gets the same replies but no ban, and its
/// session goes on.
#[test]
fn exempt_clients_get_the_verdicts_but_no_ban() {
    let mut t = open_client(session_config(), ClientInfo { exempt: true, ..client(0) });
    let r = t.send(
        "EHLO c\r\nMAIL FROM:<nobody@example.test>\r\nMAIL FROM:<x@elsewhere.test>\r\n\
         RCPT TO:<n1@example.test>\r\nRCPT TO:<n2@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
    );
    assert_eq!(codes(&r), [250, 550, 250, 550, 550, 250, 354]);
    assert!(t.acts().is_empty());
    let events = t.events();
    assert!(events.iter().all(|e| e.ban.is_none()), "{events:?}");
    assert!(events[0].detail.starts_with("not banned (B1 exempt"), "{}", events[0].detail);
}

#[test]
fn e1_existing_local_sender_accepted() {
    for from in ["<alice@example.test>", "<BOB@Example.Test>", "<postmaster@example.test>", "<abuse@example.test>"] {
        let mut t = ehlo(session_config());
        assert_eq!(t.codes(&format!("MAIL FROM:{from}\r\n")), [250], "{from}");
        assert!(t.acts().is_empty(), "{from}");
    }
}

#[test]
fn e1_external_sender_accepted() {
    for from in ["<someone@elsewhere.test>", "<x@[192.0.2.1]>", "<\"john doe\"@elsewhere.test>"] {
        let mut t = ehlo(session_config());
        assert_eq!(t.codes(&format!("MAIL FROM:{from}\r\n")), [250], "{from}");
        assert!(t.acts().is_empty(), "{from}");
    }
}

// ---------------------------------------------------------------------------------------------
// E2: RCPT TO

#[test]
fn e2_relay_denied_554_no_ban() {
    for to in ["<bob@elsewhere.test>", "<bob@[192.0.2.1]>", "<bob@sub.example.test>"] {
        let mut t = ehlo(session_config());
        let r = t.send(&format!("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:{to}\r\n"));
        assert_eq!(codes(&r), [250, 554], "{to}");
        assert_eq!(enhanced(&r[1]), "5.7.1");
        assert!(t.acts().is_empty(), "{to}: no ban");
        assert_eq!(rules(&t.events())[1], (Rule::E2, 554, None));
    }
}

#[test]
fn e2_malformed_recipient_553_no_ban() {
    let mut t = ehlo(session_config());
    let r = t.send("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<bob>\r\nRCPT TO:bob@example.test\r\n");
    assert_eq!(codes(&r), [250, 553, 553]);
    assert_eq!(enhanced(&r[1]), "5.1.3");
    assert!(t.acts().is_empty());
}

#[test]
fn e2_postmaster_and_abuse_always_accepted() {
    let senders = ["<>", "<x@elsewhere.test>", "<alice@example.test>", "<spam@[192.0.2.66]>"];
    let rcpts = [
        "<Postmaster>",
        "<POSTMASTER>",
        "<postmaster@example.test>",
        "<PostMaster@EXAMPLE.test>",
        "<abuse@example.test>",
    ];
    for from in senders {
        for to in rcpts {
            let mut t = ehlo(session_config());
            assert_eq!(t.codes(&format!("MAIL FROM:{from}\r\nRCPT TO:{to}\r\n")), [250, 250], "{from} {to}");
            assert!(t.acts().is_empty(), "{from} {to}");
        }
    }
}

/// Postmaster and abuse are accepted even while C1 is on and the sender turns out fake: the
/// callback neither delays nor refuses them (RFC 5321 §4.5.1).
#[test]
fn e2_postmaster_accepted_even_from_a_fake_sender_under_c1() {
    let mut t = ehlo(SessionConfig { verify_senders: true, ..session_config() });
    let r = t.send("MAIL FROM:<fake@elsewhere.test>\r\nRCPT TO:<Postmaster>\r\nRCPT TO:<abuse@example.test>\r\n");
    assert_eq!(codes(&r), [250, 250, 250], "no callback held them back");
    assert!(t.acts().is_empty(), "no callback for postmaster");
    assert_eq!(t.codes("RCPT TO:<alice@example.test>\r\n"), Vec::<u16>::new());
    assert_eq!(t.acts(), [Act::Verify("fake@elsewhere.test".into())]);
    // An undeliverable sender domain: 550 without a ban, so the session goes on.
    t.session.handle_verified(t.now, Verification::Undeliverable { evidence: "NXDOMAIN".into() }, Duration::ZERO);
    assert_eq!(codes(&t.replies()), [550]);
    assert!(t.bans().is_empty());
    // Still accepted after the sender failed, and the message goes to the role addresses only.
    assert_eq!(t.codes("RCPT TO:<postmaster@example.test>\r\nDATA\r\nhi\r\n.\r\n"), [250, 354]);
    match t.acts().as_slice() {
        [Act::Deliver { rcpts, .. }] => {
            assert_eq!(rcpts, &["<Postmaster>", "<abuse@example.test>", "<postmaster@example.test>"]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn e2_null_sender_to_unknown_550_no_ban() {
    let mut t = ehlo(session_config());
    let r = t.send("MAIL FROM:<>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<random123@example.test>\r\n");
    assert_eq!(codes(&r), [250, 550, 550]);
    assert_eq!(enhanced(&r[1]), "5.1.1");
    assert!(t.acts().is_empty(), "no ban for <> to unknown users");
    assert_eq!(t.session.unknown_rcpts(), 0, "<> does not count towards B4");
}

/// E2: a session with one unknown recipient that ends without DATA is probe-shaped (Postfix
/// verifies with `MAIL FROM:<double-bounce@…>`): 550 at once, but no ban.
#[test]
fn e2_probe_shaped_session_550_and_no_ban() {
    let mut t = ehlo(session_config());
    let r = t.send("MAIL FROM:<double-bounce@remote.test>\r\nRCPT TO:<q8x7z@example.test>\r\nQUIT\r\n");
    assert_eq!(codes(&r), [250, 550, 221]);
    assert_eq!(enhanced(&r[1]), "5.1.1");
    assert_eq!(t.acts(), [Act::Close]);
    assert_eq!(rules(&t.events())[1], (Rule::E2, 550, None));
    assert_eq!(t.session.unknown_rcpts(), 1);
    assert!(t.session.b4_tally().is_probe(), "the driver remembers it as a probe");
    // The same without QUIT: the client just goes away.
    let mut t = ehlo(session_config());
    t.send("MAIL FROM:<double-bounce@remote.test>\r\nRCPT TO:<q8x7z@example.test>\r\n");
    t.session.handle_eof(t.now);
    assert_eq!(t.acts(), [Act::Close]);
    assert!(t.session.b4_tally().is_probe());
}

/// E2: the second unknown recipient of a session is a dictionary attack: banned at once, and
/// the ban ends the session.
#[test]
fn e2_second_unknown_recipient_550_b4_ban_and_421() {
    let mut t = ehlo(session_config());
    let r = t.send(
        "MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<n2@example.test>\r\n\
         RCPT TO:<alice@example.test>\r\nDATA\r\n",
    );
    assert_eq!(codes(&r), [250, 550, 550, 421], "nothing after the ban is answered");
    assert_eq!(
        t.acts(),
        [
            Act::Ban(
                BanReason::UnknownRecipient,
                "MAIL FROM:<x@elsewhere.test> RCPT TO:<n2@example.test> (unknown recipient 2 of this session, 0 before)"
                    .into()
            ),
            Act::Close
        ]
    );
    assert_eq!(rules(&t.events())[1..], [(Rule::E2, 550, None), (Rule::E2, 550, Some(BanReason::UnknownRecipient))]);
    assert!(!t.session.b4_tally().is_probe());
    assert_eq!(t.session.unknown_rcpts(), 2);
}

/// E2: Postfix RSETs after a refused recipient and carries on with its next message in the
/// same connection: DATA in that later transaction is no attack, the session stays
/// probe-shaped (issue 16, found by the simulation's `after_5xx = "rset"` MTAs).
#[test]
fn e2_rset_and_a_new_transaction_after_an_unknown_recipient_is_no_attack() {
    let mut t = ehlo(session_config());
    let r = t.send(
        "MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\nRSET\r\n\
         MAIL FROM:<y@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
    );
    assert_eq!(codes(&r), [250, 550, 250, 250, 250, 354]);
    assert!(t.bans().is_empty(), "no ban");
    assert!(t.session.b4_tally().is_probe(), "still one unknown recipient, remembered as a probe");
    // A second unknown recipient, in any transaction, is still an attack.
    let mut t = ehlo(session_config());
    let r = t.send(
        "MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\nRSET\r\n\
         MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<n2@example.test>\r\n",
    );
    assert_eq!(codes(&r), [250, 550, 250, 250, 550, 421]);
    assert_eq!(t.bans(), [BanReason::UnknownRecipient]);
}

/// E2: a client that was probe-shaped before within the B4 window is banned at its next
/// unknown recipient.
#[test]
fn e2_repeated_probe_is_banned() {
    let mut t = open_client(session_config(), ClientInfo { probes_before: 1, ..client(0) });
    let r = t.send("EHLO c\r\nMAIL FROM:<double-bounce@remote.test>\r\nRCPT TO:<q8x7z@example.test>\r\n");
    assert_eq!(codes(&r), [250, 250, 550, 421]);
    assert_eq!(t.bans(), [BanReason::UnknownRecipient]);
}

/// E2: DATA after an unknown recipient is an attack, not a probe: banned, DATA answered 421,
/// no message taken. Also after RSET, and without valid recipients.
#[test]
fn e2_data_after_an_unknown_recipient_421_and_b4_ban() {
    for script in [
        "MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
        "MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n",
        "MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\nRSET\r\nDATA\r\n",
    ] {
        let mut t = ehlo(session_config());
        let r = t.send(script);
        assert_eq!(r.last().map(|r| (r.code, enhanced(r))), Some((421, "4.7.0".into())), "{script}");
        assert!(!codes(&r).contains(&354), "{script}");
        match t.acts().as_slice() {
            [Act::Ban(BanReason::UnknownRecipient, evidence), Act::Close] => {
                assert!(evidence.ends_with("DATA after an unknown recipient"), "{evidence}");
            }
            other => panic!("{script}: {other:?}"),
        }
        assert_eq!(t.events().last().map(|e| (e.rule, e.command, e.code)), Some((Rule::E2, "DATA", 421)));
    }
    // A threshold above 1: DATA counts the recipient, which is not yet enough.
    let policy = PolicyConfig { b4_threshold: 2, ..PolicyConfig::default() };
    let mut t = ehlo(SessionConfig { policy, ..session_config() });
    let r = t.send(
        "MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n",
    );
    assert_eq!(codes(&r), [250, 550, 250, 354]);
    assert!(t.acts().is_empty());
    assert!(!t.session.b4_tally().is_probe(), "counted as an offence, not a probe");
}

#[test]
fn e2_b4_threshold_counts_this_and_previous_sessions() {
    let policy = PolicyConfig { b4_threshold: 3, ..PolicyConfig::default() };
    let cfg = SessionConfig { policy, ..session_config() };
    // Fresh client: the third unknown recipient bans, not before.
    let mut t = open_with(cfg.clone(), 0);
    t.send("EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\n");
    for (i, banned) in [(1, false), (2, false), (3, true)] {
        assert_eq!(t.codes("RCPT TO:<nobody@example.test>\r\n")[0], 550, "{i}");
        assert_eq!(!t.bans().is_empty(), banned, "unknown recipient #{i}");
    }
    // Null-sender unknowns do not count.
    let mut t = open_with(cfg.clone(), 0);
    t.send("EHLO c\r\nMAIL FROM:<>\r\n");
    t.send("RCPT TO:<n1@example.test>\r\nRCPT TO:<n2@example.test>\r\nRCPT TO:<n3@example.test>\r\nRSET\r\n");
    t.send("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<n4@example.test>\r\n");
    assert!(t.bans().is_empty());
    // Two before this session: the first one here is the third.
    let mut t = open_with(cfg.clone(), 2);
    assert_eq!(
        t.codes("EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\n"),
        [250, 250, 550, 421]
    );
    assert_eq!(t.bans(), [BanReason::UnknownRecipient]);
    // One before: the second here.
    let mut t = open_with(cfg, 1);
    t.send("EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<n1@example.test>\r\n");
    assert!(t.bans().is_empty());
    t.send("RCPT TO:<n2@example.test>\r\n");
    assert_eq!(t.bans(), [BanReason::UnknownRecipient]);
}

#[test]
fn e2_known_recipients_accepted_case_insensitively() {
    let mut t = ehlo(session_config());
    let r = t.send("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<BOB@EXAMPLE.TEST>\r\n");
    assert_eq!(codes(&r), [250, 250, 250]);
    assert_eq!(enhanced(&r[1]), "2.1.5");
    assert_eq!(rules(&t.events())[1..], [(Rule::E2, 250, None), (Rule::E2, 250, None)]);
}

// ---------------------------------------------------------------------------------------------
// R1: another server's callback

#[test]
fn r1_callbacks_answered_correctly_and_never_banned() {
    // Strictest B4 setting: it must still not touch `<>`.
    let mut t = open_with(session_config(), 5);
    let r = t.send("EHLO prober.example.org\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nQUIT\r\n");
    assert_eq!(codes(&r), [250, 250, 250, 221]);
    assert_eq!(t.acts(), [Act::Close]);
    let mut t = open_with(session_config(), 5);
    let r = t.send(
        "EHLO prober.example.org\r\nMAIL FROM:<>\r\nRCPT TO:<q8x7z@example.test>\r\nRSET\r\nMAIL FROM:<>\r\n\
         RCPT TO:<nobody@example.test>\r\nQUIT\r\n",
    );
    assert_eq!(codes(&r), [250, 250, 550, 250, 250, 550, 221]);
    assert_eq!(t.acts(), [Act::Close], "no ban");
    assert!(t.events().iter().all(|e| e.ban.is_none()));
}

// ---------------------------------------------------------------------------------------------
// Sequence and syntax (RFC 5321 §4.1, §4.3.2)

#[test]
fn seq_mail_before_ehlo_503() {
    let mut t = open();
    let r = t.send("MAIL FROM:<>\r\nMAIL FROM:<foo>\r\n");
    assert_eq!(codes(&r), [503, 503], "sequence errors come before argument errors");
    assert_eq!(enhanced(&r[0]), "5.5.1");
    assert!(t.acts().is_empty() && t.events().is_empty());
}

#[test]
fn seq_rcpt_before_mail_503() {
    let mut t = ehlo(session_config());
    assert_eq!(t.codes("RCPT TO:<alice@example.test>\r\nRCPT TO:<bob>\r\n"), [503, 503]);
    let mut t = open();
    assert_eq!(t.codes("RCPT TO:<alice@example.test>\r\n"), [503]);
}

#[test]
fn seq_data_before_mail_503_and_without_valid_recipients_554() {
    let mut t = ehlo(session_config());
    assert_eq!(t.codes("DATA\r\n"), [503]);
    let r = t.send("MAIL FROM:<>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\nSubject: x\r\n");
    assert_eq!(codes(&r), [250, 550, 554, 500], "refused DATA: the body is read as commands");
    assert_eq!(enhanced(&r[2]), "5.5.1");
    assert!(t.acts().is_empty(), "nothing delivered");
}

#[test]
fn seq_nested_mail_503() {
    let mut t = ehlo(session_config());
    let r = t.send("MAIL FROM:<>\r\nMAIL FROM:<alice@example.test>\r\nMAIL FROM:<foo>\r\n");
    assert_eq!(codes(&r), [250, 503, 503]);
}

#[test]
fn seq_rset_ends_the_transaction() {
    let mut t = ehlo(session_config());
    let r = t.send("MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nRSET\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n");
    assert_eq!(codes(&r), [250, 250, 250, 503, 503]);
    assert_eq!(enhanced(&r[2]), "2.0.0");
    // A new transaction can start, and RSET before EHLO does not open the session.
    assert_eq!(t.codes("MAIL FROM:<>\r\n"), [250]);
    let mut t = open();
    assert_eq!(t.codes("RSET\r\nMAIL FROM:<>\r\n"), [250, 503]);
}

#[test]
fn seq_ehlo_again_resets_the_transaction() {
    let mut t = ehlo(session_config());
    let r = t.send("MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nEHLO again\r\nDATA\r\nMAIL FROM:<>\r\n");
    assert_eq!(codes(&r), [250, 250, 250, 503, 250]);
}

#[test]
fn seq_noop_vrfy_help() {
    let mut t = open();
    let r = t.send("NOOP\r\nNOOP anything\r\nVRFY alice\r\nHELP\r\nHELP MAIL\r\n");
    assert_eq!(codes(&r), [250, 250, 252, 214, 214]);
    assert_eq!(enhanced(&r[2]), "2.5.2");
    assert!(!text(&r[2]).contains("alice"), "VRFY discloses nothing");
    // They are harmless inside a transaction too.
    let mut t = ehlo(session_config());
    assert_eq!(
        t.codes("MAIL FROM:<>\r\nNOOP\r\nVRFY x\r\nHELP\r\nRCPT TO:<alice@example.test>\r\n"),
        [250, 250, 252, 214, 250]
    );
}

#[test]
fn seq_not_implemented_502() {
    let mut t = ehlo(session_config());
    let r = t.send("EXPN staff\r\nSTARTTLS\r\nAUTH PLAIN\r\nBDAT 10\r\nTURN\r\n");
    assert_eq!(codes(&r), [502; 5]);
    assert_eq!(enhanced(&r[0]), "5.5.1");
}

#[test]
fn seq_unknown_command_500() {
    let mut t = ehlo(session_config());
    let r = t.send("FOO\r\n\r\nMAILFROM:<>\r\n");
    assert_eq!(codes(&r), [500, 500, 500]);
    assert_eq!(enhanced(&r[0]), "5.5.1");
    let r = t.send(b"HELO \xff\xfe\r\n");
    assert_eq!((r[0].code, enhanced(&r[0])), (500, "5.5.2".into()));
}

#[test]
fn seq_syntax_error_501() {
    let mut t = ehlo(session_config());
    let r = t.send("EHLO\r\nHELO a b\r\nMAIL TO:<>\r\nMAIL FROM:<>SIZE=1\r\nVRFY\r\nDATA now\r\nQUIT now\r\n");
    assert_eq!(codes(&r), [501; 7]);
    assert_eq!(enhanced(&r[0]), "5.5.4");
    assert!(!t.session.is_closed(), "QUIT with arguments is not QUIT");
}

#[test]
fn seq_bad_mail_parameter_555() {
    let mut t = ehlo(session_config());
    let r = t.send("MAIL FROM:<> SMTPUTF8\r\nMAIL FROM:<> SIZE=big\r\nMAIL FROM:<> BODY=BINARYMIME\r\n");
    assert_eq!(codes(&r), [555, 555, 555]);
    assert_eq!(enhanced(&r[0]), "5.5.4");
    let r = t.send("MAIL FROM:<> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<alice@example.test> NOTIFY=NEVER\r\n");
    assert_eq!(codes(&r), [250, 555]);
}

#[test]
fn seq_size_over_max_at_mail_552() {
    let cfg = SessionConfig { size_max: 1000, ..session_config() };
    let mut t = ehlo(cfg);
    let r = t.send("MAIL FROM:<> SIZE=1001\r\nRCPT TO:<alice@example.test>\r\nMAIL FROM:<> SIZE=1000\r\n");
    assert_eq!(codes(&r), [552, 503, 250]);
    assert_eq!(enhanced(&r[0]), "5.3.4");
    assert_eq!(rules(&t.events())[0], (Rule::Proto, 552, None));
}

#[test]
fn seq_quit_221_and_close() {
    let mut t = ehlo(session_config());
    let r = t.send("QUIT\r\nNOOP\r\n");
    assert_eq!(codes(&r), [221], "nothing after QUIT is answered");
    assert_eq!(enhanced(&r[0]), "2.0.0");
    assert_eq!(t.acts(), [Act::Close]);
    assert!(t.session.is_closed() && !t.session.wants_input());
    assert_eq!(t.session.poll_timeout(), None);
    assert!(t.send("NOOP\r\n").is_empty());
}

/// RFC 5321 §4.5.3.1.5 and §4.2: what the client says is echoed within 512-octet reply lines
/// of printable text.
#[test]
fn replies_echo_client_text_safely() {
    let mut t = open();
    let long = "h".repeat(505);
    let mut replies = t.send(&format!("EHLO {long}\r\n"));
    replies.extend(t.send(b"EHLO a\rb\x01\xc3\xa9\r\n"));
    replies.extend(t.send(&format!("MAIL FROM:<> X={}\r\n", "p".repeat(480))));
    replies.extend(t.send("MAIL FROM:<> X=a\rb\r\n"));
    assert_eq!(codes(&replies), [250, 250, 555, 555]);
    for r in &replies {
        for line in r.to_wire().split_terminator("\r\n") {
            assert!(line.len() + 2 <= 512, "{} octets", line.len() + 2);
            assert!(line.bytes().all(|b| (32..=126).contains(&b)), "{line:?}");
        }
    }
    assert!(text(&replies[0]).contains(&"h".repeat(64)));
    assert!(text(&replies[1]).contains("greets a?b??"), "{}", replies[1]);
}

#[test]
fn seq_bare_lf_command_lines_are_tolerated() {
    let mut t = open();
    assert_eq!(t.codes("EHLO c\nMAIL FROM:<>\nNOOP\r\n"), [250, 250, 250]);
}

// ---------------------------------------------------------------------------------------------
// DATA

/// A session that has reached 354 from `<x@elsewhere.test>` to alice and bob.
fn in_data(cfg: SessionConfig) -> T {
    let mut t = ehlo(cfg);
    let r = t.send("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<Postmaster>\r\nDATA\r\n");
    assert_eq!(codes(&r), [250, 250, 250, 354]);
    assert!(!t.session.is_closed());
    t
}

#[test]
fn data_354_unstuffs_and_delivers_with_the_envelope() {
    let mut t = in_data(session_config());
    let r = t.send("Subject: hi\r\n\r\n..leading dot\r\n.\r\n");
    assert!(r.is_empty(), "no reply before the handoff: {r:?}");
    assert_eq!(
        t.acts(),
        [Act::Deliver {
            from: "<x@elsewhere.test>".into(),
            rcpts: vec!["<alice@example.test>".into(), "<Postmaster>".into()],
            helo: "client.example.org".into(),
            message: b"Subject: hi\r\n\r\n.leading dot\r\n".to_vec(),
        }]
    );
    assert!(!t.session.wants_input());
    assert_eq!(t.session.poll_timeout(), None);
    assert_eq!(t.session.transactions(), 1);
}

#[test]
fn data_delivered_ok_250_with_queue_id() {
    let mut t = in_data(session_config());
    t.send("hello\r\n.\r\n");
    t.acts();
    t.session.handle_delivered(t.now, Ok("Q42-1".into()));
    let r = t.replies();
    assert_eq!(codes(&r), [250]);
    assert_eq!(enhanced(&r[0]), "2.0.0");
    assert!(text(&r[0]).contains("Q42-1"), "{}", r[0]);
    let events = t.events();
    assert_eq!(
        events.last().map(|e| (e.rule, e.command, e.code, e.detail.as_str())),
        Some((Rule::Deliver, "DATA", 250, "Q42-1"))
    );
    // The session goes on: a second transaction.
    assert_eq!(t.codes("MAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nx\r\n.\r\n"), [250, 250, 354]);
    assert!(matches!(t.acts().as_slice(), [Act::Deliver { .. }]));
    assert_eq!(t.session.transactions(), 2);
    // The pending handoff is answered once; a second result is spurious and ignored.
    t.session.handle_delivered(t.now, Ok("Q42-2".into()));
    t.session.handle_delivered(t.now, Ok("Q42-3".into()));
    assert_eq!(codes(&t.replies()), [250]);
}

#[test]
fn data_delivery_failures_451_and_554() {
    let mut t = in_data(session_config());
    t.send("hello\r\n.\r\n");
    t.acts();
    t.session.handle_delivered(t.now, Err(DeliveryError::Temporary("queue full".into())));
    let r = t.replies();
    assert_eq!((r[0].code, enhanced(&r[0])), (451, "4.3.0".into()));
    assert_eq!(rules(&t.events()).last(), Some(&(Rule::Deliver, 451, None)));
    assert_eq!(t.codes("MAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nx\r\n.\r\n"), [250, 250, 354]);
    t.acts();
    t.session.handle_delivered(t.now, Err(DeliveryError::Permanent("refused".into())));
    assert_eq!(codes(&t.replies()), [554]);
    assert!(t.acts().is_empty(), "no ban for a downstream refusal");
}

#[test]
fn data_too_big_552_nothing_delivered() {
    let mut t = in_data(SessionConfig { size_max: 100, ..session_config() });
    let body = "0123456789012345678901234567890123456789\r\n".repeat(5);
    let r = t.send(&format!("{body}.\r\n"));
    assert_eq!(codes(&r), [552]);
    assert_eq!(enhanced(&r[0]), "5.3.4");
    assert!(t.acts().is_empty(), "nothing delivered");
    assert_eq!(rules(&t.events()).last(), Some(&(Rule::Proto, 552, None)));
    assert_eq!(t.session.transactions(), 0);
    // Back to commands, transaction over.
    assert_eq!(t.codes("RCPT TO:<alice@example.test>\r\nNOOP\r\n"), [503, 250]);
}

#[test]
fn data_line_over_1000_is_broken_and_delivered() {
    // RFC 5321 §4.5.3.1.6 sets 1000 octets; like Postfix we accept longer lines and break them
    // rather than bounce legitimate (HTML) mail.
    let mut t = in_data(session_config());
    let long = "x".repeat(2500);
    assert!(t.send(&format!("Subject: long\r\n\r\nok\r\n{long}\r\nafter\r\n.\r\n")).is_empty());
    match t.acts().as_slice() {
        [Act::Deliver { message, .. }] => {
            let m = String::from_utf8(message.clone()).unwrap();
            assert!(m.lines().all(|l| l.len() <= 999), "{m:?}"); // 998 and the CR
            assert_eq!(m.replace("\r\n ", ""), format!("Subject: long\r\n\r\nok\r\n{long}\r\nafter\r\n"));
        }
        other => panic!("exactly one delivery: {other:?}"),
    }
    assert_eq!(codes(&t.replies()), [] as [u16; 0], "the 250 waits for the handoff");
}

#[test]
fn data_bare_cr_is_stored_as_a_line_break() {
    let mut t = in_data(session_config());
    assert!(t.send("Subject: cr\r\n\r\nleft\rright\r\n.\r.\r\n").is_empty(), "`\\r.\\r\\n` is not the end");
    assert!(t.send(".\r\n").is_empty());
    match t.acts().as_slice() {
        [Act::Deliver { message, .. }] => assert_eq!(message, b"Subject: cr\r\n\r\nleft\r\nright\r\n\r\n.\r\n"),
        other => panic!("exactly one delivery: {other:?}"),
    }
}

#[test]
fn data_smuggling_bare_lf_dot_does_not_end_data() {
    let mut t = in_data(session_config());
    let smuggled = "hi\n.\nMAIL FROM:<ceo@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nfake\r\n";
    assert!(t.send(smuggled).is_empty(), "still in DATA: no command was answered");
    assert!(t.send("x\r\n.\nRSET\r\n\n.\r\n").is_empty());
    assert!(t.acts().is_empty());
    assert!(t.send(".\r\n").is_empty());
    match t.acts().as_slice() {
        [Act::Deliver { message, .. }] => {
            let m = String::from_utf8_lossy(message);
            assert!(m.contains("MAIL FROM:<ceo@example.test>\r\n"), "{m:?}");
            assert!(m.contains("RSET\r\n"), "{m:?}");
        }
        other => panic!("exactly one delivery: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// PIPELINING (RFC 2920)

const PIPELINED: &str = "EHLO c.example.org\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\n\
                         RCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nSubject: p\r\n\r\n\
                         ..body\r\n.\r\nNOOP\r\nQUIT\r\n";

/// Feeds `chunks` through the test kit's driver, every action answered with success; returns
/// the wire replies and the actions in order.
fn drive(cfg: SessionConfig, chunks: &[&[u8]]) -> (String, Vec<Act>) {
    let mut d = Driver::standard(cfg, 0, Answers::ok());
    let mut replies = d.replies();
    for chunk in chunks {
        replies.extend(d.send(chunk));
    }
    (String::from_utf8(wire(&replies)).unwrap(), d.acts())
}

#[test]
fn pipelining_whole_transaction_in_one_input_answers_in_order() {
    let mut t = open();
    let r = t.send(PIPELINED);
    assert_eq!(codes(&r), [250, 250, 250, 550, 250, 354], "up to the end of data, in order");
    let actions = t.acts();
    assert!(matches!(actions.as_slice(), [Act::Deliver { .. }]), "{actions:?}");
    assert!(!t.session.wants_input(), "NOOP and QUIT wait behind the delivery");
    t.session.handle_delivered(t.now, Ok("Q1".into()));
    assert_eq!(codes(&t.replies()), [250, 250, 221]);
    assert_eq!(t.acts(), [Act::Close]);
}

#[test]
fn pipelining_any_split_gives_the_same_replies() {
    let input = PIPELINED.as_bytes();
    let (want_wire, want_acts) = drive(session_config(), &[input]);
    // Greeting, EHLO (5 lines), MAIL, 3 RCPT, DATA, end of data, NOOP, QUIT.
    assert_eq!(want_wire.matches("\r\n").count(), 1 + 5 + 5 + 3, "{want_wire}");
    let check = |chunks: Vec<&[u8]>, how: &str| {
        let (wire, acts) = drive(session_config(), &chunks);
        assert_eq!(wire, want_wire, "{how}");
        assert_eq!(acts, want_acts, "{how}");
    };
    for i in 0..=input.len() {
        check(vec![&input[..i], &input[i..]], &format!("split at {i}"));
    }
    for n in [1, 2, 3, 5, 7, 13, 64] {
        check(input.chunks(n).collect(), &format!("chunks of {n}"));
    }
    // Splits right at CR|LF and at the end of data.
    let cr: Vec<usize> = (0..input.len()).filter(|&i| input[i] == b'\r').collect();
    let mut chunks = Vec::new();
    let mut start = 0;
    for &i in &cr {
        chunks.push(&input[start..=i]);
        start = i + 1;
    }
    chunks.push(&input[start..]);
    check(chunks, "after every CR");
}

// ---------------------------------------------------------------------------------------------
// Limits

#[test]
fn limit_command_line_over_512_is_500_and_the_session_goes_on() {
    let mut t = ehlo(session_config());
    // 510 octets + CRLF = 512: the longest allowed line.
    let longest = format!("NOOP {}\r\n", "x".repeat(505));
    assert_eq!(longest.len(), 512);
    assert_eq!(t.codes(&longest), [250]);
    let too_long = format!("NOOP {}\r\n", "x".repeat(506));
    let r = t.send(&too_long);
    assert_eq!((r[0].code, enhanced(&r[0])), (500, "5.5.2".into()));
    // A huge line in pieces: one 500, nothing buffered beyond the limit, then normal service.
    for _ in 0..50 {
        assert!(t.send(&"y".repeat(4096)).is_empty());
        assert!(t.session.lines.buffered() <= crate::proto::COMMAND_LINE_MAX);
    }
    assert_eq!(t.codes("\r\nMAIL FROM:<>\r\n"), [500, 250]);
    assert!(!t.session.is_closed());
}

#[test]
fn limit_101st_rcpt_452() {
    let mut t = ehlo(session_config());
    t.send("MAIL FROM:<>\r\n");
    for i in 0..100 {
        assert_eq!(t.codes("RCPT TO:<alice@example.test>\r\n"), [250], "rcpt {i}");
    }
    let r = t.send("RCPT TO:<bob@example.test>\r\n");
    assert_eq!((r[0].code, enhanced(&r[0])), (452, "4.5.3".into()));
    assert_eq!(t.codes("DATA\r\nx\r\n.\r\n"), [354]);
    match t.acts().as_slice() {
        [Act::Deliver { rcpts, .. }] => assert_eq!(rcpts.len(), 100),
        other => panic!("{other:?}"),
    }
}

#[test]
fn limit_errors_max_default_lets_ten_unknown_recipients_through() {
    // A pipelined batch with ten unknown recipients (null sender: no B4) is answered in full
    // and the message still delivered: the default errors_max is Postfix's 20.
    let mut t = ehlo(session_config());
    let unknown: String = (0..10).map(|i| format!("RCPT TO:<nobody{i}@example.test>\r\n")).collect();
    let r = t.send(&format!("MAIL FROM:<>\r\n{unknown}RCPT TO:<alice@example.test>\r\nDATA\r\nhi\r\n.\r\n"));
    let mut want = vec![250];
    want.extend([550; 10]);
    want.extend([250, 354]);
    assert_eq!(codes(&r), want);
    assert!(matches!(t.acts().as_slice(), [Act::Deliver { .. }]));
    assert!(!t.session.is_closed());
}

#[test]
fn limit_errors_max_421_and_close() {
    let mut t = ehlo(SessionConfig { errors_max: 3, ..session_config() });
    let r = t.send("FOO\r\nMAIL FROM:<>\r\nRCPT TO:<bob@elsewhere.test>\r\nBAR\r\nNOOP\r\n");
    assert_eq!(codes(&r), [500, 250, 554, 500, 421]);
    assert_eq!(enhanced(&r[4]), "4.7.0");
    assert_eq!(t.acts(), [Act::Close]);
    assert!(t.session.is_closed());
    assert!(t.send("NOOP\r\n").is_empty());
    // 4xx count too.
    let mut t = ehlo(SessionConfig { errors_max: 2, rcpt_max: 1, ..session_config() });
    let r = t.send(
        "MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<bob@example.test>\r\nRCPT TO:<bob@example.test>\r\n",
    );
    assert_eq!(codes(&r), [250, 250, 452, 452, 421]);
}

#[test]
fn limit_command_timeout_421_and_close() {
    let mut t = ehlo(session_config());
    assert_eq!(t.session.poll_timeout(), Some(t.at(300)));
    t.advance(100);
    t.send("NOOP\r\n");
    assert_eq!(t.session.poll_timeout(), Some(t.at(400)), "input restarts the idle timer");
    t.session.handle_timeout(t.at(400));
    let r = t.replies();
    assert_eq!((r[0].code, enhanced(&r[0])), (421, "4.4.2".into()));
    assert!(text(&r[0]).contains("Timeout"));
    assert_eq!(t.acts(), [Act::Close]);
    assert_eq!(t.session.poll_timeout(), None);
    // In DATA too.
    let mut t = in_data(session_config());
    t.send("partial line");
    t.session.handle_timeout(t.session.poll_timeout().unwrap());
    assert_eq!(codes(&t.replies()), [421]);
    assert_eq!(t.acts(), [Act::Close], "nothing delivered");
}

#[test]
fn limit_penalty_timeout_after_a_5xx() {
    let mut t = ehlo(session_config());
    t.advance(10);
    t.send("MAIL FROM:<>\r\nRCPT TO:<nobody@example.test>\r\n");
    assert_eq!(t.session.poll_timeout(), Some(t.at(40)), "30 s after a 5xx, not 300 s");
    // A 4xx alone does not shorten it.
    let mut t = ehlo(SessionConfig { rcpt_max: 0, ..session_config() });
    t.send("MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\n");
    assert_eq!(t.session.poll_timeout(), Some(t.at(300)));
    // The penalty holds for the rest of the session.
    let mut t = ehlo(session_config());
    t.send("FOO\r\n");
    t.advance(20);
    t.send("NOOP\r\n");
    assert_eq!(t.session.poll_timeout(), Some(t.at(50)));
    t.session.handle_timeout(t.at(50));
    assert_eq!(codes(&t.replies()), [421]);
}

#[test]
fn limit_session_lifetime() {
    let mut t = ehlo(session_config());
    for _ in 0..8 {
        t.advance(200);
        assert_eq!(t.codes("NOOP\r\n"), [250]);
    }
    // Now at 1600 s: the idle deadline (1900 s) is past the lifetime (1800 s).
    assert_eq!(t.session.poll_timeout(), Some(t.at(1800)));
    t.session.handle_timeout(t.at(1799));
    assert!(t.replies().is_empty());
    t.session.handle_timeout(t.at(1800));
    let r = t.replies();
    assert_eq!((r[0].code, enhanced(&r[0])), (421, "4.4.2".into()));
    assert!(text(&r[0]).contains("lifetime"), "{}", r[0]);
    assert_eq!(t.acts(), [Act::Close]);
}

#[test]
fn limit_spurious_timeout_is_a_no_op() {
    let mut t = ehlo(session_config());
    t.session.handle_timeout(t.at(0));
    t.session.handle_timeout(t.at(299));
    assert!(t.replies().is_empty() && t.acts().is_empty());
    assert_eq!(t.codes("NOOP\r\n"), [250]);
    // After close, any timeout is a no-op.
    t.send("QUIT\r\n");
    t.acts();
    t.session.handle_timeout(t.at(10_000));
    assert!(t.replies().is_empty() && t.acts().is_empty());
}

#[test]
fn limit_no_timeout_and_no_input_while_an_action_is_pending() {
    let mut t = in_data(session_config());
    assert!(t.session.wants_input());
    t.send("x\r\n.\r\nNOOP\r\n");
    assert!(matches!(t.acts().as_slice(), [Act::Deliver { .. }]));
    assert_eq!(t.session.poll_timeout(), None);
    assert!(!t.session.wants_input());
    t.session.handle_timeout(t.at(100_000));
    assert!(t.replies().is_empty() && t.acts().is_empty(), "the driver bounds the action, not the session");
    t.now = t.at(1000);
    t.session.handle_delivered(t.now, Ok("Q".into()));
    assert_eq!(codes(&t.replies()), [250, 250]);
    assert!(t.session.wants_input());
    assert_eq!(t.session.poll_timeout(), Some(t.at(1300)));
}

#[test]
fn limit_eof_closes_unless_an_action_is_pending() {
    let mut t = ehlo(session_config());
    t.session.handle_eof(t.now);
    assert_eq!(t.acts(), [Act::Close]);
    assert!(t.session.is_closed());
    // A complete message being handed off is not abandoned: the handoff finishes and is answered.
    let mut t = in_data(session_config());
    t.send("x\r\n.\r\n");
    assert!(matches!(t.acts().as_slice(), [Act::Deliver { .. }]));
    t.session.handle_eof(t.now);
    assert!(t.acts().is_empty() && !t.session.is_closed());
    t.session.handle_delivered(t.now, Ok("Q".into()));
    assert_eq!(codes(&t.replies()), [250]);
}

// ---------------------------------------------------------------------------------------------
// C1: callback verification

fn c1() -> SessionConfig {
    SessionConfig { verify_senders: true, ..session_config() }
}

#[test]
fn c1_first_valid_rcpt_waits_for_the_callback() {
    let mut t = ehlo(c1());
    assert_eq!(t.codes("MAIL FROM:<Someone@Elsewhere.TEST>\r\n"), [250]);
    assert!(t.acts().is_empty(), "no callback before a valid recipient");
    assert!(t.send("RCPT TO:<alice@example.test>\r\n").is_empty(), "held");
    assert_eq!(t.acts(), [Act::Verify("Someone@elsewhere.test".into())]);
    assert!(!t.session.wants_input());
    assert_eq!(t.session.poll_timeout(), None);
    t.session.handle_verified(t.now, Verification::Valid { evidence: "250 ok".into() }, Duration::ZERO);
    let r = t.replies();
    assert_eq!((r[0].code, enhanced(&r[0])), (250, "2.1.5".into()));
    assert_eq!(rules(&t.events()).last(), Some(&(Rule::C1, 250, None)));
    // Later recipients need no callback.
    assert_eq!(t.codes("RCPT TO:<bob@example.test>\r\nRCPT TO:<abuse@example.test>\r\n"), [250, 250]);
    assert!(t.acts().is_empty());
    assert_eq!(t.codes("DATA\r\nx\r\n.\r\n"), [354]);
    match t.acts().as_slice() {
        [Act::Deliver { rcpts, .. }] => assert_eq!(rcpts.len(), 3),
        other => panic!("{other:?}"),
    }
    // A spurious verification result is ignored.
    t.session.handle_verified(t.now, Verification::Invalid { evidence: "late".into() }, Duration::ZERO);
    assert!(t.replies().is_empty() && t.acts().is_empty());
}

#[test]
fn c1_invalid_sender_550_and_one_ban() {
    let mut t = ehlo(c1());
    t.send("MAIL FROM:<fake@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n");
    assert_eq!(t.acts(), [Act::Verify("fake@elsewhere.test".into())]);
    // Pipelined behind the held RCPT: never answered, the ban ends the session.
    assert!(t.send("RCPT TO:<bob@example.test>\r\nDATA\r\n").is_empty());
    t.session.handle_verified(t.now, Verification::Invalid { evidence: "550 5.1.1 unknown".into() }, Duration::ZERO);
    let actions = t.acts();
    let r = t.replies();
    assert_eq!((r[0].code, enhanced(&r[0])), (550, "5.1.7".into()));
    assert_eq!(codes(&r), [550, 421]);
    match actions.as_slice() {
        [Act::Ban(BanReason::FakeSender, evidence), Act::Close] => {
            assert!(evidence.contains("<fake@elsewhere.test>") && evidence.contains("550 5.1.1 unknown"), "{evidence}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(rules(&t.events()), [(Rule::E1, 250, None), (Rule::C1, 550, Some(BanReason::FakeSender))]);
}

/// C1: a sender whose domain does not exist (NXDOMAIN) is refused without a ban; every
/// further valid recipient gets the same 550, with no new callback.
#[test]
fn c1_undeliverable_sender_550_without_ban() {
    let mut t = ehlo(c1());
    t.send("MAIL FROM:<someone@nowhere.test>\r\nRCPT TO:<alice@example.test>\r\n");
    t.acts();
    t.session.handle_verified(t.now, Verification::Undeliverable { evidence: "NXDOMAIN".into() }, Duration::ZERO);
    let r = t.replies();
    assert_eq!((r[0].code, enhanced(&r[0])), (550, "5.1.7".into()));
    let r = t.send("RCPT TO:<bob@example.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n");
    assert_eq!(codes(&r), [550, 550, 554]);
    assert!(t.acts().is_empty());
    assert!(t.events().iter().all(|e| e.ban.is_none()));
}

/// C1: accept-all domains are valid-but-unverifiable: accepted, never tempfailed.
#[test]
fn c1_accept_all_is_accepted() {
    let mut t = ehlo(c1());
    t.send("MAIL FROM:<anyone@acceptall.test>\r\nRCPT TO:<alice@example.test>\r\n");
    t.acts();
    t.session.handle_verified(t.now, Verification::AcceptAll { evidence: "250 to random".into() }, Duration::ZERO);
    assert_eq!(codes(&t.replies()), [250]);
    assert_eq!(t.codes("RCPT TO:<bob@example.test>\r\nDATA\r\n"), [250, 354]);
}

#[test]
fn c1_unknown_tempfails_and_never_bans() {
    let mut t = ehlo(c1());
    t.send("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n");
    t.acts();
    t.session.handle_verified(
        t.now,
        Verification::Unknown { evidence: "timeout".into() },
        Duration::from_secs(29 * 60),
    );
    let r = t.replies();
    assert_eq!((r[0].code, enhanced(&r[0])), (451, "4.4.3".into()));
    assert_eq!(t.codes("RCPT TO:<bob@example.test>\r\n"), [451]);
    assert!(t.acts().is_empty(), "no ban, no second callback");
    assert!(t.events().iter().all(|e| e.ban.is_none()));
    // Never forever: a retry 30 minutes after this client network's first attempt is accepted.
    let mut t = ehlo(c1());
    t.send("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n");
    t.acts();
    t.session.handle_verified(
        t.now,
        Verification::Unknown { evidence: "timeout".into() },
        Duration::from_secs(30 * 60),
    );
    assert_eq!(codes(&t.replies()), [250]);
    let events = t.events();
    assert!(events.last().unwrap().detail.contains("unverifiable for 1800 s: accepted"), "{events:?}");
    assert_eq!(t.codes("RCPT TO:<bob@example.test>\r\nDATA\r\n"), [250, 354]);
    // With `on_unknown = accept` the recipient stands.
    let mut t = ehlo(SessionConfig { on_unknown: OnUnknown::Accept, ..c1() });
    t.send("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n");
    t.acts();
    t.session.handle_verified(t.now, Verification::Unknown { evidence: "timeout".into() }, Duration::ZERO);
    assert_eq!(codes(&t.replies()), [250]);
    assert_eq!(t.codes("RCPT TO:<bob@example.test>\r\nDATA\r\n"), [250, 354]);
    assert!(t.acts().is_empty());
}

#[test]
fn c1_pipelined_commands_are_answered_after_the_held_rcpt_in_order() {
    // B4 at 2, so that DATA after the one unknown recipient is not (yet) a ban.
    let policy = PolicyConfig { b4_threshold: 2, ..PolicyConfig::default() };
    let mut t = open_with(SessionConfig { policy, ..c1() }, 0);
    let r = t.send(
        "EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<nobody@example.test>\r\n\
         RCPT TO:<bob@example.test>\r\nDATA\r\n",
    );
    assert_eq!(codes(&r), [250, 250]);
    assert_eq!(t.acts(), [Act::Verify("x@elsewhere.test".into())]);
    assert!(!t.session.wants_input());
    // More input while waiting is kept, not answered.
    assert!(t.send("Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n").is_empty());
    t.session.handle_verified(t.now, Verification::Valid { evidence: "250".into() }, Duration::ZERO);
    assert_eq!(codes(&t.replies()), [250, 550, 250, 354]);
    let actions = t.acts();
    assert!(matches!(actions.as_slice(), [Act::Deliver { rcpts, .. }] if rcpts.len() == 2), "{actions:?}");
    t.session.handle_delivered(t.now, Ok("Q".into()));
    assert_eq!(codes(&t.replies()), [250, 221]);
}

#[test]
fn c1_null_and_local_senders_are_never_verified() {
    for from in ["<>", "<alice@example.test>", "<postmaster@example.test>"] {
        let mut t = ehlo(c1());
        assert_eq!(t.codes(&format!("MAIL FROM:{from}\r\nRCPT TO:<alice@example.test>\r\n")), [250, 250], "{from}");
        assert!(t.acts().is_empty(), "{from}");
    }
}

#[test]
fn c1_cheap_checks_first() {
    let mut t = ehlo(c1());
    let r = t.send(
        "MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<bob@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<bob>\r\n",
    );
    assert_eq!(codes(&r), [250, 554, 550, 553]);
    assert_eq!(
        t.acts().into_iter().filter(|a| matches!(a, Act::Verify(_))).count(),
        0,
        "no callback for refused recipients"
    );
    assert_eq!(t.codes("RCPT TO:<alice@example.test>\r\n"), Vec::<u16>::new());
    assert_eq!(t.acts(), [Act::Verify("x@elsewhere.test".into())]);
}

#[test]
fn c1_off_by_default() {
    let mut t = ehlo(session_config());
    assert_eq!(t.codes("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n"), [250, 250]);
    assert!(t.acts().is_empty());
}

// ---------------------------------------------------------------------------------------------
// V1: virus scan

fn v1() -> SessionConfig {
    SessionConfig { scan: true, ..session_config() }
}

fn scanned(cfg: SessionConfig) -> T {
    let mut t = in_data(cfg);
    assert!(t.send("Subject: v\r\n\r\nbody\r\n.\r\nNOOP\r\n").is_empty());
    assert_eq!(t.acts(), [Act::Scan(b"Subject: v\r\n\r\nbody\r\n".to_vec())]);
    assert!(!t.session.wants_input());
    assert_eq!(t.session.poll_timeout(), None);
    t
}

#[test]
fn v1_clean_message_is_delivered() {
    let mut t = scanned(v1());
    t.session.handle_scanned(t.now, ScanOutcome::Clean);
    assert!(t.replies().is_empty());
    match t.acts().as_slice() {
        [Act::Deliver { message, .. }] => assert_eq!(message, b"Subject: v\r\n\r\nbody\r\n"),
        other => panic!("{other:?}"),
    }
    t.session.handle_delivered(t.now, Ok("Q".into()));
    assert_eq!(codes(&t.replies()), [250, 250]);
}

#[test]
fn v1_infected_554_names_the_signature_and_bans() {
    let mut t = ehlo(v1());
    let r = t.send("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n");
    assert_eq!(codes(&r), [250, 250, 354]);
    assert!(t.send("Subject: v\r\n\r\nbody\r\n.\r\nNOOP\r\n").is_empty());
    t.acts();
    t.session.handle_scanned(t.now, ScanOutcome::Infected { signature: "Eicar-Test-Signature".into() });
    let actions = t.acts();
    let r = t.replies();
    assert_eq!(codes(&r), [554, 421], "the ban ends the session: the pipelined NOOP is not answered");
    assert_eq!(enhanced(&r[0]), "5.7.1");
    assert!(text(&r[0]).contains("Eicar-Test-Signature"));
    match actions.as_slice() {
        [Act::Ban(BanReason::Virus, evidence), Act::Close] => {
            assert!(evidence.contains("Eicar-Test-Signature"))
        }
        other => panic!("a ban and no delivery: {other:?}"),
    }
    let events = t.events();
    let last = events.last().unwrap();
    assert_eq!(
        (last.rule, last.code, last.ban, last.detail.as_str()),
        (Rule::V1, 554, Some(BanReason::Virus), "Eicar-Test-Signature")
    );
    assert_eq!(t.session.transactions(), 0);
}

/// V1: a virus from `<>` (a bounce carrying it back) or to postmaster/abuse (a report
/// quoting it) is refused without a ban.
#[test]
fn v1_infected_bounce_or_abuse_report_554_no_ban() {
    for envelope in [
        "MAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\n",
        "MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<abuse@example.test>\r\n",
        "MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<Postmaster>\r\n",
    ] {
        let mut t = ehlo(v1());
        t.send(&format!("{envelope}DATA\r\nvirus\r\n.\r\n"));
        t.acts();
        t.session.handle_scanned(t.now, ScanOutcome::Infected { signature: "Eicar-Test-Signature".into() });
        assert_eq!(codes(&t.replies()), [554], "{envelope}");
        assert!(t.acts().is_empty(), "{envelope}");
        assert_eq!(t.codes("NOOP\r\n"), [250], "{envelope}: the session goes on");
    }
}

#[test]
fn v1_scan_failure_tempfails_without_ban() {
    let mut t = scanned(v1());
    t.session.handle_scanned(t.now, ScanOutcome::Failed { reason: "clamd down".into() });
    let r = t.replies();
    assert_eq!((r[0].code, enhanced(&r[0])), (451, "4.7.0".into()));
    assert!(t.acts().is_empty(), "no ban, no delivery");
    assert_eq!(rules(&t.events()).last(), Some(&(Rule::V1, 451, None)));
    // Or deliver unscanned when so configured.
    let mut t = scanned(SessionConfig { on_scan_failure: OnScanFailure::Accept, ..v1() });
    t.session.handle_scanned(t.now, ScanOutcome::Failed { reason: "clamd down".into() });
    assert!(matches!(t.acts().as_slice(), [Act::Deliver { .. }]));
    assert!(t.replies().is_empty());
}

#[test]
fn v1_off_by_default_and_spurious_results_ignored() {
    let mut t = in_data(session_config());
    t.send("x\r\n.\r\n");
    assert!(matches!(t.acts().as_slice(), [Act::Deliver { .. }]), "no scan when off");
    t.session.handle_scanned(t.now, ScanOutcome::Infected { signature: "X".into() });
    assert!(t.acts().is_empty() && t.replies().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Refusals at connect (G1, G2)

#[test]
fn refused_rate_limited_421_and_close() {
    let mut t = refused(Refusal::RateLimited);
    let r = t.replies();
    assert_eq!((r.len(), r[0].code, enhanced(&r[0])), (1, 421, "4.7.0".into()));
    assert!(text(&r[0]).starts_with(HOSTNAME), "RFC 5321 §4.2: 421 names the server");
    assert_eq!(t.acts(), [Act::Close]);
    assert_eq!(rules(&t.events()), [(Rule::G1, 421, None)]);
    assert!(t.session.is_closed());
    assert!(t.send("EHLO c\r\n").is_empty());
}

#[test]
fn refused_busy_421_and_close() {
    let mut t = refused(Refusal::Busy);
    assert_eq!(codes(&t.replies()), [421]);
    assert_eq!(t.acts(), [Act::Close]);
}

#[test]
fn refused_banned_554_then_503_until_quit() {
    let mut t = refused(Refusal::Banned);
    let r = t.replies();
    assert_eq!((r[0].code, enhanced(&r[0])), (554, "5.7.1".into()));
    assert!(t.acts().is_empty(), "RFC 5321 §3.1: wait for QUIT");
    assert_eq!(rules(&t.events()), [(Rule::G2, 554, None)]);
    let r = t.send("EHLO c\r\nHELO c\r\nMAIL FROM:<>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nNOOP\r\nRSET\r\n");
    assert_eq!(codes(&r), [503; 7]);
    assert_eq!(enhanced(&r[0]), "5.5.1");
    // Malformed commands get 503 too: nothing but QUIT is served.
    assert_eq!(t.codes("MAIL FROM:<foo>\r\nMAIL FROM:<> X=Y\r\nFOO\r\n"), [503, 503, 503]);
    assert!(t.acts().is_empty());
    // The greeting and 10 replies were errors; the 20th error (errors_max) closes.
    assert_eq!(session_config().errors_max, 20);
    let mut want = vec![503; 9];
    want.push(421);
    assert_eq!(t.codes(&"NOOP\r\n".repeat(10)), want);
    assert_eq!(t.acts(), [Act::Close]);
    let mut t = refused(Refusal::Banned);
    t.replies();
    assert_eq!(t.codes("EHLO c\r\nQUIT\r\n"), [503, 221]);
    assert_eq!(t.acts(), [Act::Close]);
}

/// PROXY `UNKNOWN` / v2 `LOCAL` (a load balancer's health check): a greeting and the
/// dialogue a check needs, but no mail and no rule.
#[test]
fn unidentified_connection_greets_and_quits_but_takes_no_mail() {
    let s = Session::unidentified(t0(), Arc::new(session_config()), directory(), ClientInfo::new(SESSION_ID, CLIENT));
    let mut t = Driver::new(s, t0(), Answers::held());
    assert_eq!(codes(&t.replies()), [220]);
    let r = t.send(
        "EHLO haproxy\r\nNOOP\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\nRSET\r\nQUIT\r\n",
    );
    assert_eq!(codes(&r), [250, 250, 451, 503, 250, 221]);
    assert_eq!(enhanced(&r[2]), "4.3.2");
    assert_eq!(t.acts(), [Act::Close]);
    assert!(t.events().is_empty(), "no verdicts");
    assert_eq!(t.session.unknown_rcpts(), 0);
}

// ---------------------------------------------------------------------------------------------
// Events: one per verdict, with the deciding rule

#[test]
fn events_one_per_verdict_with_the_rule() {
    use BanReason::*;
    let cfg = SessionConfig { verify_senders: true, scan: true, ..session_config() };
    let collect = |t: &mut T| t.events().iter().map(|e| (e.rule, e.command, e.code, e.ban)).collect::<Vec<_>>();
    // A forged local sender: B1, and the session ends.
    let mut t = open_with(cfg.clone(), 0);
    t.send("EHLO c\r\nNOOP\r\nMAIL FROM:<nobody@example.test>\r\n");
    assert_eq!(collect(&mut t), [(Rule::E1, "MAIL", 550, Some(ForgedLocalSender))]);
    assert_eq!(t.bans(), [ForgedLocalSender]);
    // A transaction with every kind of verdict; B4 at 2, so one unknown recipient is no ban.
    let lenient = SessionConfig { policy: PolicyConfig { b4_threshold: 2, ..PolicyConfig::default() }, ..cfg.clone() };
    let mut t = open_with(lenient, 0);
    t.send(
        "EHLO c\r\nMAIL FROM:<x@elsewhere.test> SIZE=999999999999\r\nMAIL FROM:<x@elsewhere.test>\r\n\
         RCPT TO:<bob@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\n",
    );
    t.session.handle_verified(t.now, Verification::Valid { evidence: "250".into() }, Duration::ZERO);
    t.send("DATA\r\nx\r\n.\r\n");
    t.session.handle_scanned(t.now, ScanOutcome::Clean);
    t.session.handle_delivered(t.now, Ok("Q7".into()));
    t.send("MAIL FROM:<y@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n");
    t.session.handle_verified(t.now, Verification::Valid { evidence: "250".into() }, Duration::ZERO);
    t.send("DATA\r\nx\r\n.\r\n");
    t.session.handle_scanned(t.now, ScanOutcome::Infected { signature: "S".into() });
    let events = t.events();
    let got: Vec<_> = events.iter().map(|e| (e.rule, e.command, e.code, e.ban)).collect();
    assert_eq!(
        got,
        [
            (Rule::Proto, "MAIL", 552, None),
            (Rule::E1, "MAIL", 250, None),
            (Rule::E2, "RCPT", 554, None),
            (Rule::E2, "RCPT", 550, None),
            (Rule::C1, "RCPT", 250, None),
            (Rule::Deliver, "DATA", 250, None),
            (Rule::E1, "MAIL", 250, None),
            (Rule::C1, "RCPT", 250, None),
            (Rule::V1, "DATA", 554, Some(Virus)),
        ]
    );
    assert_eq!(events.iter().map(Event::verdict).collect::<Vec<_>>()[..4], ["reject", "accept", "reject", "reject"]);
    // Every ban action has its event, and vice versa.
    let bans = t.bans();
    assert_eq!(bans, events.iter().filter_map(|e| e.ban).collect::<Vec<_>>());
    // A dictionary attack: B4 at the second unknown recipient.
    let mut t = open_with(cfg, 0);
    t.send("EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<n1@example.test>\r\nRCPT TO:<n2@example.test>\r\n");
    assert_eq!(
        collect(&mut t),
        [(Rule::E1, "MAIL", 250, None), (Rule::E2, "RCPT", 550, None), (Rule::E2, "RCPT", 550, Some(UnknownRecipient))]
    );
}

// ---------------------------------------------------------------------------------------------
// The message file: asked for after DATA, content handed out as it arrives, never held.

#[test]
fn message_content_is_handed_out_as_it_arrives() {
    let mut t = ehlo(session_config());
    let r = t.send("MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n");
    assert_eq!(codes(&r), [250, 250, 354]);
    // The file is asked for before the 354 is written, with the envelope.
    match t.actions().as_slice() {
        [Action::Receive { envelope }] => {
            assert_eq!(envelope.from.to_string(), "<x@elsewhere.test>");
            assert_eq!(envelope.rcpts.len(), 1);
        }
        other => panic!("{other:?}"),
    }
    // Each read's whole lines go out at once; the session keeps none of them.
    t.send("Subject: a\r\n\r\nfirst ");
    let appended = |actions: Vec<Action>| -> Vec<u8> {
        actions
            .into_iter()
            .flat_map(|a| match a {
                Action::Append { chunk } => chunk.to_vec(),
                other => panic!("only content while receiving: {other:?}"),
            })
            .collect()
    };
    assert_eq!(appended(t.actions()), b"Subject: a\r\n\r\n");
    t.send("line\r\n..dot\r\n");
    assert_eq!(appended(t.actions()), b"first line\r\n.dot\r\n");
    assert!(t.session.wants_input());
    assert!(t.send(".\r\n").is_empty(), "the 250 waits for the handoff");
    match t.actions().as_slice() {
        [Action::Deliver { envelope }] => assert_eq!(envelope.session, SESSION_ID),
        other => panic!("{other:?}"),
    }
    assert_eq!(t.contents(), [b"Subject: a\r\n\r\nfirst line\r\n.dot\r\n".to_vec()]);
    t.session.handle_delivered(t.now, Ok("Q1".into()));
    assert_eq!(codes(&t.replies()), [250]);
}

#[test]
fn a_message_too_big_is_discarded() {
    let mut t = in_data(SessionConfig { size_max: 1024, ..session_config() });
    t.actions();
    t.send(&format!("Subject: big\r\n\r\n{}\r\n", "y".repeat(600)));
    t.send(&format!("{}\r\n", "z".repeat(600)));
    let r = t.send(".\r\n");
    assert_eq!(codes(&r), [552]);
    let actions = t.actions();
    assert!(matches!(actions.last(), Some(Action::Discard)), "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::Scan | Action::Deliver { .. })));
}

#[test]
fn an_infected_message_is_discarded() {
    let mut t = in_data(SessionConfig { scan: true, ..session_config() });
    t.send("Subject: v\r\n\r\nbody\r\n.\r\n");
    assert!(matches!(t.actions().last(), Some(Action::Scan)));
    t.session.handle_scanned(t.now, ScanOutcome::Infected { signature: "Eicar".into() });
    let actions = t.actions();
    assert!(matches!(actions.first(), Some(Action::Discard)), "{actions:?}");
    assert!(!actions.iter().any(|a| matches!(a, Action::Deliver { .. })));
}

#[test]
fn storage_short_refuses_mail_with_452() {
    let mut t = ehlo(session_config());
    t.session.set_storage_short(true);
    let r = t.send("MAIL FROM:<x@elsewhere.test>\r\n");
    assert_eq!(codes(&r), [452]);
    assert_eq!(enhanced(&r[0]), "4.3.1");
    assert_eq!(rules(&t.events()), [(Rule::Proto, 452, None)]);
    assert!(!t.session.is_closed());
    t.session.set_storage_short(false);
    assert_eq!(t.codes("MAIL FROM:<x@elsewhere.test>\r\n"), [250]);
}

#[test]
fn a_message_that_could_not_be_stored_gets_452_at_its_end() {
    for scan in [false, true] {
        let mut t = in_data(SessionConfig { scan, ..session_config() });
        t.events();
        assert!(t.send("Subject: x\r\n\r\nbody\r\n.\r\n").is_empty());
        let waiting = t.actions();
        assert!(matches!(waiting.last(), Some(Action::Scan | Action::Deliver { .. })), "{waiting:?}");
        t.session.handle_store_failed(t.now, "disk full".into());
        let r = t.replies();
        assert_eq!(codes(&r), [452], "scan {scan}");
        assert_eq!(enhanced(&r[0]), "4.3.1");
        let events = t.events();
        assert_eq!(rules(&events), [(Rule::Deliver, 452, None)]);
        assert_eq!(events[0].detail, "disk full");
        assert_eq!(t.session.transactions(), u64::from(!scan), "a handoff asked for counts");
        // The session goes on; spurious calls are no-ops.
        t.session.handle_store_failed(t.now, "again".into());
        assert!(t.replies().is_empty());
        assert_eq!(t.codes("MAIL FROM:<x@elsewhere.test>\r\n"), [250]);
    }
}

#[test]
fn messages_per_session_are_bounded() {
    let mut t = Driver::standard(SessionConfig { messages_max: 2, ..session_config() }, 0, Answers::ok());
    t.replies();
    assert_eq!(t.codes("EHLO c.example.org\r\n"), [250]);
    let message =
        "MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: m\r\n\r\nx\r\n.\r\n";
    assert_eq!(t.codes(message), [250, 250, 354, 250]);
    assert_eq!(t.codes(message), [250, 250, 354, 250]);
    let r = t.send("MAIL FROM:<x@elsewhere.test>\r\n");
    assert_eq!(codes(&r), [421]);
    assert_eq!(enhanced(&r[0]), "4.7.0");
    assert!(t.session.is_closed());
    assert_eq!(t.session.transactions(), 2);
}

/// `smtp.client_messages_max`: the messages a client gave in earlier sessions this hour count;
/// at the limit, MAIL gets 451 4.7.1 (a tempfail the client's queue retries), nothing is
/// closed or banned, and the session can still QUIT.
#[test]
fn messages_per_client_and_hour_are_bounded() {
    let cfg = SessionConfig { client_messages_max: 3, ..session_config() };
    let session = Session::new(t0(), Arc::new(cfg), directory(), ClientInfo { messages_before: 2, ..client(0) });
    let mut t = Driver::new(session, t0(), Answers::ok());
    assert_eq!(codes(&t.replies()), [220]);
    assert_eq!(t.codes("EHLO c.example.org\r\n"), [250]);
    let message =
        "MAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: m\r\n\r\nx\r\n.\r\n";
    assert_eq!(t.codes(message), [250, 250, 354, 250]);
    let r = t.send("MAIL FROM:<x@elsewhere.test>\r\n");
    assert_eq!(codes(&r), [451]);
    assert_eq!(enhanced(&r[0]), "4.7.1");
    assert!(!t.session.is_closed());
    assert!(t.bans().is_empty());
    assert_eq!(t.codes("QUIT\r\n"), [221]);
    assert_eq!(t.session.transactions(), 1);
    // 0 is no limit.
    let cfg = SessionConfig { client_messages_max: 0, ..session_config() };
    let session = Session::new(t0(), Arc::new(cfg), directory(), ClientInfo { messages_before: u32::MAX, ..client(0) });
    let mut t = Driver::new(session, t0(), Answers::ok());
    t.replies();
    assert_eq!(t.codes("EHLO c.example.org\r\n"), [250]);
    assert_eq!(t.codes(message), [250, 250, 354, 250]);
}

#[test]
fn a_refused_session_waits_at_most_refused_wait_whatever_the_client_does() {
    let mut t = refused(Refusal::Banned);
    assert_eq!(codes(&t.replies()), [554]);
    assert!(t.session.is_refused());
    // However it keeps talking (below errors_max), the deadline stays where it was.
    assert_eq!(t.session.poll_timeout(), Some(t0() + REFUSED_WAIT));
    t.advance(1);
    assert_eq!(t.codes("NOOP\r\n"), [503]);
    assert_eq!(t.session.poll_timeout(), Some(t0() + REFUSED_WAIT));
    let now = t0() + REFUSED_WAIT;
    t.session.handle_timeout(now);
    let r = t.replies();
    assert_eq!(codes(&r), [421]);
    assert!(t.session.is_closed());
    assert_eq!(t.acts(), [Act::Close]);
    // Sessions that were not refused keep their ordinary patience.
    let t = open();
    assert!(!t.session.is_refused());
    assert_eq!(t.session.poll_timeout(), Some(t0() + session_config().command_timeout));
}

/// RFC 3207: STARTTLS offered in EHLO; granted, 220 and the session starts over after the
/// handshake (EHLO forgotten, no greeting), and plaintext pipelined behind STARTTLS is dropped.
#[test]
fn starttls_resets_the_session_and_drops_pipelined_plaintext() {
    let now = t0();
    let mut s = Session::new(now, Arc::new(session_config()), directory(), client(0));
    s.offer_tls();
    assert_eq!(s.poll_reply().map(|r| r.code), Some(220));
    s.handle_input(now, b"EHLO a.test\r\n");
    assert!(s.poll_reply().unwrap().lines.iter().any(|l| l == "STARTTLS"));
    s.handle_input(now, b"STARTTLS\r\nRSET\r\nMAIL FROM:<>\r\n");
    assert!(matches!(s.poll_action(), Some(Action::StartTls)));
    assert!(s.poll_reply().is_none(), "nothing is processed while the permit is pending");
    assert!(!s.wants_input());
    s.handle_tls_permit(now, true);
    assert_eq!(s.poll_reply().map(|r| r.code), Some(220));
    assert!(s.poll_reply().is_none());
    assert_eq!(s.poll_timeout(), None, "the driver bounds the handshake");
    s.handle_tls_started(now);
    assert!(s.is_tls() && s.wants_input());
    assert!(s.poll_reply().is_none(), "no greeting, and the injected lines are gone");
    s.handle_input(now, b"MAIL FROM:<>\r\n");
    assert_eq!(s.poll_reply().map(|r| r.code), Some(503), "EHLO is needed again");
    s.handle_input(now, b"EHLO a.test\r\nSTARTTLS\r\nMAIL FROM:<>\r\n");
    assert!(!s.poll_reply().unwrap().lines.iter().any(|l| l == "STARTTLS"), "not offered once on");
    assert_eq!(s.poll_reply().map(|r| r.code), Some(503));
    assert_eq!(s.poll_reply().map(|r| r.code), Some(250));
    let mut d = Driver::standard(session_config(), 0, Answers::held());
    d.replies();
    assert_eq!(codes(&d.send("STARTTLS\r\n")), [502], "not offered: not implemented");
}

/// No place among the handshakes: 454 4.7.0, and the session goes on in clear text with the
/// input that followed.
#[test]
fn starttls_refused_goes_on_in_clear_text() {
    let now = t0();
    let mut s = Session::new(now, Arc::new(session_config()), directory(), client(0));
    s.offer_tls();
    let _ = s.poll_reply();
    s.handle_input(now, b"EHLO a.test\r\nSTARTTLS\r\nMAIL FROM:<>\r\n");
    assert_eq!(s.poll_reply().map(|r| r.code), Some(250));
    assert!(matches!(s.poll_action(), Some(Action::StartTls)));
    s.handle_tls_permit(now, false);
    let r = s.poll_reply().unwrap();
    assert_eq!((r.code, r.to_wire()), (454, "454 4.7.0 TLS not available due to temporary reason\r\n".into()));
    assert_eq!(s.poll_reply().map(|r| r.code), Some(250), "MAIL after EHLO: still Ready");
    assert!(!s.is_tls());
}

/// Observe mode: the forged local sender's E1 verdict (550 and a ban) is an observed event;
/// the client gets 250, no ban is asked for, and the transaction goes on.
#[test]
fn observe_mode_accepts_and_records_what_would_be_done() {
    let cfg = SessionConfig { mode: Mode::Observe, ..session_config() };
    let mut t = open_with(cfg, 0);
    assert_eq!(codes(&t.send("EHLO a.test\r\nMAIL FROM:<nobody@example.test>\r\n")), [250, 250]);
    assert_eq!(codes(&t.send("RCPT TO:<nobody@example.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")), [250, 554]);
    assert!(t.actions().iter().all(|a| !matches!(a, Action::Ban { .. } | Action::Close)));
    let events = t.events();
    let observed: Vec<_> = events.iter().filter(|e| e.observed).map(|e| (e.rule, e.code, e.ban)).collect();
    assert_eq!(observed, [(Rule::E1, 550, Some(BanReason::ForgedLocalSender)), (Rule::E2, 550, None)], "{events:?}");
    assert_eq!(events.iter().filter(|e| !e.observed).count(), 1, "only the relay denial, enforced: {events:?}");
    assert!(!t.session.is_closed());
}

/// `Event::verb` names the exchange a verdict answered; the simulation's `bad_reply` invariant
/// checks each event's code against it (RFC 5321 §4.3.2), so a verb lost to `None` would
/// silence that check (a mutant returning `None` survived before).
#[test]
fn event_verbs_name_the_exchange_answered() {
    use crate::proto::Verb;
    let e = |command| Event { rule: Rule::E1, command, code: 250, ban: None, detail: String::new(), observed: false };
    let verbs = ["connect", "MAIL", "RCPT", "DATA", "QUIT"].map(|c| e(c).verb());
    assert_eq!(verbs, [Some(Verb::Greeting), Some(Verb::Mail), Some(Verb::Rcpt), Some(Verb::EndOfData), None]);
}

/// A big read (here 72 KB of pipelined NOOPs) is not kept once processed: an idle session
/// holds at most `INPUT_KEEP` bytes of input buffer (a mutant that kept it survived before).
#[test]
fn a_big_read_is_not_kept_by_an_idle_session() {
    let mut t = open();
    let n = 12_000;
    let replies = t.send("NOOP\r\n".repeat(n).as_str());
    assert_eq!(replies.len(), n);
    assert!(t.session.input.is_empty());
    assert!(t.session.input.capacity() <= INPUT_KEEP, "{}", t.session.input.capacity());
}

/// B4's share test counts accepted local recipients only: relay attempts (554) are none, so
/// ten of them do not make a dictionary attacker look like an MTA whose users mistype (a
/// mutant counting every E2 verdict as valid survived before, and spared this client).
#[test]
fn e2_b4_share_test_is_not_fooled_by_relay_attempts() {
    let mut t = ehlo(session_config());
    t.send("MAIL FROM:<x@elsewhere.test>\r\n");
    for i in 0..10 {
        assert_eq!(t.codes(&format!("RCPT TO:<r{i}@elsewhere.test>\r\n")), [554], "relay attempt {i}");
    }
    assert_eq!(t.codes("RCPT TO:<n1@example.test>\r\n"), [550]);
    assert!(t.bans().is_empty(), "the first unknown recipient is probe-shaped");
    assert_eq!(t.codes("RCPT TO:<n2@example.test>\r\n"), [550, 421]);
    assert_eq!(t.bans(), [BanReason::UnknownRecipient]);
    assert_eq!(t.session.b4_tally().session_valid, 0);
}

/// Observe mode observes refusals only: an acceptance is carried out as in enforce mode, so
/// an accepted recipient still waits for its C1 callback, and no observed event is made (a
/// mutant observing positive verdicts survived before: it skipped C1 in observe mode).
#[test]
fn observe_mode_leaves_acceptances_to_the_rules() {
    let cfg = SessionConfig { mode: Mode::Observe, verify_senders: true, ..session_config() };
    let mut t = open_with(cfg, 0);
    let codes = t.codes("EHLO a.test\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<alice@example.test>\r\n");
    assert_eq!(codes, [250, 250], "RCPT waits for the callback");
    assert_eq!(t.acts(), [Act::Verify("x@elsewhere.test".into())]);
    let events = t.events();
    assert!(events.iter().all(|e| !e.observed), "{events:?}");
}

/// B4's share test counts the client's valid recipients of earlier sessions too: one unknown
/// before and one now, against nine valid before (11 seen, 18 % unknown), is an MTA whose
/// users mistype: 550 without a ban. Without that history the same session is banned (a
/// mutant dropping `valid_before` from the tally survived before).
#[test]
fn e2_b4_share_test_counts_valid_recipients_of_earlier_sessions() {
    let with_history = |valid_before| {
        let mut t = open_client(session_config(), ClientInfo { valid_before, ..client(1) });
        let codes = t.codes("EHLO c\r\nMAIL FROM:<x@elsewhere.test>\r\nRCPT TO:<nobody@example.test>\r\n");
        (codes, t.bans())
    };
    assert_eq!(with_history(9), (vec![250, 250, 550], vec![]));
    assert_eq!(with_history(0), (vec![250, 250, 550, 421], vec![BanReason::UnknownRecipient]));
}
