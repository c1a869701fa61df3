//! Paths and mailboxes (RFC 5321 §4.1.2, §4.1.3): `<>`, `<local@domain>`, quoted local parts,
//! address literals, and source routes, which are parsed and discarded (§4.1.1.3, appendix C).

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::{DOMAIN_MAX, LOCAL_PART_MAX, PATH_MAX};

/// Why a path was refused. Each variant maps to one reply (see `session`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// No `<`…`>` around the path.
    #[error("path must be enclosed in angle brackets")]
    NoBrackets,
    /// A mailbox without `@domain` such as `<foo>` (E1: refused, never banned).
    #[error("mailbox has no domain")]
    NoDomain,
    /// The local part is not a dot-string or quoted string.
    #[error("bad local part")]
    BadLocalPart,
    /// The domain or address literal is not valid.
    #[error("bad domain")]
    BadDomain,
    /// The source route before `:` is not a list of `@domain`.
    #[error("bad source route")]
    BadRoute,
    /// Local part, domain or path longer than RFC 5321 §4.5.3.1 allows.
    #[error("path too long")]
    TooLong,
}

/// A domain name, lower-cased (domains are case-insensitive, RFC 5321 §2.4).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(String);

impl Domain {
    /// Parses `sub-domain *("." sub-domain)`; a trailing dot is not allowed.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.is_empty() || s.len() > DOMAIN_MAX {
            return Err(if s.is_empty() { PathError::BadDomain } else { PathError::TooLong });
        }
        for label in s.split('.') {
            let b = label.as_bytes();
            let ok = !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-');
            if !ok {
                return Err(PathError::BadDomain);
            }
        }
        Ok(Domain(s.to_ascii_lowercase()))
    }

    /// The lower-cased name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The part after `@`: a domain or an address literal (RFC 5321 §4.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// A domain name.
    Domain(Domain),
    /// `[192.0.2.1]`.
    Ipv4(Ipv4Addr),
    /// `[IPv6:2001:db8::1]`.
    Ipv6(Ipv6Addr),
    /// `[tag:content]`, kept verbatim.
    General(String),
}

impl Host {
    /// Parses a domain or an address literal.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        let Some(inner) = s.strip_prefix('[') else {
            return Domain::parse(s).map(Host::Domain);
        };
        let inner = inner.strip_suffix(']').ok_or(PathError::BadDomain)?;
        if let Ok(v4) = inner.parse::<Ipv4Addr>() {
            return Ok(Host::Ipv4(v4));
        }
        if let Some(v6) = inner.get(..5).filter(|p| p.eq_ignore_ascii_case("ipv6:")) {
            let _ = v6;
            return inner[5..].parse::<Ipv6Addr>().map(Host::Ipv6).map_err(|_| PathError::BadDomain);
        }
        // General-address-literal = Standardized-tag ":" 1*dcontent (§4.1.3).
        let (tag, content) = inner.split_once(':').ok_or(PathError::BadDomain)?;
        let tag_ok = Domain::parse(tag).is_ok();
        let content_ok =
            !content.is_empty() && content.bytes().all(|c| (33..=90).contains(&c) || (94..=126).contains(&c));
        if tag_ok && content_ok { Ok(Host::General(inner.to_string())) } else { Err(PathError::BadDomain) }
    }

    /// The domain, if this host is one.
    pub fn domain(&self) -> Option<&Domain> {
        match self {
            Host::Domain(d) => Some(d),
            _ => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Domain(d) => write!(f, "{d}"),
            Host::Ipv4(a) => write!(f, "[{a}]"),
            Host::Ipv6(a) => write!(f, "[IPv6:{a}]"),
            Host::General(g) => write!(f, "[{g}]"),
        }
    }
}

/// A local part, kept as its semantic value (quotes and backslashes removed).
///
/// Comparison against users is case-insensitive in `policy`, as most MTAs do; the value keeps
/// the client's case for logs and relaying.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LocalPart(String);

fn is_atext(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c)
}

impl LocalPart {
    /// Parses `Dot-string / Quoted-string` (RFC 5321 §4.1.2).
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.len() > LOCAL_PART_MAX {
            return Err(PathError::TooLong);
        }
        if let Some(q) = s.strip_prefix('"') {
            let q = q.strip_suffix('"').ok_or(PathError::BadLocalPart)?;
            let mut value = String::with_capacity(q.len());
            let mut bytes = q.bytes();
            while let Some(c) = bytes.next() {
                match c {
                    b'\\' => match bytes.next() {
                        Some(n @ 32..=126) => value.push(n as char),
                        _ => return Err(PathError::BadLocalPart),
                    },
                    32 | 33 | 35..=91 | 93..=126 => value.push(c as char),
                    _ => return Err(PathError::BadLocalPart),
                }
            }
            return Ok(LocalPart(value));
        }
        let ok = !s.is_empty() && s.split('.').all(|atom| !atom.is_empty() && atom.bytes().all(is_atext));
        if ok { Ok(LocalPart(s.to_string())) } else { Err(PathError::BadLocalPart) }
    }

    /// The semantic value.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn needs_quotes(&self) -> bool {
        self.0.is_empty() || self.0.split('.').any(|a| a.is_empty() || !a.bytes().all(is_atext))
    }
}

impl fmt::Display for LocalPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.needs_quotes() {
            return f.write_str(&self.0);
        }
        f.write_str("\"")?;
        for c in self.0.chars() {
            if c == '"' || c == '\\' {
                f.write_str("\\")?;
            }
            write!(f, "{c}")?;
        }
        f.write_str("\"")
    }
}

/// `local-part@host`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Mailbox {
    /// Before the `@`.
    pub local: LocalPart,
    /// After the `@`.
    pub host: Host,
}

impl Mailbox {
    /// Parses a mailbox without angle brackets. The `@` that separates is the last one outside
    /// a quoted string.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        let at = split_at_sign(s).ok_or(PathError::NoDomain)?;
        let (local, host) = (&s[..at], &s[at + 1..]);
        Ok(Mailbox { local: LocalPart::parse(local)?, host: Host::parse(host)? })
    }

    /// The domain, if the host is not an address literal.
    pub fn domain(&self) -> Option<&Domain> {
        self.host.domain()
    }
}

/// Finds the `@` between local part and domain: the first one after a (possibly quoted) local
/// part.
fn split_at_sign(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    if b.first() == Some(&b'"') {
        let mut i = 1;
        while i < b.len() {
            match b[i] {
                b'\\' => i += 2,
                b'"' => return (b.get(i + 1) == Some(&b'@')).then_some(i + 1),
                _ => i += 1,
            }
        }
        return None;
    }
    s.find('@')
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.host)
    }
}

/// The argument of MAIL FROM: the null path `<>` or a mailbox (RFC 5321 §4.1.1.2).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReversePath {
    /// `<>`: bounces and callback probes (RFC 5321 §4.5.5). Never refused as such.
    Null,
    /// A sender mailbox.
    Mailbox(Mailbox),
}

impl ReversePath {
    /// Parses `<>` or `<[route:]mailbox>`.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s == "<>" {
            return Ok(ReversePath::Null);
        }
        parse_path(s).map(ReversePath::Mailbox)
    }

    /// The mailbox, unless null.
    pub fn mailbox(&self) -> Option<&Mailbox> {
        match self {
            ReversePath::Null => None,
            ReversePath::Mailbox(m) => Some(m),
        }
    }

    /// `true` for `<>`.
    pub fn is_null(&self) -> bool {
        matches!(self, ReversePath::Null)
    }
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => f.write_str("<>"),
            ReversePath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// The argument of RCPT TO: `<Postmaster>` without a domain, or a mailbox (RFC 5321 §4.1.1.3).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ForwardPath {
    /// `<Postmaster>` (any case), which every server must accept (RFC 5321 §4.5.1).
    Postmaster,
    /// A recipient mailbox.
    Mailbox(Mailbox),
}

impl ForwardPath {
    /// Parses `<Postmaster>` or `<[route:]mailbox>`.
    pub fn parse(s: &str) -> Result<Self, PathError> {
        if s.eq_ignore_ascii_case("<postmaster>") {
            return Ok(ForwardPath::Postmaster);
        }
        parse_path(s).map(ForwardPath::Mailbox)
    }
}

impl fmt::Display for ForwardPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ForwardPath::Postmaster => f.write_str("<Postmaster>"),
            ForwardPath::Mailbox(m) => write!(f, "<{m}>"),
        }
    }
}

/// `"<" [ A-d-l ":" ] Mailbox ">"`; the source route is checked and dropped.
fn parse_path(s: &str) -> Result<Mailbox, PathError> {
    if s.len() > PATH_MAX {
        return Err(PathError::TooLong);
    }
    let inner = s.strip_prefix('<').and_then(|s| s.strip_suffix('>')).ok_or(PathError::NoBrackets)?;
    let mailbox = match inner.strip_prefix('@') {
        Some(_) => {
            let (route, mailbox) = inner.split_once(':').ok_or(PathError::BadRoute)?;
            for hop in route.split(',') {
                let d = hop.strip_prefix('@').ok_or(PathError::BadRoute)?;
                Domain::parse(d).map_err(|_| PathError::BadRoute)?;
            }
            mailbox
        }
        None => inner,
    };
    Mailbox::parse(mailbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_table() {
        let cases: &[(&str, Result<&str, PathError>)] = &[
            ("<>", Ok("<>")),
            ("<alice@Example.TEST>", Ok("<alice@example.test>")),
            ("<Alice.B@example.test>", Ok("<Alice.B@example.test>")),
            ("<\"john doe\"@example.test>", Ok("<\"john doe\"@example.test>")),
            ("<\"a\\\"b\"@example.test>", Ok("<\"a\\\"b\"@example.test>")),
            ("<\"plain\"@example.test>", Ok("<plain@example.test>")),
            ("<@relay.test,@b.test:bob@example.test>", Ok("<bob@example.test>")),
            ("<user@[192.0.2.1]>", Ok("<user@[192.0.2.1]>")),
            ("<user@[IPv6:2001:db8::1]>", Ok("<user@[IPv6:2001:db8::1]>")),
            ("<foo>", Err(PathError::NoDomain)),
            ("foo@example.test", Err(PathError::NoBrackets)),
            ("<foo@>", Err(PathError::BadDomain)),
            ("<foo@-bad.test>", Err(PathError::BadDomain)),
            ("<foo@bad.test.>", Err(PathError::BadDomain)),
            ("<.foo@example.test>", Err(PathError::BadLocalPart)),
            ("<fo..o@example.test>", Err(PathError::BadLocalPart)),
            ("<a b@example.test>", Err(PathError::BadLocalPart)),
            ("<relay.test:bob@example.test>", Err(PathError::BadLocalPart)),
            ("<@relay.test bob@example.test>", Err(PathError::BadRoute)),
            ("<user@[300.1.1.1]>", Err(PathError::BadDomain)),
        ];
        for (input, want) in cases {
            let got = ReversePath::parse(input).map(|p| p.to_string());
            assert_eq!(got.as_deref().map_err(|e| *e), want.as_ref().map(|s| *s).map_err(|e| *e), "{input}");
        }
    }

    #[test]
    fn limits() {
        let long_local = format!("<{}@example.test>", "a".repeat(65));
        assert_eq!(ReversePath::parse(&long_local), Err(PathError::TooLong));
        let ok_local = format!("<{}@example.test>", "a".repeat(64));
        assert!(ReversePath::parse(&ok_local).is_ok());
        let long_path = format!("<a@{}.test>", "b.".repeat(130));
        assert_eq!(ReversePath::parse(&long_path), Err(PathError::TooLong));
    }

    #[test]
    fn postmaster_without_domain() {
        assert_eq!(ForwardPath::parse("<POSTMASTER>"), Ok(ForwardPath::Postmaster));
        assert!(matches!(ForwardPath::parse("<postmaster@example.test>"), Ok(ForwardPath::Mailbox(_))));
        assert_eq!(ForwardPath::parse("<bob>"), Err(PathError::NoDomain));
    }
}
