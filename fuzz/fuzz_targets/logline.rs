//! The log replay's parser and session assembler (sim/src/replay) on arbitrary bytes, read as
//! lines of every format (Postfix, sendmail, the gatekeeper's JSON, and each line deciding).
//!
//! Invariants besides "no panic" (a log line is never fatal):
//! - every line is counted exactly once: used, ignored or unknown;
//! - a session comes only from a used line, ends no earlier than it starts, and keeps at most
//!   `LINES_KEPT` line references, each to a line that was read;
//! - at the end of the input nothing is held: every session was released.

#![no_main]

use gatekeeper_sim::replay::assemble::{LINES_KEPT, Loc, LoggedSession};
use gatekeeper_sim::replay::{Format, LogReader};
use libfuzzer_sys::fuzz_target;

fn check(s: &LoggedSession, lines: u32) {
    assert!(s.end_ms >= s.start_ms, "{s:?}");
    assert!(s.lines.len() <= LINES_KEPT);
    assert!(s.lines.iter().all(|l| l.line >= 1 && l.line <= lines), "{s:?}");
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for format in [Format::Auto, Format::Postfix, Format::Sendmail, Format::Gatekeeper] {
        let mut r = LogReader::new(format, 2026, 0);
        let mut sessions = 0u64;
        let mut n = 0u32;
        for line in text.split('\n') {
            n += 1;
            r.line(line, Loc { file: 0, line: n });
            while let Some(s) = r.next_session() {
                check(&s, n);
                sessions += 1;
            }
        }
        r.finish();
        while let Some(s) = r.next_session() {
            check(&s, n);
            sessions += 1;
        }
        let st = r.stats;
        assert_eq!(st.used + st.ignored + st.unknown, st.lines);
        assert_eq!(st.lines, u64::from(n));
        assert!(sessions <= st.used, "{sessions} sessions from {} used lines", st.used);
        assert_eq!(r.asm.held(), 0);
    }
});
