//! The result of one run, printed for people and written as one JSON line, and the
//! side-by-side table built from a file of such lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Latency percentiles of a set of sessions, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Sessions measured.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Slowest.
    pub max_us: u64,
}

impl Latency {
    /// From unsorted samples (sorted here).
    pub fn from_samples(samples: &mut [u32]) -> Latency {
        samples.sort_unstable();
        let pick = |q: f64| -> u64 {
            if samples.is_empty() {
                return 0;
            }
            // Nearest rank.
            let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
            u64::from(samples[rank - 1])
        };
        Latency {
            count: samples.len() as u64,
            p50_us: pick(0.50),
            p90_us: pick(0.90),
            p99_us: pick(0.99),
            max_us: samples.last().map_or(0, |&m| u64::from(m)),
        }
    }
}

/// What the server used during the measured part of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerUse {
    /// The server's (root) process.
    pub pid: u32,
    /// Processes in its tree at the end.
    pub processes: usize,
    /// CPU time of the tree, seconds (user + system, children included).
    pub cpu_s: f64,
    /// `cpu_s` per session, microseconds.
    pub cpu_us_per_session: f64,
    /// Memory at the start, KiB (resident set; for a tree, proportional set).
    pub rss_start_kib: u64,
    /// Peak memory during the run, KiB (see `peak_source`).
    pub rss_peak_kib: u64,
    /// Memory at the end, KiB (as at the start).
    pub rss_end_kib: u64,
    /// `VmHWM` (one process: peak resident set) or `sampled sum of PSS` (a tree).
    pub peak_source: String,
}

/// One run's result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// The server's name in the table (`gatekeeper`, `postfix`, `null`).
    pub server: String,
    /// The client (`loadgen`, `smtp-source`).
    pub client: String,
    /// `closed` (N at concurrency C), `open` (a rate for a duration), `hold`, `external`.
    pub mode: String,
    /// The workload's name.
    pub workload: String,
    /// The server's address.
    pub target: String,
    /// Sessions started in the measured part.
    pub sessions: u64,
    /// Closed loop and hold: sessions at once.
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// Open loop: sessions started per second.
    #[serde(default)]
    pub rate: Option<f64>,
    /// Wall time of the measured part, seconds.
    pub elapsed_s: f64,
    /// Completed sessions (ok or not) per second of wall time.
    pub sessions_per_s: f64,
    /// Sessions that went as their class must.
    pub ok: u64,
    /// Sessions that did not.
    pub errors: u64,
    /// Failures by kind.
    #[serde(default)]
    pub error_kinds: BTreeMap<String, u64>,
    /// Latency (connect to 221) of the sessions that went right: `all` and per class.
    #[serde(default)]
    pub latency: BTreeMap<String, Latency>,
    /// The server's CPU and memory, if its pid was given.
    #[serde(default)]
    pub server_use: Option<ServerUse>,
    /// The load generator's own CPU per session, microseconds.
    pub client_cpu_us_per_session: f64,
    /// Source addresses skipped because binding or connecting from them failed.
    #[serde(default)]
    pub sources_skipped: u64,
    /// Open loop: the largest delay between a session's scheduled and actual start, ms.
    #[serde(default)]
    pub max_start_lag_ms: Option<f64>,
    /// Hold: sessions open at once at the peak.
    #[serde(default)]
    pub held: Option<u64>,
    /// Hold: seconds to open them all.
    #[serde(default)]
    pub ramp_s: Option<f64>,
    /// Hold: the server's resident memory with all of them open, KiB.
    #[serde(default)]
    pub rss_held_kib: Option<u64>,
    /// The server's memory (as `server_use`'s start and end) every few seconds of the run:
    /// `(seconds, KiB)`.
    #[serde(default)]
    pub memory_trace_kib: Vec<(f64, u64)>,
    /// External client: its exit status.
    #[serde(default)]
    pub exit_status: Option<i32>,
    /// Every session did STARTTLS (a full handshake) after its first EHLO.
    #[serde(default)]
    pub starttls: bool,
    /// Sessions whose STARTTLS was refused or whose handshake failed or timed out (counted in
    /// `errors` too).
    #[serde(default)]
    pub tls_handshake_failures: u64,
    /// What the handshakes negotiated (version, cipher suite, key exchange), by sessions.
    #[serde(default)]
    pub tls_negotiated: BTreeMap<String, u64>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl RunReport {
    /// The workload's name, with ` + STARTTLS` when every session did STARTTLS.
    pub fn workload_label(&self) -> String {
        if self.starttls { format!("{} + STARTTLS", self.workload) } else { self.workload.clone() }
    }

    /// A human summary, several lines.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let shape = match (self.concurrency, self.rate) {
            (_, Some(r)) => format!("open loop at {r:.0}/s"),
            (Some(c), None) => format!("concurrency {c}"),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            s,
            "{} [{}] {} via {} ({}): {} sessions in {:.2} s = {:.0} sessions/s; ok {}, errors {}",
            self.server,
            self.workload_label(),
            self.mode,
            self.client,
            shape,
            self.sessions,
            self.elapsed_s,
            self.sessions_per_s,
            self.ok,
            self.errors
        );
        for (k, n) in &self.error_kinds {
            let _ = writeln!(s, "  error: {k} x{n}");
        }
        if self.starttls {
            let negotiated: Vec<String> = self.tls_negotiated.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            let _ = writeln!(
                s,
                "  STARTTLS: {} handshake failures; negotiated {}",
                self.tls_handshake_failures,
                if negotiated.is_empty() { "nothing".into() } else { negotiated.join(", ") }
            );
        }
        for (class, l) in &self.latency {
            let _ = writeln!(
                s,
                "  latency {class:<12} n={:<7} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                l.count,
                ms(l.p50_us),
                ms(l.p90_us),
                ms(l.p99_us),
                ms(l.max_us)
            );
        }
        if let Some(u) = &self.server_use {
            let _ = writeln!(
                s,
                "  server pid {} ({} process(es)): CPU {:.3} s = {:.1} us/session; RSS start {:.1} MiB, peak {:.1} MiB ({}), end {:.1} MiB",
                u.pid,
                u.processes,
                u.cpu_s,
                u.cpu_us_per_session,
                mib(u.rss_start_kib),
                mib(u.rss_peak_kib),
                u.peak_source,
                mib(u.rss_end_kib)
            );
        }
        if self.memory_trace_kib.len() > 1 {
            let points: Vec<String> =
                self.memory_trace_kib.iter().map(|&(t, k)| format!("{t:.0}s {:.1}", mib(k))).collect();
            let _ = writeln!(s, "  server memory over the run (MiB): {}", points.join(", "));
        }
        if let (Some(h), Some(r)) = (self.held, self.ramp_s) {
            let rss = self.rss_held_kib.map_or_else(|| "?".into(), |k| format!("{:.1} MiB", mib(k)));
            let _ = writeln!(s, "  held {h} sessions open at once (opened in {r:.2} s); server RSS then {rss}");
        }
        if let Some(lag) = self.max_start_lag_ms {
            let _ = writeln!(s, "  largest start lag behind schedule: {lag:.1} ms");
        }
        if self.client_cpu_us_per_session > 0.0 {
            let _ = writeln!(s, "  client CPU {:.1} us/session", self.client_cpu_us_per_session);
        }
        if self.sources_skipped > 0 {
            let _ = writeln!(s, "  source addresses skipped (EADDRINUSE/EADDRNOTAVAIL): {}", self.sources_skipped);
        }
        s
    }
}

/// The servers' names the table compares against.
pub const CEILING: &str = "null";
/// The peer.
pub const POSTFIX: &str = "postfix";

fn cell(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "–".into(), f)
}

/// One row of the side-by-side table: the median run (by sessions/s) of the repeated runs of
/// one workload, client and server, and the errors of all of them.
#[derive(Debug)]
struct Row<'a> {
    run: &'a RunReport,
    /// Every run of the group, in the order they ran.
    all: Vec<&'a RunReport>,
}

impl Row<'_> {
    /// The ratio of this row's sessions/s to `peer`'s, paired by repetition: the k-th run of
    /// each ran in the same round (the runner goes round robin), so they share that round's
    /// machine noise. The median of the per-round ratios (the lower middle for an even count).
    fn ratio_to(&self, peer: &Row<'_>) -> Option<f64> {
        let mut ratios: Vec<f64> = self
            .all
            .iter()
            .zip(&peer.all)
            .filter(|(_, p)| p.sessions_per_s > 0.0)
            .map(|(r, p)| r.sessions_per_s / p.sessions_per_s)
            .collect();
        ratios.sort_by(f64::total_cmp);
        ratios.get(ratios.len().checked_sub(1)? / 2).copied()
    }
}

/// Groups repeated runs (same workload, client, server), in order of first appearance, and
/// picks each group's median run (the lower middle for an even count).
fn medians<'a>(runs: &[&'a RunReport]) -> Vec<Row<'a>> {
    let mut groups: Vec<Vec<&'a RunReport>> = Vec::new();
    for r in runs {
        let key = |o: &RunReport| (o.workload_label(), o.client.clone(), o.server.clone());
        match groups.iter_mut().find(|g| key(g[0]) == key(r)) {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
        .into_iter()
        .map(|all| {
            let mut g = all.clone();
            g.sort_by(|a, b| a.sessions_per_s.total_cmp(&b.sessions_per_s));
            Row { run: g[(g.len() - 1) / 2], all }
        })
        .collect()
}

/// The side-by-side table (Markdown) of closed-loop and external runs (repeated runs: the
/// median), then the open-loop and hold runs, from `reports` in the order given.
pub fn table(reports: &[RunReport]) -> String {
    let mut s = String::new();
    let side: Vec<&RunReport> = reports.iter().filter(|r| r.mode == "closed" || r.mode == "external").collect();
    let rows = medians(&side);
    if !rows.is_empty() {
        let repeated = rows.iter().any(|r| r.all.len() > 1);
        let (runs_head, runs_rule) = if repeated { (" runs |", " ---: |") } else { ("", "") };
        let _ = writeln!(
            s,
            "| workload | client | server | sessions/s | % of ceiling | × Postfix | p50 ms | p99 ms | server CPU µs/session | server peak mem MiB | errors |{runs_head}"
        );
        let _ = writeln!(s, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |{runs_rule}");
        for row in &rows {
            let r = row.run;
            let peer = |name: &str| {
                rows.iter()
                    .find(|o| {
                        o.run.server == name && o.run.workload_label() == r.workload_label() && o.run.client == r.client
                    })
                    .and_then(|o| row.ratio_to(o))
            };
            let all = r.latency.get("all");
            let runs = if repeated { format!(" {} |", row.all.len()) } else { String::new() };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |{runs}",
                r.workload_label(),
                r.client,
                r.server,
                r.sessions_per_s,
                cell(peer(CEILING), |c| format!("{:.0} %", 100.0 * c)),
                cell(peer(POSTFIX), |p| format!("{p:.2}")),
                cell(all.map(|l| ms(l.p50_us)), |v| format!("{v:.2}")),
                cell(all.map(|l| ms(l.p99_us)), |v| format!("{v:.2}")),
                cell(r.server_use.as_ref().map(|u| u.cpu_us_per_session), |v| format!("{v:.0}")),
                cell(r.server_use.as_ref().map(|u| mib(u.rss_peak_kib)), |v| format!("{v:.1}")),
                row.all.iter().map(|r| r.errors).sum::<u64>(),
            );
        }
        if repeated {
            s.push_str(
                "\nrepeated runs: each row is the run with the median sessions/s; the ratios are the median of the \
                 per-round ratios (the k-th runs of two servers ran in the same round); errors are summed over all runs.\n",
            );
        }
    }
    let tls_rows: Vec<&Row<'_>> = rows.iter().filter(|r| r.run.starttls).collect();
    if !tls_rows.is_empty() {
        s.push_str("\nSTARTTLS rows: every session a full handshake (no resumption);");
        for row in tls_rows {
            let failed: u64 = row.all.iter().map(|r| r.tls_handshake_failures).sum();
            let mut negotiated: BTreeMap<&str, u64> = BTreeMap::new();
            for r in &row.all {
                for (k, n) in &r.tls_negotiated {
                    *negotiated.entry(k).or_default() += n;
                }
            }
            let negotiated: Vec<String> = negotiated.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            let _ = write!(
                s,
                " {} {}: {failed} handshake failures, negotiated {};",
                row.run.server,
                row.run.workload,
                if negotiated.is_empty() { "nothing".into() } else { negotiated.join(", ") }
            );
        }
        s.pop();
        s.push_str(".\n");
    }
    if side.iter().any(|r| r.server_use.as_ref().is_some_and(|u| u.processes > 1)) {
        s.push_str(
            "\nserver peak mem: VmHWM (peak resident set) of a one-process server; for a process tree (Postfix), \
             the sampled peak of its processes' summed PSS.\n",
        );
    }
    let open: Vec<&RunReport> = reports.iter().filter(|r| r.mode == "open").collect();
    if !open.is_empty() {
        s.push_str(
            "\n| open loop | server | rate/s | duration s | sessions | errors | p99 ms all | p99 ms honest | max start lag ms | server CPU µs/session | server RSS start → peak → end MiB |\n",
        );
        s.push_str("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
        for r in open {
            let p99 = |k: &str| cell(r.latency.get(k).map(|l| ms(l.p99_us)), |v| format!("{v:.2}"));
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.1} | {} | {} | {} | {} | {} | {} | {} |",
                r.workload,
                r.server,
                r.rate.unwrap_or(0.0),
                r.elapsed_s,
                r.sessions,
                r.errors,
                p99("all"),
                p99("honest"),
                cell(r.max_start_lag_ms, |v| format!("{v:.1}")),
                cell(r.server_use.as_ref().map(|u| u.cpu_us_per_session), |v| format!("{v:.0}")),
                r.server_use.as_ref().map_or_else(
                    || "–".into(),
                    |u| format!("{:.1} → {:.1} → {:.1}", mib(u.rss_start_kib), mib(u.rss_peak_kib), mib(u.rss_end_kib))
                ),
            );
        }
    }
    let hold: Vec<&RunReport> = reports.iter().filter(|r| r.mode == "hold").collect();
    if !hold.is_empty() {
        s.push_str("\n| hold | server | sessions open at once | opened in s | errors | server RSS idle → all open → peak MiB |\n");
        s.push_str("| --- | --- | ---: | ---: | ---: | --- |\n");
        for r in hold {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                r.workload,
                r.server,
                r.held.unwrap_or(0),
                cell(r.ramp_s, |v| format!("{v:.2}")),
                r.errors,
                r.server_use.as_ref().map_or_else(
                    || "–".into(),
                    |u| format!(
                        "{:.1} → {:.1} → {:.1}",
                        mib(u.rss_start_kib),
                        mib(r.rss_held_kib.unwrap_or(0)),
                        mib(u.rss_peak_kib)
                    )
                ),
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<u32> = (1..=100).rev().collect();
        let l = Latency::from_samples(&mut v);
        assert_eq!((l.count, l.p50_us, l.p90_us, l.p99_us, l.max_us), (100, 50, 90, 99, 100));
        assert_eq!(Latency::from_samples(&mut []), Latency::default());
    }

    #[test]
    fn table_has_ratios() {
        let run = |server: &str, rate: f64| RunReport {
            server: server.into(),
            client: "loadgen".into(),
            mode: "closed".into(),
            workload: "early-reject".into(),
            sessions_per_s: rate,
            ..RunReport::default()
        };
        let t = table(&[run("gatekeeper", 900.0), run("postfix", 450.0), run("null", 1000.0)]);
        assert!(t.contains("| early-reject | loadgen | gatekeeper | 900 | 90 % | 2.00 |"), "{t}");
        // Repeated: the median run of each row, and the median of the per-round ratios (rounds
        // 0.9, 0.8 and 0.75 of the ceiling: 80 %, where the ratio of the medians would say 90 %).
        let t = table(&[
            run("gatekeeper", 900.0),
            run("postfix", 450.0),
            run("null", 1000.0),
            run("gatekeeper", 1200.0),
            run("postfix", 400.0),
            run("null", 1500.0),
            run("gatekeeper", 600.0),
            run("postfix", 300.0),
            run("null", 800.0),
        ]);
        assert!(t.contains("| early-reject | loadgen | gatekeeper | 900 | 80 % | 2.00 |"), "{t}");
        assert!(t.contains("| early-reject | loadgen | null | 1000 | 100 % | 2.67 |"), "{t}");
        assert!(t.contains(" 3 |\n"), "{t}");
    }

    #[test]
    fn starttls_runs_are_their_own_rows() {
        let run = |server: &str, rate: f64, tls: bool| RunReport {
            server: server.into(),
            client: "loadgen".into(),
            mode: "closed".into(),
            workload: "early-reject".into(),
            sessions_per_s: rate,
            starttls: tls,
            tls_handshake_failures: u64::from(tls && server == "postfix"),
            tls_negotiated: if tls { [("TLSv1_3 X25519".to_string(), 9)].into() } else { BTreeMap::new() },
            ..RunReport::default()
        };
        let t = table(&[
            run("gatekeeper", 900.0, false),
            run("postfix", 450.0, false),
            run("gatekeeper", 300.0, true),
            run("postfix", 100.0, true),
        ]);
        assert!(t.contains("| early-reject | loadgen | gatekeeper | 900 | – | 2.00 |"), "{t}");
        assert!(t.contains("| early-reject + STARTTLS | loadgen | gatekeeper | 300 | – | 3.00 |"), "{t}");
        assert!(t.contains("postfix early-reject: 1 handshake failures, negotiated TLSv1_3 X25519 x9."), "{t}");
        let back: RunReport = serde_json::from_str(&serde_json::to_string(&run("x", 1.0, true)).unwrap()).unwrap();
        assert!(back.starttls && back.workload_label() == "early-reject + STARTTLS");
    }
}
