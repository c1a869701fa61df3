//! Ban backends: where an active ban is pushed so that the banned client's packets are
//! dropped. One trait, three implementations:
//!
//! - [`MemoryBackend`]: nothing beyond the in-process gate (the embedded default); it only
//!   remembers what it was told, for inspection.
//! - [`XtRecentBackend`]: `+addr` / `-addr` written to `/proc/net/xt_recent/NAME`, one
//!   address per `write()` on a freshly opened file, addresses pre-masked, IPv4-mapped IPv6
//!   written as IPv4 (docs/kernel.md §4.3). xt_recent cannot expire an entry before the rule's
//!   `--seconds`, so the ban manager removes expired bans itself.
//! - [`NftBackend`]: `add element` / `delete element` in the ban sets of table
//!   `inet gatekeeper` through `nft -f -`; elements carry their own `timeout` and `expires`,
//!   so a re-applied ban keeps its remaining time.
//!
//! Backends are blocking (file writes, a child process): the manager calls them from the
//! blocking pool, never under its lock. They never panic on kernel errors: every failure is a
//! [`BackendError`] that the manager logs, counts and retries. Every kernel call has a deadline
//! (`[bans] kernel_timeout`): a hung `nft` is killed; a `/proc` write that does not return is
//! abandoned on its thread (a write cannot be interrupted) and reported as timed out.

use std::collections::BTreeMap;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::config::{BackendKind, NftablesSection, XtRecentSection};
use super::net::{Net, NetList};

/// A backend operation that failed. The ban stays recorded; the manager retries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The table or set does not exist: install the rules (`gatekeeper firewall rules` or
    /// `gatekeeper firewall apply`).
    #[error("missing: {0}")]
    Missing(String),
    /// Not allowed: the gatekeeper needs root (or CAP_NET_ADMIN for nft, write access to the
    /// proc file for xt_recent).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The set is full (nft `ENFILE`): raise its size or wait for garbage collection.
    #[error("full: {0}")]
    Full(String),
    /// The kernel call did not finish within `[bans] kernel_timeout` (a hung `nft` is killed).
    #[error("timed out: {0}")]
    TimedOut(String),
    /// Anything else (the kernel refused the address, `nft` not installed, ...).
    #[error("{0}")]
    Other(String),
}

/// Where bans are pushed. Blocking; implementations must be cheap to call repeatedly (the
/// manager re-applies on start, on retry and on reconcile).
pub trait BanBackend: Send + Sync + std::fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Puts `net` into the ban table for `remaining` of a ban that lasts `total` in all.
    /// Applying an existing ban again is fine (it refreshes it).
    fn apply(&self, net: Net, remaining: Duration, total: Duration) -> Result<(), BackendError>;

    /// [`apply`](Self::apply) for many bans (restore on start); one result per item.
    fn apply_many(&self, items: &[(Net, Duration, Duration)]) -> Vec<Result<(), BackendError>> {
        items.iter().map(|&(n, r, t)| self.apply(n, r, t)).collect()
    }

    /// Takes `net` out of the ban table; removing an absent ban is fine.
    fn remove(&self, net: Net) -> Result<(), BackendError>;

    /// True if the backend drops an entry on its own when its time is up (nft element
    /// timeouts); false if the manager must remove it (xt_recent).
    fn expires_itself(&self) -> bool;

    /// The networks in the ban tables now, if the backend can list them.
    fn list(&self) -> Result<Option<NetList>, BackendError>;

    /// Whether the tables may have lost a ban since the last [`list`](Self::list) other than by
    /// this backend's own [`remove`](Self::remove) or by running out of time: a flush, a
    /// reboot, a ruleset reload, an eviction. The reconcile reads the tables back only then.
    /// The real kernel's tables can be changed by anyone, so a backend that cannot tell says
    /// true (the default); the simulation's kernel model can.
    fn may_have_lost(&self) -> bool {
        true
    }

    /// How many entries one table (one address family) holds before the kernel evicts.
    fn capacity(&self) -> Option<usize> {
        None
    }

    /// True if an IPv6 ban may be any prefix (an nft interval set, the in-process gate), so
    /// that many bans in one /48 can be widened to it; false if the table's mask is fixed
    /// (xt_recent).
    fn holds_prefixes(&self) -> bool {
        false
    }
}

/// The embedded default: bans live only in the server's in-process gate. Remembers what it
/// was told (for tests and listings); never fails.
#[derive(Debug, Default)]
pub struct MemoryBackend {
    entries: Mutex<BTreeMap<Net, Duration>>,
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    /// What it holds: network → remaining time when last applied.
    pub fn entries(&self) -> BTreeMap<Net, Duration> {
        self.entries.lock().expect("memory backend lock").clone()
    }
}

impl BanBackend for MemoryBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Memory
    }
    fn apply(&self, net: Net, remaining: Duration, _total: Duration) -> Result<(), BackendError> {
        self.entries.lock().expect("memory backend lock").insert(net, remaining);
        Ok(())
    }
    fn remove(&self, net: Net) -> Result<(), BackendError> {
        self.entries.lock().expect("memory backend lock").remove(&net);
        Ok(())
    }
    fn expires_itself(&self) -> bool {
        false
    }
    fn list(&self) -> Result<Option<NetList>, BackendError> {
        Ok(Some(self.entries.lock().expect("memory backend lock").keys().copied().collect()))
    }
    fn holds_prefixes(&self) -> bool {
        true
    }
}

/// xt_recent through `/proc/net/xt_recent/NAME`.
#[derive(Debug, Clone)]
pub struct XtRecentBackend {
    dir: PathBuf,
    table4: String,
    table6: String,
    ipv6_prefix: u8,
    capacity: usize,
    timeout: Duration,
}

/// The deadline of one kernel call unless `[bans] kernel_timeout` says otherwise.
pub const DEFAULT_KERNEL_TIMEOUT: Duration = Duration::from_secs(10);

impl XtRecentBackend {
    /// The backend for `[bans.xt_recent]`; IPv6 bans are `/ipv6_prefix` networks, which the
    /// IPv6 table's `--mask` must match.
    pub fn new(cfg: &XtRecentSection, ipv6_prefix: u8) -> XtRecentBackend {
        XtRecentBackend {
            dir: cfg.proc_dir.clone(),
            table4: cfg.ban_table.clone(),
            table6: cfg.ban_table6.clone(),
            ipv6_prefix,
            capacity: cfg.capacity as usize,
            timeout: DEFAULT_KERNEL_TIMEOUT,
        }
    }

    /// The same backend with another deadline per `/proc` write.
    pub fn with_timeout(self, timeout: Duration) -> XtRecentBackend {
        XtRecentBackend { timeout, ..self }
    }

    fn path(&self, net: &Net) -> PathBuf {
        self.dir.join(if net.addr().is_ipv4() { &self.table4 } else { &self.table6 })
    }

    /// One command, one `write()` on a fresh open, at offset 0, on its own thread so that a
    /// write that never returns costs the caller `timeout`, not forever.
    fn write(&self, net: &Net, op: char) -> Result<(), BackendError> {
        let path = self.path(net);
        let line = format!("{op}{}\n", net.addr());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let (p, l) = (path.clone(), line.clone());
        let spawned = std::thread::Builder::new().name("xt-write".into()).spawn(move || {
            let result = std::fs::OpenOptions::new().write(true).open(&p).and_then(|mut f| {
                let n = f.write(l.as_bytes())?;
                if n == l.len() {
                    Ok(())
                } else {
                    Err(io::Error::new(io::ErrorKind::WriteZero, format!("short write ({n} of {})", l.len())))
                }
            });
            let _ = tx.send(result);
        });
        if let Err(e) = spawned {
            return Err(io_error(&path, line.trim_end(), &e));
        }
        match rx.recv_timeout(self.timeout) {
            Ok(result) => result.map_err(|e| io_error(&path, line.trim_end(), &e)),
            Err(_) => Err(BackendError::TimedOut(format!(
                "{} → {}: no answer within {:?}",
                line.trim_end(),
                path.display(),
                self.timeout
            ))),
        }
    }
}

fn io_error(path: &Path, what: &str, e: &io::Error) -> BackendError {
    let detail = format!("{what} → {}: {e}", path.display());
    match e.kind() {
        io::ErrorKind::NotFound => {
            BackendError::Missing(format!("{detail} (no such table: install the rules, `gatekeeper firewall rules`)"))
        }
        io::ErrorKind::PermissionDenied => BackendError::PermissionDenied(detail),
        _ => BackendError::Other(detail),
    }
}

/// Parses the `src=` fields of a `/proc/net/xt_recent/NAME` listing.
pub fn parse_xt_listing(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.strip_prefix("src="))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|a| a.parse().ok())
        .collect()
}

impl BanBackend for XtRecentBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::XtRecent
    }
    fn apply(&self, net: Net, _remaining: Duration, _total: Duration) -> Result<(), BackendError> {
        self.write(&net, '+')
    }
    fn remove(&self, net: Net) -> Result<(), BackendError> {
        self.write(&net, '-')
    }
    fn expires_itself(&self) -> bool {
        false
    }
    fn list(&self) -> Result<Option<NetList>, BackendError> {
        let mut out = Vec::new();
        for table in [&self.table4, &self.table6] {
            let path = self.dir.join(table);
            let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, "read", &e))?;
            out.extend(parse_xt_listing(&text).into_iter().map(|a| Net::ban_key(a, self.ipv6_prefix)));
        }
        Ok(Some(NetList::from(out)))
    }
    fn capacity(&self) -> Option<usize> {
        Some(self.capacity)
    }
}

/// nftables through the `nft` binary.
#[derive(Debug, Clone)]
pub struct NftBackend {
    nft: PathBuf,
    table: String,
    set4: String,
    set6: String,
    timeout: Duration,
}

/// An nft time value, at least 1 ms: whole seconds (`345600s`), milliseconds under a second
/// (`500ms`), or both (`345598s504ms`). Never a large number of milliseconds: nft 1.0.6
/// refuses `345598504ms` ("value too large") though it takes the same time as `345598s504ms`,
/// which made every automatic multi-day ban (its remaining time is not whole seconds) fail.
pub fn nft_time(d: Duration) -> String {
    let ms = d.as_millis().max(1);
    match (ms / 1000, ms % 1000) {
        (s, 0) => format!("{s}s"),
        (0, ms) => format!("{ms}ms"),
        (s, ms) => format!("{s}s{ms}ms"),
    }
}

impl NftBackend {
    /// The backend for `[bans.nftables]`.
    pub fn new(cfg: &NftablesSection) -> NftBackend {
        NftBackend {
            nft: cfg.nft.clone(),
            table: cfg.table.clone(),
            set4: cfg.ban_set.clone(),
            set6: cfg.ban_set6.clone(),
            timeout: DEFAULT_KERNEL_TIMEOUT,
        }
    }

    /// The same backend with another deadline per `nft` run.
    pub fn with_timeout(self, timeout: Duration) -> NftBackend {
        NftBackend { timeout, ..self }
    }

    fn set_of(&self, net: &Net) -> &str {
        if net.addr().is_ipv4() { &self.set4 } else { &self.set6 }
    }

    /// The element: an IPv4 address, or an IPv6 prefix (the IPv6 set is an interval set).
    fn element(net: &Net) -> String {
        if net.addr().is_ipv4() { net.addr().to_string() } else { format!("{}/{}", net.addr(), net.prefix()) }
    }

    fn add_line(&self, net: &Net, remaining: Duration, total: Duration) -> String {
        let total = total.max(remaining).max(Duration::from_millis(1));
        let remaining = remaining.max(Duration::from_millis(1));
        format!(
            "add element inet {} {} {{ {} timeout {} expires {} }}\n",
            self.table,
            self.set_of(net),
            NftBackend::element(net),
            nft_time(total),
            nft_time(remaining)
        )
    }

    /// Runs `nft -f -` with `script` on stdin.
    pub fn run(&self, script: &str) -> Result<(), BackendError> {
        run_nft(&self.nft, &["-f", "-"], Some(script), self.timeout).map(|_| ())
    }
}

/// Runs `nft ARGS` (feeding `stdin`), returning stdout; maps failures to [`BackendError`]. An
/// `nft` still running after `timeout` is killed (SIGKILL) and reaped: [`BackendError::TimedOut`].
pub fn run_nft(nft: &Path, args: &[&str], stdin: Option<&str>, timeout: Duration) -> Result<String, BackendError> {
    let mut cmd = Command::new(nft);
    cmd.args(args).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => BackendError::Missing(format!("{}: not installed ({e})", nft.display())),
        io::ErrorKind::PermissionDenied => BackendError::PermissionDenied(format!("{}: {e}", nft.display())),
        _ => BackendError::Other(format!("{}: {e}", nft.display())),
    })?;
    // Feeding and draining on their own threads: a hung nft must not hang us on a full pipe.
    let feeder = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => {
            let text = text.to_owned();
            // A failure here shows up as nft's own error below.
            Some(std::thread::spawn(move || drop(pipe.write_all(text.as_bytes()))))
        }
        _ => None,
    };
    let drain = |pipe: Option<Box<dyn io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as Box<dyn io::Read + Send>));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as Box<dyn io::Read + Send>));
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(BackendError::TimedOut(format!(
                    "nft {}: still running after {timeout:?}, killed",
                    args.join(" ")
                )));
            }
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => break Err(BackendError::Other(format!("{}: {e}", nft.display()))),
        }
    };
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    if status?.success() {
        return Ok(String::from_utf8_lossy(&stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&stderr);
    let first = err.lines().find(|l| l.contains("Error")).unwrap_or_else(|| err.lines().next().unwrap_or("")).trim();
    let detail = format!("nft {}: {first}", args.join(" "));
    Err(if err.contains("No such file or directory") {
        BackendError::Missing(format!("{detail} (install the table: `gatekeeper firewall apply`)"))
    } else if err.contains("Operation not permitted") || err.contains("Permission denied") {
        BackendError::PermissionDenied(detail)
    } else if err.contains("Too many open files in system") || err.contains("set is full") {
        BackendError::Full(detail)
    } else {
        BackendError::Other(detail)
    })
}

/// The networks in an `nft -j list set` answer.
pub fn parse_nft_set_json(json: &str) -> Result<Vec<Net>, BackendError> {
    fn element(v: &serde_json::Value) -> Option<Net> {
        match v {
            serde_json::Value::String(s) => s.parse().ok(),
            serde_json::Value::Object(o) => {
                if let Some(inner) = o.get("elem") {
                    return element(inner.get("val").unwrap_or(inner));
                }
                let p = o.get("prefix")?;
                let addr: IpAddr = p.get("addr")?.as_str()?.parse().ok()?;
                let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
                Some(Net::new(addr, len))
            }
            _ => None,
        }
    }
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| BackendError::Other(format!("nft -j: bad JSON: {e}")))?;
    let mut out = Vec::new();
    for item in v.get("nftables").and_then(|n| n.as_array()).into_iter().flatten() {
        if let Some(elems) = item.get("set").and_then(|s| s.get("elem")).and_then(|e| e.as_array()) {
            out.extend(elems.iter().filter_map(element));
        }
    }
    Ok(out)
}

impl BanBackend for NftBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Nftables
    }
    fn apply(&self, net: Net, remaining: Duration, total: Duration) -> Result<(), BackendError> {
        self.run(&self.add_line(&net, remaining, total))
    }
    fn apply_many(&self, items: &[(Net, Duration, Duration)]) -> Vec<Result<(), BackendError>> {
        if items.len() > 1 {
            let script: String = items.iter().map(|&(n, r, t)| self.add_line(&n, r, t)).collect();
            // A big restore takes longer: one more deadline per 10,000 elements.
            let timeout = self.timeout * (1 + u32::try_from(items.len() / 10_000).unwrap_or(u32::MAX));
            match run_nft(&self.nft, &["-f", "-"], Some(&script), timeout) {
                Ok(_) => return items.iter().map(|_| Ok(())).collect(),
                // Hung: trying one by one would hang once per element.
                Err(e @ BackendError::TimedOut(_)) => return items.iter().map(|_| Err(e.clone())).collect(),
                Err(_) => {}
            }
        }
        // One transaction fails whole: find out which one by one.
        items.iter().map(|&(n, r, t)| self.apply(n, r, t)).collect()
    }
    fn remove(&self, net: Net) -> Result<(), BackendError> {
        let line =
            format!("delete element inet {} {} {{ {} }}\n", self.table, self.set_of(&net), NftBackend::element(&net));
        match self.run(&line) {
            // Absent (or the table is gone): nothing to remove.
            Err(BackendError::Missing(_)) => Ok(()),
            other => other,
        }
    }
    fn expires_itself(&self) -> bool {
        true
    }
    fn holds_prefixes(&self) -> bool {
        true
    }
    fn list(&self) -> Result<Option<NetList>, BackendError> {
        let mut out = Vec::new();
        for set in [&self.set4, &self.set6] {
            let json = run_nft(&self.nft, &["-j", "list", "set", "inet", &self.table, set], None, self.timeout)?;
            out.extend(parse_nft_set_json(&json)?);
        }
        Ok(Some(NetList::from(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xt_writes_one_premasked_address_per_open() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = XtRecentSection { proc_dir: dir.path().to_path_buf(), ..XtRecentSection::default() };
        let b = XtRecentBackend::new(&cfg, 64);
        let v6 = Net::ban_key("2001:db8:1:2:aa:bb:cc:dd".parse().unwrap(), 64);
        // No table yet: Missing.
        assert!(matches!(b.apply(v6, Duration::from_secs(1), Duration::from_secs(1)), Err(BackendError::Missing(_))));
        std::fs::write(dir.path().join("SMTPBAN6"), "").unwrap();
        std::fs::write(dir.path().join("SMTPBAN"), "").unwrap();
        b.apply(v6, Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("SMTPBAN6")).unwrap(), "+2001:db8:1:2::\n");
        let mapped = Net::ban_key("::ffff:192.0.2.7".parse().unwrap(), 64);
        b.remove(mapped).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("SMTPBAN")).unwrap(), "-192.0.2.7\n");
    }

    #[test]
    fn xt_listing_parses_both_families() {
        let text = "src=10.1.2.3 ttl: 0 last_seen: 4295492806 oldest_pkt: 1 4295492806\n\
                    src=2001:0db8:0001:0002:0000:0000:0000:0000 ttl: 0 last_seen: 4295492810 oldest_pkt: 1 4295492810\n";
        let addrs = parse_xt_listing(text);
        assert_eq!(addrs, vec!["10.1.2.3".parse::<IpAddr>().unwrap(), "2001:db8:1:2::".parse().unwrap()]);
    }

    #[test]
    fn nft_lines_and_json() {
        let b = NftBackend::new(&NftablesSection::default());
        let day = Duration::from_secs(86_400);
        assert_eq!(
            b.add_line(&"192.0.2.1".parse().unwrap(), day, 4 * day),
            "add element inet gatekeeper ban4 { 192.0.2.1 timeout 345600s expires 86400s }\n"
        );
        assert_eq!(
            b.add_line(&"2001:db8:1:2::/64".parse().unwrap(), Duration::from_millis(1500), 4 * day),
            "add element inet gatekeeper ban6 { 2001:db8:1:2::/64 timeout 345600s expires 1s500ms }\n"
        );
        assert_eq!(nft_time(Duration::from_millis(345_598_504)), "345598s504ms", "nft 1.0.6 refuses 345598504ms");
        assert_eq!((nft_time(Duration::ZERO), nft_time(Duration::from_millis(999))), ("1ms".into(), "999ms".into()));
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "inet", "name": "ban6",
            "elem": [{"elem": {"val": {"prefix": {"addr": "2001:db8:1:2::", "len": 64}}, "timeout": 345600, "expires": 1499}},
                     {"elem": {"val": "10.1.2.3", "timeout": 10, "expires": 9}}, "10.9.9.9"]}}]}"#;
        let nets: Vec<String> = NetList::from(parse_nft_set_json(json).unwrap()).iter().map(Net::to_string).collect();
        assert_eq!(nets, ["10.1.2.3", "10.9.9.9", "2001:db8:1:2::/64"]);
    }

    #[test]
    fn a_hung_nft_is_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("nft");
        // Reads its script, then hangs.
        std::fs::write(&fake, "#!/bin/sh\ncat >/dev/null\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        let cfg = NftablesSection { nft: fake, ..NftablesSection::default() };
        let b = NftBackend::new(&cfg).with_timeout(Duration::from_millis(200));
        let r = b.apply("192.0.2.1".parse().unwrap(), Duration::from_secs(1), Duration::from_secs(1));
        assert!(matches!(r, Err(BackendError::TimedOut(_))), "{r:?}");
    }

    #[test]
    fn nft_missing_binary_is_an_error_not_a_panic() {
        let cfg = NftablesSection { nft: "/nonexistent/nft".into(), ..NftablesSection::default() };
        let b = NftBackend::new(&cfg);
        let r = b.apply("192.0.2.1".parse().unwrap(), Duration::from_secs(1), Duration::from_secs(1));
        assert!(matches!(r, Err(BackendError::Missing(_))), "{r:?}");
    }
}
