//! The header every syslog-shaped mail log line starts with: a timestamp (classic or RFC 3339),
//! the host, the program and its pid, then the message:
//!
//! ```text
//! Dec  6 10:00:01 mx postfix/smtpd[1234]: connect from a.example[192.0.2.1]
//! 2026-12-06T10:00:01.123456+01:00 mx postfix/smtpd[1234]: connect from a.example[192.0.2.1]
//! ```
//!
//! Split by hand (no regex): a log line is read once and most of it is skipped.

use std::net::IpAddr;

use super::time::{YearClock, rfc3339};

/// A split syslog line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// ms since the epoch, UTC.
    pub at_ms: i64,
    /// The host that logged it.
    pub host: &'a str,
    /// The program (`postfix/smtpd`, `sm-mta`), without the pid.
    pub program: &'a str,
    /// The pid, 0 without one.
    pub pid: u32,
    /// The message after `: `.
    pub msg: &'a str,
}

impl Header<'_> {
    /// The last part of the program name: `smtpd` of `postfix-in/smtpd`.
    pub fn daemon(&self) -> &str {
        self.program.rsplit('/').next().unwrap_or(self.program)
    }
}

/// Splits a line; `None` if it has no syslog header.
pub fn split<'a>(line: &'a str, clock: &mut YearClock) -> Option<Header<'a>> {
    let b = line.as_bytes();
    let (at_ms, used) =
        if b.first().is_some_and(u8::is_ascii_digit) { rfc3339(b, clock.offset_secs)? } else { (clock.syslog(b)?, 15) };
    let rest = line.get(used..)?.strip_prefix(' ')?.trim_start_matches(' ');
    let (host, rest) = rest.split_once(' ')?;
    let (tag, msg) = rest.split_once(": ")?;
    let (program, pid) = match tag.split_once('[') {
        Some((p, pid)) => (p, pid.strip_suffix(']')?.parse().ok()?),
        None => (tag, 0),
    };
    if program.is_empty() || program.contains(' ') {
        return None;
    }
    Some(Header { at_ms, host, program, pid, msg })
}

/// The address of `name[addr]` or `[addr]:port` (Postfix) or `name [addr]` (sendmail), the first
/// bracketed address in `s`, with what follows the `]`.
pub fn bracketed(s: &str) -> Option<(IpAddr, &str)> {
    let open = s.find('[')?;
    let close = open + s[open..].find(']')?;
    let inner = &s[open + 1..close];
    let inner = inner.strip_prefix("IPv6:").or_else(|| inner.strip_prefix("ipv6:")).unwrap_or(inner);
    Some((inner.parse().ok()?, &s[close + 1..]))
}

/// The value of `name=<...>` in `s` (without the brackets): up to the `>` that ends the field
/// (followed by `,`, ` ` or the end), so that a `>` inside a quoted local part does not cut it.
pub fn angle_field<'a>(s: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    loop {
        let at = from + s[from..].find(name)?;
        let boundary = at == 0 || matches!(s.as_bytes()[at - 1], b' ' | b',' | b';');
        let rest = &s[at + name.len()..];
        if boundary && let Some(v) = rest.strip_prefix("=<") {
            let bytes = v.as_bytes();
            let end = (0..bytes.len())
                .find(|&i| bytes[i] == b'>' && matches!(bytes.get(i + 1), None | Some(b' ' | b',' | b';')))?;
            return Some(&v[..end]);
        }
        from = at + name.len();
    }
}

/// The value of `name=value` (up to `,`, `;` or a space) in `s`.
pub fn plain_field<'a>(s: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    loop {
        let at = from + s[from..].find(name)?;
        let boundary = at == 0 || matches!(s.as_bytes()[at - 1], b' ' | b',' | b';');
        let rest = &s[at + name.len()..];
        if boundary && let Some(v) = rest.strip_prefix('=') {
            let end = v.find([',', ';', ' ']).unwrap_or(v.len());
            return Some(&v[..end]);
        }
        from = at + name.len();
    }
}

/// The first reply code in `s` (`550`, or the class of `5.1.1` as 550/450 when only an enhanced
/// code is given, as in `milter-reject: ...: 5.7.1 ...`).
pub fn reply_code(s: &str) -> Option<u16> {
    let s = s.trim_start();
    let word = s.split([' ', '-']).next()?;
    if word.len() == 3 && word.bytes().all(|c| c.is_ascii_digit()) {
        let code: u16 = word.parse().ok()?;
        return (200..600).contains(&code).then_some(code);
    }
    match word.as_bytes() {
        [c @ (b'4' | b'5'), b'.', ..] => Some(u16::from(c - b'0') * 100 + 50),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_both_stamp_kinds() {
        let mut c = YearClock::new(2026, 0);
        let h = split("Dec  6 10:00:01 mx postfix/smtpd[1234]: connect from a[192.0.2.1]", &mut c).unwrap();
        assert_eq!(
            (h.host, h.program, h.daemon(), h.pid, h.msg),
            ("mx", "postfix/smtpd", "smtpd", 1234, "connect from a[192.0.2.1]")
        );
        let h = split("2026-12-06T10:00:01.5+01:00 mx sm-mta[77]: x: from=<a@b>", &mut c).unwrap();
        assert_eq!((h.at_ms % 1000, h.program, h.pid, h.msg), (500, "sm-mta", 77, "x: from=<a@b>"));
        let h = split("Dec  6 10:00:01 mx kernel: hello", &mut c).unwrap();
        assert_eq!((h.program, h.pid), ("kernel", 0));
        for bad in ["", "Dec  6 10:00:01", "Dec  6 10:00:01 mx", "garbage line", "Dec  6 10:00:01 mx prog[x]: m"] {
            assert_eq!(split(bad, &mut c), None, "{bad}");
        }
    }

    #[test]
    fn fields() {
        let s = "550 5.1.1 <x@y>: Recipient address rejected: User unknown; from=<a@b> to=<x@y> proto=ESMTP helo=<h.example>";
        assert_eq!(angle_field(s, "from"), Some("a@b"));
        assert_eq!(angle_field(s, "to"), Some("x@y"));
        assert_eq!(angle_field(s, "helo"), Some("h.example"));
        assert_eq!(angle_field("from=<>, size=1", "from"), Some(""));
        assert_eq!(angle_field("orig_to=<o@x>, to=<t@x>", "to"), Some("t@x"));
        assert_eq!(angle_field("from=<a\"b>c\"@x> to=<y>", "from"), Some("a\"b>c\"@x"));
        assert_eq!(plain_field("size=123, nrcpt=2 (queue active)", "nrcpt"), Some("2"));
        assert_eq!(plain_field("status=sent (delivered)", "status"), Some("sent"));
        assert_eq!(bracketed("unknown[192.0.2.7]: 550"), Some(("192.0.2.7".parse().unwrap(), ": 550")));
        assert_eq!(bracketed("h [IPv6:2001:db8::1]").map(|x| x.0), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(bracketed("[2001:db8::1]:4242").map(|x| x.0), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(reply_code(" 550 5.1.1 no"), Some(550));
        assert_eq!(reply_code("5.7.1 Blocked"), Some(550));
        assert_eq!(reply_code("451-4.7.1 x"), Some(451));
        assert_eq!(reply_code("Blocked"), None);
    }
}
