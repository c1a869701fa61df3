//! The `/proc/net/xt_recent/NAME` text protocol: what a write means, and what a read shows.
//!
//! This module owns the kernel's address parsers (`in4_pton`, `in6_pton` of net/core/utils.c,
//! transcribed with their quirks: bytes past the end read as NUL, a `:` anywhere selects IPv6,
//! the 47-byte write buffer), the parse of one write into a [`ProcWrite`] command, and the
//! rendering of a table listing. It must not touch a table: `XtRecent` applies the commands and
//! hands in its entries (docs/kernel.md §1, "Writing" and "Reading", describes the protocol;
//! §4.3 its pitfalls).

use std::fmt::Write as _;
use std::net::IpAddr;

use super::table::Key;
use super::xt_recent::XtEntry;

/// `sizeof("+b335:1d35:1e55:dead:c0de:1715:255.255.255.255")`: the proc write buffer.
const PROC_BUF_LEN: usize = 47;

// ---------------------------------------------------------------------------------------------
// Kernel address parsers (net/core/utils.c)
// ---------------------------------------------------------------------------------------------

const IN6PTON_XDIGIT: i32 = 0x0001_0000;
const IN6PTON_DIGIT: i32 = 0x0002_0000;
const IN6PTON_COLON_MASK: i32 = 0x0070_0000;
const IN6PTON_COLON_1: i32 = 0x0010_0000;
const IN6PTON_COLON_2: i32 = 0x0020_0000;
const IN6PTON_COLON_1_2: i32 = 0x0040_0000;
const IN6PTON_DOT: i32 = 0x0080_0000;
const IN6PTON_DELIM: i32 = 0x1000_0000;
const IN6PTON_NULL: i32 = 0x2000_0000;
const IN6PTON_UNKNOWN: i32 = 0x4000_0000;

fn xdigit2bin(c: u8, delim: u8) -> i32 {
    if c == delim || c == 0 {
        return IN6PTON_DELIM;
    }
    if c == b':' {
        return IN6PTON_COLON_MASK;
    }
    if c == b'.' {
        return IN6PTON_DOT;
    }
    let val = match c {
        b'0'..=b'9' => i32::from(c - b'0'),
        b'a'..=b'f' => i32::from(c - b'a' + 10),
        b'A'..=b'F' => i32::from(c - b'A' + 10),
        _ => return IN6PTON_UNKNOWN,
    };
    val | IN6PTON_XDIGIT | if val < 10 { IN6PTON_DIGIT } else { 0 }
}

/// `in4_pton(src, src.len(), dst, delim, NULL)`: bytes past the end read as NUL.
pub(super) fn in4_pton(src: &[u8], delim: u8) -> Option<[u8; 4]> {
    let mut s = 0usize;
    let mut d = [0u8; 4];
    let mut i = 0usize;
    let mut w: i32 = 0;
    loop {
        let ch = src.get(s).copied().unwrap_or(0);
        let c = xdigit2bin(ch, delim);
        if c & (IN6PTON_DIGIT | IN6PTON_DOT | IN6PTON_DELIM | IN6PTON_COLON_MASK) == 0 {
            return None;
        }
        if c & (IN6PTON_DOT | IN6PTON_DELIM | IN6PTON_COLON_MASK) != 0 {
            if w == 0 {
                return None;
            }
            d[i] = (w & 0xff) as u8;
            w = 0;
            i += 1;
            if c & (IN6PTON_DELIM | IN6PTON_COLON_MASK) != 0 {
                if i != 4 {
                    return None;
                }
                return Some(d);
            }
        } else {
            // The flag bits ride along in the high half (the kernel builds with -fwrapv).
            w = w.wrapping_mul(10).wrapping_add(c);
            if (w & 0xffff) > 255 {
                return None;
            }
        }
        if i >= 4 {
            return None;
        }
        s += 1;
    }
}

/// `in6_pton(src, src.len(), dst, delim, NULL)`: bytes past the end read as NUL.
pub(super) fn in6_pton(src: &[u8], delim: u8) -> Option<[u8; 16]> {
    let mut s = 0usize;
    let mut tok: Option<usize> = None;
    let mut dbuf = [0u8; 16];
    let mut d = 0usize;
    let mut dc: Option<usize> = None;
    let mut state = IN6PTON_COLON_1_2 | IN6PTON_XDIGIT | IN6PTON_NULL;
    let mut w: i32 = 0;
    loop {
        let ch = src.get(s).copied().unwrap_or(0);
        let c = xdigit2bin(ch, delim);
        if c & state == 0 {
            return None;
        }
        if c & (IN6PTON_DELIM | IN6PTON_COLON_MASK) != 0 {
            // Process one 16-bit word.
            if state & IN6PTON_NULL == 0 {
                *dbuf.get_mut(d)? = (w >> 8) as u8;
                *dbuf.get_mut(d + 1)? = w as u8;
                d += 2;
            }
            w = 0;
            if c & IN6PTON_DELIM != 0 {
                break;
            }
            state = match state & IN6PTON_COLON_MASK {
                IN6PTON_COLON_2 => {
                    dc = Some(d);
                    let mut st = IN6PTON_XDIGIT | IN6PTON_DELIM;
                    if d >= 16 {
                        st |= IN6PTON_NULL;
                    }
                    st
                }
                x if x == IN6PTON_COLON_1 | IN6PTON_COLON_1_2 => IN6PTON_XDIGIT | IN6PTON_COLON_2,
                IN6PTON_COLON_1 => IN6PTON_XDIGIT,
                IN6PTON_COLON_1_2 => IN6PTON_COLON_2,
                _ => 0,
            };
            tok = Some(s + 1);
        } else if c & IN6PTON_DOT != 0 {
            // DOT is only ever allowed after a colon, so `tok` is set.
            let start = tok.unwrap_or(s);
            let v4 = in4_pton(src.get(start..).unwrap_or(&[]), delim)?;
            dbuf.get_mut(d..d + 4)?.copy_from_slice(&v4);
            d += 4;
            break;
        } else {
            w = (w << 4) | (0xff & c);
            state = IN6PTON_COLON_1 | IN6PTON_DELIM;
            if w & 0xf000 == 0 {
                state |= IN6PTON_XDIGIT;
            }
            if dc.is_none() && d + 2 < 16 {
                state |= IN6PTON_COLON_1_2;
                state &= !IN6PTON_DELIM;
            }
            if d + 2 >= 16 {
                state &= !(IN6PTON_COLON_1 | IN6PTON_COLON_1_2);
            }
        }
        if (dc.is_some() && d + 4 < 16) || d + 4 == 16 {
            state |= IN6PTON_DOT;
        }
        if d >= 16 {
            state &= !(IN6PTON_XDIGIT | IN6PTON_COLON_MASK);
        }
        s += 1;
    }
    let Some(dc) = dc else {
        return Some(dbuf);
    };
    let mut out = [0u8; 16];
    let mut i = 15isize;
    let mut dd = d as isize - 1;
    let dc = dc as isize;
    while dd >= dc {
        out[i as usize] = dbuf[dd as usize];
        i -= 1;
        dd -= 1;
    }
    while i >= dc {
        out[i as usize] = 0;
        i -= 1;
    }
    while i >= 0 {
        out[i as usize] = dbuf[dd as usize];
        i -= 1;
        dd -= 1;
    }
    Some(out)
}

/// The kernel's `strnchr`: stops at NUL.
fn strnchr(buf: &[u8], c: u8) -> bool {
    for &b in buf {
        if b == 0 {
            return false;
        }
        if b == c {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Writes and reads
// ---------------------------------------------------------------------------------------------

/// Errors of the `/proc/net/xt_recent/NAME` write protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProcError {
    /// `EINVAL`: not `+addr`, `-addr` or `/`, or an address the kernel's parser refuses
    /// (trailing space, `+ addr`, bad octet, …). Fix the line; nothing was changed.
    #[error("EINVAL: need \"+addr\", \"-addr\" or \"/\" with a literal address")]
    InvalidArgument,
}

impl ProcError {
    /// The errno the kernel returns.
    pub fn errno(self) -> i32 {
        match self {
            ProcError::InvalidArgument => 22,
        }
    }
}

/// What one write to `/proc/net/xt_recent/NAME` asks of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProcWrite {
    /// An empty write: nothing.
    Nothing,
    /// `/`: delete every entry.
    Flush,
    /// `+addr`: add or stamp the (unmasked) key.
    Add(Key),
    /// `-addr`: delete the (unmasked) key if present.
    Remove(Key),
}

/// Parses one `write()` at offset 0 (`recent_mt_proc_write`).
///
/// The address is IPv6 if a `:` appears anywhere in the (47-byte) buffer before a NUL, else
/// IPv4; only a `\n` (or NUL, or the end) may follow it, and anything after that `\n` is
/// ignored. A `/` flushes whatever follows it.
pub(super) fn parse_write(buf: &[u8]) -> Result<ProcWrite, ProcError> {
    if buf.is_empty() {
        return Ok(ProcWrite::Nothing);
    }
    let buf = &buf[..buf.len().min(PROC_BUF_LEN)];
    let add = match buf[0] {
        b'/' => return Ok(ProcWrite::Flush),
        b'-' => false,
        b'+' => true,
        _ => return Err(ProcError::InvalidArgument),
    };
    let rest = &buf[1..];
    let key = if strnchr(rest, b':') {
        Key::v6(u128::from_be_bytes(in6_pton(rest, b'\n').ok_or(ProcError::InvalidArgument)?))
    } else {
        Key::v4(u32::from_be_bytes(in4_pton(rest, b'\n').ok_or(ProcError::InvalidArgument)?))
    };
    Ok(if add { ProcWrite::Add(key) } else { ProcWrite::Remove(key) })
}

/// The text of a read: one line per entry,
/// `src=<addr> ttl: 0 last_seen: J oldest_pkt: I s0, s1, …`.
///
/// IPv4 prints dotted, IPv6 as 8 zero-padded hex groups (`%pI6`); stamps are in ring-slot
/// order; entries in the order given.
pub(super) fn render<'a>(entries: impl Iterator<Item = XtEntry<'a>>) -> String {
    let mut out = String::new();
    for e in entries {
        match e.addr() {
            IpAddr::V4(a) => {
                let _ = write!(out, "src={a}");
            }
            IpAddr::V6(a) => {
                let s = a.segments();
                let _ = write!(
                    out,
                    "src={:04x}:{:04x}:{:04x}:{:04x}:{:04x}:{:04x}:{:04x}:{:04x}",
                    s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]
                );
            }
        }
        let _ = write!(out, " ttl: {} last_seen: {} oldest_pkt: {}", e.ttl(), e.last_seen(), e.oldest_pkt());
        for (i, s) in e.stamps().enumerate() {
            let _ = write!(out, "{} {s}", if i == 0 { "" } else { "," });
        }
        out.push('\n');
    }
    out
}
