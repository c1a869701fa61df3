//! Rule V1 with a real clamd: each test starts its own `clamd` (foreground, a generated
//! clamd.conf in a temporary directory, a private database holding only an EICAR test
//! signature, loopback TCP and a Unix socket; freshclam never runs) and waits for PING → PONG.
//!
//! - [`clamd_client_against_real_clamd`]: [`ClamdScanner`] over TCP and the Unix socket: clean,
//!   EICAR inline, EICAR in a base64 attachment, clamd's own size limit, clamd stopped.
//! - [`gatekeeper_binary_with_clamd_and_swaks`]: the `gatekeeper` binary configured with clamd,
//!   driven by swaks: clean → 250 and spooled; EICAR inline and as a base64 attachment → 554,
//!   not delivered, client banned (its next connection gets 554); clamd killed → 451 4.7.0 and
//!   no ban.
//! - [`builtin_scanner_through_the_server`]: the same verdicts with the builtin scanner, in
//!   process (needs no tool).
//!
//! Without `clamd` or `swaks` installed (`bash ci/install-virus.sh` installs both) a test prints
//! `SKIP` and returns; with `GATEKEEPER_REQUIRE_TOOLS=1` in the environment it fails instead.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use gatekeeper::config::Config;
use gatekeeper::edges::{Clock, MaildirSpool, MessageFile, Scanner, SystemClock};
use gatekeeper::policy::{OnScanFailure, ScanOutcome};
use gatekeeper::scan::{BuiltinScanner, ClamdAddr, ClamdError, ClamdScanner, EICAR, EICAR_NAME};
use gatekeeper::server::{Limits, Server};

/// What clamd calls our EICAR signature: names from unofficial databases get a suffix.
const CLAMD_EICAR: &str = "Eicar-Test-Signature.UNOFFICIAL";

/// clamd's StreamMaxLength in these tests, to exercise its size-limit answer cheaply.
const CLAMD_STREAM_MAX: usize = 1024 * 1024;

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The tools, or `None` after printing why the test is skipped.
fn tools<const N: usize>(test: &str, names: [&str; N]) -> Option<[PathBuf; N]> {
    let found = names.map(find_tool);
    let missing: Vec<&str> = names.iter().zip(&found).filter(|(_, p)| p.is_none()).map(|(n, _)| *n).collect();
    if missing.is_empty() {
        return Some(found.map(Option::unwrap));
    }
    let why = format!("{test}: {} not installed (bash ci/install-virus.sh installs it)", missing.join(" and "));
    if std::env::var_os("GATEKEEPER_REQUIRE_TOOLS").is_some_and(|v| v != "0") {
        panic!("{why}; GATEKEEPER_REQUIRE_TOOLS is set");
    }
    println!("SKIP {why}");
    eprintln!("SKIP {why}");
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

/// A clamd of our own. Killed on drop.
struct Clamd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    tcp: SocketAddr,
}

impl Clamd {
    fn start(bin: &Path) -> Clamd {
        let mut dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db");
        std::fs::create_dir_all(&db).unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        // A body signature (.ndb: target 0 = any file, offset * = anywhere): matches EICAR in
        // the raw mail and in every part clamd extracts. (An .hdb of the EICAR file's
        // md5:size:name would miss EICAR inline in a text body: it hashes whole files only.)
        let hex: String = EICAR.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(db.join("gatekeeper-test.ndb"), format!("Eicar-Test-Signature:0:*:{hex}\n")).unwrap();
        // The port is free now; if clamd loses the race for it, try another.
        for _ in 0..5 {
            let tcp: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let conf = dir.path().join("clamd.conf");
            let d = dir.path().display();
            std::fs::write(
                &conf,
                format!(
                    "Foreground yes\nDatabaseDirectory {d}/db\nTCPSocket {}\nTCPAddr 127.0.0.1\n\
                     LocalSocket {d}/clamd.ctl\nTemporaryDirectory {d}/tmp\nLogFile {d}/clamd.log\n\
                     LogTime yes\nStreamMaxLength {CLAMD_STREAM_MAX}\nSelfCheck 0\nMaxThreads 4\n",
                    tcp.port()
                ),
            )
            .unwrap();
            let out = std::fs::File::create(dir.path().join("clamd.out")).unwrap();
            let child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("clamd starts");
            let mut clamd = Clamd { child: Some(child), dir, tcp };
            if clamd.wait_for_pong() {
                return clamd;
            }
            eprintln!("clamd did not come up on {tcp}:\n{}", clamd.log());
            clamd.stop();
            dir = std::mem::replace(&mut clamd.dir, tempfile::tempdir().unwrap());
        }
        panic!("clamd would not start");
    }

    fn tcp(&self) -> ClamdAddr {
        ClamdAddr::Tcp(self.tcp.to_string())
    }

    fn unix(&self) -> ClamdAddr {
        ClamdAddr::Unix(self.dir.path().join("clamd.ctl"))
    }

    /// PING → PONG within 60 s (loading one signature takes well under a second).
    fn wait_for_pong(&mut self) -> bool {
        let rt = runtime();
        let client = ClamdScanner::new(self.tcp(), clock()).timeout(Duration::from_secs(2));
        for _ in 0..600 {
            if rt.block_on(client.ping()).is_ok() {
                return true;
            }
            if self.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("clamd.out"), read("clamd.log"))
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Clamd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for (i, chunk) in data.chunks(3).enumerate() {
        if i > 0 && i % 19 == 0 {
            out.push_str("\r\n");
        }
        let n = chunk.iter().enumerate().fold(0u32, |acc, (j, b)| acc | u32::from(*b) << (16 - 8 * j));
        for j in 0..4 {
            out.push(if j <= chunk.len() { ALPHABET[(n >> (18 - 6 * j) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

const CLEAN: &[u8] =
    b"From: <sender@elsewhere.test>\r\nTo: <alice@example.test>\r\nSubject: clean\r\n\r\nHello, clean.\r\n";

fn inline_eicar() -> Vec<u8> {
    [b"From: <sender@elsewhere.test>\r\nSubject: inline\r\n\r\nLook:\r\n".as_slice(), EICAR, b"\r\n"].concat()
}

fn attached_eicar() -> Vec<u8> {
    format!(
        "From: <sender@elsewhere.test>\r\nSubject: attachment\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n\
         See the attachment.\r\n--b1\r\nContent-Type: application/octet-stream; name=\"eicar.com\"\r\n\
         Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"eicar.com\"\r\n\r\n\
         {}\r\n--b1--\r\n",
        base64(EICAR)
    )
    .into_bytes()
}

#[test]
fn clamd_client_against_real_clamd() {
    let Some([clamd_bin]) = tools("clamd_client_against_real_clamd", ["clamd"]) else {
        return;
    };
    let mut clamd = Clamd::start(&clamd_bin);
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    // Scanners read messages from their files.
    let mut file = |content: &[u8]| {
        n += 1;
        MessageFile::with_content(dir.path(), &format!("m{n}"), content).unwrap()
    };
    for addr in [clamd.tcp(), clamd.unix()] {
        let s = ClamdScanner::new(addr.clone(), clock()).timeout(Duration::from_secs(20)).chunk_bytes(16 * 1024);
        rt.block_on(async {
            s.ping().await.unwrap();
            assert_eq!(s.scan(&file(CLEAN)).await, ScanOutcome::Clean, "{addr}");
            let infected = ScanOutcome::Infected { signature: CLAMD_EICAR.into() };
            assert_eq!(s.scan(&file(&inline_eicar())).await, infected, "{addr} inline");
            assert_eq!(s.scan(&file(&attached_eicar())).await, infected, "{addr} attachment");
            // Over clamd's StreamMaxLength (our own limit is higher): its size-limit error.
            let big = file(&vec![b'a'; CLAMD_STREAM_MAX + 1]);
            assert!(matches!(s.instream(big.content().unwrap()).await, Err(ClamdError::TooLarge { .. })), "{addr}");
            let outcome = s.scan(&big).await;
            assert!(matches!(outcome, ScanOutcome::Failed { .. }), "{addr}: {outcome:?}");
            let lenient = ClamdScanner::new(addr.clone(), clock()).on_oversize(OnScanFailure::Accept);
            assert_eq!(lenient.scan(&big).await, ScanOutcome::Clean, "{addr}: accepted unscanned");
        });
    }

    // Latency, clamd (TCP) against the builtin scanner: a small message and a 512 KiB one.
    let clamd_scanner = ClamdScanner::new(clamd.tcp(), clock());
    let builtin = BuiltinScanner::new(clock());
    let sys = SystemClock;
    let line = b"All work and no play makes Jack a dull boy.\r\n";
    let large = file(&[CLEAN, &line.repeat(12_000)].concat());
    for (message, rounds) in [(file(CLEAN), 200u32), (large, 20)] {
        let (clamd_avg, builtin_avg) = rt.block_on(async {
            let start = sys.now();
            for _ in 0..rounds {
                assert_eq!(clamd_scanner.scan(&message).await, ScanOutcome::Clean);
            }
            let clamd_avg = (sys.now() - start) / rounds;
            let start = sys.now();
            for _ in 0..rounds {
                assert_eq!(builtin.scan(&message).await, ScanOutcome::Clean);
            }
            (clamd_avg, (sys.now() - start) / rounds)
        });
        let size = message.len();
        println!("scan latency, {size}-octet message: clamd {clamd_avg:?}, builtin {builtin_avg:?}");
    }

    clamd.stop();
    let s = ClamdScanner::new(clamd.tcp(), clock());
    rt.block_on(async {
        assert!(matches!(s.ping().await, Err(ClamdError::Connect { .. })));
        let outcome = s.scan(&file(CLEAN)).await;
        assert!(matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains("cannot connect")), "{outcome:?}");
    });
}

/// The gatekeeper binary, killed on drop.
struct Gatekeeper {
    child: Child,
    port: u16,
    log: PathBuf,
    maildir: PathBuf,
}

impl Gatekeeper {
    fn start(dir: &Path, clamd: &ClamdAddr) -> Gatekeeper {
        let port = free_port();
        let config = dir.join("gatekeeper.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\nhostname = \"mx.example.test\"\nstate_dir = \"state\"\n\
                 [domains]\nlocal = [\"example.test\"]\nusers = [\"alice@example.test\"]\n\
                 [rules]\nscan = true\non_scan_failure = \"tempfail\"\n\
                 [scan]\nengine = \"clamd\"\nclamd = \"{clamd}\"\ntimeout = \"10s\"\nstream_max = {CLAMD_STREAM_MAX}\n"
            ),
        )
        .unwrap();
        let log = dir.join("gatekeeper.log");
        let child = Command::new(env!("CARGO_BIN_EXE_gatekeeper"))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("gatekeeper starts");
        let mut gk = Gatekeeper { child, port, log, maildir: dir.join("state/maildir") };
        // Ready once it greets. This probe spends 127.0.0.1's gate slot; dialogues use others.
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
        let _ = gk.child.kill();
        panic!("gatekeeper did not come up:\n{}", gk.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn spooled(&self) -> Vec<String> {
        match std::fs::read_dir(self.maildir.join("new")) {
            Ok(entries) => entries.map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// One swaks dialogue from `source`; its whole transcript.
    fn swaks(&self, swaks: &Path, source: &str, args: &[&str]) -> String {
        let out = Command::new(swaks)
            .args(["--server", &format!("127.0.0.1:{}", self.port), "--local-interface", source])
            .args(["--helo", "client.test", "--timeout", "30"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("swaks runs");
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for Gatekeeper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a server reply line (`<-` for 2xx/3xx, `<**` for 4xx/5xx) starts with `code`.
fn replied(transcript: &str, code: &str) -> bool {
    transcript.lines().any(|l| {
        let l = l.trim_start();
        (l.starts_with("<- ") || l.starts_with("<** ")) && l.trim_start_matches(['<', '-', '*', ' ']).starts_with(code)
    })
}

#[test]
fn gatekeeper_binary_with_clamd_and_swaks() {
    let Some([clamd_bin, swaks]) = tools("gatekeeper_binary_with_clamd_and_swaks", ["clamd", "swaks"]) else {
        return;
    };
    let mut clamd = Clamd::start(&clamd_bin);
    let dir = tempfile::tempdir().unwrap();
    let gk = Gatekeeper::start(dir.path(), &clamd.tcp());
    let fail = |what: &str, transcript: &str| -> String {
        format!("{what}\n--- swaks:\n{transcript}\n--- gatekeeper log:\n{}", gk.log())
    };
    let envelope = ["--from", "sender@elsewhere.test", "--to", "alice@example.test"];

    // Clean: 250, and in the Maildir spool.
    let out = gk.swaks(
        &swaks,
        "127.0.0.51",
        &[&envelope[..], &["--header", "Subject: clean", "--body", "hello, clean"]].concat(),
    );
    assert!(replied(&out, "250 2.0.0"), "{}", fail("clean message: expected 250 2.0.0", &out));
    let spooled = gk.spooled();
    assert_eq!(spooled.len(), 1, "{}", fail("clean message not spooled", &out));
    assert!(spooled[0].contains("hello, clean"));

    // EICAR inline: 554 naming the signature, not delivered, banned.
    let eicar = String::from_utf8(EICAR.to_vec()).unwrap();
    let body = format!("Please look at this:\r\n{eicar}\r\n");
    let out =
        gk.swaks(&swaks, "127.0.0.52", &[&envelope[..], &["--header", "Subject: inline", "--body", &body]].concat());
    assert!(replied(&out, "554 5.7.1"), "{}", fail("inline EICAR: expected 554 5.7.1", &out));
    assert!(out.contains(CLAMD_EICAR), "{}", fail("the 554 names the signature", &out));
    let out = gk.swaks(&swaks, "127.0.0.52", &[&envelope[..], &["--quit-after", "RCPT"]].concat());
    assert!(replied(&out, "554"), "{}", fail("inline EICAR sender: next connection should get 554 (B3 ban)", &out));

    // EICAR as a base64 attachment (swaks --attach): the same.
    let file = dir.path().join("eicar.com");
    std::fs::write(&file, EICAR).unwrap();
    let attach = format!("@{}", file.display());
    let out =
        gk.swaks(&swaks, "127.0.0.53", &[&envelope[..], &["--body", "see attachment", "--attach", &attach]].concat());
    assert!(
        out.contains("Content-Transfer-Encoding: BASE64") || out.contains("base64"),
        "swaks attached base64: {out}"
    );
    assert!(replied(&out, "554 5.7.1"), "{}", fail("attached EICAR: expected 554 5.7.1", &out));
    let out = gk.swaks(&swaks, "127.0.0.53", &[&envelope[..], &["--quit-after", "RCPT"]].concat());
    assert!(replied(&out, "554"), "{}", fail("attached EICAR sender: next connection should get 554", &out));
    assert_eq!(gk.spooled().len(), 1, "infected messages are not delivered");

    // clamd down: 451 4.7.0, not delivered, never a ban.
    clamd.stop();
    let out = gk.swaks(&swaks, "127.0.0.54", &[&envelope[..], &["--body", "scanner is down"]].concat());
    assert!(replied(&out, "451 4.7.0"), "{}", fail("clamd down: expected 451 4.7.0", &out));
    let out = gk.swaks(&swaks, "127.0.0.54", &[&envelope[..], &["--quit-after", "RCPT"]].concat());
    let why = "a tempfail is never a ban: the next connection gets G1's 421, not 554";
    assert!(replied(&out, "421 4.7.0"), "{}", fail(why, &out));
    assert_eq!(gk.spooled().len(), 1);

    // One structured event per scan, with its result, signature and duration.
    let log = gk.log();
    let scans: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "scan")
        .collect();
    let results: Vec<&str> = scans.iter().map(|v| v["result"].as_str().unwrap_or("?")).collect();
    assert_eq!(results, ["clean", "infected", "infected", "failed"], "{log}");
    for v in &scans {
        assert_eq!(v["engine"], "clamd", "{v}");
        assert!(v["duration_ms"].as_f64().is_some(), "{v}");
    }
    assert_eq!(scans[1]["signature"], CLAMD_EICAR);
    assert!(scans[3]["reason"].as_str().unwrap_or("").contains("cannot connect"), "{}", scans[3]);
}

/// The builtin scanner through the real server over loopback: needs no tool, always runs.
#[tokio::test]
async fn builtin_scanner_through_the_server() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let toml = "[server]\nhostname = \"mx.example.test\"\n[domains]\nlocal = [\"example.test\"]\n\
                users = [\"alice@example.test\"]\n[rules]\nscan = true\n";
    let settings = Config::parse(toml).unwrap().validate(None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let spool = MaildirSpool::open(dir.path().join("maildir"), "mx.example.test", clock.clone(), true).unwrap();
    let scanner = settings.config.scan.build(settings.config.rules.on_scan_failure, clock.clone()).unwrap();
    let server = Server::builder(settings.session.clone(), settings.directory.clone(), Arc::new(spool))
        .clock(clock)
        .gate(settings.config.gate.clone())
        .limits(Limits::default())
        .scanner(scanner)
        .build();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let s = server.clone();
    let run = tokio::spawn(async move {
        s.run(listener, async {
            let _ = stopped.await;
        })
        .await
    });

    // Sends one message from `source`; returns the reply to the end of DATA.
    let send = |source: &'static str, message: Vec<u8>| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (r, mut w) = stream.into_split();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert!(line.starts_with("220"), "{line}");
        for (cmd, code) in [
            ("HELO client.test", "250"),
            ("MAIL FROM:<sender@elsewhere.test>", "250"),
            ("RCPT TO:<alice@example.test>", "250"),
            ("DATA", "354"),
        ] {
            w.write_all(format!("{cmd}\r\n").as_bytes()).await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert!(line.starts_with(code), "{cmd}: {line}");
        }
        let mut data = message;
        data.extend_from_slice(b".\r\n");
        w.write_all(&data).await.unwrap();
        line.clear();
        r.read_line(&mut line).await.unwrap();
        line
    };
    assert!(send("127.0.0.61", CLEAN.to_vec()).await.starts_with("250 2.0.0"));
    for (source, message) in [("127.0.0.62", inline_eicar()), ("127.0.0.63", attached_eicar())] {
        let reply = send(source, message).await;
        assert!(reply.starts_with("554 5.7.1") && reply.contains(EICAR_NAME), "{reply}");
        assert!(server.is_banned(source.parse().unwrap()), "{source} banned (B3)");
    }
    assert!(!server.is_banned("127.0.0.61".parse().unwrap()));
    assert_eq!(std::fs::read_dir(dir.path().join("maildir/new")).unwrap().count(), 1);
    let _ = stop.send(());
    run.await.unwrap().unwrap();
}
