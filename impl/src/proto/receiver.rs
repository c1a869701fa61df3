//! Byte receivers: command lines and DATA. Both consume from the front of an input slice and
//! stop at the first complete event, so the session can switch receivers between a DATA
//! command and the message that is pipelined behind it. Buffers are bounded: an overlong line
//! is reported and skipped, an oversized message is counted and discarded, never stored.

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
    /// The end-of-data line `.` CRLF was received and the message is acceptable: its content,
    /// dot-unstuffed, every line ending normalized to CRLF.
    Message(Vec<u8>),
    /// End of data, but the message exceeded the size limit (552 5.3.4); `size` is what was
    /// received.
    TooBig {
        /// Octets received.
        size: u64,
    },
    /// End of data, but a text line was longer than [`TEXT_LINE_MAX`] (RFC 5321 §4.5.3.1.6).
    LineTooLong,
}

/// Receives one message after DATA: dot-unstuffing (RFC 5321 §4.5.2), the end-of-data line,
/// and bare LF. Only `CRLF . CRLF` ends the data (a bare LF before or after the dot does not:
/// that ambiguity is the "SMTP smuggling" attack); other bare-LF lines are normalized to CRLF.
#[derive(Debug)]
pub struct DataReceiver {
    size_max: u64,
    message: Vec<u8>,
    line: Vec<u8>,
    line_overflow: bool,
    /// The last byte of the current line was CR (tracked apart from `line`, which an overlong
    /// line does not keep).
    last_cr: bool,
    prev_crlf: bool,
    received: u64,
    too_big: bool,
    line_too_long: bool,
}

impl DataReceiver {
    /// A receiver that accepts messages up to `size_max` octets.
    pub fn new(size_max: u64) -> Self {
        DataReceiver {
            size_max,
            message: Vec::new(),
            line: Vec::new(),
            line_overflow: false,
            last_cr: false,
            prev_crlf: true,
            received: 0,
            too_big: false,
            line_too_long: false,
        }
    }

    /// Consumes input from the front of `input` until the end of the data (returning the
    /// outcome) or until the input is exhausted (returning `None`).
    pub fn next(&mut self, input: &mut &[u8]) -> Option<DataEvent> {
        while !input.is_empty() {
            let Some(i) = input.iter().position(|&b| b == b'\n') else {
                self.append(input);
                *input = &[];
                return None;
            };
            self.append(&input[..i]);
            *input = &input[i + 1..];
            if let Some(event) = self.end_line() {
                return Some(event);
            }
        }
        None
    }

    /// Octets of message content received so far (before unstuffing is undone).
    pub fn received(&self) -> u64 {
        self.received
    }

    fn append(&mut self, bytes: &[u8]) {
        self.received += bytes.len() as u64;
        if let Some(&last) = bytes.last() {
            self.last_cr = last == b'\r';
        }
        if self.line_overflow {
            return;
        }
        if self.line.len() + bytes.len() > TEXT_LINE_MAX - 1 {
            self.line_overflow = true;
            self.line.clear();
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    fn end_line(&mut self) -> Option<DataEvent> {
        self.received += 1;
        let crlf = std::mem::take(&mut self.last_cr);
        if crlf && !self.line_overflow {
            self.line.pop();
        }
        let prev_crlf = std::mem::replace(&mut self.prev_crlf, crlf);
        // A bare-LF line may hold one octet more than a CRLF one; it must still fit once its
        // ending is normalized to CRLF.
        if std::mem::take(&mut self.line_overflow) || self.line.len() > TEXT_LINE_MAX - 2 {
            self.line.clear();
            self.line_too_long = true;
            return None;
        }
        if self.line == b"." && crlf && prev_crlf {
            self.line.clear();
            return Some(if self.line_too_long {
                DataEvent::LineTooLong
            } else if self.too_big {
                DataEvent::TooBig { size: self.received }
            } else {
                DataEvent::Message(std::mem::take(&mut self.message))
            });
        }
        let content = if self.line.first() == Some(&b'.') { &self.line[1..] } else { &self.line[..] };
        if self.message.len() as u64 + content.len() as u64 + 2 > self.size_max {
            self.too_big = true;
            self.message = Vec::new();
        }
        if !self.too_big && !self.line_too_long {
            self.message.extend_from_slice(content);
            self.message.extend_from_slice(b"\r\n");
        }
        self.line.clear();
        None
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

    fn data(input: &[u8], max: u64) -> (Option<DataEvent>, usize) {
        let mut r = DataReceiver::new(max);
        let mut input = input;
        let ev = r.next(&mut input);
        (ev, input.len())
    }

    #[test]
    fn data_unstuffing_and_end() {
        let (ev, rest) = data(b"Subject: x\r\n\r\n..hidden\r\n.\r\nQUIT\r\n", 1000);
        assert_eq!(ev, Some(DataEvent::Message(b"Subject: x\r\n\r\n.hidden\r\n".to_vec())));
        assert_eq!(rest, 6);
        assert_eq!(data(b".\r\n", 10).0, Some(DataEvent::Message(Vec::new())));
    }

    #[test]
    fn bare_lf_never_ends_data() {
        // Smuggling attempts: `\n.\n`, `\r\n.\n` and `\n.\r\n` are not the end of data.
        for attack in [&b"a\n.\nMAIL FROM:<x@y.test>\r\n"[..], b"a\r\n.\nX\r\n", b"a\n.\r\nX\r\n"] {
            assert_eq!(data(attack, 1000).0, None, "{:?}", String::from_utf8_lossy(attack));
        }
        let (ev, _) = data(b"a\nb\r\n.\r\n", 1000);
        assert_eq!(ev, Some(DataEvent::Message(b"a\r\nb\r\n".to_vec())));
    }

    #[test]
    fn data_limits() {
        let (ev, _) = data(b"0123456789\r\n0123456789\r\n.\r\n", 20);
        assert_eq!(ev, Some(DataEvent::TooBig { size: 27 }));
        let mut long = vec![b'x'; TEXT_LINE_MAX - 1];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(data(&long, 1 << 20).0, Some(DataEvent::LineTooLong));
        let mut bare = vec![b'x'; TEXT_LINE_MAX - 1];
        bare.extend_from_slice(b"\n\r\n.\r\n");
        assert_eq!(data(&bare, 1 << 20).0, Some(DataEvent::LineTooLong));
        let mut ok = vec![b'x'; TEXT_LINE_MAX - 2];
        ok.extend_from_slice(b"\r\n.\r\n");
        assert!(matches!(data(&ok, 1 << 20).0, Some(DataEvent::Message(_))));
    }
}
