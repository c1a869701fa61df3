//! Replies with enhanced status codes (RFC 5321 §4.2, RFC 3463, RFC 2034): the type, its wire
//! form, and the one parser of that wire form. Every client in the workspace reads replies with
//! [`Reply::parse_prefix`] (the simulation's clients and checker, the load generator, the fuzz
//! targets), so that what the gatekeeper writes and what its judges read cannot drift apart.
//!
//! The replies the gatekeeper sends are named in `catalogue`; nothing else spells a code and
//! its text. Pure: no IO; errors are values.

use std::borrow::Cow;
use std::fmt;

use super::REPLY_LINE_MAX;

/// An enhanced status code `class.subject.detail` (RFC 3463).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Enhanced(pub u8, pub u16, pub u16);

impl fmt::Display for Enhanced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One SMTP reply: a code, an optional enhanced status code and one or more text lines.
///
/// The enhanced code is written on every line, as RFC 2034 §3 requires once
/// ENHANCEDSTATUSCODES is advertised. The greeting and EHLO replies carry none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The enhanced status code, if any.
    pub enhanced: Option<Enhanced>,
    /// Text lines, without CRLF; at least one.
    pub lines: Vec<Cow<'static, str>>,
}

/// Why octets are not a well-formed reply (RFC 5321 §4.2). `line` counts the reply's lines
/// from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The input ends before the CRLF of the reply's last line ([`Reply::parse`] only).
    #[error("the reply ends before its last line")]
    Incomplete,
    /// The line does not start with a reply code `%x32-35 %x30-35 %x30-39`.
    #[error("line {line}: no reply code")]
    BadCode {
        /// The line.
        line: usize,
    },
    /// The code is followed by neither SP, `-` nor CRLF.
    #[error("line {line}: the code is followed by neither SP, '-' nor CRLF")]
    BadSeparator {
        /// The line.
        line: usize,
    },
    /// A line of a multi-line reply carries another code than the first (RFC 5321 §4.2.1).
    #[error("line {line}: code {then} in a reply that began with {first}")]
    MixedCodes {
        /// The line.
        line: usize,
        /// The code of the first line.
        first: u16,
        /// The code of this line.
        then: u16,
    },
    /// The text is not a textstring (HT, SP, printable US-ASCII; RFC 5321 §4.2): a control
    /// octet, a bare CR or LF, or an octet over 126.
    #[error("line {line}: the text is not a textstring")]
    NotText {
        /// The line.
        line: usize,
    },
    /// The line, CRLF included, is longer than [`REPLY_LINE_MAX`] (RFC 5321 §4.5.3.1.5).
    #[error("line {line}: longer than {REPLY_LINE_MAX} octets")]
    LineTooLong {
        /// The line.
        line: usize,
    },
    /// Octets follow the reply's last line ([`Reply::parse`] only).
    #[error("{0} octets after the reply")]
    Trailing(usize),
}

impl Reply {
    /// A one-line reply with an enhanced code.
    pub fn new(code: u16, enhanced: Enhanced, text: impl Into<Cow<'static, str>>) -> Self {
        Reply { code, enhanced: Some(enhanced), lines: vec![text.into()] }
    }

    /// A reply without an enhanced code (greeting, EHLO).
    pub fn plain(code: u16, lines: Vec<Cow<'static, str>>) -> Self {
        debug_assert!(!lines.is_empty());
        Reply { code, enhanced: None, lines }
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
    /// 4xx.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    /// 5xx.
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }
    /// 4xx or 5xx: the command was not accepted (RFC 5321 §4.2.1).
    pub fn is_negative(&self) -> bool {
        self.is_transient() || self.is_permanent()
    }

    /// Appends the wire form (CRLF-terminated lines) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        // By hand rather than `write!`: one reply per command, and the formatting machinery
        // was a tenth of an early reject's instructions.
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            push_decimal(out, self.code.into());
            out.push(if i == last { b' ' } else { b'-' });
            if let Some(Enhanced(class, subject, detail)) = self.enhanced {
                push_decimal(out, class.into());
                out.push(b'.');
                push_decimal(out, subject.into());
                out.push(b'.');
                push_decimal(out, detail.into());
                out.push(b' ');
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The wire form as a string (tests, logs).
    pub fn to_wire(&self) -> String {
        let mut out = Vec::new();
        self.write_to(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Parses `wire`, which must be exactly one whole reply: every line CRLF-terminated, nothing
    /// after the last. The inverse of [`Reply::write_to`] (see [`Reply::parse_prefix`]).
    pub fn parse(wire: &[u8]) -> Result<Reply, ReplyError> {
        match Reply::parse_prefix(wire)? {
            Some((reply, used)) if used == wire.len() => Ok(reply),
            Some((_, used)) => Err(ReplyError::Trailing(wire.len() - used)),
            None => Err(ReplyError::Incomplete),
        }
    }

    /// Parses the reply at the start of `input`, for a client reading a stream:
    /// `Ok(Some((reply, octets used)))` once its last line is complete, `Ok(None)` while more
    /// input is needed, an error as soon as the input cannot become a reply (so a client never
    /// buffers more than [`REPLY_LINE_MAX`] octets of a line).
    ///
    /// Grammar (RFC 5321 §4.2): `*( code "-" [ textstring ] CRLF ) code [ SP textstring ]
    /// CRLF`, one code throughout. The enhanced status code (RFC 3463, RFC 2034 §3) is
    /// recognised when every line's text begins with the same one, of class 2, 4 or 5,
    /// followed by SP or the end of the line; otherwise the text is kept whole and
    /// `enhanced` is `None`. Whether its class matches the code's is left to the caller.
    pub fn parse_prefix(input: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
        let mut pos = 0;
        let mut code = None;
        let mut texts: Vec<&str> = Vec::new();
        loop {
            let line = texts.len();
            let rest = &input[pos..];
            let Some(end) = rest.windows(2).position(|w| w == b"\r\n") else {
                // Without its CRLF within REPLY_LINE_MAX octets, this line can only be too long.
                return if rest.len() >= REPLY_LINE_MAX { Err(ReplyError::LineTooLong { line }) } else { Ok(None) };
            };
            if end + 2 > REPLY_LINE_MAX {
                return Err(ReplyError::LineTooLong { line });
            }
            let (this, more, text) = parse_line(&rest[..end], line)?;
            match code {
                None => code = Some(this),
                Some(first) if first != this => return Err(ReplyError::MixedCodes { line, first, then: this }),
                Some(_) => {}
            }
            texts.push(text);
            pos += end + 2;
            if !more {
                break;
            }
        }
        let code = code.expect("at least one line");
        let enhanced = split_enhanced(texts[0])
            .map(|(e, _)| e)
            .filter(|&e| texts.iter().all(|t| split_enhanced(t).is_some_and(|(other, _)| other == e)));
        let lines = texts
            .into_iter()
            .map(|t| match enhanced {
                Some(_) => split_enhanced(t).map_or(t, |(_, rest)| rest),
                None => t,
            })
            .map(|t| Cow::Owned(t.to_owned()))
            .collect();
        Ok(Some((Reply { code, enhanced, lines }, pos)))
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// One line without its CRLF: the code, whether more lines follow, and the text.
fn parse_line(line: &[u8], index: usize) -> Result<(u16, bool, &str), ReplyError> {
    let code = match line {
        [a @ b'2'..=b'5', b @ b'0'..=b'5', c @ b'0'..=b'9', ..] => {
            [a, b, c].iter().fold(0u16, |n, &&d| n * 10 + u16::from(d - b'0'))
        }
        _ => return Err(ReplyError::BadCode { line: index }),
    };
    let (more, text) = match line.get(3) {
        None => (false, &line[3..]),
        Some(b' ') => (false, &line[4..]),
        Some(b'-') => (true, &line[4..]),
        Some(_) => return Err(ReplyError::BadSeparator { line: index }),
    };
    if !text.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b)) {
        return Err(ReplyError::NotText { line: index });
    }
    let text = std::str::from_utf8(text).expect("printable ASCII is UTF-8");
    Ok((code, more, text))
}

/// `class.subject.detail` at the start of `text` (RFC 3463: class 2, 4 or 5; subject and
/// detail of 1 to 3 digits), followed by SP or nothing; returns it and the text after the SP.
fn split_enhanced(text: &str) -> Option<(Enhanced, &str)> {
    let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
    let mut parts = word.split('.');
    let number = |s: Option<&str>| -> Option<u16> {
        s.filter(|s| (1..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()))?.parse().ok()
    };
    let class = match parts.next()? {
        c @ ("2" | "4" | "5") => c.as_bytes()[0] - b'0',
        _ => return None,
    };
    let subject = number(parts.next())?;
    let detail = number(parts.next())?;
    parts.next().is_none().then_some((Enhanced(class, subject, detail), rest))
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.enhanced {
            Some(e) => write!(f, "{} {e} {}", self.code, self.lines.join(" / ")),
            None => write!(f, "{} {}", self.code, self.lines.join(" / ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn multiline_wire_form() {
        let r = Reply { code: 250, enhanced: Some(Enhanced(2, 0, 0)), lines: vec!["a".into(), "b".into()] };
        assert_eq!(r.to_wire(), "250-2.0.0 a\r\n250 2.0.0 b\r\n");
        let g = Reply::plain(220, vec!["mx.test ESMTP".into()]);
        assert_eq!(g.to_wire(), "220 mx.test ESMTP\r\n");
    }

    #[test]
    fn parses_multiline_and_enhanced_replies() {
        let ehlo = Reply::parse(b"250-mx.test greets c\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n").unwrap();
        assert_eq!((ehlo.code, ehlo.enhanced), (250, None));
        assert_eq!(ehlo.lines, ["mx.test greets c", "PIPELINING", "ENHANCEDSTATUSCODES"]);
        let r = Reply::parse(b"550-5.1.1 No such\r\n550 5.1.1 user here\r\n").unwrap();
        assert_eq!((r.code, r.enhanced), (550, Some(Enhanced(5, 1, 1))));
        assert_eq!(r.lines, ["No such", "user here"]);
        // A code with no text at all (RFC 5321 §4.2: the textstring is optional).
        assert_eq!(Reply::parse(b"250\r\n").unwrap().lines, [""]);
        // The enhanced code on some lines only, or of class 3: kept as text.
        let mixed = Reply::parse(b"250-2.0.0 a\r\n250 b\r\n").unwrap();
        assert_eq!((mixed.enhanced, mixed.lines), (None, vec!["2.0.0 a".into(), "b".into()]));
        assert_eq!(Reply::parse(b"354 3.0.0 go\r\n").unwrap().enhanced, None);
        // The class is read whatever the code says; judging it is the caller's business.
        assert_eq!(Reply::parse(b"250 5.0.0 odd\r\n").unwrap().enhanced, Some(Enhanced(5, 0, 0)));
    }

    #[test]
    fn errors_are_values() {
        let e = |wire: &[u8]| Reply::parse(wire).unwrap_err();
        assert_eq!(e(b"250 OK"), ReplyError::Incomplete);
        assert_eq!(e(b"250-a\r\n"), ReplyError::Incomplete);
        assert_eq!(e(b"25 x\r\n"), ReplyError::BadCode { line: 0 });
        assert_eq!(e(b"650 x\r\n"), ReplyError::BadCode { line: 0 });
        assert_eq!(e(b"260 x\r\n"), ReplyError::BadCode { line: 0 });
        assert_eq!(e(b"250x\r\n"), ReplyError::BadSeparator { line: 0 });
        assert_eq!(e(b"250-a\r\n251 b\r\n"), ReplyError::MixedCodes { line: 1, first: 250, then: 251 });
        assert_eq!(e(b"250 a\rb\r\n"), ReplyError::NotText { line: 0 });
        assert_eq!(e("250 caf\u{e9}\r\n".as_bytes()), ReplyError::NotText { line: 0 });
        assert_eq!(e(b"250 a\r\n250 b\r\n"), ReplyError::Trailing(7));
        let long = format!("250 {}\r\n", "x".repeat(REPLY_LINE_MAX - 5));
        assert_eq!(e(long.as_bytes()), ReplyError::LineTooLong { line: 0 });
        assert!(Reply::parse(&long.as_bytes()[1..]).is_err_and(|e| e != ReplyError::LineTooLong { line: 0 }));
        // A stream reader learns of an endless line without waiting for its end.
        let endless = vec![b'2'; REPLY_LINE_MAX];
        assert_eq!(Reply::parse_prefix(&endless), Err(ReplyError::LineTooLong { line: 0 }));
        assert_eq!(Reply::parse_prefix(&endless[1..]), Ok(None));
    }

    #[test]
    fn prefix_parsing_reports_the_octets_used() {
        let wire = b"220 mx ESMTP\r\n250-a\r\n250 b\r\n";
        let (greeting, used) = Reply::parse_prefix(wire).unwrap().unwrap();
        assert_eq!((greeting.code, used), (220, 14));
        let (ehlo, used2) = Reply::parse_prefix(&wire[used..]).unwrap().unwrap();
        assert_eq!((ehlo.lines.len(), used + used2), (2, wire.len()));
        assert_eq!(Reply::parse_prefix(&wire[used..20]), Ok(None));
    }

    /// A reply the gatekeeper could send: a valid code; an enhanced code of the code's class
    /// where one exists; text lines that are textstrings, short enough for 512-octet lines.
    fn reply() -> impl Strategy<Value = Reply> {
        let code = (2u16..=5, 0u16..=5, 0u16..=9).prop_map(|(a, b, c)| a * 100 + b * 10 + c);
        let text = "[ -~\t]{0,80}";
        // Without an enhanced code, a text that begins with one would be read as one: such
        // replies are not rendered by anyone, so plain lines begin with a letter.
        let plain = "([A-Za-z][ -~\t]{0,80})?";
        (code, any::<bool>(), 0u16..=999, 0u16..=999, prop::collection::vec((text, plain), 1..5)).prop_map(
            |(code, with, subject, detail, lines)| {
                let class = (code / 100) as u8;
                let enhanced = (with && class != 3).then_some(Enhanced(class, subject, detail));
                let lines = lines.into_iter().map(|(t, p)| Cow::Owned(if enhanced.is_some() { t } else { p }));
                Reply { code, enhanced, lines: lines.collect() }
            },
        )
    }

    proptest! {
        /// The wire form written by hand is what `format!` writes, for any code, enhanced code
        /// and lines.
        #[test]
        fn rendering_by_hand_is_the_formatted_wire(
            code in any::<u16>(),
            enhanced in proptest::option::of((any::<u8>(), any::<u16>(), any::<u16>())),
            lines in prop::collection::vec("[ -~]{0,20}", 1..4),
        ) {
            let enhanced = enhanced.map(|(a, b, c)| Enhanced(a, b, c));
            let r = Reply { code, enhanced, lines: lines.iter().map(|l| l.clone().into()).collect() };
            let reference: String = lines
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    let sep = if i + 1 == lines.len() { ' ' } else { '-' };
                    match enhanced {
                        Some(e) => format!("{code}{sep}{e} {l}\r\n"),
                        None => format!("{code}{sep}{l}\r\n"),
                    }
                })
                .collect();
            prop_assert_eq!(r.to_wire(), reference);
        }

        /// Rendering then parsing gives the reply back, whole or from a stream cut anywhere.
        #[test]
        fn parse_inverts_rendering(r in reply(), cut in any::<prop::sample::Index>()) {
            let mut wire = Vec::new();
            r.write_to(&mut wire);
            prop_assert_eq!(Reply::parse(&wire), Ok(r.clone()));
            let cut = cut.index(wire.len());
            prop_assert_eq!(Reply::parse_prefix(&wire[..cut]), Ok(None));
            wire.extend_from_slice(b"221 next\r\n");
            prop_assert_eq!(Reply::parse_prefix(&wire), Ok(Some((r, wire.len() - 10))));
        }

        /// Any octets: no panic, and whatever parses renders to a wire that parses the same.
        #[test]
        fn parse_is_total_and_stable(wire in prop::collection::vec(
            prop_oneof![8 => b' '..=b'~', 2 => Just(b'\r'), 2 => Just(b'\n'), 1 => any::<u8>()], 0..200)
        ) {
            if let Ok(Some((r, used))) = Reply::parse_prefix(&wire) {
                prop_assert!(used <= wire.len());
                prop_assert_eq!(Reply::parse(r.to_wire().as_bytes()), Ok(r));
            }
        }
    }
}
