//! The metrics endpoint of `gatekeeper serve` (`[metrics] listen`): scraped with a plain TCP
//! GET around a scripted SMTP dialogue — an unknown recipient refused, a forged local sender
//! refused and banned, a message accepted — its rule-labelled counters move by exactly what the
//! dialogue did; other paths get 404, other methods 405, and a bad configuration is refused
//! with every problem.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Served {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn serve(dir: &Path, config: &Path, smtp: SocketAddr) -> Served {
    let log = dir.join("gatekeeper.log");
    let child = Command::new(env!("CARGO_BIN_EXE_gatekeeper"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", &smtp.to_string(), "--state-dir"])
        .arg(dir.join("state"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("metrics endpoint") && text.contains("serving") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "not serving:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Served { child, log }
}

/// One HTTP exchange: the status line and the body.
fn http(addr: SocketAddr, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").expect("a response head");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Every sample of a scrape, `name{labels}` to value.
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.ends_with("# EOF\n"), "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// An SMTP client from `source` (its own address in 127.0.0.0/8, so G1 lets each in).
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr, source: &str) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().unwrap();
        let stream = rt.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
            socket.connect(addr).await.unwrap().into_std().unwrap()
        });
        stream.set_nonblocking(false).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client { r: BufReader::new(stream.try_clone().unwrap()), w: stream };
        assert!(c.reply().starts_with("220"));
        c
    }

    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).unwrap();
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    /// Sends `line`, returns the reply's code.
    fn say(&mut self, line: &str) -> String {
        write!(self.w, "{line}\r\n").unwrap();
        self.reply()[..3].to_string()
    }
}

const CONFIG: &str = r#"
[server]
hostname = "mx.example.test"
[domains]
local = ["example.test"]
users = ["alice@example.test"]
[rules]
scan = true
[metrics]
listen = "METRICS"
"#;

#[test]
fn counters_move_by_what_the_dialogue_did() {
    let dir = tempfile::tempdir().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("gatekeeper.toml");
    std::fs::write(&config, CONFIG.replace("METRICS", &metrics.to_string())).unwrap();
    let s = serve(dir.path(), &config, smtp);

    let before = scrape(metrics);
    // Unknown local recipient from the null sender: 550, no ban (E2).
    let mut c = Client::connect(smtp, "127.0.0.2");
    assert_eq!(c.say("EHLO client.test"), "250");
    assert_eq!(c.say("MAIL FROM:<>"), "250");
    assert_eq!(c.say("RCPT TO:<nobody@example.test>"), "550");
    assert_eq!(c.say("QUIT"), "221");
    // A forged local sender (no such local user): 550 and a ban (E1, B1).
    let mut c = Client::connect(smtp, "127.0.0.3");
    assert_eq!(c.say("EHLO client.test"), "250");
    assert_eq!(c.say("MAIL FROM:<nobody@example.test>"), "550");
    // A message accepted, scanned clean and handed off to the spool.
    let mut c = Client::connect(smtp, "127.0.0.4");
    assert_eq!(c.say("EHLO client.test"), "250");
    assert_eq!(c.say("MAIL FROM:<someone@remote.test>"), "250");
    assert_eq!(c.say("RCPT TO:<alice@example.test>"), "250");
    assert_eq!(c.say("DATA"), "354");
    assert_eq!(c.say("Subject: hello\r\n\r\nhello\r\n."), "250");
    assert_eq!(c.say("QUIT"), "221");
    drop(c);
    // Sessions end (and are counted) once their connections close.
    let start = Instant::now();
    let after = loop {
        let after = scrape(metrics);
        let closed: f64 =
            after.iter().filter(|(k, _)| k.starts_with("gatekeeper_sessions_closed_total")).map(|(_, v)| v).sum();
        if closed >= 3.0 || start.elapsed() > Duration::from_secs(10) {
            break after;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let delta = |series: &str| after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0);
    let log = || std::fs::read_to_string(&s.log).unwrap_or_default();
    let expect = [
        ("gatekeeper_verdicts_total{rule=\"E2\",verdict=\"reject\",code=\"550\"}", 1.0),
        ("gatekeeper_verdicts_total{rule=\"E1\",verdict=\"reject\",code=\"550\"}", 1.0),
        ("gatekeeper_verdicts_total{rule=\"E1\",verdict=\"accept\",code=\"250\"}", 2.0),
        ("gatekeeper_verdicts_total{rule=\"E2\",verdict=\"accept\",code=\"250\"}", 1.0),
        ("gatekeeper_verdicts_total{rule=\"deliver\",verdict=\"accept\",code=\"250\"}", 1.0),
        ("gatekeeper_bans_total{reason=\"B1\"}", 1.0),
        ("gatekeeper_sessions_opened_total", 3.0),
        ("gatekeeper_sessions_closed_total{outcome=\"rejected\"}", 1.0),
        ("gatekeeper_sessions_closed_total{outcome=\"banned\"}", 1.0),
        ("gatekeeper_sessions_closed_total{outcome=\"delivered\"}", 1.0),
        ("gatekeeper_scans_total{result=\"clean\"}", 1.0),
        ("gatekeeper_deliveries_total{result=\"ok\"}", 1.0),
        ("gatekeeper_delivery_duration_seconds_count", 1.0),
        ("gatekeeper_delivered_total", 1.0),
        ("gatekeeper_connections_total", 3.0),
        ("gatekeeper_ban_recorded_total", 1.0),
        ("gatekeeper_ban_commit_duration_seconds_count", 1.0),
        ("gatekeeper_bans_active{family=\"ipv4\"}", 1.0),
        ("gatekeeper_would_reject_total", 0.0),
        ("gatekeeper_would_ban_total", 0.0),
    ];
    for (series, want) in expect {
        assert_eq!(delta(series), want, "{series}; scrape after:\n{after:#?}\nlog:\n{}", log());
    }
    // Nothing but those two rules refused anything.
    let refusals: f64 = after
        .iter()
        .filter(|(k, _)| k.starts_with("gatekeeper_verdicts_total") && !k.contains("verdict=\"accept\""))
        .map(|(k, _)| delta(k))
        .sum();
    assert_eq!(refusals, 2.0, "{after:#?}");

    // Every name the Grafana dashboard queries is exposed (those of TLS and of a kernel ban
    // table only when configured so, observe mode's only once it observed something).
    let (_, body) = http(metrics, "GET /metrics HTTP/1.1\r\n\r\n");
    let dashboard =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/grafana-gatekeeper.json")).unwrap();
    let conditional = [
        "gatekeeper_tls_handshakes_total",
        "gatekeeper_ban_table_entries",
        "gatekeeper_ban_table_capacity",
        "gatekeeper_observed_verdicts_total",
    ];
    let mut names: Vec<&str> = dashboard
        .match_indices("gatekeeper_")
        .map(|(i, _)| {
            let rest = &dashboard[i..];
            &rest[..rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() > 20, "{names:?}");
    for name in names {
        let base = name.trim_end_matches("_bucket").trim_end_matches("_total");
        assert!(
            conditional.contains(&name) || body.contains(&format!("# TYPE {base} ")),
            "the dashboard queries {name}, which is not exposed:\n{body}"
        );
    }

    // Anything else is not the metrics.
    assert_eq!(http(metrics, "GET / HTTP/1.1\r\n\r\n").0, "HTTP/1.1 404 Not Found");
    assert_eq!(http(metrics, "POST /metrics HTTP/1.1\r\n\r\n").0, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(http(metrics, "HELO there\r\n\r\n").0, "HTTP/1.1 400 Bad Request");
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let mut big = TcpStream::connect(metrics).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = big.write_all(huge.as_bytes());
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
}

#[test]
fn observe_mode_counts_what_it_would_have_done_by_rule() {
    let dir = tempfile::tempdir().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let smtp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("gatekeeper.toml");
    let text =
        CONFIG.replace("METRICS", &metrics.to_string()).replace("scan = true", "scan = true\nmode = \"observe\"");
    std::fs::write(&config, text).unwrap();
    let _s = serve(dir.path(), &config, smtp);
    let before = scrape(metrics);
    // A forged local sender: 250 in observe mode, and no ban.
    let mut c = Client::connect(smtp, "127.0.0.5");
    assert_eq!(c.say("EHLO client.test"), "250");
    assert_eq!(c.say("MAIL FROM:<nobody@example.test>"), "250");
    assert_eq!(c.say("QUIT"), "221");
    let after = scrape(metrics);
    let delta = |series: &str| after.get(series).copied().unwrap_or(0.0) - before.get(series).copied().unwrap_or(0.0);
    for (series, want) in [
        ("gatekeeper_observed_verdicts_total{rule=\"E1\",code=\"550\",would_ban=\"B1\"}", 1.0),
        ("gatekeeper_would_reject_total", 1.0),
        ("gatekeeper_would_ban_total", 1.0),
        ("gatekeeper_bans_total{reason=\"B1\"}", 0.0),
        ("gatekeeper_ban_recorded_total", 0.0),
        ("gatekeeper_bans_active{family=\"ipv4\"}", 0.0),
        ("gatekeeper_verdicts_total{rule=\"E1\",verdict=\"reject\",code=\"550\"}", 0.0),
    ] {
        assert_eq!(delta(series), want, "{series}: {after:#?}");
    }
}

#[test]
fn a_bad_metrics_section_is_listed_with_the_other_problems() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gatekeeper.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:2525\"\nmax_sessions = 0\n[metrics]\nlisten = \"nowhere\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gatekeeper"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("metrics.listen: \"nowhere\" is not an address:port"), "{err}");
    assert!(err.contains("server.max_sessions"), "{err}");
    std::fs::write(&config, "[server]\nlisten = \"127.0.0.1:2525\"\n[metrics]\nlisten = \"127.0.0.1:2525\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gatekeeper"))
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics.listen: 127.0.0.1:2525 is server.listen too"), "{err}");
}
