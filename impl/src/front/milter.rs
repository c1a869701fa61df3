//! The sendmail/Postfix milter protocol, version 6, sans-IO: [`MilterReceiver`] splits the
//! octets of one milter connection into [`Command`]s, [`Response`] is what the filter answers,
//! and [`Options`] is the negotiation (SMFIC_OPTNEG). Our own implementation, from the
//! protocol's public definitions (sendmail's `libmilter/mfdef.h`, Postfix's
//! `src/milter/milter8.c`); the Rust milter crates are GPL-licensed.
//!
//! Every packet is a 4-octet big-endian length, then a command octet and `length - 1` octets
//! of data. Strings are NUL-terminated. A packet longer than [`PACKET_MAX`], of length 0, with
//! a command this filter does not know, or whose data does not parse is an error after which
//! the connection must be closed (libmilter does the same: the MTA then applies its
//! `milter_default_action`). Nothing here reads a clock or does IO.

use std::fmt;

use crate::proto::Reply;

/// The protocol version we speak (SMFI_PROT_VERSION).
pub const VERSION: u32 = 6;
/// The oldest MTA version we answer (libmilter's SMFI_PROT_VERSION_MIN).
pub const VERSION_MIN: u32 = 2;
/// Largest packet (command octet and data) accepted: 1 MiB. MTAs send at most 64 KiB
/// (MILTER_MAX_DATA_SIZE, MILTER_CHUNK_SIZE) unless a bigger size is negotiated, which we never
/// ask for.
pub const PACKET_MAX: usize = 1 << 20;
/// Largest body chunk an MTA sends (MILTER_CHUNK_SIZE).
pub const CHUNK_MAX: usize = 65535;

/// Command codes, MTA to filter (SMFIC_*).
pub mod smfic {
    /// Abort the current message.
    pub const ABORT: u8 = b'A';
    /// A body chunk.
    pub const BODY: u8 = b'B';
    /// Connection information.
    pub const CONNECT: u8 = b'C';
    /// Macro definitions for the next command.
    pub const MACRO: u8 = b'D';
    /// End of the body (may carry a last chunk).
    pub const BODYEOB: u8 = b'E';
    /// HELO/EHLO.
    pub const HELO: u8 = b'H';
    /// QUIT, but a new connection follows on the same socket.
    pub const QUIT_NC: u8 = b'K';
    /// One header.
    pub const HEADER: u8 = b'L';
    /// MAIL FROM.
    pub const MAIL: u8 = b'M';
    /// End of headers.
    pub const EOH: u8 = b'N';
    /// Option negotiation.
    pub const OPTNEG: u8 = b'O';
    /// QUIT.
    pub const QUIT: u8 = b'Q';
    /// RCPT TO.
    pub const RCPT: u8 = b'R';
    /// DATA.
    pub const DATA: u8 = b'T';
    /// An SMTP command the MTA does not know.
    pub const UNKNOWN: u8 = b'U';
}

/// Response codes, filter to MTA (SMFIR_*), those we send.
pub mod smfir {
    /// Accept the message (or, at connect, the connection) without further events.
    pub const ACCEPT: u8 = b'a';
    /// Go on.
    pub const CONTINUE: u8 = b'c';
    /// Reject (the MTA's own 5xx text).
    pub const REJECT: u8 = b'r';
    /// Tempfail (the MTA's own 4xx text).
    pub const TEMPFAIL: u8 = b't';
    /// Reject or tempfail with our code and text: `"550 5.7.1 text"` NUL.
    pub const REPLYCODE: u8 = b'y';
}

/// Protocol flags (SMFIP_*), exchanged in SMFIC_OPTNEG: steps the filter does not want, or to
/// which it will not reply.
pub mod smfip {
    /// No connect information.
    pub const NOCONNECT: u32 = 0x0000_0001;
    /// No HELO.
    pub const NOHELO: u32 = 0x0000_0002;
    /// No MAIL.
    pub const NOMAIL: u32 = 0x0000_0004;
    /// No RCPT.
    pub const NORCPT: u32 = 0x0000_0008;
    /// No body.
    pub const NOBODY: u32 = 0x0000_0010;
    /// No headers.
    pub const NOHDRS: u32 = 0x0000_0020;
    /// No end of headers.
    pub const NOEOH: u32 = 0x0000_0040;
    /// No reply to headers.
    pub const NR_HDR: u32 = 0x0000_0080;
    /// No unknown commands.
    pub const NOUNKNOWN: u32 = 0x0000_0100;
    /// No DATA.
    pub const NODATA: u32 = 0x0000_0200;
    /// The MTA understands SMFIR_SKIP.
    pub const SKIP: u32 = 0x0000_0400;
    /// Send rejected RCPTs too.
    pub const RCPT_REJ: u32 = 0x0000_0800;
    /// No reply to connect.
    pub const NR_CONN: u32 = 0x0000_1000;
    /// No reply to HELO.
    pub const NR_HELO: u32 = 0x0000_2000;
    /// No reply to MAIL.
    pub const NR_MAIL: u32 = 0x0000_4000;
    /// No reply to RCPT.
    pub const NR_RCPT: u32 = 0x0000_8000;
    /// No reply to DATA.
    pub const NR_DATA: u32 = 0x0001_0000;
    /// No reply to unknown commands.
    pub const NR_UNKN: u32 = 0x0002_0000;
    /// No reply to end of headers.
    pub const NR_EOH: u32 = 0x0004_0000;
    /// No reply to body chunks.
    pub const NR_BODY: u32 = 0x0008_0000;
    /// Header values as they are, leading space included.
    pub const HDR_LEADSPC: u32 = 0x0010_0000;
    /// What an MTA that sends 0 offers (SMFI_V1_PROT).
    pub const V1_PROT: u32 = 0x0000_003F;
}

/// The address family of SMFIC_CONNECT (SMFIA_*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `'4'`.
    Inet,
    /// `'6'`.
    Inet6,
    /// `'L'`: a Unix socket.
    Unix,
    /// `'U'`: unknown; no port and no address follow.
    Unknown,
}

impl Family {
    fn octet(self) -> u8 {
        match self {
            Family::Inet => b'4',
            Family::Inet6 => b'6',
            Family::Unix => b'L',
            Family::Unknown => b'U',
        }
    }
}

/// One command from the MTA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// SMFIC_OPTNEG: the MTA's version, the actions it allows, the steps it offers.
    OptNeg {
        /// Protocol version.
        version: u32,
        /// SMFIF_* actions the MTA allows.
        actions: u32,
        /// SMFIP_* steps the MTA can leave out.
        protocol: u32,
    },
    /// SMFIC_MACRO: macros for the command `stage` that follows; no reply.
    Macro {
        /// The command the macros belong to (`b'C'`, `b'M'`, …).
        stage: u8,
        /// Name and value, in order: `{client_addr}`, `i`, …
        macros: Vec<(String, String)>,
    },
    /// SMFIC_CONNECT.
    Connect {
        /// The client's host name (`[address]` if unknown).
        hostname: String,
        /// Address family.
        family: Family,
        /// Client port (0 for `Unknown` and Unix sockets).
        port: u16,
        /// The client's address as text (empty for `Unknown`).
        address: String,
    },
    /// SMFIC_HELO: the HELO/EHLO argument.
    Helo(String),
    /// SMFIC_MAIL: the sender (`<a@b>`) then its ESMTP parameters.
    Mail(Vec<String>),
    /// SMFIC_RCPT: the recipient (`<a@b>`) then its ESMTP parameters.
    Rcpt(Vec<String>),
    /// SMFIC_DATA.
    Data,
    /// SMFIC_HEADER: one header field.
    Header {
        /// Field name.
        name: String,
        /// Field value (folded lines keep their line breaks).
        value: String,
    },
    /// SMFIC_EOH.
    Eoh,
    /// SMFIC_BODY: a chunk of the body, CRLF line endings, not dot-stuffed.
    Body(Vec<u8>),
    /// SMFIC_BODYEOB: the end of the message, with a last chunk (usually empty).
    EndOfBody(Vec<u8>),
    /// SMFIC_ABORT: the current message is abandoned; no reply.
    Abort,
    /// SMFIC_QUIT: the connection ends; no reply.
    Quit,
    /// SMFIC_QUIT_NC: this SMTP connection ends, another follows on this socket; no reply.
    QuitNewConnection,
    /// SMFIC_UNKNOWN: an SMTP command the MTA did not know, as the client sent it.
    Unknown(String),
}

impl Command {
    /// Its command octet.
    pub fn code(&self) -> u8 {
        match self {
            Command::OptNeg { .. } => smfic::OPTNEG,
            Command::Macro { .. } => smfic::MACRO,
            Command::Connect { .. } => smfic::CONNECT,
            Command::Helo(_) => smfic::HELO,
            Command::Mail(_) => smfic::MAIL,
            Command::Rcpt(_) => smfic::RCPT,
            Command::Data => smfic::DATA,
            Command::Header { .. } => smfic::HEADER,
            Command::Eoh => smfic::EOH,
            Command::Body(_) => smfic::BODY,
            Command::EndOfBody(_) => smfic::BODYEOB,
            Command::Abort => smfic::ABORT,
            Command::Quit => smfic::QUIT,
            Command::QuitNewConnection => smfic::QUIT_NC,
            Command::Unknown(_) => smfic::UNKNOWN,
        }
    }

    /// The packet, as an MTA sends it (tests, and the test client).
    pub fn encode(&self) -> Vec<u8> {
        let mut d = Vec::new();
        let cstr = |d: &mut Vec<u8>, s: &str| {
            d.extend_from_slice(s.as_bytes());
            d.push(0);
        };
        match self {
            Command::OptNeg { version, actions, protocol } => {
                for v in [version, actions, protocol] {
                    d.extend_from_slice(&v.to_be_bytes());
                }
            }
            Command::Macro { stage, macros } => {
                d.push(*stage);
                for (n, v) in macros {
                    cstr(&mut d, n);
                    cstr(&mut d, v);
                }
            }
            Command::Connect { hostname, family, port, address } => {
                cstr(&mut d, hostname);
                d.push(family.octet());
                if *family != Family::Unknown {
                    d.extend_from_slice(&port.to_be_bytes());
                    cstr(&mut d, address);
                }
            }
            Command::Helo(s) | Command::Unknown(s) => cstr(&mut d, s),
            Command::Mail(args) | Command::Rcpt(args) => args.iter().for_each(|a| cstr(&mut d, a)),
            Command::Header { name, value } => {
                cstr(&mut d, name);
                cstr(&mut d, value);
            }
            Command::Body(b) | Command::EndOfBody(b) => d.extend_from_slice(b),
            Command::Data | Command::Eoh | Command::Abort | Command::Quit | Command::QuitNewConnection => {}
        }
        packet(self.code(), &d)
    }
}

/// A packet: length, code, data.
fn packet(code: u8, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len() + 1).expect("packet under 4 GiB");
    let mut out = Vec::with_capacity(data.len() + 5);
    out.extend_from_slice(&len.to_be_bytes());
    out.push(code);
    out.extend_from_slice(data);
    out
}

/// Why a packet cannot be taken: the connection must be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MilterError {
    /// A length of 0: no command octet.
    #[error("packet of length 0")]
    Empty,
    /// A length over [`PACKET_MAX`].
    #[error("packet of {0} octets, over the limit of {PACKET_MAX}")]
    TooLong(u32),
    /// A command octet this filter does not know (libmilter closes too).
    #[error("unknown command {0:#04x}")]
    UnknownCommand(u8),
    /// The data of a known command does not parse.
    #[error("malformed {command:?} packet: {why}")]
    Malformed {
        /// The command octet, as a character.
        command: char,
        /// What is wrong.
        why: &'static str,
    },
    /// The MTA's protocol version is older than [`VERSION_MIN`].
    #[error("MTA protocol version {0} is older than 2")]
    OldVersion(u32),
}

/// Splits the octets of one milter connection into commands. Holds at most one packet
/// ([`PACKET_MAX`] and its length). After an error it takes nothing more.
#[derive(Debug, Default)]
pub struct MilterReceiver {
    buf: Vec<u8>,
    failed: bool,
}

impl MilterReceiver {
    /// A receiver at the start of a connection.
    pub fn new() -> Self {
        MilterReceiver::default()
    }

    /// The next command in `input`, consuming what it reads; `None` when `input` is used up
    /// without completing a packet (the partial packet is kept for the next call). After an
    /// error, always `None`.
    pub fn next(&mut self, input: &mut &[u8]) -> Option<Result<Command, MilterError>> {
        if self.failed {
            *input = &[];
            return None;
        }
        if self.buf.len() < 4 {
            self.take(input, 4);
            if self.buf.len() < 4 {
                return None;
            }
        }
        let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 octets"));
        if len == 0 {
            return Some(self.fail(MilterError::Empty, input));
        }
        if len as usize > PACKET_MAX {
            return Some(self.fail(MilterError::TooLong(len), input));
        }
        let total = 4 + len as usize;
        self.take(input, total);
        if self.buf.len() < total {
            return None;
        }
        let packet = std::mem::take(&mut self.buf);
        let result = decode(packet[4], &packet[5..]);
        if result.is_err() {
            self.failed = true;
            *input = &[];
        }
        Some(result)
    }

    /// Moves octets from `input` until the buffer holds `upto`.
    fn take(&mut self, input: &mut &[u8], upto: usize) {
        let n = upto.saturating_sub(self.buf.len()).min(input.len());
        self.buf.extend_from_slice(&input[..n]);
        *input = &input[n..];
    }

    fn fail(&mut self, e: MilterError, input: &mut &[u8]) -> Result<Command, MilterError> {
        self.failed = true;
        self.buf = Vec::new();
        *input = &[];
        Err(e)
    }
}

/// Reads NUL-terminated strings.
struct Fields<'a> {
    data: &'a [u8],
    command: u8,
}

impl<'a> Fields<'a> {
    fn err(&self, why: &'static str) -> MilterError {
        MilterError::Malformed { command: char::from(self.command), why }
    }

    fn string(&mut self) -> Result<String, MilterError> {
        let Some(nul) = self.data.iter().position(|&b| b == 0) else {
            return Err(self.err("string without its NUL"));
        };
        let s = String::from_utf8_lossy(&self.data[..nul]).into_owned();
        self.data = &self.data[nul + 1..];
        Ok(s)
    }

    fn octet(&mut self) -> Result<u8, MilterError> {
        let (&b, rest) = self.data.split_first().ok_or_else(|| self.err("too short"))?;
        self.data = rest;
        Ok(b)
    }

    fn u16(&mut self) -> Result<u16, MilterError> {
        if self.data.len() < 2 {
            return Err(self.err("too short for a port"));
        }
        let (n, rest) = self.data.split_at(2);
        self.data = rest;
        Ok(u16::from_be_bytes([n[0], n[1]]))
    }

    /// The remaining NUL-terminated strings (at least one).
    fn strings(&mut self) -> Result<Vec<String>, MilterError> {
        let mut out = vec![self.string()?];
        while !self.data.is_empty() {
            out.push(self.string()?);
        }
        Ok(out)
    }
}

fn decode(code: u8, data: &[u8]) -> Result<Command, MilterError> {
    let mut f = Fields { data, command: code };
    Ok(match code {
        smfic::OPTNEG => {
            if data.len() < 12 {
                return Err(f.err("shorter than 12 octets"));
            }
            let word = |i: usize| u32::from_be_bytes(data[i * 4..i * 4 + 4].try_into().expect("4 octets"));
            Command::OptNeg { version: word(0), actions: word(1), protocol: word(2) }
        }
        smfic::MACRO => {
            let stage = f.octet()?;
            let mut macros = Vec::new();
            while !f.data.is_empty() {
                let name = f.string()?;
                // An odd name at the end is taken with an empty value.
                let value = if f.data.is_empty() { String::new() } else { f.string()? };
                macros.push((name, value));
            }
            Command::Macro { stage, macros }
        }
        smfic::CONNECT => {
            let hostname = f.string()?;
            let family = match f.octet()? {
                b'4' => Family::Inet,
                b'6' => Family::Inet6,
                b'L' => Family::Unix,
                b'U' => Family::Unknown,
                _ => return Err(f.err("unknown address family")),
            };
            let (port, address) = if family == Family::Unknown { (0, String::new()) } else { (f.u16()?, f.string()?) };
            Command::Connect { hostname, family, port, address }
        }
        smfic::HELO => Command::Helo(f.string()?),
        smfic::MAIL => Command::Mail(f.strings()?),
        smfic::RCPT => Command::Rcpt(f.strings()?),
        smfic::HEADER => Command::Header { name: f.string()?, value: f.string()? },
        smfic::DATA => Command::Data,
        smfic::EOH => Command::Eoh,
        smfic::BODY => Command::Body(data.to_vec()),
        smfic::BODYEOB => Command::EndOfBody(data.to_vec()),
        smfic::ABORT => Command::Abort,
        smfic::QUIT => Command::Quit,
        smfic::QUIT_NC => Command::QuitNewConnection,
        // The command line, NUL-terminated; taken as it is without one.
        smfic::UNKNOWN => Command::Unknown(match f.string() {
            Ok(s) => s,
            Err(_) => String::from_utf8_lossy(data).into_owned(),
        }),
        other => return Err(MilterError::UnknownCommand(other)),
    })
}

/// What the filter answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// SMFIC_OPTNEG: our version, the actions we want (none), the steps we leave out.
    OptNeg {
        /// Protocol version.
        version: u32,
        /// SMFIF_* actions.
        actions: u32,
        /// SMFIP_* flags.
        protocol: u32,
    },
    /// SMFIR_CONTINUE.
    Continue,
    /// SMFIR_ACCEPT.
    Accept,
    /// SMFIR_REJECT.
    Reject,
    /// SMFIR_TEMPFAIL.
    Tempfail,
    /// SMFIR_REPLYCODE: `"550 5.7.1 text"`, a 4xx or 5xx the MTA gives its client as is.
    ReplyCode(String),
}

impl Response {
    /// A session's reply at the edge: 2xx (and 3xx) go on, 4xx/5xx are sent with their own
    /// code, enhanced code and text (one line; `%` doubled, since sendmail takes the text as a
    /// format string and Postfix undoes the doubling; control characters become spaces).
    pub fn from_reply(reply: &Reply) -> Response {
        if reply.code < 400 {
            return Response::Continue;
        }
        let text: String = reply
            .lines
            .iter()
            .map(|l| l.as_ref())
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect::<String>()
            .replace('%', "%%");
        Response::ReplyCode(match reply.enhanced {
            Some(e) => format!("{} {e} {text}", reply.code),
            None => format!("{} {text}", reply.code),
        })
    }

    /// The packet.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::OptNeg { version, actions, protocol } => {
                let mut d = Vec::with_capacity(12);
                for v in [version, actions, protocol] {
                    d.extend_from_slice(&v.to_be_bytes());
                }
                packet(smfic::OPTNEG, &d)
            }
            Response::Continue => packet(smfir::CONTINUE, &[]),
            Response::Accept => packet(smfir::ACCEPT, &[]),
            Response::Reject => packet(smfir::REJECT, &[]),
            Response::Tempfail => packet(smfir::TEMPFAIL, &[]),
            Response::ReplyCode(text) => {
                let mut d = text.as_bytes().to_vec();
                d.push(0);
                packet(smfir::REPLYCODE, &d)
            }
        }
    }
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::OptNeg { version, actions, protocol } => {
                write!(f, "optneg v{version} actions={actions:#x} protocol={protocol:#x}")
            }
            Response::Continue => f.write_str("continue"),
            Response::Accept => f.write_str("accept"),
            Response::Reject => f.write_str("reject"),
            Response::Tempfail => f.write_str("tempfail"),
            Response::ReplyCode(t) => f.write_str(t),
        }
    }
}

/// What we ask for in the negotiation, where the MTA offers it: no unknown commands; no
/// replies to headers, end of headers and body chunks (verdicts come at MAIL, RCPT, DATA and
/// the end of the message); header values as they are (so the message is rebuilt exactly).
pub const WANTED: u32 = smfip::NOUNKNOWN | smfip::NR_HDR | smfip::NR_EOH | smfip::NR_BODY | smfip::HDR_LEADSPC;

/// The negotiated protocol of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The version both speak.
    pub version: u32,
    /// SMFIP_* flags agreed: [`WANTED`] as far as the MTA offers them.
    pub protocol: u32,
}

impl Default for Options {
    /// Before negotiation: every step answered.
    fn default() -> Self {
        Options { version: VERSION, protocol: 0 }
    }
}

impl Options {
    /// Answers the MTA's SMFIC_OPTNEG: the lower version of the two, no actions (we never
    /// modify a message), and of [`WANTED`] what the MTA offers (libmilter refuses flags the
    /// MTA did not offer; an MTA that offers 0 offers version 1's steps).
    pub fn negotiate(version: u32, _actions: u32, protocol: u32) -> Result<(Options, Response), MilterError> {
        if version < VERSION_MIN {
            return Err(MilterError::OldVersion(version));
        }
        let offered = if protocol == 0 { smfip::V1_PROT } else { protocol };
        let o = Options { version: version.min(VERSION), protocol: WANTED & offered };
        Ok((o, Response::OptNeg { version: o.version, actions: 0, protocol: o.protocol }))
    }

    /// Whether the MTA waits for a reply to `command`.
    pub fn replies_to(&self, command: &Command) -> bool {
        let no_reply = |flag: u32| self.protocol & flag == 0;
        match command {
            Command::Macro { .. } | Command::Abort | Command::Quit | Command::QuitNewConnection => false,
            Command::Header { .. } => no_reply(smfip::NR_HDR),
            Command::Eoh => no_reply(smfip::NR_EOH),
            Command::Body(_) => no_reply(smfip::NR_BODY),
            Command::Unknown(_) => no_reply(smfip::NR_UNKN),
            Command::Connect { .. } => no_reply(smfip::NR_CONN),
            Command::Helo(_) => no_reply(smfip::NR_HELO),
            Command::Mail(_) => no_reply(smfip::NR_MAIL),
            Command::Rcpt(_) => no_reply(smfip::NR_RCPT),
            Command::Data => no_reply(smfip::NR_DATA),
            Command::OptNeg { .. } | Command::EndOfBody(_) => true,
        }
    }

    /// Header values come as they are, the space after the colon included
    /// ([`smfip::HDR_LEADSPC`]); otherwise the MTA took one leading space off.
    pub fn leading_space(&self) -> bool {
        self.protocol & smfip::HDR_LEADSPC != 0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proto::Enhanced;

    fn all(mut input: &[u8]) -> Vec<Result<Command, MilterError>> {
        let mut rx = MilterReceiver::new();
        let mut out = Vec::new();
        while let Some(c) = rx.next(&mut input) {
            out.push(c);
        }
        out
    }

    #[test]
    fn optneg_as_postfix_sends_it() {
        // Postfix 3.7: version 6, actions 0x1ff, events 0x1fffff.
        let bytes = [0, 0, 0, 13, b'O', 0, 0, 0, 6, 0, 0, 1, 0xff, 0, 0x1f, 0xff, 0xff];
        assert_eq!(all(&bytes), vec![Ok(Command::OptNeg { version: 6, actions: 0x1ff, protocol: 0x1f_ffff })]);
        let (o, r) = Options::negotiate(6, 0x1ff, 0x1f_ffff).unwrap();
        assert_eq!(o.protocol, 0x0000_0100 | 0x80 | 0x0004_0000 | 0x0008_0000 | 0x0010_0000);
        assert_eq!(
            r.encode(),
            [0, 0, 0, 13, b'O', 0, 0, 0, 6, 0, 0, 0, 0, 0, 0x1c, 0x01, 0x80],
            "version 6, no actions, NOUNKNOWN|NR_HDR|NR_EOH|NR_BODY|HDR_LEADSPC"
        );
        assert!(!o.replies_to(&Command::Header { name: "a".into(), value: "b".into() }));
        assert!(!o.replies_to(&Command::Body(vec![])));
        assert!(o.replies_to(&Command::Mail(vec!["<a@b>".into()])));
        assert!(o.replies_to(&Command::EndOfBody(vec![])));
        assert!(o.leading_space());
    }

    #[test]
    fn optneg_with_an_older_mta() {
        // Version 2, protocol 0: version 1's steps, none of which we ask to leave out.
        let (o, r) = Options::negotiate(2, 0, 0).unwrap();
        assert_eq!(o, Options { version: 2, protocol: 0 });
        assert_eq!(r, Response::OptNeg { version: 2, actions: 0, protocol: 0 });
        assert!(o.replies_to(&Command::Header { name: "a".into(), value: "b".into() }));
        assert_eq!(Options::negotiate(1, 0, 0).unwrap_err(), MilterError::OldVersion(1));
        assert_eq!(
            all(&[0, 0, 0, 5, b'O', 0, 0, 0, 6]),
            vec![Err(MilterError::Malformed { command: 'O', why: "shorter than 12 octets" })]
        );
    }

    #[test]
    fn connect_ipv4_ipv6_unix_unknown() {
        let v4 = b"\0\0\0\x1b\x43mail.example\0\x34\x30\x39192.0.2.1\0";
        assert_eq!(
            all(v4),
            vec![Ok(Command::Connect {
                hostname: "mail.example".into(),
                family: Family::Inet,
                port: 0x3039,
                address: "192.0.2.1".into()
            })]
        );
        let v6 = Command::Connect {
            hostname: "[2001:db8::1]".into(),
            family: Family::Inet6,
            port: 25,
            address: "2001:db8::1".into(),
        };
        assert_eq!(v6.encode(), b"\0\0\0\x1eC[2001:db8::1]\x006\0\x192001:db8::1\0");
        assert_eq!(all(&v6.encode()), vec![Ok(v6)]);
        let unknown = b"\0\0\0\x0aCunknown\0U";
        assert_eq!(
            all(unknown),
            vec![Ok(Command::Connect {
                hostname: "unknown".into(),
                family: Family::Unknown,
                port: 0,
                address: String::new()
            })]
        );
        let unix =
            Command::Connect { hostname: "localhost".into(), family: Family::Unix, port: 0, address: "/s".into() };
        assert_eq!(all(&unix.encode()), vec![Ok(unix)]);
        assert!(matches!(all(b"\0\0\0\x05Ch\0X\0")[0], Err(MilterError::Malformed { command: 'C', .. })));
        assert!(matches!(all(b"\0\0\0\x04Ch\x004")[0], Err(MilterError::Malformed { command: 'C', .. })));
    }

    #[test]
    fn macros_envelope_headers_body() {
        let mut wire = Vec::new();
        wire.extend_from_slice(b"\0\0\0\x1aDC{client_addr}\x00192.0.2.1\0");
        wire.extend_from_slice(b"\0\0\0\x0dHclient.test\0");
        wire.extend_from_slice(b"\0\0\0\x19M<a@example.test>\0SIZE=9\0");
        wire.extend_from_slice(b"\0\0\0\x09R<b@x.y>\0");
        wire.extend_from_slice(b"\0\0\0\x01T");
        wire.extend_from_slice(b"\0\0\0\x10LSubject\0 hello\0");
        wire.extend_from_slice(b"\0\0\0\x01N");
        wire.extend_from_slice(b"\0\0\0\x08Bhi\r\n.\r\n");
        wire.extend_from_slice(b"\0\0\0\x01E");
        wire.extend_from_slice(b"\0\0\0\x01A\0\0\0\x01K\0\0\0\x01Q");
        wire.extend_from_slice(b"\0\0\0\x06UXYZZY");
        assert_eq!(
            all(&wire),
            vec![
                Ok(Command::Macro { stage: b'C', macros: vec![("{client_addr}".into(), "192.0.2.1".into())] }),
                Ok(Command::Helo("client.test".into())),
                Ok(Command::Mail(vec!["<a@example.test>".into(), "SIZE=9".into()])),
                Ok(Command::Rcpt(vec!["<b@x.y>".into()])),
                Ok(Command::Data),
                Ok(Command::Header { name: "Subject".into(), value: " hello".into() }),
                Ok(Command::Eoh),
                Ok(Command::Body(b"hi\r\n.\r\n".to_vec())),
                Ok(Command::EndOfBody(vec![])),
                Ok(Command::Abort),
                Ok(Command::QuitNewConnection),
                Ok(Command::Quit),
                Ok(Command::Unknown("XYZZY".into())),
            ]
        );
    }

    #[test]
    fn errors_close_the_stream() {
        // Over the limit: refused from the length alone, nothing buffered.
        let mut rx = MilterReceiver::new();
        let mut input: &[u8] = &[0, 0x10, 0, 1, b'B', 1, 2, 3];
        assert_eq!(rx.next(&mut input), Some(Err(MilterError::TooLong(0x0010_0001))));
        assert!(input.is_empty());
        let mut more: &[u8] = b"\0\0\0\x01T";
        assert_eq!(rx.next(&mut more), None, "nothing after an error");
        assert_eq!(all(&[0, 0, 0, 0]), vec![Err(MilterError::Empty)]);
        assert_eq!(all(b"\0\0\0\x01Z\0\0\0\x01T"), vec![Err(MilterError::UnknownCommand(b'Z'))]);
        assert!(matches!(all(b"\0\0\0\x03Hab")[0], Err(MilterError::Malformed { command: 'H', .. })));
        // Exactly the limit is taken.
        let mut big = ((PACKET_MAX) as u32).to_be_bytes().to_vec();
        big.push(b'B');
        big.resize(4 + PACKET_MAX, b'x');
        assert!(matches!(&all(&big)[..], [Ok(Command::Body(b))] if b.len() == PACKET_MAX - 1));
    }

    #[test]
    fn responses_byte_exact() {
        assert_eq!(Response::Continue.encode(), b"\0\0\0\x01c");
        assert_eq!(Response::Accept.encode(), b"\0\0\0\x01a");
        assert_eq!(Response::Reject.encode(), b"\0\0\0\x01r");
        assert_eq!(Response::Tempfail.encode(), b"\0\0\0\x01t");
        let r = Reply::new(550, Enhanced(5, 7, 1), "Sender is not a user of this domain");
        let resp = Response::from_reply(&r);
        assert_eq!(resp, Response::ReplyCode("550 5.7.1 Sender is not a user of this domain".into()));
        assert_eq!(resp.encode(), b"\0\0\0\x2fy550 5.7.1 Sender is not a user of this domain\0");
        let pct = Reply::new(554, Enhanced(5, 7, 0), "100% bad\r\nline");
        assert_eq!(Response::from_reply(&pct), Response::ReplyCode("554 5.7.0 100%% bad  line".into()));
        assert_eq!(Response::from_reply(&Reply::queued("x")), Response::Continue);
    }

    fn command() -> impl Strategy<Value = Command> {
        let s = || "[a-zA-Z0-9<>@. {}_-]{0,20}";
        prop_oneof![
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(version, actions, protocol)| Command::OptNeg {
                version,
                actions,
                protocol
            }),
            (prop::sample::select(b"CHMRTLNE".to_vec()), prop::collection::vec((s(), s()), 0..4))
                .prop_map(|(stage, macros)| Command::Macro { stage, macros }),
            (s(), any::<u16>(), s()).prop_map(|(hostname, port, address)| Command::Connect {
                hostname,
                family: Family::Inet,
                port,
                address
            }),
            s().prop_map(Command::Helo),
            prop::collection::vec(s(), 1..4).prop_map(Command::Mail),
            prop::collection::vec(s(), 1..4).prop_map(Command::Rcpt),
            Just(Command::Data),
            (s(), s()).prop_map(|(name, value)| Command::Header { name, value }),
            Just(Command::Eoh),
            prop::collection::vec(any::<u8>(), 0..300).prop_map(Command::Body),
            prop::collection::vec(any::<u8>(), 0..30).prop_map(Command::EndOfBody),
            Just(Command::Abort),
            Just(Command::Quit),
            Just(Command::QuitNewConnection),
            s().prop_map(Command::Unknown),
        ]
    }

    proptest! {
        /// However the octets are split into reads, the same commands come out, each as it
        /// went in.
        #[test]
        fn any_split_gives_the_same_commands(
            cmds in prop::collection::vec(command(), 0..12),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let wire: Vec<u8> = cmds.iter().flat_map(Command::encode).collect();
            let whole = all(&wire);
            prop_assert_eq!(whole.clone(), cmds.iter().cloned().map(Ok).collect::<Vec<_>>());
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
            points.sort_unstable();
            let mut rx = MilterReceiver::new();
            let mut got = Vec::new();
            let mut from = 0;
            for to in points.into_iter().chain([wire.len()]) {
                let mut input = &wire[from..to];
                while let Some(c) = rx.next(&mut input) {
                    got.push(c);
                }
                prop_assert!(input.is_empty());
                from = to;
            }
            prop_assert_eq!(got, whole);
        }

        /// Arbitrary octets never panic, and never make the receiver hold more than a packet.
        #[test]
        fn garbage_is_bounded(wire in prop::collection::vec(any::<u8>(), 0..2000)) {
            let mut rx = MilterReceiver::new();
            let mut input = &wire[..];
            while rx.next(&mut input).is_some() {}
            prop_assert!(rx.buf.len() <= PACKET_MAX + 4);
        }
    }
}
