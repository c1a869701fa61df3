//! The milter over loopback TCP, driven as Postfix's smtpd drives it (the milter8 protocol,
//! version 6: negotiation, macros, connect, HELO, envelope, headers, body in chunks, end of
//! message). The verdicts, scans and bans are the SMTP server's: the same session, scanner
//! and ban table. (ci/postfix-integration.sh runs the same milter behind a real Postfix.)

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use gatekeeper::edges::{Clock, MaildirSpool, SystemClock};
use gatekeeper::front::MilterService;
use gatekeeper::front::milter::{CHUNK_MAX, Command, Family};
use gatekeeper::scan::{EICAR, EICAR_NAME};
use gatekeeper::server::Server;
use gatekeeper::testing;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Running {
    addr: SocketAddr,
    server: Server,
    files: PathBuf,
    _dir: tempfile::TempDir,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let settings = testing::settings("[rules]\nscan = true\n");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let spool = MaildirSpool::open(dir.path().join("maildir"), "mx.example.test", clock.clone(), true).unwrap();
    let scanner = settings.config.scan.build(settings.config.rules.on_scan_failure, clock.clone()).unwrap();
    let server = Server::builder(settings.session.clone(), settings.directory.clone(), Arc::new(spool))
        .clock(clock)
        .gate(settings.config.gate.clone())
        .scanner(scanner)
        .build();
    let files = dir.path().join("milter");
    std::fs::create_dir(&files).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = MilterService::new(server.clone(), settings.config.milter.clone(), files.clone());
    tokio::spawn(async move { service.run(listener, std::future::pending()).await });
    Running { addr, server, files, _dir: dir }
}

/// The MTA side: Postfix's smtpd talking to its milter.
struct Mta {
    stream: TcpStream,
}

impl Mta {
    /// Connects and negotiates as Postfix 3.7 does (version 6, every action, every step).
    async fn connect(addr: SocketAddr) -> Mta {
        let mut mta = Mta { stream: TcpStream::connect(addr).await.unwrap() };
        let (code, data) = mta.ask(&Command::OptNeg { version: 6, actions: 0x1ff, protocol: 0x1f_ffff }).await;
        assert_eq!(code, b'O');
        assert_eq!(data.len(), 12);
        assert_eq!(&data[..8], &[0, 0, 0, 6, 0, 0, 0, 0], "version 6, no actions");
        mta
    }

    async fn send(&mut self, c: &Command) {
        self.stream.write_all(&c.encode()).await.unwrap();
    }

    async fn response(&mut self) -> (u8, Vec<u8>) {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).await.unwrap();
        let mut packet = vec![0u8; u32::from_be_bytes(len) as usize];
        self.stream.read_exact(&mut packet).await.unwrap();
        (packet[0], packet[1..].to_vec())
    }

    async fn ask(&mut self, c: &Command) -> (u8, Vec<u8>) {
        self.send(c).await;
        self.response().await
    }

    /// A command that gets a reply: `"continue"`, `"accept"` or the reply code's text.
    async fn verdict(&mut self, c: &Command) -> String {
        match self.ask(c).await {
            (b'c', d) if d.is_empty() => "continue".into(),
            (b'a', d) if d.is_empty() => "accept".into(),
            (b'y', d) => {
                assert_eq!(d.last(), Some(&0), "NUL-terminated");
                String::from_utf8(d[..d.len() - 1].to_vec()).unwrap()
            }
            (code, d) => panic!("unexpected response {:?} {d:?}", char::from(code)),
        }
    }

    /// Macros, then the connect event of `client`.
    async fn client(&mut self, client: &str) -> String {
        self.send(&Command::Macro {
            stage: b'C',
            macros: vec![("j".into(), "mx.example.test".into()), ("{daemon_name}".into(), "mx".into())],
        })
        .await;
        self.verdict(&Command::Connect {
            hostname: format!("[{client}]"),
            family: Family::Inet,
            port: 40000,
            address: client.into(),
        })
        .await
    }

    /// HELO, MAIL and one RCPT; the first refusal, or `"continue"`.
    async fn envelope(&mut self, from: &str, to: &str) -> String {
        for c in [
            Command::Helo("client.test".into()),
            Command::Mail(vec![format!("<{from}>"), "BODY=8BITMIME".into(), "SIZE=100".into()]),
            Command::Rcpt(vec![format!("<{to}>"), "NOTIFY=NEVER".into()]),
        ] {
            let v = self.verdict(&c).await;
            if v != "continue" {
                return v;
            }
        }
        "continue".into()
    }

    /// DATA, the headers and the body as Postfix sends them (no replies to headers, end of
    /// headers and body chunks, as negotiated), then the end of message: its verdict.
    async fn message(&mut self, body: &[u8]) -> String {
        self.send(&Command::Macro { stage: b'T', macros: vec![("i".into(), "4ABCD".into())] }).await;
        let v = self.verdict(&Command::Data).await;
        if v != "continue" {
            return v;
        }
        for (name, value) in [("From", " <x@elsewhere.test>"), ("Subject", " test\r\n\tfolded"), ("X-Empty", "")] {
            self.send(&Command::Header { name: name.into(), value: value.into() }).await;
        }
        self.send(&Command::Eoh).await;
        for chunk in body.chunks(CHUNK_MAX) {
            self.send(&Command::Body(chunk.to_vec())).await;
        }
        self.send(&Command::Macro { stage: b'E', macros: vec![("i".into(), "4ABCD".into())] }).await;
        self.verdict(&Command::EndOfBody(Vec::new())).await
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn eicar_body() -> Vec<u8> {
    let mut b = b"Here it is:\r\n".to_vec();
    b.extend_from_slice(EICAR);
    b.extend_from_slice(b"\r\n");
    b
}

#[tokio::test]
async fn forged_local_sender_is_refused_and_banned() {
    let gk = start().await;
    let mut mta = Mta::connect(gk.addr).await;
    assert_eq!(mta.client("192.0.2.1").await, "continue");
    assert_eq!(
        mta.envelope("nobody@example.test", "alice@example.test").await,
        "550 5.7.1 Sender is not a user of this domain"
    );
    assert!(gk.server.is_banned(ip("192.0.2.1")), "B1");
    // The rest of that connection: 421 (the MTA disconnects its client).
    let v = mta.verdict(&Command::Mail(vec!["<someone@elsewhere.test>".into()])).await;
    assert!(v.starts_with("421 4.7.0 ") && v.contains("banned"), "{v}");
    mta.send(&Command::Quit).await;
    // Its next connection: 421 at connect.
    let mut mta = Mta::connect(gk.addr).await;
    let v = mta.client("192.0.2.1").await;
    assert!(v.starts_with("421 4.7.0 ") && v.contains("banned"), "{v}");
}

#[tokio::test]
async fn eicar_is_refused_at_the_end_of_the_message_and_banned() {
    let gk = start().await;
    let mut mta = Mta::connect(gk.addr).await;
    assert_eq!(mta.client("192.0.2.2").await, "continue");
    assert_eq!(mta.envelope("sender@elsewhere.test", "alice@example.test").await, "continue");
    let v = mta.message(&eicar_body()).await;
    assert!(v.starts_with("554 5.7.1 ") && v.contains(EICAR_NAME), "{v}");
    assert!(gk.server.is_banned(ip("192.0.2.2")), "B3");
    assert_eq!(std::fs::read_dir(&gk.files).unwrap().count(), 0, "no message file left behind");
}

#[tokio::test]
async fn eicar_from_the_null_sender_is_refused_not_banned() {
    let gk = start().await;
    let mut mta = Mta::connect(gk.addr).await;
    assert_eq!(mta.client("192.0.2.3").await, "continue");
    assert_eq!(mta.envelope("", "alice@example.test").await, "continue");
    let v = mta.message(&eicar_body()).await;
    assert!(v.starts_with("554 5.7.1 ") && v.contains(EICAR_NAME), "{v}");
    assert!(!gk.server.is_banned(ip("192.0.2.3")), "a bounce carrying a virus is not banned");
    // The connection goes on: a clean message after it is accepted.
    mta.send(&Command::Abort).await;
    assert_eq!(mta.envelope("", "bob@example.test").await, "continue");
    assert_eq!(mta.message(b"a clean bounce\r\n").await, "continue");
}

#[tokio::test]
async fn clean_messages_are_accepted_big_dotted_and_several_per_connection() {
    let gk = start().await;
    let mut mta = Mta::connect(gk.addr).await;
    assert_eq!(mta.client("192.0.2.4").await, "continue");
    assert_eq!(mta.envelope("news@elsewhere.test", "alice@example.test").await, "continue");
    // Lines that start with a dot (one alone ends SMTP data unless stuffed), a body over
    // several chunks, no final line break.
    let mut body = b"hello\r\n.\r\n..two dots\r\n.\r\n".to_vec();
    while body.len() < 3 * CHUNK_MAX {
        body.extend_from_slice(b"a line of text, the same again and again and again\r\n");
    }
    body.extend_from_slice(b"no line break at the end");
    assert_eq!(mta.message(&body).await, "continue");
    // A second message on the same connection; an unknown recipient in it is refused.
    assert_eq!(mta.verdict(&Command::Mail(vec!["<news@elsewhere.test>".into()])).await, "continue");
    assert_eq!(mta.verdict(&Command::Rcpt(vec!["<bob@example.test>".into()])).await, "continue");
    assert_eq!(mta.message(b"second\r\n").await, "continue");
    assert!(!gk.server.is_banned(ip("192.0.2.4")));
    assert_eq!(std::fs::read_dir(&gk.files).unwrap().count(), 0, "no message file left behind");
    mta.send(&Command::Quit).await;
}

#[tokio::test]
async fn a_client_without_an_address_is_not_judged_and_garbage_closes() {
    let gk = start().await;
    let mut mta = Mta::connect(gk.addr).await;
    let v = mta
        .verdict(&Command::Connect {
            hostname: "localhost".into(),
            family: Family::Unknown,
            port: 0,
            address: String::new(),
        })
        .await;
    assert_eq!(v, "accept");
    // An unknown command closes the connection (as libmilter does).
    let mut mta = Mta::connect(gk.addr).await;
    mta.stream.write_all(b"\0\0\0\x01Z").await.unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(mta.stream.read(&mut buf).await.unwrap(), 0, "closed");
}
