//! Runs one scenario (variant): resolves its configuration, builds the turmoil world (six
//! hosts), steps it tick by tick while applying faults, and turns the world's ledgers into a
//! [`Report`].
//!
//! The run is a pure function of the scenario, the seed and the code: everything random is
//! drawn from the seed, and the only wall-clock readings (for progress and the
//! simulated/wall ratio) never reach the report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use gatekeeper::config::{Config, Overrides, Source};
use gatekeeper::gate::GateKind;

use crate::metrics::{Class, Delays, Final, flatten};
use crate::report::{ExpectResult, Report, Timing};
use crate::scenario::{FaultSpec, HOSTS, Run, host_of};
use crate::wake::Wakes;
use crate::world::{Resolved, Sabotage, World};

/// The simulation's wall-clock start (any fixed instant: the report must not depend on now).
pub const EPOCH_SECS: u64 = 1_795_000_000;

/// Progress callbacks: fraction done and simulated time.
pub trait Progress {
    /// Called every few hundred ticks.
    fn tick(&mut self, done: f64, simulated: Duration);
}

impl Progress for () {
    fn tick(&mut self, _: f64, _: Duration) {}
}

/// Builds the gatekeeper configuration and the world's parameters from a run.
pub fn resolve(run: &Run, sabotage: Sabotage) -> Result<Resolved, String> {
    let s = &run.scenario;
    // What the world decides: where the gatekeeper listens, that the kernel model in front of
    // it is the ban backend (the server then leaves G1 to the kernel, as in production), its
    // users, and the seed of its callbacks.
    let overrides = Overrides {
        listen: Some("0.0.0.0:25".into()),
        backend_from_gate: true,
        local_users: (0..s.local_users).map(|i| format!("user{i}")).collect(),
        callbacks_seed: Some(run.seed),
        ..Overrides::default()
    };
    let source = Source::Table { table: s.gatekeeper.clone(), base: run.path.parent() };
    let settings = Config::load(source, overrides).map_err(|e| format!("[gatekeeper]: {e}"))?;
    let config = settings.config.clone();
    if let Some(problem) = tick_problem(s.tick, &config) {
        return Err(problem);
    }
    if config.rules.scan && !matches!(config.scan.engine, gatekeeper::scan::Engine::Builtin) {
        return Err("[gatekeeper.scan]: the simulation runs the builtin engine only".into());
    }
    let domain = config.domains.local.first().cloned().ok_or("[gatekeeper.domains]: no local domain")?;
    let suffix = format!("@{domain}");
    let users: Vec<String> =
        config.domains.users.iter().filter_map(|u| u.strip_suffix(&suffix)).map(str::to_string).collect();
    // Actors write to users of the first domain; a log replay names its own recipients.
    if users.is_empty() && !s.actors.is_empty() {
        return Err(format!("no users in {domain}: set local_users or [gatekeeper.domains] users"));
    }
    let names = s.actor_names();
    let shares: Vec<Option<usize>> =
        s.actors.iter().map(|a| a.share.as_ref().and_then(|t| names.iter().position(|n| n == t))).collect();
    let mut next = [0u32; 8];
    // An actor that shares another's addresses has none of its own (an empty range).
    let ranges = s
        .actors
        .iter()
        .zip(&shares)
        .map(|(a, share)| {
            let start = next[a.kind.index()];
            let n = if share.is_some() { 0 } else { a.addresses };
            next[a.kind.index()] += n;
            (a.kind, start, start + n)
        })
        .collect();
    Ok(Resolved {
        run: run.clone(),
        settings,
        config,
        domain,
        users,
        remotes: s.remotes.clone(),
        actors: s.actors.clone(),
        faults: s.faults.clone(),
        client_kernel: s.client_kernel,
        duration: s.duration,
        horizon: s.duration + s.drain,
        tick: s.tick,
        honest_bans: s.invariants.honest_bans,
        sabotage,
        epoch: UNIX_EPOCH + Duration::from_secs(EPOCH_SECS),
        ranges,
        actor_names: names,
        shares,
        skip_quiet: true,
    })
}

/// A tick too coarse for the gatekeeper's waits. Delivery is rounded up to the tick, so a
/// round trip takes two ticks: once that reaches the shortest time the gatekeeper waits for a
/// peer on the network, every such exchange times out (every DNS lookup at a 5 s tick, with
/// the default 5 s `dns_timeout`), and the run tells of a world where no answer comes in time.
/// Below it, a scenario shows in its report that nothing timed out (`tempfails`,
/// `callbacks.unknown`).
fn tick_problem(tick: Duration, config: &gatekeeper::config::Config) -> Option<String> {
    use humantime_serde::re::humantime::format_duration;
    let c = &config.callbacks;
    let waits = [
        ("callbacks.dns_timeout", c.dns_timeout),
        ("callbacks.connect_timeout", c.connect_timeout),
        ("callbacks.command_timeout", c.command_timeout),
        ("smtp.command_timeout", config.smtp.command_timeout),
        ("delivery.relay_timeout", config.delivery.relay_timeout),
    ];
    let (name, wait) = waits.into_iter().filter(|(_, d)| !d.is_zero()).min_by_key(|&(_, d)| d)?;
    (2 * tick >= wait).then(|| {
        format!(
            "tick: {} makes a round trip {}, not shorter than [gatekeeper] {name} ({}): every such exchange would time out",
            format_duration(tick),
            format_duration(2 * tick),
            format_duration(wait),
        )
    })
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Partition(usize, usize),
    Repair(usize, usize),
    Slow(usize, usize, Duration),
    Fast(usize, usize),
    Crash { reboot: bool },
    Start,
    Clock { back: bool, by: Duration },
}

fn schedule(faults: &[FaultSpec]) -> Vec<(Duration, Action)> {
    let host = |h: &str| HOSTS.iter().position(|x| *x == h).expect("validated host");
    let mut out = Vec::new();
    for f in faults {
        match f {
            FaultSpec::Partition { a, b, from, until } => {
                out.push((*from, Action::Partition(host(a), host(b))));
                out.push((*until, Action::Repair(host(a), host(b))));
            }
            FaultSpec::Restart { at, downtime, reboot } => {
                out.push((*at, Action::Crash { reboot: *reboot }));
                out.push((*at + *downtime, Action::Start));
            }
            FaultSpec::Latency { a, b, latency, from, until } => {
                out.push((*from, Action::Slow(host(a), host(b), *latency)));
                out.push((*until, Action::Fast(host(a), host(b))));
            }
            FaultSpec::ClockJump { at, step } => out.push((*at, Action::Clock { back: step.back, by: step.by })),
            FaultSpec::DnsOutage { .. } | FaultSpec::MxTimeout { .. } | FaultSpec::SynAckLoss { .. } => {}
        }
    }
    out.sort_by_key(|(t, _)| *t);
    out
}

/// Runs one resolved scenario to its end and reports.
pub fn run(cfg: Resolved, progress: &mut dyn Progress) -> anyhow::Result<Report> {
    let wall = Instant::now();
    let state_dir = state_dir()?;
    let seed = cfg.run.seed;
    let tick = cfg.tick;
    let horizon = cfg.horizon;
    // The kernel model's Instants only need a common base; differences are what count.
    let world = World::new(cfg, wall);
    // Deadlines are noted only for a run that skips quiet time: nothing else would forget them.
    let wakes = world.cfg.skip_quiet.then(Wakes::install);
    let mut sim = turmoil::Builder::new()
        .simulation_duration(horizon + Duration::from_secs(3600))
        .tick_duration(tick)
        .epoch(world.cfg.epoch)
        .rng_seed(seed)
        .tcp_capacity(1 << 16)
        .udp_capacity(1 << 12)
        .build();
    {
        let (w, dir) = (world.clone(), state_dir.path().to_path_buf());
        sim.host(HOSTS[0], move || crate::gk::run(w.clone(), dir.clone()));
    }
    {
        let w = world.clone();
        sim.host(HOSTS[1], move || {
            let w = w.clone();
            async move {
                let std::net::IpAddr::V4(mx) = turmoil::lookup("mx") else { unreachable!("turmoil hosts are IPv4") };
                crate::dns::serve(w, mx).await
            }
        });
    }
    {
        let w = world.clone();
        sim.host(HOSTS[2], move || crate::remote::serve(w.clone()));
    }
    for host in &HOSTS[3..] {
        let w = world.clone();
        sim.host(*host, move || traffic(w.clone(), host));
    }
    // The end, on the tick grid: the run ticks to it (or skips quiet time towards it).
    let end = Duration::from_nanos((horizon.as_nanos().div_ceil(tick.as_nanos()) * tick.as_nanos()) as u64);
    let every = (end / 200).max(tick);
    let mut shown = Duration::ZERO;
    let mut actions = schedule(&world.cfg.faults).into_iter().peekable();
    let mut steps = 0u64;
    while sim.elapsed() < end {
        steps += 1;
        let now = sim.elapsed();
        while let Some((_, action)) = actions.next_if(|(t, _)| *t <= now) {
            match action {
                Action::Partition(a, b) => sim.partition(HOSTS[a], HOSTS[b]),
                Action::Repair(a, b) => sim.repair(HOSTS[a], HOSTS[b]),
                Action::Slow(a, b, latency) => sim.set_link_latency(HOSTS[a], HOSTS[b], latency),
                Action::Fast(a, b) => {
                    // Back to turmoil's default: 0–100 ms.
                    sim.set_link_latency(HOSTS[a], HOSTS[b], Duration::ZERO);
                    sim.set_link_max_message_latency(HOSTS[a], HOSTS[b], Duration::from_millis(100));
                }
                Action::Crash { reboot } => {
                    sim.crash(HOSTS[0]);
                    let mut st = world.state();
                    st.c.restarts += 1;
                    if reboot {
                        world.kernel().reboot();
                        st.kernel_lost = true;
                        st.machine_down = true;
                    }
                }
                Action::Start => {
                    world.state().machine_down = false;
                    sim.bounce(HOSTS[0]);
                }
                Action::Clock { back, by } => world.step_wall_clock(back, by),
            }
        }
        let until = actions.peek().map_or(end, |(t, _)| (*t).clamp(now, end));
        let step = wakes.as_ref().map_or(tick, |w| quiet_step(&sim, w, tick, until));
        sim.step_by(step).map_err(|e| anyhow::anyhow!("simulation failed at {:?}: {e}", sim.elapsed()))?;
        if sim.elapsed() >= shown + every {
            shown = sim.elapsed();
            progress.tick(shown.as_secs_f64() / end.as_secs_f64(), shown);
        }
    }
    progress.tick(1.0, sim.elapsed());
    world.check_still_deferred(sim.elapsed(), crate::mta::QUEUE_INTERVAL_MAX);
    world.check_shared_bans(sim.elapsed());
    drop(sim);
    let wall = wall.elapsed();
    let mut report = report(&world, wall);
    report.timing.steps = steps;
    Ok(report)
}

/// How far to step the simulation now: one tick while anything is on the network; when the
/// network is quiet, straight to the last tick boundary before the next timer of the world
/// ([`Wakes`]) or `until` (the next fault, the end), whichever comes first (at least one tick).
///
/// A timer inside a host fires on time within any step, and a message sent during a step is
/// delivered at the next one's start, long or not: landing on the same tick boundaries as
/// ticking through does, the run is the same (`sim/tests/quiet_time.rs`), but for events due
/// in the same millisecond, which tokio's timer wheel may order otherwise after a long step
/// (docs/simulation.md §2). One catch: a task woken at the very end of a step (by a timer due
/// then, or by such a task) runs at the start of the next one, so a step after a timer fired
/// is always a plain tick.
pub(crate) fn quiet_step(sim: &turmoil::Sim<'_>, wakes: &Wakes, tick: Duration, until: Duration) -> Duration {
    let now = sim.elapsed();
    let (passed, next) = wakes.around(now);
    // Before the first step no host has run, so none has set a timer yet.
    if now.is_zero() || passed.is_some_and(|t| t + tick > now) || !sim.network_quiet() {
        return tick;
    }
    let next = next.map_or(until, |w| w.min(until));
    let ticks = (next.saturating_sub(now).as_nanos() / tick.as_nanos()).clamp(1, u32::MAX as u128);
    tick * ticks as u32
}

/// A traffic host: the generators of the actors that run on it.
async fn traffic(world: Arc<World>, host: &'static str) -> turmoil::Result {
    for (i, a) in world.cfg.actors.iter().enumerate() {
        if host_of(a.kind) != host {
            continue;
        }
        let w = world.clone();
        if a.kind.is_mta() {
            tokio::spawn(crate::world::ACTOR.scope(i, crate::mta::generator(w, i)));
        } else {
            tokio::spawn(crate::world::ACTOR.scope(i, crate::actors::generator(w, i)));
        }
    }
    std::future::pending::<()>().await;
    Ok(())
}

/// The state directory of the gatekeeper (bans, callback cache): on tmpfs when there is one,
/// so that SQLite's fsyncs cost what they cost on a server's disk cache, not a laptop's SSD.
fn state_dir() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new().prefix("gatekeeper-sim-").tempdir_in(shm)
    {
        return Ok(d);
    }
    tempfile::Builder::new().prefix("gatekeeper-sim-").tempdir()
}

/// The report of a finished run (also the log replay's, which then sets its own span).
pub(crate) fn report(world: &World, wall: Duration) -> Report {
    let cfg = &world.cfg;
    let st = world.state();
    let fin = Final {
        pending: st.pending,
        delays: Delays::from_ms(st.delays_ms.clone()),
        banned_mtas: st.banned_ever.iter().filter(|a| Class::of(**a) == Some(Class::Honest)).count() as u64,
        banned_distinct: st.banned_ever.len() as u64,
        sim_hours: cfg.horizon.as_secs_f64() / 3600.0,
        addresses: st.seen.len() as u64,
    };
    let actors: Vec<(String, crate::metrics::ClassCounters)> =
        cfg.actor_names.iter().cloned().zip(st.actors.iter().copied()).collect();
    let metrics = flatten(&st.c, &fin, &actors);
    let mut expect = cfg.run.expect.clone();
    // The invariants always hold, whatever the file says.
    let zero = crate::scenario::Expectation::number(crate::scenario::Op::Eq, 0.0);
    expect.entry("violations".into()).or_insert(crate::scenario::Checks(vec![zero]));
    // A metric by name, or a time-windowed sum of the hourly buckets (`bans[2h..3h]`).
    let value = |name: &str| match crate::metrics::Window::parse(name) {
        Some(Ok(w)) => Some(w.value(&st.hours)),
        Some(Err(_)) => None,
        None => metrics.get(name).copied(),
    };
    let expectations: Vec<ExpectResult> = expect
        .iter()
        .flat_map(|(metric, checks)| checks.0.iter().map(move |e| (metric, e)))
        .map(|(metric, e)| {
            let actual = value(metric).unwrap_or(f64::NAN);
            let bound = e.bound.value(value).unwrap_or(f64::NAN);
            let expect = match e.bound.constant() {
                Some(_) => e.to_string(),
                None => format!("{e} (= {})", crate::fmt::num(bound)),
            };
            ExpectResult { metric: metric.clone(), expect, actual, pass: e.holds_against(actual, bound) }
        })
        .collect();
    let c = &cfg.settings.config;
    Report {
        scenario: cfg.run.name.clone(),
        file: cfg.run.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        description: cfg.run.scenario.description.trim().to_string(),
        seed: cfg.run.seed,
        setup: crate::report::Setup {
            duration_h: cfg.duration.as_secs_f64() / 3600.0,
            drain_h: (cfg.horizon - cfg.duration).as_secs_f64() / 3600.0,
            tick_ms: cfg.tick.as_secs_f64() * 1000.0,
            client_kernel: cfg.client_kernel.as_str().to_string(),
            gate: match c.gate.kind {
                GateKind::XtRecent { ip_list_tot, .. } => format!("xt_recent ip_list_tot={ip_list_tot}"),
                GateKind::Nft { size, .. } => format!("nft size={size}"),
            },
            window_s: c.gate.window.as_secs_f64(),
            ban_time_h: c.gate.ban_time.as_secs_f64() / 3600.0,
            b4_threshold: c.rules.b4_threshold,
            verify_senders: c.rules.verify_senders,
            scan: c.rules.scan,
            sabotage: format!("{:?}", cfg.sabotage),
        },
        passed: expectations.iter().all(|e| e.pass),
        expectations,
        metrics,
        violations: st.violations.clone(),
        hourly: st.hours.clone(),
        timing: Timing::measure(cfg.horizon, wall),
    }
}

/// Loads every scenario under `paths` and expands them into runs.
pub fn load(paths: &[PathBuf], seed: Option<u64>) -> anyhow::Result<Vec<Run>> {
    let files = crate::scenario::collect(paths)?;
    if files.is_empty() {
        anyhow::bail!("no scenario files in {paths:?}");
    }
    let mut runs = Vec::new();
    let mut problems = Vec::new();
    for f in &files {
        match crate::scenario::Scenario::load(f) {
            Ok(s) => runs.extend(s.runs(f, seed)),
            Err(e) => problems.push(e.to_string()),
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use gatekeeper::config::Config;

    use super::*;

    #[test]
    fn a_tick_whose_round_trip_reaches_a_gatekeeper_timeout_is_refused() {
        let defaults = Config::parse("").unwrap();
        assert_eq!(tick_problem(Duration::from_secs(2), &defaults), None);
        let problem = tick_problem(Duration::from_millis(2500), &defaults).unwrap();
        assert!(problem.contains("round trip 5s") && problem.contains("callbacks.dns_timeout (5s)"), "{problem}");
        // The shortest wait decides, whichever it is.
        let slow_dns = Config::parse("[callbacks]\ndns_timeout = \"20s\"\n").unwrap();
        assert_eq!(tick_problem(Duration::from_secs(4), &slow_dns), None);
        let problem = tick_problem(Duration::from_secs(5), &slow_dns).unwrap();
        assert!(problem.contains("callbacks.connect_timeout (10s)"), "{problem}");
    }
}
