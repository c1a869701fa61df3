//! CPU time and resident memory of a server, read from /proc.
//!
//! A server is a process and its descendants (Postfix is a master and its daemons; the
//! gatekeeper and the responder are one process each). CPU is `utime + stime + cutime +
//! cstime` summed over the living tree: a child that exited and was reaped has moved its time
//! into its parent's `cutime`/`cstime`, so the sum only grows, and the difference of two
//! samples is the tree's CPU in between, whatever processes came and went.
//!
//! Memory: `VmHWM` (the kernel's peak RSS of one process, reset at the start of a run through
//! `clear_refs`) for a one-process server; for a tree, the sum of the processes' proportional
//! set sizes (`Pss` in `smaps_rollup`: a page shared by n processes counts 1/n in each, so
//! Postfix's hundred smtpd processes are not charged a hundred times for one libc), sampled.

use std::io;
use std::time::Duration;

/// Clock ticks per second in /proc/PID/stat (`USER_HZ`, 100 on every Linux architecture
/// that matters here; `getconf CLK_TCK`).
pub const TICKS_PER_SEC: u64 = 100;

/// One sample of a server's process tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeSample {
    /// CPU time used by the tree so far, in clock ticks.
    pub cpu_ticks: u64,
    /// Sum of the processes' current resident set, KiB.
    pub rss_kib: u64,
    /// Sum of the processes' proportional set size, KiB (read only for a tree; for one
    /// process it is `rss_kib`).
    pub pss_kib: u64,
    /// The root process's peak resident set (`VmHWM`), KiB.
    pub root_hwm_kib: u64,
    /// Processes in the tree.
    pub processes: usize,
}

impl TreeSample {
    /// The memory figure: resident set of one process, proportional set of a tree.
    pub fn memory_kib(&self) -> u64 {
        if self.processes > 1 { self.pss_kib } else { self.rss_kib }
    }

    /// CPU time as a duration.
    pub fn cpu(&self) -> Duration {
        Duration::from_micros(self.cpu_ticks * 1_000_000 / TICKS_PER_SEC)
    }
}

/// The fields of /proc/PID/stat that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    ppid: u32,
    ticks: u64,
}

fn parse_stat(text: &str) -> Option<Stat> {
    // `pid (comm) state ppid ...`: comm may contain spaces and parentheses; the last ')'
    // ends it. After it, field 3 (state) is at index 0.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok());
    // Fields 14-17: utime, stime, cutime, cstime.
    let ticks = num(11)? + num(12)? + num(13)? + num(14)?;
    Some(Stat { ppid: u32::try_from(num(1)?).ok()?, ticks })
}

fn read_stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `VmRSS` and `VmHWM` of one process, KiB.
fn read_mem(pid: u32) -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return (0, 0) };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `VmRSS` of one process from the cheaper `statm` (resident pages), KiB.
fn read_rss(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/statm")) else { return 0 };
    // Pages of 4 KiB on the machines this runs on (x86-64, arm64 with 4K pages).
    text.split_ascii_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).map_or(0, |pages| pages * 4)
}

/// `Pss` of one process, KiB (0 if unreadable).
fn read_pss(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else { return 0 };
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `root` and all its descendants now.
pub fn tree(root: u32) -> Vec<u32> {
    let mut parent = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some(s) = read_stat(pid) {
                parent.push((pid, s.ppid));
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|&&(_, pp)| pp == p).map(|&(c, _)| c));
        i += 1;
    }
    out
}

/// Samples the tree under `root`. Fails if `root` is gone.
pub fn sample(root: u32) -> io::Result<TreeSample> {
    let root_stat =
        read_stat(root).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no process {root}")))?;
    let mut s = TreeSample { cpu_ticks: root_stat.ticks, ..TreeSample::default() };
    let (rss, hwm) = read_mem(root);
    s.rss_kib = rss;
    s.root_hwm_kib = hwm;
    s.processes = 1;
    let mut pids = vec![root];
    for pid in tree(root).into_iter().skip(1) {
        if let Some(st) = read_stat(pid) {
            s.cpu_ticks += st.ticks;
            s.rss_kib += read_rss(pid);
            s.processes += 1;
            pids.push(pid);
        }
    }
    s.pss_kib = if s.processes > 1 { pids.into_iter().map(read_pss).sum() } else { s.rss_kib };
    Ok(s)
}

/// Resets the peak-RSS counters (`VmHWM`) of the tree to the current RSS (`clear_refs` 5).
/// Best effort: needs to own the processes or be root.
pub fn reset_peak(root: u32) {
    for pid in tree(root) {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
}

/// CPU time used by this process so far (the load generator's own cost).
pub fn self_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat").ok().and_then(|t| parse_stat(&t)).map_or(0, |s| s.ticks);
    Duration::from_micros(ticks * 1_000_000 / TICKS_PER_SEC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let line = "4242 (smtpd) x (y)) S 1 4242 4242 0 -1 4194560 1 0 0 0 7 3 20 10 20 0 1 0 100 0 0";
        assert_eq!(parse_stat(line), Some(Stat { ppid: 1, ticks: 7 + 3 + 20 + 10 }));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.root_hwm_kib >= s.rss_kib / 2 && s.processes >= 1);
        assert!(sample(u32::MAX).is_err());
    }
}
