//! The production downstream towards a real MTA: [`SmtpRelay`], which relays each accepted
//! message over plain SMTP (as to a local MTA on loopback). Messages arrive into files in its
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

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::clock::Clock;
use super::message::{Content, MessageFile, available_space};
use super::ports::{BoxFuture, Downstream};
use super::trace::trace_headers;
use crate::proto::Reply;
use crate::session::{DeliveryError, Envelope};

/// Octets read from a message's file and written to the MTA at a time.
const CHUNK: usize = 64 * 1024;
/// Longest reply (all its lines) accepted from the MTA.
const REPLY_MAX: usize = 64 * 1024;

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
        Ok(SmtpRelay { addr, hostname: hostname.to_string(), timeout, clock, tmp, counter: AtomicU64::new(0) })
    }

    async fn send(&self, envelope: &Envelope, message: &MessageFile) -> Result<String, DeliveryError> {
        let eight_bit = has_8bit(message.whole().map_err(read_error)?).map_err(read_error)?;
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| DeliveryError::Temporary(format!("cannot connect to {}: {e}", self.addr)))?;
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let mut replies = Replies::new(rd);
        expect(replies.next().await?, "greeting", |c| c == 220)?;
        let ehlo = command(&mut wr, &mut replies, &format!("EHLO {}", self.hostname)).await?;
        let extensions: Vec<String> = if ehlo.is_positive() {
            ehlo.lines.iter().skip(1).map(|l| l.to_ascii_uppercase()).collect()
        } else {
            expect(command(&mut wr, &mut replies, &format!("HELO {}", self.hostname)).await?, "HELO", is_2xx)?;
            Vec::new()
        };
        let has = |ext: &str| extensions.iter().any(|l| l.split(' ').next() == Some(ext));
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
        expect(command(&mut wr, &mut replies, &mail).await?, "MAIL", is_2xx)?;
        for rcpt in &envelope.rcpts {
            // `<Postmaster>` is a valid RCPT everywhere (RFC 5321 §4.5.1).
            expect(command(&mut wr, &mut replies, &format!("RCPT TO:{rcpt}")).await?, "RCPT", is_2xx)?;
        }
        expect(command(&mut wr, &mut replies, "DATA").await?, "DATA", |c| c == 354)?;
        stream_stuffed(message.whole().map_err(read_error)?, &mut wr).await?;
        let end = expect(replies.next().await?, "end of data", is_2xx)?;
        let _ = wr.write_all(b"QUIT\r\n").await;
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

async fn command<W, R>(wr: &mut W, replies: &mut Replies<R>, line: &str) -> Result<Reply, DeliveryError>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    wr.write_all(format!("{line}\r\n").as_bytes()).await.map_err(net_error)?;
    replies.next().await
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

/// The MTA's replies, one at a time, each at most [`REPLY_MAX`] octets.
struct Replies<R> {
    rd: R,
    buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Replies<R> {
    fn new(rd: R) -> Self {
        Replies { rd, buf: Vec::with_capacity(512) }
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
            let n = self.rd.read(&mut chunk).await.map_err(net_error)?;
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
        let head = trace_headers(envelope, &self.hostname, &id, self.clock.wall());
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
        assert!(text.starts_with("Return-Path: <>\r\n"), "the trace headers lead");
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
}
