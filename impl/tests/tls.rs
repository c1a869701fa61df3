//! STARTTLS (RFC 3207) over loopback TCP with a self-signed certificate made here (rcgen):
//! delivery over TLS, the session reset after the handshake, plaintext pipelined after
//! STARTTLS discarded, and a flood of stalled handshakes while a plain client is served.
//! Also observe mode (`rules.mode = "observe"`) over TCP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use gatekeeper::edges::{Clock, MaildirSpool, SystemClock, Tls};
use gatekeeper::server::{Limits, Server};
use gatekeeper::testing;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

struct Running {
    addr: SocketAddr,
    server: Server,
    maildir: PathBuf,
    cert: CertificateDer<'static>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.await.unwrap().unwrap();
    }
    fn spooled(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.maildir.join("new"))
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        v.sort();
        v
    }
}

/// A self-signed ECDSA P-256 certificate for `mx.example.test`, written as PEM into `dir`.
fn make_cert(dir: &Path) -> (PathBuf, PathBuf, CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec!["mx.example.test".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key, certified.cert.der().clone())
}

/// The test kit's standard configuration plus `[tls]` with a fresh certificate and `extra`.
async fn start(tls_extra: &str, extra: &str, limits: Limits) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path, cert) = make_cert(dir.path());
    let settings = testing::settings(&format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n{tls_extra}\n{extra}",
        cert_path.display().to_string(),
        key_path.display().to_string()
    ));
    let maildir = dir.path().join("maildir");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let spool = MaildirSpool::open(&maildir, "mx.example.test", clock.clone(), true).unwrap();
    let t = &settings.config.tls;
    let tls = Tls::new(settings.tls.clone().expect("tls configured"), t.max_handshakes, t.handshake_timeout);
    let server = Server::builder(settings.session.clone(), settings.directory.clone(), Arc::new(spool))
        .clock(clock)
        .gate(settings.config.gate.clone())
        .limits(limits)
        .tls(Arc::new(tls))
        .build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let s = server.clone();
    let done = tokio::spawn(async move {
        s.run(listener, async {
            let _ = rx.await;
        })
        .await
    });
    Running { addr, server, maildir, cert, stop: Some(tx), done, _dir: dir }
}

fn quick() -> Limits {
    Limits { shutdown_grace: Duration::from_millis(200), ..Limits::default() }
}

struct Client<S> {
    s: BufReader<S>,
}

impl Client<TcpStream> {
    async fn connect(server: SocketAddr, source: &str) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        Client { s: BufReader::new(socket.connect(server).await.unwrap()) }
    }

    /// The TLS handshake (after our 220 to STARTTLS), trusting only `cert`.
    async fn tls(self, cert: &CertificateDer<'static>) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
        assert!(self.s.buffer().is_empty(), "nothing may follow the 220 in clear text");
        let mut roots = RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        #[allow(deprecated)]
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from("mx.example.test").unwrap();
        let stream = TlsConnector::from(Arc::new(config)).connect(name, self.s.into_inner()).await.unwrap();
        Client { s: BufReader::new(stream) }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// One whole (possibly multi-line) reply; "" on EOF or a reset.
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(Duration::from_secs(10), self.s.read_line(&mut line)).await.unwrap();
            if !matches!(read, Ok(n) if n > 0) {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn send(&mut self, text: &str) {
        self.s.get_mut().write_all(text.as_bytes()).await.unwrap();
        self.s.get_mut().flush().await.unwrap();
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }
}

fn code(reply: &str) -> &str {
    reply.get(..3).unwrap_or("")
}

#[tokio::test]
async fn starttls_delivers_and_the_session_starts_over() {
    let s = start("", "", quick()).await;
    let mut c = Client::connect(s.addr, "127.0.0.2").await;
    assert!(c.reply().await.starts_with("220 "));
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(ehlo.contains("250-STARTTLS\r\n") || ehlo.contains("250 STARTTLS\r\n"), "{ehlo}");
    // Not in a transaction (RFC 3207 leaves it to us; Postfix refuses too).
    assert_eq!(code(&c.cmd("MAIL FROM:<>").await), "250");
    assert!(c.cmd("STARTTLS").await.starts_with("503 5.5.1"));
    assert_eq!(code(&c.cmd("RSET").await), "250");
    assert!(c.cmd("STARTTLS extra").await.starts_with("501"));
    assert_eq!(c.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS\r\n");
    let mut c = c.tls(&s.cert).await;
    // RFC 3207 §4.2: the EHLO before TLS is forgotten: no greeting, and MAIL needs EHLO again.
    assert!(c.cmd("MAIL FROM:<>").await.starts_with("503"));
    let ehlo = c.cmd("EHLO client.test").await;
    assert!(ehlo.starts_with("250-mx.example.test"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "not offered once on: {ehlo}");
    assert!(c.cmd("STARTTLS").await.starts_with("503 5.5.1 TLS already active"));
    assert_eq!(code(&c.cmd("MAIL FROM:<>").await), "250");
    assert_eq!(code(&c.cmd("RCPT TO:<alice@example.test>").await), "250");
    assert_eq!(code(&c.cmd("DATA").await), "354");
    let reply = c.cmd("Subject: over TLS\r\n\r\nhello\r\n.").await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    assert_eq!(code(&c.cmd("QUIT").await), "221");
    let spooled = s.spooled();
    assert_eq!(spooled.len(), 1);
    assert!(spooled[0].contains(" with ESMTPS id "), "{}", spooled[0]);
    assert_eq!(s.server.tls().unwrap().completed.load(Ordering::Relaxed), 1);
    s.stop().await;
}

/// CVE-2011-0411: a command pipelined after STARTTLS in clear text must not be executed as
/// if it came over TLS.
#[tokio::test]
async fn plaintext_pipelined_after_starttls_is_discarded() {
    let s = start("", "", quick()).await;
    let mut c = Client::connect(s.addr, "127.0.0.3").await;
    c.reply().await;
    c.cmd("EHLO client.test").await;
    c.send("STARTTLS\r\nRSET\r\nMAIL FROM:<injected@elsewhere.test>\r\n").await;
    assert_eq!(c.reply().await, "220 2.0.0 Ready to start TLS\r\n");
    let mut c = c.tls(&s.cert).await;
    // Had the injected lines been kept, their replies (250 to RSET, 503 to MAIL) would come
    // first; NOOP's is the first and only one.
    assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK\r\n");
    c.cmd("EHLO client.test").await;
    assert_eq!(code(&c.cmd("MAIL FROM:<>").await), "250", "no transaction was left open by the injection");
    s.stop().await;
}

/// Stalled handshakes hold at most `tls.max_handshakes` places, for at most
/// `tls.handshake_timeout`; STARTTLS beyond gets 454 and the session goes on in clear text;
/// a plain client is served throughout.
#[tokio::test]
async fn a_handshake_flood_does_not_starve_plain_sessions() {
    let s = start("max_handshakes = 3\nhandshake_timeout = \"2s\"", "", quick()).await;
    let (mut flood, mut plain_ones) = (Vec::new(), Vec::new());
    let (mut granted, mut refused) = (0, 0);
    for i in 0..10 {
        let mut c = Client::connect(s.addr, &format!("127.0.1.{}", i + 1)).await;
        c.reply().await;
        c.cmd("EHLO flood.test").await;
        match code(&c.cmd("STARTTLS").await) {
            "220" => {
                granted += 1;
                // Never sends a ClientHello.
                flood.push(c);
            }
            "454" => {
                refused += 1;
                // Still a session, in clear text.
                assert_eq!(c.cmd("NOOP").await, "250 2.0.0 OK\r\n");
                plain_ones.push(c);
            }
            other => panic!("STARTTLS answered {other}"),
        }
    }
    assert_eq!((granted, refused), (3, 7));
    let mut plain = Client::connect(s.addr, "127.0.0.4").await;
    assert!(plain.reply().await.starts_with("220 "));
    plain.cmd("EHLO plain.test").await;
    assert_eq!(code(&plain.cmd("MAIL FROM:<>").await), "250");
    assert_eq!(code(&plain.cmd("RCPT TO:<bob@example.test>").await), "250");
    assert_eq!(code(&plain.cmd("DATA").await), "354");
    assert_eq!(code(&plain.cmd("Subject: plain\r\n\r\nhi\r\n.").await), "250");
    // The stalled handshakes are ended by their timeout (the connection closes) ...
    for c in flood.iter_mut() {
        let mut byte = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), c.s.read_line(&mut byte)).await.unwrap();
    }
    let tls = s.server.tls().unwrap();
    assert_eq!(tls.failed.load(Ordering::Relaxed), 3);
    assert_eq!(tls.refused.load(Ordering::Relaxed), 7);
    // ... and their places are free again.
    let mut c = Client::connect(s.addr, "127.0.0.5").await;
    c.reply().await;
    c.cmd("EHLO late.test").await;
    assert_eq!(code(&c.cmd("STARTTLS").await), "220");
    let mut c = c.tls(&s.cert).await;
    assert_eq!(code(&c.cmd("EHLO late.test").await), "250");
    s.stop().await;
}

/// `rules.mode = "observe"`: a forged local sender (E1, a ban in enforce mode) gets 250 and no
/// ban; an unknown recipient is accepted; the counters say what would have been done.
#[tokio::test]
async fn observe_mode_rejects_and_bans_nobody_but_counts() {
    let s = start("", "[rules]\nmode = \"observe\"\n", quick()).await;
    let mut c = Client::connect(s.addr, "127.0.0.6").await;
    c.reply().await;
    c.cmd("EHLO spam.test").await;
    assert_eq!(c.cmd("MAIL FROM:<nobody@example.test>").await, "250 2.1.0 Sender OK\r\n");
    assert_eq!(code(&c.cmd("RCPT TO:<alice@example.test>").await), "250");
    // Relay denial is enforced even so: observing must not open a relay.
    assert_eq!(code(&c.cmd("RCPT TO:<someone@elsewhere.test>").await), "554");
    assert_eq!(code(&c.cmd("DATA").await), "354");
    assert_eq!(code(&c.cmd("Subject: observed\r\n\r\nhi\r\n.").await), "250");
    assert_eq!(code(&c.cmd("QUIT").await), "221");
    assert!(!s.server.is_banned("127.0.0.6".parse().unwrap()));
    let stats = s.server.stats();
    assert_eq!(stats.bans.load(Ordering::Relaxed), 0);
    assert_eq!(stats.would_ban.load(Ordering::Relaxed), 1, "the forged sender");
    assert_eq!(stats.would_reject.load(Ordering::Relaxed), 1, "the forged sender");
    assert_eq!(s.spooled().len(), 1);
    // The next connection is not refused (G1 would have: observed); a bounce to an unknown user is accepted (550 and no
    // ban in enforce mode).
    let mut again = Client::connect(s.addr, "127.0.0.6").await;
    assert!(again.reply().await.starts_with("220 "));
    again.cmd("EHLO spam.test").await;
    assert_eq!(code(&again.cmd("MAIL FROM:<>").await), "250");
    assert_eq!(code(&again.cmd("RCPT TO:<nobody@example.test>").await), "250");
    assert_eq!(stats.would_reject.load(Ordering::Relaxed), 3, "the sender, G1, the unknown recipient");
    assert_eq!(stats.would_ban.load(Ordering::Relaxed), 1);
    s.stop().await;
}
