//! Ban manager tests: persistence across a simulated kill -9, expiry, allowlist, IPv6
//! masking, escalation, backend failure and recovery, sync between processes, reconcile.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::UNIX_EPOCH;

use super::*;
use crate::edges::{BanOrder, BanSink};
use crate::gate::GateConfig;
use crate::policy::BanRequest;

/// A clock that moves only when told to.
#[derive(Debug)]
pub(super) struct TestClock {
    at: Mutex<(Instant, SystemTime)>,
}

impl TestClock {
    pub(super) fn new() -> Arc<TestClock> {
        Arc::new(TestClock { at: Mutex::new((Instant::now(), UNIX_EPOCH + Duration::from_secs(1_800_000_000))) })
    }
    pub(super) fn advance(&self, d: Duration) {
        let mut at = self.at.lock().unwrap();
        at.0 += d;
        at.1 += d;
    }
    /// Steps the wall clock alone, as NTP or `date -s` do.
    pub(super) fn step_wall(&self, back: bool, d: Duration) {
        let mut at = self.at.lock().unwrap();
        at.1 = if back { at.1 - d } else { at.1 + d };
    }
}

impl Clock for TestClock {
    fn now(&self) -> Instant {
        self.at.lock().unwrap().0
    }
    fn wall(&self) -> SystemTime {
        self.at.lock().unwrap().1
    }
}

/// Records what the in-process gate was told (a network wider than a ban key by its prefix).
#[derive(Debug, Default)]
pub(super) struct Recorder {
    pub(super) ops: Mutex<Vec<String>>,
    /// It can hold a /48.
    pub(super) wide: bool,
}

pub(super) fn shown(net: Net) -> String {
    if net.prefix() == 48 { net.to_string() } else { net.addr().to_string() }
}

impl Recorder {
    pub(super) fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
}

impl BanMirror for Recorder {
    fn ban(&self, net: Net, remaining: Duration) {
        self.ops.lock().unwrap().push(format!("ban {} {}", shown(net), remaining.as_secs()));
    }
    fn unban(&self, net: Net) {
        self.ops.lock().unwrap().push(format!("unban {}", shown(net)));
    }
    fn holds_prefixes(&self) -> bool {
        self.wide
    }
}

pub(super) const DAY: Duration = Duration::from_secs(86_400);

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(super) fn gate() -> GateConfig {
    GateConfig::default()
}

/// A stand-in for `/proc/net/xt_recent` under `dir` with empty SMTPBAN/SMTPBAN6 tables, as
/// loading the rules creates them; returns its path.
pub(super) fn fake_xt_proc(dir: &Path) -> std::path::PathBuf {
    let proc_dir = dir.join("xt_recent");
    install_xt_tables(&proc_dir);
    proc_dir
}

/// Creates the empty ban tables in `proc_dir` (the rules were loaded).
fn install_xt_tables(proc_dir: &Path) {
    std::fs::create_dir_all(proc_dir).unwrap();
    for t in ["SMTPBAN", "SMTPBAN6"] {
        std::fs::write(proc_dir.join(t), "").unwrap();
    }
}

/// A temp dir holding a fake xt_recent proc table, a clock, and the xt_recent backend's
/// configuration pointing at that table.
fn xt_setup() -> (tempfile::TempDir, std::path::PathBuf, Arc<TestClock>, BanConfig) {
    let dir = tempfile::tempdir().unwrap();
    let proc_dir = fake_xt_proc(dir.path());
    let mut cfg = BanConfig { backend: BackendKind::XtRecent, ..BanConfig::default() };
    cfg.xt_recent.proc_dir = proc_dir.clone();
    (dir, proc_dir, TestClock::new(), cfg)
}

/// Manual bans of 192.0.2.{i}, each lasting its seconds.
async fn ban_for(m: &BanManager, bans: &[(u8, u64)]) {
    for &(i, secs) in bans {
        m.ban(BanOrder::manual(ip(&format!("192.0.2.{i}")), "x").lasting(Duration::from_secs(secs))).await.unwrap();
    }
}

pub(super) fn open(dir: &Path, cfg: &BanConfig, clock: &Arc<TestClock>) -> BanManager {
    BanManager::open(cfg, &gate(), dir, clock.clone(), false).unwrap()
}

/// A manager with an in-memory store and the memory backend (no restart to survive).
pub(super) fn in_memory(cfg: &BanConfig, gate: &GateConfig, clock: &Arc<TestClock>) -> BanManager {
    BanManager::new(cfg, gate, BanStore::in_memory().unwrap(), Box::new(MemoryBackend::new()), clock.clone(), false)
}

/// What the rules hand over with a ban.
pub(super) fn request(reason: BanReason, evidence: String) -> BanRequest {
    BanRequest { reason, evidence }
}

/// A B1 ban order as the server gives it (decided now, for 4 days).
pub(super) fn order(addr: &str, clock: &TestClock) -> BanOrder {
    let b1 = request(BanReason::ForgedLocalSender, "MAIL FROM:<nobody@example.test>".into());
    BanOrder::from_request(ip(addr), 42, b1).decided_at(clock.wall()).lasting(4 * DAY)
}

/// A step of the wall clock moves the active bans with it, in memory and in the database: a
/// step forward expires nothing early, a step back lengthens nothing (issue 16).
#[tokio::test]
async fn bans_move_with_a_stepped_wall_clock() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let cfg = BanConfig::default();
    let m = open(dir.path(), &cfg, &clock);
    let mirror = Arc::new(Recorder::default());
    m.attach_mirror(mirror.clone());
    m.restore().await.unwrap();
    BanSink::ban(&m, order("192.0.2.1", &clock)).await;
    clock.advance(DAY);
    clock.step_wall(false, 2 * DAY);
    m.tick().await;
    let left = |m: &BanManager| m.list_blocking().unwrap().first().map(|b| b.remaining(clock.wall()));
    assert_eq!(left(&m), Some(3 * DAY), "two days forward: nothing expires early");
    clock.advance(DAY);
    clock.step_wall(true, 5 * DAY);
    // A ban decided after the step is taken on the new clock and not moved again.
    BanSink::ban(&m, order("192.0.2.2", &clock)).await;
    m.tick().await;
    let bans = m.list_blocking().unwrap();
    let by_addr: Vec<(String, Duration)> =
        bans.iter().map(|b| (b.net.to_string(), b.remaining(clock.wall()))).collect();
    assert_eq!(by_addr, [("192.0.2.1".to_string(), 2 * DAY), ("192.0.2.2".to_string(), 4 * DAY)]);
    assert_eq!(m.stats().clock_steps.load(Ordering::Relaxed), 2);
    // The database holds the moved times: a restart restores the same remaining time.
    drop(m);
    let m = open(dir.path(), &cfg, &clock);
    m.restore().await.unwrap();
    assert_eq!(left(&m), Some(2 * DAY));
    clock.advance(2 * DAY + Duration::from_secs(1));
    m.tick().await;
    assert_eq!(m.list_blocking().unwrap().len(), 1, "the first ban ran out on time, in real time");
    let small = Duration::from_millis(500);
    clock.step_wall(false, small);
    m.tick().await;
    assert_eq!(m.stats().clock_steps.load(Ordering::Relaxed), 0, "half a second is no step");
}

#[tokio::test]
async fn a_ban_survives_kill_9_and_comes_back_with_its_remaining_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let cfg = BanConfig::default();
    let m = open(dir.path(), &cfg, &clock);
    BanSink::ban(&m, order("192.0.2.1", &clock)).await;
    // kill -9: no shutdown, no flush; the process's memory is gone.
    drop(m);
    clock.advance(DAY);
    let m = open(dir.path(), &cfg, &clock);
    let mirror = Arc::new(Recorder::default());
    m.attach_mirror(mirror.clone());
    let report = m.restore().await.unwrap();
    assert_eq!(report, RestoreReport { restored: 1, expired: 0, failed: 0, held_out: 0 });
    let bans = m.list_blocking().unwrap();
    assert_eq!(bans.len(), 1);
    let b = &bans[0];
    assert_eq!(b.net.to_string(), "192.0.2.1");
    assert_eq!(
        (b.reason, b.session, b.evidence.as_str()),
        (BanReason::ForgedLocalSender, 42, "MAIL FROM:<nobody@example.test>")
    );
    assert_eq!(b.remaining(clock.wall()), 3 * DAY);
    assert_eq!(mirror.take(), ["ban 192.0.2.1 259200"]);
}

#[tokio::test]
async fn evidence_is_stored_and_read_back_with_control_characters_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let m = open(dir.path(), &BanConfig::default(), &clock);
    let mut o = order("192.0.2.1", &clock);
    o.evidence = "RCPT TO:<a@b.test>: 550 no\r\nFAKE LOG LINE \x1b[31mred".into();
    BanSink::ban(&m, o).await;
    let escaped = "RCPT TO:<a@b.test>: 550 no\\r\\nFAKE LOG LINE \\x1b[31mred";
    let db = rusqlite::Connection::open(dir.path().join(STATE_DB)).unwrap();
    let stored: String = db.query_row("SELECT evidence FROM bans", [], |r| r.get(0)).unwrap();
    assert_eq!(stored, escaped);
    // A row written raw (by an older version, or by hand) is escaped when read.
    db.execute("UPDATE bans SET evidence = 'raw\x07\x1b]0;title\x07'", []).unwrap();
    let bans = m.list_blocking().unwrap();
    assert_eq!(bans[0].evidence, "raw\\x07\\x1b]0;title\\x07");
}

#[tokio::test]
async fn expired_bans_are_dropped_on_restore_and_by_the_expiry_pass() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let cfg = BanConfig::default();
    let m = open(dir.path(), &cfg, &clock);
    m.ban(BanOrder::manual(ip("192.0.2.1"), "test").lasting(Duration::from_secs(10))).await.unwrap();
    m.ban(BanOrder::manual(ip("192.0.2.2"), "test").lasting(Duration::from_secs(100))).await.unwrap();
    drop(m);
    clock.advance(Duration::from_secs(50));
    let m = open(dir.path(), &cfg, &clock);
    let mirror = Arc::new(Recorder::default());
    m.attach_mirror(mirror.clone());
    assert_eq!(m.restore().await.unwrap(), RestoreReport { restored: 1, expired: 1, failed: 0, held_out: 0 });
    assert_eq!(m.list_blocking().unwrap().len(), 1);
    mirror.take();
    clock.advance(Duration::from_secs(50));
    m.tick().await;
    assert!(m.list_blocking().unwrap().is_empty());
    assert!(m.active().is_empty());
    assert_eq!(mirror.take(), ["unban 192.0.2.2"]);
    assert_eq!(m.stats().expired.load(Ordering::Relaxed), 2);
    let events: Vec<String> = m.history_blocking(None, 10).unwrap().into_iter().map(|h| h.event).collect();
    assert_eq!(events, ["expire", "expire", "ban", "ban"]);
}

#[tokio::test]
async fn allowlisted_networks_are_never_banned() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let cfg = BanConfig { allowlist: vec!["192.0.2.0/24".into(), "2001:db8:1:2::99".into()], ..BanConfig::default() };
    let m = open(dir.path(), &cfg, &clock);
    let mirror = Arc::new(Recorder::default());
    m.attach_mirror(mirror.clone());
    let r = m.ban(BanOrder::manual(ip("192.0.2.200"), "x")).await.unwrap();
    assert!(matches!(r, BanOutcome::Allowlisted(_)));
    // The /64 of a B1 client holds an allowlisted host: the /64 is not banned either.
    BanSink::ban(&m, order("2001:db8:1:2::5", &clock)).await;
    assert!(m.list_blocking().unwrap().is_empty());
    assert_eq!(m.stats().allowlisted.load(Ordering::Relaxed), 2);
    // The server banned in process before asking; the manager undoes it.
    assert_eq!(mirror.take(), ["unban 192.0.2.200", "unban 2001:db8:1:2::"]);
    assert!(m.is_allowlisted(ip("::ffff:192.0.2.1")));
    let r = m.ban(BanOrder::manual(ip("198.51.100.1"), "x")).await.unwrap();
    assert!(matches!(r, BanOutcome::Banned(_)));
}

#[tokio::test]
async fn ipv6_bans_cover_the_64_and_ipv4_mapped_is_ipv4() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let m = open(dir.path(), &BanConfig::default(), &clock);
    let r = m.ban(BanOrder::manual(ip("2001:db8:1:2:aaaa::1"), "x")).await.unwrap();
    let BanOutcome::Banned(b) = r else { panic!("{r:?}") };
    assert_eq!(b.net.to_string(), "2001:db8:1:2::/64");
    clock.advance(Duration::from_secs(1));
    let r = m.ban(BanOrder::manual(ip("2001:db8:1:2:bbbb::2"), "y")).await.unwrap();
    assert!(matches!(r, BanOutcome::Extended(_)), "{r:?}");
    assert_eq!(m.list_blocking().unwrap().len(), 1);
    m.ban(BanOrder::manual(ip("::ffff:203.0.113.9"), "z")).await.unwrap();
    let nets: Vec<String> = m.list_blocking().unwrap().iter().map(|b| b.net.to_string()).collect();
    assert_eq!(nets, ["203.0.113.9", "2001:db8:1:2::/64"]);
    assert_eq!(m.key_of("2001:db8:1:2::/64".parse().unwrap()).unwrap().to_string(), "2001:db8:1:2::/64");
    assert!(m.key_of("2001:db8::/56".parse().unwrap()).is_err());
    assert!(m.key_of("2001:db8::/47".parse().unwrap()).is_err());
    // A widened /48 can be named (to lift it).
    assert_eq!(m.key_of("2001:db8::/48".parse().unwrap()).unwrap().to_string(), "2001:db8::/48");
    let no_widening = in_memory(&BanConfig { widen_v6_after: 0, ..BanConfig::default() }, &gate(), &clock);
    assert!(no_widening.key_of("2001:db8::/48".parse().unwrap()).is_err());
    // A /48 prefix configured: keys follow it.
    let g = GateConfig { ipv6_prefix: 48, ..gate() };
    let m48 = in_memory(&BanConfig::default(), &g, &clock);
    assert_eq!(m48.key(ip("2001:db8:1:2::1")).to_string(), "2001:db8:1::/48");
}

#[tokio::test]
async fn xt_backend_failure_is_retried_until_the_table_appears() {
    let dir = tempfile::tempdir().unwrap();
    let proc_dir = dir.path().join("xt_recent");
    let clock = TestClock::new();
    let mut cfg = BanConfig { backend: BackendKind::XtRecent, ..BanConfig::default() };
    cfg.xt_recent.proc_dir = proc_dir.clone();
    let m = open(dir.path(), &cfg, &clock);
    // No table (the rules are not installed): recorded anyway, failure counted, queued.
    BanSink::ban(&m, order("192.0.2.1", &clock)).await;
    assert_eq!(m.list_blocking().unwrap().len(), 1);
    assert_eq!(m.pending_len(), 1);
    assert_eq!(m.stats().backend_failures.load(Ordering::Relaxed), 1);
    // Still missing at the next retry.
    clock.advance(cfg.retry_interval);
    m.tick().await;
    assert_eq!(m.pending_len(), 1);
    assert_eq!(m.stats().backend_failures.load(Ordering::Relaxed), 2);
    // The rules get installed: the next retry applies it.
    install_xt_tables(&proc_dir);
    clock.advance(Duration::from_secs(1));
    m.tick().await;
    assert_eq!(m.pending_len(), 1, "not before retry_interval");
    clock.advance(cfg.retry_interval);
    m.tick().await;
    assert_eq!(m.pending_len(), 0);
    assert_eq!(m.stats().backend_recovered.load(Ordering::Relaxed), 1);
    assert_eq!(std::fs::read_to_string(proc_dir.join("SMTPBAN")).unwrap(), "+192.0.2.1\n");
    // A lift that fails is retried too.
    std::fs::remove_file(proc_dir.join("SMTPBAN")).unwrap();
    m.unban(m.key(ip("192.0.2.1"))).await.unwrap();
    assert_eq!(m.pending_len(), 1);
    std::fs::write(proc_dir.join("SMTPBAN"), "").unwrap();
    clock.advance(cfg.retry_interval);
    m.tick().await;
    assert_eq!(m.pending_len(), 0);
    assert_eq!(std::fs::read_to_string(proc_dir.join("SMTPBAN")).unwrap(), "-192.0.2.1\n");
}

#[tokio::test]
async fn xt_expiry_is_written_by_the_gatekeeper_and_reconcile_reapplies_lost_bans() {
    let (dir, proc_dir, clock, cfg) = xt_setup();
    let m = open(dir.path(), &cfg, &clock);
    m.ban(BanOrder::manual(ip("192.0.2.1"), "x").lasting(Duration::from_secs(100))).await.unwrap();
    // The kernel lists it (as /proc does):
    std::fs::write(proc_dir.join("SMTPBAN"), "src=192.0.2.1 ttl: 0 last_seen: 5 oldest_pkt: 1 5\n").unwrap();
    clock.advance(cfg.reconcile_interval);
    m.tick().await;
    assert_eq!(m.stats().reapplied.load(Ordering::Relaxed), 0);
    // The table is flushed (rules reloaded): the next reconcile writes it again.
    std::fs::write(proc_dir.join("SMTPBAN"), "").unwrap();
    clock.advance(cfg.reconcile_interval);
    m.tick().await;
    assert_eq!(m.stats().reapplied.load(Ordering::Relaxed), 1);
    assert_eq!(std::fs::read_to_string(proc_dir.join("SMTPBAN")).unwrap(), "+192.0.2.1\n");
    // Expiry: xt_recent keeps the entry for --seconds; the gatekeeper removes it.
    clock.advance(Duration::from_secs(100));
    m.tick().await;
    assert_eq!(std::fs::read_to_string(proc_dir.join("SMTPBAN")).unwrap(), "-192.0.2.1\n");
    assert!(m.list_blocking().unwrap().is_empty());
}

/// One reconcile against a kernel table that lists `192.0.2.{listed}`: the count of bans
/// re-applied so far, and the last one written (each write to the regular file that stands in
/// for /proc starts at its beginning).
async fn reconcile(
    m: &BanManager,
    clock: &TestClock,
    cfg: &BanConfig,
    proc_dir: &Path,
    listed: &[u8],
) -> (u64, String) {
    let table: String =
        listed.iter().map(|i| format!("src=192.0.2.{i} ttl: 0 last_seen: 5 oldest_pkt: 1 5\n")).collect();
    std::fs::write(proc_dir.join("SMTPBAN"), table).unwrap();
    clock.advance(cfg.reconcile_interval);
    m.tick().await;
    let last = std::fs::read_to_string(proc_dir.join("SMTPBAN")).unwrap();
    (m.stats().reapplied.load(Ordering::Relaxed), last.lines().next().unwrap_or("").to_string())
}

#[tokio::test]
async fn reconcile_reapplies_exactly_the_bans_the_kernel_lost() {
    // The kernel's list and the active bans are walked together in network order: bans
    // between, before and after the ones the kernel still holds, and kernel entries that are
    // no ban of ours, must neither hide a lost ban nor count as one.
    let (dir, proc_dir, clock, cfg) = xt_setup();
    let m = open(dir.path(), &cfg, &clock);
    for i in [2, 4, 6, 8] {
        m.ban(BanOrder::manual(ip(&format!("192.0.2.{i}")), "x").lasting(Duration::from_secs(1000))).await.unwrap();
    }
    // The kernel lists some of ours (and some that are not): the others are re-applied.
    assert_eq!(reconcile(&m, &clock, &cfg, &proc_dir, &[1, 4, 5, 8, 9]).await, (2, "+192.0.2.6".to_string()));
    assert_eq!(reconcile(&m, &clock, &cfg, &proc_dir, &[2, 4, 6, 8]).await.0, 2, "nothing lost, nothing re-applied");
    assert_eq!(reconcile(&m, &clock, &cfg, &proc_dir, &[4, 6, 8, 9]).await, (3, "+192.0.2.2".to_string()));
    assert_eq!(reconcile(&m, &clock, &cfg, &proc_dir, &[1, 2, 4, 6]).await, (4, "+192.0.2.8".to_string()));
}

/// The memory backend as a kernel model that knows whether it may have lost a ban (`lost`),
/// counting the reads of its table.
#[derive(Debug)]
struct Knowing {
    table: Arc<MemoryBackend>,
    lost: Arc<std::sync::atomic::AtomicBool>,
    lists: Arc<std::sync::atomic::AtomicUsize>,
}

impl BanBackend for Knowing {
    fn kind(&self) -> BackendKind {
        BackendKind::Nftables
    }
    fn apply(&self, net: Net, remaining: Duration, total: Duration) -> Result<(), BackendError> {
        self.table.apply(net, remaining, total)
    }
    fn remove(&self, net: Net) -> Result<(), BackendError> {
        self.table.remove(net)
    }
    fn expires_itself(&self) -> bool {
        false
    }
    fn list(&self) -> Result<Option<crate::ban::NetList>, BackendError> {
        self.lists.fetch_add(1, Ordering::Relaxed);
        self.table.list()
    }
    fn may_have_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

#[tokio::test]
async fn reconcile_reads_the_table_back_only_when_the_backend_may_have_lost_a_ban() {
    let clock = TestClock::new();
    let cfg = BanConfig::default();
    let table = Arc::new(MemoryBackend::new());
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lists = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let backend = Knowing { table: table.clone(), lost: lost.clone(), lists: lists.clone() };
    let m = BanManager::new(&cfg, &gate(), BanStore::in_memory().unwrap(), Box::new(backend), clock.clone(), false);
    m.ban(BanOrder::manual(ip("192.0.2.1"), "x").lasting(Duration::from_secs(1000))).await.unwrap();
    let net = Net::ban_key(ip("192.0.2.1"), 64);
    // Gone from the table by a way the backend says cannot happen: not read back.
    table.remove(net).unwrap();
    clock.advance(cfg.reconcile_interval);
    m.tick().await;
    assert_eq!(lists.load(Ordering::Relaxed), 0);
    assert_eq!(m.stats().reapplied.load(Ordering::Relaxed), 0);
    // It may have lost one: read back, and the lost ban re-applied.
    lost.store(true, Ordering::Relaxed);
    clock.advance(cfg.reconcile_interval);
    m.tick().await;
    assert_eq!(lists.load(Ordering::Relaxed), 1);
    assert_eq!(m.stats().reapplied.load(Ordering::Relaxed), 1);
    assert!(table.list().unwrap().unwrap().contains(&net));
}

#[tokio::test]
async fn reconcile_fills_only_the_free_slots_of_a_full_table() {
    // A full xt_recent table evicts an entry for every write: re-applying every lost ban would
    // evict as many others, every reconcile. Only the free slots are filled, per family, with
    // the bans that run longest.
    let (dir, proc_dir, clock, mut cfg) = xt_setup();
    cfg.xt_recent.capacity = 4;
    let m = open(dir.path(), &cfg, &clock);
    ban_for(&m, &[(2, 1000), (4, 4000), (6, 3000), (8, 2000)]).await;
    m.ban(BanOrder::manual(ip("2001:db8::1"), "x").lasting(Duration::from_secs(500))).await.unwrap();
    let v6_table = proc_dir.join("SMTPBAN6");
    // One slot free (two entries are not ours): the longest of the three lost bans.
    std::fs::write(&v6_table, "").unwrap();
    assert_eq!(reconcile(&m, &clock, &cfg, &proc_dir, &[1, 4, 9]).await, (2, "+192.0.2.6".to_string()));
    assert!(std::fs::read_to_string(&v6_table).unwrap().starts_with("+2001:db8::"), "the IPv6 table has room");
    // Full: nothing written, nothing evicted.
    let v6_listed = "src=2001:0db8:0000:0000:0000:0000:0000:0000 ttl: 0 last_seen: 5 oldest_pkt: 1 5\n";
    std::fs::write(&v6_table, v6_listed).unwrap();
    assert_eq!(
        reconcile(&m, &clock, &cfg, &proc_dir, &[1, 4, 6, 9]).await,
        (2, "src=192.0.2.1 ttl: 0 last_seen: 5 oldest_pkt: 1 5".to_string())
    );
    // Flushed: every lost ban fits again.
    std::fs::write(&v6_table, v6_listed).unwrap();
    assert_eq!(reconcile(&m, &clock, &cfg, &proc_dir, &[]).await, (6, "+192.0.2.8".to_string()));
}

#[tokio::test]
async fn restore_writes_no_more_bans_than_a_full_table_holds() {
    // At start every stored ban goes back into the kernel; into a table of 2 slots, writing 4
    // would evict the first two written. The two that run longest are written, the others
    // held out (the server still refuses them).
    let (dir, proc_dir, clock, mut cfg) = xt_setup();
    let m = open(dir.path(), &cfg, &clock);
    ban_for(&m, &[(2, 1000), (4, 4000), (6, 3000), (8, 2000)]).await;
    drop(m);
    cfg.xt_recent.capacity = 2;
    install_xt_tables(&proc_dir);
    let m = open(dir.path(), &cfg, &clock);
    let report = m.restore().await.unwrap();
    assert_eq!(report, RestoreReport { restored: 4, expired: 0, failed: 0, held_out: 2 });
    // Written in network order; the last write is the table file's content.
    assert_eq!(std::fs::read_to_string(proc_dir.join("SMTPBAN")).unwrap(), "+192.0.2.6\n");
    assert_eq!(m.list_blocking().unwrap().len(), 4, "every ban stays in force");
}

#[tokio::test]
async fn capacity_warnings_before_the_kernel_evicts() {
    let (dir, _proc_dir, clock, mut cfg) = xt_setup();
    cfg.xt_recent.capacity = 5;
    cfg.xt_recent.warn_percent = 80;
    let m = open(dir.path(), &cfg, &clock);
    for i in 1..=3 {
        m.ban(BanOrder::manual(ip(&format!("192.0.2.{i}")), "x")).await.unwrap();
    }
    assert_eq!(m.stats().capacity_warnings.load(Ordering::Relaxed), 0);
    for i in 4..=6 {
        m.ban(BanOrder::manual(ip(&format!("192.0.2.{i}")), "x")).await.unwrap();
    }
    // 4 of 5 (80 %), 5 of 5, 6 of 5.
    assert_eq!(m.stats().capacity_warnings.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn changes_by_another_process_reach_the_server_within_a_tick() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let cfg = BanConfig::default();
    let server = open(dir.path(), &cfg, &clock);
    let mirror = Arc::new(Recorder::default());
    server.attach_mirror(mirror.clone());
    server.restore().await.unwrap();
    let cli = open(dir.path(), &cfg, &clock);
    cli.ban_blocking(BanOrder::manual(ip("198.51.100.7"), "by hand").lasting(DAY)).unwrap();
    server.tick().await;
    assert_eq!(mirror.take(), ["ban 198.51.100.7 86400"]);
    assert_eq!(server.active().len(), 1);
    // Nothing changed: nothing happens.
    server.tick().await;
    assert!(mirror.take().is_empty());
    assert!(cli.unban_blocking(cli.key(ip("198.51.100.7"))).unwrap().is_some());
    server.tick().await;
    assert_eq!(mirror.take(), ["unban 198.51.100.7"]);
    assert!(server.active().is_empty());
    assert_eq!(server.stats().synced.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn escalation_lengthens_repeat_offences_only_when_enabled() {
    let clock = TestClock::new();
    let cfg = BanConfig {
        escalation: Escalation { enabled: true, factor: 2, max: 10 * DAY, lookback: 30 * DAY },
        ..BanConfig::default()
    };
    let m = in_memory(&cfg, &gate(), &clock);
    let mut lengths = Vec::new();
    for _ in 0..3 {
        BanSink::ban(&m, order("192.0.2.1", &clock)).await;
        let b = m.list_blocking().unwrap().remove(0);
        lengths.push((b.total().as_secs() / 86_400, b.offence));
        clock.advance(b.total());
        m.tick().await;
    }
    assert_eq!(lengths, [(4, 1), (8, 2), (10, 3)]);
    let plain = in_memory(&BanConfig::default(), &gate(), &clock);
    for _ in 0..2 {
        BanSink::ban(&plain, order("192.0.2.1", &clock)).await;
        let b = plain.list_blocking().unwrap().remove(0);
        assert_eq!(b.total(), 4 * DAY);
        clock.advance(b.total());
        plain.tick().await;
    }
}

#[tokio::test]
async fn a_longer_ban_extends_and_a_shorter_one_keeps_the_later_expiry() {
    let clock = TestClock::new();
    let m = in_memory(&BanConfig::default(), &gate(), &clock);
    m.ban(BanOrder::manual(ip("192.0.2.1"), "a").lasting(DAY)).await.unwrap();
    let r = m.ban(BanOrder::manual(ip("192.0.2.1"), "b").lasting(Duration::from_secs(60))).await.unwrap();
    let BanOutcome::Extended(b) = r else { panic!("{r:?}") };
    assert_eq!((b.evidence.as_str(), b.total()), ("a", DAY));
    let r = m.ban(BanOrder::manual(ip("192.0.2.1"), "c").lasting(2 * DAY)).await.unwrap();
    let BanOutcome::Extended(b) = r else { panic!("{r:?}") };
    assert_eq!((b.evidence.as_str(), b.total()), ("c", 2 * DAY));
    let events: Vec<String> = m.history_blocking(None, 10).unwrap().into_iter().map(|h| h.event).collect();
    assert_eq!(events, ["extend", "ban"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offloaded_manager_works_on_the_blocking_pool() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let m = BanManager::open(&BanConfig::default(), &gate(), dir.path(), clock.clone(), true).unwrap();
    BanSink::ban(&m, order("192.0.2.1", &clock)).await;
    assert_eq!(m.list_blocking().unwrap().len(), 1);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(m.clone().run(async {
        let _ = rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let _ = tx.send(());
    task.await.unwrap();
}

/// A backend that records the size of every call it gets.
#[derive(Debug, Default)]
struct CallLog {
    calls: Arc<Mutex<Vec<usize>>>,
}

impl BanBackend for CallLog {
    fn kind(&self) -> BackendKind {
        BackendKind::Memory
    }
    fn apply(&self, _: Net, _: Duration, _: Duration) -> Result<(), BackendError> {
        self.calls.lock().unwrap().push(1);
        Ok(())
    }
    fn apply_many(&self, items: &[(Net, Duration, Duration)]) -> Vec<Result<(), BackendError>> {
        self.calls.lock().unwrap().push(items.len());
        items.iter().map(|_| Ok(())).collect()
    }
    fn remove(&self, _: Net) -> Result<(), BackendError> {
        Ok(())
    }
    fn expires_itself(&self) -> bool {
        false
    }
    fn list(&self) -> Result<Option<crate::ban::NetList>, BackendError> {
        Ok(None)
    }
}

#[test]
fn concurrent_bans_share_one_group_commit_and_each_gets_its_answer() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let cfg = BanConfig::default();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let store = BanStore::open(&dir.path().join(STATE_DB)).unwrap();
    let backend = Box::new(CallLog { calls: calls.clone() });
    let m = BanManager::new(&cfg, &gate(), store, backend, clock.clone(), false);
    // Hold the lock a committing thread needs, so that every order queues up behind it.
    let held = m.inner.core.lock().unwrap();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let m = m.clone();
            // Two threads ban the same address: one bans, the other finds the ban.
            let addr = ip(&format!("192.0.2.{}", i.min(6)));
            std::thread::spawn(move || {
                m.ban_blocking(BanOrder::from_request(
                    addr,
                    i,
                    request(BanReason::ForgedLocalSender, format!("order {i}")),
                ))
            })
        })
        .collect();
    while m.inner.queue.lock().unwrap().len() < 8 {
        std::thread::yield_now();
    }
    drop(held);
    let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap().unwrap()).collect();
    assert_eq!(m.stats().commits.load(Ordering::Relaxed), 1, "one transaction for the eight orders");
    let banned = outcomes.iter().filter(|o| matches!(o, BanOutcome::Banned(_))).count();
    let extended = outcomes.iter().filter(|o| matches!(o, BanOutcome::Extended(_))).count();
    assert_eq!((banned, extended), (7, 1));
    assert_eq!(*calls.lock().unwrap(), [7], "the group goes to the kernel in one call, each network once");
    // kill -9, reopen: all seven are in the database.
    drop(m);
    let m = open(dir.path(), &cfg, &clock);
    let nets: Vec<String> = m.list_blocking().unwrap().iter().map(|b| b.net.to_string()).collect();
    assert_eq!(nets, (0..7).map(|i| format!("192.0.2.{i}")).collect::<Vec<_>>());
    assert_eq!(m.history_blocking(None, 100).unwrap().len(), 7);
}

#[test]
fn many_threads_banning_at_once_lose_no_ban() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let cfg = BanConfig::default();
    let m = open(dir.path(), &cfg, &clock);
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 0..25u8 {
                    let addr = IpAddr::from([198, 51, t, i]);
                    let out = m
                        .ban_blocking(BanOrder::from_request(
                            addr,
                            1,
                            request(BanReason::UnknownRecipient, "RCPT".into()),
                        ))
                        .unwrap();
                    assert!(matches!(out, BanOutcome::Banned(_)), "{out:?}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(m.stats().recorded.load(Ordering::Relaxed), 200);
    assert_eq!(m.active().len(), 200);
    drop(m);
    let m = open(dir.path(), &cfg, &clock);
    assert_eq!(m.list_blocking().unwrap().len(), 200);
}

/// The cluster's side of the manager: decisions of this node enter the outbox in the ban's own
/// transaction; entries applied from the cluster never do; a lifting lifts only what was
/// decided before it; the longest expiry wins.
#[tokio::test]
async fn the_cluster_outbox_holds_own_decisions_and_shared_entries_apply_without_echo() {
    use crate::edges::SharedBan;
    use store::to_ms;
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let m = open(dir.path(), &BanConfig::default(), &clock);
    // Before the cluster is on, nothing is queued.
    BanSink::ban(&m, order("192.0.2.1", &clock)).await;
    assert!(m.outbox(10).await.unwrap().is_empty());
    m.enable_cluster();
    let mirror = Arc::new(Recorder::default());
    m.attach_mirror(mirror.clone());
    BanSink::ban(&m, order("192.0.2.2", &clock)).await;
    m.unban(Net::new(ip("192.0.2.1"), 32)).await.unwrap();
    let rows = m.outbox(10).await.unwrap();
    let shown: Vec<(String, bool)> = rows.iter().map(|r| (r.ban.net.to_string(), r.lifted)).collect();
    assert_eq!(shown, [("192.0.2.2".to_string(), false), ("192.0.2.1".to_string(), true)]);
    m.outbox_done(rows[1].id).await.unwrap();
    assert_eq!(m.outbox_len().await.unwrap(), 0);
    mirror.take();

    let now = to_ms(clock.wall());
    let entry = |net: &str, lifted: bool, at: i64, expires: i64| SharedBan {
        net: net.into(),
        lifted,
        at_ms: at,
        expires_ms: expires,
        reason: "B4".into(),
        session: 9,
        evidence: "RCPT TO:<x@example.test>".into(),
        offence: 1,
        node: "mx2".into(),
    };
    let day = DAY.as_millis() as i64;
    let applied = m
        .apply_shared(vec![
            // New here.
            entry("192.0.2.3", false, now, now + day),
            // Shorter than ours: nothing.
            entry("192.0.2.2", false, now, now + day),
            // Expired, and allowlisted-or-not does not matter: nothing.
            entry("192.0.2.4", false, now - 2 * day, now - day),
            // A lifting of a ban we never had: nothing.
            entry("192.0.2.5", true, now, now + day),
        ])
        .await
        .unwrap();
    assert_eq!(applied, 1);
    assert_eq!(mirror.take(), ["ban 192.0.2.3 86400"]);
    assert!(m.outbox(10).await.unwrap().is_empty(), "applied from the cluster: never published again");
    // Longer than ours: extended. A lifting older than our ban: ignored; newer: lifted.
    let ours = m.active().into_iter().find(|b| b.net.to_string() == "192.0.2.2").unwrap();
    let applied = m
        .apply_shared(vec![
            entry("192.0.2.2", false, now, now + 9 * day),
            entry("192.0.2.3", true, now - 1, now + day),
            entry("192.0.2.2", true, to_ms(ours.start) - 1, now + day),
        ])
        .await
        .unwrap();
    assert_eq!(applied, 1);
    assert_eq!(m.active().iter().find(|b| b.net.to_string() == "192.0.2.2").unwrap().total(), DAY * 9);
    let applied = m.apply_shared(vec![entry("192.0.2.3", true, now + 1, now + day)]).await.unwrap();
    assert_eq!(applied, 1);
    assert!(m.list_blocking().unwrap().iter().all(|b| b.net.to_string() != "192.0.2.3"));
    assert_eq!(mirror.take(), ["ban 192.0.2.2 777600", "unban 192.0.2.3"]);
    assert!(m.outbox(10).await.unwrap().is_empty());
    let events: Vec<String> = m.history_blocking(None, 3).unwrap().into_iter().map(|h| h.event).collect();
    assert_eq!(events, ["remove", "extend", "ban"]);
}
