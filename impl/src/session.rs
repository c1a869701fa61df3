//! One SMTP connection's state machine: proto + policy, sans-IO.
//!
//! Inputs are `handle_*(now, …)`; outputs are drained with `poll_*()` until `None`; timers are
//! `poll_timeout()` / `handle_timeout(now)`. The session never does IO and never reads a clock.
//! It is the only place that turns a verdict into a reply.
//!
//! Driver contract (see `server`):
//! 1. After every `handle_*` call, drain [`Session::poll_action`] first and carry each action
//!    out — in particular a [`Action::Ban`] is recorded *before* any reply is written, so a
//!    banned client never sees its reply without the ban being durable.
//! 2. Then write every [`Session::poll_reply`]. Replies come in command order (RFC 2920).
//! 3. While [`Session::wants_input`] is `false` (a probe, scan or delivery is pending), stop
//!    reading from the socket: pipelined input waits in the kernel, not in memory.
//!
//! A message is never held whole: after DATA the session asks for a file
//! ([`Action::Receive`]), hands the content out as it arrives ([`Action::Append`]), and at the
//! end of data asks for the scan and the handoff of that file, or for its removal
//! ([`Action::Discard`]). The driver tells the session when storage runs short
//! ([`Session::set_storage_short`], [`Session::handle_store_failed`]): 452 4.3.1.
//! 4. Stop after [`Action::Close`].
//! 5. When the session is over, record its [`Session::b4_tally`] (a probe-shaped session, or
//!    its counted unknown recipients) under the client's ban key; the next session of that
//!    client gets the counts in its [`ClientInfo`].
//!
//! A ban ends the session that earned it: the reply that carries it is followed by
//! `421 4.7.0` and [`Action::Close`], so a banned client cannot go on (RCPT to real users,
//! DATA) in the same session.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::policy::{
    self, B4Tally, BanReason, BanRequest, Directory, OnScanFailure, OnUnknown, PolicyConfig, Rule, ScanOutcome,
    Verdict, Verification,
};
use crate::proto::{
    Command, CommandError, DataEvent, DataReceiver, ForwardPath, LineEvent, LineReceiver, Mailbox, Reply, ReversePath,
    Verb,
};

/// Session limits and switches. Defaults follow RFC 5321 §4.5.3.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Our name in the greeting and EHLO reply.
    pub hostname: String,
    /// Largest message accepted, advertised as SIZE (RFC 1870).
    pub size_max: u64,
    /// Recipients per transaction (RFC 5321 §4.5.3.1.8: at least 100).
    pub rcpt_max: usize,
    /// 4xx/5xx replies before 421 and close. The default, 20, is Postfix's
    /// `smtpd_hard_error_limit`: a pipelined batch of ten unknown recipients is still answered.
    pub errors_max: u32,
    /// Waiting for a command or for more DATA (RFC 5321 §4.5.3.2.7: 5 minutes).
    pub command_timeout: Duration,
    /// The same wait once the client has had a 5xx: spammers get less patience.
    pub penalty_timeout: Duration,
    /// Longest a whole session may take.
    pub session_max: Duration,
    /// Messages one session may give: a MAIL beyond gets 421 4.7.0 and the session closes
    /// (the client goes on in a new one), so one connection cannot fill the spool at will.
    pub messages_max: u64,
    /// Messages one client (its ban key) may give per hour, all its sessions together: a MAIL
    /// beyond gets 451 4.7.1 (Postfix's `smtpd_client_message_rate_limit`). 0: no limit.
    pub client_messages_max: u32,
    /// Run callback verification (C1) of external senders.
    pub verify_senders: bool,
    /// What an inconclusive callback means.
    pub on_unknown: OnUnknown,
    /// Scan messages (V1) before delivery.
    pub scan: bool,
    /// What a failed scan means.
    pub on_scan_failure: OnScanFailure,
    /// The rules' tunables.
    pub policy: PolicyConfig,
    /// Enforce the rules' verdicts, or only observe them (`rules.mode`).
    pub mode: Mode,
}

/// What becomes of a rule's verdict (`rules.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Verdicts are replied and bans requested.
    #[default]
    Enforce,
    /// A dry run (Postfix's `warn_if_reject`): every verdict of a rule (G1, E1, E2, C1, V1) is
    /// computed, logged and counted as it would be (`would_reject`, `would_ban`), but the
    /// client gets the accepting reply and nobody is banned. Protocol errors and relay denial
    /// (a recipient in no local domain) are still enforced: observing must not open a relay.
    Observe,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            hostname: "gatekeeper.invalid".into(),
            size_max: 25 * 1024 * 1024,
            rcpt_max: 100,
            errors_max: 20,
            command_timeout: Duration::from_secs(300),
            penalty_timeout: Duration::from_secs(30),
            session_max: Duration::from_secs(1800),
            messages_max: 100,
            client_messages_max: 1000,
            verify_senders: false,
            on_unknown: OnUnknown::Tempfail,
            scan: false,
            on_scan_failure: OnScanFailure::Tempfail,
            policy: PolicyConfig::default(),
            mode: Mode::Enforce,
        }
    }
}

/// What the session knows about its client when it starts.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Session id, unique per server run; it appears in logs, bans and queue ids.
    pub id: u64,
    /// The client's address (after PROXY protocol, if any; IPv4-mapped IPv6 as IPv4).
    pub addr: IpAddr,
    /// Counted unknown recipients with a non-null sender this client (its ban key) gave
    /// within the B4 window before this session.
    pub unknown_before: u32,
    /// Probe-shaped sessions of this client within the B4 window before this one.
    pub probes_before: u32,
    /// Valid local recipients this client gave within the B4 window before this session
    /// (B4's share test).
    pub valid_before: u32,
    /// Messages this client (its ban key) gave in the current hour before this session.
    pub messages_before: u32,
    /// Never banned (an allowlisted network, a trusted PROXY peer): its verdicts are given,
    /// but no ban is requested and the session is not ended for one.
    pub exempt: bool,
}

impl ClientInfo {
    /// A client with no history that may be banned.
    pub fn new(id: u64, addr: IpAddr) -> Self {
        ClientInfo { id, addr, unknown_before: 0, probes_before: 0, valid_before: 0, messages_before: 0, exempt: false }
    }
}

/// Why the gate refused a connection before SMTP began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// G1: over the connection rate: 421 and close.
    RateLimited,
    /// G2: banned: 554 greeting, then 503 to everything until QUIT (RFC 5321 §3.1), for at
    /// most [`REFUSED_WAIT`]: then 421 and close, whatever the client does.
    Banned,
    /// Too many sessions overall or from this address: 421 and close.
    Busy,
}

/// A message ready for durable handoff.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Session id (queue ids derive from it).
    pub session: u64,
    /// The client's address.
    pub client: IpAddr,
    /// What it said in EHLO/HELO.
    pub helo: String,
    /// MAIL FROM.
    pub from: ReversePath,
    /// Accepted recipients; `<Postmaster>` is given as `postmaster@` the first local domain by
    /// the driver (the session does not know the domains' order of preference).
    pub rcpts: Vec<ForwardPath>,
    /// The message came over TLS (STARTTLS): `with ESMTPS` in the Received header.
    pub tls: bool,
}

/// Why a handoff failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryError {
    /// Try again later (451).
    Temporary(String),
    /// The downstream refused it for good (554).
    Permanent(String),
}

/// Something the driver must do for the session.
#[derive(Debug, Clone)]
pub enum Action {
    /// Ban the client; record it durably before writing further replies.
    Ban {
        /// The client.
        addr: IpAddr,
        /// Session id, for the evidence.
        session: u64,
        /// Reason and evidence.
        request: BanRequest,
    },
    /// Verify `sender` by callback (C1) and call [`Session::handle_verified`].
    Verify {
        /// The external sender.
        sender: Mailbox,
    },
    /// A message follows (DATA was accepted): create the file it is written to (at the
    /// downstream, which may stamp the envelope in it). If that fails, go on and answer the
    /// end of data with [`Session::handle_store_failed`].
    Receive {
        /// Envelope.
        envelope: Envelope,
    },
    /// Append content to the message's file: dot-unstuffed, CRLF line endings, in order.
    Append {
        /// The next octets of the message.
        chunk: Bytes,
    },
    /// Drop the message being received (too big): remove its file.
    Discard,
    /// Scan the message received (V1) and call [`Session::handle_scanned`].
    Scan,
    /// Hand the message received off durably and call [`Session::handle_delivered`].
    Deliver {
        /// Envelope.
        envelope: Envelope,
    },
    /// The client asked for STARTTLS: find out whether a handshake may start now (a place
    /// among the concurrent handshakes) and call [`Session::handle_tls_permit`]. Input is not
    /// processed meanwhile.
    StartTls,
    /// Close the connection after writing the replies.
    Close,
}

/// A decision worth logging and counting: one per verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The rule that decided.
    pub rule: Rule,
    /// The command it answered (`connect`, `MAIL`, `RCPT`, `DATA`, …).
    pub command: &'static str,
    /// The reply code.
    pub code: u16,
    /// The ban requested, if any.
    pub ban: Option<BanReason>,
    /// Extra detail (evidence, signature, queue id).
    pub detail: String,
    /// Observe mode ([`Mode::Observe`]): the verdict was not carried out: the client got the
    /// accepting reply (`would_reject`) and the ban, if any, was not requested (`would_ban`).
    pub observed: bool,
}

impl Event {
    /// The exchange the verdict answered, by its `command` name; `DATA` verdicts answer the
    /// end of the message, never the DATA command itself (which gets no verdict).
    pub fn verb(&self) -> Option<Verb> {
        match self.command {
            "connect" => Some(Verb::Greeting),
            "MAIL" => Some(Verb::Mail),
            "RCPT" => Some(Verb::Rcpt),
            "DATA" => Some(Verb::EndOfData),
            _ => None,
        }
    }

    /// `accept`, `tempfail` or `reject`, from the code.
    pub fn verdict(&self) -> &'static str {
        match self.code {
            200..=399 => "accept",
            400..=499 => "tempfail",
            _ => "reject",
        }
    }
}

#[derive(Debug)]
enum State {
    /// Before EHLO/HELO.
    Connected,
    /// After EHLO/HELO, no transaction.
    Ready,
    /// MAIL accepted.
    Mail(Transaction),
    /// After 354: receiving the message.
    Data(Transaction, DataReceiver),
    /// Refused at connect with 554: answer 503 until QUIT.
    Refused,
    /// Waiting for an action's result; input is not processed meanwhile.
    Waiting(Transaction, Pending),
    /// STARTTLS: waiting for [`Session::handle_tls_permit`], then (given) for the handshake
    /// ([`Session::handle_tls_started`]); `ready`: EHLO/HELO had been given.
    StartingTls { ready: bool, granted: bool },
    /// Done; everything is ignored.
    Closed,
}

#[derive(Debug)]
enum Pending {
    /// The first valid recipient waits for the sender's callback.
    Verify {
        rcpt: ForwardPath,
    },
    Scan,
    Deliver,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SenderCheck {
    NotNeeded,
    NotYet,
    Valid,
    /// The callback said invalid or unknown: every further RCPT gets this reply.
    Failed(Reply),
}

#[derive(Debug)]
struct Transaction {
    from: ReversePath,
    rcpts: Vec<ForwardPath>,
    /// An unknown local recipient was refused in this transaction (B4: DATA in it is an
    /// attack; DATA in a later one, after RSET and a new MAIL, is an MTA carrying on).
    unknown: bool,
    /// Recipients answered (accepted or not), for "no valid recipients" at DATA.
    sender: SenderCheck,
}

/// How long a session refused with 554 waits for QUIT (RFC 5321 §3.1) before it closes with
/// 421: a refused client must not hold a connection (a descriptor) for long, whatever it does.
pub const REFUSED_WAIT: Duration = Duration::from_secs(2);

/// Input capacity kept between reads; a bigger buffer (a message's reads) is let go once empty.
const INPUT_KEEP: usize = 4096;

/// One SMTP connection's state machine. No IO, no clock: `now` is always an argument.
#[derive(Debug)]
pub struct Session {
    cfg: Arc<SessionConfig>,
    dir: Arc<Directory>,
    client: ClientInfo,
    state: State,
    helo: Option<String>,
    lines: LineReceiver,
    input: Vec<u8>,
    replies: VecDeque<Reply>,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    errors: u32,
    had_5xx: bool,
    /// The client closed its side while an action was pending.
    eof: bool,
    /// B4: the client's record before this session, and this session's unknown recipients.
    b4: B4Tally,
    /// The driver says free space is below its threshold: MAIL gets 452 4.3.1.
    storage_short: bool,
    /// Refused at connect (554, or 421 and closed).
    refused: bool,
    /// No client address (PROXY `UNKNOWN` / v2 `LOCAL`, a health check): greeting, EHLO,
    /// NOOP, RSET and QUIT only; no transaction, so no rule ever applies.
    unidentified: bool,
    started: Instant,
    last_input: Instant,
    transactions: u64,
    /// The driver can do a TLS handshake ([`Session::offer_tls`]).
    tls_offered: bool,
    /// TLS is on (after [`Session::handle_tls_started`]).
    tls: bool,
}

impl Session {
    /// A new session that greets the client with 220.
    pub fn new(now: Instant, cfg: Arc<SessionConfig>, dir: Arc<Directory>, client: ClientInfo) -> Self {
        let greeting = Reply::greeting(&cfg.hostname);
        let mut s = Session::blank(now, cfg, dir, client, State::Connected);
        s.replies.push_back(greeting);
        s
    }

    /// A session for a connection without a client address (PROXY `UNKNOWN` or v2 `LOCAL`,
    /// as load balancers send for health checks): 220, and EHLO, HELO, NOOP, RSET and QUIT
    /// answered; MAIL gets 451 4.3.2, since no rule can judge a client it cannot name.
    pub fn unidentified(now: Instant, cfg: Arc<SessionConfig>, dir: Arc<Directory>, client: ClientInfo) -> Self {
        let mut s = Session::new(now, cfg, dir, client);
        s.unidentified = true;
        s
    }

    /// A session for a connection the gate refuses (G1, G2, busy).
    pub fn refused(
        now: Instant,
        cfg: Arc<SessionConfig>,
        dir: Arc<Directory>,
        client: ClientInfo,
        why: Refusal,
    ) -> Self {
        let mut s = Session::blank(now, cfg, dir, client, State::Refused);
        s.refused = true;
        let host = s.cfg.hostname.clone();
        match why {
            Refusal::Banned => {
                // RFC 5321 §3.1: a 554 greeting, then wait for QUIT.
                s.verdict_reply("connect", Verdict { rule: Rule::G2, reply: Reply::banned(&host), ban: None });
            }
            Refusal::RateLimited => {
                s.verdict_reply("connect", Verdict { rule: Rule::G1, reply: Reply::rate_limited(&host), ban: None });
                s.close();
            }
            Refusal::Busy => {
                s.verdict_reply("connect", Verdict { rule: Rule::G1, reply: Reply::busy(&host), ban: None });
                s.close();
            }
        }
        s
    }

    fn blank(now: Instant, cfg: Arc<SessionConfig>, dir: Arc<Directory>, client: ClientInfo, state: State) -> Self {
        let b4 = B4Tally {
            earlier: client.unknown_before,
            earlier_probes: client.probes_before,
            earlier_valid: client.valid_before,
            ..B4Tally::default()
        };
        Session {
            cfg,
            dir,
            client,
            state,
            helo: None,
            lines: LineReceiver::new(),
            input: Vec::new(),
            replies: VecDeque::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            errors: 0,
            had_5xx: false,
            eof: false,
            b4,
            storage_short: false,
            refused: false,
            unidentified: false,
            started: now,
            last_input: now,
            transactions: 0,
            tls_offered: false,
            tls: false,
        }
    }

    /// The driver can upgrade this connection to TLS: STARTTLS is advertised in EHLO and
    /// accepted (RFC 3207). Call it right after creating the session.
    pub fn offer_tls(&mut self) {
        self.tls_offered = true;
    }

    /// `true` once TLS is on.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The answer to [`Action::StartTls`]: whether a handshake may start now. Given, the
    /// session replies 220 and discards whatever the client sent after STARTTLS: plaintext
    /// pipelined behind it must never be taken as if it came over TLS (the STARTTLS
    /// command-injection class of bugs, CVE-2011-0411). The driver writes the reply, then
    /// hands the connection to TLS and calls [`Session::handle_tls_started`]. Refused (too
    /// many handshakes under way), 454 4.7.0 and the session goes on in clear text.
    pub fn handle_tls_permit(&mut self, now: Instant, granted: bool) {
        let State::StartingTls { ready, granted: false } = self.state else { return };
        if granted {
            self.state = State::StartingTls { ready, granted: true };
            self.replies.push_back(Reply::tls_ready());
            self.input.clear();
            self.lines = LineReceiver::new();
        } else {
            self.state = if ready { State::Ready } else { State::Connected };
            self.reply_error(Reply::tls_unavailable());
            self.last_input = now;
            self.process(now);
        }
    }

    /// The TLS handshake is done: the session starts over (RFC 3207 §4.2: everything learnt
    /// before, the EHLO argument in particular, is forgotten; the client must send EHLO
    /// again). STARTTLS is no longer offered. No greeting is sent.
    pub fn handle_tls_started(&mut self, now: Instant) {
        if !matches!(self.state, State::StartingTls { granted: true, .. }) {
            return;
        }
        self.state = State::Connected;
        self.tls = true;
        self.helo = None;
        self.input.clear();
        self.lines = LineReceiver::new();
        self.last_input = now;
    }

    /// Bytes from the client. They are processed at once unless an action is pending, in which
    /// case they wait (the driver should not read more until [`Session::wants_input`]).
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        if matches!(self.state, State::Closed) {
            return;
        }
        self.last_input = now;
        self.input.extend_from_slice(bytes);
        self.process(now);
        if self.input.is_empty() && self.input.capacity() > INPUT_KEEP {
            // A big read (a message's) is not kept for an idle session.
            self.input = Vec::new();
        }
    }

    /// Whether free space is below the driver's threshold (`server.queue_minfree`): while it
    /// is, MAIL gets 452 4.3.1. Call it before handing over input; it holds until changed.
    pub fn set_storage_short(&mut self, short: bool) {
        self.storage_short = short;
    }

    /// The message being received could not be stored (its file could not be created or
    /// written: disk full, an I/O error): the pending scan or handoff it asked for is not
    /// carried out, and its end of data gets 452 4.3.1. Spurious calls are no-ops.
    pub fn handle_store_failed(&mut self, now: Instant, why: String) {
        if !matches!(self.state, State::Waiting(_, Pending::Scan | Pending::Deliver)) {
            return;
        }
        self.state = State::Ready;
        let verdict = Verdict { rule: Rule::Deliver, reply: Reply::insufficient_storage(), ban: None };
        self.verdict_reply_with("DATA", verdict, why);
        self.last_input = now;
        self.process(now);
    }

    /// The client closed its side. A pending probe, scan or handoff is finished (its reply
    /// can no longer be read, but a complete message is never dropped); then the session
    /// closes once the input already received is processed.
    pub fn handle_eof(&mut self, _now: Instant) {
        self.eof = true;
        if !matches!(self.state, State::Waiting(..)) {
            self.close();
        }
    }

    /// The result of a callback probe requested with [`Action::Verify`]. `waited` is, for an
    /// unknown result, how long ago this client's network first tried this sender with an
    /// unknown result (zero the first time; the driver keeps that table, see
    /// [`policy::UnknownSenders`]); it is ignored for the other results.
    pub fn handle_verified(&mut self, now: Instant, result: Verification, waited: Duration) {
        if !matches!(self.state, State::Waiting(_, Pending::Verify { .. })) {
            return; // spurious: nothing was asked
        }
        let State::Waiting(mut tx, Pending::Verify { rcpt }) = std::mem::replace(&mut self.state, State::Closed) else {
            unreachable!()
        };
        let verdict = policy::verified(&result, self.cfg.on_unknown, &self.cfg.policy, waited, &tx.from);
        if self.observed("RCPT", &verdict, Some(result.evidence().to_string())) {
            tx.sender = SenderCheck::Valid;
            tx.rcpts.push(rcpt);
            self.state = State::Mail(tx);
            self.replies.push_back(Reply::recipient_ok());
            self.last_input = now;
            return self.process(now);
        }
        let evidence = match &result {
            Verification::Unknown { evidence } if verdict.reply.is_positive() => {
                format!("{evidence}; unverifiable for {} s: accepted", waited.as_secs())
            }
            other => other.evidence().to_string(),
        };
        tx.sender = if verdict.reply.is_positive() {
            tx.rcpts.push(rcpt);
            SenderCheck::Valid
        } else {
            SenderCheck::Failed(verdict.reply.clone())
        };
        self.state = State::Mail(tx);
        self.verdict_reply_with("RCPT", verdict, evidence);
        self.last_input = now;
        self.process(now);
    }

    /// The result of a scan requested with [`Action::Scan`].
    pub fn handle_scanned(&mut self, now: Instant, outcome: ScanOutcome) {
        if !matches!(self.state, State::Waiting(_, Pending::Scan)) {
            return;
        }
        let State::Waiting(tx, Pending::Scan) = std::mem::replace(&mut self.state, State::Closed) else {
            unreachable!()
        };
        let detail = match &outcome {
            ScanOutcome::Clean => "clean".to_string(),
            ScanOutcome::Infected { signature } => signature.clone(),
            ScanOutcome::Failed { reason } => reason.clone(),
        };
        match policy::scanned(&self.dir, &outcome, self.cfg.on_scan_failure, &tx.from, &tx.rcpts) {
            Some(verdict) if !self.observed("DATA", &verdict, Some(detail.clone())) => {
                self.state = State::Ready;
                self.actions.push_back(Action::Discard);
                self.verdict_reply_with("DATA", verdict, detail);
                self.last_input = now;
                self.process(now);
            }
            _ => self.deliver(tx),
        }
    }

    /// The result of a handoff requested with [`Action::Deliver`]: `Ok(queue_id)` or an error.
    pub fn handle_delivered(&mut self, now: Instant, result: Result<String, DeliveryError>) {
        if !matches!(self.state, State::Waiting(_, Pending::Deliver)) {
            return;
        }
        self.state = State::Ready;
        let (reply, detail) = match result {
            Ok(id) => (Reply::queued(&id), id),
            Err(DeliveryError::Temporary(why)) => (Reply::local_error(), why),
            Err(DeliveryError::Permanent(why)) => (Reply::refused_downstream(), why),
        };
        self.verdict_reply_with("DATA", Verdict { rule: Rule::Deliver, reply, ban: None }, detail);
        self.last_input = now;
        self.process(now);
    }

    /// The server is shutting down and the grace period is over: 421 and close (RFC 5321
    /// §3.8). Never called while an action is pending, so no handoff is cut short.
    pub fn handle_shutdown(&mut self, _now: Instant) {
        if matches!(self.state, State::Closed | State::Waiting(..)) {
            return;
        }
        self.replies.push_back(Reply::shutting_down(&self.cfg.hostname));
        self.close();
    }

    /// A timer fired; spurious calls are no-ops.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(deadline) = self.poll_timeout() else { return };
        if now < deadline {
            return;
        }
        let reply = if now >= self.started + self.cfg.session_max {
            Reply::lifetime_exceeded(&self.cfg.hostname)
        } else {
            Reply::idle_timeout(&self.cfg.hostname)
        };
        self.replies.push_back(reply);
        self.close();
    }

    /// The next reply to write, in order.
    #[must_use]
    pub fn poll_reply(&mut self) -> Option<Reply> {
        self.replies.pop_front()
    }

    /// The next action to carry out; drain these before writing replies.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next verdict event, for logs and counters.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Session::handle_timeout`] should be called; `None` while an action is pending
    /// (the driver bounds its own work) or after close.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Closed | State::Waiting(..) | State::StartingTls { .. } => None,
            State::Refused => Some(self.started + REFUSED_WAIT),
            _ => {
                let idle = if self.had_5xx { self.cfg.penalty_timeout } else { self.cfg.command_timeout };
                Some((self.last_input + idle).min(self.started + self.cfg.session_max))
            }
        }
    }

    /// `false` while an action is pending or after close: do not read more input.
    pub fn wants_input(&self) -> bool {
        !matches!(self.state, State::Closed | State::Waiting(..) | State::StartingTls { .. }) && self.input.is_empty()
    }

    /// `true` for a session the gate refused ([`Session::refused`]): it lasts at most
    /// [`REFUSED_WAIT`], and the driver should not wait long on it either.
    pub fn is_refused(&self) -> bool {
        self.refused
    }

    /// `true` once the session has closed (after [`Action::Close`]).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Unknown recipients with a non-null sender in this session (B4 counting).
    pub fn unknown_rcpts(&self) -> u32 {
        self.b4.session
    }

    /// The B4 record: once the session is over, [`B4Tally::is_probe`] says it was
    /// probe-shaped (remember it as a probe), otherwise `session` unknown recipients count.
    pub fn b4_tally(&self) -> B4Tally {
        self.b4
    }

    /// Its configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// The client.
    pub fn client(&self) -> &ClientInfo {
        &self.client
    }

    /// Messages accepted for delivery in this session.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    fn close(&mut self) {
        if !matches!(self.state, State::Closed) {
            self.state = State::Closed;
            self.actions.push_back(Action::Close);
        }
        self.input.clear();
    }

    fn process(&mut self, now: Instant) {
        let mut input = std::mem::take(&mut self.input);
        let mut rest: &[u8] = &input;
        loop {
            match &mut self.state {
                State::Closed | State::Waiting(..) | State::StartingTls { .. } => break,
                State::Data(_, receiver) => {
                    let event = receiver.next(&mut rest);
                    let content = receiver.take_content();
                    if !content.is_empty() {
                        self.actions.push_back(Action::Append { chunk: Bytes::from(content) });
                    }
                    match event {
                        Some(event) => self.end_of_data(event),
                        None => break,
                    }
                }
                _ => match self.lines.next(&mut rest) {
                    Some(LineEvent::Line(line)) => self.command(now, &line),
                    Some(LineEvent::TooLong) => {
                        self.reply_error(Reply::line_too_long());
                    }
                    None => break,
                },
            }
        }
        let consumed = input.len() - rest.len();
        if self.eof && !matches!(self.state, State::Waiting(..) | State::StartingTls { .. }) {
            self.close();
        }
        if matches!(self.state, State::Closed) {
            input.clear();
        } else {
            input.drain(..consumed);
        }
        self.input = input;
    }

    fn command(&mut self, now: Instant, line: &[u8]) {
        let _ = now;
        if matches!(self.state, State::Refused) {
            // RFC 5321 §3.1: after a 554 greeting, 503 to everything but QUIT, malformed or not.
            return match Command::parse(line) {
                Ok(Command::Quit) => self.quit(),
                _ => self.reply_error(Reply::refused_session()),
            };
        }
        let cmd = match Command::parse(line) {
            Ok(cmd) => cmd,
            Err(e) => return self.command_error(e),
        };
        match cmd {
            Command::Ehlo(host) => {
                let starttls = self.tls_offered && !self.tls;
                let r = Reply::ehlo_offering(&self.cfg.hostname, &host, self.cfg.size_max, starttls);
                self.helo = Some(host);
                self.state = State::Ready;
                self.replies.push_back(r);
            }
            Command::Helo(host) => {
                self.replies.push_back(Reply::helo(&self.cfg.hostname));
                self.helo = Some(host);
                self.state = State::Ready;
            }
            Command::Mail(from, params) => self.mail(from, params.size),
            Command::Rcpt(to, _) => self.rcpt(to),
            Command::Data => self.data(),
            Command::Rset => {
                if !matches!(self.state, State::Connected) {
                    self.state = State::Ready;
                }
                self.replies.push_back(Reply::reset());
            }
            Command::Noop => self.replies.push_back(Reply::noop()),
            Command::Quit => self.quit(),
            Command::Vrfy(_) => self.replies.push_back(policy::vrfy()),
            Command::Help => self.replies.push_back(Reply::help()),
            Command::StartTls => self.starttls(),
            Command::NotImplemented(_) => self.reply_error(Reply::not_implemented()),
        }
    }

    fn starttls(&mut self) {
        if self.tls {
            return self.reply_error(Reply::tls_bad_sequence("TLS already active"));
        }
        if !self.tls_offered {
            return self.reply_error(Reply::not_implemented());
        }
        let ready = match self.state {
            State::Connected => false,
            State::Ready => true,
            _ => return self.reply_error(Reply::tls_bad_sequence("Mail transaction in progress")),
        };
        self.state = State::StartingTls { ready, granted: false };
        self.actions.push_back(Action::StartTls);
    }

    fn command_error(&mut self, e: CommandError) {
        let (verdict, command) = match e {
            CommandError::BadReversePath(p) => (policy::malformed_sender(p), "MAIL"),
            CommandError::BadForwardPath(p) => (policy::malformed_recipient(p), "RCPT"),
            CommandError::Unrecognized => return self.reply_error(Reply::unrecognized()),
            CommandError::NotText => return self.reply_error(Reply::not_text()),
            CommandError::Syntax(what) => return self.reply_error(Reply::syntax(what)),
            CommandError::BadParameter(p) => return self.reply_error(Reply::bad_parameter(&p)),
        };
        // Sequence errors take precedence over argument errors for MAIL (RFC 5321 §4.1.4).
        if command == "MAIL" && !matches!(self.state, State::Ready) {
            return self.mail_sequence_error();
        }
        if command == "RCPT" && !matches!(self.state, State::Mail(_)) {
            return self.reply_error(Reply::need_mail());
        }
        self.verdict_reply(command, verdict);
    }

    fn mail_sequence_error(&mut self) {
        let reply = match self.state {
            State::Connected => Reply::need_helo(),
            _ => Reply::nested_mail(),
        };
        self.reply_error(reply);
    }

    fn mail(&mut self, from: ReversePath, size: Option<u64>) {
        if !matches!(self.state, State::Ready) {
            return self.mail_sequence_error();
        }
        if self.unidentified {
            return self.reply_error(Reply::no_client_address());
        }
        if size.is_some_and(|s| s > self.cfg.size_max) {
            return self.verdict_reply("MAIL", Verdict { rule: Rule::Proto, reply: Reply::too_big(), ban: None });
        }
        if self.transactions >= self.cfg.messages_max {
            let reply = Reply::too_many_messages(&self.cfg.hostname);
            return self.verdict_reply("MAIL", Verdict { rule: Rule::Proto, reply, ban: None });
        }
        let limit = u64::from(self.cfg.client_messages_max);
        if limit > 0 && u64::from(self.client.messages_before) + self.transactions >= limit {
            let reply = Reply::too_much_mail_from_client();
            return self.verdict_reply("MAIL", Verdict { rule: Rule::Proto, reply, ban: None });
        }
        if self.storage_short {
            let reply = Reply::insufficient_storage();
            return self.verdict_reply("MAIL", Verdict { rule: Rule::Proto, reply, ban: None });
        }
        let verdict = policy::mail_from(&self.dir, &from);
        let observed = self.observed("MAIL", &verdict, None);
        if observed || verdict.reply.is_positive() {
            let sender = match &from {
                ReversePath::Mailbox(m) if self.cfg.verify_senders && !self.dir.is_local(m) => SenderCheck::NotYet,
                _ => SenderCheck::NotNeeded,
            };
            self.state = State::Mail(Transaction { from, rcpts: Vec::new(), unknown: false, sender });
        }
        if observed {
            return self.replies.push_back(Reply::sender_ok());
        }
        self.verdict_reply("MAIL", verdict);
    }

    fn rcpt(&mut self, to: ForwardPath) {
        let State::Mail(tx) = &mut self.state else {
            return self.reply_error(Reply::need_mail());
        };
        if tx.rcpts.len() >= self.cfg.rcpt_max {
            // RFC 5321 §4.5.3.1.10: 452, and the client sends the rest in another transaction.
            return self.reply_error(Reply::too_many_recipients());
        }
        let verdict = policy::rcpt_to(&self.dir, &self.cfg.policy, &tx.from, &to, &self.b4);
        if policy::is_b4_unknown(&tx.from, &verdict) {
            self.b4.session += 1;
            tx.unknown = true;
        } else if verdict.rule == Rule::E2 && verdict.reply.is_positive() {
            self.b4.session_valid += 1;
        }
        if self.observed("RCPT", &verdict, None) {
            if let State::Mail(tx) = &mut self.state {
                tx.rcpts.push(to);
            }
            return self.replies.push_back(Reply::recipient_ok());
        }
        if !verdict.reply.is_positive() {
            return self.verdict_reply("RCPT", verdict);
        }
        let State::Mail(tx) = &mut self.state else { unreachable!() };
        if policy::always_accepted(&self.dir, &to) {
            // E2: postmaster and abuse are accepted whatever C1 says (RFC 5321 §4.5.1).
            tx.rcpts.push(to);
            return self.verdict_reply("RCPT", verdict);
        }
        match &tx.sender {
            SenderCheck::NotNeeded | SenderCheck::Valid => {
                tx.rcpts.push(to);
                self.verdict_reply("RCPT", verdict);
            }
            SenderCheck::Failed(reply) => {
                // The C1 verdict stands for every further recipient: an event, but no new ban.
                let reply = reply.clone();
                self.verdict_reply("RCPT", Verdict { rule: Rule::C1, reply, ban: None });
            }
            SenderCheck::NotYet => {
                let sender = tx.from.mailbox().cloned().expect("NotYet only for mailbox senders");
                let State::Mail(tx) = std::mem::replace(&mut self.state, State::Closed) else { unreachable!() };
                self.state = State::Waiting(tx, Pending::Verify { rcpt: to });
                self.actions.push_back(Action::Verify { sender });
            }
        }
    }

    fn data(&mut self) {
        // Postfix RSETs after a refused recipient and sends its next message in the same
        // connection: DATA in a later transaction says nothing about the unknown recipient.
        // DATA in its transaction, or with none open (after RSET), does.
        let after_unknown = match &self.state {
            State::Mail(tx) => tx.unknown,
            _ => true,
        };
        if self.b4.session > 0 && !self.b4.data && after_unknown {
            // E2: DATA after an unknown recipient: no longer probe-shaped (a probe never sends
            // DATA), so a deferred unknown recipient counts now.
            let decided = (self.b4.is_probe() && !self.client.exempt).then(|| {
                let from = match &self.state {
                    State::Mail(tx) => format!("MAIL FROM:{} ", tx.from),
                    _ => String::new(),
                };
                policy::data_after_unknown(&self.cfg.policy, &self.b4, || {
                    format!("{from}DATA after an unknown recipient")
                })
            });
            self.b4.data = true;
            if let Some(Some(verdict)) = decided
                && !self.observed("DATA", &verdict, None)
            {
                return self.verdict_reply("DATA", verdict);
            }
        }
        match &self.state {
            State::Mail(tx) if !tx.rcpts.is_empty() => {}
            State::Mail(_) => {
                // RFC 2920 §3.1 / RFC 5321 §3.3: all recipients were refused.
                return self.reply_error(Reply::no_valid_recipients());
            }
            _ => return self.reply_error(Reply::need_mail_and_rcpt()),
        }
        let State::Mail(tx) = std::mem::replace(&mut self.state, State::Closed) else { unreachable!() };
        self.actions.push_back(Action::Receive { envelope: self.envelope(&tx) });
        self.state = State::Data(tx, DataReceiver::new(self.cfg.size_max));
        self.replies.push_back(Reply::start_data());
    }

    fn end_of_data(&mut self, event: DataEvent) {
        let State::Data(tx, _) = std::mem::replace(&mut self.state, State::Ready) else { unreachable!() };
        let reply = match event {
            DataEvent::Complete { .. } => {
                if self.cfg.scan {
                    self.state = State::Waiting(tx, Pending::Scan);
                    self.actions.push_back(Action::Scan);
                } else {
                    self.deliver(tx);
                }
                return;
            }
            DataEvent::TooBig { .. } => Reply::too_big(),
        };
        self.actions.push_back(Action::Discard);
        self.verdict_reply("DATA", Verdict { rule: Rule::Proto, reply, ban: None });
    }

    fn envelope(&self, tx: &Transaction) -> Envelope {
        Envelope {
            session: self.client.id,
            client: self.client.addr,
            helo: self.helo.clone().unwrap_or_default(),
            from: tx.from.clone(),
            rcpts: tx.rcpts.clone(),
            tls: self.tls,
        }
    }

    fn deliver(&mut self, tx: Transaction) {
        let envelope = self.envelope(&tx);
        self.transactions += 1;
        self.state = State::Waiting(tx, Pending::Deliver);
        self.actions.push_back(Action::Deliver { envelope });
    }

    fn quit(&mut self) {
        self.replies.push_back(Reply::bye(&self.cfg.hostname));
        self.close();
    }

    fn verdict_reply(&mut self, command: &'static str, verdict: Verdict) {
        let detail = verdict.ban.as_ref().map(|b| b.evidence.clone()).unwrap_or_default();
        self.verdict_reply_with(command, verdict, detail);
    }

    /// The one place where a verdict becomes a reply (plus its ban and event). A ban ends
    /// the session: after its reply, 421 4.7.0 and close.
    fn verdict_reply_with(&mut self, command: &'static str, verdict: Verdict, mut detail: String) {
        let Verdict { rule, reply, mut ban } = verdict;
        if self.client.exempt
            && let Some(b) = ban.take()
        {
            detail = format!("not banned ({} exempt: allowlisted or trusted proxy): {}", b.reason, b.evidence);
        }
        if self.cfg.mode == Mode::Observe
            && let Some(b) = ban.take()
        {
            // Only a verdict observe mode must enforce (a protocol error) can get here with a
            // ban; none does today, but observe mode never bans.
            detail = format!("not banned (observe mode): {}: {}", b.reason, b.evidence);
        }
        let event =
            Event { rule, command, code: reply.code, ban: ban.as_ref().map(|b| b.reason), detail, observed: false };
        self.events.push_back(event);
        let banned = ban.is_some();
        if let Some(request) = ban {
            self.actions.push_back(Action::Ban { addr: self.client.addr, session: self.client.id, request });
        }
        if reply.is_positive() || reply.code == 354 {
            self.replies.push_back(reply);
        } else {
            self.reply_error(reply);
        }
        if banned && !self.is_closed() {
            self.replies.push_back(Reply::banned_closing(&self.cfg.hostname));
            self.close();
        }
    }

    /// Observe mode ([`Mode::Observe`]): a rule's refusal (G1, E1, E2, C1, V1) is recorded as
    /// an observed event, with the code and ban it would have had, and `true` says: go on as
    /// if accepted. Protocol verdicts, relay denial and acceptances are not observed (`false`:
    /// carry the verdict out).
    fn observed(&mut self, command: &'static str, verdict: &Verdict, detail: Option<String>) -> bool {
        let observable = matches!(verdict.rule, Rule::G1 | Rule::E1 | Rule::E2 | Rule::C1 | Rule::V1);
        if self.cfg.mode != Mode::Observe
            || !observable
            || verdict.reply.is_positive()
            || verdict.reply == Reply::relay_denied()
        {
            return false;
        }
        let detail = detail
            .or_else(|| verdict.ban.as_ref().map(|b| b.evidence.clone()))
            .unwrap_or_else(|| verdict.reply.lines.join(" "));
        self.events.push_back(Event {
            rule: verdict.rule,
            command,
            code: verdict.reply.code,
            ban: verdict.ban.as_ref().map(|b| b.reason),
            detail,
            observed: true,
        });
        true
    }

    /// Sends a 4xx/5xx reply and counts it; at the limit, 421 and close.
    fn reply_error(&mut self, reply: Reply) {
        self.had_5xx |= reply.is_permanent();
        let closing = reply.code == 421;
        self.replies.push_back(reply);
        if closing {
            return self.close();
        }
        self.errors += 1;
        if self.errors >= self.cfg.errors_max {
            self.replies.push_back(Reply::too_many_errors(&self.cfg.hostname));
            self.close();
        }
    }
}

#[cfg(test)]
mod tests;
