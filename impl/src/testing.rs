//! The test kit: the fixtures every test of the session builds on, and one session driver.
//!
//! It is compiled for this crate's unit tests and with the `testing` cargo feature, which the
//! integration tests (`impl/tests`), the fuzz targets (`fuzz/`) and the benches (`benches/`)
//! enable; the binary and the simulation never use it, and nothing outside the tests may.
//!
//! - Fixtures: the standard site ([`HOSTNAME`] serving [`DOMAIN`] with [`USERS`], as
//!   [`CONFIG`] text, as [`Settings`], or as a [`Directory`] and a [`SessionConfig`]), the
//!   client ([`CLIENT`], [`SESSION_ID`]), an instant base ([`t0`]), and what the fake verifier,
//!   scanner and downstream answer ([`verification`], [`scan_outcome`], [`delivery`]).
//! - [`Driver`]: drives a [`Session`] as `server` does (the contract in [`crate::session`]):
//!   after every call it carries out every action at once — a ban is recorded, a callback, a
//!   scan or a handoff is answered from its [`Answers`] — and then collects the replies and
//!   the events, so a test reads them in order.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::config::{Config, Settings};
use crate::policy::{Directory, ScanOutcome, Verification};
use crate::proto::{Domain, Reply};
use crate::session::{Action, ClientInfo, DeliveryError, Event, Session, SessionConfig};

/// Our host name, in the greeting and the EHLO reply.
pub const HOSTNAME: &str = "mx.example.test";

/// The local domain.
pub const DOMAIN: &str = "example.test";

/// The users of [`DOMAIN`] (local parts).
pub const USERS: [&str; 2] = ["alice", "bob"];

/// The standard configuration file: [`HOSTNAME`] serving [`DOMAIN`] with [`USERS`], everything
/// else at its default.
pub const CONFIG: &str = r#"
[server]
hostname = "mx.example.test"
[domains]
local = ["example.test"]
users = ["alice@example.test", "bob@example.test"]
"#;

/// The client every fixture session talks to.
pub const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9));

/// The id of every fixture session.
pub const SESSION_ID: u64 = 42;

/// [`CONFIG`] followed by `extra` (tables [`CONFIG`] does not have), validated.
///
/// # Panics
/// If the text does not parse or validate: a broken fixture.
pub fn settings(extra: &str) -> Settings {
    let text = format!("{CONFIG}{extra}");
    Config::parse(&text).and_then(|c| c.validate(None)).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// [`DOMAIN`], parsed.
pub fn domain() -> Domain {
    Domain::parse(DOMAIN).expect("the fixture domain is valid")
}

/// [`DOMAIN`] with [`USERS`]; postmaster and abuse always accepted.
pub fn directory() -> Arc<Directory> {
    directory_with_users(0)
}

/// [`directory`] with `n` more users, `user0` to `user{n-1}`, as a small site has.
pub fn directory_with_users(n: u32) -> Arc<Directory> {
    let d = domain();
    let mut dir = Directory::new([d.clone()], true);
    for user in USERS {
        dir.add_user(user, &d);
    }
    for i in 0..n {
        dir.add_user(&format!("user{i}"), &d);
    }
    Arc::new(dir)
}

/// The session defaults (RFC 5321 limits, C1 and V1 off) with [`HOSTNAME`].
pub fn session_config() -> SessionConfig {
    SessionConfig { hostname: HOSTNAME.into(), ..SessionConfig::default() }
}

/// [`CLIENT`] in session [`SESSION_ID`], with `unknown_before` unknown recipients already
/// counted against it (B4).
pub fn client(unknown_before: u32) -> ClientInfo {
    ClientInfo { unknown_before, ..ClientInfo::new(SESSION_ID, CLIENT) }
}

/// The instant base: the same `Instant` for the whole process. Tests give times as offsets
/// from it, so that nothing depends on when they run.
pub fn t0() -> Instant {
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

/// What the fake verifier answers a callback: `k % 3` picks valid, invalid or unknown.
pub fn verification(k: u8) -> Verification {
    match k % 3 {
        0 => Verification::Valid { evidence: "250 2.1.5 Ok".into() },
        1 => Verification::Invalid { evidence: "550 5.1.1 No such user".into() },
        _ => Verification::Unknown { evidence: "timeout".into() },
    }
}

/// What the fake scanner answers: `k % 3` picks clean, infected (with the EICAR test
/// signature) or failed.
pub fn scan_outcome(k: u8) -> ScanOutcome {
    match k % 3 {
        0 => ScanOutcome::Clean,
        1 => ScanOutcome::Infected { signature: "Eicar-Test-Signature".into() },
        _ => ScanOutcome::Failed { reason: "scanner down".into() },
    }
}

/// What the fake downstream answers a handoff: `k % 3` picks delivered, a temporary failure
/// or a permanent one. The queue id of a delivered message is given by the [`Driver`].
pub fn delivery(k: u8) -> Result<(), DeliveryError> {
    match k % 3 {
        0 => Ok(()),
        1 => Err(DeliveryError::Temporary("disk full".into())),
        _ => Err(DeliveryError::Permanent("refused".into())),
    }
}

/// How a [`Driver`] answers the session's requests: the `n`-th request of a kind (from 0)
/// gets entry `n % len` of its list. An empty list leaves that kind unanswered: the action is
/// collected and the test answers it with the session's `handle_*` call.
#[derive(Debug, Clone, Default)]
pub struct Answers {
    /// Callback results (C1), for [`Action::Verify`].
    pub verify: Vec<Verification>,
    /// Scan outcomes (V1), for [`Action::Scan`].
    pub scan: Vec<ScanOutcome>,
    /// Handoff results, for [`Action::Deliver`]; `Ok` is answered with queue id `Q<n>`, `n`
    /// counting deliveries from 1.
    pub deliver: Vec<Result<(), DeliveryError>>,
}

impl Answers {
    /// Nothing is answered: every action waits for the test.
    pub fn held() -> Answers {
        Answers::default()
    }

    /// Everything succeeds: senders are valid, messages clean, handoffs delivered.
    pub fn ok() -> Answers {
        Answers { verify: vec![verification(0)], scan: vec![scan_outcome(0)], deliver: vec![delivery(0)] }
    }

    /// Each kind cycles through all its outcomes: valid, invalid, unknown; clean, infected,
    /// failed; delivered, temporary, permanent.
    pub fn cycling() -> Answers {
        Answers {
            verify: (0..3).map(verification).collect(),
            scan: (0..3).map(scan_outcome).collect(),
            deliver: (0..3).map(delivery).collect(),
        }
    }
}

/// Drives one [`Session`] the way the server does, with fake edges that answer at once, and
/// collects what comes out.
///
/// Every call that feeds the session ([`Driver::send`]) or reads its output
/// ([`Driver::replies`], [`Driver::actions`], [`Driver::events`]) first [pumps](Driver::pump)
/// it: actions are carried out in order (and kept), then replies and events are kept. The
/// reading calls hand over what was kept so far of their kind.
#[derive(Debug)]
pub struct Driver {
    /// The session driven; call its `handle_*` directly for what the driver does not do.
    pub session: Session,
    /// When the session started: [`Driver::at`] counts from here.
    pub start: Instant,
    /// The time given to the session with every call the driver makes.
    pub now: Instant,
    /// How requests are answered.
    pub answers: Answers,
    replies: Vec<Reply>,
    actions: Vec<Action>,
    events: Vec<Event>,
    /// The message being received, assembled from [`Action::Append`] as the server's file is.
    message: Vec<u8>,
    /// The message as it was at each [`Action::Scan`] and [`Action::Deliver`], in order.
    contents: Vec<Vec<u8>>,
    verifies: usize,
    scans: usize,
    deliveries: usize,
}

impl Driver {
    /// Drives `session`, which started at `start`; its greeting (or refusal) is collected.
    pub fn new(session: Session, start: Instant, answers: Answers) -> Driver {
        let mut d = Driver {
            session,
            start,
            now: start,
            answers,
            replies: Vec::new(),
            actions: Vec::new(),
            events: Vec::new(),
            message: Vec::new(),
            contents: Vec::new(),
            verifies: 0,
            scans: 0,
            deliveries: 0,
        };
        d.pump();
        d
    }

    /// A new session of the standard site ([`directory`], [`client`]) with `cfg`, started at
    /// [`t0`].
    pub fn standard(cfg: SessionConfig, unknown_before: u32, answers: Answers) -> Driver {
        let session = Session::new(t0(), Arc::new(cfg), directory(), client(unknown_before));
        Driver::new(session, t0(), answers)
    }

    /// Feeds `input` at [`Driver::now`] and returns the replies written since the last
    /// reading of replies (this input's, unless some were left unread).
    pub fn send(&mut self, input: &(impl AsRef<[u8]> + ?Sized)) -> Vec<Reply> {
        self.session.handle_input(self.now, input.as_ref());
        self.replies()
    }

    /// [`Driver::send`], giving the reply codes.
    pub fn codes(&mut self, input: &(impl AsRef<[u8]> + ?Sized)) -> Vec<u16> {
        codes(&self.send(input))
    }

    /// Carries out every pending action, answering those it has answers for, then collects
    /// the replies and events: the server's order, so a ban is recorded before its reply.
    pub fn pump(&mut self) {
        while let Some(action) = self.session.poll_action() {
            match &action {
                Action::Scan | Action::Deliver { .. } => self.contents.push(self.message.clone()),
                Action::Receive { .. } | Action::Discard => self.message.clear(),
                Action::Append { chunk } => self.message.extend_from_slice(chunk),
                _ => {}
            }
            match &action {
                Action::Verify { .. } => {
                    if let Some(result) = pick(&self.answers.verify, &mut self.verifies) {
                        self.session.handle_verified(self.now, result.clone(), Duration::ZERO);
                    }
                }
                Action::Scan => {
                    if let Some(outcome) = pick(&self.answers.scan, &mut self.scans) {
                        self.session.handle_scanned(self.now, outcome.clone());
                    }
                }
                Action::Deliver { .. } => {
                    if let Some(result) = pick(&self.answers.deliver, &mut self.deliveries) {
                        let result = result.clone().map(|()| format!("Q{}", self.deliveries));
                        self.session.handle_delivered(self.now, result);
                    }
                }
                // A handshake that succeeds at once (the session never sees TLS itself).
                Action::StartTls => {
                    self.session.handle_tls_permit(self.now, true);
                    self.session.handle_tls_started(self.now);
                }
                // The ban sink only records, the message's file is the caller's to assemble
                // from the actions, closing is the caller's to check.
                Action::Ban { .. }
                | Action::Close
                | Action::Receive { .. }
                | Action::Append { .. }
                | Action::Discard => {}
            }
            self.actions.push(action);
        }
        while let Some(reply) = self.session.poll_reply() {
            self.replies.push(reply);
        }
        while let Some(event) = self.session.poll_event() {
            self.events.push(event);
        }
    }

    /// The replies written since the last call, in order.
    pub fn replies(&mut self) -> Vec<Reply> {
        self.pump();
        std::mem::take(&mut self.replies)
    }

    /// The actions carried out since the last call, in order.
    pub fn actions(&mut self) -> Vec<Action> {
        self.pump();
        std::mem::take(&mut self.actions)
    }

    /// The content of each message scanned or handed off since the last call: one per
    /// [`Action::Scan`] and [`Action::Deliver`], in the actions' order, assembled from the
    /// [`Action::Append`]s before it.
    pub fn contents(&mut self) -> Vec<Vec<u8>> {
        self.pump();
        std::mem::take(&mut self.contents)
    }

    /// The verdict events since the last call, in order.
    pub fn events(&mut self) -> Vec<Event> {
        self.pump();
        std::mem::take(&mut self.events)
    }

    /// `secs` seconds after the start.
    pub fn at(&self, secs: u64) -> Instant {
        self.start + Duration::from_secs(secs)
    }

    /// Moves [`Driver::now`] on by `secs` seconds.
    pub fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
    }
}

/// The answer for the next request of a kind, counting it; `None` if the kind is unanswered.
fn pick<'a, T>(list: &'a [T], count: &mut usize) -> Option<&'a T> {
    if list.is_empty() {
        return None;
    }
    let answer = &list[*count % list.len()];
    *count += 1;
    Some(answer)
}

/// The reply codes.
pub fn codes(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.code).collect()
}

/// The replies as the server writes them to the client.
pub fn wire(replies: &[Reply]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in replies {
        r.write_to(&mut out);
    }
    out
}
