//! The Postfix policy service over loopback TCP, driven as Postfix's smtpd drives it: one
//! connection reused for many requests (pipelined too), `instance` per message. The verdicts,
//! bans and per-client counts are the SMTP server's: the same session, tallies and ban table.
//! (ci/postfix-integration.sh runs the same service behind a real Postfix.)

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use gatekeeper::edges::{BoxFuture, Clock, MaildirSpool, SystemClock, Verifier};
use gatekeeper::front::{PolicyService, Request};
use gatekeeper::policy::Verification;
use gatekeeper::proto::Mailbox;
use gatekeeper::server::Server;
use gatekeeper::testing;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A callback verifier whose probes take `delay` and then find `result`: the remote MX is the
/// edge here; the verdict on its finding is the rules'.
#[derive(Debug)]
struct Remote {
    delay: Duration,
    result: Verification,
}

impl Verifier for Remote {
    fn verify<'a>(&'a self, _sender: &'a Mailbox) -> BoxFuture<'a, Verification> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.result.clone()
        })
    }
}

struct Running {
    addr: SocketAddr,
    server: Server,
    _dir: tempfile::TempDir,
}

async fn start(extra: &str, verifier: Option<Remote>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let settings = testing::settings(extra);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let spool = MaildirSpool::open(dir.path().join("maildir"), "mx.example.test", clock.clone(), true).unwrap();
    let mut builder = Server::builder(settings.session.clone(), settings.directory.clone(), Arc::new(spool))
        .clock(clock)
        .gate(settings.config.gate.clone());
    if let Some(v) = verifier {
        builder = builder.verifier(Arc::new(v));
    }
    let server = builder.build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = PolicyService::new(server.clone(), settings.config.postfix_policy.clone());
    tokio::spawn(async move { service.run(listener, std::future::pending()).await });
    Running { addr, server, _dir: dir }
}

struct Smtpd {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Smtpd {
    async fn connect(addr: SocketAddr) -> Smtpd {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        Smtpd { r: BufReader::new(r), w }
    }

    async fn send(&mut self, wire: &[u8]) {
        self.w.write_all(wire).await.unwrap();
    }

    /// One answer: its `action=` value.
    async fn answer(&mut self) -> String {
        let mut action = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            assert!(self.r.read_line(&mut line).await.unwrap() > 0, "connection closed");
            let l = line.trim_end_matches('\n');
            if l.is_empty() {
                return action;
            }
            action = l.strip_prefix("action=").expect("only action= lines").to_string();
        }
    }

    async fn ask(&mut self, req: &Request) -> String {
        self.send(&req.encode()).await;
        self.answer().await
    }
}

/// A request as Postfix's smtpd sends it at `state`, with attributes the service ignores.
fn request(state: &str, instance: &str, client: &str, sender: &str, recipient: &str) -> Request {
    Request::from_pairs([
        ("request", "smtpd_access_policy"),
        ("protocol_state", state),
        ("protocol_name", "ESMTP"),
        ("client_address", client),
        ("client_name", "unknown"),
        ("reverse_client_name", "unknown"),
        ("helo_name", "client.test"),
        ("sender", sender),
        ("recipient", recipient),
        ("recipient_count", "0"),
        ("queue_id", ""),
        ("instance", instance),
        ("size", "0"),
        ("etrn_domain", ""),
        ("stress", ""),
        ("sasl_method", ""),
        ("ccert_subject", ""),
        ("encryption_protocol", ""),
        ("policy_context", ""),
        ("server_address", "127.0.0.1"),
        ("server_port", "25"),
        ("compatibility_level", "3.6"),
        ("mail_version", "3.7.11"),
    ])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn verdicts_and_bans_are_the_front_ends_on_one_reused_connection() {
    let gk = start("", None).await;
    let mut smtpd = Smtpd::connect(gk.addr).await;
    // E1: a forged local sender, 550 and B1.
    let a = smtpd.ask(&request("RCPT", "a.1", "192.0.2.1", "nobody@example.test", "alice@example.test")).await;
    assert_eq!(a, "550 5.7.1 Sender is not a user of this domain");
    assert!(gk.server.is_banned(ip("192.0.2.1")));
    // The next request of that client, in this message or any other: 421 (Postfix disconnects).
    let a = smtpd.ask(&request("RCPT", "a.1", "192.0.2.1", "nobody@example.test", "bob@example.test")).await;
    assert!(a.starts_with("421 4.7.0 ") && a.contains("banned"), "{a}");
    // E2: <> to an unknown user, 550 5.1.1 and no ban; a valid one: DUNNO.
    let a = smtpd.ask(&request("RCPT", "b.1", "192.0.2.2", "", "nobody@example.test")).await;
    assert!(a.starts_with("550 5.1.1 "), "{a}");
    let a = smtpd.ask(&request("RCPT", "b.1", "192.0.2.2", "", "alice@example.test")).await;
    assert_eq!(a, "DUNNO");
    assert!(!gk.server.is_banned(ip("192.0.2.2")));
    // No relay: 554 5.7.1 and no ban. Other states: DUNNO.
    let a = smtpd.ask(&request("RCPT", "c.1", "192.0.2.3", "x@elsewhere.test", "y@elsewhere.test")).await;
    assert!(a.starts_with("554 5.7.1 "), "{a}");
    assert_eq!(smtpd.ask(&request("CONNECT", "", "192.0.2.3", "", "")).await, "DUNNO");
    assert!(!gk.server.is_banned(ip("192.0.2.3")));
}

/// DATA after an unknown recipient that bans nobody (here a raised B4 threshold; also observe
/// mode, the share test, an allowlisted client): the session's 354 is DUNNO to Postfix, never
/// `action=354` (which Postfix answers 451 4.3.5, deferring honest mail at every retry).
#[tokio::test]
async fn data_that_decides_nothing_is_dunno() {
    let gk = start("[rules]\nb4_threshold = 5\n", None).await;
    let mut smtpd = Smtpd::connect(gk.addr).await;
    let client = "192.0.2.40";
    let a = smtpd.ask(&request("RCPT", "d.1", client, "someone@remote.test", "zz9@example.test")).await;
    assert!(a.starts_with("550 5.1.1 "), "{a}");
    let a = smtpd.ask(&request("RCPT", "d.1", client, "someone@remote.test", "alice@example.test")).await;
    assert_eq!(a, "DUNNO");
    assert_eq!(smtpd.ask(&request("DATA", "d.1", client, "someone@remote.test", "")).await, "DUNNO");
    assert!(!gk.server.is_banned(ip(client)));
}

#[tokio::test]
async fn pipelined_and_malformed_requests_are_answered_in_order() {
    let gk = start("", None).await;
    let mut smtpd = Smtpd::connect(gk.addr).await;
    let mut wire = request("RCPT", "p.1", "192.0.2.10", "", "alice@example.test").encode();
    wire.extend_from_slice(b"this is not an attribute\n\n");
    wire.extend_from_slice(b"request=something_else\n\n");
    wire.extend(request("RCPT", "p.2", "192.0.2.11", "", "nobody@example.test").encode());
    smtpd.send(&wire).await;
    assert_eq!(smtpd.answer().await, "DUNNO");
    assert!(smtpd.answer().await.starts_with("DEFER_IF_PERMIT 4.3.5 Policy service: malformed request"));
    assert!(smtpd.answer().await.starts_with("DEFER_IF_PERMIT 4.3.5 Policy service: unknown request type"));
    assert!(smtpd.answer().await.starts_with("550 5.1.1 "));
    // A request with no client address to judge: DUNNO.
    assert_eq!(smtpd.ask(&request("RCPT", "p.3", "unknown", "a@b.test", "alice@example.test")).await, "DUNNO");
}

#[tokio::test]
async fn b4_counts_per_client_across_messages_with_the_probe_exemption() {
    let gk = start("", None).await;
    let mut smtpd = Smtpd::connect(gk.addr).await;
    let client = "192.0.2.20";
    // A probe-shaped message (one unknown recipient, no DATA): 550, no ban.
    let a = smtpd.ask(&request("RCPT", "q.1", client, "double-bounce@remote.test", "zz1@example.test")).await;
    assert!(a.starts_with("550 5.1.1 "), "{a}");
    // The next message of the same client (a new instance ends the previous one).
    let a = smtpd.ask(&request("RCPT", "q.2", client, "double-bounce@remote.test", "alice@example.test")).await;
    assert_eq!(a, "DUNNO");
    assert!(!gk.server.is_banned(ip(client)));
    // Its next unknown recipient within the window counts with the probe: B4.
    let a = smtpd.ask(&request("RCPT", "q.3", client, "double-bounce@remote.test", "zz2@example.test")).await;
    assert!(a.starts_with("550 5.1.1 "), "{a}");
    assert!(gk.server.is_banned(ip(client)));

    // DATA after a first unknown recipient is no probe: 421 and B4 (smtpd_data_restrictions).
    let client = "192.0.2.21";
    let a = smtpd.ask(&request("RCPT", "r.1", client, "someone@remote.test", "zz3@example.test")).await;
    assert!(a.starts_with("550 5.1.1 "), "{a}");
    let a = smtpd.ask(&request("RCPT", "r.1", client, "someone@remote.test", "alice@example.test")).await;
    assert_eq!(a, "DUNNO");
    assert!(!gk.server.is_banned(ip(client)));
    let a = smtpd.ask(&request("DATA", "r.1", client, "someone@remote.test", "")).await;
    assert!(a.starts_with("421 4.7.0 "), "{a}");
    assert!(gk.server.is_banned(ip(client)));
}

#[tokio::test]
async fn callbacks_decide_c1_and_a_slow_one_is_deferred_in_time() {
    let invalid = Verification::Invalid { evidence: "550 5.1.1 no such user".into() };
    let gk = start("[rules]\nverify_senders = true\n", Some(Remote { delay: Duration::ZERO, result: invalid })).await;
    let mut smtpd = Smtpd::connect(gk.addr).await;
    let a = smtpd.ask(&request("RCPT", "v.1", "192.0.2.30", "fake@remote.test", "alice@example.test")).await;
    assert_eq!(a, "550 5.1.7 Sender address rejected: it does not exist at its domain");
    assert!(gk.server.is_banned(ip("192.0.2.30")), "B2");

    let valid = Verification::Valid { evidence: "250".into() };
    let slow = Remote { delay: Duration::from_secs(60), result: valid };
    let gk = start("[rules]\nverify_senders = true\n[postfix_policy]\ntimeout = \"1s\"\n", Some(slow)).await;
    let mut smtpd = Smtpd::connect(gk.addr).await;
    let a = smtpd.ask(&request("RCPT", "w.1", "192.0.2.31", "slow@remote.test", "alice@example.test")).await;
    assert!(a.starts_with("DEFER_IF_PERMIT 4.4.3 "), "{a}");
    // The connection goes on.
    let a = smtpd.ask(&request("RCPT", "w.2", "192.0.2.32", "", "alice@example.test")).await;
    assert_eq!(a, "DUNNO");
}

/// `listen = "unix:/path"`: the same service over a Unix-domain socket (mode 0660), as Postfix's
/// `check_policy_service unix:/path` reaches it.
#[tokio::test]
async fn serves_over_a_unix_socket() {
    use std::os::unix::fs::PermissionsExt;
    let gk = start("", None).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.sock");
    let listener =
        tokio::net::UnixListener::from_std(gatekeeper::front::bind_unix(&path, None, None).unwrap()).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o660);
    let service = PolicyService::new(gk.server.clone(), gatekeeper::front::PolicySection::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        service
            .run(listener, async {
                let _ = stopped.await;
            })
            .await
    });
    let (r, mut w) = tokio::net::UnixStream::connect(&path).await.unwrap().into_split();
    let mut r = BufReader::new(r);
    let mut ask = async |req: Request| {
        w.write_all(&req.encode()).await.unwrap();
        let (mut answer, mut line) = (String::new(), String::new());
        loop {
            line.clear();
            assert!(r.read_line(&mut line).await.unwrap() > 0, "connection closed");
            match line.trim_end_matches('\n') {
                "" => return answer,
                l => answer = l.to_string(),
            }
        }
    };
    let a = ask(request("RCPT", "u.1", "192.0.2.61", "nobody@example.test", "alice@example.test")).await;
    assert_eq!(a, "action=550 5.7.1 Sender is not a user of this domain");
    assert!(gk.server.is_banned(ip("192.0.2.61")));
    let a = ask(request("RCPT", "u.2", "192.0.2.62", "news@elsewhere.test", "alice@example.test")).await;
    assert_eq!(a, "action=DUNNO");
    stop.send(()).unwrap();
    serving.await.unwrap().unwrap();
}
