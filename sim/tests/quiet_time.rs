//! Skipping quiet time (`gatekeeper_sim::wake`, turmoil's `Sim::step_by`) changes nothing but
//! the number of steps: a sparse night — a few honest MTAs, bounces and spammers, minutes
//! apart — gives the same report, byte for byte, whether the runner ticks through it or jumps
//! from one timer of the world to the next. A timer that a client, a queue or the resolver set
//! without noting it would show here as a late connection and a different report.

use std::path::Path;

use gatekeeper_sim::report::Report;
use gatekeeper_sim::runner;
use gatekeeper_sim::scenario::Scenario;
use gatekeeper_sim::world::Sabotage;

fn night(skip_quiet: bool) -> Report {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/quiet_night.toml");
    let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let run = s.runs(&path, None).remove(0);
    let mut cfg = runner::resolve(&run, Sabotage::None).unwrap_or_else(|e| panic!("{e}"));
    cfg.skip_quiet = skip_quiet;
    runner::run(cfg, &mut ()).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn skipping_quiet_time_changes_nothing_but_the_steps() {
    let (skipped, ticked) = (night(true), night(false));
    assert!(ticked.passed, "{}", ticked.table());
    assert!(ticked.metrics["sessions"] > 100.0, "the night has traffic: {}", ticked.table());
    let (a, b) = (serde_json::to_string_pretty(&skipped).unwrap(), serde_json::to_string_pretty(&ticked).unwrap());
    assert!(a == b, "skipping quiet time changed the report:\n--- skipped\n{a}\n--- ticked through\n{b}");
    // 3.5 h at 250 ms is 50,400 ticks; the night is mostly quiet.
    assert_eq!(ticked.timing.steps, 50_400);
    assert!(
        skipped.timing.steps * 4 < ticked.timing.steps,
        "skipping took {} steps of {}",
        skipped.timing.steps,
        ticked.timing.steps
    );
}
