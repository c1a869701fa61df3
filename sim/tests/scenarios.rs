//! The scenario suite as tests: every file loads; the same seed gives byte-identical reports
//! and another seed a different one; breaking a rule on purpose makes the suite's own
//! expectations fail. Runs are shortened so the debug build stays quick; the full suite runs
//! in release with the runner (`cargo run --release -p gatekeeper-sim -- run scenarios/`) or
//! `cargo test --release -p gatekeeper-sim -- --ignored`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gatekeeper_sim::report::Report;
use gatekeeper_sim::runner;
use gatekeeper_sim::scenario::{Run, Scenario};
use gatekeeper_sim::world::Sabotage;

fn scenarios() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
}

/// The runs of one scenario file, cut to `duration` (no drain).
fn short(file: &str, duration: Duration, seed: Option<u64>) -> Vec<Run> {
    let path = scenarios().join(file);
    let mut s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
    s.duration = duration;
    s.drain = Duration::ZERO;
    s.faults.retain(|f| !matches!(f, gatekeeper_sim::scenario::FaultSpec::Restart { .. }));
    s.runs(&path, seed)
}

fn run(r: &Run, sabotage: Sabotage) -> Report {
    let cfg = runner::resolve(r, sabotage).unwrap_or_else(|e| panic!("{}: {e}", r.name));
    runner::run(cfg, &mut ()).unwrap_or_else(|e| panic!("{}: {e:#}", r.name))
}

fn failed(r: &Report) -> Vec<&str> {
    r.expectations.iter().filter(|e| !e.pass).map(|e| e.metric.as_str()).collect()
}

#[test]
fn every_scenario_loads_and_resolves() {
    let runs = runner::load(&[scenarios()], None).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = runs.iter().map(|r| r.name.split('[').next().unwrap().to_string()).collect();
    for required in [
        "backscatter_flood",
        "null_sender_bounces",
        "fake_senders",
        "legit_queue_retries",
        "spike_4500",
        "callback_faults",
        "xt_recent_overflow",
        "restart_mid_flood",
        "honest_typos",
    ] {
        assert!(names.iter().any(|n| n == required), "scenario {required} missing from {names:?}");
    }
    for r in &runs {
        runner::resolve(r, Sabotage::None).unwrap_or_else(|e| panic!("{}: {e}", r.name));
        assert!(!r.expect.is_empty(), "{} has no expectations", r.name);
    }
}

#[test]
fn bad_scenarios_are_refused_with_every_problem() {
    let text = r#"
        seed = 1
        duration = "1h"
        tick = "11s"
        bogus = 1
    "#;
    let err = Scenario::parse(text, Path::new("bad.toml")).unwrap_err();
    assert!(err.to_string().contains("bogus"), "{err}");
    let text = r#"
        seed = 1
        duration = "1h"
        tick = "11s"
        [[actor]]
        kind = "fake_sender"
        addresses = 0
        rate = [["1h", 10], ["0h", 5]]
        [[fault]]
        kind = "partition"
        a = "gatekeeper"
        b = "nowhere"
        from = "2h"
        until = "1h"
        [expect]
        "no.such.metric" = ">= 1"
        attempts = "about 5"
    "#;
    let err = Scenario::parse(text, Path::new("bad.toml"));
    // An unparsable expectation is a parse error; fix it and see the rest listed together.
    assert!(err.unwrap_err().to_string().contains("about 5"));
    let text = text.replace("attempts = \"about 5\"", "");
    let err = Scenario::parse(&text, Path::new("bad.toml")).unwrap_err();
    let all = err.problems.join("\n");
    for needle in
        ["tick", "addresses", "times must increase", "senders", "nowhere", "from must be before", "no.such.metric"]
    {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
}

#[test]
fn same_seed_same_report_another_seed_another() {
    let quick = |seed| short("spike_4500.toml", Duration::from_secs(1200), Some(seed)).remove(0);
    let a = run(&quick(7), Sabotage::None);
    let b = run(&quick(7), Sabotage::None);
    let c = run(&quick(8), Sabotage::None);
    assert!(a.metrics["attempts"] > 1000.0, "{}", a.table());
    assert_eq!(a.json(), b.json());
    assert_eq!(a.markdown(), b.markdown());
    assert_eq!(a.svg().unwrap(), b.svg().unwrap());
    assert_ne!(a.json(), c.json(), "another seed must change the report");
    // Written out, the files are byte-identical too.
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    a.write(da.path()).unwrap();
    b.write(db.path()).unwrap();
    for f in ["report.json", "report.md", "hourly.svg"] {
        let read = |d: &Path| std::fs::read(d.join("spike_4500").join(f)).unwrap();
        assert_eq!(read(da.path()), read(db.path()), "{f} differs");
    }
}

#[test]
fn banning_null_senders_fails_the_suite() {
    // backscatter_flood, cut to 90 minutes: as written, nobody is banned and the invariants
    // hold; with a gatekeeper that bans `<>` senders refused at RCPT, its own expectations fail.
    let r = short("backscatter_flood.toml", Duration::from_secs(5400), None).remove(0);
    let good = run(&r, Sabotage::None);
    assert_eq!(good.metrics["violations"], 0.0, "{}", good.table());
    assert_eq!(good.metrics["bans"], 0.0);
    let bad = run(&r, Sabotage::BanNullSenders);
    assert!(!bad.passed, "{}", bad.table());
    let failed = failed(&bad);
    for metric in ["bans", "violations"] {
        assert!(failed.contains(&metric), "{metric} should fail: {failed:?}\n{}", bad.table());
    }
    assert!(bad.metrics["violations.protected_banned"] > 0.0);
    assert!(bad.metrics["kernel.drop_banned"] > 0.0, "the bans reached the kernel");
}

#[test]
fn a_ban_that_never_reaches_the_kernel_fails_the_suite() {
    // xt_recent_overflow with room for every ban: a backend that loses B1 bans lets banned
    // spammers back through the kernel, and the invariant checker says so.
    let runs = short("xt_recent_overflow.toml", Duration::from_secs(3600), None);
    let r = runs.iter().find(|r| r.name.contains("20000")).expect("variant");
    let good = run(r, Sabotage::None);
    assert_eq!(good.metrics["violations"], 0.0, "{}", good.table());
    let bad = run(r, Sabotage::LoseForgedBans);
    assert!(!bad.passed);
    assert!(bad.metrics["violations.ban_not_enforced"] > 0.0, "{}", bad.table());
    assert!(failed(&bad).contains(&"kernel.accepted_while_banned"), "{:?}", failed(&bad));
}

#[test]
fn a_shared_address_is_banned_only_for_what_an_offender_behind_it_did() {
    // shared_nat, cut to 2 h: the NAT's spammer is banned in the sessions that proved it, its
    // honest neighbour with it, and the oracle accepts those bans.
    let path = scenarios().join("shared_nat.toml");
    let mut s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
    (s.duration, s.drain) = (Duration::from_secs(7200), Duration::from_secs(3600));
    let r = s.runs(&path, None).remove(0);
    let good = run(&r, Sabotage::None);
    assert_eq!(good.metrics["violations"], 0.0, "{}", good.table());
    assert!(good.metrics["actor.nat_spammer.banned_in_session"] >= 1.0, "{}", good.table());
    assert_eq!(good.metrics["actor.nat_mta.bans"], good.metrics["actor.nat_spammer.bans"]);
    assert!(good.metrics["actor.nat_mta.bans"] >= 1.0);
    assert!(good.metrics["actor.postfix.sessions"] > 0.0);
    // Backscatter behind a spammer's address, banned for what the backscatter did (a gatekeeper
    // that bans `<>` senders): no offender earned those bans, and the oracle says so.
    let text = r#"
        seed = 3
        duration = "30m"
        tick = "250ms"
        local_users = 20
        [gatekeeper.server]
        hostname = "mx.example.test"
        [gatekeeper.gate.kind]
        backend = "nft"
        [[actor]]
        kind = "forged_local"
        name = "spam"
        addresses = 5
        rate = [["0h", 1]]
        [[actor]]
        kind = "backscatter"
        addresses = 5
        share = "spam"
        rate = [["0h", 200]]
    "#;
    let path = scenarios().join("inline.toml");
    let s = Scenario::parse(text, &path).unwrap_or_else(|e| panic!("{e}"));
    let r = s.runs(&path, None).remove(0);
    let bad = run(&r, Sabotage::BanNullSenders);
    assert!(bad.metrics["violations.protected_banned"] > 0.0, "{}", bad.table());
    assert!(bad.violations.iter().any(|v| v.detail.contains("earned by no offender")), "{}", bad.table());
    let good = run(&r, Sabotage::None);
    assert_eq!(good.metrics["violations"], 0.0, "{}", good.table());
}

#[test]
fn world_options_are_validated() {
    let text = r#"
        seed = 1
        duration = "1h"
        tick = "1s"
        [[remote]]
        pool = "p"
        domains = 1
        behaviour = "normal"
        [[actor]]
        kind = "dictionary"
        senders = "p"
        addresses = 2
        retry = true
        after_5xx = "rset"
        connections = 3
        share = "nobody"
        rate = [["0h", 1]]
        [[actor]]
        kind = "honest"
        senders = "p"
        addresses = 1
        connections = 0
        share = "honest"
        rate = [["0h", 1]]
        [[fault]]
        kind = "clock_jump"
        at = "2h"
        step = "+0s"
        [[fault]]
        kind = "syn_ack_loss"
        rate = 2
        from = "1h"
        until = "1h"
        [expect]
        "bans[0h..3h]" = "<= nothing.at.all"
    "#;
    let err = Scenario::parse(text, Path::new("bad.toml")).unwrap_err();
    let all = err.problems.join("\n");
    for needle in [
        "retry: only for backscatter",
        "after_5xx: only for honest and bounce",
        "connections: only for honest and bounce",
        "no actor named \"nobody\"",
        "connections: between 1 and 20",
        "cannot share with itself",
        "fault[0].at: within duration",
        "fault[0].step",
        "fault[1].rate",
        "fault[1]: from must be before until",
        "ends after the run",
        "unknown metric \"nothing.at.all\"",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
    assert!(Scenario::parse(&text.replace("+0s", "1d"), Path::new("bad.toml")).is_err(), "a step needs its sign");
}

/// The whole suite at full length (about a minute in release; several minutes in debug). Its
/// speed is the runner's to print (README), not a test's to assert.
#[test]
#[ignore = "full length: run with --release -- --ignored, or the runner"]
fn the_full_suite_passes() {
    let runs = runner::load(&[scenarios()], None).unwrap();
    let mut failures = Vec::new();
    for r in &runs {
        let report = run(r, Sabotage::None);
        if !report.passed {
            failures.push(report.table());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
