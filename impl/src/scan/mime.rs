//! The MIME walk of the built-in scanner: where a message's base64-encoded bodies are
//! ([`MimeWalk`]) and what they decode to ([`Base64Decoder`]), without a full MIME parser and
//! without holding the message: both work on a stream of chunks.
//!
//! It owns only this lexing of header blocks and bodies, bounded by the caller (it decides how
//! many bodies and how many octets are decoded). It must not know about signatures, clocks or
//! scanning: [`super::builtin`] decides what to look for and how deep to go.

/// What the header block being read says about its body.
#[derive(Debug, Default)]
struct HeaderBlock {
    field: Field,
    encoding: Vec<u8>,
    content_type: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Field {
    #[default]
    Other,
    Encoding,
    ContentType,
}

/// Enough of a header value to tell `base64` and `message/rfc822`.
const FIELD_KEEP: usize = 64;

impl HeaderBlock {
    fn feed(&mut self, line: &[u8]) {
        let value = if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            line // a folded continuation (RFC 5322 §2.2.3)
        } else if let Some(colon) = line.iter().position(|b| *b == b':') {
            let name = line[..colon].trim_ascii();
            self.field = if name.eq_ignore_ascii_case(b"content-transfer-encoding") {
                Field::Encoding
            } else if name.eq_ignore_ascii_case(b"content-type") {
                Field::ContentType
            } else {
                Field::Other
            };
            &line[colon + 1..]
        } else {
            self.field = Field::Other;
            return;
        };
        let keep = match self.field {
            Field::Other => return,
            Field::Encoding => &mut self.encoding,
            Field::ContentType => &mut self.content_type,
        };
        let room = FIELD_KEEP.saturating_sub(keep.len());
        keep.extend(value.iter().take(room));
    }

    fn base64(&self) -> bool {
        self.encoding.trim_ascii().eq_ignore_ascii_case(b"base64")
    }

    fn rfc822(&self) -> bool {
        let t = self.content_type.trim_ascii();
        t.len() >= 14 && t[..14].eq_ignore_ascii_case(b"message/rfc822")
    }
}

/// What [`MimeWalk`] reports about base64-encoded bodies, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part<'a> {
    /// A non-empty base64-encoded body begins.
    Start,
    /// Octets of it, as they are in the message (line breaks included; the decoder skips them).
    Data(&'a [u8]),
    /// It ended (a `--` line, or the end of the message).
    End,
}

/// Where the walk is.
#[derive(Debug)]
enum Mode {
    /// In a header block, reading its lines.
    Headers,
    /// In a body: base64-encoded or not; `started` once its first octet went out.
    Body { base64: bool, started: bool },
    /// In a `--` line: skipped to its end, then a header block.
    Boundary,
}

/// Longest header line kept: enough for any field name, and values are cut at [`FIELD_KEEP`].
const HEADER_LINE_KEEP: usize = 1024;

/// Finds the base64-encoded bodies (RFC 2045 §6.8) of a MIME message as it streams by, without
/// a full parser: every header block — the message's, each part's after a `--boundary` line,
/// and an attached `message/rfc822`'s — is read for `Content-Transfer-Encoding: base64`; the
/// body runs to the next line starting with `--` (never a base64 line: `-` is not in its
/// alphabet). Nested multiparts need no boundary bookkeeping this way.
///
/// Memory: one header line (at most [`HEADER_LINE_KEEP`] octets) and two held octets; the
/// result does not depend on how the message is split into chunks.
#[derive(Debug)]
pub(super) struct MimeWalk {
    mode: Mode,
    block: HeaderBlock,
    /// The header line being read, without its LF; cut at [`HEADER_LINE_KEEP`].
    line: Vec<u8>,
    /// In a body: the next octet starts a line.
    line_start: bool,
    /// In a body: a line's first octet, `-`, held until the next one tells whether the line
    /// is a boundary.
    dash: bool,
}

impl Default for MimeWalk {
    fn default() -> Self {
        MimeWalk { mode: Mode::Headers, block: HeaderBlock::default(), line: Vec::new(), line_start: true, dash: false }
    }
}

impl MimeWalk {
    /// Walks the next chunk of the message, reporting base64 bodies to `on`.
    pub(super) fn feed(&mut self, mut data: &[u8], on: &mut impl FnMut(Part<'_>)) {
        while !data.is_empty() {
            match &mut self.mode {
                Mode::Headers => {
                    let (text, done) = match data.iter().position(|b| *b == b'\n') {
                        Some(i) => (&data[..i], Some(i + 1)),
                        None => (data, None),
                    };
                    let room = HEADER_LINE_KEEP.saturating_sub(self.line.len());
                    self.line.extend(text.iter().take(room));
                    let Some(n) = done else { return };
                    data = &data[n..];
                    self.header_line();
                }
                Mode::Boundary => match data.iter().position(|b| *b == b'\n') {
                    Some(i) => {
                        data = &data[i + 1..];
                        self.mode = Mode::Headers;
                        self.block = HeaderBlock::default();
                    }
                    None => return,
                },
                Mode::Body { base64, started } => {
                    let (base64, started) = (*base64, *started);
                    if self.line_start || self.dash {
                        // A line's first two octets: `--` ends the body.
                        if !self.dash {
                            self.line_start = false;
                            if data[0] == b'-' {
                                self.dash = true;
                                data = &data[1..];
                                continue;
                            }
                        } else {
                            self.dash = false;
                            if data[0] == b'-' {
                                data = &data[1..];
                                if started {
                                    on(Part::End);
                                }
                                self.mode = Mode::Boundary;
                                continue;
                            }
                            self.body(base64, b"-", on);
                        }
                    }
                    // The rest of the line, with its LF.
                    let n = data.iter().position(|b| *b == b'\n').map_or(data.len(), |i| i + 1);
                    self.body(base64, &data[..n], on);
                    self.line_start = data[n - 1] == b'\n';
                    data = &data[n..];
                }
            }
        }
    }

    /// The message ended: a base64 body still open ends here.
    pub(super) fn finish(&mut self, on: &mut impl FnMut(Part<'_>)) {
        if let Mode::Body { base64, .. } = self.mode
            && std::mem::take(&mut self.dash)
        {
            self.body(base64, b"-", on);
        }
        if let Mode::Body { started: true, .. } = self.mode {
            on(Part::End);
        }
        self.mode = Mode::Headers;
    }

    /// Octets of a body: reported if it is base64-encoded.
    fn body(&mut self, base64: bool, octets: &[u8], on: &mut impl FnMut(Part<'_>)) {
        if !base64 || octets.is_empty() {
            return;
        }
        if let Mode::Body { started, .. } = &mut self.mode
            && !std::mem::replace(started, true)
        {
            on(Part::Start);
        }
        on(Part::Data(octets));
    }

    /// A whole header line is in `line`.
    fn header_line(&mut self) {
        let mut line = std::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            let block = std::mem::take(&mut self.block);
            if !block.rfc822() || block.base64() {
                self.mode = Mode::Body { base64: block.base64(), started: false };
                self.line_start = true;
                self.dash = false;
            }
        } else {
            self.block.feed(&line);
        }
        line.clear();
        self.line = line;
    }
}

/// Decodes base64 as it streams by, as RFC 2045 §6.8 asks of a receiver: characters outside
/// the alphabet are ignored, `=` ends the data.
#[derive(Debug, Default)]
pub(super) struct Base64Decoder {
    acc: u32,
    bits: u32,
    done: bool,
}

impl Base64Decoder {
    /// Decodes `text`, appending at most `max` octets to `out`; returns how many.
    pub(super) fn decode(&mut self, text: &[u8], max: usize, out: &mut Vec<u8>) -> usize {
        let mut n = 0;
        for &c in text {
            if self.done || n == max {
                break;
            }
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                b'=' => {
                    self.done = true;
                    break;
                }
                _ => continue,
            };
            self.acc = (self.acc << 6) | u32::from(v);
            self.bits += 6;
            if self.bits >= 8 {
                self.bits -= 8;
                out.push((self.acc >> self.bits) as u8);
                self.acc &= (1 << self.bits) - 1;
                n += 1;
            }
        }
        n
    }
}

/// Decodes a whole base64 text, at most `max` octets.
#[cfg(test)]
pub(super) fn decode_base64(text: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    Base64Decoder::default().decode(text, max, &mut out);
    out
}

/// The base64 bodies of `data` as they are in it, at most `max`, walked in chunks of `chunk`.
#[cfg(test)]
pub(super) fn base64_bodies(data: &[u8], max: usize, chunk: usize) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut walk = MimeWalk::default();
    let mut on = |p: Part<'_>| match p {
        Part::Start => out.push(Vec::new()),
        Part::Data(d) => out.last_mut().expect("started").extend_from_slice(d),
        Part::End => {}
    };
    for c in data.chunks(chunk.max(1)) {
        walk.feed(c, &mut on);
    }
    walk.finish(&mut on);
    out.truncate(max);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::fixtures::{attachment, base64};

    #[test]
    fn base64_round_trip() {
        for len in 0..200 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            assert_eq!(decode_base64(base64(&data).as_bytes(), usize::MAX), data);
        }
        assert_eq!(decode_base64(b"aGVsbG8gd29ybGQ=", 5), b"hello");
        assert_eq!(decode_base64(b"aGVs\r\n bG8*", usize::MAX), b"hello");
    }

    #[test]
    fn mime_walk_finds_only_base64_bodies() {
        let msg = attachment(b"abc");
        for chunk in [1, 2, 3, 7, 64, msg.len()] {
            let bodies = base64_bodies(&msg, 10, chunk);
            assert_eq!(bodies.len(), 1, "chunks of {chunk}");
            assert_eq!(decode_base64(&bodies[0], 100), b"abc");
            // The body runs up to the boundary line, its line break included.
            assert!(bodies[0].ends_with(b"\r\n") && !bodies[0].windows(2).any(|w| w == b"--"));
        }
        assert!(base64_bodies(b"Subject: plain\r\n\r\n-- \r\nsig\r\n", 10, 3).is_empty());
        assert!(base64_bodies(b"\xff\xfe binary without lines", 10, 3).is_empty());
        // A body that ends with the message, and one whose lines start with a single dash.
        let single = b"Content-Transfer-Encoding: base64\r\n\r\naGVs\r\n-bG8=";
        for chunk in [1, 5, single.len()] {
            let bodies = base64_bodies(single, 10, chunk);
            assert_eq!(bodies, vec![b"aGVs\r\n-bG8=".to_vec()]);
            assert_eq!(decode_base64(&bodies[0], 100), b"hello");
        }
        // An empty body is no body.
        assert!(base64_bodies(b"Content-Transfer-Encoding: base64\r\n\r\n--b\r\n", 10, 1).is_empty());
    }

    #[test]
    fn decoding_streams() {
        let text = base64(b"streamed in pieces of any size");
        for chunk in 1..9 {
            let mut d = Base64Decoder::default();
            let mut out = Vec::new();
            for c in text.as_bytes().chunks(chunk) {
                d.decode(c, usize::MAX, &mut out);
            }
            assert_eq!(out, b"streamed in pieces of any size");
        }
    }
}
