//! The do-nothing SMTP responder: the ceiling. It gives the load generator's classes the same
//! reply codes as the gatekeeper, with as little work as a server can do: a line splitter, a
//! four-letter verb match, a fixed user list for the local domain, no policy, no gate, no
//! logging, no storage (the end of data is answered 250 at once; nothing is kept, nothing is
//! fsync'd). What it reaches is what loopback, the kernel and this client allow.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the responder knows.
#[derive(Debug, Clone)]
pub struct Responder {
    /// The local domain, lower case.
    pub domain: String,
    /// Existing local parts, lower case (postmaster and abuse always exist).
    pub users: Vec<String>,
}

/// Longest line or pending input the responder buffers (RFC 5321 §4.5.3.1.6: 1000 octets for
/// a text line; the buffer holds a few pipelined commands).
const BUF_BYTES: usize = 4096;

impl Responder {
    /// Serves `listener` forever, one task per connection.
    pub async fn serve(self, listener: TcpListener) -> io::Result<()> {
        let me = std::sync::Arc::new(self);
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(a) => a,
                Err(_) => {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let me = me.clone();
            tokio::spawn(async move {
                let _ = me.connection(stream).await;
            });
        }
    }

    /// `true` if `path` (what is inside `<...>`) is an existing local user, or not local.
    fn mailbox(&self, path: &[u8]) -> (bool, bool) {
        let Some(at) = path.iter().rposition(|&b| b == b'@') else { return (false, false) };
        let (local, domain) = (&path[..at], &path[at + 1..]);
        if !domain.eq_ignore_ascii_case(self.domain.as_bytes()) {
            return (false, false);
        }
        let exists = local.eq_ignore_ascii_case(b"postmaster")
            || local.eq_ignore_ascii_case(b"abuse")
            || self.users.iter().any(|u| local.eq_ignore_ascii_case(u.as_bytes()));
        (true, exists)
    }

    async fn connection(&self, mut stream: TcpStream) -> io::Result<()> {
        stream.set_nodelay(true)?;
        stream.write_all(b"220 null.bench.test ESMTP\r\n").await?;
        let mut buf = vec![0u8; BUF_BYTES];
        let (mut start, mut end) = (0, 0);
        let mut out = Vec::with_capacity(256);
        let (mut in_data, mut rcpts) = (false, 0u32);
        loop {
            let n = stream.read(&mut buf[end..]).await?;
            if n == 0 {
                return Ok(());
            }
            end += n;
            let mut quit = false;
            while let Some(nl) = buf[start..end].iter().position(|&b| b == b'\n') {
                let line = &buf[start..start + nl + 1];
                start += nl + 1;
                if in_data {
                    if line == b".\r\n" || line == b".\n" {
                        in_data = false;
                        rcpts = 0;
                        out.extend_from_slice(b"250 2.0.0 Ok: queued\r\n");
                    }
                    continue;
                }
                let verb = line.get(..4).map(|v| v.to_ascii_uppercase());
                let path = || {
                    let open = line.iter().position(|&b| b == b'<')?;
                    let close = line.iter().rposition(|&b| b == b'>')?;
                    (open < close).then(|| &line[open + 1..close])
                };
                let reply: &[u8] = match verb.as_deref() {
                    Some(b"EHLO") => {
                        b"250-null.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
                    }
                    Some(b"HELO") => b"250 null.bench.test\r\n",
                    Some(b"MAIL") => match path() {
                        Some([]) => b"250 2.1.0 Ok\r\n",
                        Some(p) if self.mailbox(p) == (true, false) => b"550 5.7.1 Forged local sender\r\n",
                        Some(_) => b"250 2.1.0 Ok\r\n",
                        None => b"501 5.1.7 Bad sender\r\n",
                    },
                    Some(b"RCPT") => match path().map(|p| self.mailbox(p)) {
                        Some((true, true)) => {
                            rcpts += 1;
                            b"250 2.1.5 Ok\r\n"
                        }
                        Some((true, false)) => b"550 5.1.1 No such user\r\n",
                        _ => b"554 5.7.1 Relay access denied\r\n",
                    },
                    Some(b"DATA") if rcpts == 0 => b"554 5.5.1 No valid recipients\r\n",
                    Some(b"DATA") => {
                        in_data = true;
                        b"354 End data with <CR><LF>.<CR><LF>\r\n"
                    }
                    Some(b"RSET") => {
                        rcpts = 0;
                        b"250 2.0.0 Ok\r\n"
                    }
                    Some(b"NOOP") => b"250 2.0.0 Ok\r\n",
                    Some(b"QUIT") => {
                        quit = true;
                        b"221 2.0.0 Bye\r\n"
                    }
                    _ => b"500 5.5.2 Unknown command\r\n",
                };
                out.extend_from_slice(reply);
                if quit {
                    break;
                }
            }
            if !out.is_empty() {
                stream.write_all(&out).await?;
                out.clear();
            }
            if quit {
                return stream.shutdown().await;
            }
            buf.copy_within(start..end, 0);
            end -= start;
            start = 0;
            if end == buf.len() {
                // A line longer than the buffer: drop it (in DATA, a long body line).
                end = 0;
                if !in_data {
                    stream.write_all(b"500 5.5.6 Line too long\r\n").await?;
                }
            }
        }
    }
}

/// Binds `listen` (with the gatekeeper's listen backlog) and serves forever.
pub async fn run(listen: SocketAddr, responder: Responder) -> io::Result<()> {
    let listener = gatekeeper::edges::tcp_listener(listen)?;
    responder.serve(listener).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Class, ClientConfig, timed_session};
    use crate::sources::SourceCursor;
    use std::time::Duration;

    #[tokio::test]
    async fn answers_every_class_as_expected() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        let r = Responder { domain: "example.test".into(), users: vec!["alice".into(), "bob".into()] };
        tokio::spawn(r.serve(listener));
        let cfg = ClientConfig::new(
            target,
            "example.test",
            vec!["alice".into(), "bob".into()],
            Duration::from_secs(5),
            1,
            2000,
        );
        let sources = SourceCursor::new(1000);
        for (i, class) in Class::ALL.into_iter().enumerate() {
            let (result, _) = timed_session(&cfg, &sources, class, i as u64).await;
            assert_eq!(result, Ok(()), "{class:?}");
        }
    }
}
