//! The client side of a connection to the gatekeeper: SYNs through the kernel firewall model
//! on the Linux retransmission schedule, the PROXY v2 header that carries the client's own
//! address, and a small scripted SMTP client that checks every reply against RFC 5321 as it
//! arrives.
//!
//! A dropped SYN gets no answer: the client waits for its next retransmission (KERNEL.md §3)
//! and gives up with ETIMEDOUT at the end of the schedule. Only an accepted SYN becomes a
//! turmoil connection.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use gatekeeper::gate::GateDecision;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::TcpStream;

use crate::metrics::Invariant;
use crate::world::World;

/// Why a connection attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectError {
    /// Every SYN was dropped (ETIMEDOUT), or the SYN-ACK never came.
    TimedOut,
    /// Connection refused (the gatekeeper process is down).
    Refused,
}

/// How long a SYN-ACK may take once the kernel accepted the SYN (a partition).
const SYN_ACK_WAIT: Duration = Duration::from_secs(75);

/// Connects `src` to the gatekeeper through the kernel model and sends the PROXY v2 header.
pub async fn connect(world: &World, src: IpAddr, port: u16) -> Result<TcpStream, ConnectError> {
    let (syns, etimedout) = world.cfg.client_kernel.schedule();
    let start = tokio::time::Instant::now();
    {
        let now = world.now();
        let mut st = world.state();
        st.bump(src, |c| c.attempts += 1);
        st.seen.insert(src);
        st.hour(now).attempts += 1;
    }
    let mut delayed = false;
    for &offset in syns {
        tokio::time::sleep_until(start + Duration::from_secs(offset)).await;
        match syn(world, src) {
            GateDecision::Accept => {
                let stream = open(world, src, port).await;
                if delayed && stream.is_ok() {
                    world.state().bump(src, |c| c.rate_delayed += 1);
                }
                return stream;
            }
            GateDecision::DropRate => delayed = true,
            GateDecision::DropBanned => {}
        }
    }
    tokio::time::sleep_until(start + Duration::from_secs(etimedout)).await;
    world.state().bump(src, |c| c.gave_up += 1);
    Err(ConnectError::TimedOut)
}

/// One SYN through the kernel model.
fn syn(world: &World, src: IpAddr) -> GateDecision {
    let now = world.now();
    let decision = world.kernel().syn(now, src);
    let mut st = world.state();
    st.bump(src, |c| c.syns += 1);
    match decision {
        GateDecision::Accept => {
            if world.ban_certain(&st, src, now) {
                st.c.accepted_while_banned += 1;
                if !st.kernel_lost && !world.kernel().may_have_evicted() {
                    st.violate(now, Invariant::BanNotEnforced, src, "kernel accepted a SYN of a banned client".into());
                }
            }
        }
        GateDecision::DropRate => {
            st.bump(src, |c| c.drop_rate += 1);
            st.hour(now).kernel_drops += 1;
        }
        GateDecision::DropBanned => {
            st.bump(src, |c| c.drop_banned += 1);
            st.hour(now).kernel_drops += 1;
            if !world.ban_live(&st, src, now) {
                let detail = match world.ban_of(&st, src) {
                    Some(b) => format!(
                        "kernel dropped a SYN as banned {:.3} s after the ban expired",
                        (now - b.expires).as_secs_f64()
                    ),
                    None => "kernel dropped a SYN as banned; no ban was decided".to_string(),
                };
                st.violate(now, Invariant::BanOutlived, src, detail);
            }
        }
    }
    decision
}

async fn open(world: &World, src: IpAddr, port: u16) -> Result<TcpStream, ConnectError> {
    let connected = tokio::time::timeout(SYN_ACK_WAIT, TcpStream::connect(("gatekeeper", 25))).await;
    let mut stream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => {
            world.state().bump(src, |c| c.refused += 1);
            return Err(ConnectError::Refused);
        }
        Err(_) => {
            world.state().bump(src, |c| c.gave_up += 1);
            return Err(ConnectError::TimedOut);
        }
    };
    let dst = stream.peer_addr().map_err(|_| ConnectError::Refused)?;
    let header = gatekeeper::proto::proxy_v2_header(SocketAddr::new(src, port), dst);
    if stream.write_all(&header).await.is_err() {
        world.state().bump(src, |c| c.refused += 1);
        return Err(ConnectError::Refused);
    }
    world.state().bump(src, |c| c.sessions += 1);
    Ok(stream)
}

/// A command, for reply validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// The greeting.
    Greeting,
    /// EHLO.
    Ehlo,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// DATA.
    Data,
    /// The end of the message.
    Dot,
    /// RSET.
    Rset,
    /// QUIT.
    Quit,
}

impl Cmd {
    /// Reply codes RFC 5321 §4.3.2 allows (421 anywhere, §3.8). 554 after RCPT is the
    /// customary "relay access denied"; §4.2.2 defines it as "transaction failed".
    fn allowed(self) -> &'static [u16] {
        match self {
            Cmd::Greeting => &[220, 421, 554],
            Cmd::Ehlo => &[250, 421, 500, 501, 502, 504, 550],
            Cmd::Mail => &[250, 421, 451, 452, 455, 503, 550, 552, 553, 555],
            Cmd::Rcpt => &[250, 251, 421, 450, 451, 452, 455, 503, 550, 551, 552, 553, 554, 555],
            Cmd::Data => &[354, 421, 450, 451, 452, 503, 550, 554],
            Cmd::Dot => &[250, 421, 450, 451, 452, 550, 552, 554],
            Cmd::Rset => &[250, 421],
            Cmd::Quit => &[221, 421],
        }
    }
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resp {
    /// The code.
    pub code: u16,
    /// The enhanced status code of the last line, if any (RFC 3463).
    pub enhanced: Option<(u8, u16, u16)>,
    /// The text of the last line.
    pub text: String,
}

impl Resp {
    /// 2xx or 3xx.
    pub fn ok(&self) -> bool {
        self.code < 400
    }
}

/// A scripted SMTP client that validates every reply as it arrives and records violations.
#[derive(Debug)]
pub struct Smtp {
    stream: TcpStream,
    buf: Vec<u8>,
    world: Arc<World>,
    client: IpAddr,
    /// The server gave 554 at connect: only QUIT may get anything but 503.
    refused: bool,
    /// EHLO succeeded: replies carry enhanced codes (RFC 2034).
    enhanced: bool,
    /// MAIL accepted, transaction open.
    in_mail: bool,
    /// Recipients accepted in this transaction.
    rcpts: u32,
}

impl Smtp {
    /// Wraps a connected stream (PROXY header already sent).
    pub fn new(stream: TcpStream, world: Arc<World>, client: IpAddr) -> Smtp {
        Smtp {
            stream,
            buf: Vec::with_capacity(512),
            world,
            client,
            refused: false,
            enhanced: false,
            in_mail: false,
            rcpts: 0,
        }
    }

    /// Reads the greeting.
    pub async fn greeting(&mut self) -> io::Result<Resp> {
        let r = self.read(Cmd::Greeting).await?;
        self.refused = r.code == 554;
        Ok(r)
    }

    /// Sends one command line and reads its reply.
    pub async fn cmd(&mut self, cmd: Cmd, line: &str) -> io::Result<Resp> {
        let mut out = Vec::with_capacity(line.len() + 2);
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
        self.stream.write_all(&out).await?;
        self.read(cmd).await
    }

    /// Sends a message body (dot-stuffed by the caller; no final dot) and reads the reply.
    pub async fn message(&mut self, body: &str) -> io::Result<Resp> {
        let mut out = Vec::with_capacity(body.len() + 5);
        out.extend_from_slice(body.as_bytes());
        out.extend_from_slice(b".\r\n");
        self.stream.write_all(&out).await?;
        self.read(Cmd::Dot).await
    }

    /// QUIT, ignoring what happens (the server may already have closed).
    pub async fn quit(mut self) {
        let _ = self.cmd(Cmd::Quit, "QUIT").await;
    }

    async fn read(&mut self, cmd: Cmd) -> io::Result<Resp> {
        let mut first_code = None;
        loop {
            while let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                let line = &line[..end];
                let code =
                    parse_code(line).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad reply line"))?;
                if *first_code.get_or_insert(code) != code {
                    self.bad(format!("multiline reply mixes codes {} and {code}", first_code.unwrap_or(0)));
                }
                if line.get(3) == Some(&b'-') {
                    continue;
                }
                let text = String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned();
                let resp = Resp { code, enhanced: parse_enhanced(&text), text };
                self.validate(cmd, &resp);
                return Ok(resp);
            }
            let mut chunk = [0u8; 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
            self.buf.extend_from_slice(&chunk[..n]);
            if self.buf.len() > 64 * 1024 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "reply too long"));
            }
        }
    }

    fn validate(&mut self, cmd: Cmd, r: &Resp) {
        let code = r.code;
        if self.refused && cmd != Cmd::Quit && cmd != Cmd::Greeting {
            // RFC 5321 §3.1: after a 554 greeting, 503 to everything but QUIT.
            if code != 503 && code != 421 {
                self.bad(format!("{cmd:?} after a 554 greeting got {code}, not 503"));
            }
            return;
        }
        if !cmd.allowed().contains(&code) {
            self.bad(format!("{cmd:?} got {code}, which RFC 5321 §4.3.2 does not allow"));
        }
        // RFC 2034 §3: every 2xx, 4xx and 5xx reply after EHLO carries one (not 3xx: RFC 3463
        // defines no class 3).
        if self.enhanced && !matches!(cmd, Cmd::Greeting | Cmd::Ehlo) && code / 100 != 3 {
            match r.enhanced {
                None => self.bad(format!("{cmd:?} reply {code} lacks an enhanced status code (RFC 2034)")),
                Some((class, _, _)) if u16::from(class) != code / 100 => {
                    self.bad(format!("{cmd:?} reply {code} carries enhanced code class {class} (RFC 3463)"));
                }
                _ => {}
            }
        }
        match cmd {
            Cmd::Ehlo => self.enhanced = code == 250 && !self.refused,
            Cmd::Mail => {
                if code == 503 {
                    self.bad("MAIL after a successful EHLO got 503".into());
                }
                self.in_mail = code == 250;
                self.rcpts = 0;
            }
            Cmd::Rcpt => {
                if code == 503 && self.in_mail {
                    self.bad("RCPT after an accepted MAIL got 503".into());
                }
                if code == 250 {
                    self.rcpts += 1;
                }
            }
            Cmd::Data => {
                if code == 503 && self.rcpts > 0 {
                    self.bad("DATA after an accepted RCPT got 503".into());
                }
                if code == 354 && self.rcpts == 0 {
                    self.bad("DATA without an accepted recipient got 354".into());
                }
            }
            Cmd::Dot | Cmd::Rset => {
                self.in_mail = false;
                self.rcpts = 0;
            }
            Cmd::Greeting | Cmd::Quit => {}
        }
    }

    /// Records a reply the rules or RFC 5321 forbid.
    pub fn bad(&self, detail: String) {
        let now = self.world.now();
        self.world.state().violate(now, Invariant::BadReply, self.client, detail);
    }
}

fn parse_code(line: &[u8]) -> Option<u16> {
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return None;
    }
    if line.len() > 3 && line[3] != b' ' && line[3] != b'-' {
        return None;
    }
    Some(line[..3].iter().fold(0u16, |a, d| a * 10 + u16::from(d - b'0')))
}

fn parse_enhanced(text: &str) -> Option<(u8, u16, u16)> {
    let word = text.split(' ').next()?;
    let mut parts = word.split('.');
    let class = parts.next()?.parse().ok()?;
    let subject = parts.next()?.parse().ok()?;
    let detail = parts.next()?.parse().ok()?;
    if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
        return None;
    }
    Some((class, subject, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines_parse() {
        assert_eq!(parse_code(b"250-PIPELINING"), Some(250));
        assert_eq!(parse_code(b"550 5.1.1 No such user"), Some(550));
        assert_eq!(parse_code(b"25"), None);
        assert_eq!(parse_code(b"250x"), None);
        assert_eq!(parse_enhanced("5.1.1 No such user"), Some((5, 1, 1)));
        assert_eq!(parse_enhanced("mx.example.test ESMTP"), None);
        assert_eq!(parse_enhanced("3.0.0 x"), None);
    }
}
