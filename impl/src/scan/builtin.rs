//! The built-in scanner ([`BuiltinScanner`]): EICAR and the configured literal signatures,
//! searched in the raw message and inside its base64-encoded MIME parts (found and decoded by
//! [`super::mime`]). It is the embedded default and the simulation's scanner.
//!
//! It owns the signatures' matching (Knuth–Morris–Pratt, linear on any input) and the bounds of
//! one scan: how deep base64 nests, how many parts and octets are decoded. It must stay
//! deterministic (the same message always gives the same answer) and must not read a clock
//! except the injected [`Clock`], nor block the runtime with a big message in production
//! (`offload`).

use std::sync::Arc;

use bytes::Bytes;

use super::mime::{base64_bodies, decode_base64};
use super::{ScanResult, ScanStats, record};
use crate::edges::{BoxFuture, Clock, Scanner};
use crate::policy::ScanOutcome;

/// The EICAR anti-virus test file (<https://www.eicar.org/download-anti-malware-testfile/>).
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// The name the builtin scanner reports for [`EICAR`] (ClamAV's name for it).
pub const EICAR_NAME: &str = "Eicar-Test-Signature";

/// Most MIME parts the builtin scanner decodes per message.
const PARTS_MAX: usize = 1000;
/// Deepest nesting of base64 inside base64 the builtin scanner follows.
const DEPTH_MAX: usize = 4;
/// Above this size the production builtin scanner scans on the blocking pool.
const OFFLOAD_ABOVE: usize = 256 * 1024;

/// A literal signature with its Knuth–Morris–Pratt table: linear time on any input, so a
/// message full of near-matches cannot make a scan quadratic.
#[derive(Debug, Clone)]
struct Signature {
    name: String,
    pattern: Vec<u8>,
    fallback: Vec<usize>,
}

impl Signature {
    fn new(name: &str, pattern: Vec<u8>) -> Self {
        assert!(!pattern.is_empty(), "empty signature");
        let mut fallback = vec![0; pattern.len()];
        let mut k = 0;
        for i in 1..pattern.len() {
            while k > 0 && pattern[i] != pattern[k] {
                k = fallback[k - 1];
            }
            if pattern[i] == pattern[k] {
                k += 1;
            }
            fallback[i] = k;
        }
        Signature { name: name.to_string(), pattern, fallback }
    }

    fn is_in(&self, hay: &[u8]) -> bool {
        let mut k = 0;
        for &b in hay {
            while k > 0 && b != self.pattern[k] {
                k = self.fallback[k - 1];
            }
            if b == self.pattern[k] {
                k += 1;
                if k == self.pattern.len() {
                    return true;
                }
            }
        }
        false
    }
}

/// Detects EICAR and configured literal signatures, in the raw message and inside its
/// base64-encoded MIME parts (decoded, nested up to a few levels, within a decode budget).
/// Deterministic: the same message always gives the same answer; the first signature in
/// configuration order (EICAR first) wins.
#[derive(Debug)]
pub struct BuiltinScanner {
    signatures: Arc<[Signature]>,
    decode_max: usize,
    offload: bool,
    clock: Arc<dyn Clock>,
    stats: ScanStats,
}

impl BuiltinScanner {
    /// A scanner that knows EICAR; scans inline (as the simulation needs).
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        BuiltinScanner {
            signatures: Arc::from(vec![Signature::new(EICAR_NAME, EICAR.to_vec())]),
            decode_max: 64 * 1024 * 1024,
            offload: false,
            clock,
            stats: ScanStats::default(),
        }
    }

    /// Adds a literal signature (checked after the ones before it).
    ///
    /// # Panics
    /// On an empty pattern; [`ScanConfig::problems`] refuses those from configuration.
    pub fn with_signature(mut self, name: &str, pattern: impl Into<Vec<u8>>) -> Self {
        let mut all = self.signatures.to_vec();
        all.push(Signature::new(name, pattern.into()));
        self.signatures = Arc::from(all);
        self
    }

    /// With `true`, messages over 256 KiB are scanned on tokio's blocking pool (production);
    /// with `false` (the default), inline (the simulation, which has no real threads).
    pub fn offload(mut self, offload: bool) -> Self {
        self.offload = offload;
        self
    }

    /// Most octets decoded from base64 parts per message (default 64 MiB); parts beyond it are
    /// not looked into.
    pub fn decode_max(mut self, octets: usize) -> Self {
        self.decode_max = octets;
        self
    }

    /// The counters.
    pub fn stats(&self) -> &ScanStats {
        &self.stats
    }

    /// The first signature found in `message`, if any. Pure; no event, no counters.
    pub fn check(&self, message: &[u8]) -> Option<String> {
        check(&self.signatures, message, self.decode_max)
    }
}

fn check(signatures: &[Signature], message: &[u8], decode_max: usize) -> Option<String> {
    let mut budget = decode_max;
    let mut parts = PARTS_MAX;
    check_in(signatures, message, 0, &mut budget, &mut parts).map(str::to_string)
}

fn check_in<'s>(
    signatures: &'s [Signature],
    data: &[u8],
    depth: usize,
    budget: &mut usize,
    parts: &mut usize,
) -> Option<&'s str> {
    if let Some(s) = signatures.iter().find(|s| s.is_in(data)) {
        return Some(&s.name);
    }
    if depth >= DEPTH_MAX {
        return None;
    }
    for range in base64_bodies(data, *parts) {
        if *parts == 0 || *budget == 0 {
            break;
        }
        *parts -= 1;
        let decoded = decode_base64(&data[range], *budget);
        *budget -= decoded.len();
        if let Some(name) = check_in(signatures, &decoded, depth + 1, budget, parts) {
            return Some(name);
        }
    }
    None
}

impl Scanner for BuiltinScanner {
    fn scan(&self, message: Bytes) -> BoxFuture<'_, ScanOutcome> {
        Box::pin(async move {
            let start = self.clock.now();
            let found = if self.offload && message.len() > OFFLOAD_ABOVE {
                let (signatures, decode_max, m) = (self.signatures.clone(), self.decode_max, message.clone());
                match tokio::task::spawn_blocking(move || check(&signatures, &m, decode_max)).await {
                    Ok(found) => Ok(found),
                    Err(e) => Err(format!("builtin scan task failed: {e}")),
                }
            } else {
                Ok(check(&self.signatures, &message, self.decode_max))
            };
            let (result, outcome) = match found {
                Ok(None) => (ScanResult::Clean, ScanOutcome::Clean),
                Ok(Some(signature)) => (ScanResult::Infected, ScanOutcome::Infected { signature }),
                Err(reason) => (ScanResult::Failed, ScanOutcome::Failed { reason }),
            };
            let elapsed = self.clock.now().saturating_duration_since(start);
            record(&self.stats, "builtin", message.len(), elapsed, result, &outcome);
            outcome
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::scan::fixtures::{attachment, base64, clock};

    #[test]
    fn eicar_inline_and_in_attachments() {
        let s = BuiltinScanner::new(clock());
        assert_eq!(s.check(b"Subject: hi\r\n\r\nhello\r\n"), None);
        let inline = [b"Subject: x\r\n\r\nbefore ".as_slice(), EICAR, b" after\r\n"].concat();
        assert_eq!(s.check(&inline).as_deref(), Some(EICAR_NAME));
        assert_eq!(s.check(&attachment(EICAR)).as_deref(), Some(EICAR_NAME));
        assert_eq!(s.check(&attachment(b"harmless attachment")), None);
        // A whole message encoded as base64 (single part).
        let single = format!("Content-Transfer-Encoding: BASE64\r\n\r\n{}\r\n", base64(EICAR));
        assert_eq!(s.check(single.as_bytes()).as_deref(), Some(EICAR_NAME));
        // An attachment that is itself a message with a base64 attachment, base64-encoded.
        let nested = format!(
            "Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\nContent-Type: message/rfc822\r\n\r\n\
             Subject: inner\r\nContent-Type: multipart/mixed; boundary=i\r\n\r\n--i\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--i--\r\n--o--\r\n",
            base64(&attachment(EICAR))
        );
        assert_eq!(s.check(nested.as_bytes()).as_deref(), Some(EICAR_NAME));
    }

    #[test]
    fn configured_signatures_in_order() {
        let s = BuiltinScanner::new(clock())
            .with_signature("Local.Test-1", b"evil-payload-1".to_vec())
            .with_signature("Local.Binary", vec![0, 1, 2, 3, 4, 5, 6, 7, 0xff]);
        assert_eq!(s.check(b"x evil-payload-1 y").as_deref(), Some("Local.Test-1"));
        assert_eq!(s.check(&attachment(&[9, 0, 1, 2, 3, 4, 5, 6, 7, 0xff, 9])).as_deref(), Some("Local.Binary"));
        let both = [b"evil-payload-1 ".as_slice(), EICAR].concat();
        assert_eq!(s.check(&both).as_deref(), Some(EICAR_NAME), "EICAR comes first");
        assert_eq!(s.check(b"evil-payload-"), None);
    }

    #[test]
    fn kmp_finds_overlapping_prefixes() {
        let sig = Signature::new("t", b"aab".to_vec());
        assert!(sig.is_in(b"aaab"));
        assert!(!sig.is_in(b"abab"));
        let sig = Signature::new("t", b"abcabd".to_vec());
        assert!(sig.is_in(b"abcabcabd"));
        // Near-misses of EICAR everywhere: still linear, still no match.
        let hay: Vec<u8> = EICAR[..67].iter().copied().cycle().take(2_000_000).collect();
        assert_eq!(BuiltinScanner::new(clock()).check(&hay), None);
    }

    #[test]
    fn decoding_is_bounded() {
        let s = BuiltinScanner::new(clock()).decode_max(10);
        assert_eq!(s.check(&attachment(EICAR)), None, "EICAR lies beyond the decode budget");
        // Many parts: only PARTS_MAX are decoded, and the walk stays linear.
        let mut many = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n".to_vec();
        for _ in 0..PARTS_MAX + 5 {
            many.extend_from_slice(b"--b\r\nContent-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n");
        }
        many.extend_from_slice(
            format!("--b\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n", base64(EICAR)).as_bytes(),
        );
        assert_eq!(BuiltinScanner::new(clock()).check(&many), None);
        assert_eq!(base64_bodies(&many, 3).len(), 3);
    }

    #[tokio::test]
    async fn builtin_scan_outcomes_and_stats() {
        let s = BuiltinScanner::new(clock()).offload(true);
        assert_eq!(s.scan(Bytes::from_static(b"Subject: hi\r\n\r\nhello\r\n")).await, ScanOutcome::Clean);
        let mut big = vec![b'a'; OFFLOAD_ABOVE + 1];
        big.extend_from_slice(EICAR);
        assert_eq!(s.scan(Bytes::from(big)).await, ScanOutcome::Infected { signature: EICAR_NAME.into() });
        assert_eq!(s.stats().clean.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats().infected.load(Ordering::Relaxed), 1);
    }
}
