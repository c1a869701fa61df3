//! `gatekeeper serve` under systemd's `Type=notify` (contrib/gatekeeper.service): the
//! notifications arrive on `NOTIFY_SOCKET` in order — `READY=1` once serving, `RELOADING=1`
//! then `READY=1` around a SIGHUP reload, `STOPPING=1` on SIGTERM — and `WATCHDOG=1` pings
//! come at half of `WATCHDOG_USEC`. The shipped example configuration, on a free port.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The notifications received until one has a line equal to `line` (at most 20 s); all of
/// them, each a datagram.
fn until(socket: &UnixDatagram, line: &str, log: &std::path::Path) -> Vec<String> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.lines().any(|l| l == line);
                got.push(msg);
                if done {
                    return got;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("recv: {e}"),
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no {line:?} after {got:?}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

#[test]
fn ready_reloading_stopping_and_watchdog_are_sent() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let config = dir.path().join("gatekeeper.toml");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/gatekeeper.toml"), &config).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = dir.path().join("gatekeeper.log");
    // WATCHDOG_PID must be the server's own pid: a shell that sets it to its own and execs.
    let mut child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_gatekeeper"), "serve", "--config"])
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--state-dir"])
        .arg(dir.path().join("state"))
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let kill = |name: &str| {
        let status = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().unwrap();
        assert!(status.success());
    };

    let started = until(&socket, "READY=1", &log);
    let ready = started.last().unwrap();
    assert!(ready.lines().any(|l| l.starts_with("STATUS=serving on 127.0.0.1:")), "{ready:?}");
    // Serving by then: the port answers with a greeting.
    let mut smtp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    smtp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 3];
    std::io::Read::read_exact(&mut smtp, &mut greeting).unwrap();
    assert_eq!(&greeting, b"220");
    drop(smtp);

    // The watchdog: pings every 200 ms (half of 400 ms).
    let t = Instant::now();
    until(&socket, "WATCHDOG=1", &log);
    until(&socket, "WATCHDOG=1", &log);
    assert!(t.elapsed() < Duration::from_secs(2), "two pings took {:?}", t.elapsed());

    kill("HUP");
    let reloading = until(&socket, "RELOADING=1", &log);
    let msg = reloading.last().unwrap();
    assert!(msg.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{msg:?}");
    assert!(reloading.iter().all(|m| !m.lines().any(|l| l == "READY=1")), "READY before RELOADING: {reloading:?}");
    let reloaded = until(&socket, "READY=1", &log);
    assert!(reloaded.last().unwrap().contains("STATUS=serving on"), "{reloaded:?}");

    kill("TERM");
    let stopping = until(&socket, "STOPPING=1", &log);
    assert!(stopping.iter().all(|m| !m.lines().any(|l| l == "READY=1")), "{stopping:?}");
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
