//! The Postfix policy protocol receiver on arbitrary bytes (impl/src/front/policy.rs).
//!
//! Invariants besides "no panic":
//! - the events do not depend on how the bytes are split into reads (whole, one octet at a
//!   time, and split at the first input octet's value);
//! - every well-formed request re-encodes to bytes that decode to the same request;
//! - a malformed request is answered and the connection goes on: what follows the malformed
//!   request's empty line decodes as it would alone.

#![no_main]

use gatekeeper::front::policy::{PolicyEvent, PolicyReceiver};
use libfuzzer_sys::fuzz_target;

fn all(chunks: &[&[u8]]) -> Vec<PolicyEvent> {
    let mut rx = PolicyReceiver::new();
    let mut out = Vec::new();
    for chunk in chunks {
        let mut input = *chunk;
        while let Some(e) = rx.next(&mut input) {
            out.push(e);
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
    for event in &whole {
        if let PolicyEvent::Request(r) = event {
            assert_eq!(all(&[&r.encode()]), vec![PolicyEvent::Request(r.clone())], "decode(encode(r)) != r");
        }
    }
});
