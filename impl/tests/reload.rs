//! `gatekeeper serve` reloads on SIGHUP: a user added to the users file is known to the next
//! session; a bad configuration is refused with every problem listed and the old one kept; a
//! restart-only change is applied nowhere and said so.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Served {
    child: Child,
    log: std::path::PathBuf,
    addr: SocketAddr,
}

impl Served {
    fn signal(&self, name: &str) {
        let status = Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits (at most 20 s) until the log has `needle` `n` times; the log so far.
    fn wait_log(&self, needle: &str, n: usize) -> String {
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.matches(needle).count() >= n {
                return log;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no {needle:?} in the log:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path, config: &Path) -> Served {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = dir.join("gatekeeper.log");
    let child = Command::new(env!("CARGO_BIN_EXE_gatekeeper"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", &addr.to_string(), "--state-dir"])
        .arg(dir.join("state"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let served = Served { child, log, addr };
    served.wait_log("serving", 1);
    served
}

/// The reply code to `RCPT TO:<rcpt>` after `MAIL FROM:<>` (no ban for a bounce), from a
/// client at `source` (each its own, for G1).
fn rcpt_code(addr: SocketAddr, source: &str, rcpt: &str) -> String {
    let socket = socket2_connect(addr, source);
    let mut r = BufReader::new(socket.try_clone().unwrap());
    let mut w = socket;
    let mut reply = || {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    };
    assert!(reply().starts_with("220"));
    write!(w, "EHLO client.test\r\n").unwrap();
    reply();
    write!(w, "MAIL FROM:<>\r\n").unwrap();
    assert!(reply().starts_with("250"));
    write!(w, "RCPT TO:<{rcpt}>\r\n").unwrap();
    let code = reply()[..3].to_string();
    write!(w, "QUIT\r\n").unwrap();
    code
}

/// A blocking connection from `source` (an address in 127.0.0.0/8).
fn socket2_connect(addr: SocketAddr, source: &str) -> TcpStream {
    // std cannot bind before connecting; tokio's socket can, on a small runtime.
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        socket.connect(addr).await.unwrap().into_std().unwrap()
    });
    stream.set_nonblocking(false).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

const CONFIG: &str = r#"
[server]
hostname = "mx.example.test"
[domains]
local = ["example.test"]
users = []
users_file = "users.txt"
"#;

#[test]
fn sighup_adds_a_user_and_refuses_a_bad_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gatekeeper.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let users = dir.path().join("users.txt");
    std::fs::write(&users, "alice@example.test\n").unwrap();
    let s = serve(dir.path(), &config);
    assert_eq!(rcpt_code(s.addr, "127.0.0.2", "alice@example.test"), "250");
    assert_eq!(rcpt_code(s.addr, "127.0.0.3", "carol@example.test"), "550");

    std::fs::write(&users, "alice@example.test\ncarol@example.test\n").unwrap();
    s.signal("HUP");
    s.wait_log("configuration reloaded", 1);
    assert_eq!(rcpt_code(s.addr, "127.0.0.4", "carol@example.test"), "250", "carol is known now");

    // Two problems: both listed, nothing applied (carol stays, the old users file is kept).
    std::fs::write(&config, format!("{CONFIG}[smtp]\nrcpt_max = 5\nerrors_max = 0\n")).unwrap();
    std::fs::write(&users, "alice@example.test\n").unwrap();
    s.signal("HUP");
    let log = s.wait_log("reload refused", 1);
    assert!(log.contains("smtp.rcpt_max") && log.contains("smtp.errors_max"), "{log}");
    assert_eq!(rcpt_code(s.addr, "127.0.0.5", "carol@example.test"), "250", "the old configuration stays");

    // A restart-only change is said to need a restart; the live part is applied.
    std::fs::write(&config, CONFIG.replace("[server]\n", "[server]\nmax_sessions = 100\n")).unwrap();
    s.signal("HUP");
    let log = s.wait_log("configuration reloaded", 2);
    assert!(log.contains("takes effect only after a restart") && log.contains("[server]"), "{log}");
    assert_eq!(rcpt_code(s.addr, "127.0.0.6", "carol@example.test"), "550", "carol is gone from the file");
    s.signal("TERM");
}
