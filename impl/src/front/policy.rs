//! The Postfix SMTPD access policy delegation protocol (Postfix's SMTPD_POLICY_README), sans-IO:
//! a request is `name=value` lines ending with an empty line; the answer is `action=...` and an
//! empty line. [`PolicyReceiver`] turns octets into [`Request`]s (or [`PolicyError`]s: a
//! malformed request gets an answer, never a crash), [`Answer`] is the one encoder of answers.
//!
//! Everything is bounded: a line at [`POLICY_LINE_MAX`] octets, a request at
//! [`POLICY_REQUEST_MAX`] octets and [`POLICY_ATTRS_MAX`] attributes; beyond, the rest of the
//! request is read and dropped and the request is answered as malformed. Unknown attributes are
//! kept (and ignored by the driver); a repeated attribute keeps its last value. Several
//! requests may arrive in one read (Postfix reuses its connection; a client may pipeline).
//! No IO, no clock.

use std::collections::BTreeMap;
use std::fmt;

use crate::proto::Reply;

/// Longest attribute line, newline excluded. Postfix's longest values are addresses (at most
/// 254 + 64 octets in practice) and certificate names; 4 KiB leaves room for all of them.
pub const POLICY_LINE_MAX: usize = 4096;
/// Largest request, all lines together (Postfix sends about 30 attributes, under 2 KiB).
pub const POLICY_REQUEST_MAX: usize = 64 * 1024;
/// Most attributes in one request.
pub const POLICY_ATTRS_MAX: usize = 256;

/// Why a request is malformed. The request is read to its end (the empty line) and answered
/// [`Answer::malformed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A line is not `name=value`.
    #[error("a line is not name=value")]
    NotAttribute,
    /// An attribute name is empty or not lower-case letters, digits, `_` and `-`.
    #[error("bad attribute name")]
    BadName,
    /// A value is not UTF-8 text (a control character, or invalid UTF-8).
    #[error("an attribute value is not text")]
    NotText,
    /// A line is longer than [`POLICY_LINE_MAX`].
    #[error("a line is longer than {POLICY_LINE_MAX} octets")]
    LineTooLong,
    /// The request is over [`POLICY_REQUEST_MAX`] octets or [`POLICY_ATTRS_MAX`] attributes.
    #[error("the request is too large")]
    TooLarge,
    /// An empty line with no attribute before it.
    #[error("empty request")]
    Empty,
}

/// One policy request: its attributes by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    attrs: BTreeMap<String, String>,
}

impl Request {
    /// A request from `(name, value)` pairs (tests, the benchmark's client).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Request { attrs: pairs.into_iter().map(|(n, v)| (n.to_string(), v.to_string())).collect() }
    }

    /// The value of `name`, if given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str)
    }

    /// Every attribute, sorted by name.
    pub fn attrs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.attrs.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The wire form, as Postfix writes it (sorted by name; the protocol has no order).
    /// Names and values must be valid ([`PolicyReceiver`] accepts what this writes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (n, v) in &self.attrs {
            out.extend_from_slice(n.as_bytes());
            out.push(b'=');
            out.extend_from_slice(v.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
        out
    }
}

/// What the receiver found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyEvent {
    /// A whole, well-formed request.
    Request(Request),
    /// A whole request that is malformed: answer it ([`Answer::malformed`]) and go on.
    Malformed(PolicyError),
}

/// Splits the octets of one policy connection into requests. Holds at most one line
/// ([`POLICY_LINE_MAX`]) and one request ([`POLICY_REQUEST_MAX`]).
#[derive(Debug, Default)]
pub struct PolicyReceiver {
    line: Vec<u8>,
    /// The current line went over the limit: drop the rest of it.
    skipping: bool,
    attrs: BTreeMap<String, String>,
    size: usize,
    error: Option<PolicyError>,
}

impl PolicyReceiver {
    /// A receiver at the start of a connection.
    pub fn new() -> Self {
        PolicyReceiver::default()
    }

    /// The next request in `input`, consuming what it reads; `None` when `input` is used up
    /// without completing one (the partial request is kept for the next call).
    pub fn next(&mut self, input: &mut &[u8]) -> Option<PolicyEvent> {
        while !input.is_empty() {
            let (chunk, end) = match input.iter().position(|&b| b == b'\n') {
                Some(i) => (&input[..i], Some(i + 1)),
                None => (&input[..], None),
            };
            self.size = self.size.saturating_add(chunk.len() + usize::from(end.is_some()));
            if !self.skipping {
                if self.line.len() + chunk.len() > POLICY_LINE_MAX {
                    self.fail(PolicyError::LineTooLong);
                    self.skipping = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            let Some(end) = end else {
                *input = &[];
                return None;
            };
            *input = &input[end..];
            let skipped = std::mem::replace(&mut self.skipping, false);
            let mut line = std::mem::take(&mut self.line);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.is_empty() && !skipped {
                return Some(self.finish());
            }
            if !skipped {
                self.attribute(&line);
            }
            line.clear();
            self.line = line;
        }
        None
    }

    fn fail(&mut self, e: PolicyError) {
        self.error.get_or_insert(e);
    }

    fn attribute(&mut self, line: &[u8]) {
        if self.size > POLICY_REQUEST_MAX || self.attrs.len() >= POLICY_ATTRS_MAX {
            self.attrs.clear();
            return self.fail(PolicyError::TooLarge);
        }
        if self.error.is_some() {
            return;
        }
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            return self.fail(PolicyError::NotAttribute);
        };
        let (name, value) = (&line[..eq], &line[eq + 1..]);
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(b)) {
            return self.fail(PolicyError::BadName);
        }
        let Ok(value) = std::str::from_utf8(value) else {
            return self.fail(PolicyError::NotText);
        };
        if value.chars().any(char::is_control) {
            return self.fail(PolicyError::NotText);
        }
        let name = String::from_utf8(name.to_vec()).expect("checked ASCII");
        self.attrs.insert(name, value.to_string());
    }

    fn finish(&mut self) -> PolicyEvent {
        let attrs = std::mem::take(&mut self.attrs);
        let error = self.error.take();
        self.size = 0;
        match error {
            Some(e) => PolicyEvent::Malformed(e),
            None if attrs.is_empty() => PolicyEvent::Malformed(PolicyError::Empty),
            None => PolicyEvent::Request(Request { attrs }),
        }
    }
}

/// An answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// No objection: Postfix goes on with its other restrictions.
    Dunno,
    /// Tempfail, unless a later restriction rejects: for what the gatekeeper cannot judge in
    /// time (a slow callback) or at all (a malformed request).
    DeferIfPermit(String),
    /// A reply the rules gave, sent as is (`action=550 5.7.1 ...`): Postfix answers the client
    /// with this code and text; 421 makes it disconnect.
    Reply(Reply),
}

impl Answer {
    /// The answer to a malformed request.
    pub fn malformed(e: PolicyError) -> Self {
        Answer::DeferIfPermit(format!("4.3.5 Policy service: malformed request ({e})"))
    }

    /// The `action=` value.
    pub fn action(&self) -> String {
        match self {
            Answer::Dunno => "DUNNO".into(),
            Answer::DeferIfPermit(text) => format!("DEFER_IF_PERMIT {}", clean(text)),
            Answer::Reply(r) => {
                let text = r.lines.iter().map(|l| clean(l)).collect::<Vec<_>>().join(" ");
                match r.enhanced {
                    Some(e) => format!("{} {e} {text}", r.code),
                    None => format!("{} {text}", r.code),
                }
            }
        }
    }

    /// The wire form: `action=...`, then the empty line.
    pub fn encode(&self) -> Vec<u8> {
        format!("action={}\n\n", self.action()).into_bytes()
    }
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.action())
    }
}

/// Text safe in one attribute line: control characters become spaces.
fn clean(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(mut input: &[u8]) -> Vec<PolicyEvent> {
        let mut rx = PolicyReceiver::new();
        let mut out = Vec::new();
        while let Some(ev) = rx.next(&mut input) {
            out.push(ev);
        }
        out
    }

    #[test]
    fn a_request_and_a_pipelined_second_one() {
        let evs = all(b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=a@b.test\nx-unknown=1\n\nrequest=smtpd_access_policy\nsender=\n\n");
        assert_eq!(evs.len(), 2);
        let PolicyEvent::Request(r) = &evs[0] else { panic!("{evs:?}") };
        assert_eq!(r.get("protocol_state"), Some("RCPT"));
        assert_eq!(r.get("x-unknown"), Some("1"));
        let PolicyEvent::Request(r) = &evs[1] else { panic!("{evs:?}") };
        assert_eq!(r.get("sender"), Some(""));
    }

    #[test]
    fn requests_split_anywhere_are_the_same() {
        let wire = b"request=smtpd_access_policy\r\nclient_address=192.0.2.1\ninstance=1a.2\n\n";
        let whole = all(wire);
        for cut in 0..wire.len() {
            let mut rx = PolicyReceiver::new();
            let (mut a, mut b) = (&wire[..cut], &wire[cut..]);
            let mut evs = Vec::new();
            while let Some(ev) = rx.next(&mut a) {
                evs.push(ev);
            }
            while let Some(ev) = rx.next(&mut b) {
                evs.push(ev);
            }
            assert_eq!(evs, whole, "cut at {cut}");
        }
    }

    #[test]
    fn malformed_requests_are_answered_and_the_next_one_is_read() {
        let evs = all(b"no equals sign\nrequest=x\n\nrequest=smtpd_access_policy\n\n");
        assert_eq!(evs[0], PolicyEvent::Malformed(PolicyError::NotAttribute));
        assert!(matches!(evs[1], PolicyEvent::Request(_)));
        assert_eq!(all(b"\n"), vec![PolicyEvent::Malformed(PolicyError::Empty)]);
        assert_eq!(all(b"Name=x\n\n"), vec![PolicyEvent::Malformed(PolicyError::BadName)]);
        assert_eq!(all(b"a=\x01\n\n"), vec![PolicyEvent::Malformed(PolicyError::NotText)]);
        assert_eq!(all(b"a=\xff\n\n"), vec![PolicyEvent::Malformed(PolicyError::NotText)]);
    }

    #[test]
    fn bounds_hold_and_the_connection_goes_on() {
        let mut wire = b"a=".to_vec();
        wire.extend(std::iter::repeat_n(b'x', POLICY_LINE_MAX * 3));
        wire.extend_from_slice(b"\n\nrequest=smtpd_access_policy\n\n");
        let evs = all(&wire);
        assert_eq!(evs[0], PolicyEvent::Malformed(PolicyError::LineTooLong));
        assert!(matches!(evs[1], PolicyEvent::Request(_)));
        let mut many = Vec::new();
        for i in 0..POLICY_ATTRS_MAX + 5 {
            many.extend_from_slice(format!("a{i}=v\n").as_bytes());
        }
        many.push(b'\n');
        assert_eq!(all(&many), vec![PolicyEvent::Malformed(PolicyError::TooLarge)]);
    }

    #[test]
    fn answers_are_one_action_line_and_an_empty_line() {
        assert_eq!(Answer::Dunno.encode(), b"action=DUNNO\n\n");
        let r = Reply::forged_local_sender();
        assert_eq!(Answer::Reply(r).encode(), b"action=550 5.7.1 Sender is not a user of this domain\n\n");
        let a = Answer::DeferIfPermit("4.4.3 slow\ncallback".into());
        assert_eq!(a.encode(), b"action=DEFER_IF_PERMIT 4.4.3 slow callback\n\n");
    }
}
