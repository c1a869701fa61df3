//! Client source addresses: one per session, from 127.1.0.0 up through 127.255.255.0/24,
//! skipping `.0` and `.255` in every /24 and all of 127.0.0.0/16 (127.0.0.1 is where servers
//! listen, 127.0.0.53 is often a resolver).
//!
//! The gate allows one connection per address per minute (G1), so a benchmark that wants to
//! measure sessions, not 421s, must never reuse an address within a run, nor across the runs
//! of one benchmark: [`SourceCursor`] hands out consecutive addresses, and its position can be
//! saved to a file that the next run continues from.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Addresses per /24 (`.1` to `.254`).
const PER_24: u64 = 254;
/// /24s in 127.1.0.0 to 127.255.255.0.
const BLOCKS: u64 = 255 * 256;
/// Distinct source addresses available: 16,581,120.
pub const CAPACITY: u64 = PER_24 * BLOCKS;

/// The `index`-th source address (wrapping around after [`CAPACITY`]).
pub fn source_addr(index: u64) -> Ipv4Addr {
    let i = index % CAPACITY;
    let block = i / PER_24;
    let host = (i % PER_24) as u8 + 1;
    Ipv4Addr::new(127, (1 + block / 256) as u8, (block % 256) as u8, host)
}

/// Hands out source addresses in order; shared by all the sessions of a run.
#[derive(Debug)]
pub struct SourceCursor {
    next: AtomicU64,
}

impl SourceCursor {
    /// Starts at `index`.
    pub fn new(index: u64) -> Self {
        SourceCursor { next: AtomicU64::new(index % CAPACITY) }
    }

    /// Starts where the state file says (0 if it does not exist).
    pub fn load(path: &Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(s) => Ok(Self::new(s.trim().parse().map_err(std::io::Error::other)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::new(0)),
            Err(e) => Err(e),
        }
    }

    /// Saves the position for the next run.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, format!("{}\n", self.position()))
    }

    /// The next address.
    pub fn take(&self) -> Ipv4Addr {
        source_addr(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// The index of the next address.
    pub fn position(&self) -> u64 {
        self.next.load(Ordering::Relaxed) % CAPACITY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_distinct_and_skip_reserved() {
        assert_eq!(source_addr(0), Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(source_addr(253), Ipv4Addr::new(127, 1, 0, 254));
        assert_eq!(source_addr(254), Ipv4Addr::new(127, 1, 1, 1));
        assert_eq!(source_addr(CAPACITY - 1), Ipv4Addr::new(127, 255, 255, 254));
        assert_eq!(source_addr(CAPACITY), source_addr(0));
        let mut seen = std::collections::HashSet::new();
        for i in 0..100_000 {
            let a = source_addr(i);
            assert!(a.octets()[3] != 0 && a.octets()[3] != 255 && a.octets()[1] != 0);
            assert!(seen.insert(a));
        }
    }
}
