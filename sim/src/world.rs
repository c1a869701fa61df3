//! The shared world of one run: simulated time, the kernel firewall model in front of the
//! gatekeeper host, the ground-truth ledgers (bans as decided, messages spooled) and the
//! invariant checkers that read them as events happen. The gatekeeper's own ban database
//! lives in its state directory, like on a real disk (see [`crate::gk`]).
//!
//! Everything here is shared by all hosts through one `Arc<World>`. turmoil runs every host on
//! one thread, so the mutexes are never contended; no lock is held across an `await`.
//! Maps are `BTreeMap`s: nothing observable depends on hash order.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;
use rand::rngs::SmallRng;

use gatekeeper::ban::Net;
use gatekeeper::config::{Config, Settings};
use gatekeeper::gate::{Gate, GateConfig, GateDecision};
use gatekeeper::policy::BanReason;

use crate::invariants::{Invariant, Violation};
use crate::metrics::{Class, ClassCounters, Counters, Hour};
use crate::scenario::{ActorSpec, Behaviour, ClientKernel, FaultSpec, HonestBans, RemotePool, Run};

/// A rule broken on purpose, to prove the suite notices (tests and `--sabotage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Sabotage {
    /// Nothing broken.
    #[default]
    None,
    /// Ban every client refused at RCPT, `<>` senders included (B4 without its `<>` exception).
    BanNullSenders,
    /// The ban backend drops B1 bans (forged local senders stay free to come back).
    LoseForgedBans,
}

/// The run, resolved: the gatekeeper's validated settings and the world's parameters.
#[derive(Debug)]
pub struct Resolved {
    /// Name, seed and expectations.
    pub run: Run,
    /// The gatekeeper's settings (built from `[gatekeeper]` plus what the world sets).
    pub settings: Settings,
    /// The configuration text the gatekeeper was built from (for the report).
    pub config: Config,
    /// The first local domain.
    pub domain: String,
    /// Local parts that exist in `domain` (configured users plus `local_users`).
    pub users: Vec<String>,
    /// Remote pools.
    pub remotes: Vec<RemotePool>,
    /// Actors.
    pub actors: Vec<ActorSpec>,
    /// Faults.
    pub faults: Vec<FaultSpec>,
    /// Clients' SYN schedule.
    pub client_kernel: ClientKernel,
    /// New work stops here.
    pub duration: Duration,
    /// Total simulated time (duration + drain).
    pub horizon: Duration,
    /// turmoil tick.
    pub tick: Duration,
    /// Whether honest bans are violations.
    pub honest_bans: HonestBans,
    /// The rule broken on purpose.
    pub sabotage: Sabotage,
    /// Wall-clock time at the start of the simulation.
    pub epoch: std::time::SystemTime,
    /// Each actor's addresses: its class and the range `start..end` of address numbers.
    pub ranges: Vec<(Class, u32, u32)>,
    /// Each actor's name in metrics (`actor.<name>.*`).
    pub actor_names: Vec<String>,
    /// For each actor, the actor whose addresses it uses (`share`), if any.
    pub shares: Vec<Option<usize>>,
    /// Skip quiet time ([`crate::wake`]); off only to show that skipping changes nothing.
    pub skip_quiet: bool,
}

impl Resolved {
    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&RemotePool> {
        self.remotes.iter().find(|p| p.pool == name)
    }

    /// The behaviour of a remote domain `d<i>.<pool>.remote.test`.
    pub fn behaviour_of(&self, domain: &str) -> Option<Behaviour> {
        let rest = domain.strip_suffix(".remote.test")?;
        let (_, pool) = rest.split_once('.')?;
        self.pool(pool).map(|p| p.behaviour)
    }

    /// Whether a fault of this kind is active at `now`.
    pub fn dns_down(&self, now: Duration) -> bool {
        self.faults.iter().any(|f| matches!(f, FaultSpec::DnsOutage { from, until } if *from <= now && now < *until))
    }

    /// The `i`-th address of actor `index` (another actor's, for an actor that shares them).
    pub fn addr_of(&self, index: usize, i: u32) -> IpAddr {
        let owner = self.shares[index].unwrap_or(index);
        self.actors[owner].addr(self.ranges[owner].1, i)
    }

    /// The SYN-ACK loss rate at `now` (`syn_ack_loss` faults), 0 if none.
    pub fn syn_ack_loss(&self, now: Duration) -> f64 {
        self.faults
            .iter()
            .filter_map(|f| match f {
                FaultSpec::SynAckLoss { rate, from, until } if *from <= now && now < *until => Some(*rate),
                _ => None,
            })
            .fold(0.0, f64::max)
    }

    /// Whether the remote MX is hanging at `now`.
    pub fn mx_hanging(&self, now: Duration) -> bool {
        self.faults.iter().any(|f| matches!(f, FaultSpec::MxTimeout { from, until } if *from <= now && now < *until))
    }
}

/// One ban as decided (the ground truth the checkers compare the firewall against).
#[derive(Debug, Clone, Copy)]
pub struct BanEntry {
    /// Why.
    pub reason: BanReason,
    /// When it was decided (simulated time).
    pub at: Duration,
    /// When it ends.
    pub expires: Duration,
}

/// The kernel firewall model: the gatekeeper's own `recent` table code, configured like the
/// kernel (`[gatekeeper.gate]`), consulted with each client's PROXY address for every SYN.
#[derive(Debug)]
pub struct Kernel {
    gate: Gate,
    cfg: GateConfig,
    origin: Instant,
    /// Times the tables may have lost a ban the gatekeeper did not remove: a reboot, an add
    /// refused or evicting another entry ([`KernelBackend::may_have_lost`](crate::gk::KernelBackend)).
    losses: u64,
}

impl Kernel {
    fn new(cfg: GateConfig, origin: Instant) -> Kernel {
        Kernel { gate: Gate::new(cfg.clone(), origin), cfg, origin, losses: 0 }
    }

    /// One SYN.
    pub fn syn(&mut self, now: Duration, addr: IpAddr) -> GateDecision {
        self.gate.check(self.origin + now, addr)
    }

    /// A ban pushed by the gatekeeper (`+addr` / `add element`).
    pub fn ban(&mut self, now: Duration, addr: IpAddr, for_: Duration) {
        // A full xt_recent table evicts an entry for a new one (or the same one refreshed:
        // counting it too only costs a needless read-back).
        let evicts = self.may_have_evicted();
        if !self.gate.ban(self.origin + now, addr, for_) || evicts {
            self.losses += 1;
        }
    }

    /// A ban lifted by the gatekeeper at its expiry.
    pub fn unban(&mut self, addr: IpAddr) {
        self.gate.unban(addr);
    }

    /// A reboot: the tables are empty again.
    pub fn reboot(&mut self) {
        self.gate = Gate::new(self.cfg.clone(), self.origin);
        self.losses += 1;
    }

    /// How many times the tables may have lost a ban the gatekeeper did not remove.
    pub fn losses(&self) -> u64 {
        self.losses
    }

    /// Occupancy of the ban tables.
    pub fn banned_len(&self) -> usize {
        self.gate.banned_len()
    }

    /// What the ban tables hold at `now` (addresses, IPv6 networks by their first address), as
    /// `/proc/net/xt_recent` or `nft list set` would list it.
    pub fn banned(&self, now: Duration) -> Vec<IpAddr> {
        self.gate.banned(self.origin + now).collect()
    }

    /// Whether a full table explains a ban missing from it: xt_recent evicts its least
    /// recently stamped entry once `ip_list_tot` entries (per family) are held (docs/kernel.md §4.1).
    pub fn may_have_evicted(&self) -> bool {
        match self.cfg.kind {
            gatekeeper::gate::GateKind::XtRecent { ip_list_tot, .. } => self.gate.banned_len() >= ip_list_tot as usize,
            gatekeeper::gate::GateKind::Nft { .. } => false,
        }
    }
}

tokio::task_local! {
    /// The actor (index) whose task is running: its counters get what its clients do, even
    /// from an address it shares with another actor (`share`). Unset on the gatekeeper's and
    /// the remote hosts, where the address decides.
    pub static ACTOR: usize;
}

/// The actor an address belongs to.
pub fn actor_of(ranges: &[(Class, u32, u32)], class: Class, addr: IpAddr) -> Option<usize> {
    let n = Class::ordinal(addr)?;
    ranges.iter().position(|&(c, start, end)| c == class && start <= n && n < end)
}

/// A message in the spool (the gatekeeper's downstream; survives restarts like a disk).
#[derive(Debug, Clone, Copy)]
pub struct Spooled {
    /// First spooled at.
    pub at: Duration,
    /// Times spooled.
    pub copies: u32,
}

/// Mutable world state.
#[derive(Debug, Default)]
pub struct State {
    /// Counters.
    pub c: Counters,
    /// Hourly buckets.
    pub hours: Vec<Hour>,
    /// The latest ban of each ban key ([`World::ban_key`]: an IPv4 address or an IPv6
    /// network), as decided.
    pub bans: BTreeMap<IpAddr, BanEntry>,
    /// Addresses banned at least once.
    pub banned_ever: BTreeSet<IpAddr>,
    /// When each ban key was banned (only with `bans.escalation`, to mirror its lengths).
    pub ban_times: BTreeMap<IpAddr, Vec<Duration>>,
    /// Spooled messages by id.
    pub spool: BTreeMap<u64, Spooled>,
    /// The first violations (all are counted).
    pub violations: Vec<Violation>,
    /// Delivery delays of honest and bounce messages, ms.
    pub delays_ms: Vec<u64>,
    /// Honest and bounce messages queued now.
    pub pending: u64,
    /// Set by a reboot: the gatekeeper must re-apply its bans to the kernel when it starts.
    pub kernel_lost: bool,
    /// The gatekeeper's machine is rebooting: SYNs get no answer at all (not a refusal: no
    /// kernel is there to send a RST), so clients retransmit on their schedule.
    pub machine_down: bool,
    /// A log replay (`crate::replay`): clients are the log's own addresses, not actors, so a
    /// ban of an address of no class is a finding, not a violation.
    pub replay: bool,
    /// Distinct client addresses that tried to connect.
    pub seen: BTreeSet<IpAddr>,
    /// Per actor, the same counters as per class.
    pub actors: Vec<ClassCounters>,
    /// When each ban key ended a probe-shaped session (a non-null sender, one recipient,
    /// refused as unknown, no DATA): what B4 remembers for its window.
    pub probes: BTreeMap<IpAddr, Vec<Duration>>,
    /// Honest and bounce messages still queued: id → (MTA, submitted and first tried).
    pub queued: BTreeMap<u64, (IpAddr, Duration)>,
    /// Bans of addresses shared by a protected actor and an offender, judged at the end: each
    /// must have been earned by an offender's session behind it (ban key, decided at, why).
    pub shared_bans: Vec<(IpAddr, Duration, BanReason)>,
    /// Bans an offender's session proved it earned (ban key, decided at).
    pub earned: BTreeSet<(IpAddr, Duration)>,
    ranges: Vec<(Class, u32, u32)>,
}

/// Violations kept with their details.
const VIOLATIONS_KEPT: usize = 50;

impl State {
    /// Records a violation.
    pub fn violate(&mut self, now: Duration, invariant: Invariant, client: impl ToString, detail: String) {
        self.c.violations[invariant as usize] += 1;
        if self.violations.len() < VIOLATIONS_KEPT {
            self.violations.push(Violation {
                at_secs: now.as_secs_f64(),
                invariant,
                client: client.to_string(),
                detail,
            });
        }
    }

    /// Counts for the actor whose task runs ([`ACTOR`]) and its class, or else for the class
    /// and the actor of `addr`.
    pub fn bump(&mut self, addr: IpAddr, f: impl Fn(&mut ClassCounters)) {
        if let Ok(i) = ACTOR.try_with(|i| *i) {
            return self.bump_actor(i, f);
        }
        let Some(class) = Class::of(addr) else { return };
        f(self.c.of(class));
        if let Some(i) = actor_of(&self.ranges, class, addr) {
            f(&mut self.actors[i]);
        }
    }

    /// Counts for actor `i` and its class.
    pub fn bump_actor(&mut self, i: usize, f: impl Fn(&mut ClassCounters)) {
        f(self.c.of(self.ranges[i].0));
        f(&mut self.actors[i]);
    }

    /// The hourly bucket of `now`.
    pub fn hour(&mut self, now: Duration) -> &mut Hour {
        let i = (now.as_secs() / 3600) as usize;
        if self.hours.len() <= i {
            self.hours.resize(i + 1, Hour::default());
        }
        &mut self.hours[i]
    }
}

/// Everything shared by the hosts of one run.
#[derive(Debug)]
pub struct World {
    /// The resolved scenario.
    pub cfg: Resolved,
    /// The kernel firewall model in front of the gatekeeper.
    pub kernel: Mutex<Kernel>,
    state: Mutex<State>,
    /// Tolerance when comparing a ban's expiry with the firewall: the ban manager lifts due
    /// bans on its next maintenance pass (`bans.sync_interval`), plus two jiffies.
    pub expiry_slack: Duration,
    /// Tolerance the other way: the kernel may forget a ban up to two jiffies before its exact
    /// end (xt_recent's `--seconds` window runs from the jiffy the ban was stamped in).
    pub jiffy_slack: Duration,
    /// Addresses (ban keys) that several actors use (`share`): the actors behind each.
    pub shared: BTreeMap<IpAddr, Vec<usize>>,
    /// How far the gatekeeper host's wall clock has been stepped (`clock_jump`), in ms.
    pub wall_step_ms: Arc<AtomicI64>,
    /// Draws SYN-ACK losses (`syn_ack_loss`), in the order SYNs happen.
    syn_ack_rng: Mutex<SmallRng>,
}

impl World {
    /// A new world. `origin` is an arbitrary base for the kernel model's `Instant`s: only
    /// differences from it matter.
    pub fn new(cfg: Resolved, origin: Instant) -> Arc<World> {
        let gate = cfg.settings.config.gate.clone();
        let hz = gate.kind.hz().max(1);
        let jiffy_slack = Duration::from_nanos(2 * 1_000_000_000 / u64::from(hz) + 1_000_000);
        let expiry_slack = cfg.settings.config.bans.sync_interval + jiffy_slack;
        let hours = cfg.horizon.as_secs().div_ceil(3600) as usize;
        let key = |a: IpAddr| Net::ban_key(a, gate.ipv6_prefix).addr();
        let mut shared: BTreeMap<IpAddr, Vec<usize>> = BTreeMap::new();
        for (i, owner) in cfg.shares.iter().enumerate() {
            let Some(owner) = *owner else { continue };
            for n in 0..cfg.actors[i].addresses {
                let users = shared.entry(key(cfg.addr_of(i, n))).or_insert_with(|| vec![owner]);
                if !users.contains(&i) {
                    users.push(i);
                }
            }
        }
        let syn_ack_rng = Mutex::new(crate::profile::rng(cfg.run.seed, "syn-ack-loss", 0));
        let state = State {
            hours: vec![Hour::default(); hours.max(1)],
            actors: vec![ClassCounters::default(); cfg.ranges.len()],
            ranges: cfg.ranges.clone(),
            ..State::default()
        };
        Arc::new(World {
            kernel: Mutex::new(Kernel::new(gate, origin)),
            state: Mutex::new(state),
            cfg,
            expiry_slack,
            jiffy_slack,
            shared,
            wall_step_ms: Arc::new(AtomicI64::new(0)),
            syn_ack_rng,
        })
    }

    /// Steps the gatekeeper host's wall clock (`clock_jump`).
    pub fn step_wall_clock(&self, back: bool, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.wall_step_ms.fetch_add(if back { -ms } else { ms }, Ordering::Relaxed);
    }

    /// Whether the SYN-ACK answering a SYN accepted now is lost (`syn_ack_loss`). Draws only
    /// while such a fault is active, so other runs' numbers do not move.
    pub fn syn_ack_lost(&self, now: Duration) -> bool {
        let rate = self.cfg.syn_ack_loss(now);
        rate > 0.0 && self.syn_ack_rng.lock().expect("syn-ack rng").random_bool(rate)
    }

    /// An offender's session proved it earned the ban decided at `at` (see
    /// [`State::shared_bans`]).
    pub fn earned(&self, st: &mut State, addr: IpAddr, at: Duration) {
        if self.shared.contains_key(&self.ban_key(addr)) {
            st.earned.insert((self.ban_key(addr), at));
        }
    }

    /// At the end of the run: a ban of an address that a protected actor shares with an
    /// offender is fair only if an offender's session behind it earned it; the protected
    /// actor then waits for the ban like any client of that address (its mail is deferred,
    /// never refused), which its own counters show.
    pub fn check_shared_bans(&self, now: Duration) {
        let mut st = self.state();
        let unearned: Vec<(IpAddr, Duration, BanReason)> =
            st.shared_bans.iter().filter(|(k, at, _)| !st.earned.contains(&(*k, *at))).copied().collect();
        for (key, at, reason) in unearned {
            let detail = format!(
                "shared address banned ({}) at {:.0} s, earned by no offender's session behind it",
                reason.as_str(),
                at.as_secs_f64()
            );
            st.violate(now, Invariant::ProtectedBanned, key, detail);
        }
    }

    /// Simulated time since the start (exact inside a host, between ticks too).
    pub fn now(&self) -> Duration {
        turmoil::sim_elapsed().unwrap_or_default()
    }

    /// The mutable state.
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("world state")
    }

    /// The kernel model.
    pub fn kernel(&self) -> MutexGuard<'_, Kernel> {
        self.kernel.lock().expect("kernel model")
    }

    /// What a ban of `addr` covers, as the gatekeeper keys it: the address (IPv4) or its
    /// network (IPv6, `[gate] ipv6_prefix`), given by its first address.
    pub fn ban_key(&self, addr: IpAddr) -> IpAddr {
        Net::ban_key(addr, self.cfg.settings.config.gate.ipv6_prefix).addr()
    }

    /// The ledger's ban covering `addr`, if one was decided.
    pub fn ban_of<'s>(&self, st: &'s State, addr: IpAddr) -> Option<&'s BanEntry> {
        st.bans.get(&self.ban_key(addr))
    }

    /// Whether `addr` may still be banned at `now` (per the ledger): the ban has not ended,
    /// or ended so recently that the firewall may not have lifted it yet. A drop or a 554
    /// outside this is a ban outliving its expiry.
    pub fn ban_live(&self, st: &State, addr: IpAddr, now: Duration) -> bool {
        self.ban_of(st, addr).is_some_and(|b| now < b.expires + self.expiry_slack)
    }

    /// Whether `addr` must be banned at `now` (per the ledger): the ban runs for longer than
    /// the firewall's rounding. A SYN accepted inside this is a ban not enforced.
    pub fn ban_certain(&self, st: &State, addr: IpAddr, now: Duration) -> bool {
        self.ban_of(st, addr).is_some_and(|b| now + self.jiffy_slack < b.expires)
    }

    /// A probe-shaped session of `addr` ended now.
    pub fn record_probe(&self, addr: IpAddr) {
        let now = self.now();
        let key = self.ban_key(addr);
        self.state().probes.entry(key).or_default().push(now);
    }

    /// Whether the ban key of `addr` ended a probe-shaped session within B4's window before
    /// `now`. `certain`: by a margin that no timing difference between the client's view and
    /// the gatekeeper's can undo (the gatekeeper notes a probe as its session ends, the client
    /// after QUIT); otherwise: possibly.
    pub fn probed_within_window(&self, st: &State, addr: IpAddr, now: Duration, certain: bool) -> bool {
        let window = self.cfg.settings.session.policy.b4_window;
        let slack = Duration::from_secs(5);
        st.probes.get(&self.ban_key(addr)).is_some_and(|times| {
            times
                .iter()
                .any(|&t| if certain { t + slack <= now && now + slack < t + window } else { now < t + window + slack })
        })
    }

    /// A client got through the kernel and was greeted with `code`: with a ban decided at
    /// least a second before it connected and still running, anything but a refusal means
    /// the gatekeeper forgot the ban (DESIGN §2: enforced whatever the kernel forgets).
    pub fn check_let_in(&self, addr: IpAddr, connected: Duration, code: u16) {
        if code != 220 {
            return;
        }
        let mut st = self.state();
        let Some(b) = self.ban_of(&st, addr).copied() else { return };
        if b.at + Duration::from_secs(1) <= connected && self.ban_certain(&st, addr, connected) {
            let detail = format!(
                "banned ({}) {:.0} s before it connected, ban running {:.0} s more, yet greeted 220",
                b.reason.as_str(),
                (connected - b.at).as_secs_f64(),
                (b.expires - connected).as_secs_f64()
            );
            st.violate(connected, Invariant::BanNotEnforced, addr, detail);
        }
    }

    /// A command sent at `sent` in a session that began at `start` got `code`: once this
    /// session has earned its ban (decided after `start`, before `sent`), nothing more may be
    /// accepted in it (DESIGN §2: a ban ends the session that earned it).
    pub fn check_served_after_ban(&self, addr: IpAddr, start: Duration, sent: Duration, what: &str, code: u16) {
        if code >= 400 {
            return;
        }
        let mut st = self.state();
        let Some(b) = self.ban_of(&st, addr).copied() else { return };
        if b.at >= start && b.at < sent {
            let detail = format!("{what} got {code} after the session's own ban ({})", b.reason.as_str());
            st.violate(sent, Invariant::BanNotEnforced, addr, detail);
        }
    }

    /// At the end of the run: an honest or bounce message still deferred although its first
    /// attempt was more than `unknown_sender_tempfail_max` plus one queue interval ago is on
    /// its way to being given up (DESIGN §2, C1: unknown is tempfailed for a while, never
    /// forever). MTAs banned in the run (`honest_bans = "measure"`) are excused: their
    /// messages wait for the ban, which is counted elsewhere.
    pub fn check_still_deferred(&self, now: Duration, queue_interval_max: Duration) {
        let limit = self.cfg.settings.session.policy.unknown_sender_tempfail_max + queue_interval_max;
        let mut st = self.state();
        let late: Vec<(u64, IpAddr, Duration)> = st
            .queued
            .iter()
            .filter(|(_, (addr, first))| *first + limit < now && !st.banned_ever.contains(addr))
            .map(|(&id, &(addr, first))| (id, addr, first))
            .collect();
        for (id, addr, first) in late {
            let detail = format!(
                "message {id} still deferred at the end, {:.0} min after its first attempt",
                (now - first).as_secs_f64() / 60.0
            );
            st.violate(now, Invariant::HonestLost, addr, detail);
        }
    }

    /// A ban decided by the gatekeeper, as its ban sink reports it: ledger, checkers, kernel.
    pub fn record_ban(&self, addr: IpAddr, reason: BanReason, duration: Duration, evidence: &str) {
        let now = self.now();
        let class = Class::of(addr);
        let mut st = self.state();
        // The ban manager lengthens repeat offenders' bans when escalation is on: mirror it.
        let escalation = &self.cfg.settings.config.bans.escalation;
        let duration = if escalation.enabled {
            let since = now.saturating_sub(escalation.lookback);
            let times = st.ban_times.entry(self.ban_key(addr)).or_default();
            let earlier = times.iter().filter(|t| **t >= since).count() as u32;
            times.push(now);
            // The world's own arithmetic (docs/design.md, `[bans.escalation]`): the base
            // times `factor` per earlier ban in the lookback, at most `max`, never below the
            // base — not the ban manager's function, which is what is being checked.
            let factor = u128::from(escalation.factor).saturating_pow(earlier);
            let secs = (duration.as_millis().saturating_mul(factor) / 1000).min(u128::from(u64::MAX)) as u64;
            Duration::from_secs(secs).min(escalation.max).max(duration)
        } else {
            duration
        };
        st.c.bans[crate::metrics::reason_index(reason)] += 1;
        st.hour(now).bans += 1;
        st.bans.insert(self.ban_key(addr), BanEntry { reason, at: now, expires: now + duration });
        let first = st.banned_ever.insert(addr);
        let Some(class) = class else {
            if st.replay {
                return;
            }
            // Not an actor: the trusted proxy's own address (PROXY LOCAL / UNKNOWN sessions).
            let detail = format!("{addr} is no client of the simulation (the trusted proxy?) and was banned");
            st.violate(now, Invariant::ProtectedBanned, addr, detail);
            return;
        };
        let key = self.ban_key(addr);
        if let Some(users) = self.shared.get(&key) {
            // Every actor behind a shared address is banned with it.
            for &i in users {
                st.bump_actor(i, |c| c.bans += 1);
                if first {
                    st.bump_actor(i, |c| c.banned_addrs += 1);
                }
            }
            // Judged whatever `honest_bans` says: that counts an honest MTA's bans for its own
            // typos, not bans of an address it shares with an offender.
            let kinds: Vec<Class> = users.iter().map(|&i| self.cfg.actors[i].kind).collect();
            if kinds.iter().any(|k| k.is_protected()) && kinds.iter().any(|k| !k.is_protected()) {
                st.shared_bans.push((key, now, reason));
                return;
            }
        } else {
            st.bump(addr, |c| c.bans += 1);
            if first {
                st.bump(addr, |c| c.banned_addrs += 1);
            }
        }
        let measured = class == Class::Honest && self.cfg.honest_bans == HonestBans::Measure;
        // DESIGN §2, E2: a probe-shaped session repeated within B4's window counts.
        let repeated_probe = class == Class::Prober
            && reason == BanReason::UnknownRecipient
            && self.probed_within_window(&st, addr, now, false);
        if class.is_protected() && !measured && !repeated_probe {
            st.violate(
                now,
                Invariant::ProtectedBanned,
                addr,
                format!("{} client banned ({}: {evidence})", class.as_str(), reason.as_str()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use gatekeeper::gate::GateKind;

    use super::*;

    fn addr(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    /// The ban backend reads the kernel's tables back only after a loss it did not cause; a
    /// loss the model failed to count would leave a ban out of the kernel for good.
    #[test]
    fn the_kernel_counts_every_loss_the_gatekeeper_did_not_cause() {
        let day = Duration::from_secs(86_400);
        let xt = GateConfig { kind: GateKind::XtRecent { ip_list_tot: 2, hz: 250 }, ..GateConfig::default() };
        let mut k = Kernel::new(xt, Instant::now());
        k.ban(Duration::ZERO, addr(1), day);
        k.ban(Duration::ZERO, addr(2), day);
        k.unban(addr(2));
        assert_eq!(k.losses(), 0, "adds with room and the gatekeeper's own removes lose nothing");
        k.ban(Duration::ZERO, addr(2), day);
        k.ban(Duration::ZERO, addr(3), day);
        assert_eq!(k.losses(), 1, "a full xt_recent table evicted an entry");
        k.reboot();
        assert_eq!(k.losses(), 2, "a reboot empties the tables");

        let nft = GateConfig { kind: GateKind::Nft { size: 65_535, hz: 250 }, ..GateConfig::default() };
        let mut k = Kernel::new(nft, Instant::now());
        k.ban(Duration::ZERO, addr(1), day);
        assert_eq!(k.losses(), 0);
        k.ban(Duration::ZERO, addr(2), Duration::from_micros(10));
        assert_eq!(k.losses(), 1, "the set refused an add (a timeout under its 1 ms resolution)");
        assert_eq!(k.banned(Duration::ZERO), vec![addr(1)]);
    }
}
