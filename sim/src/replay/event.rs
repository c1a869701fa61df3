//! What a log line says, whatever the MTA that wrote it: the events the session assembler
//! ([`super::assemble`]) builds sessions from. Borrowed from the line; the assembler copies
//! what it keeps.

use std::net::IpAddr;

/// Which process (and so which session) a line belongs to: a hash of the host, the program
/// and its pid (one smtpd or sendmail child serves one connection at a time), or of
/// postscreen's client address and port.
pub type Key = u64;

/// The SMTP stage a refusal answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// The connection (or the greeting).
    Connect,
    /// HELO/EHLO.
    Helo,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// DATA or the end of the message.
    Data,
    /// Anything else (VRFY, ETRN, ...).
    Other,
}

/// What became of a queued recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Delivered (or relayed on).
    Sent,
    /// Deferred: still queued.
    Deferred,
    /// Bounced or expired.
    Bounced,
}

/// Counts from Postfix's `disconnect from` line: `ehlo=1 mail=1 rcpt=0/1 data=0/1 quit=1`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Commands {
    /// EHLO or HELO given.
    pub helo: u16,
    /// MAIL commands (accepted, given).
    pub mail: (u16, u16),
    /// RCPT commands (accepted, given).
    pub rcpt: (u16, u16),
    /// DATA commands (accepted, given).
    pub data: (u16, u16),
    /// Commands in all (accepted, given).
    pub all: (u16, u16),
}

/// One log line's meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<'a> {
    /// A client connected.
    Connect {
        /// The process.
        key: Key,
        /// The client.
        client: IpAddr,
    },
    /// The connection ended (with Postfix's command counts).
    Disconnect {
        /// The process.
        key: Key,
        /// The counts, if logged.
        commands: Option<Commands>,
    },
    /// The MTA refused something.
    Reject {
        /// The process.
        key: Key,
        /// The queue id of the transaction, if it had one.
        qid: Option<&'a str>,
        /// The client, when the line names it.
        client: Option<IpAddr>,
        /// What was refused.
        stage: Stage,
        /// The reply code (4xx, 5xx).
        code: u16,
        /// The envelope sender (empty: `<>`).
        from: Option<&'a str>,
        /// The recipient.
        to: Option<&'a str>,
        /// The HELO name.
        helo: Option<&'a str>,
    },
    /// The smtpd process opened a queue file for the client's message (`QID: client=`).
    Queued {
        /// The process.
        key: Key,
        /// The queue id.
        qid: &'a str,
        /// The client.
        client: Option<IpAddr>,
    },
    /// A queued message's sender (Postfix qmgr; sendmail's `from=` line, which names the client).
    Sender {
        /// The queue id.
        qid: &'a str,
        /// The sender (empty: `<>`).
        from: &'a str,
        /// Recipients in the message.
        nrcpt: Option<u32>,
        /// sendmail: the process that received it and the client (`relay=`).
        origin: Option<(Key, IpAddr)>,
    },
    /// A delivery attempt of one recipient of a queued message.
    Delivery {
        /// The queue id.
        qid: &'a str,
        /// The recipient as the client gave it (`orig_to=`, else `to=`).
        to: &'a str,
        /// What became of it.
        status: Status,
    },
    /// The queue file is gone.
    Removed {
        /// The queue id.
        qid: &'a str,
    },
    /// postscreen handed the connection to smtpd (which logs its own session).
    Passed {
        /// The postscreen connection.
        key: Key,
    },
    /// A message accepted whose envelope the log does not give (the gatekeeper's own log:
    /// `Deliver` 250): replayed with a placeholder sender and recipient.
    Accepted {
        /// The process (connection).
        key: Key,
        /// The client.
        client: IpAddr,
    },
    /// A line of a known program that carries nothing the replay needs (`cleanup`'s
    /// message-id, `warning:`, TLS, ...).
    Ignored,
}

/// Stands for the configuration's first local domain in placeholder addresses.
pub const LOCAL: &str = "{local}";

/// A stable 64-bit FNV-1a over parts (keys must not depend on the process's hash seed: the
/// replay is deterministic).
pub fn key_of(parts: &[&[u8]]) -> Key {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
