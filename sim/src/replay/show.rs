//! The replay's own section of the report: what the gatekeeper would have done differently
//! from the MTA whose log it was.

use std::fmt::Write;

use super::assemble::Loc;
use super::drive::Findings;
use super::time::show;
use crate::fmt::num;

impl Findings {
    fn at(&self, loc: Loc) -> String {
        let file = self
            .files
            .get(usize::from(loc.file))
            .and_then(|p| p.file_name())
            .map_or_else(|| "?".to_string(), |n| n.to_string_lossy().into_owned());
        format!("{file}:{}", loc.line)
    }

    /// The text printed after the scenario table.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let l = &self.lines;
        let _ = writeln!(s, "== replay: what differs from what the MTA did");
        let span = self.span_ms.map_or("-".to_string(), |(a, b)| format!("{} .. {} UTC", show(a), show(b)));
        let _ = writeln!(
            s,
            "   log        {} lines ({} used, {} other lines of the MTA, {} unknown and skipped) in {} file(s); {span}",
            num(l.lines as f64),
            num(l.used as f64),
            num(l.ignored as f64),
            num(l.unknown as f64),
            self.files.len()
        );
        let _ = writeln!(
            s,
            "   sessions   {} replayed from {} client addresses; {} retry connections for tempfailed messages",
            num(self.sessions as f64),
            num(self.clients as f64),
            num(self.retries as f64)
        );
        let _ = writeln!(
            s,
            "   dropped    {} connections the kernel would have dropped (G1 rate {}, G2 banned {}); {} let in late by G1; {} greeted 554/421",
            num((self.dropped.0 + self.dropped.1) as f64),
            num(self.dropped.0 as f64),
            num(self.dropped.1 as f64),
            num(self.rate_delayed as f64),
            num(self.refused_greeting as f64)
        );
        let _ = writeln!(
            s,
            "   MTA took   {} messages: {} delivered alike, {} delayed, {} rejected, {} never delivered; {} flagged for review",
            num(self.mta_messages as f64),
            num(self.same as f64),
            num(self.delayed as f64),
            num(self.rejected as f64),
            num(self.undelivered as f64),
            num(self.review as f64)
        );
        let _ =
            writeln!(s, "   let in     {} messages the MTA refused, the gatekeeper accepted", num(self.let_in as f64));
        let mut by_reason: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
        for b in &self.bans {
            *by_reason.entry(b.reason.as_str()).or_default() += 1;
        }
        let reasons: Vec<String> = by_reason.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let _ = writeln!(s, "   bans       {} ({})", self.bans.len(), reasons.join(", "));
        for b in self.bans.iter().take(10) {
            let lines: Vec<String> = b.lines.iter().map(|&l| self.at(l)).collect();
            let _ = writeln!(
                s,
                "     {} {} {:<3} earned by {}",
                show(b.at_ms),
                b.client,
                b.reason.as_str(),
                lines.join(" ")
            );
        }
        if self.bans.len() > 10 {
            let _ = writeln!(s, "     ... {} more (--out DIR writes them all to bans.txt)", self.bans.len() - 10);
        }
        if !self.differences.is_empty() {
            let _ = writeln!(
                s,
                "   differences (messages the MTA took; REVIEW: the MTA took mail from this client and sender later)"
            );
            // Those flagged for review first: they are the ones an administrator must look at.
            let ordered =
                self.differences.iter().filter(|d| d.review).chain(self.differences.iter().filter(|d| !d.review));
            for (shown, d) in ordered.enumerate() {
                if shown == 15 {
                    let _ = writeln!(s, "     ... {} more", self.differences.len() - shown);
                    break;
                }
                let _ = writeln!(
                    s,
                    "     {}{} {} <{}> ({} rcpt) {} [{}]",
                    if d.review { "REVIEW " } else { "" },
                    show(d.at_ms),
                    d.client,
                    d.from,
                    d.rcpts,
                    d.what,
                    self.at(d.line)
                );
            }
        }
        let _ = writeln!(s, "   top clients by cost (attempts + commands + refusals)");
        for (ip, c) in &self.top {
            let _ = writeln!(
                s,
                "     {ip:<28} {:>6} logged {:>6} attempts {:>6} dropped {:>7} commands {:>6} refused {:>5} taken {:>5} delivered {:>3} bans",
                c.logged, c.attempts, c.dropped, c.commands, c.refusals, c.mta_accepted, c.delivered, c.bans
            );
        }
        s
    }

    /// The counts, as JSON (`--out`: `replay.json`), for scripts that check them.
    pub fn summary_json(&self) -> serde_json::Value {
        let mut bans: std::collections::BTreeMap<&str, u64> = std::collections::BTreeMap::new();
        for b in &self.bans {
            *bans.entry(b.reason.as_str()).or_default() += 1;
        }
        serde_json::json!({
            "lines": self.lines.lines,
            "lines_used": self.lines.used,
            "lines_ignored": self.lines.ignored,
            "lines_unknown": self.lines.unknown,
            "sessions": self.sessions,
            "clients": self.clients,
            "dropped_g1": self.dropped.0,
            "dropped_g2": self.dropped.1,
            "rate_delayed": self.rate_delayed,
            "refused_greeting": self.refused_greeting,
            "retries": self.retries,
            "retry_dropped_g1": self.retry_dropped.0,
            "retry_dropped_g2": self.retry_dropped.1,
            "mta_messages": self.mta_messages,
            "same": self.same,
            "delayed": self.delayed,
            "rejected": self.rejected,
            "undelivered": self.undelivered,
            "review": self.review,
            "let_in": self.let_in,
            "bans": self.bans.len(),
            "bans_by_reason": bans,
        })
    }

    /// Every ban with its lines, one a line (for `--out`).
    pub fn bans_text(&self) -> String {
        let mut s = String::new();
        for b in &self.bans {
            let lines: Vec<String> = b.lines.iter().map(|&l| self.at(l)).collect();
            let _ = writeln!(s, "{} {} {} {}", show(b.at_ms), b.client, b.reason.as_str(), lines.join(" "));
        }
        s
    }
}
