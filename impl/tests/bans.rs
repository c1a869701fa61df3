//! Bans end to end over loopback: the real server with the ban manager as its sink, a B1 ban
//! persisted in SQLite, a restarted server that still refuses the client, and the `gatekeeper
//! bans` / `firewall` / `model-replay` commands (run as the real binary) while it serves.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use gatekeeper::ban::BanManager;
use gatekeeper::config::{Config, Overrides, Settings};
use gatekeeper::edges::{MaildirSpool, SystemClock};
use gatekeeper::policy::BanReason;
use gatekeeper::server::{Limits, Server};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

const BIN: &str = env!("CARGO_BIN_EXE_gatekeeper");

struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    done: tokio::task::JoinHandle<std::io::Result<()>>,
    maintenance: tokio::task::JoinHandle<()>,
}

/// What `gatekeeper serve` does, on loopback.
async fn serve(settings: &Settings) -> (Running, BanManager) {
    let c = &settings.config;
    let clock = Arc::new(SystemClock);
    let spool = MaildirSpool::open(c.server.state_dir.join("maildir"), "mx.example.test", clock.clone(), true).unwrap();
    let manager = BanManager::open(&c.bans, &c.gate, &c.server.state_dir, clock.clone(), true).unwrap();
    let server = Server::builder(settings.session.clone(), settings.directory.clone(), Arc::new(spool))
        .clock(clock)
        .gate(c.gate.clone())
        .limits(Limits { shutdown_grace: Duration::from_millis(100), ..Limits::default() })
        .ban_sink(Arc::new(manager.clone()))
        .build();
    manager.attach_mirror(Arc::new(server.clone()));
    manager.restore().await.unwrap();
    let maintenance = tokio::spawn(manager.clone().run(std::future::pending()));
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
    (Running { addr, stop, done, maintenance }, manager)
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        self.done.await.unwrap().unwrap();
        self.maintenance.abort();
    }
}

/// Connects from `source`, sends `lines`, returns every reply's first line.
async fn dialogue(server: SocketAddr, source: &str, lines: &[&str]) -> Vec<String> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
    let stream = socket.connect(server).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut replies = Vec::new();
    let read = async |r: &mut BufReader<_>| {
        let mut first = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line)).await.unwrap().unwrap();
            if first.is_empty() {
                first = line.trim_end().to_string();
            }
            if n == 0 || line.as_bytes().get(3) != Some(&b'-') {
                return first;
            }
        }
    };
    replies.push(read(&mut r).await);
    for l in lines {
        if replies.last().is_some_and(|r| r.is_empty()) {
            break;
        }
        w.write_all(format!("{l}\r\n").as_bytes()).await.unwrap();
        replies.push(read(&mut r).await);
    }
    replies
}

fn config(dir: &Path, extra: &str) -> (std::path::PathBuf, Settings) {
    let path = write_config(dir, extra);
    let settings = Config::load(&path, Overrides::default()).unwrap();
    (path, settings)
}

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let text = format!(
        "[server]\nhostname = \"mx.example.test\"\nstate_dir = \"{}\"\n[domains]\nlocal = [\"example.test\"]\n\
         users = [\"alice@example.test\"]\n[bans]\nsync_interval = \"100ms\"\n{extra}",
        dir.join("state").display()
    );
    let path = dir.join("gatekeeper.toml");
    std::fs::write(&path, &text).unwrap();
    path
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).env("RUST_LOG", "warn").output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..50 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within 2.5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_b1_ban_is_durable_and_the_cli_changes_it_while_the_server_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, settings) = config(dir.path(), "");
    let cfg = cfg.to_str().unwrap();
    let (running, manager) = serve(&settings).await;
    let r = dialogue(running.addr, "127.0.0.61", &["EHLO client.test", "MAIL FROM:<nobody@example.test>"]).await;
    assert!(r[2].starts_with("550 5.7.1"), "{r:?}");
    // Recorded before the reply: it is in the database now, with its evidence.
    let bans = manager.list_blocking().unwrap();
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(bans[0].net.to_string(), "127.0.0.61");
    assert_eq!(bans[0].reason, BanReason::ForgedLocalSender);
    assert_eq!(bans[0].evidence, "MAIL FROM:<nobody@example.test>");
    assert!(bans[0].session > 0);

    // A restart (the old process's state simply dropped): the ban is back.
    running.stop().await;
    drop(manager);
    let (running, manager) = serve(&settings).await;
    assert_eq!(manager.active().len(), 1);
    let r = dialogue(running.addr, "127.0.0.61", &[]).await;
    assert!(r[0].starts_with("554 5.7.1"), "{r:?}");

    // `gatekeeper bans` in another process, while the server runs.
    let (ok, out, err) = run(&["bans", "list", "--config", cfg]);
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.starts_with("127.0.0.61 ") && l.contains(" B1 ")), "{out}");
    let (ok, out, err) = run(&["bans", "remove", "127.0.0.61", "--config", cfg]);
    assert!(ok && out.contains("removed the ban of 127.0.0.61"), "{out}{err}");
    let addr = running.addr;
    eventually("the server lifts the removed ban", async || {
        dialogue(addr, "127.0.0.61", &[]).await[0].starts_with("220 ")
    })
    .await;
    let (ok, out, err) =
        run(&["bans", "add", "127.0.0.62", "--for", "10m", "--reason", "seen in logs", "--config", cfg]);
    assert!(ok && out.starts_with("banned 127.0.0.62 until "), "{out}{err}");
    eventually("the server applies the added ban", async || {
        dialogue(addr, "127.0.0.62", &[]).await[0].starts_with("554 ")
    })
    .await;
    let b = manager.active().into_iter().find(|b| b.net.to_string() == "127.0.0.62").unwrap();
    assert_eq!(
        (b.reason, b.evidence.as_str(), b.total()),
        (BanReason::Manual, "seen in logs", Duration::from_secs(600))
    );
    let (ok, out, _) = run(&["bans", "list", "--history", "10", "--config", cfg]);
    assert!(ok);
    for event in ["ban ", "remove "] {
        assert!(out.contains(event), "{event} missing in {out}");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowlisted_clients_are_not_banned_even_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, settings) = config(dir.path(), "allowlist = [\"127.0.0.70/31\"]\n");
    let (running, manager) = serve(&settings).await;
    let r = dialogue(
        running.addr,
        "127.0.0.71",
        &["EHLO client.test", "MAIL FROM:<nobody@example.test>", "MAIL FROM:<alice@example.test>"],
    )
    .await;
    assert!(r[2].starts_with("550 5.7.1"), "{r:?}");
    // The server knows the allowlist (BanSink::exempt): it asks for no ban, and the session
    // is not ended for one.
    assert!(r[3].starts_with("250"), "{r:?}");
    assert!(manager.list_blocking().unwrap().is_empty());
    assert_eq!(manager.stats().allowlisted.load(std::sync::atomic::Ordering::Relaxed), 0);
    // Not banned in process either (only G1 applies: a different address of the allowlist).
    let r = dialogue(running.addr, "127.0.0.70", &[]).await;
    assert!(r[0].starts_with("220 "), "{r:?}");
    let (ok, _, err) = run(&["bans", "add", "127.0.0.70", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("allowlisted"), "{err}");
    running.stop().await;
}

#[test]
fn firewall_rules_for_both_backends() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = config(dir.path(), "");
    let cfg = cfg.to_str().unwrap();
    let (ok, out, err) = run(&["firewall", "rules", "--backend", "xt_recent", "--config", cfg, "--port", "25"]);
    assert!(ok, "{err}");
    assert!(out.contains(
        "iptables -A INPUT -p tcp --dport 25 -m recent --name SMTPBAN --rcheck --seconds 345600 --reap -j DROP"
    ));
    assert!(
        out.contains(
            "iptables -A INPUT -p tcp --dport 25 --syn -m recent --name SMTPRATE --rcheck --seconds 60 -j DROP"
        )
    );
    assert!(out.contains("ip6tables -A INPUT -p tcp --dport 25 --syn -m recent --name SMTPRATE6 --mask ffff:ffff:ffff:ffff:: --set -j ACCEPT"));
    let (ok, out, _) = run(&["firewall", "rules", "--backend", "nftables", "--config", cfg]);
    assert!(ok);
    assert!(out.contains("add rule inet gatekeeper input tcp dport 2525 ip saddr @ban4 drop"), "{out}");
    assert!(out.contains("timeout 60s; size 65535;"));
    // memory backend and no --backend: told what to say.
    let (ok, _, err) = run(&["firewall", "rules", "--config", cfg]);
    assert!(!ok && err.contains("--backend"), "{err}");
}

#[test]
fn check_config_explains_ip_list_tot_for_xt_recent() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _) = config(dir.path(), "backend = \"xt_recent\"\n");
    let (ok, out, err) = run(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("xt_recent.ip_list_tot=N") && out.contains("kernel command line"), "{out}");
    let cfg = write_config(dir.path(), "backend = \"nftables\"\n");
    let (ok, _, err) = run(&["check-config", "--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("gate.kind.backend"), "{err}");
}

#[test]
fn model_replay_opens_one_jiffy_later_for_xt_recent_than_for_nft() {
    let replay = |kind: &str, input: &str| {
        let mut child = Command::new(BIN)
            .args(["model-replay", "--kind", kind, "--window", "2s", "--hz", "250"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    // W = 2 s × 250 = 500 jiffies after the SYN accepted at 1000; drops never move it.
    let input = "1000 192.0.2.1\n1250 192.0.2.1\n1499 192.0.2.1\n1500 192.0.2.1\n1501 192.0.2.1\n1502 192.0.2.1\n";
    assert_eq!(replay("xt_recent", input), ["accept", "drop_rate", "drop_rate", "drop_rate", "accept", "drop_rate"]);
    assert_eq!(replay("nft", input), ["accept", "drop_rate", "drop_rate", "accept", "drop_rate", "drop_rate"]);
    // IPv6 sources share their /64.
    let v6 = "1000 2001:db8::1\n1001 2001:db8::2\n1002 2001:db8:0:1::1\n";
    assert_eq!(replay("xt_recent", v6), ["accept", "drop_rate", "accept"]);
}

/// Issue 11's "Done when", as an administrator would try it: the real binary on the shipped
/// example configuration, 150 bans added with `gatekeeper bans add` while it serves (more than
/// the 100 entries of an xt_recent table), every one of them refused with 554 — and still after
/// a restart — while a client without a ban is greeted.
#[test]
fn a_hundred_and_fifty_manual_bans_are_all_enforced_on_the_shipped_example() {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gatekeeper.toml");
    let example = example.to_str().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let serve = || {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let listen = format!("127.0.0.1:{port}");
        let mut child = Command::new(BIN)
            .args(["serve", "--config", example, "--listen", &listen, "--state-dir", state])
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = listen.parse().unwrap();
        for _ in 0..200 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return (child, addr);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("gatekeeper serve did not listen on {addr}");
    };
    let greeting = |addr: SocketAddr, source: &str| {
        let socket = connect_from(addr, source);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(socket), &mut line).unwrap();
        line
    };
    let (mut child, addr) = serve();
    for i in 0..150 {
        let (ok, out, err) = run(&["bans", "add", &format!("127.0.20.{i}"), "--config", example, "--state-dir", state]);
        assert!(ok && out.starts_with("banned "), "{out}{err}");
    }
    // Applied within `bans.sync_interval` (1 s in the example).
    std::thread::sleep(Duration::from_millis(2500));
    let (_, list, _) = run(&["bans", "list", "--config", example, "--state-dir", state]);
    assert_eq!(list.lines().filter(|l| l.starts_with("127.0.20.")).count(), 150, "{list}");
    for i in 0..150 {
        let line = greeting(addr, &format!("127.0.20.{i}"));
        assert!(line.starts_with("554 5.7.1"), "127.0.20.{i}: {line}");
    }
    assert!(greeting(addr, "127.0.21.1").starts_with("220 "));
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, addr) = serve();
    for i in [0, 1, 50, 99, 100, 149] {
        let line = greeting(addr, &format!("127.0.20.{i}"));
        assert!(line.starts_with("554 5.7.1"), "after a restart, 127.0.20.{i}: {line}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A blocking connection to `addr` from `source` (port chosen by the kernel).
fn connect_from(addr: SocketAddr, source: &str) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        socket.connect(addr).await.unwrap().into_std().unwrap()
    });
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}
