//! Criterion benches of the sans-IO core: a whole early-reject dialogue through a `Session`
//! (the common case in a backscatter flood), the command parser, and the RCPT rule.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use gatekeeper::policy::{self, Directory, PolicyConfig};
use gatekeeper::proto::{Command, ForwardPath, ReversePath};
use gatekeeper::session::{ClientInfo, Session, SessionConfig};
use gatekeeper::testing::{self, Answers, Driver};

/// One line per read, as a client that waits for each reply sends them.
const DIALOGUE: [&[u8]; 4] =
    [b"EHLO mx.example.org\r\n", b"MAIL FROM:<>\r\n", b"RCPT TO:<nobody@example.test>\r\n", b"QUIT\r\n"];

const MAIL_LINE: &[u8] = b"MAIL FROM:<someone@elsewhere.example.org> SIZE=12345 BODY=8BITMIME";

/// `example.test` with alice, bob and a thousand more users, as a small site has.
fn directory() -> Arc<Directory> {
    testing::directory_with_users(1000)
}

/// The dialogue through the test kit's driver, as the server drives a session; the replies
/// are written into `wire`. It asks for no callback, scan or handoff: nothing to answer.
fn dialogue(now: Instant, cfg: &Arc<SessionConfig>, dir: &Arc<Directory>, client: &ClientInfo, wire: &mut Vec<u8>) {
    let s = Session::new(now, Arc::clone(cfg), Arc::clone(dir), client.clone());
    let mut d = Driver::new(s, now, Answers::held());
    for r in d.replies() {
        r.write_to(wire);
    }
    for line in DIALOGUE {
        for r in d.send(line) {
            r.write_to(wire);
        }
    }
    black_box((d.actions(), d.events()));
}

fn bench_session(c: &mut Criterion) {
    let now = testing::t0();
    let cfg = Arc::new(testing::session_config());
    let dir = directory();
    let client = testing::client(0);
    let mut wire = Vec::with_capacity(1024);
    dialogue(now, &cfg, &dir, &client, &mut wire);
    let text = String::from_utf8_lossy(&wire);
    let codes: Vec<&str> = text.lines().map(|l| &l[..3]).collect();
    assert_eq!(codes, ["220", "250", "250", "250", "250", "250", "250", "550", "221"], "{text}");
    c.bench_function("session/early_reject_dialogue", |b| {
        b.iter(|| {
            wire.clear();
            dialogue(now, &cfg, &dir, &client, &mut wire);
            black_box(wire.len())
        })
    });
}

fn bench_parse(c: &mut Criterion) {
    assert!(matches!(Command::parse(MAIL_LINE), Ok(Command::Mail(..))));
    c.bench_function("proto/parse_mail", |b| b.iter(|| Command::parse(black_box(MAIL_LINE))));
}

fn bench_rcpt(c: &mut Criterion) {
    let dir = directory();
    let cfg = PolicyConfig::default();
    let from = ReversePath::Null;
    let unknown = ForwardPath::parse("<nobody@example.test>").expect("path");
    let known = ForwardPath::parse("<alice@example.test>").expect("path");
    let sender = ReversePath::parse("<x@elsewhere.test>").expect("path");
    let fresh = policy::B4Tally::default();
    // A second unknown recipient in the session: the B4 decision bans.
    let second = policy::B4Tally { session: 1, ..policy::B4Tally::default() };
    assert_eq!(policy::rcpt_to(&dir, &cfg, &from, &unknown, &fresh).reply.code, 550);
    assert_eq!(policy::rcpt_to(&dir, &cfg, &from, &known, &fresh).reply.code, 250);
    assert!(policy::rcpt_to(&dir, &cfg, &sender, &unknown, &second).ban.is_some());
    let mut g = c.benchmark_group("policy/rcpt_to");
    g.bench_function("known", |b| b.iter(|| policy::rcpt_to(&dir, &cfg, &from, black_box(&known), &fresh)));
    g.bench_function("unknown_null_sender", |b| {
        b.iter(|| policy::rcpt_to(&dir, &cfg, &from, black_box(&unknown), &fresh))
    });
    g.bench_function("unknown_with_ban", |b| {
        b.iter(|| policy::rcpt_to(&dir, &cfg, &sender, black_box(&unknown), &second))
    });
    g.finish();
}

criterion_group!(benches, bench_session, bench_parse, bench_rcpt);
criterion_main!(benches);
