//! The rules of docs/design.md §2 as pure functions of facts: who is local, what the client said,
//! and how it behaved before. A verdict names the rule that decided it, the reply, and an
//! optional ban request. No IO, no clock reads (`now` is an argument where time matters), and
//! no knowledge of the session: the session calls these and sends what they return.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::proto::{Domain, ForwardPath, Host, Mailbox, PathError, Reply, ReversePath};

/// The rule that decided a verdict (docs/design.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Rule {
    /// Connection gate: one new connection per IP per window.
    G1,
    /// Ban gate: a banned client's connections are refused.
    G2,
    /// Early rejects at MAIL FROM.
    E1,
    /// Early rejects at RCPT TO.
    E2,
    /// Callback verification of the sender.
    C1,
    /// Virus scan.
    V1,
    /// Protocol: syntax, sequence and limits (RFC 5321), not a policy decision.
    Proto,
    /// Delivery (the durable handoff after DATA).
    Deliver,
}

impl Rule {
    /// The stable name used in logs and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::G1 => "G1",
            Rule::G2 => "G2",
            Rule::E1 => "E1",
            Rule::E2 => "E2",
            Rule::C1 => "C1",
            Rule::V1 => "V1",
            Rule::Proto => "proto",
            Rule::Deliver => "deliver",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a client is banned (docs/design.md §2, bans B1–B4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum BanReason {
    /// B1: a sender in a local domain whose local part does not exist.
    ForgedLocalSender,
    /// B2: the sender failed callback verification (5xx on RCPT at its MX).
    FakeSender,
    /// B3: the message carried a virus.
    Virus,
    /// B4: unknown local recipients with a non-null sender.
    UnknownRecipient,
    /// Added by an administrator.
    Manual,
}

impl BanReason {
    /// The stable short name (`B1` … `B4`, `manual`).
    pub fn as_str(self) -> &'static str {
        match self {
            BanReason::ForgedLocalSender => "B1",
            BanReason::FakeSender => "B2",
            BanReason::Virus => "B3",
            BanReason::UnknownRecipient => "B4",
            BanReason::Manual => "manual",
        }
    }
}

impl fmt::Display for BanReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request to ban the client, with the evidence that justifies it. The session adds the
/// address and session id; the ban manager decides whether and how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BanRequest {
    /// B1–B4.
    pub reason: BanReason,
    /// The command or finding that proves it (e.g. `MAIL FROM:<nobody@example.test>`).
    pub evidence: String,
}

/// What the rules decided about one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The deciding rule.
    pub rule: Rule,
    /// The reply to send.
    pub reply: Reply,
    /// A ban to request, if the client has proven itself a spammer.
    pub ban: Option<BanRequest>,
}

impl Verdict {
    fn accept(rule: Rule, reply: Reply) -> Self {
        Verdict { rule, reply, ban: None }
    }
}

/// The local domains and their users (E1, E2, R1). `postmaster@` every local domain always
/// exists (RFC 5321 §4.5.1); so does `abuse@` unless turned off (RFC 2142).
#[derive(Debug, Clone, Default)]
pub struct Directory {
    domains: BTreeSet<Domain>,
    users: BTreeSet<String>,
    abuse_always: bool,
    /// Characters that end the mailbox part of a local part (`alice+news` is `alice`); empty:
    /// none.
    delimiters: String,
}

/// A problem in a user list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    /// The line is not `local@domain`.
    #[error("line {line}: {text:?} is not an address (local@domain): {error}")]
    BadAddress {
        /// 1-based line number.
        line: usize,
        /// The offending text.
        text: String,
        /// Why.
        error: PathError,
    },
    /// The address's domain is not one of the local domains.
    #[error("line {line}: {text:?} is not in a local domain")]
    NotLocal {
        /// 1-based line number.
        line: usize,
        /// The offending text.
        text: String,
    },
}

impl Directory {
    /// An empty directory for `domains`, with the default recipient delimiter `+`.
    pub fn new(domains: impl IntoIterator<Item = Domain>, abuse_always: bool) -> Self {
        Directory {
            domains: domains.into_iter().collect(),
            users: BTreeSet::new(),
            abuse_always,
            delimiters: DEFAULT_RECIPIENT_DELIMITER.to_string(),
        }
    }

    /// Sets the recipient delimiter: each character of `delimiters` ends the mailbox part of a
    /// local part, so `alice+news@` is `alice@` for every existence check (as Postfix's
    /// `recipient_delimiter`). Empty turns it off.
    pub fn with_recipient_delimiter(mut self, delimiters: &str) -> Self {
        self.delimiters = delimiters.to_string();
        self
    }

    /// The local part without its extension: `alice+news` is `alice` (the first delimiter
    /// ends it; a local part that starts with one is left alone).
    fn base<'a>(&self, local: &'a str) -> &'a str {
        if self.delimiters.is_empty() {
            return local;
        }
        match local.find(|c| self.delimiters.contains(c)) {
            Some(i) if i > 0 => &local[..i],
            _ => local,
        }
    }

    /// Adds a user; `local` is matched case-insensitively.
    pub fn add_user(&mut self, local: &str, domain: &Domain) {
        self.users.insert(key(local, domain));
    }

    /// Adds every address of a user list: one `local@domain` a line; blank lines and `#`
    /// comments are ignored. Returns every problem found, adding the good lines regardless.
    pub fn add_list(&mut self, text: &str) -> Vec<DirectoryError> {
        let mut errors = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            match Mailbox::parse(line) {
                Ok(m) => match m.domain().filter(|d| self.domains.contains(*d)) {
                    Some(d) => {
                        let d = d.clone();
                        self.add_user(m.local.as_str(), &d);
                    }
                    None => errors.push(DirectoryError::NotLocal { line: i + 1, text: line.to_string() }),
                },
                Err(error) => errors.push(DirectoryError::BadAddress { line: i + 1, text: line.to_string(), error }),
            }
        }
        errors
    }

    /// `true` if we receive mail for `domain`.
    pub fn is_local_domain(&self, domain: &Domain) -> bool {
        self.domains.contains(domain)
    }

    /// `true` if the mailbox's host is one of our domains.
    pub fn is_local(&self, mailbox: &Mailbox) -> bool {
        mailbox.domain().is_some_and(|d| self.is_local_domain(d))
    }

    /// `true` if `mailbox` is a local address that exists.
    pub fn exists(&self, mailbox: &Mailbox) -> bool {
        let Some(domain) = mailbox.domain().filter(|d| self.is_local_domain(d)) else {
            return false;
        };
        let local = mailbox.local.as_str();
        // A user whose own name holds the delimiter (`a+b` listed) matches as is.
        if self.users.contains(&key(local, domain)) {
            return true;
        }
        let base = self.base(local);
        base.eq_ignore_ascii_case("postmaster")
            || (self.abuse_always && base.eq_ignore_ascii_case("abuse"))
            || (base.len() < local.len() && self.users.contains(&key(base, domain)))
    }

    /// `true` if `mailbox` is `postmaster@` or `abuse@` a local domain (extension ignored),
    /// whether or not `abuse@` is always accepted: the role addresses that receive abuse
    /// reports.
    pub fn is_role(&self, mailbox: &Mailbox) -> bool {
        let base = self.base(mailbox.local.as_str());
        self.is_local(mailbox) && (base.eq_ignore_ascii_case("postmaster") || base.eq_ignore_ascii_case("abuse"))
    }

    /// The local domains, sorted.
    pub fn domains(&self) -> impl Iterator<Item = &Domain> {
        self.domains.iter()
    }

    /// Number of users listed (without the implicit postmaster and abuse).
    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}

/// The recipient delimiter unless configured otherwise (Postfix's customary `+`).
pub const DEFAULT_RECIPIENT_DELIMITER: &str = "+";

/// `local@domain`, the local part lower-cased: how the users are stored and looked up. Built
/// by hand: every local recipient is looked up once or twice (`format!` was 1,400 instructions).
fn key(local: &str, domain: &Domain) -> String {
    let mut k = String::with_capacity(local.len() + 1 + domain.as_str().len());
    k.push_str(local);
    k.make_ascii_lowercase();
    k.push('@');
    k.push_str(domain.as_str());
    k
}

/// Tunables of the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// B4 fires once a client has given this many unknown recipients with a non-null sender
    /// within `b4_window` (docs/design.md §2 (rules): 1).
    pub b4_threshold: u32,
    /// The B4 counting window (1 h); also how long a probe-shaped session is remembered.
    pub b4_window: Duration,
    /// B4's share test: a client whose unknown recipients are below this percentage of all
    /// the local recipients it gave within the window (50) ...
    pub b4_unknown_share_max: u32,
    /// ... once it gave at least this many (10), is an MTA whose users mistype: not banned.
    pub b4_share_min_recipients: u32,
    /// C1: an unknown sender is tempfailed (451) only this long after the first attempt of the
    /// same (client network, sender); a retry after that is accepted (30 min).
    pub unknown_sender_tempfail_max: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            b4_threshold: 1,
            b4_window: Duration::from_secs(3600),
            b4_unknown_share_max: 50,
            b4_share_min_recipients: 10,
            unknown_sender_tempfail_max: Duration::from_secs(30 * 60),
        }
    }
}

/// E1 for a MAIL FROM whose path did not parse: 5xx, never a ban.
pub fn malformed_sender(error: PathError) -> Verdict {
    Verdict::accept(Rule::E1, Reply::bad_sender(error))
}

/// A recipient path that did not parse (RFC 5321 §4.1.1.3): 5xx, never a ban.
pub fn malformed_recipient(error: PathError) -> Verdict {
    Verdict::accept(Rule::E2, Reply::bad_recipient(error))
}

/// E1 at MAIL FROM: `<>` is always accepted (RFC 5321 §4.5.5, §6.1); a forged local sender is
/// refused and banned (B1); any other sender is accepted here (C1 decides later).
pub fn mail_from(dir: &Directory, from: &ReversePath) -> Verdict {
    let ok = || Verdict::accept(Rule::E1, Reply::sender_ok());
    match from {
        ReversePath::Null => ok(),
        ReversePath::Mailbox(m) if dir.is_local(m) && !dir.exists(m) => Verdict {
            rule: Rule::E1,
            reply: Reply::forged_local_sender(),
            ban: Some(BanRequest { reason: BanReason::ForgedLocalSender, evidence: format!("MAIL FROM:{from}") }),
        },
        ReversePath::Mailbox(_) => ok(),
    }
}

/// E2: recipients accepted whoever the sender is: `<Postmaster>`, `postmaster@` every local
/// domain (RFC 5321 §4.5.1) and `abuse@` when that is on (RFC 2142). C1 neither holds them back
/// nor refuses them, even for a sender that failed its callback.
pub fn always_accepted(dir: &Directory, to: &ForwardPath) -> bool {
    match to {
        ForwardPath::Postmaster => true,
        ForwardPath::Mailbox(m) => {
            let local = dir.base(m.local.as_str());
            dir.is_local(m)
                && (local.eq_ignore_ascii_case("postmaster")
                    || (dir.abuse_always && local.eq_ignore_ascii_case("abuse")))
        }
    }
}

/// What a client has done towards B4: unknown local recipients with a non-null sender, in
/// this session and (within the B4 window) before it.
///
/// A session whose one unknown recipient is the client's first in the window, and that ends
/// without a second one and without DATA, is *probe-shaped*: that is how Postfix's
/// `MAIL FROM:<double-bounce@…>` address verification looks, and it is not an offence unless
/// the client does it again within the window (docs/design.md §2 (rules), E2). Until the
/// session shows which it is, its first unknown recipient is deferred, not counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct B4Tally {
    /// Counted unknown recipients from earlier sessions within the window.
    pub earlier: u32,
    /// Earlier probe-shaped sessions within the window (one unknown recipient each).
    pub earlier_probes: u32,
    /// Unknown recipients in this session so far.
    pub session: u32,
    /// DATA was given after this session's first unknown recipient.
    pub data: bool,
    /// Valid local recipients from earlier sessions within the window (any sender).
    pub earlier_valid: u32,
    /// Valid local recipients in this session so far.
    pub session_valid: u32,
}

impl B4Tally {
    /// Probe-shaped so far: one unknown recipient, the client's first in the window, and
    /// nothing since that makes it an attack. Not (yet) an offence.
    pub fn is_probe(&self) -> bool {
        self.earlier == 0 && self.earlier_probes == 0 && self.session == 1 && !self.data
    }

    /// The unknown recipients that count towards the threshold now: none while probe-shaped;
    /// once the client repeats itself, the earlier probes count too.
    pub fn offences(&self) -> u32 {
        if self.is_probe() { 0 } else { self.earlier + self.earlier_probes + self.session }
    }

    /// B4's share test: the client gave at least `b4_share_min_recipients` local recipients
    /// within the window, and fewer than `b4_unknown_share_max` % of them were unknown — an
    /// MTA whose users mistype, not a dictionary attacker (docs/design.md §2, B4).
    pub fn mostly_valid(&self, cfg: &PolicyConfig) -> bool {
        let unknown = u64::from(self.earlier) + u64::from(self.earlier_probes) + u64::from(self.session);
        let seen = unknown + u64::from(self.earlier_valid) + u64::from(self.session_valid);
        seen >= u64::from(cfg.b4_share_min_recipients) && unknown * 100 < u64::from(cfg.b4_unknown_share_max) * seen
    }
}

/// B4: a ban once the counted unknown recipients reach the threshold (never while the session
/// is probe-shaped, never for a session without unknown recipients, never for a client whose
/// recipients were mostly valid).
pub fn b4(cfg: &PolicyConfig, tally: &B4Tally, evidence: impl FnOnce() -> String) -> Option<BanRequest> {
    (tally.session > 0 && tally.offences() >= cfg.b4_threshold && !tally.mostly_valid(cfg))
        .then(|| BanRequest { reason: BanReason::UnknownRecipient, evidence: evidence() })
}

/// E2 at RCPT TO. `tally` is the client's B4 record before this recipient; an unknown local
/// recipient with a non-null sender adds one to it (see [`is_b4_unknown`]).
pub fn rcpt_to(dir: &Directory, cfg: &PolicyConfig, from: &ReversePath, to: &ForwardPath, tally: &B4Tally) -> Verdict {
    let ok = || Verdict::accept(Rule::E2, Reply::recipient_ok());
    let mailbox = match to {
        ForwardPath::Postmaster => return ok(),
        ForwardPath::Mailbox(m) => m,
    };
    let local = match &mailbox.host {
        Host::Domain(d) => dir.is_local_domain(d),
        _ => false,
    };
    if !local {
        // Never an open relay; no ban: misconfigured clients do this too.
        return Verdict::accept(Rule::E2, Reply::relay_denied());
    }
    if dir.exists(mailbox) {
        return ok();
    }
    // `<>` to an unknown user may be a real bounce or another server's callback (R1): no ban.
    let ban = if from.is_null() {
        None
    } else {
        let t = B4Tally { session: tally.session + 1, ..*tally };
        b4(cfg, &t, || {
            let before = tally.earlier + tally.earlier_probes;
            format!("MAIL FROM:{from} RCPT TO:{to} (unknown recipient {} of this session, {before} before)", t.session)
        })
    };
    Verdict { rule: Rule::E2, reply: Reply::unknown_user(), ban }
}

/// `true` if `verdict` (from [`rcpt_to`]) refused an unknown local recipient of a non-null
/// sender: one more towards B4.
pub fn is_b4_unknown(from: &ReversePath, verdict: &Verdict) -> bool {
    !from.is_null() && verdict.rule == Rule::E2 && verdict.reply == Reply::unknown_user()
}

/// E2 at DATA after a probe-shaped start: DATA makes it an attack (a probe never sends
/// DATA), so the deferred unknown recipient counts now. The ban, if any, ends the session:
/// DATA is answered 421 (RFC 5321 §3.8) and no message is taken.
pub fn data_after_unknown(cfg: &PolicyConfig, tally: &B4Tally, evidence: impl FnOnce() -> String) -> Option<Verdict> {
    let t = B4Tally { data: true, ..*tally };
    let ban = b4(cfg, &t, evidence)?;
    let reply = Reply::unknown_recipients_closing();
    Some(Verdict { rule: Rule::E2, reply, ban: Some(ban) })
}

/// VRFY: we do not disclose users (RFC 5321 §3.5.3 permits 252).
pub fn vrfy() -> Reply {
    Reply::cannot_vrfy()
}

/// The outcome of a callback probe of a sender (C1), as the verifier reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// The sender's MX accepted `RCPT TO:<sender>` and refused a random address (or the
    /// domain is allowlisted).
    Valid {
        /// What proved it (the remote reply, or `allowlisted`, or `cached`).
        evidence: String,
    },
    /// The sender's MX accepted a random local part too: the address is valid as far as
    /// anyone can tell, but unverifiable. Accepted, never tempfailed.
    AcceptAll {
        /// What showed it.
        evidence: String,
    },
    /// The mailbox does not exist: a 5xx on RCPT with the enhanced code 5.1.1, 5.1.2 or
    /// 5.1.10, or a null MX (RFC 7505). The only finding that bans (B2).
    Invalid {
        /// What proved it.
        evidence: String,
    },
    /// The sender's domain cannot receive mail: NXDOMAIN, or neither MX nor address. Refused,
    /// never a ban: a broken local resolver must not ban the world.
    Undeliverable {
        /// What showed it.
        evidence: String,
    },
    /// Anything else: 4xx, policy refusals (5.7.x, a bare 550), timeouts, refused
    /// connections, DNS failures, probe limits. Never a ban.
    Unknown {
        /// Why it is unknown.
        evidence: String,
    },
}

impl Verification {
    /// The evidence, whatever the outcome.
    pub fn evidence(&self) -> &str {
        match self {
            Verification::Valid { evidence }
            | Verification::AcceptAll { evidence }
            | Verification::Invalid { evidence }
            | Verification::Undeliverable { evidence }
            | Verification::Unknown { evidence } => evidence,
        }
    }

    /// The stable short name (`valid`, `accept_all`, `invalid`, `undeliverable`, `unknown`).
    pub fn kind(&self) -> &'static str {
        match self {
            Verification::Valid { .. } => "valid",
            Verification::AcceptAll { .. } => "accept_all",
            Verification::Invalid { .. } => "invalid",
            Verification::Undeliverable { .. } => "undeliverable",
            Verification::Unknown { .. } => "unknown",
        }
    }
}

/// What to do with a sender whose callback was inconclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnknown {
    /// 451 4.4.3 while within `unknown_sender_tempfail_max` of the first attempt, then accept
    /// (the default).
    #[default]
    Tempfail,
    /// Accept the recipient as if the sender were valid.
    Accept,
}

/// C1: the verdict on the first valid recipient once the sender's callback is known.
/// `waited` is how long ago this client network first tried this sender with an unknown
/// result (zero the first time): an unknown sender is tempfailed only within
/// `unknown_sender_tempfail_max` of that, so that no honest message waits until its sender's
/// queue gives up.
pub fn verified(
    result: &Verification,
    on_unknown: OnUnknown,
    cfg: &PolicyConfig,
    waited: Duration,
    from: &ReversePath,
) -> Verdict {
    let ok = || Verdict::accept(Rule::C1, Reply::recipient_ok());
    let refused = || Reply::sender_rejected();
    match result {
        Verification::Valid { .. } | Verification::AcceptAll { .. } => ok(),
        Verification::Invalid { evidence } => Verdict {
            rule: Rule::C1,
            reply: refused(),
            ban: Some(BanRequest { reason: BanReason::FakeSender, evidence: format!("MAIL FROM:{from}: {evidence}") }),
        },
        Verification::Undeliverable { .. } => Verdict::accept(Rule::C1, refused()),
        Verification::Unknown { .. } => match on_unknown {
            OnUnknown::Tempfail if waited < cfg.unknown_sender_tempfail_max => {
                Verdict::accept(Rule::C1, Reply::sender_unverified())
            }
            OnUnknown::Tempfail | OnUnknown::Accept => ok(),
        },
    }
}

/// The outcome of scanning a message for viruses (V1), as the scanner reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanOutcome {
    /// No signature matched.
    Clean,
    /// A signature matched.
    Infected {
        /// The signature's name, e.g. `Eicar-Test-Signature`.
        signature: String,
    },
    /// The scanner could not scan: down, timed out, or the message exceeds its limit.
    Failed {
        /// Why.
        reason: String,
    },
}

/// What to do with a message the scanner could not scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnScanFailure {
    /// 451 4.7.0: the client retries later (the default).
    #[default]
    Tempfail,
    /// Deliver it unscanned (logged).
    Accept,
}

/// V1: the verdict on a scanned message. `None` means "go on and deliver it".
///
/// An infected message is refused with 554 and banned (B3) — except from `<>` (a bounce that
/// carries the original virus back comes from an innocent server) and to `postmaster@` or
/// `abuse@` (abuse reports quote samples): 554, no ban.
pub fn scanned(
    dir: &Directory,
    outcome: &ScanOutcome,
    on_failure: OnScanFailure,
    from: &ReversePath,
    rcpts: &[ForwardPath],
) -> Option<Verdict> {
    match outcome {
        ScanOutcome::Clean => None,
        ScanOutcome::Infected { signature } => {
            let to_role = rcpts.iter().any(|r| match r {
                ForwardPath::Postmaster => true,
                ForwardPath::Mailbox(m) => dir.is_role(m),
            });
            let ban = (!from.is_null() && !to_role)
                .then(|| BanRequest { reason: BanReason::Virus, evidence: format!("signature {signature}") });
            Some(Verdict { rule: Rule::V1, reply: Reply::virus(signature), ban })
        }
        ScanOutcome::Failed { .. } => match on_failure {
            OnScanFailure::Tempfail => Some(Verdict::accept(Rule::V1, Reply::scan_failed())),
            OnScanFailure::Accept => None,
        },
    }
}

/// Counts, per client, events towards B4 (unknown recipients with a non-null sender, or
/// probe-shaped sessions) over a sliding window. The caller keys it like the bans (an IPv4
/// address, an IPv6 /64 by default), so a client cannot escape it by moving within its
/// network. Bounded: at most `capacity` keys, the one seen least recently dropped first.
/// Pure: `now` is always an argument.
#[derive(Debug)]
pub struct OffenceCounter {
    window: Duration,
    capacity: usize,
    seen: HashMap<IpAddr, VecDeque<Instant>>,
    order: VecDeque<(IpAddr, Instant)>,
}

impl OffenceCounter {
    /// A counter with the given window and address capacity.
    pub fn new(window: Duration, capacity: usize) -> Self {
        OffenceCounter { window, capacity: capacity.max(1), seen: HashMap::new(), order: VecDeque::new() }
    }

    /// Offences of `addr` within the window ending at `now`.
    pub fn count(&self, now: Instant, addr: IpAddr) -> u32 {
        self.seen.get(&addr).map_or(0, |v| v.iter().filter(|t| now.duration_since(**t) < self.window).count() as u32)
    }

    /// Records one offence of `addr` at `now`.
    pub fn record(&mut self, now: Instant, addr: IpAddr) {
        self.expire(now);
        if !self.seen.contains_key(&addr) && self.seen.len() >= self.capacity {
            while let Some((old, _)) = self.order.pop_front() {
                if self.seen.remove(&old).is_some() {
                    break;
                }
            }
        }
        let stamps = self.seen.entry(addr).or_default();
        stamps.push_back(now);
        // A client can never need more stamps than the largest threshold that matters.
        if stamps.len() > 64 {
            stamps.pop_front();
        }
        self.order.push_back((addr, now));
    }

    /// Number of addresses tracked.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// `true` when nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(addr, t)) = self.order.front() {
            if now.duration_since(t) < self.window {
                break;
            }
            self.order.pop_front();
            if let Some(stamps) = self.seen.get_mut(&addr) {
                while stamps.front().is_some_and(|s| now.duration_since(*s) >= self.window) {
                    stamps.pop_front();
                }
                if stamps.is_empty() {
                    self.seen.remove(&addr);
                }
            }
        }
    }
}

/// Messages per client in fixed (non-sliding) windows, for `smtp.client_messages_max`: a
/// client's window starts with its first message and its count resets when it ends. Keyed
/// like the bans. Bounded: at most `capacity` keys; when full, expired windows go first, then
/// the oldest window. Pure: `now` is always an argument.
#[derive(Debug)]
pub struct MessageCounter {
    window: Duration,
    capacity: usize,
    seen: HashMap<IpAddr, (Instant, u32)>,
    /// Keys by window start, oldest first; stale pairs (a key whose window restarted or was
    /// dropped) are skipped when popped.
    order: VecDeque<(IpAddr, Instant)>,
}

impl MessageCounter {
    /// A counter with the given window and key capacity.
    pub fn new(window: Duration, capacity: usize) -> Self {
        MessageCounter { window, capacity: capacity.max(1), seen: HashMap::new(), order: VecDeque::new() }
    }

    /// Messages of `key` in its window running at `now` (0 if none runs).
    pub fn count(&self, now: Instant, key: IpAddr) -> u32 {
        self.seen.get(&key).filter(|(start, _)| now.saturating_duration_since(*start) < self.window).map_or(0, |e| e.1)
    }

    /// Adds `n` messages of `key` at `now`.
    pub fn add(&mut self, now: Instant, key: IpAddr, n: u32) {
        if n == 0 {
            return;
        }
        if let Some((start, count)) = self.seen.get_mut(&key)
            && now.saturating_duration_since(*start) < self.window
        {
            *count = count.saturating_add(n);
            return;
        }
        self.seen.remove(&key);
        while self.seen.len() >= self.capacity {
            let Some((old, start)) = self.order.pop_front() else { break };
            if self.seen.get(&old).is_some_and(|e| e.0 == start) {
                self.seen.remove(&old);
            }
        }
        self.seen.insert(key, (now, n));
        self.order.push_back((key, now));
        // Keys dropped for capacity leave stale pairs behind until their window ends; many new
        // keys an hour would grow `order` past any bound: compact it now and then (amortised).
        if self.order.len() > 2 * self.capacity {
            let seen = &self.seen;
            self.order.retain(|(k, t)| seen.get(k).is_some_and(|e| e.0 == *t));
        }
        // Drop pairs that can no longer match (their window ended), so `order` stays bounded.
        while let Some(&(old, start)) = self.order.front() {
            let live = self.seen.get(&old).is_some_and(|e| e.0 == start);
            if live && now.saturating_duration_since(start) < self.window {
                break;
            }
            self.order.pop_front();
            if live {
                self.seen.remove(&old);
            }
        }
    }

    /// Number of keys tracked.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// `true` when nothing is tracked.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// C1's memory of inconclusive senders: when each (client network, sender) was first tried
/// with an unknown callback result, so that its 451 lasts at most
/// `unknown_sender_tempfail_max` (greylisting semantics: real MTAs retry, most spam engines do
/// not). An entry is kept for `keep`, longer than that window, so that a retry after it is
/// recognised and accepted. Bounded: at most `capacity` entries, the oldest dropped first (its
/// sender then starts a new window: a delay, never a loss). Pure: `now` is always an argument.
#[derive(Debug)]
pub struct UnknownSenders {
    keep: Duration,
    capacity: usize,
    first: HashMap<(IpAddr, String), Instant>,
    order: VecDeque<(IpAddr, String)>,
}

impl UnknownSenders {
    /// A table that remembers first attempts for `keep`, at most `capacity` of them.
    pub fn new(keep: Duration, capacity: usize) -> Self {
        UnknownSenders { keep, capacity: capacity.max(1), first: HashMap::new(), order: VecDeque::new() }
    }

    /// How long ago `net` first tried `sender` (case-insensitive) with an unknown result;
    /// records `now` as that first attempt if there was none (and answers zero).
    pub fn waited(&mut self, now: Instant, net: IpAddr, sender: &str) -> Duration {
        self.expire(now);
        let key = (net, sender.to_ascii_lowercase());
        if let Some(t) = self.first.get(&key) {
            return now.saturating_duration_since(*t);
        }
        if self.first.len() >= self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.first.remove(&old);
        }
        self.first.insert(key.clone(), now);
        self.order.push_back(key);
        Duration::ZERO
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.first.len()
    }

    /// `true` when nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        // Entries are never refreshed, so insertion order is age order.
        while let Some(key) = self.order.front() {
            match self.first.get(key) {
                Some(t) if now.saturating_duration_since(*t) < self.keep => break,
                _ => {
                    let key = self.order.pop_front().expect("front exists");
                    self.first.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
