//! The SMTP session state machine driven as the server drives it, on an arbitrary byte stream.
//!
//! Input: a 6-octet header (configuration, the outcomes the fake edges answer, how the stream
//! is cut into reads, how the session ends), then the client's byte stream. The stream is fed
//! twice: run A in one `handle_input`, run B cut into reads of 1..=N octets with a spurious
//! timer call after each. After every call the test kit's driver (`gatekeeper::testing`)
//! carries out every action (verify, scan, deliver answered at once with the header's
//! outcomes), then collects the replies and events, as `server::carry_out` does; the target
//! checks and hashes all of them.
//!
//! Invariants besides "no panic":
//! - every reply is well formed: code 200..=555, at least one line, and its wire form parses
//!   back to it with `Reply::parse` (RFC 5321 §4.2: one code, textstrings, each line at most
//!   512 octets, §4.5.3.1.5);
//! - every verdict's code is one RFC 5321 §4.3.2 allows for the exchange it answers (`Verb`);
//! - a 421 or 221 closes the session: `Action::Close` once, `is_closed()`, and nothing at all
//!   comes out afterwards, whatever the input;
//! - once its actions are carried out, the session is closed or wants input (no stall);
//! - a session refused at connect never verifies, scans, delivers or bans;
//! - messages handed to scan or delivery are within `size_max`, CRLF-terminated lines of at
//!   most 1000 octets and no bare CR, with 1..=`rcpt_max` recipients;
//! - memory: the heap the session holds (counted by a global allocator) stays within
//!   `2 * size_max` plus a constant per octet of the largest single read, however long the
//!   stream;
//! - chunking does not matter: runs A and B produce the same replies, actions and events;
//! - a due timer, or a shutdown, closes an open session with 421.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use gatekeeper::policy::{OnScanFailure, OnUnknown, PolicyConfig};
use gatekeeper::proto::{Reply, TEXT_LINE_MAX};
use gatekeeper::session::{Action, Refusal, Session, SessionConfig};
use gatekeeper::testing::{self, Answers, Driver};
use libfuzzer_sys::fuzz_target;

/// Counts the live heap octets of this process's Rust allocations.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only a counter is kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What the header asks for.
#[derive(Debug, Clone)]
struct Setup {
    cfg: Arc<SessionConfig>,
    refused: bool,
    unknown_before: u32,
    /// What the fake edges answer: the n-th request of a kind takes outcome
    /// `(sel >> (2 * (n % 4))) % 3` of its kind, `sel` a selector from the header.
    answers: Answers,
    /// Largest read in run B, and the seed that cuts the stream.
    chunk_max: usize,
    seed: u64,
    /// How the session ends after the stream: EOF, EOF before the last actions are carried
    /// out, a due timer, a shutdown, or nothing.
    ending: u8,
}

impl Setup {
    fn new(h: [u8; 6]) -> Self {
        let size_max = 32 * (1 + u64::from(h[4] & 0x7f));
        let cfg = SessionConfig {
            hostname: testing::HOSTNAME.into(),
            size_max,
            rcpt_max: 1 + usize::from(h[3] & 7),
            errors_max: 1 + u32::from(h[2] & 15),
            command_timeout: Duration::from_secs(300),
            penalty_timeout: Duration::from_secs(30),
            session_max: Duration::from_secs(1800),
            verify_senders: h[0] & 1 != 0,
            on_unknown: if h[0] & 2 != 0 { OnUnknown::Accept } else { OnUnknown::Tempfail },
            scan: h[0] & 4 != 0,
            on_scan_failure: if h[0] & 8 != 0 { OnScanFailure::Accept } else { OnScanFailure::Tempfail },
            policy: PolicyConfig { b4_threshold: 1 + u32::from((h[3] >> 3) & 3), ..PolicyConfig::default() },
        };
        const CHUNKS: [usize; 8] = [1, 2, 3, 7, 16, 64, 512, 4096];
        let cycle = |sel: u8| (0..4).map(move |n| pick(sel, n));
        let answers = Answers {
            verify: cycle(h[1]).map(testing::verification).collect(),
            scan: cycle(h[1].rotate_left(3)).map(testing::scan_outcome).collect(),
            deliver: cycle(h[2] >> 4 | (h[4] & 0x80) >> 3).map(testing::delivery).collect(),
        };
        Setup {
            cfg: Arc::new(cfg),
            refused: h[0] & 0x10 != 0,
            unknown_before: u32::from(h[3] >> 5),
            answers,
            chunk_max: CHUNKS[usize::from(h[5] & 7)],
            seed: u64::from(h[5] >> 3) + 1,
            ending: h[0] >> 5,
        }
    }
}

/// One run: a session in the test kit's driver, and hashes of everything it produced.
struct Run<'a> {
    setup: &'a Setup,
    d: Driver,
    replies: DefaultHasher,
    actions: DefaultHasher,
    events: DefaultHasher,
    closed: bool,
    eof: bool,
    /// Heap octets before the session existed.
    baseline: usize,
    largest_read: usize,
    wire: Vec<u8>,
    /// The message being received, assembled from its `Append`s as the server's file is.
    message: Vec<u8>,
    /// Everything produced, in order, when a mismatch is being explained.
    transcript: Option<Vec<String>>,
}

impl<'a> Run<'a> {
    fn new(setup: &'a Setup, now: Instant, transcript: bool) -> Self {
        let dir = testing::directory();
        let answers = setup.answers.clone();
        let mut wire = Vec::with_capacity(4096);
        wire.push(0);
        wire.clear();
        let baseline = LIVE.load(Ordering::Relaxed);
        let client = testing::client(setup.unknown_before);
        let s = if setup.refused {
            Session::refused(now, setup.cfg.clone(), dir, client, Refusal::Banned)
        } else {
            Session::new(now, setup.cfg.clone(), dir, client)
        };
        let mut run = Run {
            setup,
            d: Driver::new(s, now, answers),
            replies: DefaultHasher::new(),
            actions: DefaultHasher::new(),
            events: DefaultHasher::new(),
            closed: false,
            eof: false,
            baseline,
            transcript: transcript.then(Vec::new),
            largest_read: 0,
            wire,
            message: Vec::new(),
        };
        run.drive();
        run
    }

    /// One read from the client; with `eof`, the client closes right after it, before the
    /// driver carries out what the read asked for.
    fn read(&mut self, bytes: &[u8], eof: bool) {
        self.largest_read = self.largest_read.max(bytes.len());
        self.d.session.handle_input(self.d.now, bytes);
        if eof {
            self.d.session.handle_eof(self.d.now);
            self.eof = true;
        }
        self.drive();
    }

    /// Lets the driver carry out every action, then checks each action, reply and event.
    fn drive(&mut self) {
        let was_closed = self.closed;
        let mut closes = 0;
        let mut closing_reply = false;
        for action in self.d.actions() {
            assert!(!was_closed, "action after close: {action:?}");
            self.action(action, &mut closes);
        }
        for reply in self.d.replies() {
            assert!(!was_closed, "reply after close: {reply}");
            self.check_reply(&reply);
            closing_reply |= reply.code == 421 || reply.code == 221;
        }
        for ev in self.d.events() {
            assert!(!was_closed, "event after close: {ev:?}");
            assert!((200..=555).contains(&ev.code), "event code {}", ev.code);
            assert!(ev.verb().is_none_or(|verb| verb.allows(ev.code)), "{} answered {}", ev.command, ev.code);
            let item = (ev.rule.as_str(), ev.command, ev.code, ev.ban.map(|b| b.as_str()), &ev.detail);
            item.hash(&mut self.events);
            self.log(|| format!("event {item:?}"));
        }
        assert!(closes <= 1, "{closes} Close actions at once");
        if closes == 1 {
            assert!(self.d.session.is_closed(), "Close action but the session is not closed");
            self.closed = true;
        }
        if closing_reply {
            assert!(self.closed, "421 or 221 without Close");
        }
        assert!(
            self.d.session.is_closed() || self.d.session.wants_input(),
            "session stalled: no action pending, no input wanted"
        );
        self.check_memory();
    }

    /// Checks and hashes one action the driver carried out.
    fn action(&mut self, action: Action, closes: &mut u32) {
        let cfg = &self.setup.cfg;
        if self.setup.refused {
            assert!(matches!(action, Action::Close), "refused session asked for {action:?}");
        }
        match action {
            Action::Ban { addr, session, request } => {
                assert_eq!((addr, session), (testing::CLIENT, testing::SESSION_ID));
                let item = ("ban", request.reason.as_str(), &request.evidence);
                item.hash(&mut self.actions);
                self.log(|| format!("action {item:?}"));
            }
            Action::Verify { sender } => {
                assert!(cfg.verify_senders, "verify without verify_senders");
                let item = ("verify", sender.to_string());
                item.hash(&mut self.actions);
                self.log(|| format!("action {item:?}"));
            }
            // How the content is cut into `Append`s follows the reads: it is hashed as the
            // message each scan and handoff names, and checked as it grows.
            Action::Receive { envelope } => {
                self.message.clear();
                assert_eq!((envelope.session, envelope.client), (testing::SESSION_ID, testing::CLIENT));
                "receive".hash(&mut self.actions);
                self.log(|| "action receive".into());
            }
            Action::Append { chunk } => {
                // Content comes in whole lines: each chunk is checked, and the total.
                check_message(cfg, &chunk);
                self.message.extend_from_slice(&chunk);
                assert!(self.message.len() as u64 <= cfg.size_max, "message over {}", cfg.size_max);
            }
            Action::Discard => {
                self.message.clear();
                "discard".hash(&mut self.actions);
                self.log(|| "action discard".into());
            }
            Action::Scan => {
                assert!(cfg.scan, "scan without scan");
                let message = std::mem::take(&mut self.message);
                check_message(cfg, &message);
                let item = ("scan", &message[..]);
                item.hash(&mut self.actions);
                self.log(|| format!("action {item:?}"));
                self.message = message;
            }
            Action::Deliver { envelope } => {
                let message = std::mem::take(&mut self.message);
                check_message(cfg, &message);
                assert!(!envelope.rcpts.is_empty() && envelope.rcpts.len() <= cfg.rcpt_max, "{envelope:?}");
                assert_eq!((envelope.session, envelope.client), (testing::SESSION_ID, testing::CLIENT));
                let rcpts: Vec<String> = envelope.rcpts.iter().map(ToString::to_string).collect();
                let item = ("deliver", envelope.from.to_string(), rcpts, &envelope.helo, &message[..]);
                item.hash(&mut self.actions);
                self.log(|| format!("action {item:?}"));
                self.message = message;
            }
            Action::StartTls => unreachable!("the fuzzed session is offered no TLS"),
            Action::Close => {
                *closes += 1;
                "close".hash(&mut self.actions);
                self.log(|| "action close".into());
            }
        }
    }

    fn check_reply(&mut self, reply: &Reply) {
        assert!((200..=555).contains(&reply.code), "reply code {}", reply.code);
        assert!(!reply.lines.is_empty(), "reply without text: {reply:?}");
        self.wire.clear();
        reply.write_to(&mut self.wire);
        assert_eq!(Reply::parse(&self.wire).as_ref(), Ok(reply), "{:?}", String::from_utf8_lossy(&self.wire));
        self.wire.hash(&mut self.replies);
        if self.transcript.is_some() {
            let wire = String::from_utf8_lossy(&self.wire).into_owned();
            self.log(|| format!("reply {wire:?}"));
        }
    }

    /// Keeps a readable transcript when asked to (only to explain a mismatch).
    fn log(&mut self, item: impl FnOnce() -> String) {
        if let Some(log) = &mut self.transcript {
            log.push(item());
        }
    }

    fn check_memory(&self) {
        if self.transcript.is_some() {
            return; // the transcript itself grows with the stream
        }
        let held = LIVE.load(Ordering::Relaxed).saturating_sub(self.baseline);
        // The message being received, assembled here (the session itself holds none of it:
        // Vec growth, twice its bound), plus buffers and queues sized by the largest single
        // read (pending input, content handed out, replies to one read's commands).
        let bound = 2 * self.setup.cfg.size_max as usize + 64 * self.largest_read + 64 * 1024;
        assert!(held <= bound, "session holds {held} heap octets, bound {bound}");
    }

    /// After the stream: the chosen ending, then a check that a closed session stays silent.
    fn end(&mut self) {
        match self.setup.ending % 5 {
            0 | 1 => {
                // Ending 1 had its EOF with the last read (unless the stream was empty).
                if !self.eof {
                    self.d.session.handle_eof(self.d.now);
                    self.drive();
                }
                assert!(self.closed, "not closed after EOF");
            }
            2 => match self.d.session.poll_timeout() {
                Some(deadline) => {
                    self.d.now = deadline - Duration::from_nanos(1);
                    self.d.session.handle_timeout(self.d.now);
                    self.drive();
                    assert!(!self.closed, "timer fired early");
                    self.d.now = deadline;
                    self.d.session.handle_timeout(self.d.now);
                    self.drive_expecting_421();
                }
                None => assert!(self.closed, "open session without a timer"),
            },
            3 => {
                let open = !self.closed;
                self.d.session.handle_shutdown(self.d.now);
                if open {
                    self.drive_expecting_421();
                } else {
                    self.drive();
                }
            }
            _ => {}
        }
        if self.closed {
            let (s, now) = (&mut self.d.session, self.d.now);
            s.handle_input(now, b"EHLO again.test\r\nQUIT\r\n");
            s.handle_eof(now);
            s.handle_shutdown(now);
            s.handle_timeout(now + Duration::from_secs(1 << 20));
            self.drive();
        }
    }

    fn drive_expecting_421(&mut self) {
        let mut last = None;
        for reply in self.d.replies() {
            assert!(!self.closed, "reply after close: {reply}");
            self.check_reply(&reply);
            last = Some(reply.code);
        }
        assert_eq!(last, Some(421), "no 421 at the end");
        self.drive();
        assert!(self.closed, "421 without Close");
    }

    fn digest(&self) -> (u64, u64, u64) {
        (self.replies.finish(), self.actions.finish(), self.events.finish())
    }
}

fn pick(sel: u8, n: u32) -> u8 {
    (sel >> (2 * (n % 4))) % 3
}

fn check_message(cfg: &SessionConfig, message: &[u8]) {
    assert!(message.len() as u64 <= cfg.size_max, "message of {} octets over {}", message.len(), cfg.size_max);
    assert!(message.is_empty() || message.ends_with(b"\r\n"), "message does not end with CRLF");
    for line in message.split_inclusive(|&b| b == b'\n') {
        assert!(line.ends_with(b"\r\n"), "bare LF in a message");
        assert!(!line[..line.len() - 2].contains(&b'\r'), "bare CR in a message");
        assert!(line.len() <= TEXT_LINE_MAX, "message line of {} octets", line.len());
    }
}

/// Cuts `stream` into reads of 1..=`max` octets.
fn chunks(stream: &[u8], max: usize, mut seed: u64) -> impl Iterator<Item = &[u8]> {
    let mut rest = stream;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        // xorshift64
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = (1 + (seed % max as u64) as usize).min(rest.len());
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    })
}

/// Run A: the whole stream in one read.
fn whole(setup: &Setup, t0: Instant, stream: &[u8], transcript: bool) -> ((u64, u64, u64), Option<Vec<String>>) {
    let mut a = Run::new(setup, t0, transcript);
    a.read(stream, setup.ending % 5 == 1);
    a.end();
    (a.digest(), a.transcript.take())
}

/// Run B: the stream cut into reads, with a spurious timer call after each.
fn cut(setup: &Setup, t0: Instant, stream: &[u8], transcript: bool) -> ((u64, u64, u64), Option<Vec<String>>) {
    let mut b = Run::new(setup, t0, transcript);
    let mut pieces = chunks(stream, setup.chunk_max, setup.seed).peekable();
    while let Some(piece) = pieces.next() {
        b.read(piece, setup.ending % 5 == 1 && pieces.peek().is_none());
        b.d.session.handle_timeout(b.d.now);
        b.drive();
    }
    b.end();
    (b.digest(), b.transcript.take())
}

fuzz_target!(|data: &[u8]| {
    let mut h = [0u8; 6];
    let n = data.len().min(6);
    h[..n].copy_from_slice(&data[..n]);
    let stream = &data[n..];
    let setup = Setup::new(h);
    let t0 = Instant::now();
    let (a, _) = whole(&setup, t0, stream, false);
    let (b, _) = cut(&setup, t0, stream, false);
    if a != b {
        let (_, a) = whole(&setup, t0, stream, true);
        let (_, b) = cut(&setup, t0, stream, true);
        let (a, b) = (a.unwrap(), b.unwrap());
        for kind in ["reply", "action", "event"] {
            let a: Vec<&String> = a.iter().filter(|i| i.starts_with(kind)).collect();
            let b: Vec<&String> = b.iter().filter(|i| i.starts_with(kind)).collect();
            let Some(at) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) else { continue };
            let window = |v: &[&String]| -> Vec<String> {
                v[at.saturating_sub(3).min(v.len())..(at + 3).min(v.len())].iter().map(|s| s.to_string()).collect()
            };
            panic!(
                "the stream cut into reads gives other {kind}s: first difference at {kind} {at}\n\
                 whole: {:#?}\ncut:   {:#?}\nsetup: {setup:?}",
                window(&a),
                window(&b),
            );
        }
        panic!("digests differ but transcripts agree");
    }
});
