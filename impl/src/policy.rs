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
    /// An empty directory for `domains`.
    pub fn new(domains: impl IntoIterator<Item = Domain>, abuse_always: bool) -> Self {
        Directory { domains: domains.into_iter().collect(), users: BTreeSet::new(), abuse_always }
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
        local.eq_ignore_ascii_case("postmaster")
            || (self.abuse_always && local.eq_ignore_ascii_case("abuse"))
            || self.users.contains(&key(local, domain))
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

fn key(local: &str, domain: &Domain) -> String {
    format!("{}@{}", local.to_ascii_lowercase(), domain)
}

/// Tunables of the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// B4 fires once a client has given this many unknown recipients with a non-null sender
    /// within `b4_window` (docs/design.md: 1).
    pub b4_threshold: u32,
    /// The B4 counting window (1 h).
    pub b4_window: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig { b4_threshold: 1, b4_window: Duration::from_secs(3600) }
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
            let local = m.local.as_str();
            dir.is_local(m)
                && (local.eq_ignore_ascii_case("postmaster")
                    || (dir.abuse_always && local.eq_ignore_ascii_case("abuse")))
        }
    }
}

/// E2 at RCPT TO. `unknown_before` counts the unknown recipients with a non-null sender this
/// client gave within the B4 window before this one (across sessions).
pub fn rcpt_to(
    dir: &Directory,
    cfg: &PolicyConfig,
    from: &ReversePath,
    to: &ForwardPath,
    unknown_before: u32,
) -> Verdict {
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
    let ban = (!from.is_null() && unknown_before + 1 >= cfg.b4_threshold).then(|| BanRequest {
        reason: BanReason::UnknownRecipient,
        evidence: format!("MAIL FROM:{from} RCPT TO:{to}"),
    });
    Verdict { rule: Rule::E2, reply: Reply::unknown_user(), ban }
}

/// VRFY: we do not disclose users (RFC 5321 §3.5.3 permits 252).
pub fn vrfy() -> Reply {
    Reply::cannot_vrfy()
}

/// The outcome of a callback probe of a sender (C1), as the verifier reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// The sender's MX accepted `RCPT TO:<sender>` (or the domain is allowlisted).
    Valid {
        /// What proved it (the remote reply, or `allowlisted`, or `cached`).
        evidence: String,
    },
    /// The sender's MX refused it with 5xx, a null MX, or NXDOMAIN: the address cannot exist.
    Invalid {
        /// What proved it.
        evidence: String,
    },
    /// Anything else: 4xx, timeouts, refused connections, DNS failures, accept-all domains,
    /// probe limits. Never a ban.
    Unknown {
        /// Why it is unknown.
        evidence: String,
    },
}

/// What to do with a sender whose callback was inconclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnknown {
    /// 451 4.4.3: the client retries later (the default).
    #[default]
    Tempfail,
    /// Accept the recipient as if the sender were valid.
    Accept,
}

/// C1: the verdict on the first valid recipient once the sender's callback is known. `rcpt`
/// is the accepted recipient's verdict, which stands when the sender is valid.
pub fn verified(result: &Verification, on_unknown: OnUnknown, from: &ReversePath) -> Verdict {
    match result {
        Verification::Valid { .. } => Verdict::accept(Rule::C1, Reply::recipient_ok()),
        Verification::Invalid { evidence } => Verdict {
            rule: Rule::C1,
            reply: Reply::sender_rejected(),
            ban: Some(BanRequest { reason: BanReason::FakeSender, evidence: format!("MAIL FROM:{from}: {evidence}") }),
        },
        Verification::Unknown { .. } => match on_unknown {
            OnUnknown::Tempfail => Verdict::accept(Rule::C1, Reply::sender_unverified()),
            OnUnknown::Accept => Verdict::accept(Rule::C1, Reply::recipient_ok()),
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
pub fn scanned(outcome: &ScanOutcome, on_failure: OnScanFailure) -> Option<Verdict> {
    match outcome {
        ScanOutcome::Clean => None,
        ScanOutcome::Infected { signature } => Some(Verdict {
            rule: Rule::V1,
            reply: Reply::virus(signature),
            ban: Some(BanRequest { reason: BanReason::Virus, evidence: format!("signature {signature}") }),
        }),
        ScanOutcome::Failed { .. } => match on_failure {
            OnScanFailure::Tempfail => Some(Verdict::accept(Rule::V1, Reply::scan_failed())),
            OnScanFailure::Accept => None,
        },
    }
}

/// Counts, per client address, the unknown recipients with a non-null sender (B4) over a
/// sliding window. Bounded: at most `capacity` addresses, the one seen least recently dropped
/// first. Pure: `now` is always an argument.
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

#[cfg(test)]
mod tests {
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
            ("<x@y.test>", "<nobody@example.test>", 550, Some(BanReason::UnknownRecipient)),
            ("<x@y.test>", "<bob@elsewhere.test>", 554, None),
            ("<x@y.test>", "<bob@[192.0.2.1]>", 554, None),
        ];
        for (from, to, code, ban) in cases {
            let v = rcpt_to(&d, &cfg, &rp(from), &fp(to), 0);
            assert_eq!((v.reply.code, v.ban.map(|b| b.reason)), (code, ban), "{from} {to}");
        }
        let mut no_abuse = Directory::new([Domain::parse("example.test").unwrap()], false);
        assert_eq!(rcpt_to(&no_abuse, &cfg, &rp("<>"), &fp("<abuse@example.test>"), 0).reply.code, 550);
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
        assert!(rcpt_to(&d, &cfg, &from, &to, 0).ban.is_none());
        assert!(rcpt_to(&d, &cfg, &from, &to, 1).ban.is_none());
        assert!(rcpt_to(&d, &cfg, &from, &to, 2).ban.is_some());
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
        assert_eq!(c.count(t0 + Duration::from_secs(3605), a), 1);
        c.record(t0 + Duration::from_secs(30), "192.0.2.2".parse().unwrap());
        c.record(t0 + Duration::from_secs(40), "192.0.2.3".parse().unwrap());
        assert_eq!(c.len(), 2);
        assert_eq!(c.count(t0 + Duration::from_secs(50), a), 0);
        c.record(t0 + Duration::from_secs(7300), a);
        assert_eq!(c.len(), 1);
    }
}
