//! Byte receivers: command lines and DATA. Both consume from the front of an input slice and
//! stop at the first complete event, so the session can switch receivers between a DATA
//! command and the message that is pipelined behind it. Buffers are bounded: an overlong
//! command line is reported and skipped, an overlong text line is broken into lines of at most
//! 998 octets, and a message is never held whole: its content is handed out as it arrives
//! ([`DataReceiver::take_content`]) for the driver to write to a file, and an oversized message
//! is counted, not handed out beyond the limit.

use super::{COMMAND_LINE_MAX, TEXT_LINE_MAX};

/// What the line receiver produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// One line without its line ending (CRLF, or a bare LF, which commands tolerate).
    Line(Vec<u8>),
    /// A line longer than [`COMMAND_LINE_MAX`]; its bytes up to the next LF were discarded.
    TooLong,
}

/// Splits command input into lines of at most [`COMMAND_LINE_MAX`] octets with CRLF.
#[derive(Debug, Default)]
pub struct LineReceiver {
    buf: Vec<u8>,
    overflow: bool,
}

impl LineReceiver {
    /// A receiver with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes input from the front of `input` up to and including the next LF and returns the
    /// line, or consumes all of it and returns `None` when no line is complete yet.
    pub fn next(&mut self, input: &mut &[u8]) -> Option<LineEvent> {
        let max = COMMAND_LINE_MAX - 2;
        match input.iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.append(&input[..i], max);
                *input = &input[i + 1..];
                if self.buf.last() == Some(&b'\r') {
                    self.buf.pop();
                }
                let overflow = std::mem::take(&mut self.overflow) || self.buf.len() > max;
                let line = std::mem::take(&mut self.buf);
                Some(if overflow { LineEvent::TooLong } else { LineEvent::Line(line) })
            }
            None => {
                self.append(input, max);
                *input = &[];
                None
            }
        }
    }

    /// Bytes of an incomplete line held (never more than the limit plus one CR).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn append(&mut self, bytes: &[u8], max: usize) {
        if self.overflow {
            return;
        }
        // Keep one byte beyond the limit for a CR that may precede the LF.
        let room = (max + 1).saturating_sub(self.buf.len());
        if bytes.len() > room {
            self.buf.clear();
            self.overflow = true;
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }
}

/// What the DATA receiver produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataEvent {
    /// The end-of-data line `.` CRLF was received and the message is acceptable: its content
    /// is everything [`DataReceiver::take_content`] gave, dot-unstuffed, every line ending
    /// normalized to CRLF, no line longer than [`TEXT_LINE_MAX`] with its CRLF.
    Complete {
        /// Octets of content (as stored, not as received).
        size: u64,
    },
    /// End of data, but the message exceeded the size limit (552 5.3.4): what was handed out
    /// must be discarded; `size` is what was received.
    TooBig {
        /// Octets received.
        size: u64,
    },
}

/// Longest stored line without its CRLF (RFC 5321 §4.5.3.1.6, RFC 5322 §2.1.1).
const STORED_LINE_MAX: usize = TEXT_LINE_MAX - 2;

/// Receives one message after DATA: dot-unstuffing (RFC 5321 §4.5.2), the end-of-data line,
/// and the repairs a receiving MTA makes so that what it stores and passes on is well formed.
///
/// - Only `CRLF . CRLF` ends the data: a bare LF or a lone CR before or after the dot does not
///   (that ambiguity is the "SMTP smuggling" attack).
/// - A bare LF ends a line like CRLF does, and a lone CR (one not followed by LF) is also
///   stored as a line break (CRLF). RFC 5321 §2.3.8 allows CR and LF only together; Postfix
///   keeps a lone CR as data, but an MTA or mail reader further on may take it for a line end
///   and then read different lines (and a different end of data) than we did, so no lone CR
///   is ever stored or relayed. A lone CR does not start a new SMTP line: a dot after it is
///   neither stuffing nor the end of the data.
/// - A line longer than 998 octets (RFC 5321 §4.5.3.1.6) is accepted and broken, as Postfix
///   does (`smtp_line_length_limit`): in the header section before its last space or tab
///   within the limit, which is RFC 5322 folding and loses nothing when unfolded; otherwise
///   (in the body, or a header line without whitespace) after 998 octets by inserting CRLF
///   and a space, so that the rest can be neither a header nor a MIME boundary of its own.
///
/// Memory: the current line (at most 998 octets) and the content produced since the last
/// [`DataReceiver::take_content`] (at most the input of one call plus a line); the message is
/// never held whole. The content does not depend on how the input is split into reads.
#[derive(Debug)]
pub struct DataReceiver {
    size_max: u64,
    /// Content produced and not yet taken.
    content: Vec<u8>,
    /// Octets of content produced so far.
    stored: u64,
    /// The stored line being built, dot-unstuffed, without its CRLF; at most 998 octets.
    line: Vec<u8>,
    /// The next octet is the first of an SMTP line (one that ended with LF).
    line_start: bool,
    /// The current SMTP line began with a dot, which was removed.
    dot: bool,
    /// Nothing but the dot and the line end has come in the current SMTP line: it may be the
    /// end of data.
    bare: bool,
    /// The last octet was a CR whose LF has not been seen yet.
    cr: bool,
    /// The previous SMTP line ended with CRLF (the DATA command line counts as one).
    prev_crlf: bool,
    /// No empty line stored yet: still in the header section (RFC 5322 §2.1).
    in_header: bool,
    received: u64,
    too_big: bool,
}

impl DataReceiver {
    /// A receiver that accepts messages up to `size_max` octets.
    pub fn new(size_max: u64) -> Self {
        DataReceiver {
            size_max,
            content: Vec::new(),
            stored: 0,
            line: Vec::new(),
            line_start: true,
            dot: false,
            bare: true,
            cr: false,
            prev_crlf: true,
            in_header: true,
            received: 0,
            too_big: false,
        }
    }

    /// Consumes input from the front of `input` until the end of the data (returning the
    /// outcome) or until the input is exhausted (returning `None`).
    pub fn next(&mut self, input: &mut &[u8]) -> Option<DataEvent> {
        while let Some(&first) = input.first() {
            if std::mem::take(&mut self.cr) {
                if first == b'\n' {
                    self.consume(input, 1);
                    if let Some(event) = self.end_smtp_line(true) {
                        return Some(event);
                    }
                    continue;
                }
                // A lone CR: a line break inside the SMTP line. `first` is looked at again.
                self.bare = false;
                self.store_line();
                continue;
            }
            if std::mem::take(&mut self.line_start) && first == b'.' {
                self.dot = true;
                self.consume(input, 1);
                continue;
            }
            let n = input.iter().position(|&b| b == b'\r' || b == b'\n').unwrap_or(input.len());
            self.text(&input[..n]);
            self.consume(input, n);
            match input.first() {
                Some(b'\r') => {
                    self.consume(input, 1);
                    self.cr = true;
                }
                Some(_) => {
                    self.consume(input, 1);
                    if let Some(event) = self.end_smtp_line(false) {
                        return Some(event);
                    }
                }
                None => {}
            }
        }
        None
    }

    /// Octets of message content received so far (before unstuffing is undone).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The content produced since the last call (whole lines with their CRLF), to be appended
    /// to the message; empty once the message is too big.
    pub fn take_content(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.content)
    }

    fn consume(&mut self, input: &mut &[u8], n: usize) {
        self.received += n as u64;
        *input = &input[n..];
    }

    /// Octets of an SMTP line other than CR and LF.
    fn text(&mut self, mut bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.bare = false;
        // Break only once an octet beyond the limit arrives: a line of exactly 998 octets
        // followed by its CRLF stays whole.
        while bytes.len() > STORED_LINE_MAX - self.line.len() {
            let room = STORED_LINE_MAX - self.line.len();
            self.line.extend_from_slice(&bytes[..room]);
            bytes = &bytes[room..];
            self.break_long_line();
        }
        self.line.extend_from_slice(bytes);
    }

    /// The line is full (998 octets) and goes on: store what fits and keep the rest, which
    /// starts with whitespace so that it continues the line (RFC 5322 §2.2.3).
    fn break_long_line(&mut self) {
        let is_wsp = |b: &u8| *b == b' ' || *b == b'\t';
        let fold_at = if self.in_header {
            // Before the last whitespace that has text before it on the line.
            let text_from = self.line.iter().position(|b| !is_wsp(b)).unwrap_or(self.line.len());
            self.line.iter().rposition(is_wsp).filter(|&i| i > text_from)
        } else {
            None
        };
        match fold_at {
            Some(i) => {
                let rest = self.line.split_off(i);
                self.store_line();
                self.line = rest;
            }
            None => {
                self.store_line();
                self.line.push(b' ');
            }
        }
    }

    fn end_smtp_line(&mut self, crlf: bool) -> Option<DataEvent> {
        let prev_crlf = std::mem::replace(&mut self.prev_crlf, crlf);
        let dot = std::mem::take(&mut self.dot);
        let bare = std::mem::replace(&mut self.bare, true);
        self.line_start = true;
        if dot && bare && crlf && prev_crlf {
            return Some(if self.too_big {
                DataEvent::TooBig { size: self.received }
            } else {
                DataEvent::Complete { size: self.stored }
            });
        }
        self.store_line();
        None
    }

    /// Appends the current line and CRLF to the content, unless the message is too big.
    fn store_line(&mut self) {
        if self.line.is_empty() {
            self.in_header = false;
        }
        let len = self.line.len() as u64 + 2;
        if !self.too_big && self.stored + len > self.size_max {
            self.too_big = true;
            self.content = Vec::new();
        }
        if !self.too_big {
            self.stored += len;
            self.content.extend_from_slice(&self.line);
            self.content.extend_from_slice(b"\r\n");
        }
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<LineEvent> {
        let mut r = LineReceiver::new();
        let mut input = input;
        std::iter::from_fn(|| r.next(&mut input)).collect()
    }

    #[test]
    fn command_lines() {
        assert_eq!(lines(b"A\r\nB\nC"), vec![LineEvent::Line(b"A".to_vec()), LineEvent::Line(b"B".to_vec())]);
        let max = vec![b'x'; COMMAND_LINE_MAX - 2];
        let mut ok = max.clone();
        ok.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(lines(&ok), vec![LineEvent::Line(max.clone()), LineEvent::Line(b"NOOP".to_vec())]);
        let mut long = vec![b'x'; COMMAND_LINE_MAX - 1];
        long.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(lines(&long), vec![LineEvent::TooLong, LineEvent::Line(b"NOOP".to_vec())]);
    }

    #[test]
    fn overlong_line_is_not_buffered() {
        let mut r = LineReceiver::new();
        let chunk = vec![b'x'; 4096];
        for _ in 0..100 {
            let mut input = &chunk[..];
            assert_eq!(r.next(&mut input), None);
            assert!(r.buffered() <= COMMAND_LINE_MAX);
        }
        let mut end = &b"\r\n"[..];
        assert_eq!(r.next(&mut end), Some(LineEvent::TooLong));
    }

    /// The message as a test compares it: its content once complete, or the event.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Message(Vec<u8>),
        TooBig { size: u64 },
    }

    /// Feeds `input` in one call: the outcome and the input left over.
    fn data(input: &[u8], max: u64) -> (Option<Got>, usize) {
        let mut r = DataReceiver::new(max);
        let mut input = input;
        let ev = r.next(&mut input);
        let content = r.take_content();
        let got = ev.map(|ev| match ev {
            DataEvent::Complete { size } => {
                assert_eq!(size, content.len() as u64);
                Got::Message(content)
            }
            DataEvent::TooBig { size } => Got::TooBig { size },
        });
        (got, input.len())
    }

    #[test]
    fn data_unstuffing_and_end() {
        let (ev, rest) = data(b"Subject: x\r\n\r\n..hidden\r\n.\r\nQUIT\r\n", 1000);
        assert_eq!(ev, Some(Got::Message(b"Subject: x\r\n\r\n.hidden\r\n".to_vec())));
        assert_eq!(rest, 6);
        assert_eq!(data(b".\r\n", 10).0, Some(Got::Message(Vec::new())));
    }

    #[test]
    fn bare_lf_never_ends_data() {
        // Smuggling attempts: `\n.\n`, `\r\n.\n` and `\n.\r\n` are not the end of data.
        for attack in [&b"a\n.\nMAIL FROM:<x@y.test>\r\n"[..], b"a\r\n.\nX\r\n", b"a\n.\r\nX\r\n"] {
            assert_eq!(data(attack, 1000).0, None, "{:?}", String::from_utf8_lossy(attack));
        }
        let (ev, _) = data(b"a\nb\r\n.\r\n", 1000);
        assert_eq!(ev, Some(Got::Message(b"a\r\nb\r\n".to_vec())));
    }

    #[test]
    fn bare_cr_is_a_line_break() {
        let (ev, _) = data(b"left\rright\r\nend\r\r\n.\r\n", 1000);
        assert_eq!(ev, Some(Got::Message(b"left\r\nright\r\nend\r\n\r\n".to_vec())));
        // A dot after a lone CR is text: not stuffing, not the end of data.
        let (ev, _) = data(b"a\r.x\r\n.\r.\r\n.\r\n", 1000);
        assert_eq!(ev, Some(Got::Message(b"a\r\n.x\r\n\r\n.\r\n".to_vec())));
        for attack in [&b"a\r.\r\nX\r\n"[..], b"a\r\n.\rX\r\n", b"a\r\n.\r\r\nX\r\n", b"a\r\r.\r\n"] {
            assert_eq!(data(attack, 1000).0, None, "{:?}", String::from_utf8_lossy(attack));
        }
        // A CR at the end of one read and its LF at the start of the next are one CRLF.
        let mut r = DataReceiver::new(1000);
        assert_eq!(r.next(&mut &b"a\r"[..]), None);
        assert_eq!(r.next(&mut &b"\n.\r"[..]), None);
        assert_eq!(r.next(&mut &b"\n"[..]), Some(DataEvent::Complete { size: 3 }));
        assert_eq!(r.take_content(), b"a\r\n");
    }

    /// Splits a stored message into its lines without CRLF, checking that every line has one.
    fn stored_lines(m: &[u8]) -> Vec<&[u8]> {
        assert!(m.ends_with(b"\r\n"));
        m[..m.len() - 2].split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)).collect()
    }

    #[test]
    fn long_body_lines_are_broken_with_crlf_space() {
        let max = TEXT_LINE_MAX - 2;
        let mut input = b"Subject: x\r\n\r\n".to_vec();
        input.extend(vec![b'x'; max]);
        input.extend_from_slice(b"\r\n");
        input.extend(vec![b'y'; 2500]);
        input.extend_from_slice(b"\n\r\n.\r\n");
        let Some(Got::Message(m)) = data(&input, 1 << 20).0 else { panic!() };
        let lines = stored_lines(&m);
        let lens: Vec<usize> = lines.iter().map(|l| l.len()).collect();
        // 998 octets stay whole; 2,500 become 998 + (1 + 997) + (1 + 505).
        assert_eq!(lens, vec![10, 0, max, max, max, 506, 0]);
        assert!(lines[4].starts_with(b" y") && lines[5].starts_with(b" y"));
        let joined: Vec<u8> = lines[3..6].iter().flat_map(|l| l.iter().copied()).filter(|&b| b != b' ').collect();
        assert_eq!(joined, vec![b'y'; 2500]);
    }

    #[test]
    fn long_header_lines_are_folded_at_whitespace() {
        let to: String = (0..200).map(|i| format!(" <user{i}@example.test>,")).collect();
        let header = format!("To:{to}");
        let body = "z".repeat(1200);
        let input = format!("{header}\r\nX-Long: {body}\r\n\r\n{body}\r\n.\r\n");
        let Some(Got::Message(m)) = data(input.as_bytes(), 1 << 20).0 else { panic!() };
        let lines = stored_lines(&m);
        assert!(lines.iter().all(|l| l.len() <= TEXT_LINE_MAX - 2));
        // RFC 5322 §2.2.3 unfolding (delete CRLF before WSP) restores the To: line exactly.
        let text = String::from_utf8(m.clone()).unwrap();
        let unfolded = text.replace("\r\n ", " ");
        assert!(unfolded.starts_with(&format!("{header}\r\n")), "{}", &text[..200]);
        // Folded at its only space, then, without whitespace left, CRLF SP is inserted as in
        // the body.
        assert!(text.contains(&format!("\r\nX-Long:\r\n {}\r\n {}\r\n\r\n", &body[..997], &body[997..])));
        assert!(text.ends_with(&format!("\r\n\r\n{}\r\n {}\r\n", &body[..998], &body[998..])));
    }

    #[test]
    fn data_limits() {
        let (ev, _) = data(b"0123456789\r\n0123456789\r\n.\r\n", 20);
        assert_eq!(ev, Some(Got::TooBig { size: 27 }));
        // Exactly 998 octets with CRLF (or a bare LF) is one stored line, one more is two.
        for (n, end) in [(TEXT_LINE_MAX - 2, &b"\r\n"[..]), (TEXT_LINE_MAX - 2, b"\n"), (TEXT_LINE_MAX - 1, b"\r\n")] {
            let mut line = vec![b'x'; n];
            line.extend_from_slice(end);
            line.extend_from_slice(b"\r\n.\r\n");
            let Some(Got::Message(m)) = data(&line, 1 << 20).0 else { panic!() };
            assert_eq!(stored_lines(&m).len(), if n > TEXT_LINE_MAX - 2 { 3 } else { 2 });
        }
        // Memory: a 10 MB line is never held whole.
        let mut r = DataReceiver::new(1 << 30);
        let chunk = vec![b'x'; 1 << 16];
        for _ in 0..160 {
            assert_eq!(r.next(&mut &chunk[..]), None);
            assert!(r.line.len() <= TEXT_LINE_MAX - 2);
            // What one read brings, its inserted CRLF SP, and a line held from the read before.
            let bound = chunk.len() + 3 * (chunk.len() / (TEXT_LINE_MAX - 2) + 1) + TEXT_LINE_MAX;
            assert!(r.take_content().len() <= bound);
        }
    }

    #[test]
    fn content_is_handed_out_as_it_arrives_and_never_held() {
        // 64 MiB of lines in 64 KiB reads: what is held never exceeds one read's worth, and
        // what is handed out, concatenated, is the message.
        let line = [vec![b'y'; 78], b"\r\n".to_vec()].concat();
        let chunk: Vec<u8> = line.iter().copied().cycle().take(line.len() * 800).collect();
        let mut r = DataReceiver::new(1 << 30);
        let mut total = 0u64;
        for _ in 0..1000 {
            assert_eq!(r.next(&mut &chunk[..]), None);
            assert!(r.content.capacity() <= 2 * chunk.len());
            let content = r.take_content();
            assert_eq!(content, chunk);
            total += content.len() as u64;
        }
        assert_eq!(r.next(&mut &b".\r\n"[..]), Some(DataEvent::Complete { size: total }));
        assert!(r.take_content().is_empty());
        // Too big: nothing more is handed out once over the limit, and the end says so.
        let mut r = DataReceiver::new(100);
        assert_eq!(r.next(&mut &chunk[..]), None);
        assert!(r.take_content().len() <= 100);
        assert_eq!(r.next(&mut &chunk[..]), None);
        assert!(r.take_content().is_empty());
        let end = r.next(&mut &b".\r\n"[..]);
        assert_eq!(end, Some(DataEvent::TooBig { size: 2 * chunk.len() as u64 + 3 }));
    }
}
