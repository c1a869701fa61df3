//! The PROXY protocol header, versions 1 (text) and 2 (binary), as HAProxy sends it in front of
//! a connection to carry the client's address. Sans-IO: parse from bytes, render to bytes.
//! The server honours it only from configured trusted peers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest header accepted: v1 is at most 107 octets; v2 is 16 plus addresses and TLVs, which
/// we bound to 520 octets.
pub const PROXY_HEADER_MAX: usize = 536;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest v1 line including its CRLF.
const V1_MAX: usize = 107;

/// A header that is not valid PROXY protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Neither `PROXY ` nor the v2 signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// A v1 line that does not parse.
    #[error("malformed PROXY v1 header: {0}")]
    BadV1(&'static str),
    /// A v2 header with a bad version, command, family or length.
    #[error("malformed PROXY v2 header: {0}")]
    BadV2(&'static str),
}

/// Parses a header at the start of `buf`.
///
/// `Ok(None)`: incomplete, read more. `Ok(Some((len, source)))`: the header is `len` octets
/// long and carries `source`, or `None` for `UNKNOWN` / `LOCAL` (use the peer's address).
#[allow(clippy::type_complexity)]
pub fn parse_proxy_header(buf: &[u8]) -> Result<Option<(usize, Option<SocketAddr>)>, ProxyError> {
    let n = buf.len().min(12);
    if buf[..n] == V2_SIGNATURE[..n] && (n == 12 || !buf.starts_with(b"PROXY")) {
        return if n < 12 { Ok(None) } else { parse_v2(buf) };
    }
    let m = buf.len().min(6);
    if buf[..m] != b"PROXY "[..m] {
        return Err(ProxyError::NotProxy);
    }
    parse_v1(buf)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(usize, Option<SocketAddr>)>, ProxyError> {
    // The CRLF must be within the first 107 octets: searching further would accept, from a
    // buffer, a line that a reader getting the bytes one at a time has already refused.
    let Some(end) = buf[..buf.len().min(V1_MAX)].windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX { Err(ProxyError::BadV1("longer than 107 octets")) } else { Ok(None) };
    };
    let line = std::str::from_utf8(&buf[..end]).map_err(|_| ProxyError::BadV1("not text"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let source = match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => None,
        ["PROXY", proto @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| ProxyError::BadV1("bad source address"))?;
            if ip.is_ipv4() != (*proto == "TCP4") {
                return Err(ProxyError::BadV1("address family mismatch"));
            }
            let port: u16 = sport.parse().map_err(|_| ProxyError::BadV1("bad source port"))?;
            Some(SocketAddr::new(ip, port))
        }
        _ => return Err(ProxyError::BadV1("expected PROXY TCP4|TCP6 src dst sport dport")),
    };
    Ok(Some((end + 2, source)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(usize, Option<SocketAddr>)>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let (ver_cmd, family) = (buf[12], buf[13]);
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadV2("version is not 2"));
    }
    if 16 + len > PROXY_HEADER_MAX {
        return Err(ProxyError::BadV2("too long"));
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let source = match ver_cmd & 0x0f {
        0 => None, // LOCAL: health checks from the proxy itself
        1 => match family {
            0x11 if len >= 12 => {
                let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                Some(SocketAddr::new(ip.into(), u16::from_be_bytes([body[8], body[9]])))
            }
            0x21 if len >= 36 => {
                let octets: [u8; 16] = body[..16].try_into().expect("16 octets");
                Some(SocketAddr::new(Ipv6Addr::from(octets).into(), u16::from_be_bytes([body[32], body[33]])))
            }
            0x00 => None,
            _ => return Err(ProxyError::BadV2("unsupported family or short address block")),
        },
        _ => return Err(ProxyError::BadV2("unknown command")),
    };
    Ok(Some((16 + len, source)))
}

/// Renders a v2 PROXY (TCP) header for `source` → `dest` (clients, tests, the simulation).
pub fn proxy_v2_header(source: SocketAddr, dest: SocketAddr) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(0x21);
    match (source, dest) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.extend_from_slice(&[0x11, 0, 12]);
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&[0x21, 0, 36]);
            out.extend_from_slice(&v6(source).octets());
            out.extend_from_slice(&v6(dest).octets());
            out.extend_from_slice(&source.port().to_be_bytes());
            out.extend_from_slice(&dest.port().to_be_bytes());
        }
    }
    out
}

/// A PROXY v2 `LOCAL` header (no addresses), as a load balancer sends on its own health
/// checks: the connection is the proxy's, not a client's.
pub fn proxy_v2_local_header() -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[0x20, 0x00, 0, 0]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO x\r\n";
        assert_eq!(parse_proxy_header(h), Ok(Some((44, Some("192.0.2.7:40000".parse().unwrap())))));
        assert_eq!(
            parse_proxy_header(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 25\r\n").unwrap().unwrap().1,
            Some("[2001:db8::1]:1".parse().unwrap())
        );
        assert_eq!(parse_proxy_header(b"PROXY UNKNOWN\r\n"), Ok(Some((15, None))));
        assert_eq!(parse_proxy_header(b"PROXY TCP4 192.0.2.7"), Ok(None));
        assert_eq!(parse_proxy_header(b"PRO"), Ok(None));
        assert!(parse_proxy_header(b"PROXY TCP4 2001:db8::1 1.2.3.4 1 2\r\n").is_err());
        assert_eq!(parse_proxy_header(b"EHLO x\r\n"), Err(ProxyError::NotProxy));
        assert!(parse_proxy_header(&[b'P'; 200]).is_err());
    }

    #[test]
    fn v1_line_is_at_most_107_octets() {
        let line = |len: usize| {
            let mut h = b"PROXY UNKNOWN ".to_vec();
            h.resize(len - 2, b'x');
            h.extend_from_slice(b"\r\nEHLO x\r\n");
            h
        };
        assert_eq!(parse_proxy_header(&line(V1_MAX)), Ok(Some((V1_MAX, None))));
        // One octet over: refused whether the CRLF is in the buffer already or not, as the
        // server (reading byte by byte) refuses it at octet 107.
        let long = line(V1_MAX + 1);
        let too_long = Err(ProxyError::BadV1("longer than 107 octets"));
        assert_eq!(parse_proxy_header(&long[..V1_MAX]), too_long);
        assert_eq!(parse_proxy_header(&long), too_long);
    }

    #[test]
    fn v2_round_trip_and_every_prefix_is_incomplete() {
        for (s, d) in [("192.0.2.9:1234", "198.51.100.1:25"), ("[2001:db8::9]:1234", "[2001:db8::1]:25")] {
            let (s, d): (SocketAddr, SocketAddr) = (s.parse().unwrap(), d.parse().unwrap());
            let h = proxy_v2_header(s, d);
            assert_eq!(parse_proxy_header(&h), Ok(Some((h.len(), Some(s)))));
            for i in 1..h.len() {
                assert_eq!(parse_proxy_header(&h[..i]), Ok(None), "prefix {i}");
            }
        }
        assert_eq!(parse_proxy_header(&proxy_v2_local_header()), Ok(Some((16, None))));
        let mut bad = V2_SIGNATURE.to_vec();
        bad.extend_from_slice(&[0x31, 0x11, 0, 12]);
        assert!(parse_proxy_header(&bad).is_err());
    }
}
