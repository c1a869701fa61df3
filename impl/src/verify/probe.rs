//! One callback probe (rule C1): the MX lookup and the SMTP dialogue with the sender's mail
//! exchangers, over the resolver and connector edges, with lettre's low-level connection.
//!
//! Dialogue, per MX host in order (at most `max_mx`): greeting, `EHLO` (`HELO` on a new
//! connection if EHLO is refused), `MAIL FROM:<>`, `RCPT TO:<sender>`, then — only if the
//! sender was accepted — `RCPT TO:<random@domain>` in the same transaction to detect accept-all
//! servers, then `QUIT`. No DATA is ever sent. Every stage has a timeout and the whole probe
//! a budget (a deadline).
//!
//! What ends the probe: an answer to `RCPT TO:<sender>` (valid, invalid, accept-all, or an
//! inconclusive 4xx or policy refusal) or an answer to `MAIL FROM:<>` that refuses it. What
//! moves on to the next MX: connection failures, timeouts, broken greetings and EHLO/HELO
//! failures. This module decides nothing about caching, limits or logging.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream};
use lettre::transport::smtp::extension::ClientId;
use lettre::transport::smtp::response::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::dns::{MxLookup, MxResolver};
use super::net::{BoxStream, Connector};
use super::scope::is_global;
use crate::edges::Clock;
use crate::proto::{Domain, Mailbox};

/// Addresses tried per MX host (a host with many A records is still one host).
const ADDRS_PER_HOST: usize = 2;
/// Waiting for the reply to QUIT, once the verdict is known.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// The sender's MX accepted the sender and refused a random address.
    Valid,
    /// The mailbox does not exist: 5xx with 5.1.1, 5.1.2 or 5.1.10 on RCPT, or a null MX.
    Invalid,
    /// The domain cannot receive mail: NXDOMAIN, or neither MX nor address.
    Undeliverable,
    /// The MX accepted a random address too: valid as far as anyone can tell, unverifiable.
    AcceptAll,
    /// No conclusion: 4xx, policy refusals, a 5xx without an addressing enhanced code,
    /// timeouts, DNS failures.
    Unknown,
}

/// A probe's finding with its evidence (the remote reply or the failure, for logs and bans).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// The finding.
    pub finding: Finding,
    /// What proves it, e.g. `mx1.example.test[192.0.2.25]: RCPT TO:<a@example.test>: 550 5.1.1 …`,
    /// control characters escaped ([`crate::proto::escape`]).
    pub evidence: String,
    /// MX connections attempted.
    pub connections: usize,
}

/// The fixed parts of a probe.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    /// Our EHLO/HELO name.
    pub hello: ClientId,
    /// Remote SMTP port (25).
    pub port: u16,
    /// MX hosts tried at most.
    pub max_mx: usize,
    /// Connecting.
    pub connect_timeout: Duration,
    /// Each reply: greeting, EHLO, MAIL, RCPT.
    pub command_timeout: Duration,
    /// Connect to MX addresses that are not global ([`super::scope::is_global`]) too: labs,
    /// tests and the simulation only. Off, such an address is never connected to.
    pub allow_private_mx: bool,
}

/// The edges a probe runs on.
#[derive(Debug, Clone, Copy)]
pub struct ProbeEdges<'a> {
    /// MX and address lookups.
    pub resolver: &'a dyn MxResolver,
    /// TCP connections.
    pub connector: &'a dyn Connector,
    /// Time (timeouts are armed on tokio's timer from the clock's `now`).
    pub clock: &'a dyn Clock,
}

/// Runs one probe of `sender` (whose domain is `domain`), using `random` for the accept-all
/// check, until `deadline` at the latest.
pub async fn run(
    edges: ProbeEdges<'_>,
    settings: &ProbeSettings,
    sender: &Mailbox,
    domain: &Domain,
    random: &Mailbox,
    deadline: Instant,
) -> ProbeResult {
    let ProbeEdges { resolver, connector, clock } = edges;
    let mut probe = Probe { connector, clock, settings, sender, random, deadline, connections: 0 };
    let (finding, evidence) = probe.run(resolver, domain).await;
    // The evidence quotes the remote server: escaped once here, it is safe in the logs, the
    // callback cache and ban evidence.
    let evidence = crate::proto::escape(&evidence).into_owned();
    ProbeResult { finding, evidence, connections: probe.connections }
}

struct Probe<'a> {
    connector: &'a dyn Connector,
    clock: &'a dyn Clock,
    settings: &'a ProbeSettings,
    sender: &'a Mailbox,
    random: &'a Mailbox,
    deadline: Instant,
    connections: usize,
}

/// The end of one SMTP session with one MX address.
enum HostOutcome {
    /// The probe is over.
    Done(Finding, String),
    /// This host could not be asked; try the next.
    Failed(String),
}

impl Probe<'_> {
    async fn run(&mut self, resolver: &dyn MxResolver, domain: &Domain) -> (Finding, String) {
        let lookup = match self.stage(self.settings.command_timeout, resolver.lookup_mx(domain)).await {
            Some(Ok(lookup)) => lookup,
            Some(Err(e)) => return (Finding::Unknown, format!("MX lookup for {domain}: {e}")),
            None => return (Finding::Unknown, format!("MX lookup for {domain}: timed out")),
        };
        let targets: Vec<(String, Option<Vec<IpAddr>>)> = match lookup {
            MxLookup::NullMx => return (Finding::Invalid, format!("{domain} has a null MX (RFC 7505)")),
            MxLookup::NoDomain => return (Finding::Undeliverable, format!("{domain} does not exist (NXDOMAIN)")),
            MxLookup::NoMailHost => {
                let why = format!("{domain} has neither MX nor A/AAAA records (RFC 5321 §5.1)");
                return (Finding::Undeliverable, why);
            }
            MxLookup::Implicit(addrs) => vec![(domain.to_string(), Some(addrs))],
            MxLookup::Hosts(hosts) => {
                hosts.into_iter().take(self.settings.max_mx.max(1)).map(|h| (h.name, None)).collect()
            }
        };
        let mut failures = Vec::new();
        for (host, addrs) in targets {
            let addrs = match addrs {
                Some(addrs) => addrs,
                None => match self.stage(self.settings.command_timeout, resolver.lookup_host(&host)).await {
                    Some(Ok(addrs)) => addrs,
                    Some(Err(e)) => {
                        failures.push(format!("{host}: {e}"));
                        continue;
                    }
                    None => {
                        failures.push(format!("{host}: address lookup timed out"));
                        continue;
                    }
                },
            };
            if addrs.is_empty() {
                failures.push(format!("{host}: no address"));
                continue;
            }
            // An MX pointing inside (loopback, RFC 1918, link local …) is never connected to:
            // no conclusion can be drawn from it, and nobody may scan an inside network
            // through us. The finding stays unknown: a sender is never banned for it.
            let (addrs, inside): (Vec<IpAddr>, Vec<IpAddr>) =
                addrs.into_iter().partition(|ip| self.settings.allow_private_mx || is_global(*ip));
            for ip in inside {
                failures.push(format!("{host}[{ip}]: not a global address, not probed"));
            }
            for ip in addrs.into_iter().take(ADDRS_PER_HOST) {
                if self.now() >= self.deadline {
                    failures.push("probe budget exhausted".into());
                    return (Finding::Unknown, failures.join("; "));
                }
                let label = format!("{host}[{ip}]");
                match self.session(ip).await {
                    HostOutcome::Done(finding, evidence) => return (finding, format!("{label}: {evidence}")),
                    HostOutcome::Failed(why) => failures.push(format!("{label}: {why}")),
                }
            }
        }
        if failures.is_empty() {
            failures.push(format!("no mail exchanger tried for {domain}"));
        }
        (Finding::Unknown, failures.join("; "))
    }

    /// Now, on tokio's timer base, from the clock edge.
    fn now(&self) -> Instant {
        Instant::from_std(self.clock.now())
    }

    /// Awaits `fut` for at most `limit`, and never past the deadline; `None` on timeout.
    async fn stage<T>(&self, limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
        let until = (self.now() + limit).min(self.deadline);
        tokio::time::timeout_at(until, fut).await.ok()
    }

    /// Connects and greets; on failure, the evidence and whether EHLO was refused with 5xx.
    async fn open(&mut self, ip: IpAddr, helo: bool) -> Result<AsyncSmtpConnection, (String, bool)> {
        let addr = SocketAddr::new(ip, self.settings.port);
        self.connections += 1;
        let stream = match self.stage(self.settings.connect_timeout, self.connector.connect(addr)).await {
            Some(Ok(stream)) => stream,
            Some(Err(e)) => return Err((format!("connect: {e}"), false)),
            None => return Err(("connect: timed out".into(), false)),
        };
        let spoke = Arc::new(AtomicBool::new(false));
        let stream = LettreStream { inner: stream, peer: addr, helo, offset: 0, spoke: spoke.clone() };
        let connect = AsyncSmtpConnection::connect_with_transport(Box::new(stream), &self.settings.hello);
        tokio::pin!(connect);
        let hello = if helo { "HELO" } else { "EHLO" };
        // lettre reads the greeting and says EHLO in one call: one timeout for each half.
        let mut waited_for_greeting = false;
        loop {
            match self.stage(self.settings.command_timeout, &mut connect).await {
                Some(Ok(conn)) => return Ok(conn),
                Some(Err(e)) if spoke.load(Ordering::Relaxed) => {
                    return Err((format!("{hello}: {}", error_text(&e)), e.is_permanent()));
                }
                Some(Err(e)) => return Err((format!("greeting: {}", error_text(&e)), false)),
                None if !spoke.load(Ordering::Relaxed) || waited_for_greeting => {
                    let what = if spoke.load(Ordering::Relaxed) { hello } else { "greeting" };
                    return Err((format!("{what}: timed out"), false));
                }
                None => waited_for_greeting = true,
            }
        }
    }

    async fn session(&mut self, ip: IpAddr) -> HostOutcome {
        let mut conn = match self.open(ip, false).await {
            Ok(conn) => conn,
            // EHLO refused (5xx after a good greeting): RFC 5321 §3.2, fall back to HELO.
            Err((e, true)) => match self.open(ip, true).await {
                Ok(conn) => conn,
                Err((helo, _)) => return HostOutcome::Failed(format!("{e}; {helo}")),
            },
            Err((e, false)) => return HostOutcome::Failed(e),
        };
        let outcome = self.transaction(&mut conn).await;
        // The verdict is known; QUIT politely but briefly, whatever the budget says.
        let _ = tokio::time::timeout(QUIT_TIMEOUT.min(self.settings.command_timeout), conn.quit()).await;
        outcome
    }

    async fn transaction(&self, conn: &mut AsyncSmtpConnection) -> HostOutcome {
        let t = self.settings.command_timeout;
        match Reply::from(self.stage(t, conn.command("MAIL FROM:<>\r\n")).await) {
            Reply::Answer(code, _) if code < 400 => {}
            // RFC 5321 §4.5.5 says `<>` must be accepted; a server that refuses it cannot answer.
            Reply::Answer(_, text) => return HostOutcome::Done(Finding::Unknown, format!("MAIL FROM:<>: {text}")),
            Reply::Failed(why) => return HostOutcome::Failed(format!("MAIL FROM:<>: {why}")),
        }
        let rcpt = format!("RCPT TO:<{}>", self.sender);
        let accepted = match Reply::from(self.stage(t, conn.command(format!("{rcpt}\r\n"))).await) {
            Reply::Answer(code, text) if code < 400 => text,
            Reply::Answer(code, text) if code < 500 => {
                return HostOutcome::Done(Finding::Unknown, format!("{rcpt}: {text}"));
            }
            Reply::Answer(code, text) => {
                let finding = if denies_existence(code, &text) { Finding::Invalid } else { Finding::Unknown };
                return HostOutcome::Done(finding, format!("{rcpt}: {text}"));
            }
            Reply::Failed(why) => return HostOutcome::Failed(format!("{rcpt}: {why}")),
        };
        let check = format!("RCPT TO:<{}>", self.random);
        match Reply::from(self.stage(t, conn.command(format!("{check}\r\n"))).await) {
            Reply::Answer(code, text) if code < 400 => {
                HostOutcome::Done(Finding::AcceptAll, format!("{rcpt}: {accepted}; accept-all: {check}: {text}"))
            }
            Reply::Answer(_, text) => {
                HostOutcome::Done(Finding::Valid, format!("{rcpt}: {accepted} ({check}: {text})"))
            }
            // The sender was accepted; only the accept-all check is inconclusive.
            Reply::Failed(why) => HostOutcome::Done(Finding::Valid, format!("{rcpt}: {accepted} ({check}: {why})")),
        }
    }
}

/// A reply as the probe sees it: code and text, or no reply at all.
enum Reply {
    Answer(u16, String),
    Failed(String),
}

impl From<Option<Result<Response, lettre::transport::smtp::Error>>> for Reply {
    fn from(r: Option<Result<Response, lettre::transport::smtp::Error>>) -> Self {
        match r {
            None => Reply::Failed("timed out".into()),
            Some(Ok(response)) => {
                let code = u16::from(response.code());
                Reply::Answer(code, format!("{code} {}", response.message().collect::<Vec<_>>().join(" ")))
            }
            Some(Err(e)) => match e.status() {
                Some(code) => Reply::Answer(u16::from(code), error_text(&e)),
                None => Reply::Failed(error_text(&e)),
            },
        }
    }
}

/// `550 5.1.1 no such user` for a reply error; the error itself otherwise.
fn error_text(e: &lettre::transport::smtp::Error) -> String {
    match (e.status(), std::error::Error::source(e)) {
        (Some(code), Some(text)) => format!("{code} {text}"),
        (Some(code), None) => code.to_string(),
        _ => e.to_string(),
    }
}

/// Whether a 5xx reply to `RCPT TO:<sender>` says the mailbox does not exist, rather than
/// that we (or our `<>` sender) are refused. Only the former is a verdict that can lead to a
/// ban (B2), so it takes explicit evidence: the RFC 3463 enhanced code 5.1.1 (bad destination
/// mailbox), 5.1.2 (bad destination system) or 5.1.10 (null MX, RFC 7505). A bare `550`
/// without an enhanced code is as often a remote policy refusal of our prober as a missing
/// user, and a policy refusal (`5.7.x`, blocklists) says nothing about the sender: both are
/// inconclusive.
pub fn denies_existence(code: u16, text: &str) -> bool {
    let after_code = text.strip_prefix(&code.to_string()).unwrap_or(text).trim_start();
    (500..600).contains(&code) && matches!(enhanced(after_code), Some((5, 1, 1 | 2 | 10)))
}

/// The RFC 3463 enhanced status code at the start of a reply text, if any.
fn enhanced(text: &str) -> Option<(u8, u16, u16)> {
    let token = text.split_whitespace().next()?;
    let mut parts = token.split('.');
    let class = parts.next()?.parse().ok()?;
    let subject = parts.next()?.parse().ok()?;
    let detail = parts.next()?.parse().ok()?;
    (parts.next().is_none() && matches!(class, 2 | 4 | 5)).then_some((class, subject, detail))
}

/// The stream handed to lettre: the connector's stream plus what lettre's API lacks. It
/// notes when lettre first speaks (so a failed greeting is told from a failed EHLO) and, on a
/// HELO fallback connection, turns lettre's `EHLO` into `HELO` on the wire (lettre has no HELO).
struct LettreStream {
    inner: BoxStream,
    peer: SocketAddr,
    helo: bool,
    offset: usize,
    spoke: Arc<AtomicBool>,
}

impl fmt::Debug for LettreStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LettreStream").field("peer", &self.peer).field("helo", &self.helo).finish_non_exhaustive()
    }
}

impl AsyncRead for LettreStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LettreStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.spoke.store(true, Ordering::Relaxed);
        let this = &mut *self;
        let result = if this.helo && this.offset < 4 {
            let mut rewritten = buf.to_vec();
            for (i, b) in rewritten.iter_mut().enumerate().take(4 - this.offset) {
                let at = this.offset + i;
                if b"EHLO"[at] == *b {
                    *b = b"HELO"[at];
                }
            }
            Pin::new(&mut this.inner).poll_write(cx, &rewritten)
        } else {
            Pin::new(&mut this.inner).poll_write(cx, buf)
        };
        if let Poll::Ready(Ok(n)) = &result {
            this.offset += n;
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for LettreStream {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_refusals_deny_existence() {
        for (code, text, expected) in [
            (550, "550 5.1.1 <x@example.test>: Recipient address rejected: User unknown", true),
            (550, "550 5.1.2 Host unknown", true),
            (556, "556 5.1.10 Recipient address has null MX", true),
            (550, "550 User unknown", false),
            (553, "553 sorry, that domain isn't in my list", false),
            (551, "551 5.1.6 moved", false),
            (550, "550 5.1.3 bad address syntax", false),
            (550, "550 5.7.1 Client host blocked using zen.spamhaus.org", false),
            (554, "554 5.7.1 Access denied", false),
            (554, "554 Transaction failed", false),
            (550, "550 5.1.7 Bad sender address", false),
            (550, "550 5.1.8 Sender domain rejected", false),
            (552, "552 5.2.2 Mailbox full", false),
            (550, "550 5.0.0 no such user", false),
            (450, "450 4.1.1 try later", false),
        ] {
            assert_eq!(denies_existence(code, text), expected, "{text}");
        }
    }

    #[test]
    fn enhanced_codes() {
        assert_eq!(enhanced("5.1.1 no"), Some((5, 1, 1)));
        assert_eq!(enhanced("no such user"), None);
        assert_eq!(enhanced("5.1 x"), None);
        assert_eq!(enhanced("1.2.3 x"), None);
    }

    #[tokio::test]
    async fn helo_rewrite_changes_only_the_verb() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, mut server) = tokio::io::duplex(256);
        let mut s = LettreStream {
            inner: Box::new(client),
            peer: "192.0.2.1:25".parse().unwrap(),
            helo: true,
            offset: 0,
            spoke: Arc::new(AtomicBool::new(false)),
        };
        s.write_all(b"EH").await.unwrap();
        s.write_all(b"LO mx.example.test\r\nEHLO again\r\n").await.unwrap();
        assert!(s.spoke.load(Ordering::Relaxed));
        drop(s);
        let mut got = String::new();
        server.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "HELO mx.example.test\r\nEHLO again\r\n");
    }
}
