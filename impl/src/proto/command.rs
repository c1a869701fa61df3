//! SMTP commands (RFC 5321 §4.1.1) with the ESMTP parameters we advertise: SIZE (RFC 1870) and
//! BODY (RFC 6152). Parsing is a pure function of one command line without its CRLF.

use std::fmt;

use super::path::{ForwardPath, PathError, ReversePath};

/// The BODY parameter of MAIL (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `BODY=7BIT`.
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
}

/// ESMTP parameters of MAIL FROM that we understand.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=n`: the client's estimate of the message size (RFC 1870 §6).
    pub size: Option<u64>,
    /// `BODY=`.
    pub body: Option<Body>,
}

/// ESMTP parameters of RCPT TO. None are advertised, so any given is an error; the struct keeps
/// the shape open for DSN (RFC 3461).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptParams {}

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `EHLO domain-or-literal`.
    Ehlo(String),
    /// `HELO domain`.
    Helo(String),
    /// `MAIL FROM:<path> [params]`.
    Mail(ReversePath, MailParams),
    /// `RCPT TO:<path> [params]`.
    Rcpt(ForwardPath, RcptParams),
    /// `DATA`.
    Data,
    /// `RSET`.
    Rset,
    /// `NOOP [string]`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY string`.
    Vrfy(String),
    /// `HELP [string]`.
    Help,
    /// `STARTTLS` (RFC 3207), without arguments.
    StartTls,
    /// A command we know but do not implement: EXPN, TURN, AUTH, BDAT, ETRN … (502).
    NotImplemented(String),
}

/// Why a command line was refused; the session maps each to a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Not a command we know (500 5.5.1).
    #[error("command unrecognized")]
    Unrecognized,
    /// Known verb, wrong arguments (501 5.5.4; 501 5.5.2 for missing ones).
    #[error("syntax error in arguments: {0}")]
    Syntax(&'static str),
    /// MAIL FROM path refused (E1: 553 5.1.7 / 501).
    #[error("bad sender address: {0}")]
    BadReversePath(PathError),
    /// RCPT TO path refused (553 5.1.3).
    #[error("bad recipient address: {0}")]
    BadForwardPath(PathError),
    /// An ESMTP parameter we did not advertise or with a bad value (555 5.5.4, RFC 5321 §4.1.1.11).
    #[error("unrecognized or malformed parameter {0}")]
    BadParameter(String),
    /// The line is not ASCII/UTF-8 text (500 5.5.2).
    #[error("command line is not text")]
    NotText,
}

impl Command {
    /// Parses one command line (without CRLF).
    pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
        let line = std::str::from_utf8(line).map_err(|_| CommandError::NotText)?;
        let (verb, rest) = match line.find(' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, ""),
        };
        // Upper-cased on the stack: no verb is longer than STARTTLS's 8 letters.
        let mut buf = [0u8; 8];
        let Some(upper) = buf.get_mut(..verb.len()) else {
            return Err(CommandError::Unrecognized);
        };
        upper.copy_from_slice(verb.as_bytes());
        upper.make_ascii_uppercase();
        let upper = std::str::from_utf8(upper).expect("ASCII case changes keep UTF-8");
        let arg = rest.trim_matches(' ');
        let no_args =
            |cmd: Command| if arg.is_empty() { Ok(cmd) } else { Err(CommandError::Syntax("no arguments allowed")) };
        match upper {
            "EHLO" | "HELO" => {
                if arg.is_empty() || arg.contains(' ') {
                    return Err(CommandError::Syntax("expected one domain or address literal"));
                }
                Ok(if upper == "EHLO" { Command::Ehlo(arg.to_string()) } else { Command::Helo(arg.to_string()) })
            }
            "MAIL" => {
                let (path, params) =
                    split_path(rest, "FROM:").ok_or(CommandError::Syntax("expected MAIL FROM:<address>"))?;
                let from = ReversePath::parse(path).map_err(CommandError::BadReversePath)?;
                Ok(Command::Mail(from, parse_mail_params(params)?))
            }
            "RCPT" => {
                let (path, params) =
                    split_path(rest, "TO:").ok_or(CommandError::Syntax("expected RCPT TO:<address>"))?;
                let to = ForwardPath::parse(path).map_err(CommandError::BadForwardPath)?;
                if let Some(p) = params.split(' ').find(|p| !p.is_empty()) {
                    return Err(CommandError::BadParameter(p.to_string()));
                }
                Ok(Command::Rcpt(to, RcptParams::default()))
            }
            "DATA" => no_args(Command::Data),
            "RSET" => no_args(Command::Rset),
            "QUIT" => no_args(Command::Quit),
            "NOOP" => Ok(Command::Noop),
            "HELP" => Ok(Command::Help),
            "VRFY" if arg.is_empty() => Err(CommandError::Syntax("expected VRFY string")),
            "VRFY" => Ok(Command::Vrfy(arg.to_string())),
            // RFC 3207 §4: STARTTLS takes no parameters (501).
            "STARTTLS" if !arg.is_empty() => Err(CommandError::Syntax("STARTTLS takes no parameters")),
            "STARTTLS" => Ok(Command::StartTls),
            "EXPN" | "TURN" | "AUTH" | "BDAT" | "ETRN" | "SEND" | "SOML" | "SAML" | "ATRN" => {
                Ok(Command::NotImplemented(upper.to_string()))
            }
            _ => Err(CommandError::Unrecognized),
        }
    }
}

/// Splits `FROM:<path> params` (keyword case-insensitive). One space after the colon is
/// tolerated because widespread clients send it, though §4.1.2 forbids it.
fn split_path<'a>(rest: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
    let head = rest.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let after = &rest[keyword.len()..];
    let after = after.strip_prefix(' ').unwrap_or(after);
    if !after.starts_with('<') {
        // A bare address without brackets: report it as a path error, not a verb error.
        let end = after.find(' ').unwrap_or(after.len());
        return Some((&after[..end], &after[end..]));
    }
    // The path ends at the first `>` outside a quoted string and outside an address literal,
    // whose content may hold `>` and `"` (RFC 5321 §4.1.3 dcontent).
    let bytes = after.as_bytes();
    let (mut i, mut quoted, mut literal) = (1, false, false);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' if !literal => quoted = !quoted,
            b'[' if !quoted => literal = true,
            b']' if !quoted => literal = false,
            b'>' if !quoted && !literal => return Some((&after[..=i], &after[i + 1..])),
            _ => {}
        }
        i += 1;
    }
    Some((after, ""))
}

fn parse_mail_params(params: &str) -> Result<MailParams, CommandError> {
    let mut out = MailParams::default();
    if !params.is_empty() && !params.starts_with(' ') {
        return Err(CommandError::Syntax("expected a space after the address"));
    }
    for p in params.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = p.split_once('=').unwrap_or((p, ""));
        let bad = || CommandError::BadParameter(p.to_string());
        match key.to_ascii_uppercase().as_str() {
            "SIZE" if out.size.is_none() => {
                if value.is_empty() || value.len() > 20 || !value.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(bad());
                }
                out.size = Some(value.parse().map_err(|_| bad())?);
            }
            "BODY" if out.body.is_none() => {
                out.body = Some(match value.to_ascii_uppercase().as_str() {
                    "7BIT" => Body::SevenBit,
                    "8BITMIME" => Body::EightBitMime,
                    _ => return Err(bad()),
                });
            }
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

impl fmt::Display for Command {
    /// The canonical wire form (without CRLF); `parse(render(c)) == c`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Ehlo(h) => write!(f, "EHLO {h}"),
            Command::Helo(h) => write!(f, "HELO {h}"),
            Command::Mail(from, p) => {
                write!(f, "MAIL FROM:{from}")?;
                if let Some(size) = p.size {
                    write!(f, " SIZE={size}")?;
                }
                match p.body {
                    Some(Body::SevenBit) => write!(f, " BODY=7BIT"),
                    Some(Body::EightBitMime) => write!(f, " BODY=8BITMIME"),
                    None => Ok(()),
                }
            }
            Command::Rcpt(to, _) => write!(f, "RCPT TO:{to}"),
            Command::Data => f.write_str("DATA"),
            Command::Rset => f.write_str("RSET"),
            Command::Noop => f.write_str("NOOP"),
            Command::Quit => f.write_str("QUIT"),
            Command::Vrfy(s) => write!(f, "VRFY {s}"),
            Command::Help => f.write_str("HELP"),
            Command::StartTls => f.write_str("STARTTLS"),
            Command::NotImplemented(v) => f.write_str(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::PathError;

    fn p(s: &str) -> Result<String, CommandError> {
        Command::parse(s.as_bytes()).map(|c| c.to_string())
    }

    #[test]
    fn commands_table() {
        let ok: &[(&str, &str)] = &[
            ("EHLO mx.example.org", "EHLO mx.example.org"),
            ("ehlo [192.0.2.1]", "EHLO [192.0.2.1]"),
            ("HELO x", "HELO x"),
            ("MAIL FROM:<>", "MAIL FROM:<>"),
            ("mail from:<Bob@Example.ORG>", "MAIL FROM:<Bob@example.org>"),
            ("MAIL FROM: <a@b.test>", "MAIL FROM:<a@b.test>"),
            ("MAIL FROM:<a@b.test> SIZE=1000 BODY=8BITMIME", "MAIL FROM:<a@b.test> SIZE=1000 BODY=8BITMIME"),
            ("MAIL FROM:<\"x>y\"@b.test>", "MAIL FROM:<\"x>y\"@b.test>"),
            ("MAIL FROM:<a@[x:y>\"z]> BODY=7BIT", "MAIL FROM:<a@[x:y>\"z]> BODY=7BIT"),
            ("RCPT TO:<postmaster>", "RCPT TO:<Postmaster>"),
            ("RCPT TO:<@r.test:alice@example.test>", "RCPT TO:<alice@example.test>"),
            ("DATA", "DATA"),
            ("rset", "RSET"),
            ("NOOP hello", "NOOP"),
            ("QUIT", "QUIT"),
            ("VRFY alice", "VRFY alice"),
            ("HELP", "HELP"),
            ("HELP MAIL", "HELP"),
            ("EXPN staff", "EXPN"),
            ("STARTTLS", "STARTTLS"),
        ];
        for (input, want) in ok {
            assert_eq!(p(input).as_deref(), Ok(*want), "{input}");
        }
        let err: &[(&str, CommandError)] = &[
            ("FOO", CommandError::Unrecognized),
            ("", CommandError::Unrecognized),
            ("EHLO", CommandError::Syntax("expected one domain or address literal")),
            ("MAIL TO:<a@b.test>", CommandError::Syntax("expected MAIL FROM:<address>")),
            ("MAIL FROM:<foo>", CommandError::BadReversePath(PathError::NoDomain)),
            ("MAIL FROM:foo@b.test", CommandError::BadReversePath(PathError::NoBrackets)),
            ("MAIL FROM:<a@b.test> SIZE=x", CommandError::BadParameter("SIZE=x".into())),
            ("MAIL FROM:<a@b.test> SMTPUTF8", CommandError::BadParameter("SMTPUTF8".into())),
            ("MAIL FROM:<a@b.test> SIZE=1 SIZE=2", CommandError::BadParameter("SIZE=2".into())),
            ("MAIL FROM:<a@b.test>SIZE=1", CommandError::Syntax("expected a space after the address")),
            ("RCPT TO:<bob>", CommandError::BadForwardPath(PathError::NoDomain)),
            ("RCPT TO:<a@b.test> NOTIFY=NEVER", CommandError::BadParameter("NOTIFY=NEVER".into())),
            ("DATA now", CommandError::Syntax("no arguments allowed")),
            ("VRFY", CommandError::Syntax("expected VRFY string")),
        ];
        for (input, want) in err {
            assert_eq!(p(input), Err(want.clone()), "{input}");
        }
        assert_eq!(Command::parse(b"HELO \xff"), Err(CommandError::NotText));
    }
}
