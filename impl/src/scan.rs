//! Virus scanning (rule V1) behind the [`Scanner`] edge: a clamd client ([`ClamdScanner`]), the
//! built-in test-signature scanner ([`BuiltinScanner`], the embedded default and the
//! simulation's scanner), and their configuration ([`ScanConfig`], the `[scan]` table).
//!
//! A scanner only reports what it found ([`ScanOutcome`]); `policy::scanned` decides the reply
//! and the ban, and the session sends it. A scanner never fails: clamd down, a timeout or a
//! garbled answer is [`ScanOutcome::Failed`]. A message larger than the scanner's stream limit
//! follows the configured oversize policy: `Failed` (tempfail) or `Clean` (accepted unscanned,
//! logged as `unscanned`). Every scan is one structured `tracing` event (`engine`, `result`,
//! `signature`, `reason`, `size_bytes`, `duration_ms`), with durations from the injected
//! [`Clock`], never from `Instant::now()`.
//!
//! Everything is bounded: the clamd reply (a peer that never stops talking cannot grow memory),
//! the time a scan may take, the MIME parts the builtin scanner decodes and the octets it
//! decodes.

use std::fmt;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::edges::{BoxFuture, Clock, Scanner};
use crate::policy::{OnScanFailure, ScanOutcome};

/// The EICAR anti-virus test file (<https://www.eicar.org/download-anti-malware-testfile/>).
pub const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// The name the builtin scanner reports for [`EICAR`] (ClamAV's name for it).
pub const EICAR_NAME: &str = "Eicar-Test-Signature";

/// Longest clamd reply we read. Real replies are `stream: <name> FOUND` with a name well under
/// 200 octets; anything longer is a broken or hostile peer.
pub const CLAMD_REPLY_MAX: usize = 1024;

/// Longest signature name accepted from clamd or the configuration (it goes into the SMTP
/// reply text, RFC 5321 §4.5.3.1.5 limits a reply line to 512 octets).
pub const SIGNATURE_NAME_MAX: usize = 200;

/// Shortest configured literal signature: a shorter one would match innocent mail and ban its
/// sender (B3).
pub const SIGNATURE_MIN_BYTES: usize = 8;

/// Longest configured literal signature.
pub const SIGNATURE_MAX_BYTES: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Which scanner serves rule V1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// [`BuiltinScanner`]: EICAR and the configured literal signatures.
    #[default]
    Builtin,
    /// [`ClamdScanner`]: a clamd daemon.
    Clamd,
}

/// `[scan]`: the scanner behind rule V1 (switched on by `rules.scan`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScanConfig {
    /// `builtin` (EICAR and `signatures`) or `clamd`.
    pub engine: Engine,
    /// Where clamd listens: `tcp:HOST:PORT` or `unix:/PATH`.
    pub clamd: String,
    /// Longest a whole scan may take (connect, send, answer); beyond it the scan failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest message sent to clamd, in octets: set it to clamd's `StreamMaxLength` or below.
    /// A larger message follows `on_oversize`, and so does clamd's own size-limit error.
    pub stream_max: u64,
    /// A message over the limit: `tempfail` (451 4.7.0) or `accept` (delivered unscanned,
    /// logged). Unset: as `rules.on_scan_failure`.
    pub on_oversize: Option<OnScanFailure>,
    /// Literal signatures for the builtin engine, besides EICAR.
    pub signatures: Vec<SignatureConfig>,
}

impl Default for ScanConfig {
    fn default() -> Self {
        ScanConfig {
            engine: Engine::Builtin,
            clamd: "unix:/run/clamav/clamd.ctl".into(),
            timeout: Duration::from_secs(30),
            // Matches smtp.size_max's default; clamd's own StreamMaxLength defaults to 100M.
            stream_max: 25 * 1024 * 1024,
            on_oversize: None,
            signatures: Vec::new(),
        }
    }
}

/// One literal signature of the builtin engine: a name and the bytes, as `text` or `hex`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureConfig {
    /// Reported as the signature (`554 5.7.1 … (NAME)` and the ban's evidence).
    pub name: String,
    /// The bytes, as UTF-8 text.
    pub text: Option<String>,
    /// The bytes, as hex digits (for binary patterns).
    pub hex: Option<String>,
}

impl SignatureConfig {
    /// The pattern's bytes, or what is wrong with it.
    pub fn pattern(&self) -> Result<Vec<u8>, String> {
        let bytes = match (&self.text, &self.hex) {
            (Some(t), None) => t.as_bytes().to_vec(),
            (None, Some(h)) => parse_hex(h)?,
            _ => return Err("give exactly one of `text` and `hex`".into()),
        };
        if bytes.len() < SIGNATURE_MIN_BYTES {
            return Err(format!("at least {SIGNATURE_MIN_BYTES} bytes, or it matches innocent mail"));
        }
        if bytes.len() > SIGNATURE_MAX_BYTES {
            return Err(format!("at most {SIGNATURE_MAX_BYTES} bytes"));
        }
        Ok(bytes)
    }
}

fn parse_hex(h: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = h.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return Err("hex: odd number of digits".into());
    }
    digits
        .chunks(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).map_err(|_| "hex: not hex digits".to_string())?;
            u8::from_str_radix(s, 16).map_err(|_| format!("hex: {s:?} is not a hex byte"))
        })
        .collect()
}

fn valid_signature_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= SIGNATURE_NAME_MAX && name.bytes().all(|b| b.is_ascii_graphic())
}

impl ScanConfig {
    /// Every problem, each naming its field relative to `[scan]` (the caller adds `scan.`).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let (Engine::Clamd, Err(e)) = (self.engine, self.clamd.parse::<ClamdAddr>()) {
            problems.push(format!("clamd: {e}"));
        }
        if self.timeout.is_zero() {
            problems.push("timeout: must be longer than 0s".into());
        }
        if self.stream_max == 0 {
            problems.push("stream_max: must be at least 1 octet".into());
        }
        if self.engine == Engine::Clamd && !self.signatures.is_empty() {
            problems.push("signatures: only the builtin engine uses them; clamd has its own databases".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, s) in self.signatures.iter().enumerate() {
            if !valid_signature_name(&s.name) {
                problems.push(format!(
                    "signatures[{i}].name: {:?} must be 1 to {SIGNATURE_NAME_MAX} printable ASCII characters without spaces",
                    s.name
                ));
            } else if !names.insert(s.name.as_str()) || s.name == EICAR_NAME {
                problems.push(format!("signatures[{i}].name: {:?} is used twice", s.name));
            }
            if let Err(e) = s.pattern() {
                problems.push(format!("signatures[{i}]: {e}"));
            }
        }
        problems
    }

    /// What a message over the stream limit gets, given `rules.on_scan_failure`.
    pub fn on_oversize(&self, on_scan_failure: OnScanFailure) -> OnScanFailure {
        self.on_oversize.unwrap_or(on_scan_failure)
    }

    /// The scanner this configuration describes. `on_scan_failure` is `rules.on_scan_failure`
    /// (the default of `on_oversize`). Fails only on a configuration with [`Self::problems`].
    pub fn build(&self, on_scan_failure: OnScanFailure, clock: Arc<dyn Clock>) -> Result<Arc<dyn Scanner>, String> {
        Ok(match self.engine {
            Engine::Builtin => Arc::new(self.builtin(clock)?),
            Engine::Clamd => Arc::new(self.clamd(on_scan_failure, clock)?),
        })
    }

    /// [`Self::build`] for a server that is starting: a clamd gets one health check (`PING`),
    /// logged. One that does not answer yet is no reason to refuse to start: scans fail (and
    /// tempfail, by default) until it does.
    pub async fn start(
        &self,
        on_scan_failure: OnScanFailure,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<dyn Scanner>, String> {
        if self.engine != Engine::Clamd {
            return self.build(on_scan_failure, clock);
        }
        let clamd = self.clamd(on_scan_failure, clock)?;
        match clamd.ping().await {
            Ok(()) => tracing::info!(clamd = %clamd.addr(), "clamd answers PING"),
            Err(e) => {
                tracing::warn!(clamd = %clamd.addr(), error = %e, "clamd does not answer PING; scans fail until it does")
            }
        }
        Ok(Arc::new(clamd))
    }

    /// The builtin scanner, with the configured signatures; offloads big messages.
    pub fn builtin(&self, clock: Arc<dyn Clock>) -> Result<BuiltinScanner, String> {
        self.check()?;
        let mut scanner = BuiltinScanner::new(clock).offload(true);
        for s in &self.signatures {
            scanner = scanner.with_signature(&s.name, s.pattern()?);
        }
        Ok(scanner)
    }

    /// The clamd client.
    pub fn clamd(&self, on_scan_failure: OnScanFailure, clock: Arc<dyn Clock>) -> Result<ClamdScanner, String> {
        self.check()?;
        Ok(ClamdScanner::new(self.clamd.parse()?, clock)
            .timeout(self.timeout)
            .stream_max(self.stream_max)
            .on_oversize(self.on_oversize(on_scan_failure)))
    }

    fn check(&self) -> Result<(), String> {
        let problems = self.problems();
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }
}

// ---------------------------------------------------------------------------------------------
// Accounting and the scan event
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Builtin scanner
// ---------------------------------------------------------------------------------------------

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

/// What the header block being read says about its body.
#[derive(Debug, Default)]
struct HeaderBlock {
    field: Field,
    encoding: Vec<u8>,
    content_type: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Field {
    #[default]
    Other,
    Encoding,
    ContentType,
}

/// Enough of a header value to tell `base64` and `message/rfc822`.
const FIELD_KEEP: usize = 64;

impl HeaderBlock {
    fn feed(&mut self, line: &[u8]) {
        let value = if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            line // a folded continuation (RFC 5322 §2.2.3)
        } else if let Some(colon) = line.iter().position(|b| *b == b':') {
            let name = line[..colon].trim_ascii();
            self.field = if name.eq_ignore_ascii_case(b"content-transfer-encoding") {
                Field::Encoding
            } else if name.eq_ignore_ascii_case(b"content-type") {
                Field::ContentType
            } else {
                Field::Other
            };
            &line[colon + 1..]
        } else {
            self.field = Field::Other;
            return;
        };
        let keep = match self.field {
            Field::Other => return,
            Field::Encoding => &mut self.encoding,
            Field::ContentType => &mut self.content_type,
        };
        let room = FIELD_KEEP.saturating_sub(keep.len());
        keep.extend(value.iter().take(room));
    }

    fn base64(&self) -> bool {
        self.encoding.trim_ascii().eq_ignore_ascii_case(b"base64")
    }

    fn rfc822(&self) -> bool {
        let t = self.content_type.trim_ascii();
        t.len() >= 14 && t[..14].eq_ignore_ascii_case(b"message/rfc822")
    }
}

/// The byte ranges of base64-encoded bodies (RFC 2045 §6.8) in a MIME message, found without a
/// full parser: every header block — the message's, each part's after a `--boundary` line, and
/// an attached `message/rfc822`'s — is read for `Content-Transfer-Encoding: base64`; the body
/// runs to the next line starting with `--` (never a base64 line: `-` is not in its alphabet).
/// Nested multiparts need no boundary bookkeeping this way. At most `max` ranges.
fn base64_bodies(data: &[u8], max: usize) -> Vec<Range<usize>> {
    enum Walk {
        Headers(HeaderBlock),
        Body { start: usize, base64: bool },
    }
    let mut out = Vec::new();
    let mut walk = Walk::Headers(HeaderBlock::default());
    let mut pos = 0;
    while pos < data.len() && out.len() < max {
        let end = data[pos..].iter().position(|b| *b == b'\n').map_or(data.len(), |i| pos + i);
        let next = (end + 1).min(data.len());
        let line = data[pos..end].strip_suffix(b"\r").unwrap_or(&data[pos..end]);
        match &mut walk {
            Walk::Headers(block) if line.is_empty() => {
                walk = if block.rfc822() && !block.base64() {
                    Walk::Headers(HeaderBlock::default())
                } else {
                    Walk::Body { start: next, base64: block.base64() }
                };
            }
            Walk::Headers(block) => block.feed(line),
            Walk::Body { start, base64 } => {
                if line.starts_with(b"--") {
                    if *base64 && *start < pos {
                        out.push(*start..pos);
                    }
                    walk = Walk::Headers(HeaderBlock::default());
                }
            }
        }
        pos = next;
    }
    if let Walk::Body { start, base64: true } = walk
        && start < data.len()
        && out.len() < max
    {
        out.push(start..data.len());
    }
    out
}

/// Decodes base64 as RFC 2045 §6.8 asks of a receiver: characters outside the alphabet are
/// ignored, `=` ends the data. At most `max` octets.
fn decode_base64(text: &[u8], max: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity((text.len() / 4 * 3).min(max));
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &c in text {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            if out.len() == max {
                break;
            }
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
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

// ---------------------------------------------------------------------------------------------
// clamd client
// ---------------------------------------------------------------------------------------------

/// Where clamd listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdAddr {
    /// `tcp:HOST:PORT` (`HOST` a name, an IPv4 address or a bracketed IPv6 address).
    Tcp(String),
    /// `unix:/PATH`: clamd's `LocalSocket`.
    Unix(PathBuf),
}

impl FromStr for ClamdAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(hostport) = s.strip_prefix("tcp:") {
            let (host, port) = hostport.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected tcp:HOST:PORT"))?;
            let host_ok = !host.is_empty()
                && (host.starts_with('[') && host.ends_with(']') || !host.contains(':'))
                && !host.contains(char::is_whitespace);
            match port.parse::<u16>() {
                Ok(p) if p > 0 && host_ok => Ok(ClamdAddr::Tcp(hostport.to_string())),
                _ => Err(format!("{s:?}: expected tcp:HOST:PORT")),
            }
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.starts_with('/') {
                Ok(ClamdAddr::Unix(PathBuf::from(path)))
            } else {
                Err(format!("{s:?}: expected unix:/ABSOLUTE/PATH"))
            }
        } else {
            Err(format!("{s:?}: expected tcp:HOST:PORT or unix:/PATH"))
        }
    }
}

impl fmt::Display for ClamdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClamdAddr::Tcp(hostport) => write!(f, "tcp:{hostport}"),
            ClamdAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// What clamd said about a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdVerdict {
    /// `stream: OK`.
    Clean,
    /// `stream: <signature> FOUND`.
    Found(String),
}

/// A clamd exchange that gave no verdict. Each is a reason to tempfail (or, by configuration,
/// to accept unscanned); none is a reason to ban.
#[derive(Debug, thiserror::Error)]
pub enum ClamdError {
    /// clamd is not listening there: it is down, starting, or the address is wrong.
    #[error("cannot connect to clamd at {addr}: {source}")]
    Connect {
        /// The configured address.
        addr: String,
        /// The OS error.
        source: io::Error,
    },
    /// The connection broke mid-exchange.
    #[error("clamd connection failed: {0}")]
    Io(#[from] io::Error),
    /// clamd gave no complete answer in time.
    #[error("clamd did not answer within {0:?}")]
    Timeout(Duration),
    /// The message is over the stream limit (ours, or clamd's `StreamMaxLength`): the
    /// oversize policy applies.
    #[error("message of {size} octets exceeds the scanner's stream limit")]
    TooLarge {
        /// The message's size.
        size: u64,
    },
    /// clamd answered with an error (`… ERROR`), e.g. a database problem.
    #[error("clamd error: {0}")]
    Scanner(String),
    /// The answer is not the clamd protocol: wrong port, or a broken peer.
    #[error("malformed clamd reply: {0}")]
    Malformed(String),
}

/// A clamd client: the `zINSTREAM` command of clamd(8) over TCP or a Unix socket, one
/// connection per scan, the whole exchange under one timeout.
#[derive(Debug)]
pub struct ClamdScanner {
    addr: ClamdAddr,
    timeout: Duration,
    stream_max: u64,
    on_oversize: OnScanFailure,
    chunk_bytes: usize,
    clock: Arc<dyn Clock>,
    stats: ScanStats,
}

impl ClamdScanner {
    /// A client of clamd at `addr`: timeout 30 s, stream limit 25 MiB, oversize → tempfail,
    /// 64 KiB chunks.
    pub fn new(addr: ClamdAddr, clock: Arc<dyn Clock>) -> Self {
        ClamdScanner {
            addr,
            timeout: Duration::from_secs(30),
            stream_max: 25 * 1024 * 1024,
            on_oversize: OnScanFailure::Tempfail,
            chunk_bytes: 64 * 1024,
            clock,
            stats: ScanStats::default(),
        }
    }

    /// Longest a whole exchange may take.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Largest message sent (clamd's `StreamMaxLength` or below).
    pub fn stream_max(mut self, octets: u64) -> Self {
        self.stream_max = octets;
        self
    }

    /// What a message over the limit gets.
    pub fn on_oversize(mut self, policy: OnScanFailure) -> Self {
        self.on_oversize = policy;
        self
    }

    /// Size of the INSTREAM chunks (at least 1).
    pub fn chunk_bytes(mut self, octets: usize) -> Self {
        self.chunk_bytes = octets.clamp(1, u32::MAX as usize);
        self
    }

    /// The address.
    pub fn addr(&self) -> &ClamdAddr {
        &self.addr
    }

    /// The counters.
    pub fn stats(&self) -> &ScanStats {
        &self.stats
    }

    /// Health check: `zPING` must be answered `PONG` within the timeout.
    pub async fn ping(&self) -> Result<(), ClamdError> {
        let exchange = async {
            let mut stream = self.connect().await?;
            stream.write_all(b"zPING\0").await?;
            stream.flush().await?;
            let reply = read_reply(&mut stream).await?;
            if reply == "PONG" { Ok(()) } else { Err(ClamdError::Malformed(printable(&reply))) }
        };
        tokio::time::timeout(self.timeout, exchange).await.unwrap_or(Err(ClamdError::Timeout(self.timeout)))
    }

    /// Scans `message` with `zINSTREAM`. Over the stream limit: [`ClamdError::TooLarge`]
    /// without contacting clamd.
    pub async fn instream(&self, message: &[u8]) -> Result<ClamdVerdict, ClamdError> {
        let size = message.len() as u64;
        if size > self.stream_max {
            return Err(ClamdError::TooLarge { size });
        }
        let exchange = async {
            let stream = self.connect().await?;
            let reply = instream_exchange(stream, message, self.chunk_bytes).await?;
            parse_reply(&reply, size)
        };
        tokio::time::timeout(self.timeout, exchange).await.unwrap_or(Err(ClamdError::Timeout(self.timeout)))
    }

    async fn connect(&self) -> Result<Connection, ClamdError> {
        let connected = match &self.addr {
            ClamdAddr::Tcp(hostport) => tokio::net::TcpStream::connect(hostport.as_str()).await.map(|s| {
                let _ = s.set_nodelay(true);
                Connection::Tcp(s)
            }),
            ClamdAddr::Unix(path) => tokio::net::UnixStream::connect(path).await.map(Connection::Unix),
        };
        connected.map_err(|source| ClamdError::Connect { addr: self.addr.to_string(), source })
    }
}

impl Scanner for ClamdScanner {
    fn scan(&self, message: Bytes) -> BoxFuture<'_, ScanOutcome> {
        Box::pin(async move {
            let start = self.clock.now();
            let (result, outcome) = match self.instream(&message).await {
                Ok(ClamdVerdict::Clean) => (ScanResult::Clean, ScanOutcome::Clean),
                Ok(ClamdVerdict::Found(signature)) => (ScanResult::Infected, ScanOutcome::Infected { signature }),
                Err(e @ ClamdError::TooLarge { .. }) => match self.on_oversize {
                    OnScanFailure::Tempfail => (ScanResult::Failed, ScanOutcome::Failed { reason: e.to_string() }),
                    OnScanFailure::Accept => (ScanResult::Unscanned, ScanOutcome::Clean),
                },
                Err(e) => (ScanResult::Failed, ScanOutcome::Failed { reason: e.to_string() }),
            };
            let elapsed = self.clock.now().saturating_duration_since(start);
            record(&self.stats, "clamd", message.len(), elapsed, result, &outcome);
            outcome
        })
    }
}

/// A connection to clamd, TCP or Unix.
#[derive(Debug)]
enum Connection {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl AsyncRead for Connection {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Connection::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Connection::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Connection::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Connection::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Sends `zINSTREAM\0`, the message in `<u32 BE length><data>` chunks and the zero-length
/// terminator, while reading the reply: clamd may answer early (size limit) and close, and
/// then the reply counts, not the broken write.
async fn instream_exchange<S>(stream: S, message: &[u8], chunk_bytes: usize) -> Result<String, ClamdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let send = async move {
        wr.write_all(b"zINSTREAM\0").await?;
        let mut frame = Vec::with_capacity(4 + chunk_bytes.min(message.len()));
        for chunk in message.chunks(chunk_bytes) {
            frame.clear();
            frame.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
            frame.extend_from_slice(chunk);
            wr.write_all(&frame).await?;
        }
        wr.write_all(&0u32.to_be_bytes()).await?;
        wr.flush().await
    };
    let recv = read_reply(&mut rd);
    tokio::pin!(send, recv);
    tokio::select! {
        biased;
        reply = &mut recv => reply,
        sent = &mut send => match sent {
            Ok(()) => recv.await,
            Err(e) => recv.await.map_err(|_| ClamdError::Io(e)),
        },
    }
}

/// Reads one NUL-terminated reply (the `z` command form), at most [`CLAMD_REPLY_MAX`] octets.
/// End of stream after some text counts as its end (old clamd versions omit the NUL on errors).
async fn read_reply<R: AsyncRead + Unpin>(rd: &mut R) -> Result<String, ClamdError> {
    let mut reply = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    loop {
        let n = rd.read(&mut buf).await?;
        if n == 0 {
            if reply.is_empty() {
                return Err(ClamdError::Malformed("connection closed without a reply".into()));
            }
            break;
        }
        if let Some(nul) = buf[..n].iter().position(|b| *b == 0) {
            reply.extend_from_slice(&buf[..nul]);
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.len() > CLAMD_REPLY_MAX {
            return Err(ClamdError::Malformed(format!("reply longer than {CLAMD_REPLY_MAX} octets")));
        }
    }
    if reply.len() > CLAMD_REPLY_MAX {
        return Err(ClamdError::Malformed(format!("reply longer than {CLAMD_REPLY_MAX} octets")));
    }
    match String::from_utf8(reply) {
        Ok(s) => Ok(s.trim_end_matches(['\n', '\r', ' ']).to_string()),
        Err(e) => {
            Err(ClamdError::Malformed(format!("not UTF-8: {}", printable(&String::from_utf8_lossy(e.as_bytes())))))
        }
    }
}

/// Interprets an INSTREAM reply.
fn parse_reply(reply: &str, size: u64) -> Result<ClamdVerdict, ClamdError> {
    if reply == "INSTREAM size limit exceeded. ERROR" {
        return Err(ClamdError::TooLarge { size });
    }
    if let Some(error) = reply.strip_suffix(" ERROR") {
        return Err(ClamdError::Scanner(printable(error)));
    }
    let Some(result) = reply.strip_prefix("stream: ") else {
        return Err(ClamdError::Malformed(printable(reply)));
    };
    if result == "OK" {
        return Ok(ClamdVerdict::Clean);
    }
    match result.strip_suffix(" FOUND") {
        Some(name) if valid_signature_name(name) => Ok(ClamdVerdict::Found(name.to_string())),
        _ => Err(ClamdError::Malformed(printable(reply))),
    }
}

/// A peer's text made safe for logs and replies: escaped, at most 100 characters.
fn printable(s: &str) -> String {
    let escaped: String = s.escape_debug().take(100).collect();
    if s.escape_debug().nth(100).is_some() { format!("{escaped}…") } else { escaped }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edges::SystemClock;
    use tokio::net::TcpListener;

    fn clock() -> Arc<dyn Clock> {
        Arc::new(SystemClock)
    }

    fn base64(data: &[u8]) -> String {
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

    fn attachment(content: &[u8]) -> Vec<u8> {
        format!(
            "From: a@example.test\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n\
             preamble\r\n--XX\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--XX\r\n\
             Content-Type: application/octet-stream; name=\"e.com\"\r\nContent-Transfer-Encoding:\r\n\tbase64\r\n\
             Content-Disposition: attachment\r\n\r\n{}\r\n--XX--\r\n",
            base64(content)
        )
        .into_bytes()
    }

    #[test]
    fn base64_round_trip() {
        for len in 0..200 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            assert_eq!(decode_base64(base64(&data).as_bytes(), usize::MAX), data);
        }
        assert_eq!(decode_base64(b"aGVsbG8gd29ybGQ=", 5), b"hello");
        assert_eq!(decode_base64(b"aGVs\r\n bG8*", usize::MAX), b"hello");
    }

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

    #[test]
    fn mime_walk_finds_only_base64_bodies() {
        let msg = attachment(b"abc");
        let ranges = base64_bodies(&msg, 10);
        assert_eq!(ranges.len(), 1);
        assert_eq!(decode_base64(&msg[ranges[0].clone()], 100), b"abc");
        assert!(base64_bodies(b"Subject: plain\r\n\r\n-- \r\nsig\r\n", 10).is_empty());
        assert!(base64_bodies(b"\xff\xfe binary without lines", 10).is_empty());
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

    #[test]
    fn config_problems() {
        assert!(ScanConfig::default().problems().is_empty());
        let cfg = ScanConfig {
            engine: Engine::Clamd,
            clamd: "localhost:3310".into(),
            timeout: Duration::ZERO,
            stream_max: 0,
            on_oversize: None,
            signatures: vec![
                SignatureConfig { name: "bad name".into(), text: Some("long enough".into()), hex: None },
                SignatureConfig { name: "Short".into(), text: Some("abc".into()), hex: None },
                SignatureConfig { name: "Both".into(), text: Some("long enough".into()), hex: Some("00".into()) },
                SignatureConfig { name: "Hex".into(), text: None, hex: Some("0g0102030405060708".into()) },
                SignatureConfig { name: "Hex".into(), text: None, hex: Some("00 01 02 03 04 05 06 07".into()) },
            ],
        };
        let p = cfg.problems().join("\n");
        for needle in [
            "clamd: \"localhost:3310\"",
            "timeout",
            "stream_max",
            "signatures: only the builtin",
            "signatures[0].name",
            "signatures[1]: at least 8",
            "signatures[2]: give exactly one",
            "signatures[3]: hex",
            "signatures[4].name: \"Hex\" is used twice",
        ] {
            assert!(p.contains(needle), "missing {needle} in:\n{p}");
        }
        assert_eq!(cfg.problems().len(), 9, "{p}");
        assert!(cfg.build(OnScanFailure::Tempfail, clock()).is_err());
    }

    #[test]
    fn clamd_addresses() {
        assert_eq!("tcp:127.0.0.1:3310".parse(), Ok(ClamdAddr::Tcp("127.0.0.1:3310".into())));
        assert_eq!("tcp:[::1]:3310".parse(), Ok(ClamdAddr::Tcp("[::1]:3310".into())));
        assert_eq!("tcp:clamav.internal:3310".parse(), Ok(ClamdAddr::Tcp("clamav.internal:3310".into())));
        assert_eq!("unix:/run/clamav/clamd.ctl".parse(), Ok(ClamdAddr::Unix("/run/clamav/clamd.ctl".into())));
        for bad in ["tcp:127.0.0.1", "tcp::3310", "tcp:h:0", "tcp:::1:3310", "unix:relative", "/run/x", ""] {
            assert!(bad.parse::<ClamdAddr>().is_err(), "{bad}");
        }
        assert_eq!(ClamdAddr::Unix("/x".into()).to_string(), "unix:/x");
    }

    #[test]
    fn replies() {
        assert_eq!(parse_reply("stream: OK", 1).unwrap(), ClamdVerdict::Clean);
        assert_eq!(
            parse_reply("stream: Eicar-Test-Signature.UNOFFICIAL FOUND", 1).unwrap(),
            ClamdVerdict::Found("Eicar-Test-Signature.UNOFFICIAL".into())
        );
        assert!(matches!(parse_reply("INSTREAM size limit exceeded. ERROR", 9), Err(ClamdError::TooLarge { size: 9 })));
        assert!(matches!(parse_reply("Can't allocate memory ERROR", 1), Err(ClamdError::Scanner(_))));
        for bad in ["stream:  FOUND", "stream: a b FOUND", "stream: \u{7}x FOUND", "PONG", "stream: FOUND", "OK"] {
            assert!(matches!(parse_reply(bad, 1), Err(ClamdError::Malformed(_))), "{bad}");
        }
        let long = format!("stream: {} FOUND", "x".repeat(SIGNATURE_NAME_MAX + 1));
        assert!(matches!(parse_reply(&long, 1), Err(ClamdError::Malformed(_))));
    }

    /// How a fake clamd answers one connection.
    #[derive(Clone, Copy)]
    enum Fake {
        /// Reads the whole INSTREAM, checks its framing, then sends this.
        Answer(&'static [u8]),
        /// Sends this after the first octets, without reading on, and closes.
        Early(&'static [u8]),
        /// Reads the stream and sends octets forever.
        Endless,
        /// Reads the stream and never answers.
        Silent,
    }

    /// Reads one INSTREAM request and returns the streamed data.
    async fn read_instream<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
        let mut cmd = [0u8; 10];
        s.read_exact(&mut cmd).await.unwrap();
        assert_eq!(&cmd, b"zINSTREAM\0");
        let mut data = Vec::new();
        loop {
            let len = s.read_u32().await.unwrap() as usize;
            if len == 0 {
                return data;
            }
            let start = data.len();
            data.resize(start + len, 0);
            s.read_exact(&mut data[start..]).await.unwrap();
        }
    }

    async fn fake_clamd(fake: Fake) -> (ClamdAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = ClamdAddr::Tcp(listener.local_addr().unwrap().to_string());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match fake {
                        Fake::Answer(reply) => {
                            let data = read_instream(&mut s).await;
                            let _ = tx.send(data);
                            s.write_all(reply).await.unwrap();
                        }
                        Fake::Early(reply) => {
                            let mut first = [0u8; 10];
                            s.read_exact(&mut first).await.unwrap();
                            s.write_all(reply).await.unwrap();
                            let _ = s.shutdown().await;
                            // Then close with unread data pending, as clamd does: the kernel
                            // resets the connection and the client's writes fail.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            drop(s);
                        }
                        Fake::Endless => {
                            let _ = read_instream(&mut s).await;
                            let chunk = [b'A'; 4096];
                            while s.write_all(&chunk).await.is_ok() {}
                        }
                        Fake::Silent => {
                            let _ = read_instream(&mut s).await;
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                    }
                });
            }
        });
        (addr, rx)
    }

    fn client(addr: ClamdAddr) -> ClamdScanner {
        ClamdScanner::new(addr, clock()).timeout(Duration::from_secs(5)).chunk_bytes(1000)
    }

    #[tokio::test]
    async fn clamd_ok_streams_in_chunks() {
        let (addr, mut seen) = fake_clamd(Fake::Answer(b"stream: OK\0")).await;
        let message: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let s = client(addr);
        assert_eq!(s.scan(Bytes::from(message.clone())).await, ScanOutcome::Clean);
        assert_eq!(seen.recv().await.unwrap(), message, "3 chunks reassemble to the message");
        assert_eq!(s.stats().clean.load(Ordering::Relaxed), 1);
        // An empty message is just the terminator.
        assert_eq!(s.scan(Bytes::new()).await, ScanOutcome::Clean);
        assert_eq!(seen.recv().await.unwrap(), b"");
    }

    #[tokio::test]
    async fn clamd_found_names_the_signature() {
        let (addr, _seen) = fake_clamd(Fake::Answer(b"stream: Win.Test.EICAR_HDB-1 FOUND\0")).await;
        let outcome = client(addr).scan(Bytes::from_static(EICAR)).await;
        assert_eq!(outcome, ScanOutcome::Infected { signature: "Win.Test.EICAR_HDB-1".into() });
    }

    #[tokio::test]
    async fn clamd_size_limit_follows_the_oversize_policy() {
        let (addr, _seen) = fake_clamd(Fake::Early(b"INSTREAM size limit exceeded. ERROR\0")).await;
        let message = Bytes::from(vec![b'x'; 4 * 1024 * 1024]);
        let s = client(addr.clone());
        assert!(matches!(s.instream(&message).await, Err(ClamdError::TooLarge { .. })));
        let outcome = s.scan(message.clone()).await;
        assert!(matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains("stream limit")), "{outcome:?}");
        let s = client(addr).on_oversize(OnScanFailure::Accept);
        assert_eq!(s.scan(message).await, ScanOutcome::Clean);
        assert_eq!(s.stats().unscanned.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn over_our_limit_clamd_is_not_asked() {
        // Nothing listens there: asking would fail differently.
        let s = ClamdScanner::new("unix:/nonexistent/clamd.ctl".parse().unwrap(), clock()).stream_max(10);
        assert!(matches!(s.instream(b"01234567890").await, Err(ClamdError::TooLarge { size: 11 })));
        let s = s.on_oversize(OnScanFailure::Accept);
        assert_eq!(s.scan(Bytes::from_static(b"01234567890")).await, ScanOutcome::Clean);
        assert!(matches!(s.instream(b"0123456789").await, Err(ClamdError::Connect { .. })));
    }

    #[tokio::test]
    async fn clamd_errors_and_malformed_answers_fail_the_scan() {
        for (reply, expect) in [
            (b"Can't allocate memory ERROR\0".as_slice(), "clamd error"),
            (b"HTTP/1.1 400 Bad Request\r\n\r\n\0", "malformed"),
            (b"stream: OK", "malformed"), // no NUL, but EOF right after: accepted below
            (b"\0", "malformed"),
            (b"stream: \xff\xfe FOUND\0", "not UTF-8"),
            (b"stream: two words FOUND\0", "malformed"),
        ] {
            let (addr, _seen) = fake_clamd(Fake::Answer(reply)).await;
            let outcome = client(addr).scan(Bytes::from_static(b"hello")).await;
            if reply == b"stream: OK" {
                assert_eq!(outcome, ScanOutcome::Clean, "EOF ends a reply");
                continue;
            }
            assert!(
                matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains(expect)),
                "{:?}: {outcome:?}",
                String::from_utf8_lossy(reply)
            );
        }
    }

    #[tokio::test]
    async fn endless_reply_is_cut_off() {
        let (addr, _seen) = fake_clamd(Fake::Endless).await;
        let outcome = client(addr).scan(Bytes::from_static(b"hello")).await;
        assert!(
            matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains("longer than 1024")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn oversized_reply_is_refused() {
        let mut long = b"stream: ".to_vec();
        long.extend(std::iter::repeat_n(b'A', 3 * CLAMD_REPLY_MAX));
        long.extend_from_slice(b" FOUND\0");
        let (addr, _seen) = fake_clamd(Fake::Answer(Box::leak(long.into_boxed_slice()))).await;
        let outcome = client(addr).scan(Bytes::from_static(b"hello")).await;
        assert!(
            matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains("longer than 1024")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn silent_clamd_times_out() {
        let (addr, _seen) = fake_clamd(Fake::Silent).await;
        let s = client(addr).timeout(Duration::from_millis(200));
        let outcome = s.scan(Bytes::from_static(b"hello")).await;
        assert!(matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains("did not answer")), "{outcome:?}");
        assert_eq!(s.stats().failed.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn clamd_down_fails_the_scan() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = ClamdAddr::Tcp(listener.local_addr().unwrap().to_string());
        drop(listener);
        let outcome = client(addr).scan(Bytes::from_static(b"hello")).await;
        assert!(matches!(&outcome, ScanOutcome::Failed { reason } if reason.contains("cannot connect")), "{outcome:?}");
    }

    #[tokio::test]
    async fn ping_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clamd.ctl");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            for reply in [b"PONG\0".as_slice(), b"PANG\0"] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut cmd = [0u8; 6];
                s.read_exact(&mut cmd).await.unwrap();
                assert_eq!(&cmd, b"zPING\0");
                s.write_all(reply).await.unwrap();
            }
        });
        let s = client(ClamdAddr::Unix(path));
        s.ping().await.unwrap();
        assert!(matches!(s.ping().await, Err(ClamdError::Malformed(m)) if m == "PANG"));
    }

    #[tokio::test]
    async fn instream_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clamd.ctl");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let data = read_instream(&mut s).await;
            let reply: &[u8] = if data.windows(EICAR.len()).any(|w| w == EICAR) {
                b"stream: Eicar-Test-Signature FOUND\0"
            } else {
                b"stream: OK\0"
            };
            s.write_all(reply).await.unwrap();
        });
        let outcome = client(ClamdAddr::Unix(path)).scan(Bytes::from(attachment(b"x"))).await;
        assert_eq!(outcome, ScanOutcome::Clean);
    }
}
