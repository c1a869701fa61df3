//! `gatekeeper-sim run [SCENARIO.toml ... | DIR] [--seed N] [--out DIR] [--json] [--jobs N]`:
//! runs the scenario suite in the deterministic simulation (one run per core at a time) and
//! reports, in the suite's order; exit status 1 if any expectation fails.
//!
//! `gatekeeper-sim replay LOG... --config FILE [--format F] [--year Y] [--seed S]`: replays a
//! real mail log through the gatekeeper on that configuration and reports what would have
//! differed (docs/simulation.md §5).
//!
//! `gatekeeper-sim sweep [PATHS] --seeds A..B [--jobs N]`: runs every scenario on every seed of
//! the range, in parallel, and reports per expectation the seeds on which it failed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use gatekeeper_sim::fmt::num;
use gatekeeper_sim::report::{ExpectResult, Report, reset_peak_rss};
use gatekeeper_sim::runner::{self, Progress};
use gatekeeper_sim::world::Sabotage;

/// mimalloc instead of glibc's malloc: the simulation allocates and frees small objects by the
/// million (sessions, messages, timers), and a replay frees on the simulation's thread what
/// the log reader allocated on its own; with glibc, malloc and free were a fifth of a
/// replayed week's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(name = "gatekeeper-sim", version, about = "Deterministic simulation of the gatekeeper")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs scenarios (files, or every *.toml in a directory; default `scenarios/`).
    Run {
        /// Scenario files or directories.
        paths: Vec<PathBuf>,
        /// Overrides every scenario's seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Writes <DIR>/<scenario>/report.json, report.md and hourly.svg.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Prints the reports as one JSON array on stdout instead of tables.
        #[arg(long)]
        json: bool,
        /// Breaks a rule on purpose, to show that the suite notices.
        #[arg(long, value_enum, default_value_t = Sabotage::None)]
        sabotage: Sabotage,
        /// Ticks through quiet time instead of skipping it: slower (docs/simulation.md §2,
        /// *Quiet time*).
        #[arg(long)]
        tick_through: bool,
        /// Runs at once (default: the machine's cores). Each run is deterministic on its own;
        /// with more than one, the memory column is the process's peak so far.
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Runs every scenario on every seed of a range, in parallel, and lists per expectation
    /// the seeds that fail it: an expectation must hold for any seed, not only the embedded one.
    Sweep {
        /// Scenario files or directories.
        paths: Vec<PathBuf>,
        /// Seeds, `A..B` (inclusive) or one number.
        #[arg(long, default_value = "1..20", value_parser = parse_seeds)]
        seeds: (u64, u64),
        /// Runs at once (default: the machine's cores).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Replays a mail log (Postfix, sendmail or the gatekeeper's JSON log) through the
    /// gatekeeper on a configuration: what would it have done to that traffic?
    Replay {
        /// Log files; rotated and gzipped ones are read oldest first.
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// The gatekeeper's configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Which program wrote the log (default: each line decides).
        #[arg(long, value_enum, default_value_t = gatekeeper_sim::replay::Format::Auto)]
        format: gatekeeper_sim::replay::Format,
        /// The year of timestamps without one (default: the oldest file's modification year).
        #[arg(long)]
        year: Option<i64>,
        /// The zone of timestamps without one, as `+01:00` (default UTC).
        #[arg(long, default_value = "+00:00", value_parser = parse_offset)]
        utc_offset: i64,
        /// The seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// turmoil's tick.
        #[arg(long, default_value = "250ms", value_parser = humantime_serde::re::humantime::parse_duration)]
        tick: Duration,
        /// How long retries may go on after the last logged session.
        #[arg(long, default_value = "6h", value_parser = humantime_serde::re::humantime::parse_duration)]
        drain: Duration,
        /// Writes <DIR>/replay/report.json, report.md, hourly.svg, bans.txt and replay.json (the counts).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Only reads the log into sessions (no simulation): how fast the parser is.
        #[arg(long)]
        parse_only: bool,
    },
    /// Writes a synthetic Postfix log (a week of a busy MX) on stdout, to measure `replay`.
    SynthLog {
        /// About this many lines.
        #[arg(long, default_value_t = 1_000_000)]
        lines: u64,
        /// The seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Days the log spans (from 2026-12-01 00:00 UTC).
        #[arg(long, default_value_t = 7)]
        days: u32,
    },
}

/// `+01:00`, `-0230`, `Z`: seconds east of UTC.
fn parse_offset(s: &str) -> Result<i64, String> {
    if s == "Z" || s == "UTC" {
        return Ok(0);
    }
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(format!("{s:?}: expected +HH:MM or -HH:MM")),
    };
    let digits: String = rest.chars().filter(|c| *c != ':').collect();
    if digits.len() != 4 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!("{s:?}: expected +HH:MM or -HH:MM"));
    }
    let (h, m): (i64, i64) = (digits[..2].parse().unwrap_or(0), digits[2..].parse().unwrap_or(0));
    Ok(sign * (h * 3600 + m * 60))
}

/// `A..B` (inclusive) or `N`.
fn parse_seeds(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once("..").unwrap_or((s, s));
    let parse = |x: &str| x.trim().parse::<u64>().map_err(|e| format!("{x:?}: {e}"));
    let (a, b) = (parse(a)?, parse(b)?);
    if a > b {
        return Err(format!("{s:?}: the first seed is after the last"));
    }
    Ok((a, b))
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run { paths, seed, out, json, sabotage, tick_through, jobs } => {
            run(paths, seed, Output { dir: out, json }, sabotage, tick_through, jobs)
        }
        Command::Sweep { paths, seeds, jobs } => sweep(paths, seeds, jobs),
        Command::SynthLog { lines, seed, days } => {
            let stdout = std::io::stdout().lock();
            let mut w = std::io::BufWriter::with_capacity(1 << 20, stdout);
            let start = gatekeeper_sim::replay::time::days_from_civil(2026, 12, 1) * 86_400_000;
            let span = i64::from(days) * 86_400_000;
            match gatekeeper_sim::replay::synth::write(&mut w, lines, start, span, seed).and_then(|n| {
                std::io::Write::flush(&mut w)?;
                Ok(n)
            }) {
                Ok(n) => {
                    eprintln!("synth-log: {n} lines");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("gatekeeper-sim: synth-log: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Replay { logs, config, format, year, utc_offset, seed, tick, drain, out, parse_only } => {
            let opts = gatekeeper_sim::replay::drive::Options {
                files: logs,
                format,
                config,
                year,
                utc_offset_secs: utc_offset,
                seed,
                tick,
                drain,
            };
            if parse_only { parse_only_run(&opts) } else { replay(&opts, out) }
        }
    }
}

fn default_paths(paths: Vec<PathBuf>) -> Vec<PathBuf> {
    if paths.is_empty() { vec![PathBuf::from("scenarios")] } else { paths }
}

/// What one (run, seed) of a sweep gave: its failed expectations (none: it passed), not the
/// whole report — hundreds of runs are kept until the end.
struct Swept {
    name: String,
    seed: u64,
    result: Result<Vec<ExpectResult>, String>,
}

fn sweep(paths: Vec<PathBuf>, (first, last): (u64, u64), jobs: Option<usize>) -> ExitCode {
    let paths = default_paths(paths);
    let mut work = Vec::new();
    for seed in first..=last {
        match runner::load(&paths, Some(seed)) {
            Ok(runs) => work.extend(runs),
            Err(e) => {
                eprintln!("gatekeeper-sim: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let jobs = jobs_or_cores(jobs);
    println!("sweep: {} runs (seeds {first}..{last}) on {jobs} threads", work.len());
    let started = Instant::now();
    let total = work.len();
    let mut done: Vec<Swept> = Vec::with_capacity(total);
    let sweep_one = |run: gatekeeper_sim::scenario::Run| {
        let (name, seed) = (run.name.clone(), run.seed);
        let result = runner::resolve(&run, Sabotage::None)
            .and_then(|cfg| runner::run(cfg, &mut ()).map_err(|e| format!("{e:#}")))
            .map(|r| r.expectations.into_iter().filter(|e| !e.pass).collect());
        Swept { name, seed, result }
    };
    // As each run ends, one line on stderr: a long sweep shows where it is.
    on_threads(work, jobs, sweep_one, |_, s| {
        let verdict = match &s.result {
            Ok(failed) if failed.is_empty() => "pass",
            Ok(_) => "FAIL",
            Err(_) => "error",
        };
        eprintln!("[{}/{total}] {} seed {}: {verdict}", done.len() + 1, s.name, s.seed);
        done.push(s);
    });
    done.sort_by(|a, b| a.name.cmp(&b.name).then(a.seed.cmp(&b.seed)));
    // Per run: seeds passed; per failing expectation: seed (actual).
    let mut failed = false;
    let mut by_run: std::collections::BTreeMap<&str, Vec<&Swept>> = std::collections::BTreeMap::new();
    for s in &done {
        by_run.entry(&s.name).or_default().push(s);
    }
    for (name, swept) in &by_run {
        let passed = swept.iter().filter(|s| s.result.as_ref().is_ok_and(Vec::is_empty)).count();
        println!("{:<44} {passed}/{} seeds", name, swept.len());
        let mut fails: std::collections::BTreeMap<String, Vec<String>> = std::collections::BTreeMap::new();
        for s in swept {
            match &s.result {
                Err(e) => fails.entry("(error)".into()).or_default().push(format!("{}: {e}", s.seed)),
                Ok(failed) => {
                    for e in failed {
                        // A bound that names a metric shows its value per seed: `(= 12)`.
                        let (expect, bound) = e.expect.split_once(" (= ").unwrap_or((&e.expect, ""));
                        let key = format!("{} {expect}", e.metric);
                        let bound = bound.strip_suffix(')').map(|b| format!(" vs {b}")).unwrap_or_default();
                        fails.entry(key).or_default().push(format!("{} ({}{bound})", s.seed, num(e.actual)));
                    }
                }
            }
        }
        failed |= !fails.is_empty();
        for (what, seeds) in fails {
            println!("   FAIL {what}: seeds {}", seeds.join(", "));
        }
    }
    let passed = done.iter().filter(|s| s.result.as_ref().is_ok_and(Vec::is_empty)).count();
    println!("{passed}/{total} runs passed in {:.1} s wall", started.elapsed().as_secs_f64());
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

/// `--jobs`, or else the machine's cores.
fn jobs_or_cores(jobs: Option<usize>) -> usize {
    jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1)
}

/// Runs `work` on every item, on `jobs` threads taking items in order, and hands each result
/// with its item's index to `done` on this thread as it ends (in the order runs end).
fn on_threads<T: Send, R: Send>(
    items: Vec<T>,
    jobs: usize,
    work: impl Fn(T) -> R + Sync,
    mut done: impl FnMut(usize, R),
) {
    let queue = std::sync::Mutex::new(items.into_iter().enumerate());
    let (tx, rx) = std::sync::mpsc::channel::<(usize, R)>();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let (tx, queue, work) = (tx.clone(), &queue, &work);
            scope.spawn(move || {
                loop {
                    let Some((i, item)) = queue.lock().expect("work queue").next() else { return };
                    if tx.send((i, work(item))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        for (i, result) in rx {
            done(i, result);
        }
    });
}

/// Where `run` puts its reports.
#[derive(Debug)]
struct Output {
    /// `--out`: report.json, report.md and hourly.svg per scenario.
    dir: Option<PathBuf>,
    /// `--json`: one JSON array on stdout instead of tables.
    json: bool,
}

impl Output {
    /// Shows one finished run; false if its files could not be written.
    fn report(&self, report: &Report) -> bool {
        if !self.json {
            println!("-- {}: seed {}", report.scenario, report.seed);
            print!("{}", report.table());
        }
        if let Some(dir) = &self.dir
            && let Err(e) = report.write(dir)
        {
            eprintln!("gatekeeper-sim: writing {}: {e:#}", dir.display());
            return false;
        }
        true
    }
}

fn run(
    paths: Vec<PathBuf>,
    seed: Option<u64>,
    output: Output,
    sabotage: Sabotage,
    tick_through: bool,
    jobs: Option<usize>,
) -> ExitCode {
    let paths = default_paths(paths);
    // The seed comes first, so that any run can be reproduced from its first line.
    let seed_line = match seed {
        Some(s) => format!("seed {s}"),
        None => "seed: each scenario's own (override with --seed N)".to_string(),
    };
    if output.json {
        eprintln!("{seed_line}");
    } else {
        println!("{seed_line}");
    }
    let runs = match runner::load(&paths, seed) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gatekeeper-sim: {e}");
            return ExitCode::from(2);
        }
    };
    // Every run resolves before any starts: a bad scenario stops the suite at once.
    let mut cfgs = Vec::with_capacity(runs.len());
    for run in &runs {
        match runner::resolve(run, sabotage) {
            Ok(mut cfg) => {
                cfg.skip_quiet = !tick_through;
                cfgs.push(cfg);
            }
            Err(e) => {
                eprintln!("gatekeeper-sim: {}: {e}", run.name);
                return ExitCode::from(2);
            }
        }
    }
    let total = cfgs.len();
    let jobs = jobs_or_cores(jobs).min(total.max(1));
    let suite = Instant::now();
    let mut reports: Vec<Report> = Vec::with_capacity(total);
    if jobs == 1 {
        for cfg in cfgs {
            let name = cfg.run.name.clone();
            reset_peak_rss();
            let mut progress = Bar::new(&name, cfg.horizon);
            let report = runner::run(cfg, &mut progress);
            progress.finish();
            match report {
                Ok(r) if output.report(&r) => reports.push(r),
                Ok(_) => return ExitCode::from(2),
                Err(e) => {
                    eprintln!("gatekeeper-sim: {name}: {e:#}");
                    return ExitCode::from(2);
                }
            }
        }
    } else {
        // Reports shown in the suite's order as soon as every run before them has ended.
        let mut waiting = std::collections::BTreeMap::new();
        let mut broken = false;
        let run_one = |cfg: gatekeeper_sim::world::Resolved| (cfg.run.name.clone(), runner::run(cfg, &mut ()));
        on_threads(cfgs, jobs, run_one, |i, (name, report)| {
            match report {
                Ok(r) => {
                    waiting.insert(i, r);
                }
                Err(e) => {
                    eprintln!("gatekeeper-sim: {name}: {e:#}");
                    broken = true;
                }
            }
            while let Some(r) = waiting.remove(&reports.len()) {
                broken |= !output.report(&r);
                reports.push(r);
            }
        });
        if broken || reports.len() != total {
            return ExitCode::from(2);
        }
    }
    let failed = reports.iter().any(|r| !r.passed);
    let wall = suite.elapsed();
    if output.json {
        let all: Vec<serde_json::Value> =
            reports.iter().map(|r| serde_json::to_value(r).expect("serializes")).collect();
        println!("{}", serde_json::to_string_pretty(&all).expect("serializes"));
    } else {
        println!(
            "\n{:<38} {:>6} {:>10} {:>9} {:>8} {:>9} {:>8}",
            "scenario", "result", "attempts", "wall s", "ratio", "RSS MiB", "violat."
        );
        for r in &reports {
            println!(
                "{:<38} {:>6} {:>10} {:>9.2} {:>8} {:>9.0} {:>8}",
                r.scenario,
                if r.passed { "pass" } else { "FAIL" },
                num(r.metrics["attempts"]),
                r.timing.wall.as_secs_f64(),
                num(r.timing.ratio.round()),
                r.timing.peak_rss_mib,
                num(r.metrics["violations"]),
            );
        }
        let passed = reports.iter().filter(|r| r.passed).count();
        let on = if jobs > 1 { format!(" ({jobs} at a time; memory: the process's peak)") } else { String::new() };
        println!("{passed}/{} passed in {:.1} s wall{on}", reports.len(), wall.as_secs_f64());
    }
    if failed { ExitCode::from(1) } else { ExitCode::SUCCESS }
}

fn parse_only_run(opts: &gatekeeper_sim::replay::drive::Options) -> ExitCode {
    reset_peak_rss();
    let started = Instant::now();
    match gatekeeper_sim::replay::drive::parse_only(opts) {
        Ok((stats, sessions, held_max)) => {
            let wall = started.elapsed().as_secs_f64();
            println!(
                "parsed {} lines ({} used, {} ignored, {} unknown) into {} sessions in {wall:.1} s ({:.0} lines/s); \
                 at most {} sessions held; peak RSS {:.0} MiB",
                num(stats.lines as f64),
                num(stats.used as f64),
                num(stats.ignored as f64),
                num(stats.unknown as f64),
                num(sessions as f64),
                stats.lines as f64 / wall.max(1e-9),
                num(held_max as f64),
                gatekeeper_sim::report::Timing::measure(Duration::ZERO, Duration::ZERO).peak_rss_mib
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gatekeeper-sim: replay: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn replay(opts: &gatekeeper_sim::replay::drive::Options, out: Option<PathBuf>) -> ExitCode {
    println!("seed {}", opts.seed);
    reset_peak_rss();
    let mut progress = Bar::new("replay", Duration::ZERO);
    let result = gatekeeper_sim::replay::drive::replay(opts, &mut progress);
    progress.finish();
    let (report, findings) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gatekeeper-sim: replay: {e:#}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    print!("{}", findings.text());
    if let Some(dir) = &out {
        let written = report.write(dir).and_then(|()| {
            let d = dir.join(&report.scenario);
            std::fs::write(d.join("bans.txt"), findings.bans_text())?;
            let summary = serde_json::to_string_pretty(&findings.summary_json()).expect("serializes");
            std::fs::write(d.join("replay.json"), summary + "\n").map_err(Into::into)
        });
        if let Err(e) = written {
            eprintln!("gatekeeper-sim: writing {}: {e:#}", dir.display());
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

/// A progress bar on a terminal; plain lines every 25% otherwise.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    name: String,
    next: f64,
}

impl Bar {
    fn new(name: &str, horizon: Duration) -> Bar {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(horizon.as_secs());
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg:>24} [{bar:40}] {pos}/{len} simulated s ({elapsed})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_message(name.to_string());
            b
        });
        Bar { bar, name: name.to_string(), next: 0.25 }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn tick(&mut self, done: f64, simulated: Duration) {
        match &self.bar {
            Some(b) => b.set_position(simulated.as_secs()),
            None if done >= self.next && done < 1.0 => {
                eprintln!(
                    "   {}: {:.0}% ({} simulated h)",
                    self.name,
                    done * 100.0,
                    num((simulated.as_secs_f64() / 3600.0 * 10.0).round() / 10.0)
                );
                self.next += 0.25;
            }
            None => {}
        }
    }
}
