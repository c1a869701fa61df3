//! One SMTP session as a client: connect from its own source address, play one class of
//! traffic in lock step (one command, one reply — as a bounce MTA or a spam bot does), check
//! every reply against what that class must get, and time it from the connect to the 221.
//!
//! The classes and what a correct server answers (the gatekeeper's rules, Postfix with the
//! equivalent restrictions, and the do-nothing responder all give the same codes):
//!
//! | class | MAIL FROM | RCPT TO | expected |
//! | --- | --- | --- | --- |
//! | backscatter | `<>` | random local part | 250, then 5xx (E2; no ban) |
//! | forged | random local part of the local domain | a valid user | 5xx at MAIL (E1, ban B1) or at RCPT |
//! | fake | random external sender | random local part | 250, then 5xx (E2, ban B4) |
//! | honest | an external sender | a valid user | 250, 250, DATA 354, 250 after the dot |
//!
//! Every session ends with QUIT and must get 221 — except one whose sender was banned on the
//! spot (forged): the gatekeeper ends the session that earned a ban with 421 right after the
//! 5xx (docs/design.md §2), so its QUIT finds a 421 or a closed connection.
//!
//! With STARTTLS ([`ClientConfig::tls`]), every session says EHLO, STARTTLS (220), does a full
//! TLS handshake (no resumption: each session pays for its own key exchange and signature, as
//! a stranger's MTA does), says EHLO again over TLS and plays its class from MAIL on. A refused
//! STARTTLS or a failed handshake fails the session ([`Failure::is_tls`]).

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use gatekeeper::edges::AnyCertificate;
use gatekeeper::proto::Reply;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

use crate::sources::SourceCursor;

/// The kind of client one session plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// A third-party server bouncing spam that forged our domain: `<>` to a random local part.
    Backscatter,
    /// A spammer forging a sender in our own domain.
    Forged,
    /// A spammer with a made-up external sender, to a random local part.
    Fake,
    /// An honest MTA delivering a small message to a real user.
    Honest,
}

impl Class {
    /// Every class, in report order.
    pub const ALL: [Class; 4] = [Class::Backscatter, Class::Forged, Class::Fake, Class::Honest];

    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Backscatter => "backscatter",
            Class::Forged => "forged",
            Class::Fake => "fake",
            Class::Honest => "honest",
        }
    }
}

/// What the sessions of a run are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Backscatter only: `MAIL FROM:<>`, RCPT to an unknown user → 550.
    EarlyReject,
    /// Forged local senders only: 550 at MAIL FROM (+ ban B1 in the gatekeeper).
    Forged,
    /// Honest messages only: a small message to a valid user, handed off durably.
    Accept,
    /// The seed's traffic: [`MIX_PERMILLE`].
    Mix,
}

/// The seed's mix, in sessions per thousand: mostly backscatter, some forged and fake
/// senders, a few honest messages (docs/design.md §1; the actors of the simulation).
pub const MIX_PERMILLE: [(Class, u32); 4] =
    [(Class::Backscatter, 880), (Class::Forged, 40), (Class::Fake, 40), (Class::Honest, 40)];

impl Workload {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::EarlyReject => "early-reject",
            Workload::Forged => "forged",
            Workload::Accept => "accept",
            Workload::Mix => "mix",
        }
    }

    /// The class of session number `index` (deterministic for the mix: drawn from `seed`).
    pub fn class(self, seed: u64, index: u64) -> Class {
        match self {
            Workload::EarlyReject => Class::Backscatter,
            Workload::Forged => Class::Forged,
            Workload::Accept => Class::Honest,
            Workload::Mix => {
                let mut draw = session_rng(seed ^ 0x6d69_7800, index).random_range(0..1000u32);
                for (class, permille) in MIX_PERMILLE {
                    if draw < permille {
                        return class;
                    }
                    draw -= permille;
                }
                Class::Backscatter
            }
        }
    }
}

/// A generator for session `index` of a run with `seed` (splitmix64 of both).
pub fn session_rng(seed: u64, index: u64) -> SmallRng {
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    SmallRng::seed_from_u64(z ^ (z >> 31))
}

/// What every session of a run shares.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server.
    pub target: SocketAddr,
    /// The server's local domain.
    pub domain: String,
    /// Local parts that exist there (honest mail goes to them).
    pub users: Vec<String>,
    /// The whole session, connect to 221, must take at most this.
    pub timeout: Duration,
    /// Seed of the random local parts and of the mix.
    pub seed: u64,
    /// The honest message, dot-stuffed, ending with `.\r\n`.
    pub message: Arc<[u8]>,
    /// STARTTLS in every session, or none.
    pub tls: Option<StartTls>,
}

impl ClientConfig {
    /// A configuration whose honest message has about `message_bytes` octets.
    pub fn new(
        target: SocketAddr,
        domain: &str,
        users: Vec<String>,
        timeout: Duration,
        seed: u64,
        message_bytes: usize,
    ) -> Self {
        let message = message(domain, users.first().map_or("postmaster", String::as_str), message_bytes);
        ClientConfig { target, domain: domain.into(), users, timeout, seed, message: message.into(), tls: None }
    }

    /// The same with STARTTLS in every session.
    pub fn with_starttls(self, tls: StartTls) -> Self {
        ClientConfig { tls: Some(tls), ..self }
    }
}

/// STARTTLS as a client: the TLS client configuration (rustls with *ring*, as the server; no
/// session resumption) and the name the server is addressed by (SNI, and the name checked
/// against its certificate when one is trusted).
#[derive(Clone)]
pub struct StartTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl fmt::Debug for StartTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StartTls").field("name", &self.name).finish_non_exhaustive()
    }
}

impl StartTls {
    /// A client that trusts the certificate(s) in `ca` (PEM: the benchmark's self-signed
    /// certificate) for `name`; with no `ca`, any certificate (the handshake's signatures are
    /// still verified, as an opportunistic MTA does).
    pub fn new(ca: Option<&Path>, name: &str) -> anyhow::Result<StartTls> {
        #[allow(deprecated)] // ring, as the gatekeeper (impl/src/edges/tls.rs).
        let mut provider = rustls::crypto::ring::default_provider();
        // Key exchange as a sending MTA offers it: OpenSSL's clients (Postfix's smtp, Exim,
        // sendmail) lead with X25519 and send only its key share; this rustls's own default
        // would lead with P-384, several times dearer for both sides.
        {
            use rustls::crypto::ring::kx_group::{SECP256R1, SECP384R1, X25519};
            provider.kx_groups = vec![X25519, SECP256R1, SECP384R1];
        }
        let provider = Arc::new(provider);
        let builder =
            rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let mut config = match ca {
            Some(ca) => {
                let certs = CertificateDer::pem_file_iter(ca)
                    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                    .with_context(|| format!("reading {}", ca.display()))?;
                let mut roots = rustls::RootCertStore::empty();
                let (_, bad) = roots.add_parsable_certificates(certs);
                anyhow::ensure!(bad == 0 && !roots.is_empty(), "{}: no usable certificate", ca.display());
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider.signature_verification_algorithms)))
                .with_no_client_auth(),
        };
        // Every session a full handshake: what a server pays for a client it has not seen.
        config.resumption = rustls::client::Resumption::disabled();
        let name = ServerName::try_from(name.to_string()).with_context(|| format!("server name {name:?}"))?;
        Ok(StartTls { connector: TlsConnector::from(Arc::new(config)), name })
    }
}

/// What a TLS session negotiated: version, cipher suite, key exchange group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The protocol version.
    pub version: Option<rustls::ProtocolVersion>,
    /// The cipher suite.
    pub suite: Option<rustls::CipherSuite>,
    /// The key exchange group.
    pub group: Option<rustls::NamedGroup>,
}

impl fmt::Display for Negotiated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        write!(
            f,
            "{} {} {}",
            show(self.version.map(|v| format!("{v:?}"))),
            show(self.suite.map(|v| format!("{v:?}"))),
            show(self.group.map(|v| format!("{v:?}")))
        )
    }
}

/// A small plain-text message of about `size` octets (at least its headers) with the end of
/// data mark. No line starts with a dot, so no stuffing is needed.
fn message(domain: &str, user: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: Honest Sender <sender@honest.test>\r\nTo: <{user}@{domain}>\r\nSubject: load benchmark\r\n\
         Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <bench@honest.test>\r\n\r\n"
    )
    .into_bytes();
    let line = b"The quick brown fox jumps over the lazy dog, again and again, for the benchmark.\r\n";
    while m.len() + line.len() <= size {
        m.extend_from_slice(line);
    }
    m.extend_from_slice(b".\r\n");
    m
}

/// The step a session was at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Binding and connecting.
    Connect,
    /// Waiting for the greeting.
    Greeting,
    /// EHLO.
    Ehlo,
    /// STARTTLS (the 220).
    StartTls,
    /// The TLS handshake.
    Handshake,
    /// EHLO again, over TLS.
    EhloTls,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// DATA (the 354).
    Data,
    /// The message and its end-of-data reply.
    Body,
    /// QUIT.
    Quit,
    /// Held open (the hold driver), waiting to be released.
    Held,
}

impl Step {
    fn as_str(self) -> &'static str {
        match self {
            Step::Connect => "connect",
            Step::Greeting => "greeting",
            Step::Ehlo => "EHLO",
            Step::StartTls => "STARTTLS",
            Step::Handshake => "TLS handshake",
            Step::EhloTls => "EHLO over TLS",
            Step::Mail => "MAIL",
            Step::Rcpt => "RCPT",
            Step::Data => "DATA",
            Step::Body => "end of data",
            Step::Quit => "QUIT",
            Step::Held => "hold",
        }
    }
}

/// Why a session failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A reply with a code this class must not get.
    Unexpected {
        /// Where.
        step: Step,
        /// The code.
        code: u16,
    },
    /// A socket error (connect refused, reset, EOF...).
    Io {
        /// Where.
        step: Step,
        /// What.
        kind: io::ErrorKind,
    },
    /// The session took longer than the client's timeout.
    Timeout {
        /// Where it was stuck.
        step: Step,
    },
    /// The TLS handshake failed (rustls's reason, or a socket error's kind).
    Handshake {
        /// What.
        reason: String,
    },
    /// The open-loop driver had too many sessions in flight and skipped this one.
    Overload,
}

impl Failure {
    /// A short stable key, for counting failures by kind.
    pub fn key(&self) -> String {
        match self {
            Failure::Unexpected { step: Step::Greeting, code } => format!("greeting {code}"),
            Failure::Unexpected { step, code } => format!("{} got {code}", step.as_str()),
            Failure::Io { step, kind } => format!("{}: {kind:?}", step.as_str()),
            Failure::Timeout { step } => format!("timeout at {}", step.as_str()),
            Failure::Handshake { reason } => format!("TLS handshake: {reason}"),
            Failure::Overload => "client overload (skipped)".into(),
        }
    }

    /// A STARTTLS refused or a handshake failed or timed out: a handshake failure.
    pub fn is_tls(&self) -> bool {
        match self {
            Failure::Handshake { .. } => true,
            Failure::Unexpected { step, .. } | Failure::Io { step, .. } | Failure::Timeout { step } => {
                matches!(step, Step::StartTls | Step::Handshake)
            }
            Failure::Overload => false,
        }
    }
}

/// A failed session's step and reason; `Ok` for a session that went as its class must.
pub type SessionResult = Result<(), Failure>;

/// The connection, in clear text or after STARTTLS.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An open SMTP connection with a reply reader.
#[derive(Debug)]
pub struct Conn {
    stream: Stream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

/// Errors from binding a source address that another address would fix.
fn is_address_problem(kind: io::ErrorKind) -> bool {
    matches!(kind, io::ErrorKind::AddrInUse | io::ErrorKind::AddrNotAvailable)
}

/// Source-address attempts before a session gives up connecting.
const SOURCE_TRIES: u32 = 4;

impl Conn {
    /// Connects to `target` from the next source address; on EADDRINUSE or EADDRNOTAVAIL
    /// (ports or addresses exhausted) tries the next few addresses. Returns the connection and
    /// how many addresses were skipped.
    pub async fn open(target: SocketAddr, sources: &SourceCursor) -> Result<(Conn, u32), io::Error> {
        let mut skipped = 0;
        loop {
            let source = sources.take();
            match Self::connect_from(source, target).await {
                Ok(stream) => {
                    let conn = Conn { stream: Stream::Plain(stream), buf: vec![0; 4096].into(), start: 0, end: 0 };
                    return Ok((conn, skipped));
                }
                Err(e) if is_address_problem(e.kind()) && skipped + 1 < SOURCE_TRIES => skipped += 1,
                Err(e) => return Err(e),
            }
        }
    }

    async fn connect_from(source: Ipv4Addr, target: SocketAddr) -> io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Reads one whole reply (all its lines) with the gatekeeper's parser and returns its code;
    /// a malformed reply is an `InvalidData` error.
    pub async fn reply(&mut self) -> io::Result<u16> {
        loop {
            match Reply::parse_prefix(&self.buf[self.start..self.end]) {
                Ok(Some((reply, used))) => {
                    self.start += used;
                    return Ok(reply.code);
                }
                Ok(None) => {}
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "reply too long"));
            }
            let into = &mut self.buf[self.end..];
            let n = match &mut self.stream {
                Stream::Plain(s) => s.read(into).await?,
                Stream::Tls(s) => s.read(into).await?,
            };
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.end += n;
        }
    }

    /// Sends `bytes` and reads the reply.
    pub async fn command(&mut self, bytes: &[u8]) -> io::Result<u16> {
        match &mut self.stream {
            Stream::Plain(s) => s.write_all(bytes).await?,
            Stream::Tls(s) => s.write_all(bytes).await?,
        }
        self.reply().await
    }

    /// The TLS handshake after the server's 220 to STARTTLS. Anything the server sent after
    /// that 220 in clear text is a protocol error (it would be read as if over TLS).
    async fn starttls(self, tls: &StartTls) -> Result<(Conn, Negotiated), Failure> {
        let Stream::Plain(tcp) = self.stream else {
            return Err(Failure::Handshake { reason: "STARTTLS inside TLS".into() });
        };
        if self.start != self.end {
            return Err(Failure::Handshake { reason: "clear text after the 220".into() });
        }
        let stream = tls.connector.connect(tls.name.clone(), tcp).await.map_err(|e| {
            // rustls's own errors come as InvalidData with the reason inside.
            let reason = match e.get_ref() {
                Some(inner) => inner.to_string(),
                None => format!("{:?}", e.kind()),
            };
            Failure::Handshake { reason }
        })?;
        let c = stream.get_ref().1;
        let negotiated = Negotiated {
            version: c.protocol_version(),
            suite: c.negotiated_cipher_suite().map(|s| s.suite()),
            group: c.negotiated_key_exchange_group().map(|g| g.name()),
        };
        Ok((Conn { stream: Stream::Tls(Box::new(stream)), buf: self.buf, start: 0, end: 0 }, negotiated))
    }
}

/// Where a session is, for the timeout's report.
#[derive(Debug)]
pub struct Progress {
    /// The current step.
    pub step: Step,
    /// Source addresses skipped (EADDRINUSE / EADDRNOTAVAIL).
    pub skipped: u32,
    /// What STARTTLS negotiated, once it has.
    pub tls: Option<Negotiated>,
}

impl Progress {
    /// At the start of a session.
    pub fn new() -> Progress {
        Progress { step: Step::Connect, skipped: 0, tls: None }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

/// Reads the greeting, says EHLO (with STARTTLS: STARTTLS, the handshake, EHLO again) and
/// MAIL FROM:<>: the state the hold driver keeps a session in. `Ok(conn)` with the connection
/// at the RCPT step.
pub async fn open_and_start(cfg: &ClientConfig, sources: &SourceCursor, p: &mut Progress) -> Result<Conn, Failure> {
    let mut c = connect(cfg, sources, p).await?;
    expect(p, Step::Mail, c.command(b"MAIL FROM:<>\r\n").await, |c| c == 250)?;
    Ok(c)
}

/// Finishes a session opened by [`open_and_start`]: RCPT to an unknown user (5xx), QUIT.
pub async fn finish_held(cfg: &ClientConfig, c: &mut Conn, p: &mut Progress) -> SessionResult {
    let rcpt = format!("RCPT TO:<nobody-held@{}>\r\n", cfg.domain);
    expect(p, Step::Rcpt, c.command(rcpt.as_bytes()).await, is_5xx)?;
    expect(p, Step::Quit, c.command(b"QUIT\r\n").await, |c| c == 221)
}

/// Connects, reads the 220 and says EHLO; with STARTTLS, then STARTTLS, the handshake and EHLO
/// again. The connection is ready for MAIL.
async fn connect(cfg: &ClientConfig, sources: &SourceCursor, p: &mut Progress) -> Result<Conn, Failure> {
    p.step = Step::Connect;
    let (mut c, skipped) =
        Conn::open(cfg.target, sources).await.map_err(|e| Failure::Io { step: Step::Connect, kind: e.kind() })?;
    p.skipped = skipped;
    expect(p, Step::Greeting, c.reply().await, |c| c == 220)?;
    expect(p, Step::Ehlo, c.command(b"EHLO client.bench.test\r\n").await, |c| c == 250)?;
    let Some(tls) = &cfg.tls else { return Ok(c) };
    expect(p, Step::StartTls, c.command(b"STARTTLS\r\n").await, |c| c == 220)?;
    p.step = Step::Handshake;
    let (mut c, negotiated) = c.starttls(tls).await?;
    p.tls = Some(negotiated);
    expect(p, Step::EhloTls, c.command(b"EHLO client.bench.test\r\n").await, |c| c == 250)?;
    Ok(c)
}

fn is_5xx(code: u16) -> bool {
    (500..600).contains(&code)
}

/// Records the step and checks a reply.
fn expect(p: &mut Progress, step: Step, reply: io::Result<u16>, ok: impl Fn(u16) -> bool) -> SessionResult {
    p.step = step;
    match reply {
        Ok(code) if ok(code) => Ok(()),
        Ok(code) => Err(Failure::Unexpected { step, code }),
        Err(e) => Err(Failure::Io { step, kind: e.kind() }),
    }
}

fn random_local(r: &mut SmallRng) -> String {
    (0..10).map(|_| char::from(b'a' + r.random_range(0..26u8))).collect()
}

/// Plays one session of `class` (session number `index` of the run) to its end.
pub async fn session(
    cfg: &ClientConfig,
    sources: &SourceCursor,
    class: Class,
    index: u64,
    p: &mut Progress,
) -> SessionResult {
    // Addresses are drawn before the connect so that the client's own work is not timed
    // inside the server's turn.
    let mut r = session_rng(cfg.seed, index);
    let d = &cfg.domain;
    let user = &cfg.users[r.random_range(0..cfg.users.len())];
    let (mail, rcpt) = match class {
        Class::Backscatter => ("MAIL FROM:<>\r\n".to_string(), format!("RCPT TO:<{}@{d}>\r\n", random_local(&mut r))),
        Class::Forged => (format!("MAIL FROM:<{}@{d}>\r\n", random_local(&mut r)), format!("RCPT TO:<{user}@{d}>\r\n")),
        Class::Fake => (
            format!("MAIL FROM:<{}@d{}.remote.test>\r\n", random_local(&mut r), r.random_range(0..1000)),
            format!("RCPT TO:<{}@{d}>\r\n", random_local(&mut r)),
        ),
        Class::Honest => ("MAIL FROM:<sender@honest.test>\r\n".to_string(), format!("RCPT TO:<{user}@{d}>\r\n")),
    };
    // Greeting and EHLO (and STARTTLS, the handshake and EHLO again).
    let mut c = connect(cfg, sources, p).await?;
    let mail_code = c.command(mail.as_bytes()).await;
    let mut banned = false;
    match class {
        // A forged local sender is refused at MAIL FROM (the gatekeeper, Postfix with
        // smtpd_delay_reject = no) or, by a server that delays rejects, at RCPT.
        Class::Forged => {
            let accepted = matches!(mail_code, Ok(250));
            expect(p, Step::Mail, mail_code, |c| c == 250 || is_5xx(c))?;
            if accepted {
                expect(p, Step::Rcpt, c.command(rcpt.as_bytes()).await, is_5xx)?;
            }
            banned = true;
        }
        Class::Backscatter | Class::Fake => {
            expect(p, Step::Mail, mail_code, |c| c == 250)?;
            expect(p, Step::Rcpt, c.command(rcpt.as_bytes()).await, is_5xx)?;
        }
        Class::Honest => {
            expect(p, Step::Mail, mail_code, |c| c == 250)?;
            expect(p, Step::Rcpt, c.command(rcpt.as_bytes()).await, |c| c == 250)?;
            expect(p, Step::Data, c.command(b"DATA\r\n").await, |c| c == 354)?;
            expect(p, Step::Body, c.command(&cfg.message).await, |c| c == 250)?;
        }
    }
    let quit = c.command(b"QUIT\r\n").await;
    if banned {
        return expect_after_ban(p, quit);
    }
    expect(p, Step::Quit, quit, |c| c == 221)
}

/// QUIT after a refusal that may have banned the client: 221 from a server that goes on (Postfix,
/// the responder), or the 421 with which the gatekeeper ended the session — read before or
/// after it closed the connection, which can also surface as an end of file or a reset.
fn expect_after_ban(p: &mut Progress, quit: io::Result<u16>) -> SessionResult {
    match quit {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ) =>
        {
            p.step = Step::Quit;
            Ok(())
        }
        quit => expect(p, Step::Quit, quit, |c| c == 221 || c == 421),
    }
}

/// [`session`] under the run's timeout; the result and where the session got.
pub async fn timed_session(
    cfg: &ClientConfig,
    sources: &SourceCursor,
    class: Class,
    index: u64,
) -> (SessionResult, Progress) {
    let mut p = Progress::new();
    let result = match tokio::time::timeout(cfg.timeout, session(cfg, sources, class, index, &mut p)).await {
        Ok(r) => r,
        Err(_) => Err(Failure::Timeout { step: p.step }),
    };
    (result, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_draws_the_seeds_proportions() {
        let mut n = std::collections::HashMap::new();
        for i in 0..100_000 {
            *n.entry(Workload::Mix.class(7, i)).or_insert(0u32) += 1;
        }
        for (class, permille) in MIX_PERMILLE {
            let got = f64::from(n[&class]) / 100.0;
            assert!((got - f64::from(permille)).abs() < f64::from(permille) * 0.1 + 3.0, "{class:?}: {got}");
        }
        assert_eq!(Workload::Mix.class(7, 42), Workload::Mix.class(7, 42));
    }

    #[test]
    fn message_has_its_size_and_end_mark() {
        let m = message("example.test", "alice", 1024);
        assert!(m.len() <= 1024 + 3 && m.len() > 900);
        assert!(m.ends_with(b"\r\n.\r\n"));
        assert!(!m.windows(3).any(|w| w == b"\n.." || w == b"\n.T"));
    }
}
