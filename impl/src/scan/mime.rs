//! The MIME walk of the built-in scanner: where a message's base64-encoded bodies are
//! ([`base64_bodies`]) and what they decode to ([`decode_base64`]), without a full MIME parser.
//!
//! It owns only this lexing of header blocks and bodies, bounded by the caller (at most so many
//! ranges, at most so many octets decoded). It must not know about signatures, clocks or
//! scanning: [`super::builtin`] decides what to look for and how deep to go.

use std::ops::Range;

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

/// The byte ranges of base64-encoded bodies (RFC 2045 §6.8) in a MIME message, found without a
/// full parser: every header block — the message's, each part's after a `--boundary` line, and
/// an attached `message/rfc822`'s — is read for `Content-Transfer-Encoding: base64`; the body
/// runs to the next line starting with `--` (never a base64 line: `-` is not in its alphabet).
/// Nested multiparts need no boundary bookkeeping this way. At most `max` ranges.
pub(super) fn base64_bodies(data: &[u8], max: usize) -> Vec<Range<usize>> {
    enum Walk {
        Headers(HeaderBlock),
        Body { start: usize, base64: bool },
    }
    let mut out = Vec::new();
    let mut walk = Walk::Headers(HeaderBlock::default());
    let mut pos = 0;
    while pos < data.len() && out.len() < max {
        let end = data[pos..].iter().position(|b| *b == b'\n').map_or(data.len(), |i| pos + i);
        let next = (end + 1).min(data.len());
        let line = data[pos..end].strip_suffix(b"\r").unwrap_or(&data[pos..end]);
        match &mut walk {
            Walk::Headers(block) if line.is_empty() => {
                walk = if block.rfc822() && !block.base64() {
                    Walk::Headers(HeaderBlock::default())
                } else {
                    Walk::Body { start: next, base64: block.base64() }
                };
            }
            Walk::Headers(block) => block.feed(line),
            Walk::Body { start, base64 } => {
                if line.starts_with(b"--") {
                    if *base64 && *start < pos {
                        out.push(*start..pos);
                    }
                    walk = Walk::Headers(HeaderBlock::default());
                }
            }
        }
        pos = next;
    }
    if let Walk::Body { start, base64: true } = walk
        && start < data.len()
        && out.len() < max
    {
        out.push(start..data.len());
    }
    out
}

/// Decodes base64 as RFC 2045 §6.8 asks of a receiver: characters outside the alphabet are
/// ignored, `=` ends the data. At most `max` octets.
pub(super) fn decode_base64(text: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity((text.len() / 4 * 3).min(max));
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &c in text {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            if out.len() == max {
                break;
            }
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
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
        let ranges = base64_bodies(&msg, 10);
        assert_eq!(ranges.len(), 1);
        assert_eq!(decode_base64(&msg[ranges[0].clone()], 100), b"abc");
        assert!(base64_bodies(b"Subject: plain\r\n\r\n-- \r\nsig\r\n", 10).is_empty());
        assert!(base64_bodies(b"\xff\xfe binary without lines", 10).is_empty());
    }
}
