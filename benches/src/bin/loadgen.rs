//! `loadgen`: the load benchmark's command line (issue [load bench]).
//!
//! ```text
//! loadgen run       --target 127.0.0.1:2525 --workload early-reject -n 20000 -c 100 --server-pid PID
//! loadgen run       --target 127.0.0.1:2525 --workload early-reject --starttls --tls-ca cert.pem --tls-name mx.bench.test
//! loadgen spike     --target 127.0.0.1:2525 --workload mix --rate 1250 --duration 60 --server-pid PID
//! loadgen hold      --target 127.0.0.1:2525 -n 10000 --server-pid PID
//! loadgen external  --server postfix --server-pid PID --workload early-reject -n 20000 --client smtp-source -- smtp-source ...
//! loadgen propagation --target 127.0.0.1:2525 --other 127.0.0.1:2526 -n 200
//! loadgen responder --listen 127.0.0.1:2527
//! loadgen table     results.jsonl
//! ```
//!
//! Each run prints a summary on stdout and, with `--json FILE`, appends one JSON line to FILE;
//! `table` turns such a file into the side-by-side table. `ci/bench-peers.sh` drives it all.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use gatekeeper_benches::client::{ClientConfig, StartTls, Workload};
use gatekeeper_benches::load::{self, Run};
use gatekeeper_benches::null_smtpd::{self, Responder};
use gatekeeper_benches::report::{self, RunReport};
use gatekeeper_benches::sources::SourceCursor;

/// SMTP load generator, do-nothing responder and report table for the gatekeeper's load
/// benchmark.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Closed loop: N sessions at concurrency C; sessions/s, latency, server CPU and RSS.
    Run {
        #[command(flatten)]
        common: Common,
        /// What the sessions are.
        #[arg(long, short, value_enum)]
        workload: Workload,
        /// Measured sessions.
        #[arg(long, short = 'n', default_value_t = 20_000)]
        sessions: u64,
        /// Sessions at once.
        #[arg(long, short, default_value_t = 100)]
        concurrency: usize,
        /// Unmeasured sessions first (connection set-up, server warm-up).
        #[arg(long, default_value_t = 1000)]
        warmup: u64,
    },
    /// Open loop: sessions started at a fixed rate for a duration, whatever the server does.
    Spike {
        #[command(flatten)]
        common: Common,
        /// What the sessions are.
        #[arg(long, short, value_enum, default_value_t = Workload::Mix)]
        workload: Workload,
        /// Sessions started per second (1,250/s is 1,000 × the seed's 4,500/h spike).
        #[arg(long, default_value_t = 1250.0)]
        rate: f64,
        /// Seconds.
        #[arg(long, default_value_t = 60.0)]
        duration: f64,
        /// Sessions in flight at most; beyond, skipped and counted as client overload.
        #[arg(long, default_value_t = 15_000)]
        max_inflight: usize,
    },
    /// Opens N sessions and keeps them all open at once; the server's memory then.
    Hold {
        #[command(flatten)]
        common: Common,
        /// Sessions held open at once.
        #[arg(long, short = 'n', default_value_t = 10_000)]
        sessions: u64,
        /// Sessions connecting at once while opening (100: below the 128-connection listen
        /// backlog tokio's `bind` gives, so the figure is memory, not SYN retransmits).
        #[arg(long, default_value_t = 100)]
        connect_concurrency: usize,
        /// Seconds to wait once all are open, before reading the server's memory.
        #[arg(long, default_value_t = 1.0)]
        settle: f64,
    },
    /// Times another client program against a server, with the same server measurements.
    External {
        /// The server's name in the table.
        #[arg(long)]
        server: String,
        /// The server's process (its children are counted too).
        #[arg(long)]
        server_pid: Option<u32>,
        /// The workload the program plays.
        #[arg(long, short, value_enum)]
        workload: Workload,
        /// Sessions the program plays.
        #[arg(long, short = 'n')]
        sessions: u64,
        /// The client's name in the table.
        #[arg(long, default_value = "smtp-source")]
        client: String,
        /// One line of the program's stderr containing this per correct session (`smtp-source
        /// -A` warns "recipient rejected: 550" once per rejected recipient); other lines are
        /// errors. Without it, only the exit status is checked.
        #[arg(long)]
        expect_stderr: Option<String>,
        /// Append the result as one JSON line to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Exit 2 if any session failed.
        #[arg(long)]
        fail_on_errors: bool,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// The do-nothing SMTP responder (the ceiling): same replies, no logic, no storage.
    Responder {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:2527")]
        listen: SocketAddr,
        /// The local domain.
        #[arg(long, default_value = "example.test")]
        domain: String,
        /// Existing local parts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "alice,bob")]
        users: Vec<String>,
    },
    /// Ban propagation between two nodes of a cluster (docs/cluster.md): N times, a forged
    /// local sender on `--target` (550 and a B1 ban), then the same address polled on `--other`
    /// until its greeting is 554; prints p50/p90/p99/max of the time from the 550 to the 554.
    Propagation {
        /// The node that bans.
        #[arg(long, short, default_value = "127.0.0.1:2525")]
        target: SocketAddr,
        /// The node that must refuse.
        #[arg(long)]
        other: SocketAddr,
        /// Bans measured.
        #[arg(long, short = 'n', default_value_t = 200)]
        bans: u64,
        /// The first source address's index (127.1.0.1 is index 0).
        #[arg(long, default_value_t = 0)]
        source_start: u64,
        /// Give up on one ban after this many seconds.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// Prints the side-by-side table from files of JSON lines written with `--json`.
    Table {
        /// The files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Options every load run shares.
#[derive(Debug, Args)]
struct Common {
    /// The server.
    #[arg(long, short, default_value = "127.0.0.1:2525")]
    target: SocketAddr,
    /// The server's name in the report and table.
    #[arg(long, default_value = "server")]
    server: String,
    /// The server's process, for its CPU and memory (its children are counted too).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Append the result as one JSON line to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Continue the source addresses from this file and save where they stopped, so runs
    /// against the same server never reuse an address (G1 would refuse it for a minute).
    #[arg(long)]
    sources: Option<PathBuf>,
    /// The first source address's index, without `--sources` (127.1.0.1 is index 0).
    #[arg(long, default_value_t = 0)]
    source_start: u64,
    /// The server's local domain.
    #[arg(long, default_value = "example.test")]
    domain: String,
    /// Existing local parts there, comma-separated (honest mail goes to them).
    #[arg(long, value_delimiter = ',', default_value = "alice,bob")]
    users: Vec<String>,
    /// Seconds a whole session may take.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Seed of the random local parts and of the mix.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Size of the honest message, octets.
    #[arg(long, default_value_t = 1024)]
    message_bytes: usize,
    /// Exit 2 if any session failed (for CI smoke runs; figures are never judged).
    #[arg(long)]
    fail_on_errors: bool,
    /// STARTTLS in every session: EHLO, STARTTLS (220), a full TLS handshake (no resumption),
    /// EHLO again, then the workload's dialogue. A refused STARTTLS or a failed handshake is a
    /// failed session, counted as a handshake failure.
    #[arg(long)]
    starttls: bool,
    /// With --starttls: trust the certificate(s) in this PEM file (the benchmark's self-signed
    /// certificate) for --tls-name; without it, any certificate is taken (its handshake
    /// signatures still verified).
    #[arg(long, requires = "starttls")]
    tls_ca: Option<PathBuf>,
    /// With --starttls: the server's name (SNI, and the name its certificate must carry
    /// with --tls-ca).
    #[arg(long, default_value = "mx.bench.test", requires = "starttls")]
    tls_name: String,
}

impl Common {
    fn run(&self, workload: Workload) -> anyhow::Result<Run> {
        let sources = match &self.sources {
            Some(path) => SourceCursor::load(path).with_context(|| format!("reading {}", path.display()))?,
            None => SourceCursor::new(self.source_start),
        };
        let cfg = ClientConfig::new(
            self.target,
            &self.domain,
            self.users.clone(),
            Duration::from_secs_f64(self.timeout),
            self.seed,
            self.message_bytes,
        );
        let cfg =
            if self.starttls { cfg.with_starttls(StartTls::new(self.tls_ca.as_deref(), &self.tls_name)?) } else { cfg };
        Ok(Run {
            cfg: Arc::new(cfg),
            sources: Arc::new(sources),
            workload,
            server: self.server.clone(),
            server_pid: self.server_pid,
        })
    }

    /// Saves the source cursor, prints and records the report; the exit code.
    fn finish(&self, run: &Run, report: &RunReport) -> anyhow::Result<ExitCode> {
        if let Some(path) = &self.sources {
            run.sources.save(path).with_context(|| format!("writing {}", path.display()))?;
        }
        emit(report, self.json.as_ref())?;
        Ok(if self.fail_on_errors && report.errors > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
    }
}

fn emit(report: &RunReport, json: Option<&PathBuf>) -> anyhow::Result<()> {
    print!("{}", report.summary());
    if let Some(path) = json {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{}", serde_json::to_string(report)?)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn real_main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Run { common, workload, sessions, concurrency, warmup } => {
            let run = common.run(workload)?;
            let report = runtime()?.block_on(load::closed_loop(&run, sessions, concurrency, warmup))?;
            common.finish(&run, &report)
        }
        Command::Spike { common, workload, rate, duration, max_inflight } => {
            let run = common.run(workload)?;
            let duration = Duration::from_secs_f64(duration);
            let report = runtime()?.block_on(load::open_loop(&run, rate, duration, max_inflight))?;
            common.finish(&run, &report)
        }
        Command::Hold { common, sessions, connect_concurrency, settle } => {
            let run = common.run(Workload::EarlyReject)?;
            let settle = Duration::from_secs_f64(settle);
            let report = runtime()?.block_on(load::hold(&run, sessions, connect_concurrency, settle))?;
            common.finish(&run, &report)
        }
        Command::External {
            server,
            server_pid,
            workload,
            sessions,
            client,
            expect_stderr,
            json,
            fail_on_errors,
            command,
        } => {
            let expect = expect_stderr.as_deref();
            let report = load::external(&server, server_pid, workload, sessions, &client, expect, &command)?;
            emit(&report, json.as_ref())?;
            Ok(if fail_on_errors && report.errors > 0 { ExitCode::from(2) } else { ExitCode::SUCCESS })
        }
        Command::Responder { listen, domain, users } => {
            let responder = Responder { domain: domain.to_ascii_lowercase(), users };
            runtime()?.block_on(null_smtpd::run(listen, responder)).with_context(|| format!("serving {listen}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Propagation { target, other, bans, source_start, timeout } => {
            runtime()?.block_on(propagation(target, other, bans, source_start, Duration::from_secs_f64(timeout)))
        }
        Command::Table { files } => {
            let mut reports = Vec::new();
            for path in files {
                let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                    let r: RunReport =
                        serde_json::from_str(line).with_context(|| format!("{}:{}", path.display(), i + 1))?;
                    reports.push(r);
                }
            }
            print!("{}", report::table(&reports));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The first line of each reply to `lines`, from `source`, the greeting first.
async fn dialogue(server: SocketAddr, source: std::net::Ipv4Addr, lines: &[&str]) -> anyhow::Result<Vec<String>> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.into(), 0))?;
    let stream = socket.connect(server).await?;
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut replies = Vec::new();
    for i in 0..=lines.len() {
        if i > 0 {
            w.write_all(format!("{}\r\n", lines[i - 1]).as_bytes()).await?;
        }
        let mut first = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await? == 0 {
                break;
            }
            if first.is_empty() {
                first = line.trim_end().to_string();
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        let done = !first.starts_with('2') && !first.starts_with('3');
        replies.push(first);
        if done {
            break;
        }
    }
    Ok(replies)
}

/// See [`Command::Propagation`].
async fn propagation(
    target: SocketAddr,
    other: SocketAddr,
    bans: u64,
    start: u64,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let cursor = SourceCursor::new(start);
    let mut took = Vec::new();
    let mut lost = 0;
    for _ in 0..bans {
        let source = cursor.take();
        let r = dialogue(target, source, &["EHLO bench.test", "MAIL FROM:<nobody@example.test>"]).await?;
        anyhow::ensure!(r.get(2).is_some_and(|l| l.starts_with("550")), "{source}: not banned on {target}: {r:?}");
        let banned = std::time::Instant::now();
        loop {
            let g = dialogue(other, source, &[]).await?;
            if g[0].starts_with("554") {
                took.push(banned.elapsed());
                break;
            }
            if banned.elapsed() > timeout {
                lost += 1;
                break;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    took.sort();
    let q = |p: f64| took.get(((took.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or_default();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "propagation {target} -> {other}: {} bans, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms, not within {timeout:?}: {lost}",
        took.len(),
        ms(q(0.50)),
        ms(q(0.90)),
        ms(q(0.99)),
        ms(q(1.0)),
    );
    Ok(if lost == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
}
