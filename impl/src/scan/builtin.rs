//! The built-in scanner ([`BuiltinScanner`]): EICAR and the configured literal signatures,
//! searched in the raw message and inside its base64-encoded MIME parts (found and decoded by
//! [`super::mime`]). It is the embedded default and the simulation's scanner.
//!
//! It owns the signatures' matching (Knuth–Morris–Pratt, linear on any input, and resumable, so
//! a message is searched as it is read from its file in chunks, never whole in memory) and the
//! bounds of one scan: how deep base64 nests, how many parts and octets are decoded. It must
//! stay deterministic (the same message always gives the same answer, however it is read) and
//! must not read a clock except the injected [`Clock`], nor block the runtime with a big
//! message in production (`offload`).

use std::io::Read;
use std::sync::Arc;

use super::mime::{Base64Decoder, MimeWalk, Part};
use super::{ScanResult, ScanStats, record};
use crate::edges::{BoxFuture, Clock, Content, MessageFile, Scanner};
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
const OFFLOAD_ABOVE: u64 = 256 * 1024;
/// Octets read from the message file at a time.
const READ_CHUNK: usize = 64 * 1024;

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

    /// Goes on from state `k` (octets of the pattern matched so far) over `hay`: the new
    /// state, or `None` once the whole pattern matched.
    fn advance(&self, mut k: usize, hay: &[u8]) -> Option<usize> {
        for &b in hay {
            while k > 0 && b != self.pattern[k] {
                k = self.fallback[k - 1];
            }
            if b == self.pattern[k] {
                k += 1;
                if k == self.pattern.len() {
                    return None;
                }
            }
        }
        Some(k)
    }

    #[cfg(test)]
    fn is_in(&self, hay: &[u8]) -> bool {
        self.advance(0, hay).is_none()
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
        let mut search = Search::new(&self.signatures, self.decode_max);
        search.feed(message);
        search.finish()
    }
}

/// What one scan may still decode, shared by every level.
#[derive(Debug)]
struct Budget {
    /// Octets.
    octets: usize,
    /// Base64 parts.
    parts: usize,
}

/// A scan of one message fed in chunks: the signatures searched in its octets and, nested, in
/// the decoding of its base64 parts. The answer is what a search of the whole message in one
/// piece gives: the first signature in configuration order found in the message itself, else
/// the first part (in order) with a finding, by the same rule inside it. The decode budget
/// counts every octet decoded at any depth, in the order they are decoded.
#[derive(Debug)]
struct Search<'s> {
    signatures: &'s [Signature],
    budget: Budget,
    top: Level,
}

impl<'s> Search<'s> {
    fn new(signatures: &'s [Signature], decode_max: usize) -> Self {
        let budget = Budget { octets: decode_max, parts: PARTS_MAX };
        Search { signatures, budget, top: Level::new(signatures, 0) }
    }

    fn feed(&mut self, chunk: &[u8]) {
        self.top.feed(self.signatures, chunk, &mut self.budget);
    }

    fn finish(mut self) -> Option<String> {
        self.top.finish(self.signatures, &mut self.budget).map(|i| self.signatures[i].name.clone())
    }

    /// Reads `content` to its end in chunks and searches it. The buffer is no bigger than the
    /// message: a zeroed 64 KiB for a 1 KiB message was a fifth of an accepted session's
    /// instructions (issue 18, callgrind).
    fn read(&mut self, content: &mut Content) -> std::io::Result<()> {
        let size = usize::try_from(content.remaining()).map_or(READ_CHUNK, |left| left.clamp(1, READ_CHUNK));
        let mut buf = vec![0u8; size];
        loop {
            let n = content.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            self.feed(&buf[..n]);
        }
    }
}

/// The search at one depth: the signatures over this level's octets, and (above
/// [`DEPTH_MAX`]) the MIME walk whose base64 parts are decoded into a nested level.
#[derive(Debug)]
struct Level {
    depth: usize,
    /// Per signature: octets of its pattern matched so far, or `None` once found.
    states: Vec<Option<usize>>,
    walk: Option<MimeWalk>,
    /// The part being decoded.
    child: Option<Box<Child>>,
    /// The first part's finding (a signature's index).
    child_found: Option<usize>,
    /// No more parts are decoded at this level (the budget ran out, or a part found one).
    parts_done: bool,
}

#[derive(Debug)]
struct Child {
    decoder: Base64Decoder,
    level: Level,
    /// Decoded octets, reused.
    out: Vec<u8>,
}

impl Level {
    fn new(signatures: &[Signature], depth: usize) -> Self {
        Level {
            depth,
            states: vec![Some(0); signatures.len()],
            walk: (depth < DEPTH_MAX).then(MimeWalk::default),
            child: None,
            child_found: None,
            parts_done: false,
        }
    }

    /// The first signature (in configuration order) found in this level's own octets.
    fn found(&self) -> Option<usize> {
        self.states.iter().position(Option::is_none)
    }

    fn feed(&mut self, signatures: &[Signature], data: &[u8], budget: &mut Budget) {
        // Only signatures before the first found can still change the answer.
        let open = self.found().unwrap_or(signatures.len());
        for (sig, state) in signatures.iter().zip(&mut self.states).take(open) {
            if let Some(k) = *state {
                *state = sig.advance(k, data);
            }
        }
        if self.found().is_some() {
            // Decided at this level: the parts cannot change the answer.
            self.parts_done = true;
            self.child = None;
        }
        let Some(mut walk) = self.walk.take() else { return };
        walk.feed(data, &mut |part| self.part(signatures, part, budget));
        self.walk = Some(walk);
    }

    fn finish(&mut self, signatures: &[Signature], budget: &mut Budget) -> Option<usize> {
        if let Some(mut walk) = self.walk.take() {
            walk.finish(&mut |part| self.part(signatures, part, budget));
        }
        self.found().or(self.child_found)
    }

    /// A base64 part of this level's octets.
    fn part(&mut self, signatures: &[Signature], part: Part<'_>, budget: &mut Budget) {
        match part {
            Part::Start => {
                if self.parts_done || budget.parts == 0 || budget.octets == 0 {
                    self.parts_done = true;
                    return;
                }
                budget.parts -= 1;
                let level = Level::new(signatures, self.depth + 1);
                self.child = Some(Box::new(Child { decoder: Base64Decoder::default(), level, out: Vec::new() }));
            }
            Part::Data(text) => {
                let Some(child) = &mut self.child else { return };
                child.out.clear();
                budget.octets -= child.decoder.decode(text, budget.octets, &mut child.out);
                let out = std::mem::take(&mut child.out);
                child.level.feed(signatures, &out, budget);
                child.out = out;
            }
            Part::End => {
                let Some(mut child) = self.child.take() else { return };
                if let Some(found) = child.level.finish(signatures, budget) {
                    self.child_found = Some(found);
                    self.parts_done = true;
                }
            }
        }
    }
}

/// Searches the message's content, read from its file in chunks.
fn check_file(signatures: &[Signature], decode_max: usize, mut content: Content) -> Result<Option<String>, String> {
    let mut search = Search::new(signatures, decode_max);
    search.read(&mut content).map_err(|e| format!("cannot read the message: {e}"))?;
    Ok(search.finish())
}

impl Scanner for BuiltinScanner {
    fn scan<'a>(&'a self, message: &'a MessageFile) -> BoxFuture<'a, ScanOutcome> {
        Box::pin(async move {
            let start = self.clock.now();
            let found = match message.content() {
                Err(e) => Err(format!("cannot read the message: {e}")),
                Ok(content) if self.offload && message.len() > OFFLOAD_ABOVE => {
                    let (signatures, decode_max) = (self.signatures.clone(), self.decode_max);
                    match tokio::task::spawn_blocking(move || check_file(&signatures, decode_max, content)).await {
                        Ok(found) => found,
                        Err(e) => Err(format!("builtin scan task failed: {e}")),
                    }
                }
                Ok(content) => check_file(&self.signatures, self.decode_max, content),
            };
            let (result, outcome) = match found {
                Ok(None) => (ScanResult::Clean, ScanOutcome::Clean),
                Ok(Some(signature)) => (ScanResult::Infected, ScanOutcome::Infected { signature }),
                Err(reason) => (ScanResult::Failed, ScanOutcome::Failed { reason }),
            };
            let elapsed = self.clock.now().saturating_duration_since(start);
            record(&self.stats, "builtin", message.len() as usize, elapsed, result, &outcome);
            outcome
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::scan::fixtures::{attachment, base64, clock};
    use crate::scan::mime::base64_bodies;

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
        assert_eq!(base64_bodies(&many, 3, 64).len(), 3);
    }

    /// The answer of a search fed in chunks of `chunk` octets.
    fn check_in_chunks(s: &BuiltinScanner, message: &[u8], chunk: usize) -> Option<String> {
        let mut search = Search::new(&s.signatures, s.decode_max);
        for c in message.chunks(chunk) {
            search.feed(c);
        }
        search.finish()
    }

    #[test]
    fn any_split_gives_the_same_answer() {
        let s = BuiltinScanner::new(clock()).with_signature("Local.Test", b"evil-payload".to_vec());
        let nested = format!(
            "Content-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\nContent-Type: message/rfc822\r\n\r\n\
             Subject: inner\r\nContent-Type: multipart/mixed; boundary=i\r\n\r\n--i\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--i--\r\n--o--\r\n",
            base64(&attachment(EICAR))
        );
        let both = [attachment(b"evil-payload"), attachment(EICAR)].concat();
        let cases: [(&[u8], Option<&str>); 5] = [
            (nested.as_bytes(), Some(EICAR_NAME)),
            (&attachment(EICAR), Some(EICAR_NAME)),
            (&attachment(b"harmless"), None),
            // Two parts with findings: the first part's answer.
            (&both, Some("Local.Test")),
            // A signature split across chunks of the raw message.
            (&[b"xx".as_slice(), EICAR, b"yy"].concat(), Some(EICAR_NAME)),
        ];
        for (message, want) in cases {
            for chunk in [1, 2, 3, 5, 17, 64, 1000, message.len()] {
                assert_eq!(check_in_chunks(&s, message, chunk).as_deref(), want, "chunks of {chunk}");
            }
        }
    }

    #[tokio::test]
    async fn builtin_scan_outcomes_and_stats() {
        let dir = tempfile::tempdir().unwrap();
        let s = BuiltinScanner::new(clock()).offload(true);
        let clean = MessageFile::with_content(dir.path(), "clean", b"Subject: hi\r\n\r\nhello\r\n").unwrap();
        assert_eq!(s.scan(&clean).await, ScanOutcome::Clean);
        // Big enough to be read in several chunks, on the blocking pool, with EICAR at the end
        // of a base64 attachment.
        let mut big = b"Subject: big\r\n\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', OFFLOAD_ABOVE as usize + 1));
        big.extend_from_slice(b"\r\n");
        big.extend_from_slice(&attachment(&[vec![0u8; 300_000], EICAR.to_vec()].concat()));
        let infected = MessageFile::with_content(dir.path(), "infected", &big).unwrap();
        assert_eq!(s.scan(&infected).await, ScanOutcome::Infected { signature: EICAR_NAME.into() });
        assert_eq!(s.stats().clean.load(Ordering::Relaxed), 1);
        assert_eq!(s.stats().infected.load(Ordering::Relaxed), 1);
        // The same inline (the simulation).
        let inline = BuiltinScanner::new(clock());
        assert_eq!(inline.scan(&infected).await, ScanOutcome::Infected { signature: EICAR_NAME.into() });
    }
}
