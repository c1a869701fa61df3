//! Faults, bounds and privileges. As the real binary (`gatekeeper serve`): the server starts
//! on a damaged `state.sqlite` (moved aside, a loud log); with `[server] user`, the serving
//! process has dropped to that user and its files are private; `check-config` refuses an
//! unknown user. With the library: many IPv6 bans in one /48, widened, reach the server's own
//! ban table as the /48.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_gatekeeper");

/// A running `gatekeeper serve`, killed on drop.
struct Gatekeeper {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Drop for Gatekeeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gatekeeper {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes a configuration under `dir` (state in `dir/state`) with `extra` appended to
/// `[server]` and `tail` at the end, starts `gatekeeper serve` and waits for its greeting.
fn start(dir: &Path, extra: &str, tail: &str) -> Gatekeeper {
    let port = free_port();
    let config = dir.join("gatekeeper.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nhostname = \"mx.example.test\"\nstate_dir = \"{}\"\n{extra}\n\
             [domains]\nlocal = [\"example.test\"]\nusers = [\"alice@example.test\"]\n{tail}\n",
            dir.join("state").display()
        ),
    )
    .unwrap();
    let log = dir.join("gatekeeper.log");
    let child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("gatekeeper starts");
    let mut gk = Gatekeeper { child, log, port };
    for _ in 0..300 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            use std::io::Read;
            let mut greeting = [0u8; 3];
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if s.read_exact(&mut greeting).is_ok() && &greeting == b"220" {
                return gk;
            }
        }
        if gk.child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("gatekeeper did not come up:\n{}", gk.log());
}

#[test]
fn serve_starts_on_a_damaged_state_database_and_moves_it_aside() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("state.sqlite"), vec![0xa5u8; 16 * 1024]).unwrap();
    let gk = start(dir.path(), "", "");
    let log = gk.log();
    assert!(log.contains("DATABASE DAMAGED OR UNREADABLE"), "{log}");
    let aside: Vec<String> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("state.sqlite.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(state.join(&aside[0])).unwrap(), vec![0xa5u8; 16 * 1024], "kept for inspection");
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

/// The `Name:` field of `/proc/PID/status`.
fn status(pid: u32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap_or_else(|| panic!("{name}: {text}"));
    line[name.len() + 1..].split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The uid and gid of `name` in /etc/passwd.
fn passwd(name: &str) -> (u32, u32) {
    let text = std::fs::read_to_string("/etc/passwd").unwrap();
    let f: Vec<&str> = text.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f[0] == name).unwrap();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

/// One message for alice over SMTP; returns the last reply line.
fn send(port: u16) -> String {
    use std::io::{BufRead, BufReader, Write};
    // From 127.0.0.2: the readiness probe spent 127.0.0.1's G1 slot.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        socket.connect(([127, 0, 0, 1], port).into()).await.unwrap().into_std().unwrap()
    });
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut reply = || {
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line.as_bytes().get(3) != Some(&b'-') {
                return line.trim_end().to_string();
            }
        }
    };
    reply();
    for cmd in ["EHLO client.example.org", "MAIL FROM:<bob@example.org>", "RCPT TO:<alice@example.test>", "DATA"] {
        w.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
        reply();
    }
    w.write_all(b"Subject: hi\r\n\r\nhello\r\n.\r\n").unwrap();
    let done = reply();
    w.write_all(b"QUIT\r\n").unwrap();
    done
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().mode() & 0o777
}

fn owner(p: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.uid(), m.gid())
}

/// A private parent that `nobody` may traverse, with a state dir left too open by hand.
fn prepared_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    std::fs::set_permissions(dir.path().join("state"), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn serve_drops_to_the_configured_user_and_keeps_its_files_private() {
    if !is_root() {
        eprintln!("skipped: dropping privileges needs root (the machine and CI run as root)");
        return;
    }
    let (uid, gid) = passwd("nobody");
    let dir = prepared_dir();
    let gk = start(dir.path(), "user = \"nobody\"", "");
    let pid = gk.child.id();
    assert_eq!(status(pid, "Uid"), format!("{uid} {uid} {uid} {uid}"));
    assert_eq!(status(pid, "Gid"), format!("{gid} {gid} {gid} {gid}"));
    assert_eq!(status(pid, "Groups"), gid.to_string(), "supplementary groups reduced to the one");
    assert_eq!(status(pid, "CapEff"), "0000000000000000", "no capability kept with the memory backend");
    assert_eq!(status(pid, "CapPrm"), "0000000000000000");
    assert!(send(gk.port).starts_with("250"), "{}", gk.log());
    let state = dir.path().join("state");
    assert_eq!(mode(&state), 0o700, "tightened from 0755");
    assert_eq!(owner(&state), (uid, gid));
    for f in ["state.sqlite", "state.sqlite-wal", "state.sqlite-shm"] {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
        assert_eq!(owner(&state.join(f)), (uid, gid), "{f}");
    }
    for d in ["maildir", "maildir/new", "maildir/tmp", "maildir/cur"] {
        assert_eq!(mode(&state.join(d)), 0o700, "{d}");
    }
    let spooled: Vec<PathBuf> =
        std::fs::read_dir(state.join("maildir/new")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(spooled.len(), 1, "{}", gk.log());
    assert_eq!(mode(&spooled[0]), 0o600);
    assert_eq!(owner(&spooled[0]), (uid, gid));
}

#[test]
fn with_nftables_only_cap_net_admin_is_kept_and_passed_to_nft() {
    if !is_root() {
        eprintln!("skipped: dropping privileges needs root (the machine and CI run as root)");
        return;
    }
    let dir = prepared_dir();
    // A stand-in nft that accepts everything: the capability sets are what is checked here.
    let tail = "[gate.kind]\nbackend = \"nft\"\n[bans]\nbackend = \"nftables\"\n[bans.nftables]\nnft = \"/bin/true\"";
    let gk = start(dir.path(), "user = \"nobody\"\ngroup = \"nogroup\"", tail);
    let pid = gk.child.id();
    let net_admin = format!("{:016x}", 1u64 << 12);
    assert_eq!(status(pid, "CapEff"), net_admin);
    assert_eq!(status(pid, "CapPrm"), net_admin);
    assert_eq!(status(pid, "CapAmb"), net_admin, "an nft child inherits it");
    assert_eq!(status(pid, "CapBnd"), net_admin, "nothing else can be regained");
    assert_eq!(status(pid, "Uid").split(' ').next(), Some(passwd("nobody").0.to_string().as_str()));
}

#[test]
fn check_config_refuses_unknown_users_and_groups_listing_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gatekeeper.toml");
    std::fs::write(
        &config,
        "[server]\nhostname = \"mx.example.test\"\nmax_sessions = 0\nuser = \"no-such-user-gk\"\n\
         group = \"no-such-group-gk\"\n[domains]\nlocal = [\"example.test\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&config).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("3 problem(s)"), "{err}");
    for needle in [
        "server.user: no user \"no-such-user-gk\"",
        "server.group: no group \"no-such-group-gk\"",
        "server.max_sessions",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[tokio::test]
async fn a_widened_48_reaches_the_servers_own_ban_table() {
    use gatekeeper::ban::{BanConfig, BanManager, BanOutcome, BanStore, MemoryBackend};
    use gatekeeper::edges::{BanOrder, MaildirSpool, SystemClock};
    use gatekeeper::policy::{BanReason, BanRequest};
    use gatekeeper::server::Server;
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let settings = gatekeeper::testing::settings("");
    let clock = Arc::new(SystemClock);
    let spool = MaildirSpool::open(dir.path().join("maildir"), "mx.example.test", clock.clone(), true).unwrap();
    let server = Server::builder(settings.session.clone(), settings.directory.clone(), Arc::new(spool))
        .clock(clock.clone())
        .gate(settings.config.gate.clone())
        .build();
    let cfg = BanConfig { widen_v6_after: 3, ..BanConfig::default() };
    let store = BanStore::in_memory().unwrap();
    let m = BanManager::new(&cfg, &settings.config.gate, store, Box::new(MemoryBackend::new()), clock, true);
    m.attach_mirror(Arc::new(server.clone()));
    for i in 1..=3 {
        let addr = format!("2001:db8:77:{i}::1").parse().unwrap();
        let b4 = BanRequest { reason: BanReason::UnknownRecipient, evidence: "RCPT".into() };
        let r = m.ban(BanOrder::from_request(addr, 1, b4)).await.unwrap();
        assert!(matches!(r, BanOutcome::Banned(_)), "{r:?}");
    }
    let nets: Vec<String> = m.active().iter().map(|b| b.net.to_string()).collect();
    assert_eq!(nets, ["2001:db8:77::/48"]);
    // A /64 never banned itself, inside the /48: refused by the server's own table.
    assert!(server.is_banned("2001:db8:77:ffff::9".parse().unwrap()));
    assert!(server.is_banned("2001:db8:77:1::1".parse().unwrap()));
    assert!(!server.is_banned("2001:db8:78::1".parse().unwrap()));
    assert_eq!(server.active_bans(), (0, 1), "the narrow bans were replaced by the /48");
    m.unban("2001:db8:77::/48".parse().unwrap()).await.unwrap();
    assert!(!server.is_banned("2001:db8:77:1::1".parse().unwrap()));
}
