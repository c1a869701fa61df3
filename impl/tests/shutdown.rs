//! Shutdown's hard deadline over loopback (issue 12): after the grace period, a hand-off that
//! can finish within `shutdown_hard` is finished (250, then 421); a session stuck on a hand-off
//! that never returns is dropped at the deadline, unacknowledged, and `Server::run` returns.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gatekeeper::edges::{BoxFuture, Clock, Downstream, MaildirSpool, MessageFile, SystemClock};
use gatekeeper::server::{Limits, Server};
use gatekeeper::session::{DeliveryError, Envelope};
use gatekeeper::testing;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

/// The Maildir spool, with a hand-off that waits `delay` first (`None`: forever).
#[derive(Debug)]
struct Slow {
    spool: MaildirSpool,
    delay: Option<Duration>,
    /// Told when a hand-off begins.
    began: std::sync::Mutex<Option<oneshot::Sender<()>>>,
}

impl Downstream for Slow {
    fn create(&self, envelope: &Envelope) -> io::Result<MessageFile> {
        self.spool.create(envelope)
    }
    fn deliver<'a>(
        &'a self,
        envelope: &'a Envelope,
        message: MessageFile,
    ) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            if let Some(tx) = self.began.lock().unwrap().take() {
                let _ = tx.send(());
            }
            match self.delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending::<()>().await,
            }
            self.spool.deliver(envelope, message).await
        })
    }
}

struct Running {
    addr: SocketAddr,
    maildir: PathBuf,
    began: oneshot::Receiver<()>,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<io::Result<()>>,
    _dir: tempfile::TempDir,
}

async fn start(delay: Option<Duration>, limits: Limits) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let settings = testing::settings("");
    let maildir = dir.path().join("maildir");
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let spool = MaildirSpool::open(&maildir, "mx.example.test", clock.clone(), true).unwrap();
    let (tx, began) = oneshot::channel();
    let slow = Slow { spool, delay, began: std::sync::Mutex::new(Some(tx)) };
    let server = Server::builder(settings.session.clone(), settings.directory.clone(), Arc::new(slow))
        .clock(clock)
        .gate(settings.config.gate.clone())
        .limits(limits)
        .build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        server
            .run(listener, async {
                let _ = rx.await;
            })
            .await
    });
    Running { addr, maildir, began, stop, done, _dir: dir }
}

fn spooled(maildir: &std::path::Path) -> usize {
    std::fs::read_dir(maildir.join("new")).map_or(0, |d| d.count())
}

/// Sends a message up to its final dot and returns the client, its reply still to come.
async fn send_until_the_dot(addr: SocketAddr) -> BufReader<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut c = BufReader::new(stream);
    read_reply(&mut c).await;
    for cmd in ["EHLO client.test", "MAIL FROM:<bob@example.org>", "RCPT TO:<alice@example.test>", "DATA"] {
        c.get_mut().write_all(format!("{cmd}\r\n").as_bytes()).await.unwrap();
        read_reply(&mut c).await;
    }
    c.get_mut().write_all(b"Subject: t\r\n\r\nhello\r\n.\r\n").await.unwrap();
    c
}

/// One reply's last line; "" on EOF.
async fn read_reply(c: &mut BufReader<tokio::net::TcpStream>) -> String {
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), c.read_line(&mut line)).await.unwrap().unwrap_or(0);
        if n == 0 || line.as_bytes().get(3) != Some(&b'-') {
            return line.trim_end().to_string();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_under_way_is_finished_before_the_hard_deadline() {
    let limits = Limits {
        shutdown_grace: Duration::from_millis(10),
        shutdown_hard: Duration::from_secs(30),
        ..Limits::default()
    };
    let mut s = start(Some(Duration::from_millis(300)), limits).await;
    let mut c = send_until_the_dot(s.addr).await;
    (&mut s.began).await.unwrap();
    let _ = s.stop.send(());
    assert!(read_reply(&mut c).await.starts_with("250"), "the hand-off was finished and acknowledged");
    assert!(read_reply(&mut c).await.starts_with("421"));
    s.done.await.unwrap().unwrap();
    assert_eq!(spooled(&s.maildir), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_off_that_never_returns_is_dropped_at_the_hard_deadline() {
    let limits = Limits {
        shutdown_grace: Duration::from_millis(10),
        shutdown_hard: Duration::from_millis(200),
        ..Limits::default()
    };
    let mut s = start(None, limits).await;
    let mut c = send_until_the_dot(s.addr).await;
    (&mut s.began).await.unwrap();
    let _ = s.stop.send(());
    // Without the deadline this would wait forever (the outer timeout fails the test instead).
    tokio::time::timeout(Duration::from_secs(60), s.done).await.expect("run returns").unwrap().unwrap();
    assert_eq!(read_reply(&mut c).await, "", "dropped without a 250: the client will send it again");
    assert_eq!(spooled(&s.maildir), 0);
}
