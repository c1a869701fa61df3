//! The clamd client ([`ClamdScanner`]): clamd(8)'s `zINSTREAM` and `zPING` over TCP or a Unix
//! socket ([`ClamdAddr`]), one connection per scan, the whole exchange under one timeout, and
//! the interpretation of clamd's answer ([`ClamdVerdict`], [`ClamdError`]).
//!
//! It owns the wire protocol and its bounds (reply length, time, stream size). It must never
//! fail a session: every broken exchange becomes [`ScanOutcome::Failed`] (or, over the stream
//! limit, the oversize policy), never a ban; and it must never trust the peer's text
//! (escaped before it reaches a log or a reply).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::config::valid_signature_name;
use super::{ScanResult, ScanStats, record};
use crate::edges::{BoxFuture, Clock, Content, MessageFile, Scanner};
use crate::policy::{OnScanFailure, ScanOutcome};

/// Longest clamd reply we read. Real replies are `stream: <name> FOUND` with a name well under
/// 200 octets; anything longer is a broken or hostile peer.
pub const CLAMD_REPLY_MAX: usize = 1024;

/// Where clamd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdAddr {
    /// `tcp:HOST:PORT` (`HOST` a name, an IPv4 address or a bracketed IPv6 address).
    Tcp(String),
    /// `unix:/PATH`: clamd's `LocalSocket`.
    Unix(PathBuf),
}

impl FromStr for ClamdAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(hostport) = s.strip_prefix("tcp:") {
            let (host, port) = hostport.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected tcp:HOST:PORT"))?;
            let host_ok = !host.is_empty()
                && (host.starts_with('[') && host.ends_with(']') || !host.contains(':'))
                && !host.contains(char::is_whitespace);
            match port.parse::<u16>() {
                Ok(p) if p > 0 && host_ok => Ok(ClamdAddr::Tcp(hostport.to_string())),
                _ => Err(format!("{s:?}: expected tcp:HOST:PORT")),
            }
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.starts_with('/') {
                Ok(ClamdAddr::Unix(PathBuf::from(path)))
            } else {
                Err(format!("{s:?}: expected unix:/ABSOLUTE/PATH"))
            }
        } else {
            Err(format!("{s:?}: expected tcp:HOST:PORT or unix:/PATH"))
        }
    }
}

impl fmt::Display for ClamdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClamdAddr::Tcp(hostport) => write!(f, "tcp:{hostport}"),
            ClamdAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// What clamd said about a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdVerdict {
    /// `stream: OK`.
    Clean,
    /// `stream: <signature> FOUND`.
    Found(String),
}

/// A clamd exchange that gave no verdict. Each is a reason to tempfail (or, by configuration,
/// to accept unscanned); none is a reason to ban.
#[derive(Debug, thiserror::Error)]
pub enum ClamdError {
    /// clamd is not listening there: it is down, starting, or the address is wrong.
    #[error("cannot connect to clamd at {addr}: {source}")]
    Connect {
        /// The configured address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// The connection broke mid-exchange.
    #[error("clamd connection failed: {0}")]
    Io(#[from] io::Error),
    /// clamd gave no complete answer in time.
    #[error("clamd did not answer within {0:?}")]
    Timeout(Duration),
    /// The message is over the stream limit (ours, or clamd's `StreamMaxLength`): the
    /// oversize policy applies.
    #[error("message of {size} octets exceeds the scanner's stream limit")]
    TooLarge {
        /// The message's size.
        size: u64,
    },
    /// clamd answered with an error (`… ERROR`), e.g. a database problem.
    #[error("clamd error: {0}")]
    Scanner(String),
    /// The answer is not the clamd protocol: wrong port, or a broken peer.
    #[error("malformed clamd reply: {0}")]
    Malformed(String),
}

/// A clamd client: the `zINSTREAM` command of clamd(8) over TCP or a Unix socket, one
/// connection per scan, the whole exchange under one timeout.
#[derive(Debug)]
pub struct ClamdScanner {
    addr: ClamdAddr,
    timeout: Duration,
    stream_max: u64,
    on_oversize: OnScanFailure,
    chunk_bytes: usize,
    clock: Arc<dyn Clock>,
    stats: ScanStats,
}

impl ClamdScanner {
    /// A client of clamd at `addr`: timeout 30 s, stream limit 25 MiB, oversize → tempfail,
    /// 64 KiB chunks.
    pub fn new(addr: ClamdAddr, clock: Arc<dyn Clock>) -> Self {
        ClamdScanner {
            addr,
            timeout: Duration::from_secs(30),
            stream_max: 25 * 1024 * 1024,
            on_oversize: OnScanFailure::Tempfail,
            chunk_bytes: 64 * 1024,
            clock,
            stats: ScanStats::default(),
        }
    }

    /// Longest a whole exchange may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Largest message sent (clamd's `StreamMaxLength` or below).
    pub fn stream_max(mut self, octets: u64) -> Self {
        self.stream_max = octets;
        self
    }

    /// What a message over the limit gets.
    pub fn on_oversize(mut self, policy: OnScanFailure) -> Self {
        self.on_oversize = policy;
        self
    }

    /// Size of the INSTREAM chunks (at least 1).
    pub fn chunk_bytes(mut self, octets: usize) -> Self {
        self.chunk_bytes = octets.clamp(1, u32::MAX as usize);
        self
    }

    /// The address.
    pub fn addr(&self) -> &ClamdAddr {
        &self.addr
    }

    /// The counters.
    pub fn stats(&self) -> &ScanStats {
        &self.stats
    }

    /// Health check: `zPING` must be answered `PONG` within the timeout.
    pub async fn ping(&self) -> Result<(), ClamdError> {
        let exchange = async {
            let mut stream = self.connect().await?;
            stream.write_all(b"zPING\0").await?;
            stream.flush().await?;
            let reply = read_reply(&mut stream).await?;
            if reply == "PONG" { Ok(()) } else { Err(ClamdError::Malformed(printable(&reply))) }
        };
        tokio::time::timeout(self.timeout, exchange).await.unwrap_or(Err(ClamdError::Timeout(self.timeout)))
    }

    /// Scans a message with `zINSTREAM`, read from `content` one chunk at a time (never
    /// whole in memory). Over the stream limit: [`ClamdError::TooLarge`] without contacting
    /// clamd.
    pub async fn instream(&self, content: Content) -> Result<ClamdVerdict, ClamdError> {
        let size = content.remaining();
        if size > self.stream_max {
            return Err(ClamdError::TooLarge { size });
        }
        let exchange = async {
            let stream = self.connect().await?;
            let reply = instream_exchange(stream, content, self.chunk_bytes).await?;
            parse_reply(&reply, size)
        };
        tokio::time::timeout(self.timeout, exchange).await.unwrap_or(Err(ClamdError::Timeout(self.timeout)))
    }

    async fn connect(&self) -> Result<Connection, ClamdError> {
        let connected = match &self.addr {
            ClamdAddr::Tcp(hostport) => tokio::net::TcpStream::connect(hostport.as_str()).await.map(|s| {
                let _ = s.set_nodelay(true);
                Connection::Tcp(s)
            }),
            ClamdAddr::Unix(path) => tokio::net::UnixStream::connect(path).await.map(Connection::Unix),
        };
        connected.map_err(|source| ClamdError::Connect { addr: self.addr.to_string(), source })
    }
}

impl Scanner for ClamdScanner {
    fn scan<'a>(&'a self, message: &'a MessageFile) -> BoxFuture<'a, ScanOutcome> {
        Box::pin(async move {
            let start = self.clock.now();
            let verdict = match message.content() {
                Ok(content) => self.instream(content).await,
                Err(e) => Err(ClamdError::Io(e)),
            };
            let (result, outcome) = match verdict {
                Ok(ClamdVerdict::Clean) => (ScanResult::Clean, ScanOutcome::Clean),
                Ok(ClamdVerdict::Found(signature)) => (ScanResult::Infected, ScanOutcome::Infected { signature }),
                Err(e @ ClamdError::TooLarge { .. }) => match self.on_oversize {
                    OnScanFailure::Tempfail => (ScanResult::Failed, ScanOutcome::Failed { reason: e.to_string() }),
                    OnScanFailure::Accept => (ScanResult::Unscanned, ScanOutcome::Clean),
                },
                Err(e) => (ScanResult::Failed, ScanOutcome::Failed { reason: e.to_string() }),
            };
            let elapsed = self.clock.now().saturating_duration_since(start);
            record(&self.stats, "clamd", message.len() as usize, elapsed, result, &outcome);
            outcome
        })
    }
}

/// A connection to clamd, TCP or Unix.
#[derive(Debug)]
enum Connection {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl AsyncRead for Connection {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Connection::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Connection::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Connection::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Connection::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Sends `zINSTREAM\0`, the message in `<u32 BE length><data>` chunks read from its file
/// one at a time, and the zero-length terminator, while reading the reply: clamd may answer
/// early (size limit) and close, and then the reply counts, not the broken write. The file
/// reads are blocking reads of a file just written (the page cache), one chunk at a time.
async fn instream_exchange<S>(stream: S, mut content: Content, chunk_bytes: usize) -> Result<String, ClamdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let send = async move {
        wr.write_all(b"zINSTREAM\0").await?;
        let len = chunk_bytes.min(usize::try_from(content.remaining()).unwrap_or(usize::MAX));
        let mut frame = vec![0u8; 4 + len];
        loop {
            let n = std::io::Read::read(&mut content, &mut frame[4..])?;
            if n == 0 {
                break;
            }
            frame[..4].copy_from_slice(&(n as u32).to_be_bytes());
            wr.write_all(&frame[..4 + n]).await?;
        }
        wr.write_all(&0u32.to_be_bytes()).await?;
        wr.flush().await
    };
    let recv = read_reply(&mut rd);
    tokio::pin!(send, recv);
    tokio::select! {
        biased;
        reply = &mut recv => reply,
        sent = &mut send => match sent {
            Ok(()) => recv.await,
            Err(e) => recv.await.map_err(|_| ClamdError::Io(e)),
        },
    }
}

/// Reads one NUL-terminated reply (the `z` command form), at most [`CLAMD_REPLY_MAX`] octets.
/// End of stream after some text counts as its end (old clamd versions omit the NUL on errors).
async fn read_reply<R: AsyncRead + Unpin>(rd: &mut R) -> Result<String, ClamdError> {
    let mut reply = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            if reply.is_empty() {
                return Err(ClamdError::Malformed("connection closed without a reply".into()));
            }
            break;
        }
        if let Some(nul) = buf[..n].iter().position(|b| *b == 0) {
            reply.extend_from_slice(&buf[..nul]);
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.len() > CLAMD_REPLY_MAX {
            return Err(ClamdError::Malformed(format!("reply longer than {CLAMD_REPLY_MAX} octets")));
        }
    }
    if reply.len() > CLAMD_REPLY_MAX {
        return Err(ClamdError::Malformed(format!("reply longer than {CLAMD_REPLY_MAX} octets")));
    }
    match String::from_utf8(reply) {
        Ok(s) => Ok(s.trim_end_matches(['\n', '\r', ' ']).to_string()),
        Err(e) => {
            Err(ClamdError::Malformed(format!("not UTF-8: {}", printable(&String::from_utf8_lossy(e.as_bytes())))))
        }
    }
}

/// Interprets an INSTREAM reply.
fn parse_reply(reply: &str, size: u64) -> Result<ClamdVerdict, ClamdError> {
    if reply == "INSTREAM size limit exceeded. ERROR" {
        return Err(ClamdError::TooLarge { size });
    }
    if let Some(error) = reply.strip_suffix(" ERROR") {
        return Err(ClamdError::Scanner(printable(error)));
    }
    let Some(result) = reply.strip_prefix("stream: ") else {
        return Err(ClamdError::Malformed(printable(reply)));
    };
    if result == "OK" {
        return Ok(ClamdVerdict::Clean);
    }
    match result.strip_suffix(" FOUND") {
        Some(name) if valid_signature_name(name) => Ok(ClamdVerdict::Found(name.to_string())),
        _ => Err(ClamdError::Malformed(printable(reply))),
    }
}

/// A peer's text made safe for logs ([`crate::proto::escape`]), at most 100 characters.
fn printable(s: &str) -> String {
    let escaped = crate::proto::escape(s);
    match escaped.char_indices().nth(100) {
        Some((cut, _)) => format!("{}…", &escaped[..cut]),
        None => escaped.into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tokio::net::TcpListener;

    use super::*;
    use crate::scan::fixtures::{attachment, clock};
    use crate::scan::{EICAR, SIGNATURE_NAME_MAX};

    #[test]
    fn clamd_addresses() {
        assert_eq!("tcp:127.0.0.1:3310".parse(), Ok(ClamdAddr::Tcp("127.0.0.1:3310".into())));
        assert_eq!("tcp:[::1]:3310".parse(), Ok(ClamdAddr::Tcp("[::1]:3310".into())));
        assert_eq!("tcp:clamav.internal:3310".parse(), Ok(ClamdAddr::Tcp("clamav.internal:3310".into())));
        assert_eq!("unix:/run/clamav/clamd.ctl".parse(), Ok(ClamdAddr::Unix("/run/clamav/clamd.ctl".into())));
        for bad in ["tcp:127.0.0.1", "tcp::3310", "tcp:h:0", "tcp:::1:3310", "unix:relative", "/run/x", ""] {
            assert!(bad.parse::<ClamdAddr>().is_err(), "{bad}");
        }
        assert_eq!(ClamdAddr::Unix("/x".into()).to_string(), "unix:/x");
    }

    #[test]
    fn replies() {
        assert_eq!(parse_reply("stream: OK", 1).unwrap(), ClamdVerdict::Clean);
        assert_eq!(
            parse_reply("stream: Eicar-Test-Signature.UNOFFICIAL FOUND", 1).unwrap(),
            ClamdVerdict::Found("Eicar-Test-Signature.UNOFFICIAL".into())
        );
        assert!(matches!(parse_reply("INSTREAM size limit exceeded. ERROR", 9), Err(ClamdError::TooLarge { size: 9 })));
        assert!(matches!(parse_reply("Can't allocate memory ERROR", 1), Err(ClamdError::Scanner(_))));
        for bad in ["stream:  FOUND", "stream: a b FOUND", "stream: \u{7}x FOUND", "PONG", "stream: FOUND", "OK"] {
            assert!(matches!(parse_reply(bad, 1), Err(ClamdError::Malformed(_))), "{bad}");
        }
        let long = format!("stream: {} FOUND", "x".repeat(SIGNATURE_NAME_MAX + 1));
        assert!(matches!(parse_reply(&long, 1), Err(ClamdError::Malformed(_))));
    }

    /// How a fake clamd answers one connection.
    #[derive(Clone, Copy)]
    enum Fake {
        /// Reads the whole INSTREAM, checks its framing, then sends this.
        Answer(&'static [u8]),
        /// Sends this after the first octets, without reading on, and closes.
        Early(&'static [u8]),
        /// Reads the stream and sends octets forever.
        Endless,
        /// Reads the stream and never answers.
        Silent,
    }

    /// Reads one INSTREAM request and returns the streamed data.
    async fn read_instream<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
        let mut cmd = [0u8; 10];
        s.read_exact(&mut cmd).await.unwrap();
        assert_eq!(&cmd, b"zINSTREAM\0");
        let mut data = Vec::new();
        loop {
            let len = s.read_u32().await.unwrap() as usize;
            if len == 0 {
                return data;
            }
            let start = data.len();
            data.resize(start + len, 0);
            s.read_exact(&mut data[start..]).await.unwrap();
        }
    }

    async fn fake_clamd(fake: Fake) -> (ClamdAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = ClamdAddr::Tcp(listener.local_addr().unwrap().to_string());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match fake {
                        Fake::Answer(reply) => {
                            let data = read_instream(&mut s).await;
                            let _ = tx.send(data);
                            s.write_all(reply).await.unwrap();
                        }
                        Fake::Early(reply) => {
                            let mut first = [0u8; 10];
                            s.read_exact(&mut first).await.unwrap();
                            s.write_all(reply).await.unwrap();
                            let _ = s.shutdown().await;
                            // Then close with unread data pending, as clamd does: the kernel
                            // resets the connection and the client's writes fail.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            drop(s);
                        }
                        Fake::Endless => {
                            let _ = read_instream(&mut s).await;
                            let chunk = [b'A'; 4096];
                            while s.write_all(&chunk).await.is_ok() {}
                        }
                        Fake::Silent => {
                            let _ = read_instream(&mut s).await;
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                    }
                });
            }
        });
        (addr, rx)
    }

    /// A message file holding `content`, and the directory it is in (removed when dropped).
    fn file(content: impl AsRef<[u8]>) -> (MessageFile, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (MessageFile::with_content(dir.path(), "m", content.as_ref()).unwrap(), dir)
    }

    fn client(addr: ClamdAddr) -> ClamdScanner {
        ClamdScanner::new(addr, clock()).timeout(Duration::from_secs(5)).chunk_bytes(1000)
    }

    #[tokio::test]
    async fn clamd_ok_streams_in_chunks() {
        let (addr, mut seen) = fake_clamd(Fake::Answer(b"stream: OK\0")).await;
        let message: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let s = client(addr);
        assert_eq!(s.scan(&file(&message).0).await, ScanOutcome::Clean);
        assert_eq!(seen.recv().await.unwrap(), message, "3 chunks reassemble to the message");
        assert_eq!(s.stats().clean.load(Ordering::Relaxed), 1);
        // An empty message is just the terminator.
        assert_eq!(s.scan(&file(b"").0).await, ScanOutcome::Clean);
        assert_eq!(seen.recv().await.unwrap(), b"");
    }

    #[tokio::test]
    async fn clamd_found_names_the_signature() {
        let (addr, _seen) = fake_clamd(Fake::Answer(b"stream: Win.Test.EICAR_HDB-1 FOUND\0")).await;
        let outcome = client(addr).scan(&file(EICAR).0).await;
        assert_eq!(outcome, ScanOutcome::Infected { signature: "Win.Test.EICAR_HDB-1".into() });
    }

    #[tokio::test]
    async fn clamd_size_limit_follows_the_oversize_policy() {
        let (addr, _seen) = fake_clamd(Fake::Early(b"INSTREAM size limit exceeded. ERROR\0")).await;
        let (message, _dir) = file(vec![b'x'; 4 * 1024 * 1024]);
        let s = client(addr.clone());
        assert!(matches!(s.instream(message.content().unwrap()).await, Err(ClamdError::TooLarge { .. })));
        let outcome = s.scan(&message).await;
        assert!(matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains("stream limit")), "{outcome:?}");
        let s = client(addr).on_oversize(OnScanFailure::Accept);
        assert_eq!(s.scan(&message).await, ScanOutcome::Clean);
        assert_eq!(s.stats().unscanned.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn over_our_limit_clamd_is_not_asked() {
        // Nothing listens there: asking would fail differently.
        let s = ClamdScanner::new("unix:/nonexistent/clamd.ctl".parse().unwrap(), clock()).stream_max(10);
        assert!(matches!(
            s.instream(file(b"01234567890").0.content().unwrap()).await,
            Err(ClamdError::TooLarge { size: 11 })
        ));
        let s = s.on_oversize(OnScanFailure::Accept);
        assert_eq!(s.scan(&file(b"01234567890").0).await, ScanOutcome::Clean);
        assert!(matches!(s.instream(file(b"0123456789").0.content().unwrap()).await, Err(ClamdError::Connect { .. })));
    }

    #[tokio::test]
    async fn clamd_errors_and_malformed_answers_fail_the_scan() {
        for (reply, expect) in [
            (b"Can't allocate memory ERROR\0".as_slice(), "clamd error"),
            (b"HTTP/1.1 400 Bad Request\r\n\r\n\0", "malformed"),
            (b"stream: OK", "malformed"), // no NUL, but EOF right after: accepted below
            (b"\0", "malformed"),
            (b"stream: \xff\xfe FOUND\0", "not UTF-8"),
            (b"stream: two words FOUND\0", "malformed"),
        ] {
            let (addr, _seen) = fake_clamd(Fake::Answer(reply)).await;
            let outcome = client(addr).scan(&file(b"hello").0).await;
            if reply == b"stream: OK" {
                assert_eq!(outcome, ScanOutcome::Clean, "EOF ends a reply");
                continue;
            }
            assert!(
                matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains(expect)),
                "{:?}: {outcome:?}",
                String::from_utf8_lossy(reply)
            );
        }
    }

    #[tokio::test]
    async fn endless_reply_is_cut_off() {
        let (addr, _seen) = fake_clamd(Fake::Endless).await;
        let outcome = client(addr).scan(&file(b"hello").0).await;
        assert!(
            matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains("longer than 1024")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn oversized_reply_is_refused() {
        let mut long = b"stream: ".to_vec();
        long.extend(std::iter::repeat_n(b'A', 3 * CLAMD_REPLY_MAX));
        long.extend_from_slice(b" FOUND\0");
        let (addr, _seen) = fake_clamd(Fake::Answer(Box::leak(long.into_boxed_slice()))).await;
        let outcome = client(addr).scan(&file(b"hello").0).await;
        assert!(
            matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains("longer than 1024")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn silent_clamd_times_out() {
        let (addr, _seen) = fake_clamd(Fake::Silent).await;
        let s = client(addr).timeout(Duration::from_millis(200));
        let outcome = s.scan(&file(b"hello").0).await;
        assert!(matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains("did not answer")), "{outcome:?}");
        assert_eq!(s.stats().failed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn clamd_down_fails_the_scan() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = ClamdAddr::Tcp(listener.local_addr().unwrap().to_string());
        drop(listener);
        let outcome = client(addr).scan(&file(b"hello").0).await;
        assert!(matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains("cannot connect")), "{outcome:?}");
    }

    #[tokio::test]
    async fn ping_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clamd.ctl");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            for reply in [b"PONG\0".as_slice(), b"PANG\0"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut cmd = [0u8; 6];
                s.read_exact(&mut cmd).await.unwrap();
                assert_eq!(&cmd, b"zPING\0");
                s.write_all(reply).await.unwrap();
            }
        });
        let s = client(ClamdAddr::Unix(path));
        s.ping().await.unwrap();
        assert!(matches!(s.ping().await, Err(ClamdError::Malformed(m)) if m == "PANG"));
    }

    #[tokio::test]
    async fn instream_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clamd.ctl");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let data = read_instream(&mut s).await;
            let reply: &[u8] = if data.windows(EICAR.len()).any(|w| w == EICAR) {
                b"stream: Eicar-Test-Signature FOUND\0"
            } else {
                b"stream: OK\0"
            };
            s.write_all(reply).await.unwrap();
        });
        let outcome = client(ClamdAddr::Unix(path)).scan(&file(attachment(b"x")).0).await;
        assert_eq!(outcome, ScanOutcome::Clean);
    }
}
