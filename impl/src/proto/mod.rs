//! SMTP wire types and receivers, sans-IO (RFC 5321, RFC 1870, RFC 2920, RFC 3463, RFC 6152).
//!
//! This layer owns the syntax: commands and their parameters, paths and mailboxes, replies with
//! enhanced status codes (their parser, and the catalogue of those the gatekeeper sends), the
//! reply codes each exchange allows ([`Verb`]), and the two byte receivers (command lines,
//! DATA). It decides nothing about policy and holds no state beyond a bounded line buffer; it
//! never does IO or reads a clock. Every limit is enforced here with an error value the session turns into a reply.

mod catalogue;
mod command;
mod path;
mod proxy;
mod receiver;
mod reply;
mod text;
mod verb;

pub use command::{Body, Command, CommandError, MailParams, RcptParams};
pub use path::{Domain, ForwardPath, Host, LocalPart, Mailbox, PathError, ReversePath};
pub use proxy::{PROXY_HEADER_MAX, ProxyError, parse_proxy_header, proxy_v2_header, proxy_v2_local_header};
pub use receiver::{DataEvent, DataReceiver, LineEvent, LineReceiver};
pub use reply::{Enhanced, Reply, ReplyError};
pub use text::{escape, escape_bytes, printable};
pub use verb::Verb;

/// Longest command line including CRLF (RFC 5321 §4.5.3.1.4).
pub const COMMAND_LINE_MAX: usize = 512;
/// Longest reply line including the code and CRLF (RFC 5321 §4.5.3.1.5).
pub const REPLY_LINE_MAX: usize = 512;
/// Longest text line of a message including CRLF (RFC 5321 §4.5.3.1.6); the DATA receiver
/// breaks longer ones.
pub const TEXT_LINE_MAX: usize = 1000;
/// Longest local part (RFC 5321 §4.5.3.1.1).
pub const LOCAL_PART_MAX: usize = 64;
/// Longest domain (RFC 5321 §4.5.3.1.2).
pub const DOMAIN_MAX: usize = 255;
/// Longest path including the angle brackets (RFC 5321 §4.5.3.1.3).
pub const PATH_MAX: usize = 256;
