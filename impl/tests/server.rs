//! The real server over loopback TCP: gate, rules, durable delivery, limits, shutdown.
//! Each test's clients bind their own source address in 127.0.0.0/8 so the gate sees
//! distinct clients.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gatekeeper::edges::{MaildirSpool, SystemClock};
use gatekeeper::server::{Limits, Server};
use gatekeeper::testing;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

struct Running {
    addr: SocketAddr,
    server: Server,
    maildir: PathBuf,
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
        messages(&self.maildir)
    }
}

fn messages(maildir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(maildir.join("new"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    v.sort();
    v
}

/// A server of the test kit's standard configuration plus `extra` (more tables).
async fn start(extra: &str, limits: Limits) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let settings = testing::settings(extra);
    let maildir = dir.path().join("maildir");
    let clock = Arc::new(SystemClock);
    let spool = MaildirSpool::open(&maildir, "mx.example.test", clock.clone(), true).unwrap();
    let server = Server::builder(settings.session.clone(), settings.directory.clone(), Arc::new(spool))
        .clock(clock)
        .gate(settings.config.gate.clone())
        .limits(limits)
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
    Running { addr, server, maildir, stop: Some(tx), done, _dir: dir }
}

struct Client {
    r: BufReader<OwnedReadHalf>,
    w: OwnedWriteHalf,
}

impl Client {
    async fn connect(server: SocketAddr, source: &str) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        let stream: TcpStream = socket.connect(server).await.unwrap();
        let (r, w) = stream.into_split();
        Client { r: BufReader::new(r), w }
    }

    /// One whole (possibly multi-line) reply; "" on EOF.
    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut line)).await.unwrap().unwrap();
            if n == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    async fn send(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).await.unwrap();
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }
}

/// Default limits, but a short shutdown grace so stopping a server with open clients is quick.
fn quick() -> Limits {
    Limits { shutdown_grace: Duration::from_millis(200), ..Limits::default() }
}

fn code(reply: &str) -> &str {
    reply.get(..3).unwrap_or("")
}

#[tokio::test]
async fn rules_over_tcp_and_durable_delivery() {
    let s = start("", quick()).await;
    let mut c = Client::connect(s.addr, "127.0.0.2").await;
    assert!(c.reply().await.starts_with("220 mx.example.test ESMTP"));
    assert!(c.cmd("EHLO client.test").await.contains("250-PIPELINING"));
    assert_eq!(c.cmd("MAIL FROM:<>").await, "250 2.1.0 Sender OK\r\n");
    assert_eq!(code(&c.cmd("RCPT TO:<nobody@example.test>").await), "550");
    assert_eq!(code(&c.cmd("RCPT TO:<someone@elsewhere.test>").await), "554");
    assert_eq!(code(&c.cmd("RCPT TO:<alice@example.test>").await), "250");
    assert_eq!(code(&c.cmd("DATA").await), "354");
    let reply = c.cmd("Subject: test\r\n\r\n..dot\r\n.").await;
    assert!(reply.starts_with("250 2.0.0 Ok: queued as "), "{reply}");
    // The 250 came after the fsync'd rename: the message is in new/ now.
    let spooled = s.spooled();
    assert_eq!(spooled.len(), 1);
    assert!(spooled[0].contains("Return-Path: <>\r\nX-Gatekeeper-Rcpt: <alice@example.test>\r\n"));
    assert!(spooled[0].ends_with("Subject: test\r\n\r\n.dot\r\n"));
    assert_eq!(code(&c.cmd("QUIT").await), "221");
    // `<>` to an unknown user is never a ban.
    assert!(!s.server.is_banned("127.0.0.2".parse().unwrap()));
    s.stop().await;
}

#[tokio::test]
async fn forged_local_sender_is_banned_and_refused_with_554() {
    let s = start("", quick()).await;
    let mut c = Client::connect(s.addr, "127.0.0.3").await;
    c.reply().await;
    c.cmd("EHLO spam.test").await;
    assert!(c.cmd("MAIL FROM:<nobody@example.test>").await.starts_with("550 5.7.1"));
    assert!(s.server.is_banned("127.0.0.3".parse().unwrap()));
    c.cmd("QUIT").await;
    // G2: a 554 greeting, then 503 until QUIT (RFC 5321 §3.1).
    let mut again = Client::connect(s.addr, "127.0.0.3").await;
    assert!(again.reply().await.starts_with("554 5.7.1"));
    assert!(again.cmd("EHLO spam.test").await.starts_with("503"));
    assert!(again.cmd("QUIT").await.starts_with("221"));
    // Others are unaffected.
    let mut other = Client::connect(s.addr, "127.0.0.4").await;
    assert!(other.reply().await.starts_with("220"));
    s.stop().await;
}

#[tokio::test]
async fn unknown_recipient_with_real_sender_is_banned() {
    let s = start("", quick()).await;
    let mut c = Client::connect(s.addr, "127.0.0.5").await;
    c.reply().await;
    c.cmd("EHLO spam.test").await;
    c.cmd("MAIL FROM:<x@elsewhere.test>").await;
    assert!(c.cmd("RCPT TO:<nobody@example.test>").await.starts_with("550 5.1.1"));
    assert!(s.server.is_banned("127.0.0.5".parse().unwrap()));
    s.stop().await;
}

#[tokio::test]
async fn connection_gate_is_one_per_window_per_address() {
    let s = start("", quick()).await;
    let mut first = Client::connect(s.addr, "127.0.0.6").await;
    assert!(first.reply().await.starts_with("220"));
    let mut second = Client::connect(s.addr, "127.0.0.6").await;
    let reply = second.reply().await;
    assert!(reply.starts_with("421 4.7.0"), "{reply}");
    assert_eq!(second.reply().await, "", "closed after 421");
    let mut elsewhere = Client::connect(s.addr, "127.0.0.7").await;
    assert!(elsewhere.reply().await.starts_with("220"));
    assert_eq!(s.server.stats().refused_rate.load(std::sync::atomic::Ordering::Relaxed), 1);
    s.stop().await;
}

#[tokio::test]
async fn pipelined_transaction_is_answered_in_order() {
    let s = start("", quick()).await;
    let mut c = Client::connect(s.addr, "127.0.0.8").await;
    c.reply().await;
    c.cmd("EHLO client.test").await;
    c.send("MAIL FROM:<>\r\nRCPT TO:<nobody@example.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n").await;
    let codes = [c.reply().await, c.reply().await, c.reply().await, c.reply().await];
    assert_eq!(codes.iter().map(|r| code(r)).collect::<Vec<_>>(), ["250", "550", "250", "354"]);
    c.send("hello\r\n.\r\nQUIT\r\n").await;
    assert!(c.reply().await.starts_with("250 2.0.0"));
    assert!(c.reply().await.starts_with("221"));
    assert_eq!(s.spooled().len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn per_address_session_limit() {
    let limits = Limits { max_sessions_per_ip: 1, in_process_rate: false, ..quick() };
    let s = start("", limits).await;
    let mut a = Client::connect(s.addr, "127.0.0.9").await;
    assert!(a.reply().await.starts_with("220"));
    let mut b = Client::connect(s.addr, "127.0.0.9").await;
    assert!(b.reply().await.starts_with("421 4.3.2"));
    a.cmd("QUIT").await;
    s.stop().await;
}

#[tokio::test]
async fn idle_client_times_out_with_421() {
    let s = start("[smtp]\ncommand_timeout = \"300ms\"\n", quick()).await;
    let mut c = Client::connect(s.addr, "127.0.0.10").await;
    c.reply().await;
    let reply = c.reply().await;
    assert!(reply.starts_with("421 4.4.2"), "{reply}");
    s.stop().await;
}

#[tokio::test]
async fn shutdown_lets_sessions_finish_then_says_421() {
    let limits = Limits { shutdown_grace: Duration::from_millis(200), ..quick() };
    let s = start("", limits).await;
    let mut c = Client::connect(s.addr, "127.0.0.11").await;
    c.reply().await;
    c.cmd("EHLO client.test").await;
    let addr = s.addr;
    let stopping = tokio::spawn(s.stop());
    // New connections are refused once the listener is gone; the session gets 421 after grace.
    let reply = c.reply().await;
    assert!(reply.starts_with("421 4.3.2"), "{reply}");
    stopping.await.unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn proxy_header_only_from_trusted_peers() {
    let trusted: IpAddr = "127.0.0.12".parse().unwrap();
    let limits = Limits { proxy_trusted: vec![trusted], ..quick() };
    let s = start("", limits).await;
    let mut c = Client::connect(s.addr, "127.0.0.12").await;
    let header = gatekeeper::proto::proxy_v2_header("192.0.2.77:4000".parse().unwrap(), s.addr);
    c.w.write_all(&header).await.unwrap();
    c.reply().await;
    c.cmd("EHLO spam.test").await;
    c.cmd("MAIL FROM:<nobody@example.test>").await;
    assert!(s.server.is_banned("192.0.2.77".parse().unwrap()), "the PROXY source is the client");
    assert!(!s.server.is_banned(trusted));
    // From an untrusted peer the header is just a bad command line.
    let mut u = Client::connect(s.addr, "127.0.0.13").await;
    u.reply().await;
    assert!(u.cmd("PROXY TCP4 192.0.2.78 127.0.0.1 1 25").await.starts_with("500"));
    s.stop().await;
}
