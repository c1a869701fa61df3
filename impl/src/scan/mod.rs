//! Virus scanning (rule V1) behind the [`Scanner`](crate::edges::Scanner) edge, in four rooms:
//!
//! - `config`: the `[scan]` table ([`ScanConfig`]) and the scanner it builds;
//! - `builtin`: the built-in test-signature scanner ([`BuiltinScanner`]: EICAR and literal
//!   signatures), the embedded default and the simulation's scanner;
//! - `mime`: the builtin scanner's walk to the base64-encoded MIME bodies and their decoding;
//! - `clamd`: the clamd client ([`ClamdScanner`]).
//!
//! This module holds what they share, the counters ([`ScanStats`]) and the one event per scan,
//! and re-exports their public items; it must not grow a scanner of its own.
//!
//! A scanner only reports what it found ([`ScanOutcome`]); `policy::scanned` decides the reply
//! and the ban, and the session sends it. A scanner never fails: clamd down, a timeout or a
//! garbled answer is [`ScanOutcome::Failed`]. A message larger than the scanner's stream limit
//! follows the configured oversize policy: `Failed` (tempfail) or `Clean` (accepted unscanned,
//! logged as `unscanned`). Every scan is one structured `tracing` event (`engine`, `result`,
//! `signature`, `reason`, `size_bytes`, `duration_ms`), with durations from the injected
//! [`Clock`](crate::edges::Clock), never from `Instant::now()`.
//!
//! Everything is bounded: the clamd reply (a peer that never stops talking cannot grow memory),
//! the time a scan may take, the MIME parts the builtin scanner decodes and the octets it
//! decodes.

mod builtin;
mod clamd;
mod config;
mod mime;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use builtin::{BuiltinScanner, EICAR, EICAR_NAME};
pub use clamd::{CLAMD_REPLY_MAX, ClamdAddr, ClamdError, ClamdScanner, ClamdVerdict};
pub use config::{Engine, SIGNATURE_MAX_BYTES, SIGNATURE_MIN_BYTES, SIGNATURE_NAME_MAX, ScanConfig, SignatureConfig};

use crate::policy::ScanOutcome;

/// Scan counters, monotonically increasing.
#[derive(Debug, Default)]
pub struct ScanStats {
    /// Scanned, nothing found.
    pub clean: AtomicU64,
    /// Scanned, a signature matched.
    pub infected: AtomicU64,
    /// Not scanned: scanner down, timeout, bad answer, or oversize under `tempfail`.
    pub failed: AtomicU64,
    /// Over the stream limit and passed on unscanned (`on_oversize = "accept"`).
    pub unscanned: AtomicU64,
}

impl ScanStats {
    fn count(&self, result: ScanResult) {
        let counter = match result {
            ScanResult::Clean => &self.clean,
            ScanResult::Infected => &self.infected,
            ScanResult::Failed => &self.failed,
            ScanResult::Unscanned => &self.unscanned,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanResult {
    Clean,
    Infected,
    Failed,
    Unscanned,
}

impl ScanResult {
    fn as_str(self) -> &'static str {
        match self {
            ScanResult::Clean => "clean",
            ScanResult::Infected => "infected",
            ScanResult::Failed => "failed",
            ScanResult::Unscanned => "unscanned",
        }
    }
}

/// Counts and logs one scan: the one structured event per scan.
fn record(
    stats: &ScanStats,
    engine: &'static str,
    size: usize,
    elapsed: Duration,
    result: ScanResult,
    outcome: &ScanOutcome,
) {
    stats.count(result);
    let (signature, reason) = match outcome {
        ScanOutcome::Clean => (None, None),
        ScanOutcome::Infected { signature } => (Some(signature.as_str()), None),
        ScanOutcome::Failed { reason } => (None, Some(reason.as_str())),
    };
    let duration_ms = elapsed.as_micros() as f64 / 1000.0; // to the microsecond
    let warn = matches!(result, ScanResult::Failed | ScanResult::Unscanned);
    let result = result.as_str();
    if warn {
        tracing::warn!(engine, result, signature, reason, size_bytes = size, duration_ms, "scan");
    } else {
        tracing::info!(engine, result, signature, reason, size_bytes = size, duration_ms, "scan");
    }
}

/// Test inputs shared by the scanners' tests: base64 as a mail client writes it, and a message
/// with an attachment.
#[cfg(test)]
mod fixtures {
    use std::sync::Arc;

    use crate::edges::{Clock, SystemClock};

    /// The real clock (scan durations are only logged).
    pub(super) fn clock() -> Arc<dyn Clock> {
        Arc::new(SystemClock)
    }

    /// `data` in base64, in 76-column lines.
    pub(super) fn base64(data: &[u8]) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for (i, chunk) in data.chunks(3).enumerate() {
            if i > 0 && i % 19 == 0 {
                out.push_str("\r\n"); // 76-column lines, RFC 2045 §6.8
            }
            let n = chunk.iter().enumerate().fold(0u32, |acc, (j, b)| acc | u32::from(*b) << (16 - 8 * j));
            for j in 0..4 {
                if j <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * j) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// A multipart message with `content` as a base64-encoded attachment (its encoding header
    /// folded).
    pub(super) fn attachment(content: &[u8]) -> Vec<u8> {
        format!(
            "From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n\
             preamble\r\n--XX\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--XX\r\n\
             Content-Type: application/octet-stream; name=\"e.com\"\r\nContent-Transfer-Encoding:\r\n\tbase64\r\n\
             Content-Disposition: attachment\r\n\r\n{}\r\n--XX--\r\n",
            base64(content)
        )
        .into_bytes()
    }
}
