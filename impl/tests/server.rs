//! The real server over loopback TCP: gate, rules, durable delivery, limits, shutdown, PROXY.
//! Each test's clients bind their own source address in 127.0.0.0/8 so the gate sees
//! distinct clients; IPv6 clients come through a trusted proxy's PROXY header.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gatekeeper::edges::{Clock, MaildirSpool, SystemClock};
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
    start_on("127.0.0.1:0", extra, limits).await
}

/// [`start`] on `listen` (`[::]:0` for a dual-stack listener).
async fn start_on(listen: &str, extra: &str, limits: Limits) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let settings = testing::settings(extra);
    let maildir = dir.path().join("maildir");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let spool = MaildirSpool::open(&maildir, "mx.example.test", clock.clone(), true).unwrap();
    let mut builder = Server::builder(settings.session.clone(), settings.directory.clone(), Arc::new(spool))
        .clock(clock.clone())
        .gate(settings.config.gate.clone())
        .limits(limits);
    if settings.session.scan {
        builder = builder.scanner(settings.config.scan.build(settings.config.rules.on_scan_failure, clock).unwrap());
    }
    let server = builder.build();
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
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
        // To a dual-stack `[::]` listener over IPv4: it sees the client as `::ffff:a.b.c.d`.
        let server =
            if server.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], server.port())) } else { server };
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
    // Pipelined: the ban ends the session after the 550, so the RCPT is never answered.
    c.send("MAIL FROM:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\n").await;
    assert!(c.reply().await.starts_with("550 5.7.1"));
    assert!(s.server.is_banned("127.0.0.3".parse().unwrap()));
    assert!(c.reply().await.starts_with("421 4.7.0"));
    assert_eq!(c.reply().await, "", "closed");
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

/// A dictionary attack (a second unknown recipient) is banned at once, and the ban ends the
/// session: 421 after the 550, then the connection closes.
#[tokio::test]
async fn dictionary_attack_is_banned_and_its_session_ends() {
    let s = start("", quick()).await;
    let mut c = Client::connect(s.addr, "127.0.0.5").await;
    c.reply().await;
    c.cmd("EHLO spam.test").await;
    c.cmd("MAIL FROM:<x@elsewhere.test>").await;
    assert!(c.cmd("RCPT TO:<nobody@example.test>").await.starts_with("550 5.1.1"));
    assert!(!s.server.is_banned("127.0.0.5".parse().unwrap()), "one unknown recipient may be a probe");
    assert!(c.cmd("RCPT TO:<n2@example.test>").await.starts_with("550 5.1.1"));
    assert!(s.server.is_banned("127.0.0.5".parse().unwrap()));
    let reply = c.cmd("RCPT TO:<alice@example.test>").await;
    assert!(reply.starts_with("421 4.7.0"), "{reply}");
    assert_eq!(c.reply().await, "", "closed");
    s.stop().await;
}

/// Postfix verifies addresses with `MAIL FROM:<double-bounce@its.domain>`: its probe of an
/// unknown user gets 550 and no ban; the same client doing it again within the B4 window is
/// banned.
#[tokio::test]
async fn double_bounce_probe_gets_550_and_no_ban_unless_repeated() {
    let s = start("", Limits { in_process_rate: false, ..quick() }).await;
    let probe = |source: &'static str| {
        let addr = s.addr;
        async move {
            let mut c = Client::connect(addr, source).await;
            assert!(c.reply().await.starts_with("220"));
            c.cmd("EHLO mx.remote.test").await;
            assert!(c.cmd("MAIL FROM:<double-bounce@remote.test>").await.starts_with("250"));
            let reply = c.cmd("RCPT TO:<q8x7z3@example.test>").await;
            let quit = c.cmd("QUIT").await;
            (reply, quit)
        }
    };
    let (reply, quit) = probe("127.0.0.30").await;
    assert!(reply.starts_with("550 5.1.1"), "{reply}");
    assert!(quit.starts_with("221"), "{quit}");
    assert!(!s.server.is_banned("127.0.0.30".parse().unwrap()));
    // Another prober is not affected.
    let (reply, _) = probe("127.0.0.31").await;
    assert!(reply.starts_with("550"));
    assert!(!s.server.is_banned("127.0.0.31".parse().unwrap()));
    // Repeated within the window: the second unknown recipient counts, with the first.
    let (reply, quit) = probe("127.0.0.30").await;
    assert!(reply.starts_with("550 5.1.1"), "{reply}");
    assert!(quit.starts_with("421 4.7.0"), "the ban ended the session: {quit}");
    assert!(s.server.is_banned("127.0.0.30".parse().unwrap()));
    s.stop().await;
}

#[tokio::test]
async fn recipient_delimiter_addresses_the_user() {
    let s = start("", quick()).await;
    let mut c = Client::connect(s.addr, "127.0.0.32").await;
    c.reply().await;
    c.cmd("EHLO newsletter.test").await;
    c.cmd("MAIL FROM:<news@elsewhere.test>").await;
    assert!(c.cmd("RCPT TO:<alice+x@example.test>").await.starts_with("250 2.1.5"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    assert!(c.cmd("Subject: news\r\n\r\nhello\r\n.").await.starts_with("250 2.0.0"));
    let spooled = s.spooled();
    assert!(spooled[0].contains("X-Gatekeeper-Rcpt: <alice+x@example.test>\r\n"), "{}", spooled[0]);
    // Off: the extension is part of the name.
    let s2 = start("recipient_delimiter = \"\"\n", quick()).await;
    let mut c = Client::connect(s2.addr, "127.0.0.33").await;
    c.reply().await;
    c.cmd("EHLO newsletter.test").await;
    c.cmd("MAIL FROM:<>").await;
    assert!(c.cmd("RCPT TO:<alice+x@example.test>").await.starts_with("550 5.1.1"));
    s2.stop().await;
    s.stop().await;
}

/// V1: a virus from a non-null sender gets 554 and a ban (B3), and the ban ends the session;
/// from `<>` (a bounce carrying it back) or to postmaster, 554 and no ban.
#[tokio::test]
async fn eicar_bans_only_non_null_senders() {
    let s = start("[rules]\nscan = true\n", quick()).await;
    let eicar = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
    let send = |source: &'static str, from: &'static str, to: &'static str| {
        let addr = s.addr;
        async move {
            let mut c = Client::connect(addr, source).await;
            c.reply().await;
            c.cmd("EHLO bouncer.test").await;
            assert!(c.cmd(&format!("MAIL FROM:{from}")).await.starts_with("250"));
            assert!(c.cmd(&format!("RCPT TO:{to}")).await.starts_with("250"));
            assert!(c.cmd("DATA").await.starts_with("354"));
            let reply = c.cmd(&format!("Subject: returned mail\r\n\r\n{eicar}\r\n.")).await;
            let next = c.cmd("NOOP").await;
            (reply, next)
        }
    };
    let (reply, next) = send("127.0.0.34", "<>", "<alice@example.test>").await;
    assert!(reply.starts_with("554 5.7.1") && reply.contains("Eicar"), "{reply}");
    assert!(next.starts_with("250"), "no ban, the session goes on: {next}");
    assert!(!s.server.is_banned("127.0.0.34".parse().unwrap()));
    let (reply, _) = send("127.0.0.35", "<reporter@elsewhere.test>", "<postmaster@example.test>").await;
    assert!(reply.starts_with("554 5.7.1"), "{reply}");
    assert!(!s.server.is_banned("127.0.0.35".parse().unwrap()));
    let (reply, next) = send("127.0.0.36", "<sender@elsewhere.test>", "<alice@example.test>").await;
    assert!(reply.starts_with("554 5.7.1"), "{reply}");
    assert!(next.starts_with("421 4.7.0"), "the ban ends the session: {next}");
    assert!(s.server.is_banned("127.0.0.36".parse().unwrap()));
    assert!(s.spooled().is_empty());
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

/// PROXY `UNKNOWN` (v1) and v2 `LOCAL` are the load balancer's own health checks: a
/// greeting and the dialogue a check needs, never rate-limited, counted or banned as the
/// proxy.
#[tokio::test]
async fn proxy_health_checks_are_served_and_never_gated_or_banned() {
    let trusted: IpAddr = "127.0.0.40".parse().unwrap();
    let limits = Limits { proxy_trusted: vec![trusted], max_sessions_per_ip: 1, ..quick() };
    let s = start("", limits).await;
    // More checks than G1 (one a minute) or the per-address limit would let the proxy make.
    let mut open = Vec::new();
    for i in 0..4 {
        let mut c = Client::connect(s.addr, "127.0.0.40").await;
        if i % 2 == 0 {
            c.send("PROXY UNKNOWN\r\n").await;
        } else {
            c.w.write_all(&gatekeeper::proto::proxy_v2_local_header()).await.unwrap();
        }
        assert!(c.reply().await.starts_with("220 mx.example.test"), "check {i}");
        assert!(c.cmd("EHLO haproxy").await.starts_with("250"));
        // No client address, so no rule: no mail taken, and no ban, even for this.
        assert!(c.cmd("MAIL FROM:<nobody@example.test>").await.starts_with("451 4.3.2"));
        open.push(c);
    }
    for mut c in open {
        assert!(c.cmd("QUIT").await.starts_with("221"));
    }
    assert!(!s.server.is_banned(trusted));
    assert_eq!(s.server.stats().refused_rate.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(s.server.stats().bans.load(std::sync::atomic::Ordering::Relaxed), 0);
    s.stop().await;
}

/// An IPv4 proxy seen as `::ffff:a.b.c.d` on a `[::]` listener is still the trusted proxy, and
/// an IPv4-mapped PROXY source is its IPv4 client.
#[tokio::test]
async fn v4_mapped_proxy_matches_proxy_trusted() {
    if std::net::TcpListener::bind("[::]:0").is_err() {
        eprintln!("skipped: no IPv6 on this host, so no dual-stack listener");
        return;
    }
    let trusted: IpAddr = "127.0.0.41".parse().unwrap();
    let limits = Limits { proxy_trusted: vec![trusted], ..quick() };
    let s = start_on("[::]:0", "", limits).await;
    let mut c = Client::connect(s.addr, "127.0.0.41").await;
    // A v2 header with an IPv6 destination carries the IPv4 source as ::ffff:192.0.2.79.
    let header =
        gatekeeper::proto::proxy_v2_header("192.0.2.79:4000".parse().unwrap(), "[2001:db8::25]:25".parse().unwrap());
    c.w.write_all(&header).await.unwrap();
    assert!(c.reply().await.starts_with("220"));
    c.cmd("EHLO spam.test").await;
    assert!(c.cmd("MAIL FROM:<nobody@example.test>").await.starts_with("550 5.7.1"));
    assert!(s.server.is_banned("192.0.2.79".parse().unwrap()), "the PROXY source, as IPv4");
    assert!(!s.server.is_banned(trusted));
    // The ban is enforced on the client's next connection through the proxy.
    let mut again = Client::connect(s.addr, "127.0.0.41").await;
    again.send("PROXY TCP4 192.0.2.79 127.0.0.1 4001 25\r\n").await;
    assert!(again.reply().await.starts_with("554 5.7.1"));
    s.stop().await;
}

/// IPv6 clients are counted by the ban key (/64): the per-address session limit and the B4
/// record of one address cover its whole network.
#[tokio::test]
async fn ipv6_counts_are_per_64_like_the_bans() {
    let trusted: IpAddr = "127.0.0.42".parse().unwrap();
    let limits = Limits { proxy_trusted: vec![trusted], max_sessions_per_ip: 1, in_process_rate: false, ..quick() };
    let s = start("", limits).await;
    let via_proxy = |source: &'static str| {
        let addr = s.addr;
        async move {
            let mut c = Client::connect(addr, "127.0.0.42").await;
            let header =
                gatekeeper::proto::proxy_v2_header(source.parse().unwrap(), "[2001:db8::25]:25".parse().unwrap());
            c.w.write_all(&header).await.unwrap();
            let greeting = c.reply().await;
            (c, greeting)
        }
    };
    let (mut a, greeting) = via_proxy("[2001:db8:1:2::1]:4000").await;
    assert!(greeting.starts_with("220"), "{greeting}");
    let (_, greeting) = via_proxy("[2001:db8:1:2::2]:4000").await;
    assert!(greeting.starts_with("421 4.3.2"), "same /64, one session at a time: {greeting}");
    let (mut other, greeting) = via_proxy("[2001:db8:1:3::1]:4000").await;
    assert!(greeting.starts_with("220"), "another /64: {greeting}");
    other.cmd("QUIT").await;
    // A probe from ::1, then one from ::2 in the same /64: the repeat is banned.
    a.cmd("EHLO mx.remote.test").await;
    a.cmd("MAIL FROM:<double-bounce@remote.test>").await;
    assert!(a.cmd("RCPT TO:<q8x7z3@example.test>").await.starts_with("550 5.1.1"));
    assert!(a.cmd("QUIT").await.starts_with("221"));
    assert!(!s.server.is_banned("2001:db8:1:2::1".parse().unwrap()));
    tokio::time::sleep(Duration::from_millis(50)).await; // the first session's end is recorded
    let (mut b, greeting) = via_proxy("[2001:db8:1:2::2]:4000").await;
    assert!(greeting.starts_with("220"), "{greeting}");
    b.cmd("EHLO mx.remote.test").await;
    b.cmd("MAIL FROM:<double-bounce@remote.test>").await;
    assert!(b.cmd("RCPT TO:<other@example.test>").await.starts_with("550 5.1.1"));
    assert!(b.reply().await.starts_with("421 4.7.0"));
    assert!(s.server.is_banned("2001:db8:1:2::ffff".parse().unwrap()), "the /64 is banned");
    s.stop().await;
}

/// Issue 11: a ban is never forgotten. More bans than a kernel's `ip_list_tot` (100) are all
/// refused with 554; a G1 table too small for the traffic forgets the least recently seen
/// source (fails open for G1 only, counted) and never a ban.
#[tokio::test]
async fn bans_outlive_any_table_and_g1_overflow_fails_open_for_g1_only() {
    let limits = Limits { rate_sources_max: 4, ..quick() };
    let s = start("", limits).await;
    for i in 0..150u8 {
        s.server.ban(format!("127.0.10.{i}").parse().unwrap(), Duration::from_secs(3600));
    }
    assert_eq!(s.server.active_bans(), (150, 0));
    for i in [0u8, 1, 99, 100, 149] {
        let mut c = Client::connect(s.addr, &format!("127.0.10.{i}")).await;
        assert_eq!(code(&c.reply().await), "554", "ban of 127.0.10.{i}");
    }
    // Five fresh sources through a four-entry G1 table: the fifth forgets the first while it
    // is still inside its window, so the first gets in again — counted, and only G1's loss.
    for i in 1..=5u8 {
        let mut c = Client::connect(s.addr, &format!("127.0.11.{i}")).await;
        assert_eq!(code(&c.reply().await), "220");
        c.cmd("QUIT").await;
    }
    assert_eq!(s.server.stats().rate_overflow.load(std::sync::atomic::Ordering::Relaxed), 1);
    let mut again = Client::connect(s.addr, "127.0.11.1").await;
    assert_eq!(code(&again.reply().await), "220", "forgotten by the full G1 table");
    let mut held = Client::connect(s.addr, "127.0.11.5").await;
    assert_eq!(code(&held.reply().await), "421", "still remembered: one per window");
    let mut banned = Client::connect(s.addr, "127.0.10.0").await;
    assert_eq!(code(&banned.reply().await), "554", "the ban outlives every G1 eviction");
    s.stop().await;
}

/// B4's share test over TCP: an MTA whose recipients are mostly valid (here 10 valid, then 2
/// typos in the same transaction: 17 % unknown) gets its 550s and goes on, unbanned, and its
/// message is delivered; a second client with the same two unknown recipients and no valid
/// ones is a dictionary attacker and is banned.
#[tokio::test]
async fn b4_spares_an_mta_whose_recipients_are_mostly_valid() {
    let s = start("", quick()).await;
    let mut c = Client::connect(s.addr, "127.0.0.40").await;
    c.reply().await;
    c.cmd("EHLO big-provider.test").await;
    c.cmd("MAIL FROM:<list@big-provider.test>").await;
    for i in 0..10 {
        let user = if i % 2 == 0 { "alice" } else { "bob" };
        assert_eq!(code(&c.cmd(&format!("RCPT TO:<{user}+{i}@example.test>")).await), "250");
    }
    assert!(c.cmd("RCPT TO:<alcie@example.test>").await.starts_with("550 5.1.1"));
    assert!(c.cmd("RCPT TO:<bbo@example.test>").await.starts_with("550 5.1.1"));
    assert!(!s.server.is_banned("127.0.0.40".parse().unwrap()), "mostly valid recipients: no B4");
    assert_eq!(code(&c.cmd("DATA").await), "354");
    assert_eq!(code(&c.cmd("Subject: news\r\n\r\nhello\r\n.").await), "250");
    c.cmd("QUIT").await;
    assert_eq!(s.spooled().len(), 1);

    let mut d = Client::connect(s.addr, "127.0.0.41").await;
    d.reply().await;
    d.cmd("EHLO spam.test").await;
    d.cmd("MAIL FROM:<list@spam.test>").await;
    assert!(d.cmd("RCPT TO:<alcie@example.test>").await.starts_with("550 5.1.1"));
    assert!(d.cmd("RCPT TO:<bbo@example.test>").await.starts_with("550 5.1.1"));
    assert!(s.server.is_banned("127.0.0.41".parse().unwrap()));
    s.stop().await;
}

/// Files in the Maildir's tmp/.
fn tmp_files(maildir: &Path) -> usize {
    std::fs::read_dir(maildir.join("tmp")).unwrap().count()
}

#[tokio::test]
async fn messages_stream_into_tmp_and_nothing_is_left_behind() {
    let s = start("[smtp]\nsize_max = 100000\n", quick()).await;
    let mut c = Client::connect(s.addr, "127.0.0.50").await;
    c.reply().await;
    c.cmd("EHLO client.test").await;
    c.cmd("MAIL FROM:<>").await;
    c.cmd("RCPT TO:<alice@example.test>").await;
    assert_eq!(code(&c.cmd("DATA").await), "354");
    // Part of the message is in tmp/ before its end is sent: it is written as it arrives.
    c.send("Subject: streamed\r\n\r\nfirst part\r\n").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let file = loop {
        let found = std::fs::read_dir(s.maildir.join("tmp")).unwrap().next().map(|e| e.unwrap().path());
        if let Some(path) = found
            && std::fs::read_to_string(&path).unwrap().ends_with("first part\r\n")
        {
            break path;
        }
        assert!(tokio::time::Instant::now() < deadline, "the first part never reached tmp/");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(file.is_file());
    let reply = c.cmd("second part\r\n.").await;
    assert!(reply.starts_with("250 "), "{reply}");
    assert_eq!(tmp_files(&s.maildir), 0, "renamed into new/");
    assert!(s.spooled()[0].ends_with("Subject: streamed\r\n\r\nfirst part\r\nsecond part\r\n"));
    // Too big: 552, and its partial file is removed.
    c.cmd("MAIL FROM:<>").await;
    c.cmd("RCPT TO:<alice@example.test>").await;
    c.cmd("DATA").await;
    let line = format!("{}\r\n", "x".repeat(900));
    for _ in 0..150 {
        c.send(&line).await;
    }
    assert_eq!(code(&c.cmd(".").await), "552");
    assert_eq!(tmp_files(&s.maildir), 0);
    // A connection lost in the middle of a message: its file is removed too.
    c.cmd("MAIL FROM:<>").await;
    c.cmd("RCPT TO:<alice@example.test>").await;
    c.cmd("DATA").await;
    c.send("Subject: cut\r\n\r\nhalf\r\n").await;
    drop(c);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tmp_files(&s.maildir) != 0 {
        assert!(tokio::time::Instant::now() < deadline, "a cut message stayed in tmp/");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.spooled().len(), 1);
    s.stop().await;
}

#[tokio::test]
async fn below_queue_minfree_mail_gets_452() {
    // More free space than any disk has: always below the threshold.
    let s = start("", Limits { queue_minfree: u64::MAX, ..quick() }).await;
    let mut c = Client::connect(s.addr, "127.0.0.51").await;
    c.reply().await;
    c.cmd("EHLO client.test").await;
    assert_eq!(c.cmd("MAIL FROM:<>").await, "452 4.3.1 Insufficient system storage, try again later\r\n");
    assert_eq!(code(&c.cmd("NOOP").await), "250", "the session goes on");
    assert_eq!(code(&c.cmd("QUIT").await), "221");
    assert!(s.spooled().is_empty());
    s.stop().await;
}

/// Issue 12: messages per client are bounded across its sessions (`smtp.client_messages_max`
/// per hour): past the limit, MAIL gets 451 4.7.1 in every new session, while another client
/// is served as usual.
#[tokio::test]
async fn messages_per_client_are_bounded_across_sessions() {
    let s = start("[smtp]\nclient_messages_max = 2\n", Limits { in_process_rate: false, ..quick() }).await;
    let session = |source: &'static str, messages: usize| {
        let addr = s.addr;
        async move {
            let mut c = Client::connect(addr, source).await;
            assert!(c.reply().await.starts_with("220"));
            c.cmd("EHLO client.test").await;
            let mut replies = Vec::new();
            for _ in 0..messages {
                let mail = c.cmd("MAIL FROM:<x@elsewhere.test>").await;
                replies.push(code(&mail).to_string());
                if !mail.starts_with("250") {
                    continue;
                }
                c.cmd("RCPT TO:<alice@example.test>").await;
                c.cmd("DATA").await;
                replies.push(code(&c.cmd("Subject: m\r\n\r\nx\r\n.").await).to_string());
            }
            assert_eq!(code(&c.cmd("QUIT").await), "221");
            replies
        }
    };
    assert_eq!(session("127.0.0.60", 1).await, ["250", "250"]);
    // The second session may give one more; the third MAIL is over the limit.
    assert_eq!(session("127.0.0.60", 2).await, ["250", "250", "451"]);
    assert_eq!(session("127.0.0.60", 1).await, ["451"]);
    assert_eq!(session("127.0.0.61", 1).await, ["250", "250"], "another client is not affected");
    assert_eq!(s.spooled().len(), 3);
    assert!(!s.server.is_banned("127.0.0.60".parse().unwrap()));
    s.stop().await;
}

/// Issue 12: refused connections count. They take no session slot, at most `max_refused` are
/// held (each at most `REFUSED_WAIT`), and one more gets 421 and is closed at once, while an
/// honest client is still served.
#[tokio::test]
async fn refused_connections_are_capped_and_short() {
    let limits = Limits { max_sessions: 2, max_refused: 3, ..quick() };
    let s = start("", limits).await;
    s.server.ban("127.0.0.60".parse().unwrap(), Duration::from_secs(3600));
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(s.addr, "127.0.0.60").await;
        assert_eq!(code(&c.reply().await), "554");
        held.push(c);
    }
    // Over max_refused: a 421 and the connection is closed, without waiting for the client.
    let mut over = Client::connect(s.addr, "127.0.0.60").await;
    assert_eq!(over.reply().await, "421 4.3.2 mx.example.test Too busy, try again later\r\n");
    assert_eq!(over.reply().await, "", "closed");
    // The session slots are all free for honest clients.
    let mut honest = Client::connect(s.addr, "127.0.0.61").await;
    assert_eq!(code(&honest.reply().await), "220");
    let mut other = Client::connect(s.addr, "127.0.0.62").await;
    assert_eq!(code(&other.reply().await), "220");
    // The refused ones are closed (421) without a QUIT, however they behave.
    held[0].send("NOOP\r\n").await;
    assert_eq!(code(&held[0].reply().await), "503");
    for c in &mut held {
        assert!(c.reply().await.starts_with("421 4.4.2"));
        assert_eq!(c.reply().await, "", "closed");
    }
    // Their places are free again.
    let mut again = Client::connect(s.addr, "127.0.0.60").await;
    assert_eq!(code(&again.reply().await), "554");
    assert_eq!(code(&honest.cmd("QUIT").await), "221");
    s.stop().await;
}
