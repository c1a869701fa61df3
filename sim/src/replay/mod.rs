//! Log replay (docs/design.md §6): "what would the gatekeeper have done to my last week?"
//!
//! A real MTA log becomes the simulation's traffic: every client address with its sessions at
//! their logged times, its HELO, senders and recipients, and what the MTA answered each; then
//! the same assembled gatekeeper as everywhere else ([`crate::gk`]) meets those clients on the
//! given configuration, and the report says what differs from what the MTA did.
//!
//! - [`time`], [`line`] — timestamps (syslog without a year, RFC 3339) and the syslog header.
//! - [`event`] — what a line means, whatever wrote it; [`postfix`], [`sendmail`] and
//!   [`gklog`] (the gatekeeper's own JSON log) turn lines into events.
//! - [`assemble`] — sessions from events, streaming, released in order of their start.
//! - [`input`] — files (rotated, `.gz`) read in order, line by line: the only IO here.
//!
//! Everything but [`input`] is sans-IO: lines in, sessions out, no clock, no files.

pub mod assemble;
pub mod drive;
pub mod event;
pub mod gklog;
pub mod input;
pub mod line;
pub mod postfix;
pub mod sendmail;
pub mod show;
pub mod synth;
pub mod time;

use assemble::{Assembler, Loc, LoggedSession};
use event::Event;
use time::YearClock;

/// Which program wrote the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Each line decides: JSON is the gatekeeper's, else Postfix, else sendmail.
    #[default]
    Auto,
    /// Postfix (`smtpd`, `postscreen`, `qmgr`, delivery agents).
    Postfix,
    /// sendmail (`sm-mta`).
    Sendmail,
    /// The gatekeeper's JSON log.
    Gatekeeper,
}

/// Counts of the lines read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineStats {
    /// Lines read.
    pub lines: u64,
    /// Lines that meant something to the replay.
    pub used: u64,
    /// Lines of a known program that carry nothing the replay needs.
    pub ignored: u64,
    /// Lines no parser knew (other programs, garbage): counted and skipped.
    pub unknown: u64,
}

/// Lines in, sessions out.
#[derive(Debug)]
pub struct LogReader {
    format: Format,
    clock: YearClock,
    /// The sessions being assembled.
    pub asm: Assembler,
    /// What the lines were.
    pub stats: LineStats,
    /// The first and last time seen (ms since the epoch).
    pub span_ms: Option<(i64, i64)>,
}

impl LogReader {
    /// A reader for `format`, with year-less stamps in `year` and `offset_secs` east of UTC.
    pub fn new(format: Format, year: i64, offset_secs: i64) -> LogReader {
        LogReader {
            format,
            clock: YearClock::new(year, offset_secs),
            asm: Assembler::new(),
            stats: LineStats::default(),
            span_ms: None,
        }
    }

    /// One line (without its newline).
    pub fn line(&mut self, line: &str, loc: Loc) {
        self.stats.lines += 1;
        let parsed = self.parse(line);
        match parsed {
            None => self.stats.unknown += 1,
            Some((_, Event::Ignored)) => self.stats.ignored += 1,
            Some((at, ev)) => {
                self.stats.used += 1;
                self.span_ms = Some(self.span_ms.map_or((at, at), |(a, b)| (a.min(at), b.max(at))));
                self.asm.feed(at, ev, loc);
            }
        }
    }

    fn parse<'a>(&mut self, line: &'a str) -> Option<(i64, Event<'a>)> {
        let line = line.trim_end_matches(['\r', '\n']);
        let json = line.starts_with('{');
        match self.format {
            Format::Gatekeeper => return gklog::parse(line),
            Format::Auto if json => return gklog::parse(line),
            _ => {}
        }
        let h = line::split(line, &mut self.clock)?;
        let ev = match self.format {
            Format::Postfix => postfix::parse(&h),
            Format::Sendmail => sendmail::parse(&h),
            _ => postfix::parse(&h).or_else(|| sendmail::parse(&h)),
        }?;
        Some((h.at_ms, ev))
    }

    /// The next session ready, in order of start.
    pub fn next_session(&mut self) -> Option<LoggedSession> {
        self.asm.pop()
    }

    /// The end of the input: every session held is released.
    pub fn finish(&mut self) {
        self.asm.sweep(true);
    }
}

#[cfg(test)]
mod tests;
