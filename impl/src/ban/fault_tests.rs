//! Ban manager tests for faults and bounds (issue 12): a damaged database moved aside, bad
//! rows skipped, refused commits enforced and retried, no kernel call under the core lock, the
//! session's wait bounded, the cap on active bans, many IPv6 bans widened to their /48.

use std::path::Path;
use std::sync::mpsc;

use super::tests::{DAY, Recorder, TestClock, gate, in_memory, ip, open, order, request};
use super::*;
use crate::edges::{BanOrder, BanSink};
use crate::policy::BanReason;

/// A B4 order for `addr` (an automatic ban).
fn b4(addr: &str, clock: &TestClock) -> BanOrder {
    let r = request(BanReason::UnknownRecipient, "RCPT TO:<nobody@example.test>".into());
    BanOrder::from_request(ip(addr), 7, r).decided_at(clock.wall()).lasting(4 * DAY)
}

#[tokio::test]
async fn a_damaged_state_database_is_moved_aside_and_bans_start_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_DB);
    std::fs::write(&path, b"SQLite format 3\0 but then garbage, not a database at all".repeat(100)).unwrap();
    let clock = TestClock::new();
    let m = open(dir.path(), &BanConfig::default(), &clock);
    let aside = crate::dbfile::aside_name(&path, clock.wall());
    assert!(aside.exists(), "the damaged file is kept beside for inspection");
    assert_eq!(m.restore().await.unwrap(), RestoreReport::default());
    m.ban(order("192.0.2.1", &clock)).await.unwrap();
    assert_eq!(m.list_blocking().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_rows_are_skipped_and_counted_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let cfg = BanConfig::default();
    let m = open(dir.path(), &cfg, &clock);
    m.ban(order("192.0.2.1", &clock)).await.unwrap();
    drop(m);
    let c = rusqlite::Connection::open(dir.path().join(STATE_DB)).unwrap();
    c.execute_batch(
        "INSERT INTO bans VALUES ('not a net', 'B1', 1, 'x', 0, 99999999999999, 1);
         INSERT INTO bans VALUES ('192.0.2.9', 'B99', 1, 'x', 0, 99999999999999, 1);
         INSERT INTO bans VALUES ('192.0.2.10', 'B1', 'text where a number goes', 'x', 0, 99999999999999, 1);",
    )
    .unwrap();
    drop(c);
    let m = open(dir.path(), &cfg, &clock);
    let report = m.restore().await.unwrap();
    assert_eq!(report.restored, 1, "the good ban comes back");
    assert_eq!(m.stats().bad_rows.load(Ordering::Relaxed), 3);
    // A bad row does not stop a ban of its network either.
    let r = m.ban(order("192.0.2.9", &clock)).await.unwrap();
    assert!(matches!(r, BanOutcome::Banned(_)), "{r:?}");
    assert_eq!(m.list_blocking().unwrap().len(), 2);
}

/// Makes every write to `bans` fail, as a full disk would, until [`heal`].
fn break_db(dir: &Path) {
    let c = rusqlite::Connection::open(dir.join(STATE_DB)).unwrap();
    c.execute_batch(
        "CREATE TRIGGER no_space BEFORE INSERT ON bans BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END;",
    )
    .unwrap();
}

fn heal(dir: &Path) {
    let c = rusqlite::Connection::open(dir.join(STATE_DB)).unwrap();
    c.execute_batch("DROP TRIGGER no_space;").unwrap();
}

#[tokio::test]
async fn a_refused_commit_is_enforced_answered_unsaved_alarmed_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let cfg = BanConfig::default();
    let m = open(dir.path(), &cfg, &clock);
    let mirror = Arc::new(Recorder::default());
    m.attach_mirror(mirror.clone());
    m.restore().await.unwrap();
    m.tick().await;
    break_db(dir.path());
    let r = m.ban(order("192.0.2.1", &clock)).await;
    assert!(matches!(r, Err(BanError::Unsaved { .. })), "the answer does not pretend: {r:?}");
    assert_eq!(m.stats().commit_failures.load(Ordering::Relaxed), 1);
    assert_eq!(m.unsaved_len(), 1);
    // Enforced all the same: in process and in the backend.
    assert_eq!(mirror.take(), ["ban 192.0.2.1 345600"]);
    assert_eq!(m.active().len(), 1);
    // A sync pass (the database changed: the trigger) must not take it for lifted elsewhere.
    clock.advance(Duration::from_secs(1));
    m.tick().await;
    assert_eq!(m.active().len(), 1);
    assert!(mirror.take().is_empty());
    assert!(m.stats().commit_failures.load(Ordering::Relaxed) >= 2, "the retry failed and counted again");
    heal(dir.path());
    clock.advance(cfg.retry_interval);
    m.tick().await;
    assert_eq!(m.unsaved_len(), 0);
    assert_eq!(m.stats().commit_recovered.load(Ordering::Relaxed), 1);
    // kill -9: it is in the database now.
    drop(m);
    let m = open(dir.path(), &cfg, &clock);
    assert_eq!(m.list_blocking().unwrap().len(), 1);
}

/// A backend whose `apply` waits until released, to show who waits for the kernel.
#[derive(Debug)]
struct Gate {
    entered: Mutex<mpsc::Sender<()>>,
    release: Mutex<mpsc::Receiver<()>>,
}

impl BanBackend for Gate {
    fn kind(&self) -> BackendKind {
        BackendKind::Nftables
    }
    fn apply(&self, _: Net, _: Duration, _: Duration) -> Result<(), BackendError> {
        self.entered.lock().unwrap().send(()).unwrap();
        let _ = self.release.lock().unwrap().recv();
        Ok(())
    }
    fn remove(&self, _: Net) -> Result<(), BackendError> {
        Ok(())
    }
    fn expires_itself(&self) -> bool {
        true
    }
    fn list(&self) -> Result<Option<crate::ban::NetList>, BackendError> {
        Ok(None)
    }
}

fn gated(cfg: &BanConfig, clock: &Arc<TestClock>, offload: bool) -> (BanManager, mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let backend = Box::new(Gate { entered: Mutex::new(entered_tx), release: Mutex::new(release_rx) });
    let m = BanManager::new(cfg, &gate(), BanStore::in_memory().unwrap(), backend, clock.clone(), offload);
    (m, entered, release)
}

#[test]
fn a_hung_kernel_call_does_not_hold_the_managers_lock() {
    let clock = TestClock::new();
    let (m, entered, release) = gated(&BanConfig::default(), &clock, false);
    let banning = {
        let (m, o) = (m.clone(), order("192.0.2.1", &clock));
        std::thread::spawn(move || m.ban_blocking(o))
    };
    entered.recv().unwrap();
    // The kernel call is under way: the manager's state, the database and other commits are
    // all reachable meanwhile.
    assert_eq!(m.active().len(), 1, "committed before the kernel call");
    assert_eq!(m.list_blocking().unwrap().len(), 1);
    let other = {
        let (m, o) = (m.clone(), order("192.0.2.2", &clock));
        std::thread::spawn(move || m.ban_blocking(o))
    };
    while m.list_blocking().unwrap().len() < 2 {
        std::thread::yield_now();
    }
    // The second one's kernel call waits its turn, after the first.
    release.send(()).unwrap();
    entered.recv().unwrap();
    release.send(()).unwrap();
    assert!(matches!(banning.join().unwrap(), Ok(BanOutcome::Banned(_))));
    assert!(matches!(other.join().unwrap(), Ok(BanOutcome::Banned(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_stops_waiting_for_its_ban_after_order_timeout() {
    let clock = TestClock::new();
    let cfg = BanConfig { order_timeout: Duration::from_millis(100), ..BanConfig::default() };
    let (m, entered, release) = gated(&cfg, &clock, true);
    // Returns although the kernel call hangs.
    BanSink::ban(&m, order("192.0.2.1", &clock)).await;
    assert_eq!(m.stats().order_timeouts.load(Ordering::Relaxed), 1);
    entered.recv().unwrap();
    assert_eq!(m.list_blocking().unwrap().len(), 1, "the order goes on in the background");
    release.send(()).unwrap();
}

#[tokio::test]
async fn the_ban_table_is_capped_without_evicting_older_bans() {
    let clock = TestClock::new();
    let cfg = BanConfig { max_active: 3, ..BanConfig::default() };
    let m = in_memory(&cfg, &gate(), &clock);
    let mirror = Arc::new(Recorder::default());
    m.attach_mirror(mirror.clone());
    for i in 1..=3 {
        let r = m.ban(b4(&format!("192.0.2.{i}"), &clock)).await.unwrap();
        assert!(matches!(r, BanOutcome::Banned(_)), "{r:?}");
    }
    mirror.take();
    let r = m.ban(b4("192.0.2.4", &clock)).await.unwrap();
    assert_eq!(r, BanOutcome::Refused("192.0.2.4".parse().unwrap()));
    assert_eq!(m.stats().refused_full.load(Ordering::Relaxed), 1);
    assert_eq!(mirror.take(), ["unban 192.0.2.4"], "the server's own in-process ban is undone");
    // An existing ban may still be extended, a manual one still goes in; nothing was evicted.
    clock.advance(DAY);
    assert!(matches!(m.ban(b4("192.0.2.1", &clock)).await.unwrap(), BanOutcome::Extended(_)));
    assert!(matches!(m.ban(BanOrder::manual(ip("192.0.2.5"), "admin")).await.unwrap(), BanOutcome::Banned(_)));
    let nets: Vec<String> = m.active().iter().map(|b| b.net.to_string()).collect();
    assert_eq!(nets, ["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.5"]);
}

#[tokio::test]
async fn many_64s_in_one_48_are_widened_to_the_48() {
    let dir = tempfile::tempdir().unwrap();
    let clock = TestClock::new();
    let cfg = BanConfig { widen_v6_after: 4, ..BanConfig::default() };
    let m = open(dir.path(), &cfg, &clock);
    let mirror = Arc::new(Recorder { wide: true, ..Recorder::default() });
    m.attach_mirror(mirror.clone());
    // Another /48 does not count towards this one.
    m.ban(b4("2001:db8:9::1", &clock)).await.unwrap();
    for i in 1..=3 {
        m.ban(b4(&format!("2001:db8:1:{i}::1"), &clock)).await.unwrap();
        clock.advance(Duration::from_secs(60));
    }
    assert_eq!(m.active().len(), 4, "three are not enough");
    mirror.take();
    let r = m.ban(b4("2001:db8:1:4::1", &clock)).await.unwrap();
    assert!(matches!(r, BanOutcome::Banned(_)), "{r:?}");
    let nets: Vec<String> = m.active().iter().map(|b| b.net.to_string()).collect();
    assert_eq!(nets, ["2001:db8:1::/48", "2001:db8:9::/64"]);
    assert_eq!(m.stats().widened.load(Ordering::Relaxed), 1);
    let ops = mirror.take();
    assert_eq!(ops.last().map(String::as_str), Some("ban 2001:db8:1::/48 345600"), "{ops:?}");
    assert_eq!(ops.iter().filter(|o| o.starts_with("unban ")).count(), 4, "{ops:?}");
    // A later offence inside it extends the /48; the database holds the /48 alone.
    clock.advance(DAY);
    let r = m.ban(b4("2001:db8:1:77::1", &clock)).await.unwrap();
    let BanOutcome::Extended(b) = r else { panic!("{r:?}") };
    assert_eq!(b.net.to_string(), "2001:db8:1::/48");
    let stored: Vec<String> = m.list_blocking().unwrap().iter().map(|b| b.net.to_string()).collect();
    assert_eq!(stored, ["2001:db8:1::/48", "2001:db8:9::/64"]);
    let widen = m.history_blocking(None, 100).unwrap().iter().filter(|h| h.event == "widen").count();
    assert_eq!(widen, 4);
    // Restart: the /48 comes back as it is (not re-keyed to a /64).
    drop(m);
    let m = open(dir.path(), &cfg, &clock);
    let mirror = Arc::new(Recorder { wide: true, ..Recorder::default() });
    m.attach_mirror(mirror.clone());
    assert_eq!(m.restore().await.unwrap().restored, 2);
    // Extended a day after it began: four days from then.
    assert!(mirror.take().contains(&format!("ban 2001:db8:1::/48 {}", (4 * DAY).as_secs())));
    // It can be lifted by name.
    let wide = m.key_of("2001:db8:1::/48".parse().unwrap()).unwrap();
    assert!(m.unban(wide).await.unwrap().is_some());
}

#[tokio::test]
async fn a_gate_that_cannot_hold_a_48_keeps_its_own_keys() {
    let clock = TestClock::new();
    let cfg = BanConfig { widen_v6_after: 2, ..BanConfig::default() };
    let m = in_memory(&cfg, &gate(), &clock);
    let mirror = Arc::new(Recorder::default());
    m.attach_mirror(mirror.clone());
    m.ban(b4("2001:db8:1:1::1", &clock)).await.unwrap();
    m.ban(b4("2001:db8:1:2::1", &clock)).await.unwrap();
    assert_eq!(m.active().len(), 1, "widened");
    // No unban of the narrow keys and no /48 it cannot hold: the narrow bans run out on their own.
    assert_eq!(mirror.take(), ["ban 2001:db8:1:1:: 345600", "ban 2001:db8:1:2:: 345600"]);
    m.ban(b4("2001:db8:1:3::1", &clock)).await.unwrap();
    assert_eq!(mirror.take(), ["ban 2001:db8:1:3:: 345600"], "a later offence bans its own key");
}

#[tokio::test]
async fn no_widening_with_xt_recent_or_over_the_allowlist() {
    let clock = TestClock::new();
    let cfg = BanConfig { widen_v6_after: 2, allowlist: vec!["2001:db8:1:ff::/64".into()], ..BanConfig::default() };
    let m = in_memory(&cfg, &gate(), &clock);
    m.ban(b4("2001:db8:1:1::1", &clock)).await.unwrap();
    m.ban(b4("2001:db8:1:2::1", &clock)).await.unwrap();
    assert_eq!(m.active().len(), 2, "the /48 holds an allowlisted network");
    let xt = BanConfig { backend: BackendKind::XtRecent, widen_v6_after: 2, ..BanConfig::default() };
    assert!(!xt.widens(64));
    assert!(!BanConfig { widen_v6_after: 2, ..BanConfig::default() }.widens(48));
}
