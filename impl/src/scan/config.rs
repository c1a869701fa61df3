//! The `[scan]` table: which engine serves rule V1 ([`Engine`]), where clamd listens, the
//! limits of a scan, the oversize policy and the builtin engine's literal signatures
//! ([`SignatureConfig`]); its validation ([`ScanConfig::problems`]) and the scanner it builds.
//!
//! This module only describes and builds scanners: it never scans, and it does no IO of its own
//! (the one exchange, [`ScanConfig::start`]'s health check, is the clamd client's `PING`).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::builtin::{BuiltinScanner, EICAR_NAME};
use super::clamd::{ClamdAddr, ClamdScanner};
use crate::edges::{Clock, Scanner};
use crate::policy::OnScanFailure;

/// Longest signature name accepted from clamd or the configuration (it goes into the SMTP
/// reply text, RFC 5321 §4.5.3.1.5 limits a reply line to 512 octets).
pub const SIGNATURE_NAME_MAX: usize = 200;

/// Shortest configured literal signature: a shorter one would match innocent mail and ban its
/// sender (B3).
pub const SIGNATURE_MIN_BYTES: usize = 8;

/// Longest configured literal signature.
pub const SIGNATURE_MAX_BYTES: usize = 4096;

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

/// A signature name fit for an SMTP reply and a log line: 1 to [`SIGNATURE_NAME_MAX`] printable
/// ASCII characters, no spaces (clamd's answers are held to it too).
pub(super) fn valid_signature_name(name: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::fixtures::clock;

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
}
