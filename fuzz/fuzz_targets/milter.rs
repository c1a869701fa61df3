//! The milter protocol receiver on arbitrary bytes (impl/src/front/milter.rs).
//!
//! Invariants besides "no panic":
//! - the commands do not depend on how the bytes are split into reads (whole, one octet at a
//!   time, and split at the first input octet's value);
//! - every decoded command re-encodes to a packet that decodes to the same command;
//! - the receiver never holds more than one packet (`PACKET_MAX` and its length);
//! - after an error nothing more comes out.

#![no_main]

use gatekeeper::front::milter::{Command, MilterError, MilterReceiver};
use libfuzzer_sys::fuzz_target;

fn all(chunks: &[&[u8]]) -> Vec<Result<Command, MilterError>> {
    let mut rx = MilterReceiver::new();
    let mut out = Vec::new();
    for chunk in chunks {
        let mut input = *chunk;
        while let Some(c) = rx.next(&mut input) {
            out.push(c);
        }
        assert!(input.is_empty(), "the receiver takes every octet it is given");
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let whole = all(&[data]);
    let bytes: Vec<&[u8]> = data.chunks(1).collect();
    assert_eq!(all(&bytes), whole, "one octet at a time");
    let cut = data.first().map_or(0, |&b| usize::from(b).min(data.len()));
    assert_eq!(all(&[&data[..cut], &data[cut..]]), whole, "split at {cut}");
    if let Some(i) = whole.iter().position(Result::is_err) {
        assert_eq!(i, whole.len() - 1, "nothing after an error");
    }
    for cmd in whole.iter().flatten() {
        assert_eq!(all(&[&cmd.encode()]), vec![Ok(cmd.clone())], "decode(encode(c)) != c");
    }
});
