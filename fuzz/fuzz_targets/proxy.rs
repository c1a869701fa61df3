//! The PROXY protocol v1/v2 header parser on arbitrary bytes.
//!
//! Invariants besides "no panic":
//! - a complete header is at most `PROXY_HEADER_MAX` octets (a v1 line at most 107) and lies
//!   within the input;
//! - the parser agrees with itself when the same bytes arrive one at a time, as the server's
//!   `read_proxy_header` feeds them: the verdict on the whole input is the first decisive
//!   verdict (a header or an error) of its prefixes, and `Ok(None)` only while no prefix
//!   decided;
//! - `proxy_v2_header` renders headers that parse back to their source address.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use gatekeeper::proto::{PROXY_HEADER_MAX, parse_proxy_header, proxy_v2_header};
use libfuzzer_sys::fuzz_target;

/// Longest PROXY v1 line including CRLF (the protocol's own limit).
const V1_MAX: usize = 107;

fuzz_target!(|data: &[u8]| {
    let whole = parse_proxy_header(data);
    if let Ok(Some((len, _))) = whole {
        assert!(len <= data.len(), "header length {len} beyond the input ({})", data.len());
        assert!(len <= PROXY_HEADER_MAX, "header of {len} octets");
        if data.starts_with(b"PROXY ") {
            assert!(len <= V1_MAX, "PROXY v1 header of {len} octets accepted");
        }
    }
    if let Ok(None) = whole {
        assert!(data.len() < PROXY_HEADER_MAX, "still incomplete after {} octets", data.len());
    }

    // Byte by byte, as the server reads it: the first decisive prefix decides.
    let mut decided = None;
    for k in 0..=data.len().min(PROXY_HEADER_MAX + 1) {
        match parse_proxy_header(&data[..k]) {
            Ok(None) => continue,
            other => {
                decided = Some((k, other));
                break;
            }
        }
    }
    match decided {
        None => assert_eq!(whole, Ok(None), "every prefix incomplete but the whole input decided"),
        Some((k, Ok(Some(header)))) => {
            assert_eq!(header.0, k, "header ends where the stream saw it end");
            assert_eq!(whole, Ok(Some(header)), "bytes after a complete header changed it");
        }
        Some((k, Err(e))) => {
            assert!(whole.is_err(), "prefix of {k} octets is an error ({e}) but the whole input gives {whole:?}");
        }
        Some((_, Ok(None))) => unreachable!(),
    }

    // Rendering: v2 headers for addresses taken from the input parse back.
    if data.len() >= 36 {
        let port = |i: usize| u16::from_be_bytes([data[i], data[i + 1]]);
        let v4 = |i: usize| IpAddr::V4(Ipv4Addr::new(data[i], data[i + 1], data[i + 2], data[i + 3]));
        let v6 = |i: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&data[i..i + 16]).unwrap()));
        let (src, dst) = match data[0] & 3 {
            0 => (SocketAddr::new(v4(1), port(5)), SocketAddr::new(v4(7), port(11))),
            1 => (SocketAddr::new(v6(1), port(17)), SocketAddr::new(v6(19), port(34))),
            2 => (SocketAddr::new(v4(1), port(5)), SocketAddr::new(v6(7), port(23))),
            _ => (SocketAddr::new(v6(1), port(17)), SocketAddr::new(v4(19), port(23))),
        };
        let header = proxy_v2_header(src, dst);
        let want = match (src, dst) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => src,
            _ => match src.ip() {
                IpAddr::V4(a) => SocketAddr::new(a.to_ipv6_mapped().into(), src.port()),
                IpAddr::V6(_) => src,
            },
        };
        assert_eq!(parse_proxy_header(&header), Ok(Some((header.len(), Some(want)))));
        let mut followed = header.clone();
        followed.extend_from_slice(&data[36..]);
        assert_eq!(parse_proxy_header(&followed), Ok(Some((header.len(), Some(want)))));
    }
});
