//! The client side of a connection to the gatekeeper: SYNs through the kernel firewall model
//! on the Linux retransmission schedule, the PROXY v2 header that carries the client's own
//! address, and a small scripted SMTP client that checks every reply against RFC 5321 as it
//! arrives, reading it with the gatekeeper's own parser (`Reply::parse_prefix`) and judging its
//! code by the one table of allowed codes (`Verb`).
//!
//! A dropped SYN gets no answer: the client waits for its next retransmission (docs/kernel.md §3)
//! and gives up with ETIMEDOUT at the end of the schedule. Only an accepted SYN becomes a
//! turmoil connection.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use gatekeeper::gate::GateDecision;
use gatekeeper::proto::{Enhanced, Reply, Verb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::TcpStream;

use crate::invariants::Invariant;
use crate::scenario::ProxyMode;
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
    connect_as(world, src, port, ProxyMode::Client).await
}

/// [`connect`], or with [`ProxyMode::Local`] the proxy's own health check: no kernel model
/// (the SYN is the proxy's, from a trusted host) and a PROXY v2 LOCAL header. `src` is still
/// the actor's address, for its counters.
pub async fn connect_as(world: &World, src: IpAddr, port: u16, proxy: ProxyMode) -> Result<TcpStream, ConnectError> {
    if proxy == ProxyMode::Local {
        {
            let now = world.now();
            let mut st = world.state();
            st.bump(src, |c| c.attempts += 1);
            st.hour(now).attempts += 1;
        }
        return open(world, src, port, proxy).await;
    }
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
        crate::wake::sleep_until(start + Duration::from_secs(offset)).await;
        if world.state().machine_down {
            // A machine that is rebooting answers nothing; the client retransmits.
            world.state().bump(src, |c| c.syns += 1);
            continue;
        }
        match syn(world, src) {
            GateDecision::Accept if world.syn_ack_lost(world.now()) => {
                // The kernel took the SYN (and counted it); the answer never arrived.
                world.state().bump(src, |c| c.syn_acks_lost += 1);
            }
            GateDecision::Accept => {
                let stream = open(world, src, port, proxy).await;
                if delayed && stream.is_ok() {
                    world.state().bump(src, |c| c.rate_delayed += 1);
                }
                return stream;
            }
            GateDecision::DropRate => delayed = true,
            GateDecision::DropBanned => {}
        }
    }
    crate::wake::sleep_until(start + Duration::from_secs(etimedout)).await;
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

async fn open(world: &World, src: IpAddr, port: u16, proxy: ProxyMode) -> Result<TcpStream, ConnectError> {
    let connected = crate::wake::timeout(SYN_ACK_WAIT, TcpStream::connect(("gatekeeper", 25))).await;
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
    let header = match proxy {
        ProxyMode::Client => gatekeeper::proto::proxy_v2_header(SocketAddr::new(src, port), dst),
        ProxyMode::Local => gatekeeper::proto::proxy_v2_local_header(),
    };
    if stream.write_all(&header).await.is_err() {
        world.state().bump(src, |c| c.refused += 1);
        return Err(ConnectError::Refused);
    }
    world.state().bump(src, |c| c.sessions += 1);
    Ok(stream)
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
    pub async fn greeting(&mut self) -> io::Result<Reply> {
        let r = self.read(Verb::Greeting).await?;
        self.refused = r.code == 554;
        Ok(r)
    }

    /// Sends one command line and reads its reply.
    pub async fn cmd(&mut self, verb: Verb, line: &str) -> io::Result<Reply> {
        let mut out = Vec::with_capacity(line.len() + 2);
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
        self.stream.write_all(&out).await?;
        self.read(verb).await
    }

    /// Sends a message body (dot-stuffed by the caller; no final dot) and reads the reply.
    pub async fn message(&mut self, body: &str) -> io::Result<Reply> {
        let mut out = Vec::with_capacity(body.len() + 5);
        out.extend_from_slice(body.as_bytes());
        out.extend_from_slice(b".\r\n");
        self.stream.write_all(&out).await?;
        self.read(Verb::EndOfData).await
    }

    /// QUIT, ignoring what happens (the server may already have closed).
    pub async fn quit(mut self) {
        let _ = self.cmd(Verb::Quit, "QUIT").await;
    }

    async fn read(&mut self, verb: Verb) -> io::Result<Reply> {
        loop {
            match Reply::parse_prefix(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    self.validate(verb, &reply);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(e) => {
                    self.bad(format!("{verb} got a malformed reply: {e}"));
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
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

    fn validate(&mut self, verb: Verb, r: &Reply) {
        let code = r.code;
        // RFC 5321 §3.1: after a 554 greeting, 503 to everything but QUIT.
        let after_refusal = self.refused && verb != Verb::Quit;
        if after_refusal && !verb.allows_after_refusal(code) {
            self.bad(format!("{verb} after a 554 greeting got {code}, not 503"));
        } else if !after_refusal && !verb.allows(code) {
            self.bad(format!("{verb} got {code}, which RFC 5321 §4.3.2 does not allow"));
        }
        if after_refusal {
            return;
        }
        // RFC 2034 §3: every 2xx, 4xx and 5xx reply after EHLO carries one (not 3xx: RFC 3463
        // defines no class 3).
        if self.enhanced && !matches!(verb, Verb::Greeting | Verb::Ehlo) && code / 100 != 3 {
            match r.enhanced {
                None => self.bad(format!("{verb} reply {code} lacks an enhanced status code (RFC 2034)")),
                Some(Enhanced(class, _, _)) if u16::from(class) != code / 100 => {
                    self.bad(format!("{verb} reply {code} carries enhanced code class {class} (RFC 3463)"));
                }
                _ => {}
            }
        }
        match verb {
            Verb::Ehlo => self.enhanced = code == 250 && !self.refused,
            Verb::Mail => {
                if code == 503 {
                    self.bad("MAIL after a successful EHLO got 503".into());
                }
                self.in_mail = code == 250;
                self.rcpts = 0;
            }
            Verb::Rcpt => {
                if code == 503 && self.in_mail {
                    self.bad("RCPT after an accepted MAIL got 503".into());
                }
                if code == 250 {
                    self.rcpts += 1;
                }
            }
            Verb::Data => {
                if code == 503 && self.rcpts > 0 {
                    self.bad("DATA after an accepted RCPT got 503".into());
                }
                if code == 354 && self.rcpts == 0 {
                    self.bad("DATA without an accepted recipient got 354".into());
                }
            }
            Verb::EndOfData | Verb::Rset => {
                self.in_mail = false;
                self.rcpts = 0;
            }
            Verb::Greeting | Verb::Helo | Verb::Vrfy | Verb::Expn | Verb::Help | Verb::Noop | Verb::Quit => {}
        }
    }

    /// Records a reply the rules or RFC 5321 forbid.
    pub fn bad(&self, detail: String) {
        let now = self.world.now();
        self.world.state().violate(now, Invariant::BadReply, self.client, detail);
    }
}
