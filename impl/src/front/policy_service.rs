//! The Postfix policy service: the async driver of [`super::policy`]'s protocol. Each request
//! becomes the facts an SMTP session would have seen, fed to a real [`Session`] — the same
//! state machine, rules, tallies, verifier and ban manager as the SMTP front end (docs/design.md
//! §6) — and the session's reply becomes the `action=`.
//!
//! One Postfix message delivery (one `instance` value) is one session: `EHLO helo_name`,
//! `MAIL FROM:<sender>` once, then `RCPT TO:<recipient>` per recipient request. Postfix
//! sends the requests of one instance over one policy connection, and a new instance on that
//! connection means the previous delivery is over (SMTPD_POLICY_README): the previous session
//! then ends and its B4 record (unknown recipients, or a probe) is kept for the client, as
//! when an SMTP connection ends. A `DATA` request (from `smtpd_data_restrictions`) after an
//! unknown recipient is the session's DATA (E2: a probe never sends DATA); `END-OF-MESSAGE`
//! ends the session.
//!
//! Answers: a 2xx reply is `DUNNO` (Postfix's own restrictions go on); a refusal is
//! `action=CODE X.Y.Z text` with the front end's own code and text. A ban ends the client's
//! session as on the front end: the next request of that instance (and every request for a
//! banned client) is answered `421 4.7.0`, which makes Postfix disconnect. A callback slower
//! than `[postfix_policy] timeout` is answered `DEFER_IF_PERMIT` (or `DUNNO`,
//! `on_timeout`) long before Postfix's `smtpd_policy_service_timeout` (100 s); the probe runs
//! on and its result is cached for the retry.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::policy::{Answer, PolicyEvent, PolicyReceiver, Request};
use super::{FrontAddr, FrontListener};
use crate::proto::Reply;
use crate::server::Server;
use crate::session::{Action, Session};

/// `[postfix_policy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySection {
    /// `address:port` or `unix:/path` of the policy service; unset: none.
    pub listen: Option<String>,
    /// With a `unix:` listener: the socket's group (mode 0660), e.g. `postfix`; unset: the
    /// group of `[server] user` (or root's).
    pub socket_group: Option<String>,
    /// Longest a request waits for a callback before it is answered `on_timeout`; must stay
    /// well below Postfix's `smtpd_policy_service_timeout` (100 s).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The answer when `timeout` passes.
    pub on_timeout: OnTimeout,
    /// An idle policy connection is closed after this (Postfix's own
    /// `smtpd_policy_service_max_idle` is 300 s).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Concurrent policy connections (each Postfix smtpd process holds one).
    pub max_connections: usize,
}

/// Postfix's `smtpd_policy_service_timeout` default.
pub const POSTFIX_POLICY_TIMEOUT: Duration = Duration::from_secs(100);

impl Default for PolicySection {
    fn default() -> Self {
        PolicySection {
            listen: None,
            socket_group: None,
            timeout: Duration::from_secs(20),
            on_timeout: OnTimeout::DeferIfPermit,
            idle_timeout: Duration::from_secs(600),
            max_connections: 1000,
        }
    }
}

impl PolicySection {
    /// Every problem with the section.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if let Some(Err(e)) = self.listen.as_deref().map(FrontAddr::parse) {
            p.push(format!("postfix_policy.listen: {e}"));
        }
        if self.timeout.is_zero() || self.timeout >= POSTFIX_POLICY_TIMEOUT {
            p.push(format!(
                "postfix_policy.timeout: {} must be above zero and below Postfix's smtpd_policy_service_timeout (100s)",
                humantime_serde::re::humantime::format_duration(self.timeout)
            ));
        }
        if self.max_connections == 0 {
            p.push("postfix_policy.max_connections: must be at least 1".into());
        }
        p
    }

    /// The listen address, if set and valid.
    pub fn addr(&self) -> Option<FrontAddr> {
        self.listen.as_deref().and_then(|l| FrontAddr::parse(l).ok())
    }
}

/// What a request that cannot be decided in time is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// `DEFER_IF_PERMIT`: the client retries later (the default).
    #[default]
    DeferIfPermit,
    /// `DUNNO`: let Postfix's other restrictions decide.
    Dunno,
}

/// The policy service: serves the policy protocol for `server`'s rules.
#[derive(Debug, Clone)]
pub struct PolicyService {
    server: Server,
    cfg: PolicySection,
}

impl PolicyService {
    /// A service over the assembled server's rules, tallies and bans.
    pub fn new(server: Server, cfg: PolicySection) -> Self {
        PolicyService { server, cfg }
    }

    /// Serves policy connections from `listener` until `shutdown` completes; connections
    /// then end after the request in progress.
    pub async fn run<L: FrontListener>(&self, listener: L, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        super::accept_loop("policy service", listener, self.cfg.max_connections, shutdown, |stream, peer| {
            self.clone().connection(stream, peer)
        })
        .await
    }

    async fn connection<S>(self, mut stream: S, peer: String)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        let mut rx = PolicyReceiver::new();
        let mut conn = Conn { service: &self, current: None };
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::new();
        loop {
            let n = match tokio::time::timeout(self.cfg.idle_timeout, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => n,
            };
            let mut input = &buf[..n];
            while let Some(ev) = rx.next(&mut input) {
                let answer = match ev {
                    PolicyEvent::Request(req) => conn.answer(&req).await,
                    PolicyEvent::Malformed(e) => {
                        tracing::warn!(%peer, error = %e, "policy: malformed request");
                        Answer::malformed(e)
                    }
                };
                out.extend_from_slice(&answer.encode());
            }
            if !out.is_empty() {
                if stream.write_all(&out).await.is_err() {
                    break;
                }
                out.clear();
            }
        }
        conn.end();
    }
}

/// One message delivery of one policy connection.
struct Current {
    instance: String,
    addr: IpAddr,
    session: Session,
    /// The reply to `MAIL FROM`, once given.
    mail: Option<Reply>,
    /// DATA was given to the session.
    data: bool,
    /// The reply that closed the session (421), for the requests that follow.
    closing: Option<Reply>,
}

struct Conn<'a> {
    service: &'a PolicyService,
    current: Option<Current>,
}

/// A callback did not answer within `[postfix_policy] timeout`.
struct Slow;

impl Conn<'_> {
    async fn answer(&mut self, req: &Request) -> Answer {
        let server = &self.service.server;
        if req.get("request") != Some("smtpd_access_policy") {
            return Answer::DeferIfPermit("4.3.5 Policy service: unknown request type".into());
        }
        // A client the rules cannot name is not judged (as an SMTP client without an address).
        let Some(addr) = req.get("client_address").and_then(|a| a.parse::<IpAddr>().ok()).map(|a| a.to_canonical())
        else {
            return Answer::Dunno;
        };
        if server.is_banned(addr) {
            // G2: the gatekeeper's own ban table; 421 makes Postfix disconnect.
            return Answer::Reply(Reply::banned_closing(&server.session_config().hostname));
        }
        let instance = req.get("instance").unwrap_or_default();
        if self.current.as_ref().is_none_or(|c| c.instance != instance || c.addr != addr) {
            self.end();
            self.current = Some(self.open(instance, addr, req.get("helo_name").unwrap_or_default()));
        }
        let state = req.get("protocol_state").unwrap_or_default().to_ascii_uppercase();
        let result = match state.as_str() {
            "RCPT" => self.rcpt(req).await,
            "MAIL" => self.mail(req).await.map(|r| r.unwrap_or_else(Reply::sender_ok)),
            "DATA" => self.data().await,
            "END-OF-MESSAGE" => {
                self.end();
                Ok(Reply::noop())
            }
            _ => Ok(Reply::noop()),
        };
        match result {
            // 2xx, and the 354 of a DATA the session lets through (observe mode, an exempt
            // client, the share test): Postfix knows no `action=354`, only DUNNO goes on.
            Ok(reply) if reply.is_positive() || reply.code == 354 => Answer::Dunno,
            Ok(reply) => Answer::Reply(reply),
            Err(Slow) => {
                // The session waits on a probe no one will hand it: it is over.
                self.end();
                match self.service.cfg.on_timeout {
                    OnTimeout::DeferIfPermit => {
                        let r = Reply::sender_unverified();
                        Answer::DeferIfPermit(format!("{} {}", r.enhanced.expect("has one"), r.lines.join(" ")))
                    }
                    OnTimeout::Dunno => Answer::Dunno,
                }
            }
        }
    }

    fn open(&self, instance: &str, addr: IpAddr, helo: &str) -> Current {
        let server = &self.service.server;
        let now = server.now();
        let mut session = server.front_session(now, server.next_session_id(), addr);
        // HELO matters to no rule; a name the SMTP parser refuses becomes the address literal.
        let literal = match addr {
            IpAddr::V4(a) => format!("[{a}]"),
            IpAddr::V6(a) => format!("[IPv6:{a}]"),
        };
        for name in [helo, &literal] {
            if name.is_empty() {
                continue;
            }
            session.handle_input(now, format!("EHLO {name}\r\n").as_bytes());
            let ok = std::iter::from_fn(|| session.poll_reply()).last().is_some_and(|r| r.is_positive());
            if ok {
                break;
            }
        }
        Current { instance: instance.to_string(), addr, session, mail: None, data: false, closing: None }
    }

    /// Ends the current session: its B4 record is kept for the client.
    fn end(&mut self) {
        if let Some(c) = self.current.take() {
            self.service.server.front_finish(&c.session);
        }
    }

    /// `MAIL FROM` once per delivery; `Some(reply)` if it was given now or before.
    async fn mail(&mut self, req: &Request) -> Result<Option<Reply>, Slow> {
        let cur = self.current.as_mut().expect("opened");
        if let Some(r) = &cur.mail {
            return Ok(Some(r.clone()));
        }
        let sender = req.get("sender").unwrap_or_default();
        let size = req.get("size").and_then(|s| s.parse::<u64>().ok()).filter(|&s| s > 0);
        let line = match size {
            Some(s) => format!("MAIL FROM:<{sender}> SIZE={s}\r\n"),
            None => format!("MAIL FROM:<{sender}>\r\n"),
        };
        let reply = self.exchange(line.as_bytes()).await?;
        let cur = self.current.as_mut().expect("opened");
        cur.mail = reply.clone();
        Ok(reply)
    }

    async fn rcpt(&mut self, req: &Request) -> Result<Reply, Slow> {
        if let Some(r) = self.mail(req).await?
            && !r.is_positive()
        {
            return Ok(r);
        }
        let rcpt = req.get("recipient").unwrap_or_default();
        Ok(self.exchange(format!("RCPT TO:<{rcpt}>\r\n").as_bytes()).await?.unwrap_or_else(Reply::noop))
    }

    async fn data(&mut self) -> Result<Reply, Slow> {
        let cur = self.current.as_mut().expect("opened");
        // Only DATA after an unknown recipient can decide anything (E2); the session is not
        // asked to take a message it will never see.
        if cur.data || cur.session.unknown_rcpts() == 0 || !cur.mail.as_ref().is_some_and(Reply::is_positive) {
            return Ok(Reply::noop());
        }
        cur.data = true;
        Ok(self.exchange(b"DATA\r\n").await?.unwrap_or_else(Reply::noop))
    }

    /// Gives the session one command line, carries its actions out and returns its reply to
    /// that command (a closed session answers with its closing reply).
    async fn exchange(&mut self, line: &[u8]) -> Result<Option<Reply>, Slow> {
        let server = &self.service.server;
        let timeout = self.service.cfg.timeout;
        let cur = self.current.as_mut().expect("opened");
        if cur.session.is_closed() {
            return Ok(cur.closing.clone());
        }
        let started = tokio::time::Instant::now();
        cur.session.handle_input(server.now(), line);
        loop {
            let Some(action) = cur.session.poll_action() else { break };
            match action {
                Action::Ban { addr, session, request } => server.front_ban(addr, session, request).await,
                Action::Verify { sender } => {
                    if !server.front_verify(&mut cur.session, sender, started + timeout).await {
                        return Err(Slow);
                    }
                }
                // The MTA keeps the message: nothing to receive, store or deliver here.
                Action::Receive { .. } | Action::Append { .. } | Action::Discard | Action::Scan => {}
                Action::Deliver { .. } | Action::StartTls | Action::Close => {}
            }
        }
        let (first, closing) = server.front_replies(&mut cur.session);
        if closing.is_some() {
            cur.closing = closing;
        }
        Ok(first)
    }
}
