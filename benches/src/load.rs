//! The drivers: how many sessions, when, and what is measured around them.
//!
//! - [`closed_loop`]: N sessions by C workers, each starting its next session when the last
//!   one ends — the most a server does at that concurrency (sessions/s, CPU per session).
//! - [`open_loop`]: sessions started on a fixed schedule (`rate` per second for `duration`),
//!   whatever the server's speed, each timed from its scheduled start, so a slow server shows
//!   as latency and a backlog instead of as a slower client (no coordinated omission).
//! - [`hold`]: C sessions opened and kept open at once (after `MAIL FROM:<>`), then all
//!   finished: the server's memory with that many clients.
//! - [`external`]: another client program (Postfix's `smtp-source`), timed, with the same
//!   server measurements.
//!
//! The server's CPU and memory come from /proc ([`crate::procfs`]); a thread samples its
//! resident memory every 200 ms while the run goes on.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::client::{
    Class, ClientConfig, Failure, Progress, SessionResult, Step, Workload, finish_held, open_and_start, timed_session,
};
use crate::procfs::{self, TreeSample};
use crate::report::{Latency, RunReport, ServerUse};
use crate::sources::SourceCursor;

/// A run: the client's configuration, its source addresses, the workload and the server.
#[derive(Debug, Clone)]
pub struct Run {
    /// What every session shares.
    pub cfg: Arc<ClientConfig>,
    /// The source addresses.
    pub sources: Arc<SourceCursor>,
    /// What the sessions are.
    pub workload: Workload,
    /// The server's name in the report.
    pub server: String,
    /// The server's process, for CPU and memory (none: not measured).
    pub server_pid: Option<u32>,
}

/// Outcomes gathered by one worker or the whole run.
#[derive(Debug, Default)]
struct Tally {
    latency_us: BTreeMap<Class, Vec<u32>>,
    errors: BTreeMap<String, u64>,
    ok: u64,
    failed: u64,
    skipped: u64,
    tls_failed: u64,
    tls: BTreeMap<String, u64>,
}

impl Tally {
    fn add(&mut self, class: Class, result: &SessionResult, took: Duration, p: &Progress) {
        self.skipped += u64::from(p.skipped);
        if let Some(n) = p.tls {
            *self.tls.entry(n.to_string()).or_default() += 1;
        }
        match result {
            Ok(()) => {
                self.ok += 1;
                let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
                self.latency_us.entry(class).or_default().push(us);
            }
            Err(f) => {
                self.failed += 1;
                self.tls_failed += u64::from(f.is_tls());
                *self.errors.entry(f.key()).or_default() += 1;
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        for (class, mut v) in other.latency_us {
            self.latency_us.entry(class).or_default().append(&mut v);
        }
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        self.ok += other.ok;
        self.failed += other.failed;
        self.skipped += other.skipped;
        self.tls_failed += other.tls_failed;
        for (k, n) in other.tls {
            *self.tls.entry(k).or_default() += n;
        }
    }

    fn into_report(mut self, run: &Run, mode: &str, elapsed: Duration) -> RunReport {
        let sessions = self.ok + self.failed;
        let mut latency = BTreeMap::new();
        let mut all: Vec<u32> = self.latency_us.values().flatten().copied().collect();
        latency.insert("all".to_string(), Latency::from_samples(&mut all));
        if self.latency_us.len() > 1 {
            for (class, v) in &mut self.latency_us {
                latency.insert(class.as_str().to_string(), Latency::from_samples(v));
            }
        }
        RunReport {
            server: run.server.clone(),
            client: "loadgen".into(),
            mode: mode.into(),
            workload: run.workload.as_str().into(),
            target: run.cfg.target.to_string(),
            sessions,
            elapsed_s: elapsed.as_secs_f64(),
            sessions_per_s: sessions as f64 / elapsed.as_secs_f64().max(1e-9),
            ok: self.ok,
            errors: self.failed,
            error_kinds: self.errors,
            latency,
            sources_skipped: self.skipped,
            starttls: run.cfg.tls.is_some(),
            tls_handshake_failures: self.tls_failed,
            tls_negotiated: self.tls,
            ..RunReport::default()
        }
    }
}

/// Measures a server process (tree) from [`Monitor::start`] to [`Monitor::finish`].
#[derive(Debug)]
pub struct Monitor {
    pid: u32,
    start: TreeSample,
    client_cpu: Duration,
    peak_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<Vec<(f64, u64)>>>,
}

/// Seconds between the points of the memory trace a run reports.
const TRACE_EVERY_SECS: u32 = 5;

impl Monitor {
    /// Resets the server's peak-RSS counter, takes the first sample and starts sampling its
    /// memory. Without a pid, measures only the client's own CPU.
    pub fn start(pid: Option<u32>) -> anyhow::Result<Monitor> {
        let client_cpu = procfs::self_cpu();
        let (peak_kib, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let Some(pid) = pid else {
            return Ok(Monitor { pid: 0, start: TreeSample::default(), client_cpu, peak_kib, stop, sampler: None });
        };
        procfs::reset_peak(pid);
        let start = procfs::sample(pid)?;
        peak_kib.store(start.memory_kib(), Ordering::Relaxed);
        let sampler = {
            let (peak, stop) = (peak_kib.clone(), stop.clone());
            let started = Instant::now();
            std::thread::spawn(move || {
                let mut trace = Vec::new();
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    // Every 200 ms: a few hundred /proc reads for a Postfix tree, cheap next to
                    // the client's own work.
                    std::thread::sleep(Duration::from_millis(200));
                    n += 1;
                    if let Ok(s) = procfs::sample(pid) {
                        peak.fetch_max(s.memory_kib(), Ordering::Relaxed);
                        if n.is_multiple_of(TRACE_EVERY_SECS * 5) {
                            trace.push((started.elapsed().as_secs_f64(), s.memory_kib()));
                        }
                    }
                }
                trace
            })
        };
        Ok(Monitor { pid, start, client_cpu, peak_kib, stop, sampler: Some(sampler) })
    }

    /// The server's resident memory now, KiB.
    pub fn rss_now(&self) -> Option<u64> {
        (self.pid != 0).then(|| procfs::sample(self.pid).map(|s| s.memory_kib()).ok()).flatten()
    }

    /// Stops sampling; fills in the report's server use and client CPU.
    pub fn finish(mut self, report: &mut RunReport) {
        let client_cpu = procfs::self_cpu().saturating_sub(self.client_cpu);
        let per_session = |d: Duration| d.as_secs_f64() * 1e6 / (report.sessions.max(1) as f64);
        report.client_cpu_us_per_session = per_session(client_cpu);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.sampler.take() {
            report.memory_trace_kib = t.join().unwrap_or_default();
        }
        if self.pid == 0 {
            return;
        }
        let Ok(end) = procfs::sample(self.pid) else {
            eprintln!("loadgen: server process {} is gone; no server figures", self.pid);
            return;
        };
        let cpu = end.cpu().saturating_sub(self.start.cpu());
        let single = end.processes == 1;
        let peak = if single { end.root_hwm_kib } else { self.peak_kib.load(Ordering::Relaxed).max(end.memory_kib()) };
        report.server_use = Some(ServerUse {
            pid: self.pid,
            processes: end.processes,
            cpu_s: cpu.as_secs_f64(),
            cpu_us_per_session: per_session(cpu),
            rss_start_kib: self.start.memory_kib(),
            rss_peak_kib: peak,
            rss_end_kib: end.memory_kib(),
            peak_source: if single { "VmHWM" } else { "sampled sum of PSS" }.into(),
        });
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// `n` sessions (numbered from `first`) by `concurrency` workers.
async fn closed_phase(run: &Run, first: u64, n: u64, concurrency: usize) -> (Tally, Duration) {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    let started = Instant::now();
    for _ in 0..concurrency.max(1) {
        let (run, next) = (run.clone(), next.clone());
        workers.spawn(async move {
            let mut tally = Tally::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return tally;
                }
                let index = first + i;
                let class = run.workload.class(run.cfg.seed, index);
                let t0 = Instant::now();
                let (result, progress) = timed_session(&run.cfg, &run.sources, class, index).await;
                tally.add(class, &result, t0.elapsed(), &progress);
            }
        });
    }
    let mut tally = Tally::default();
    while let Some(t) = workers.join_next().await {
        tally.merge(t.expect("worker panicked"));
    }
    (tally, started.elapsed())
}

/// Closed loop: `warmup` sessions unmeasured, then `sessions` measured, at `concurrency`.
pub async fn closed_loop(run: &Run, sessions: u64, concurrency: usize, warmup: u64) -> anyhow::Result<RunReport> {
    if warmup > 0 {
        let (w, took) = closed_phase(run, 1 << 40, warmup, concurrency).await;
        eprintln!(
            "loadgen: warm-up {} sessions in {:.2} s ({} errors){}",
            warmup,
            took.as_secs_f64(),
            w.failed,
            if w.failed > 0 { format!(": {:?}", w.errors) } else { String::new() }
        );
    }
    let monitor = Monitor::start(run.server_pid)?;
    let (tally, elapsed) = closed_phase(run, 0, sessions, concurrency).await;
    let mut report = tally.into_report(run, "closed", elapsed);
    report.concurrency = Some(concurrency);
    monitor.finish(&mut report);
    Ok(report)
}

/// Open loop: `rate` sessions a second for `duration`; at most `max_inflight` at once (more
/// are skipped and counted as client overload, so a stalled server cannot take the client's
/// memory with it).
pub async fn open_loop(run: &Run, rate: f64, duration: Duration, max_inflight: usize) -> anyhow::Result<RunReport> {
    anyhow::ensure!(rate > 0.0, "the rate must be positive");
    let total = (rate * duration.as_secs_f64()).round() as u64;
    let monitor = Monitor::start(run.server_pid)?;
    let inflight = Arc::new(Semaphore::new(max_inflight));
    let (tx, mut rx) = mpsc::unbounded_channel::<(Class, SessionResult, Duration, Progress)>();
    let collector = tokio::spawn(async move {
        let mut tally = Tally::default();
        while let Some((class, result, took, progress)) = rx.recv().await {
            tally.add(class, &result, took, &progress);
        }
        tally
    });
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let mut max_lag = Duration::ZERO;
    for i in 0..total {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(at).await;
        max_lag = max_lag.max(tokio::time::Instant::now().saturating_duration_since(at));
        let class = run.workload.class(run.cfg.seed, i);
        let Ok(permit) = inflight.clone().try_acquire_owned() else {
            let _ = tx.send((class, Err(Failure::Overload), Duration::ZERO, Progress::new()));
            continue;
        };
        let (run, tx) = (run.clone(), tx.clone());
        tokio::spawn(async move {
            let (result, progress) = timed_session(&run.cfg, &run.sources, class, i).await;
            // From the scheduled start: a client that fell behind shows as latency too.
            let _ = tx.send((class, result, at.elapsed(), progress));
            drop(permit);
        });
    }
    drop(tx);
    let tally = collector.await?;
    let elapsed = start.elapsed();
    let mut report = tally.into_report(run, "open", elapsed);
    report.rate = Some(rate);
    report.max_start_lag_ms = Some(max_lag.as_secs_f64() * 1e3);
    monitor.finish(&mut report);
    Ok(report)
}

/// Hold: opens `sessions` sessions (at most `connect_concurrency` connecting at once), each
/// through greeting, EHLO and `MAIL FROM:<>`; once all are open (or failed), waits `settle`,
/// reads the server's memory, then finishes them all (RCPT → 5xx, QUIT → 221).
pub async fn hold(run: &Run, sessions: u64, connect_concurrency: usize, settle: Duration) -> anyhow::Result<RunReport> {
    let monitor = Monitor::start(run.server_pid)?;
    let started = Instant::now();
    let connecting = Arc::new(Semaphore::new(connect_concurrency.max(1)));
    let (release_tx, release_rx) = watch::channel(false);
    let (opened, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = JoinSet::new();
    for _ in 0..sessions {
        let (run, connecting, mut release) = (run.clone(), connecting.clone(), release_rx.clone());
        let (opened, failed) = (opened.clone(), failed.clone());
        tasks.spawn(async move {
            let t0 = Instant::now();
            let mut p = Progress::new();
            let permit = connecting.acquire().await.expect("semaphore open");
            let conn = tokio::time::timeout(run.cfg.timeout, open_and_start(&run.cfg, &run.sources, &mut p)).await;
            drop(permit);
            let mut conn = match conn {
                Ok(Ok(c)) => c,
                Ok(Err(f)) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return (Err(f), t0.elapsed(), p);
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return (Err(Failure::Timeout { step: p.step }), t0.elapsed(), p);
                }
            };
            opened.fetch_add(1, Ordering::Relaxed);
            let _ = release.wait_for(|&go| go).await;
            p.step = Step::Held;
            let result = match tokio::time::timeout(run.cfg.timeout, finish_held(&run.cfg, &mut conn, &mut p)).await {
                Ok(r) => r,
                Err(_) => Err(Failure::Timeout { step: p.step }),
            };
            (result, t0.elapsed(), p)
        });
    }
    while opened.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < sessions {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ramp = started.elapsed();
    let held = opened.load(Ordering::Relaxed);
    tokio::time::sleep(settle).await;
    let rss_held = monitor.rss_now();
    let _ = release_tx.send(true);
    let mut tally = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        let (result, took, progress) = joined.expect("session task panicked");
        tally.add(Class::Backscatter, &result, took, &progress);
    }
    let mut report = tally.into_report(run, "hold", started.elapsed());
    // Session times here are the hold's length, not the server's speed.
    report.latency.clear();
    report.concurrency = Some(sessions as usize);
    report.held = Some(held);
    report.ramp_s = Some(ramp.as_secs_f64());
    report.rss_held_kib = rss_held;
    monitor.finish(&mut report);
    Ok(report)
}

/// Runs another client program (`command`, which plays `sessions` sessions of `workload`)
/// against the server and measures the server around it. Sessions/s is `sessions` over the
/// program's wall time. The program's own checks: its exit status and, with `expect`, the
/// lines of its stderr that contain `expect` (one per correct session: `smtp-source -A`
/// warns once per rejected recipient); the other stderr lines are counted as errors by kind.
pub fn external(
    server: &str,
    server_pid: Option<u32>,
    workload: Workload,
    sessions: u64,
    client: &str,
    expect: Option<&str>,
    command: &[String],
) -> anyhow::Result<RunReport> {
    use std::io::BufRead;
    let (program, args) = command.split_first().ok_or_else(|| anyhow::anyhow!("no command given"))?;
    let monitor = Monitor::start(server_pid)?;
    let started = Instant::now();
    let mut child = std::process::Command::new(program)
        .args(args)
        .stderr(if expect.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::inherit() })
        .spawn()?;
    let mut matched = 0u64;
    let mut others: BTreeMap<String, u64> = BTreeMap::new();
    if let (Some(pattern), Some(stderr)) = (expect, child.stderr.take()) {
        for line in std::io::BufReader::new(stderr).lines() {
            let line = line?;
            if line.contains(pattern) {
                matched += 1;
            } else {
                // Numbers (recipient sequence numbers, pids) would make every line its own kind.
                let kind: String = line.chars().filter(|c| !c.is_ascii_digit()).take(100).collect();
                *others.entry(kind).or_default() += 1;
            }
        }
    }
    let status = child.wait()?;
    let elapsed = started.elapsed();
    let ok = match expect {
        Some(_) => matched.min(sessions),
        None if status.success() => sessions,
        None => 0,
    };
    let mut report = RunReport {
        server: server.into(),
        client: client.into(),
        mode: "external".into(),
        workload: workload.as_str().into(),
        target: String::new(),
        sessions,
        elapsed_s: elapsed.as_secs_f64(),
        sessions_per_s: sessions as f64 / elapsed.as_secs_f64().max(1e-9),
        ok,
        errors: sessions - ok,
        error_kinds: others,
        exit_status: status.code(),
        ..RunReport::default()
    };
    if !status.success() {
        report.errors = report.errors.max(1);
        report.error_kinds.insert(format!("{client} exited with {status}"), 1);
    }
    if expect.is_some() && matched < sessions {
        report.error_kinds.insert(format!("sessions without the expected stderr line: {}", sessions - matched), 1);
    }
    monitor.finish(&mut report);
    // The monitor counted this process's CPU, not the external client's.
    report.client_cpu_us_per_session = 0.0;
    Ok(report)
}
