//! Client and remote text made safe to show: the one escaping helper for logs, stored evidence
//! and CLI output ([`escape`]), and Postfix's `printable()` for text quoted on the wire or in a
//! header ([`printable`]).
//!
//! Text an SMTP client or a remote server chose (EHLO arguments, commands, reply text, scanner
//! signatures) may hold CR, LF, ESC or other control characters: copied raw into a text log it
//! forges log lines, on a terminal it moves the cursor or recolours the screen. Nothing here
//! decides whether text is acceptable; it only changes how it is shown.

use std::borrow::Cow;
use std::fmt::Write;

/// `s` with every control character escaped: TAB, CR and LF as `\t`, `\r`, `\n`, other ASCII
/// controls and DEL as `\xNN`, C1 controls and the Unicode bidirectional and zero-width
/// format characters (which reorder or hide text on a terminal) as `\u{NNNN}`. Other text,
/// including non-ASCII letters and backslashes, is unchanged, so escaping is idempotent and
/// ordinary text costs no allocation. For display only: it is not meant to be unescaped.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// `s` lossily decoded (invalid UTF-8 as U+FFFD) and then [`escape`]d: for raw bytes.
pub fn escape_bytes(b: &[u8]) -> String {
    escape(&String::from_utf8_lossy(b)).into_owned()
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{200b}'..='\u{200f}'     // zero-width space, joiners, LRM, RLM
            | '\u{202a}'..='\u{202e}'   // bidi embeddings and overrides
            | '\u{2066}'..='\u{2069}'   // bidi isolates
            | '\u{feff}'                // zero-width no-break space (BOM)
        )
}

/// `s` with every character that is not printable ASCII (`' '..='~'`) replaced by `?`, cut to
/// `max` characters; as Postfix's `printable()` does to the HELO name and other client text
/// it quotes. The result is safe inside a reply line or a header field.
pub fn printable(s: &str, max: usize) -> Cow<'_, str> {
    let is_printable = |c: char| (' '..='~').contains(&c);
    if s.len() <= max && s.chars().all(is_printable) {
        return Cow::Borrowed(s);
    }
    s.chars().take(max).map(|c| if is_printable(c) { c } else { '?' }).collect::<String>().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_controls_only() {
        assert!(matches!(escape("550 5.1.1 <a@b.test>: unknown user"), Cow::Borrowed(_)));
        assert!(matches!(escape("Grüße \\ back"), Cow::Borrowed(_)));
        assert_eq!(escape("a\r\nb\tc\0d\x1b[31me\x7f"), "a\\r\\nb\\tc\\x00d\\x1b[31me\\x7f");
        assert_eq!(escape("x\u{9b}y\u{202e}z\u{200b}"), "x\\u{009b}y\\u{202e}z\\u{200b}");
        assert_eq!(escape_bytes(b"bad\xffhost\r"), "bad\u{fffd}host\\r");
    }

    #[test]
    fn escaping_is_idempotent_and_leaves_no_control() {
        let nasty = "\0\x01\t\n\r\x1b\x7f\u{80}\u{9f}\u{202e}\u{2066}\u{feff}\\x41 ok ü";
        let once = escape(nasty).into_owned();
        assert!(!once.chars().any(needs_escape), "{once:?}");
        assert_eq!(escape(&once), once.as_str());
    }

    #[test]
    fn printable_replaces_and_cuts() {
        assert!(matches!(printable("client.test", 64), Cow::Borrowed(_)));
        assert_eq!(printable("bad\rhost\t\u{e4}\x1b", 64), "bad?host???");
        assert_eq!(printable("abcdef", 3), "abc");
    }
}
