//! The production downstream towards a real MTA: [`SmtpRelay`], which relays each accepted
//! message over SMTP, in STARTTLS when the MTA offers it (`[delivery] relay_tls`, as Postfix's
//! `smtp_tls_security_level`: `none`; `may`, the default: TLS when offered, any certificate,
//! clear text if the handshake fails; `verify`: TLS required, the certificate checked against
//! `relay_ca` for `relay_tls_name`, else a temporary failure). Messages arrive into files in its
//! `tmp/` directory like the Maildir spool's, and are streamed from there to the MTA in
//! chunks, dot-stuffed on the way: no message is ever held whole in memory.
//!
//! It owns only this client side of one SMTP transaction per message (EHLO, MAIL, RCPT, DATA,
//! QUIT), bounded by the relay timeout; it must not decide anything about the message. A 5xx
//! from the MTA is a permanent failure, anything else that is not 2xx/354 (a 4xx, a broken
//! connection, a timeout, a garbled reply) a temporary one. A message whose file cannot be
//! read to its end is never ended with `.`: the connection is dropped instead, so the MTA
//! discards the partial message.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::crypto::WebPkiSupportedAlgorithms;
use tokio_rustls::rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::clock::Clock;
use super::message::{Content, MessageFile, available_space};
use super::ports::{BoxFuture, Downstream};
use super::trace::received_header;
use crate::proto::Reply;
use crate::session::{DeliveryError, Envelope};

/// Octets read from a message's file and written to the MTA at a time.
const CHUNK: usize = 64 * 1024;
/// Longest reply (all its lines) accepted from the MTA.
const REPLY_MAX: usize = 64 * 1024;

/// `delivery.relay_tls`: STARTTLS towards the relay (Postfix's `smtp_tls_security_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayTlsMode {
    /// Never: clear text even when the relay offers STARTTLS.
    None,
    /// When the relay offers it, with any certificate (encryption without authentication, as
    /// Postfix's `may`); a failed handshake is retried in clear text on a new connection.
    #[default]
    May,
    /// Required, and the certificate must chain to `relay_ca` and name `relay_tls_name`;
    /// otherwise the hand-off fails temporarily (451) and nothing goes in clear text.
    Verify,
}

/// STARTTLS towards the relay, ready: the client configuration and the name the relay is
/// connected as.
#[derive(Clone)]
pub struct RelayTls {
    connector: TlsConnector,
    name: ServerName<'static>,
    verify: bool,
}

impl std::fmt::Debug for RelayTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayTls").field("name", &self.name).field("verify", &self.verify).finish_non_exhaustive()
    }
}

impl RelayTls {
    /// The TLS of `mode` towards the relay at `addr`: `None` for [`RelayTlsMode::None`]. For
    /// `verify`, `ca` (PEM, one or more certificates) is required and the certificate must
    /// name `name` (default: the relay's IP address). Every problem, each naming its field.
    pub fn new(
        mode: RelayTlsMode,
        ca: Option<&std::path::Path>,
        name: Option<&str>,
        addr: SocketAddr,
    ) -> Result<Option<RelayTls>, Vec<String>> {
        let mut problems = Vec::new();
        let name = match name {
            Some(n) => match ServerName::try_from(n.to_string()) {
                Ok(n) => n,
                Err(e) => {
                    problems.push(format!("delivery.relay_tls_name: {n:?}: {e}"));
                    ServerName::IpAddress(addr.ip().into())
                }
            },
            None => ServerName::IpAddress(addr.ip().into()),
        };
        #[allow(deprecated)] // ring, as for the server side (edges::tls).
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| vec![format!("delivery.relay_tls: {e}")])?;
        let config = match mode {
            RelayTlsMode::None => {
                if ca.is_some() {
                    problems.push("delivery.relay_ca: only with relay_tls = \"verify\"".into());
                }
                None
            }
            RelayTlsMode::May => {
                if ca.is_some() {
                    problems.push(
                        "delivery.relay_ca: only with relay_tls = \"verify\" (\"may\" checks no certificate)".into(),
                    );
                }
                let any = AnyCertificate(provider.signature_verification_algorithms);
                Some(builder.dangerous().with_custom_certificate_verifier(Arc::new(any)).with_no_client_auth())
            }
            RelayTlsMode::Verify => match ca {
                None => {
                    problems.push("delivery.relay_ca: needed with relay_tls = \"verify\"".into());
                    None
                }
                Some(ca) => {
                    let mut roots = RootCertStore::empty();
                    match CertificateDer::pem_file_iter(ca).map(|i| i.collect::<Result<Vec<_>, _>>()) {
                        Ok(Ok(certs)) if !certs.is_empty() => {
                            let (_, bad) = roots.add_parsable_certificates(certs);
                            if bad > 0 || roots.is_empty() {
                                problems.push(format!(
                                    "delivery.relay_ca: {}: {bad} unusable certificate(s)",
                                    ca.display()
                                ));
                            }
                        }
                        Ok(Ok(_)) => {
                            problems.push(format!("delivery.relay_ca: {}: no CERTIFICATE in it", ca.display()))
                        }
                        Ok(Err(e)) => problems.push(format!("delivery.relay_ca: {}: {e}", ca.display())),
                        Err(e) => problems.push(format!("delivery.relay_ca: cannot read {}: {e}", ca.display())),
                    }
                    Some(builder.with_root_certificates(roots).with_no_client_auth())
                }
            },
        };
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(config.map(|c| RelayTls {
            connector: TlsConnector::from(Arc::new(c)),
            name,
            verify: mode == RelayTlsMode::Verify,
        }))
    }
}

/// `relay_tls = "may"`: any certificate is taken (nothing to check it against, as Postfix's
/// `may`), but the handshake's signatures are still verified, so the session is encrypted to
/// whoever holds the certificate's key. (The load generator's client uses it too.)
#[derive(Debug)]
pub struct AnyCertificate(pub WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, tokio_rustls::rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        tokio_rustls::rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, tokio_rustls::rustls::Error> {
        tokio_rustls::rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// Why one attempt to relay failed.
#[derive(Debug)]
enum Failed {
    /// The transaction failed.
    Delivery(DeliveryError),
    /// STARTTLS failed (handshake, or required and not to be had).
    Tls(String),
}

impl From<DeliveryError> for Failed {
    fn from(e: DeliveryError) -> Self {
        Failed::Delivery(e)
    }
}

impl Failed {
    fn into_delivery(self) -> DeliveryError {
        match self {
            Failed::Delivery(e) => e,
            Failed::Tls(why) => DeliveryError::Temporary(format!("TLS to the relay: {why}")),
        }
    }
}

/// Relays accepted messages to a downstream SMTP server (the real MTA). The 250 is given only
/// once the downstream has said 250 itself.
#[derive(Debug)]
pub struct SmtpRelay {
    addr: SocketAddr,
    hostname: String,
    timeout: Duration,
    clock: Arc<dyn Clock>,
    /// Where messages are written as they arrive.
    tmp: PathBuf,
    counter: AtomicU64,
    /// STARTTLS towards the relay; `None`: clear text.
    tls: Option<RelayTls>,
}

/// The relay's EHLO extensions, upper case (none after HELO).
fn extensions(ehlo: &Reply) -> Vec<String> {
    ehlo.lines.iter().skip(1).map(|l| l.to_ascii_uppercase()).collect()
}

fn has(extensions: &[String], ext: &str) -> bool {
    extensions.iter().any(|l| l.split(' ').next() == Some(ext))
}

impl SmtpRelay {
    /// A relay to `addr` (plain SMTP) with a per-message timeout (the whole transaction);
    /// messages arrive into `tmp` (created if needed, emptied of a crash's leftovers: none of
    /// them was acknowledged).
    pub fn new(
        addr: SocketAddr,
        hostname: &str,
        timeout: Duration,
        clock: Arc<dyn Clock>,
        tmp: PathBuf,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(SmtpRelay {
            addr,
            hostname: hostname.to_string(),
            timeout,
            clock,
            tmp,
            counter: AtomicU64::new(0),
            tls: None,
        })
    }

    /// STARTTLS towards the relay when it offers it ([`RelayTls`]); `None`: clear text.
    pub fn with_tls(mut self, tls: Option<RelayTls>) -> Self {
        self.tls = tls;
        self
    }

    async fn send(&self, envelope: &Envelope, message: &MessageFile) -> Result<String, DeliveryError> {
        let eight_bit = has_8bit(message.whole().map_err(read_error)?).map_err(read_error)?;
        match self.attempt(envelope, message, eight_bit, self.tls.as_ref()).await {
            Err(Failed::Tls(why)) if self.tls.as_ref().is_some_and(|t| !t.verify) => {
                tracing::warn!(relay = %self.addr, error = %why,
                    "STARTTLS to the relay failed; relaying in clear text (delivery.relay_tls = \"may\")");
                self.attempt(envelope, message, eight_bit, None).await.map_err(Failed::into_delivery)
            }
            result => result.map_err(Failed::into_delivery),
        }
    }

    /// One connection to the relay: greeting, EHLO, STARTTLS if `tls` and offered (then EHLO
    /// again), the transaction.
    async fn attempt(
        &self,
        envelope: &Envelope,
        message: &MessageFile,
        eight_bit: bool,
        tls: Option<&RelayTls>,
    ) -> Result<String, Failed> {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| DeliveryError::Temporary(format!("cannot connect to {}: {e}", self.addr)))?;
        let _ = stream.set_nodelay(true);
        let mut conn = Replies::new(stream);
        expect(conn.next().await?, "greeting", |c| c == 220)?;
        let ehlo = conn.command(&format!("EHLO {}", self.hostname)).await?;
        let exts = if ehlo.is_positive() {
            extensions(&ehlo)
        } else {
            expect(conn.command(&format!("HELO {}", self.hostname)).await?, "HELO", is_2xx)?;
            Vec::new()
        };
        let Some(tls) = tls else { return Ok(self.transaction(conn, &exts, envelope, message, eight_bit).await?) };
        if !has(&exts, "STARTTLS") {
            if tls.verify {
                return Err(Failed::Tls("the relay does not offer STARTTLS (delivery.relay_tls = \"verify\")".into()));
            }
            return Ok(self.transaction(conn, &exts, envelope, message, eight_bit).await?);
        }
        let reply = conn.command("STARTTLS").await?;
        if reply.code != 220 {
            if tls.verify {
                return Err(Failed::Tls(format!("the relay answered STARTTLS with {} {}", reply.code, text(&reply))));
            }
            // Refused: the session goes on as after EHLO, in clear text.
            return Ok(self.transaction(conn, &exts, envelope, message, eight_bit).await?);
        }
        // Nothing may follow the 220 before the handshake (RFC 3207 §5's injection).
        let tcp =
            conn.into_inner().ok_or_else(|| Failed::Tls("the relay sent data after its 220 to STARTTLS".into()))?;
        let stream = tls.connector.connect(tls.name.clone(), tcp).await.map_err(|e| Failed::Tls(e.to_string()))?;
        let mut conn = Replies::new(stream);
        let ehlo = expect(conn.command(&format!("EHLO {}", self.hostname)).await?, "EHLO after STARTTLS", is_2xx)?;
        let id = self.transaction(conn, &extensions(&ehlo), envelope, message, eight_bit).await?;
        tracing::debug!(relay = %self.addr, "relayed over TLS");
        Ok(id)
    }

    /// MAIL, RCPT, DATA, the message, QUIT on a greeted connection.
    async fn transaction<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut conn: Replies<S>,
        extensions: &[String],
        envelope: &Envelope,
        message: &MessageFile,
        eight_bit: bool,
    ) -> Result<String, DeliveryError> {
        let has = |ext: &str| has(extensions, ext);
        let utf8 = !envelope.from.to_string().is_ascii() || envelope.rcpts.iter().any(|r| !r.to_string().is_ascii());
        if utf8 && !has("SMTPUTF8") {
            return Err(DeliveryError::Permanent("non-ASCII address, and the relay has no SMTPUTF8".into()));
        }
        let mut mail = format!("MAIL FROM:{}", envelope.from);
        // Without 8BITMIME the octets go as they are, as Postfix does by default: refusing
        // them would bounce mail the MTA most likely takes.
        if eight_bit && has("8BITMIME") {
            mail.push_str(" BODY=8BITMIME");
        }
        if utf8 {
            mail.push_str(" SMTPUTF8");
        }
        expect(conn.command(&mail).await?, "MAIL", is_2xx)?;
        for rcpt in &envelope.rcpts {
            // `<Postmaster>` is a valid RCPT everywhere (RFC 5321 §4.5.1).
            expect(conn.command(&format!("RCPT TO:{rcpt}")).await?, "RCPT", is_2xx)?;
        }
        expect(conn.command("DATA").await?, "DATA", |c| c == 354)?;
        stream_stuffed(message.whole().map_err(read_error)?, &mut conn.stream).await?;
        conn.stream.flush().await.map_err(net_error)?;
        let end = expect(conn.next().await?, "end of data", is_2xx)?;
        let _ = conn.stream.write_all(b"QUIT\r\n").await;
        let _ = conn.stream.flush().await;
        Ok(format!("{} ({})", message.id(), text(&end)))
    }
}

fn is_2xx(code: u16) -> bool {
    (200..300).contains(&code)
}

/// A reply's text as the MTA wrote it: enhanced code, then its lines.
fn text(reply: &Reply) -> String {
    let lines = reply.lines.join(" ");
    match reply.enhanced {
        Some(e) => format!("{e} {lines}"),
        None => lines,
    }
}

fn read_error(e: io::Error) -> DeliveryError {
    DeliveryError::Temporary(format!("cannot read the message: {e}"))
}

fn net_error(e: io::Error) -> DeliveryError {
    DeliveryError::Temporary(format!("relay connection: {e}"))
}

/// `reply` if `ok(code)`; otherwise the failure it means: 5xx permanent, else temporary.
fn expect(reply: Reply, what: &str, ok: impl Fn(u16) -> bool) -> Result<Reply, DeliveryError> {
    if ok(reply.code) {
        return Ok(reply);
    }
    let why = format!("relay answered {what} with {} {}", reply.code, text(&reply));
    Err(if reply.is_permanent() { DeliveryError::Permanent(why) } else { DeliveryError::Temporary(why) })
}

/// Whether the content has octets above 127 (then MAIL says `BODY=8BITMIME`). One pass over
/// the file, in chunks.
fn has_8bit(mut content: Content) -> io::Result<bool> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = content.read(&mut buf)?;
        if n == 0 {
            return Ok(false);
        }
        if !buf[..n].is_ascii() {
            return Ok(true);
        }
    }
}

/// Writes the message, dot-stuffed (RFC 5321 §4.5.2), then the end of data. The content's
/// lines all end with CRLF (the DATA receiver and the trace headers see to it); a read error
/// ends the transfer without the end-of-data line, so the MTA discards what it got.
async fn stream_stuffed<W: AsyncWrite + Unpin>(mut content: Content, wr: &mut W) -> Result<(), DeliveryError> {
    let mut buf = vec![0u8; CHUNK];
    let mut out = Vec::with_capacity(CHUNK + CHUNK / 64);
    let mut line_start = true;
    let mut last = b'\n';
    loop {
        let n = content.read(&mut buf).map_err(read_error)?;
        if n == 0 {
            break;
        }
        out.clear();
        for &b in &buf[..n] {
            if line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            line_start = b == b'\n';
        }
        last = buf[n - 1];
        wr.write_all(&out).await.map_err(net_error)?;
    }
    let end: &[u8] = if last == b'\n' { b".\r\n" } else { b"\r\n.\r\n" };
    wr.write_all(end).await.map_err(net_error)
}

/// The connection to the MTA and its replies, one at a time, each at most [`REPLY_MAX`]
/// octets.
struct Replies<S> {
    stream: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Replies<S> {
    fn new(stream: S) -> Self {
        Replies { stream, buf: Vec::with_capacity(512) }
    }

    /// Sends `line` and reads its reply.
    async fn command(&mut self, line: &str) -> Result<Reply, DeliveryError> {
        self.stream.write_all(format!("{line}\r\n").as_bytes()).await.map_err(net_error)?;
        self.stream.flush().await.map_err(net_error)?;
        self.next().await
    }

    /// The stream back, if nothing beyond the last reply was read.
    fn into_inner(self) -> Option<S> {
        self.buf.is_empty().then_some(self.stream)
    }

    async fn next(&mut self) -> Result<Reply, DeliveryError> {
        loop {
            match Reply::parse_prefix(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                Ok(None) if self.buf.len() < REPLY_MAX => {}
                Ok(None) => return Err(DeliveryError::Temporary("relay reply too long".into())),
                Err(e) => return Err(DeliveryError::Temporary(format!("garbled relay reply: {e}"))),
            }
            let mut chunk = [0u8; 1024];
            let n = self.stream.read(&mut chunk).await.map_err(net_error)?;
            if n == 0 {
                return Err(DeliveryError::Temporary("relay closed the connection".into()));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Downstream for SmtpRelay {
    fn create(&self, envelope: &Envelope) -> io::Result<MessageFile> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = format!("G{}.{n}.{}", envelope.session, std::process::id());
        // Only the trace header: the envelope travels in SMTP, and recipients copied into the
        // message would show every Bcc to everyone.
        let head = received_header(envelope, &self.hostname, &id, self.clock.wall());
        MessageFile::create(&self.tmp, &id, head.as_bytes())
    }

    fn available(&self) -> Option<u64> {
        available_space(&self.tmp).ok()
    }

    fn deliver<'a>(
        &'a self,
        envelope: &'a Envelope,
        message: MessageFile,
    ) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            let sent = tokio::time::timeout(self.timeout, self.send(envelope, &message)).await;
            drop(message); // removes the file, relayed or not
            sent.unwrap_or_else(|_| {
                Err(DeliveryError::Temporary(format!("relay did not finish within {:?}", self.timeout)))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edges::SystemClock;
    use crate::proto::{ForwardPath, ReversePath};
    use tokio::io::{AsyncBufReadExt, BufReader};

    /// A scripted MTA: answers each command with the reply `answer` gives for it (`None`: the
    /// usual one), and hands over the commands and the DATA octets as they came (stuffed).
    async fn fake_mta(
        answer: fn(&str) -> Option<&'static str>,
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<(Vec<String>, Vec<u8>)>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let (rd, mut wr) = s.into_split();
                    let mut rd = BufReader::new(rd);
                    wr.write_all(b"220 mta.test ESMTP\r\n").await.unwrap();
                    let (mut commands, mut data) = (Vec::new(), Vec::new());
                    loop {
                        let mut line = String::new();
                        if rd.read_line(&mut line).await.unwrap() == 0 {
                            break;
                        }
                        let cmd = line.trim_end().to_string();
                        commands.push(cmd.clone());
                        if let Some(reply) = answer(&cmd) {
                            wr.write_all(reply.as_bytes()).await.unwrap();
                            continue;
                        }
                        if cmd.starts_with("EHLO") {
                            wr.write_all(b"250-mta.test\r\n250-8BITMIME\r\n250 SIZE 100000000\r\n").await.unwrap();
                        } else if cmd == "DATA" {
                            wr.write_all(b"354 go on\r\n").await.unwrap();
                            loop {
                                let mut l = Vec::new();
                                rd.read_until(b'\n', &mut l).await.unwrap();
                                if l == b".\r\n" {
                                    break;
                                }
                                data.extend_from_slice(&l);
                            }
                            wr.write_all(b"250 2.0.0 queued as X1\r\n").await.unwrap();
                        } else if cmd == "QUIT" {
                            wr.write_all(b"221 bye\r\n").await.unwrap();
                            break;
                        } else {
                            wr.write_all(b"250 ok\r\n").await.unwrap();
                        }
                    }
                    let _ = tx.send((commands, data));
                });
            }
        });
        (addr, rx)
    }

    fn envelope() -> Envelope {
        Envelope {
            session: 3,
            client: "192.0.2.1".parse().unwrap(),
            helo: "client.test".into(),
            from: ReversePath::Null,
            rcpts: vec![ForwardPath::parse("<alice@example.test>").unwrap(), ForwardPath::Postmaster],
            tls: false,
        }
    }

    fn relay(addr: SocketAddr, tmp: PathBuf) -> SmtpRelay {
        SmtpRelay::new(addr, "gk.test", Duration::from_secs(10), Arc::new(SystemClock), tmp).unwrap()
    }

    #[tokio::test]
    async fn streams_the_file_dot_stuffed_and_removes_it() {
        let (addr, mut seen) = fake_mta(|_| None).await;
        let dir = tempfile::tempdir().unwrap();
        let r = relay(addr, dir.path().join("tmp"));
        let mut m = r.create(&envelope()).unwrap();
        // Big enough for several chunks; lines starting with a dot; 8-bit octets.
        let body: Vec<u8> = (0..20_000).flat_map(|i| format!(".line {i} caf\u{e9}\r\n").into_bytes()).collect();
        m.append(b"Subject: relayed\r\n\r\n").unwrap();
        m.append(&body).unwrap();
        let id = r.deliver(&envelope(), m).await.unwrap();
        assert!(id.starts_with("G3.0.") && id.ends_with("(2.0.0 queued as X1)"), "{id}");
        let (commands, data) = seen.recv().await.unwrap();
        assert_eq!(
            commands[1..],
            ["MAIL FROM:<> BODY=8BITMIME", "RCPT TO:<alice@example.test>", "RCPT TO:<Postmaster>", "DATA", "QUIT"]
        );
        let text = String::from_utf8(data).unwrap();
        assert!(text.starts_with("Received: from "), "the trace header leads");
        assert!(!text.contains("X-Gatekeeper-Rcpt") && !text.contains("Return-Path"), "no envelope copied in");
        let unstuffed = text.replace("\r\n..", "\r\n.");
        assert!(unstuffed.ends_with(&format!("Subject: relayed\r\n\r\n{}", String::from_utf8(body).unwrap())));
        assert!(!text.contains("\r\n.l"), "every leading dot doubled");
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    fn rcpt_550(c: &str) -> Option<&'static str> {
        c.starts_with("RCPT TO:<alice").then_some("550 5.1.1 no such user\r\n")
    }
    fn data_451(c: &str) -> Option<&'static str> {
        (c == "DATA").then_some("451 4.3.0 try later\r\n")
    }
    fn mail_garbled(c: &str) -> Option<&'static str> {
        c.starts_with("MAIL").then_some("garbage\r\n")
    }

    #[tokio::test]
    async fn failures_are_permanent_for_5xx_and_temporary_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        for (answer, permanent) in
            [(rcpt_550 as fn(&str) -> Option<&'static str>, true), (data_451, false), (mail_garbled, false)]
        {
            let (addr, _seen) = fake_mta(answer).await;
            let r = relay(addr, dir.path().join("tmp"));
            let mut m = r.create(&envelope()).unwrap();
            m.append(b"Subject: x\r\n\r\nbody\r\n").unwrap();
            let err = r.deliver(&envelope(), m).await.unwrap_err();
            assert_eq!(matches!(err, DeliveryError::Permanent(_)), permanent, "{err:?}");
            assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "removed on failure too");
        }
        // Nobody listening: temporary.
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let r = relay(gone, dir.path().join("tmp"));
        let m = r.create(&envelope()).unwrap();
        assert!(matches!(r.deliver(&envelope(), m).await, Err(DeliveryError::Temporary(_))));
    }

    /// A local MTA that speaks STARTTLS: offers it in EHLO (before TLS), answers it with 220,
    /// then does the handshake with `cert`/`key` (`broken`: writes clear-text garbage instead,
    /// so the handshake fails). Hands over, per connection, whether it ended on TLS, the
    /// commands and the DATA octets.
    async fn tls_mta(
        dir: &std::path::Path,
        broken: bool,
    ) -> (SocketAddr, PathBuf, tokio::sync::mpsc::UnboundedReceiver<(bool, Vec<String>, Vec<u8>)>) {
        let certified = rcgen::generate_simple_self_signed(vec!["mta.test".to_string()]).unwrap();
        let (cert, key) = (dir.join("mta-cert.pem"), dir.join("mta-key.pem"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(crate::edges::tls::server_config(&cert, &key).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let (tx, acceptor) = (tx.clone(), acceptor.clone());
                tokio::spawn(async move {
                    tcp.write_all(b"220 mta.test ESMTP\r\n").await.unwrap();
                    let (mut log, mut data) = (Vec::new(), Vec::new());
                    let mut on_tls = false;
                    if dialogue(&mut tcp, false, &mut log, &mut data).await {
                        if broken {
                            let _ = tcp.write_all(b"this is not TLS\r\n").await;
                        } else if let Ok(mut tls) = acceptor.accept(tcp).await {
                            on_tls = true;
                            dialogue(&mut tls, true, &mut log, &mut data).await;
                        }
                    }
                    let _ = tx.send((on_tls, log, data));
                });
            }
        });
        (addr, cert, rx)
    }

    /// One line, byte by byte (nothing read beyond it: the stream may be handed to TLS).
    async fn line<S: AsyncRead + Unpin>(s: &mut S) -> Option<Vec<u8>> {
        let mut l = Vec::new();
        let mut b = [0u8; 1];
        loop {
            if s.read(&mut b).await.ok()? == 0 {
                return None;
            }
            l.push(b[0]);
            if b[0] == b'\n' {
                return Some(l);
            }
        }
    }

    /// The MTA's side until QUIT or the end (`false`) or a STARTTLS answered 220 (`true`).
    async fn dialogue<S: AsyncRead + AsyncWrite + Unpin>(
        s: &mut S,
        tls: bool,
        log: &mut Vec<String>,
        data: &mut Vec<u8>,
    ) -> bool {
        while let Some(l) = line(s).await {
            let cmd = String::from_utf8_lossy(&l).trim_end().to_string();
            log.push(cmd.clone());
            let reply: &[u8] = if cmd.starts_with("EHLO") && !tls {
                b"250-mta.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
            } else if cmd.starts_with("EHLO") {
                b"250-mta.test\r\n250 8BITMIME\r\n"
            } else if cmd == "STARTTLS" {
                s.write_all(b"220 2.0.0 go ahead\r\n").await.unwrap();
                return true;
            } else if cmd == "DATA" {
                s.write_all(b"354 go on\r\n").await.unwrap();
                s.flush().await.unwrap();
                while let Some(l) = line(s).await {
                    if l == b".\r\n" {
                        break;
                    }
                    data.extend_from_slice(&l);
                }
                b"250 2.0.0 queued as T1\r\n"
            } else if cmd == "QUIT" {
                let _ = s.write_all(b"221 bye\r\n").await;
                let _ = s.flush().await;
                return false;
            } else {
                b"250 ok\r\n"
            };
            s.write_all(reply).await.unwrap();
            s.flush().await.unwrap();
        }
        false
    }

    async fn relay_over(r: &SmtpRelay) -> Result<String, DeliveryError> {
        let mut m = r.create(&envelope()).unwrap();
        m.append(b"Subject: over TLS?\r\n\r\nbody\r\n").unwrap();
        r.deliver(&envelope(), m).await
    }

    #[tokio::test]
    async fn starttls_when_the_relay_offers_it() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, _, mut seen) = tls_mta(dir.path(), false).await;
        let tls = RelayTls::new(RelayTlsMode::May, None, None, addr).unwrap();
        let r = relay(addr, dir.path().join("tmp")).with_tls(tls);
        let id = relay_over(&r).await.unwrap();
        assert!(id.ends_with("(2.0.0 queued as T1)"), "{id}");
        let (on_tls, commands, data) = seen.recv().await.unwrap();
        assert!(on_tls, "{commands:?}");
        assert_eq!(commands[..2], ["EHLO gk.test", "STARTTLS"]);
        assert_eq!(commands[2..4], ["EHLO gk.test", "MAIL FROM:<>"], "EHLO again, on TLS");
        assert!(String::from_utf8(data).unwrap().contains("Subject: over TLS?"));

        // relay_tls = "none": never.
        let r =
            relay(addr, dir.path().join("tmp")).with_tls(RelayTls::new(RelayTlsMode::None, None, None, addr).unwrap());
        relay_over(&r).await.unwrap();
        let (on_tls, commands, _) = seen.recv().await.unwrap();
        assert!(!on_tls && !commands.contains(&"STARTTLS".to_string()), "{commands:?}");
    }

    #[tokio::test]
    async fn a_failed_handshake_is_retried_in_clear_text_unless_verify() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, cert, mut seen) = tls_mta(dir.path(), true).await;
        let r =
            relay(addr, dir.path().join("tmp")).with_tls(RelayTls::new(RelayTlsMode::May, None, None, addr).unwrap());
        relay_over(&r).await.unwrap();
        let (on_tls, commands, _) = seen.recv().await.unwrap();
        assert!(!on_tls && commands == ["EHLO gk.test", "STARTTLS"], "{commands:?}");
        let (on_tls, commands, data) = seen.recv().await.unwrap();
        assert!(!on_tls && !commands.contains(&"STARTTLS".to_string()), "{commands:?}");
        assert!(!data.is_empty(), "delivered in clear text on a second connection");
        // verify: no clear text, a temporary failure.
        let tls = RelayTls::new(RelayTlsMode::Verify, Some(&cert), Some("mta.test"), addr).unwrap();
        let r = relay(addr, dir.path().join("tmp")).with_tls(tls);
        let err = relay_over(&r).await.unwrap_err();
        assert!(matches!(&err, DeliveryError::Temporary(why) if why.starts_with("TLS to the relay")), "{err:?}");
        let (_, commands, data) = seen.recv().await.unwrap();
        assert!(commands == ["EHLO gk.test", "STARTTLS"] && data.is_empty(), "{commands:?}");
        assert!(tokio::time::timeout(Duration::from_millis(200), seen.recv()).await.is_err(), "no second try");
    }

    #[tokio::test]
    async fn verify_checks_the_certificate_against_the_ca_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, cert, mut seen) = tls_mta(dir.path(), false).await;
        let tls = RelayTls::new(RelayTlsMode::Verify, Some(&cert), Some("mta.test"), addr).unwrap();
        relay_over(&relay(addr, dir.path().join("tmp")).with_tls(tls)).await.unwrap();
        assert!(seen.recv().await.unwrap().0, "delivered over verified TLS");
        // Another name, or another CA: refused, nothing sent.
        let other = dir.path().join("other");
        std::fs::create_dir_all(&other).unwrap();
        let (_, other_ca, _) = tls_mta(&other, false).await;
        for (ca, name) in [(&cert, "other.test"), (&other_ca, "mta.test")] {
            let tls = RelayTls::new(RelayTlsMode::Verify, Some(ca), Some(name), addr).unwrap();
            let err = relay_over(&relay(addr, dir.path().join("tmp")).with_tls(tls)).await.unwrap_err();
            assert!(matches!(&err, DeliveryError::Temporary(why) if why.starts_with("TLS to the relay")), "{err:?}");
            let (on_tls, _, data) = seen.recv().await.unwrap();
            assert!(!on_tls && data.is_empty());
        }
        // A relay that offers no STARTTLS is no relay for verify.
        let (plain, _seen) = fake_mta(|_| None).await;
        let tls = RelayTls::new(RelayTlsMode::Verify, Some(&cert), Some("mta.test"), plain).unwrap();
        let err = relay_over(&relay(plain, dir.path().join("tmp")).with_tls(tls)).await.unwrap_err();
        assert!(matches!(&err, DeliveryError::Temporary(why) if why.contains("does not offer STARTTLS")), "{err:?}");
    }

    #[test]
    fn relay_tls_settings_name_their_problems() {
        let addr: SocketAddr = "127.0.0.1:25".parse().unwrap();
        let err = RelayTls::new(RelayTlsMode::Verify, None, Some("bad name!"), addr).unwrap_err();
        assert_eq!(err.len(), 2, "{err:?}");
        assert!(err[0].starts_with("delivery.relay_tls_name: \"bad name!\""), "{err:?}");
        assert!(err[1].starts_with("delivery.relay_ca: needed"), "{err:?}");
        let err = RelayTls::new(RelayTlsMode::May, Some(std::path::Path::new("/ca.pem")), None, addr).unwrap_err();
        assert!(err[0].starts_with("delivery.relay_ca: only with"), "{err:?}");
        let err = RelayTls::new(RelayTlsMode::Verify, Some(std::path::Path::new("/nonexistent/ca.pem")), None, addr)
            .unwrap_err();
        assert!(err[0].starts_with("delivery.relay_ca: cannot read /nonexistent/ca.pem"), "{err:?}");
        assert!(RelayTls::new(RelayTlsMode::None, None, None, addr).unwrap().is_none());
    }
}
