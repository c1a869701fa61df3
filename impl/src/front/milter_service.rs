//! The milter: the async driver of [`super::milter`]'s protocol for Postfix (`smtpd_milters`)
//! and sendmail (`INPUT_MAIL_FILTER`). What the MTA reports becomes the input an SMTP session
//! would have had, fed to a real [`Session`] — the same state machine, rules, tallies,
//! verifier, scanner and ban manager as the SMTP front end (docs/design.md §6) — and the
//! session's reply becomes the milter response.
//!
//! One milter connection is one SMTP connection of the MTA (Postfix and libmilter open one
//! per SMTP connection; SMFIC_QUIT_NC starts another on the same socket) and one session:
//! the client address comes from SMFIC_CONNECT (or, for a Unix-socket or unknown client, the
//! `{client_addr}` macro), then `EHLO helo`, `MAIL FROM:<sender>`, `RCPT TO:<rcpt>` and `DATA`
//! as the MTA reports them. The message is rebuilt as the session expects it — each header as
//! `Name:value` CRLF, an empty line, the body — dot-stuffed into the session's DATA, which
//! writes it to a file under the milter's directory; at SMFIC_BODYEOB the session's end of
//! data scans it (V1) and answers. The MTA keeps the message: the session's handoff is
//! answered at once with the MTA's queue id (macro `i`).
//!
//! Responses: a 2xx (or 354) is SMFIR_CONTINUE; a refusal is SMFIR_REPLYCODE with the
//! session's own code, enhanced code and text. A ban ends the session as on the front end:
//! every later command of that connection is answered its `421 4.7.0`; a banned client's
//! next connection is answered 421 at connect. A client without an address is not judged:
//! SMFIR_ACCEPT at connect (no further events). A callback slower than `[milter] timeout`
//! is answered 451 4.4.3 (the probe runs on and its result is cached for the retry), and so
//! is the rest of that transaction.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::milter::{Command, Family, MilterReceiver, Options, Response};
use super::{FrontAddr, FrontListener};
use crate::edges::MessageFile;
use crate::proto::Reply;
use crate::server::Server;
use crate::session::{Action, Session};

/// `[milter]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MilterSection {
    /// `address:port` or `unix:/path` of the milter; unset: none.
    pub listen: Option<String>,
    /// With a `unix:` listener: the socket's group (mode 0660), e.g. `postfix`; unset: the
    /// group of `[server] user` (or root's).
    pub socket_group: Option<String>,
    /// Longest a RCPT waits for a callback (C1) before it is answered 451; must stay below
    /// the MTA's command timeout (Postfix's `milter_command_timeout`, 30 s).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A milter connection silent this long is closed (Postfix's smtpd waits 300 s for its
    /// client; a milter connection lasts as long as that SMTP connection).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Concurrent milter connections (one per SMTP connection of the MTA).
    pub max_connections: usize,
}

/// Postfix's `milter_command_timeout` default.
pub const POSTFIX_MILTER_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for MilterSection {
    fn default() -> Self {
        MilterSection {
            listen: None,
            socket_group: None,
            timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(600),
            max_connections: 1000,
        }
    }
}

impl MilterSection {
    /// Every problem with the section.
    pub fn problems(&self) -> Vec<String> {
        let show = humantime_serde::re::humantime::format_duration;
        let mut p = Vec::new();
        if let Some(Err(e)) = self.listen.as_deref().map(FrontAddr::parse) {
            p.push(format!("milter.listen: {e}"));
        }
        if self.timeout.is_zero() || self.timeout >= POSTFIX_MILTER_COMMAND_TIMEOUT {
            p.push(format!(
                "milter.timeout: {} must be above zero and below Postfix's milter_command_timeout (30s)",
                show(self.timeout)
            ));
        }
        if self.idle_timeout.is_zero() {
            p.push("milter.idle_timeout: must be above zero".into());
        }
        if self.max_connections == 0 {
            p.push("milter.max_connections: must be at least 1".into());
        }
        p
    }

    /// The listen address, if set and valid.
    pub fn addr(&self) -> Option<FrontAddr> {
        self.listen.as_deref().and_then(|l| FrontAddr::parse(l).ok())
    }
}

/// The milter: serves the milter protocol for `server`'s rules.
#[derive(Debug, Clone)]
pub struct MilterService {
    server: Server,
    cfg: MilterSection,
    /// Where messages are written while they arrive, for the scan (removed after it).
    dir: PathBuf,
}

/// Message files of this process, for unique names.
static FILES: AtomicU64 = AtomicU64::new(0);

impl MilterService {
    /// A service over the assembled server's rules, tallies, scanner and bans; messages are
    /// written to files in `dir` (which must exist, private to the gatekeeper) for the scan.
    pub fn new(server: Server, cfg: MilterSection, dir: PathBuf) -> Self {
        MilterService { server, cfg, dir }
    }

    /// Serves milter connections from `listener` until `shutdown` completes; connections
    /// then end (the MTA applies its default action to what was under way).
    pub async fn run<L: FrontListener>(&self, listener: L, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        super::accept_loop("milter", listener, self.cfg.max_connections, shutdown, |stream, peer| {
            self.clone().connection(stream, peer)
        })
        .await
    }

    async fn connection<S>(self, mut stream: S, peer: String)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        let mut rx = MilterReceiver::new();
        let mut conn = Conn::new(&self);
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::new();
        'read: loop {
            let n = match tokio::time::timeout(self.cfg.idle_timeout, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
                Ok(Ok(n)) => n,
            };
            let mut input = &buf[..n];
            let mut quit = false;
            while let Some(cmd) = rx.next(&mut input) {
                let cmd = match cmd {
                    Ok(cmd) => cmd,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "milter: protocol error, closing");
                        quit = true;
                        break;
                    }
                };
                let replies = conn.opts.replies_to(&cmd);
                let end = matches!(cmd, Command::Quit);
                let response = conn.command(cmd).await;
                if replies {
                    out.extend_from_slice(&response.unwrap_or(Response::Continue).encode());
                }
                if end {
                    quit = true;
                    break;
                }
            }
            if !out.is_empty() {
                if stream.write_all(&out).await.is_err() {
                    break 'read;
                }
                out.clear();
            }
            if quit {
                break;
            }
        }
        conn.end();
    }
}

/// The state of one SMTP connection of the MTA.
struct Conn<'a> {
    service: &'a MilterService,
    opts: Options,
    /// The latest value of each macro the MTA defined.
    macros: BTreeMap<String, String>,
    /// The client, once known.
    addr: Option<IpAddr>,
    /// HELO/EHLO as the MTA reported it.
    helo: Option<String>,
    /// Not judged (no client address): every command goes on.
    pass: bool,
    session: Option<Current>,
    /// The message being received, once DATA began.
    message: Option<Message>,
    /// A transaction whose callback did not answer in time: the rest of it gets this.
    deferred: Option<Reply>,
    /// A MAIL was accepted and the transaction not yet over.
    in_tx: bool,
}

struct Current {
    session: Session,
    /// The reply that closed the session (421), for the commands that follow.
    closing: Option<Reply>,
}

/// What the session's DATA is being fed.
struct Message {
    /// The session accepted DATA (354); otherwise the content is dropped.
    open: bool,
    /// The next octet starts a line (dot-stuffing).
    line_start: bool,
    /// The empty line after the headers was written.
    body: bool,
    /// The message file the session asked for.
    file: Option<Result<MessageFile, String>>,
}

/// A callback did not answer within `[milter] timeout`.
struct Slow;

/// Most macros kept per connection (Postfix sends about twenty).
const MACROS_MAX: usize = 256;
/// Longest macro (name and value) kept: addresses, queue ids and host names are short.
const MACRO_MAX: usize = 4096;

impl<'a> Conn<'a> {
    fn new(service: &'a MilterService) -> Self {
        Conn {
            service,
            opts: Options::default(),
            macros: BTreeMap::new(),
            addr: None,
            helo: None,
            pass: false,
            session: None,
            message: None,
            deferred: None,
            in_tx: false,
        }
    }

    async fn command(&mut self, cmd: Command) -> Option<Response> {
        match cmd {
            Command::OptNeg { version, actions, protocol } => match Options::negotiate(version, actions, protocol) {
                Ok((opts, response)) => {
                    self.opts = opts;
                    Some(response)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "milter: negotiation refused");
                    Some(Response::Tempfail)
                }
            },
            Command::Macro { macros, .. } => {
                for (name, value) in macros {
                    if name.len() + value.len() > MACRO_MAX {
                        continue;
                    }
                    if self.macros.len() < MACROS_MAX || self.macros.contains_key(&name) {
                        self.macros.insert(name, value);
                    }
                }
                None
            }
            Command::Connect { family, address, .. } => Some(self.connect(family, &address)),
            Command::Abort => {
                self.abort();
                None
            }
            Command::Quit => {
                self.end();
                None
            }
            Command::QuitNewConnection => {
                self.end();
                self.addr = None;
                self.helo = None;
                self.pass = false;
                self.macros.clear();
                None
            }
            _ if self.pass => Some(Response::Continue),
            Command::Helo(name) => {
                self.helo = Some(name);
                if !self.in_tx {
                    // A new EHLO resets the session's state; a banned session stays closed.
                    self.greet();
                }
                Some(Response::Continue)
            }
            Command::Mail(args) => Some(self.mail(&args).await),
            Command::Rcpt(args) => Some(self.rcpt(&args).await),
            Command::Data => Some(self.data().await),
            Command::Header { name, value } => {
                let sep = if self.opts.leading_space() { "" } else { " " };
                let value = value.replace("\r\n", "\n").replace('\n', "\r\n");
                self.content(format!("{name}:{sep}{value}\r\n").as_bytes(), false).await;
                None
            }
            Command::Eoh => {
                self.content(b"", true).await;
                None
            }
            Command::Body(chunk) => {
                self.content(&chunk, true).await;
                None
            }
            Command::EndOfBody(chunk) => Some(self.end_of_message(&chunk).await),
            Command::Unknown(_) => Some(Response::Continue),
        }
    }

    fn connect(&mut self, family: Family, address: &str) -> Response {
        self.end();
        self.pass = false;
        let server = &self.service.server;
        let from_packet = match family {
            Family::Inet | Family::Inet6 => parse_addr(address),
            Family::Unix | Family::Unknown => None,
        };
        let Some(addr) = from_packet.or_else(|| self.macros.get("{client_addr}").and_then(|a| parse_addr(a))) else {
            // A client the rules cannot name is not judged (as an SMTP client without an
            // address); ACCEPT: no further events for this connection.
            tracing::info!(address, "milter: no client address, not judged");
            self.pass = true;
            return Response::Accept;
        };
        self.addr = Some(addr);
        if server.is_banned(addr) {
            // G2: the gatekeeper's own ban table; 421 makes the MTA end the connection.
            self.pass = true;
            return Response::from_reply(&Reply::banned_closing(&server.session_config().hostname));
        }
        self.open();
        Response::Continue
    }

    fn open(&mut self) {
        let Some(addr) = self.addr else { return };
        let server = &self.service.server;
        let session = server.front_session(server.now(), server.next_session_id(), addr);
        // The greeting (220) is nobody's.
        let mut cur = Current { session, closing: None };
        let _ = std::iter::from_fn(|| cur.session.poll_reply()).count();
        self.session = Some(cur);
        self.greet();
    }

    /// EHLO as the MTA reported it; a name the SMTP parser refuses (or none) becomes the
    /// address literal. HELO decides nothing.
    fn greet(&mut self) {
        let (Some(cur), Some(addr)) = (self.session.as_mut(), self.addr) else { return };
        if cur.session.is_closed() {
            return;
        }
        let now = self.service.server.now();
        let literal = match addr {
            IpAddr::V4(a) => format!("[{a}]"),
            IpAddr::V6(a) => format!("[IPv6:{a}]"),
        };
        for name in [self.helo.as_deref().unwrap_or_default(), &literal] {
            if name.is_empty() {
                continue;
            }
            cur.session.handle_input(now, format!("EHLO {name}\r\n").as_bytes());
            let ok = std::iter::from_fn(|| cur.session.poll_reply()).last().is_some_and(|r| r.is_positive());
            if ok {
                break;
            }
        }
    }

    /// The session, opened again if an aborted message or a slow callback ended the last.
    fn ensure(&mut self) -> bool {
        if self.session.is_none() {
            self.open();
        }
        self.session.is_some()
    }

    async fn mail(&mut self, args: &[String]) -> Response {
        if self.in_tx || self.message.is_some() {
            self.abort();
        }
        self.deferred = None;
        if !self.ensure() {
            return Response::Continue;
        }
        let sender = bracketed(args.first().map(String::as_str).unwrap_or_default());
        let size = args.iter().skip(1).find_map(|a| {
            let (k, v) = a.split_once('=')?;
            k.eq_ignore_ascii_case("SIZE").then(|| v.parse::<u64>().ok()).flatten()
        });
        let line = match size {
            Some(s) => format!("MAIL FROM:{sender} SIZE={s}\r\n"),
            None => format!("MAIL FROM:{sender}\r\n"),
        };
        let reply = self.exchange(line.as_bytes()).await.ok().flatten();
        if reply.as_ref().is_some_and(Reply::is_positive) {
            self.in_tx = true;
        }
        reply.map_or(Response::Continue, |r| Response::from_reply(&r))
    }

    async fn rcpt(&mut self, args: &[String]) -> Response {
        if let Some(r) = &self.deferred {
            return Response::from_reply(r);
        }
        if !self.ensure() {
            return Response::Continue;
        }
        let rcpt = bracketed(args.first().map(String::as_str).unwrap_or_default());
        match self.exchange(format!("RCPT TO:{rcpt}\r\n").as_bytes()).await {
            Ok(reply) => reply.map_or(Response::Continue, |r| Response::from_reply(&r)),
            Err(Slow) => {
                // The session waits on a probe no one will hand it: it is over, and so is the
                // transaction (the MTA's client retries; the probe's result is cached by then).
                self.end();
                let r = Reply::sender_unverified();
                self.deferred = Some(r.clone());
                Response::from_reply(&r)
            }
        }
    }

    async fn data(&mut self) -> Response {
        if let Some(r) = &self.deferred {
            return Response::from_reply(r);
        }
        self.start_data().await.map_or(Response::Continue, |r| Response::from_reply(&r))
    }

    /// Gives the session DATA once per message (at SMFIC_DATA, or at the first header for an
    /// MTA that does not send it); its reply.
    async fn start_data(&mut self) -> Option<Reply> {
        if self.message.is_some() || self.session.is_none() {
            return None;
        }
        let reply = self.exchange(b"DATA\r\n").await.ok().flatten();
        let open = reply.as_ref().is_some_and(|r| r.code == 354);
        let file = self.message.take().and_then(|m| m.file);
        self.message = Some(Message { open, line_start: true, body: false, file });
        reply
    }

    /// Message content: a header line, or (`body`) the body, starting it with the empty line
    /// after the headers if not done yet. Dot-stuffed into the session's DATA.
    async fn content(&mut self, octets: &[u8], body: bool) {
        if self.deferred.is_some() {
            return;
        }
        if self.message.is_none() {
            let _ = self.start_data().await;
        }
        let Some(m) = self.message.as_mut() else { return };
        if !m.open {
            return;
        }
        let mut wire = Vec::with_capacity(octets.len() + octets.len() / 64 + 4);
        if body && !m.body {
            m.body = true;
            if !m.line_start {
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"\r\n");
            m.line_start = true;
        }
        for &b in octets {
            if m.line_start && b == b'.' {
                wire.push(b'.');
            }
            wire.push(b);
            m.line_start = b == b'\n';
        }
        if !wire.is_empty() {
            let _ = self.exchange(&wire).await;
        }
    }

    async fn end_of_message(&mut self, chunk: &[u8]) -> Response {
        if let Some(r) = self.deferred.take() {
            self.in_tx = false;
            return Response::from_reply(&r);
        }
        self.content(chunk, true).await;
        let Some(m) = self.message.as_ref() else {
            self.in_tx = false;
            return Response::Continue;
        };
        if !m.open {
            self.message = None;
            self.in_tx = false;
            return Response::Continue;
        }
        let end: &[u8] = if m.line_start { b".\r\n" } else { b"\r\n.\r\n" };
        let reply = self.exchange(end).await.ok().flatten();
        self.message = None;
        self.in_tx = false;
        reply.map_or(Response::Continue, |r| Response::from_reply(&r))
    }

    /// SMFIC_ABORT: the message is abandoned. A session in the middle of DATA cannot be reset
    /// (RSET would be content): it ends, and a new one starts at the next MAIL.
    fn abort(&mut self) {
        let in_data = self.message.take().is_some_and(|m| m.open);
        self.deferred = None;
        if in_data {
            self.end();
        } else if self.in_tx
            && let Some(cur) = self.session.as_mut()
            && !cur.session.is_closed()
        {
            cur.session.handle_input(self.service.server.now(), b"RSET\r\n");
            let _ = std::iter::from_fn(|| cur.session.poll_reply()).count();
        }
        self.in_tx = false;
    }

    /// Ends the session: its B4 record is kept for the client.
    fn end(&mut self) {
        self.message = None;
        self.in_tx = false;
        if let Some(c) = self.session.take() {
            self.service.server.front_finish(&c.session);
        }
    }

    /// Gives the session input, carries its actions out and returns its first reply (a
    /// closed session answers with its closing reply).
    async fn exchange(&mut self, input: &[u8]) -> Result<Option<Reply>, Slow> {
        let server = &self.service.server;
        let timeout = self.service.cfg.timeout;
        let queue_id = self.macros.get("i").filter(|i| !i.is_empty()).cloned().unwrap_or_else(|| "milter".into());
        let Some(cur) = self.session.as_mut() else { return Ok(None) };
        if cur.session.is_closed() {
            return Ok(cur.closing.clone());
        }
        let started = tokio::time::Instant::now();
        cur.session.handle_input(server.now(), input);
        while let Some(action) = cur.session.poll_action() {
            match action {
                Action::Ban { addr, session, request } => server.front_ban(addr, session, request).await,
                Action::Verify { sender } => {
                    if !server.front_verify(&mut cur.session, sender, started + timeout).await {
                        return Err(Slow);
                    }
                }
                // Without the scan (V1 off) nothing reads the message: no file.
                Action::Receive { .. } if !cur.session.config().scan => {
                    self.message.get_or_insert(Message { open: true, line_start: true, body: false, file: None });
                }
                Action::Receive { envelope } => {
                    let name = format!(
                        "{}.{}.{}",
                        std::process::id(),
                        envelope.session,
                        FILES.fetch_add(1, Ordering::Relaxed)
                    );
                    let file = MessageFile::create(&self.service.dir, &name, b"").map_err(|e| {
                        tracing::warn!(error = %e, dir = %self.service.dir.display(), "milter: cannot create the message file");
                        format!("cannot create the message file: {e}")
                    });
                    let m =
                        self.message.get_or_insert(Message { open: true, line_start: true, body: false, file: None });
                    m.file = Some(file);
                }
                Action::Append { chunk } => {
                    if let Some(Message { file: Some(f), .. }) = self.message.as_mut()
                        && let Ok(file) = f
                        && let Err(e) = file.append(&chunk)
                    {
                        tracing::warn!(error = %e, file = %file.path().display(), "milter: cannot write the message");
                        *f = Err(format!("cannot write the message: {e}"));
                    }
                }
                Action::Discard => {
                    if let Some(m) = self.message.as_mut() {
                        m.file = None;
                    }
                }
                Action::Scan => match self.message.as_mut().and_then(|m| m.file.take()) {
                    Some(Ok(file)) => {
                        let outcome = server.front_scan(&file).await;
                        drop(file);
                        cur.session.handle_scanned(server.now(), outcome);
                    }
                    Some(Err(why)) => cur.session.handle_store_failed(server.now(), why),
                    None => cur.session.handle_store_failed(server.now(), "no message file".into()),
                },
                // The MTA keeps the message: the handoff is its queue.
                Action::Deliver { .. } => {
                    if let Some(m) = self.message.as_mut() {
                        m.file = None;
                    }
                    cur.session.handle_delivered(server.now(), Ok(queue_id.clone()));
                }
                Action::StartTls | Action::Close => {}
            }
        }
        let (first, closing) = server.front_replies(&mut cur.session);
        if closing.is_some() {
            cur.closing = closing;
        }
        Ok(first)
    }
}

/// A client address as MTAs write it: `192.0.2.1`, `2001:db8::1`, sendmail's
/// `IPv6:2001:db8::1`, possibly in brackets; IPv4-mapped IPv6 as IPv4.
fn parse_addr(text: &str) -> Option<IpAddr> {
    let t = text.trim().trim_start_matches('[').trim_end_matches(']');
    let t = if t.len() > 5 && t[..5].eq_ignore_ascii_case("IPv6:") { &t[5..] } else { t };
    t.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

/// A path in angle brackets, as the MTA gave it or bracketed if it did not.
fn bracketed(path: &str) -> String {
    let p = path.trim();
    if p.starts_with('<') { p.to_string() } else { format!("<{p}>") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_as_postfix_and_sendmail_write_them() {
        assert_eq!(parse_addr("192.0.2.1"), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(parse_addr("IPv6:2001:db8::1"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(parse_addr("[IPv6:2001:db8::1]"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(parse_addr("::ffff:192.0.2.7"), Some("192.0.2.7".parse().unwrap()));
        assert_eq!(parse_addr("unknown"), None);
        assert_eq!(bracketed("<a@b>"), "<a@b>");
        assert_eq!(bracketed("a@b"), "<a@b>");
        assert_eq!(bracketed("<>"), "<>");
    }

    #[test]
    fn section_problems_are_all_listed() {
        let s = MilterSection {
            listen: Some("nowhere".into()),
            socket_group: None,
            timeout: Duration::from_secs(30),
            idle_timeout: Duration::ZERO,
            max_connections: 0,
        };
        assert_eq!(s.problems().len(), 4, "{:?}", s.problems());
        assert!(MilterSection::default().problems().is_empty());
    }
}
