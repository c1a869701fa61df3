//! Reports: the deterministic part (JSON, Markdown, the hourly SVG graph) and the measured part
//! (wall time, simulated/wall ratio, peak RSS), which is printed but never written into the
//! deterministic files, so that the same seed and code give byte-identical reports.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::fmt::{num, secs};
use crate::invariants::{Invariant, Violation};
use crate::metrics::{Class, Hour, REASONS, RULES};

/// One line of the hourly graph: label, colour, value.
type Series = (&'static str, plotters::style::RGBColor, fn(&Hour) -> u64);

/// One expectation's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ExpectResult {
    /// Metric name.
    pub metric: String,
    /// `OP NUMBER`.
    pub expect: String,
    /// The measured value.
    pub actual: f64,
    /// Whether it holds.
    pub pass: bool,
}

/// The setup, as run.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// Safety phase, hours.
    pub duration_h: f64,
    /// Liveness phase, hours.
    pub drain_h: f64,
    /// turmoil tick, ms.
    pub tick_ms: f64,
    /// Clients' SYN schedule.
    pub client_kernel: String,
    /// Kernel model.
    pub gate: String,
    /// G1 window, s.
    pub window_s: f64,
    /// G2 ban time, h.
    pub ban_time_h: f64,
    /// B4 threshold.
    pub b4_threshold: u32,
    /// C1 on.
    pub verify_senders: bool,
    /// V1 on.
    pub scan: bool,
    /// Rule broken on purpose.
    pub sabotage: String,
}

/// Measured, not simulated: never part of the deterministic files.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// Wall time of the run.
    pub wall: Duration,
    /// Simulated time / wall time.
    pub ratio: f64,
    /// Peak resident set size during the run, MiB (Linux; 0 elsewhere).
    pub peak_rss_mib: f64,
    /// Steps of the simulation: ticks, and stretches of quiet time skipped in one step.
    pub steps: u64,
}

impl Timing {
    /// From the simulated span and the wall time it took; reads the peak RSS.
    pub fn measure(simulated: Duration, wall: Duration) -> Timing {
        Timing {
            wall,
            ratio: simulated.as_secs_f64() / wall.as_secs_f64().max(1e-9),
            peak_rss_mib: peak_rss_mib(),
            steps: 0,
        }
    }
}

/// Resets the peak RSS counter (Linux `clear_refs` 5), so the next reading is this run's.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// One scenario's report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Name (with variant).
    pub scenario: String,
    /// Scenario file name.
    pub file: String,
    /// What it is about.
    pub description: String,
    /// The seed.
    pub seed: u64,
    /// The setup.
    pub setup: Setup,
    /// Every expectation held.
    pub passed: bool,
    /// Expectations, sorted by metric.
    pub expectations: Vec<ExpectResult>,
    /// Every metric, sorted by name.
    pub metrics: BTreeMap<String, f64>,
    /// The first violations, in order.
    pub violations: Vec<Violation>,
    /// Per simulated hour.
    pub hourly: Vec<Hour>,
    /// Measured (not serialized).
    #[serde(skip)]
    pub timing: Timing,
}

impl Report {
    fn m(&self, k: &str) -> f64 {
        self.metrics.get(k).copied().unwrap_or(0.0)
    }

    fn by<'a>(&self, prefix: &str, names: impl Iterator<Item = &'a str>) -> String {
        names
            .filter_map(|n| {
                let v = self.m(&format!("{prefix}.{n}"));
                (v != 0.0).then(|| format!("{n} {}", num(v)))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The summary lines shared by the terminal table and the Markdown report.
    fn lines(&self) -> Vec<(String, String)> {
        let rules = || RULES.iter().map(|r| r.as_str());
        let none = |s: String| if s.is_empty() { "none".to_string() } else { s };
        vec![
            (
                "attempts".into(),
                format!(
                    "{} connection attempts, {} SYNs; kernel dropped {} (G1 {}, G2 {}); {} sessions; {} gave up (ETIMEDOUT)",
                    num(self.m("attempts")),
                    num(self.m("syns")),
                    num(self.m("kernel.drops")),
                    num(self.m("kernel.drop_rate")),
                    num(self.m("kernel.drop_banned")),
                    num(self.m("sessions")),
                    num(self.m("gave_up")),
                ),
            ),
            ("rejects".into(), none(self.by("rejects", rules()))),
            ("tempfails".into(), none(self.by("tempfails", rules()))),
            (
                "bans".into(),
                format!(
                    "{} ({} distinct; re-applied after restart {}; banned clients the kernel let in {})",
                    none(self.by("bans", REASONS.iter().map(|r| r.as_str()))),
                    num(self.m("bans.distinct")),
                    num(self.m("bans.reapplied")),
                    num(self.m("kernel.accepted_while_banned")),
                ),
            ),
            (
                "callbacks".into(),
                format!(
                    "{} probes at remote MX; C1 verdicts: valid {}, invalid {}, unknown {}",
                    num(self.m("callbacks")),
                    num(self.m("callbacks.valid")),
                    num(self.m("callbacks.invalid")),
                    num(self.m("callbacks.unknown")),
                ),
            ),
            (
                "mail".into(),
                format!(
                    "{} honest/bounce messages: delivered {}, bounced {}, pending {}; delay p50 {}, p99 {}, max {}; MTAs banned {}",
                    num(self.m("mail.messages")),
                    num(self.m("mail.delivered")),
                    num(self.m("mail.bounced")),
                    num(self.m("mail.pending")),
                    secs(self.m("mail.delay_p50")),
                    secs(self.m("mail.delay_p99")),
                    secs(self.m("mail.delay_max")),
                    num(self.m("mail.banned_mtas")),
                ),
            ),
            (
                "classes".into(),
                Class::ALL
                    .iter()
                    .filter(|c| self.m(&format!("{}.attempts", c.as_str())) > 0.0)
                    .map(|c| {
                        let n = c.as_str();
                        format!(
                            "{n}: {} attempts, {} banned",
                            num(self.m(&format!("{n}.attempts"))),
                            num(self.m(&format!("{n}.banned_addrs")))
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            (
                "invariants".into(),
                if self.m("violations") == 0.0 {
                    "all held".into()
                } else {
                    format!(
                        "{} violations: {}",
                        num(self.m("violations")),
                        self.by("violations", Invariant::ALL.iter().map(|i| i.as_str()))
                    )
                },
            ),
        ]
    }

    /// The terminal table (with the measured timing).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        let _ = writeln!(s, "== {} (seed {}) {verdict}", self.scenario, self.seed);
        let t = &self.timing;
        let _ = writeln!(
            s,
            "   {:<11}{} simulated in {:.2} s wall, {} steps: ratio {}x; peak RSS {:.0} MiB",
            "time",
            secs((self.setup.duration_h + self.setup.drain_h) * 3600.0),
            t.wall.as_secs_f64(),
            num(t.steps as f64),
            num(t.ratio.round()),
            t.peak_rss_mib
        );
        for (k, v) in self.lines() {
            let _ = writeln!(s, "   {k:<11}{v}");
        }
        for e in &self.expectations {
            let mark = if e.pass { "pass" } else { "FAIL" };
            let _ = writeln!(s, "   {mark}       {} {} (actual {})", e.metric, e.expect, num(e.actual));
        }
        for v in self.violations.iter().take(5) {
            let _ =
                writeln!(s, "   violation  t={} {} {}: {}", secs(v.at_secs), v.invariant.as_str(), v.client, v.detail);
        }
        s
    }

    /// The Markdown report (deterministic).
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        let _ = writeln!(s, "# {} — {verdict}\n", self.scenario);
        if !self.description.is_empty() {
            let _ = writeln!(s, "{}\n", self.description);
        }
        let u = &self.setup;
        let _ = writeln!(
            s,
            "Seed {}; {} h + {} h drain at a {} ms tick; clients {}; kernel {}; window {} s; ban {} h; B4 threshold {}; C1 {}; V1 {}{}.\n",
            self.seed,
            num(u.duration_h),
            num(u.drain_h),
            num(u.tick_ms),
            u.client_kernel,
            u.gate,
            num(u.window_s),
            num(u.ban_time_h),
            u.b4_threshold,
            if u.verify_senders { "on" } else { "off" },
            if u.scan { "on" } else { "off" },
            if u.sabotage == "None" { String::new() } else { format!("; sabotage {}", u.sabotage) },
        );
        let _ = writeln!(s, "| | |\n|---|---|");
        for (k, v) in self.lines() {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        let _ = writeln!(s, "\n## Expectations\n\n| metric | expected | actual | |\n|---|---|---|---|");
        for e in &self.expectations {
            let _ = writeln!(
                s,
                "| `{}` | {} | {} | {} |",
                e.metric,
                e.expect,
                num(e.actual),
                if e.pass { "pass" } else { "**FAIL**" }
            );
        }
        if !self.violations.is_empty() {
            let _ = writeln!(s, "\n## First violations\n");
            for v in &self.violations {
                let _ = writeln!(s, "- t={} `{}` {}: {}", secs(v.at_secs), v.invariant.as_str(), v.client, v.detail);
            }
        }
        let _ = writeln!(
            s,
            "\n## Hourly\n\n![hourly](hourly.svg)\n\n| hour | attempts | kernel drops | rejects | tempfails | delivered | bans |\n|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (i, h) in self.hourly.iter().enumerate() {
            let _ = writeln!(
                s,
                "| {i} | {} | {} | {} | {} | {} | {} |",
                h.attempts, h.kernel_drops, h.rejects, h.tempfails, h.delivered, h.bans
            );
        }
        s
    }

    /// The JSON report (deterministic).
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// Writes `DIR/<scenario>/report.json`, `report.md` and `hourly.svg`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let name: String = self
            .scenario
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "-_.=".contains(c) { c } else { '_' })
            .collect();
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("report.json"), self.json() + "\n")?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(dir.join("hourly.svg"), self.svg()?)?;
        Ok(())
    }

    /// The hourly graph: attempts and their outcomes per simulated hour, like an admin's
    /// mail-statistics graph.
    pub fn svg(&self) -> anyhow::Result<String> {
        use plotters::prelude::*;
        let mut out = String::new();
        {
            let root = SVGBackend::with_string(&mut out, (960, 420)).into_drawing_area();
            root.fill(&WHITE)?;
            let hours = self.hourly.len().max(1) as u32;
            let peak =
                self.hourly.iter().map(|h| h.attempts.max(h.kernel_drops).max(h.rejects)).max().unwrap_or(0).max(1);
            let mut chart = ChartBuilder::on(&root)
                .caption(format!("{}: per hour", self.scenario), ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(56)
                .build_cartesian_2d(0u32..hours, 0u64..peak + peak / 10 + 1)?;
            chart.configure_mesh().x_desc("simulated hour").y_desc("per hour").light_line_style(WHITE).draw()?;
            let series: [Series; 6] = [
                ("attempts", RGBColor(40, 40, 40), |h| h.attempts),
                ("kernel drops", RGBColor(200, 60, 40), |h| h.kernel_drops),
                ("rejects (5xx)", RGBColor(230, 150, 30), |h| h.rejects),
                ("tempfails (4xx)", RGBColor(150, 90, 200), |h| h.tempfails),
                ("delivered", RGBColor(40, 150, 60), |h| h.delivered),
                ("bans", RGBColor(30, 100, 200), |h| h.bans),
            ];
            for (label, color, pick) in series {
                let points: Vec<(u32, u64)> =
                    self.hourly.iter().enumerate().map(|(i, h)| (i as u32, pick(h))).collect();
                chart
                    .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
            root.present()?;
        }
        Ok(out)
    }
}
