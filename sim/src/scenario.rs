//! Scenario files (`scenarios/*.toml`): what a run simulates and what it must show.
//!
//! This module owns the file format (every table refuses unknown keys), its validation, and
//! its resolution into a [`Run`]: one concrete configuration per variant, with the seed and the
//! gatekeeper's own validated settings. It also owns the host table ([`HOSTS`], [`host_of`]):
//! the names a fault may give and the host each kind of actor runs on. It does no IO beyond
//! reading the file and never runs anything. The format is documented in `scenarios/README.md`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::fmt::num;
use crate::metrics::{Class, Window, metric_names};

/// A scenario file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name in reports; defaults to the file stem.
    #[serde(default)]
    pub name: Option<String>,
    /// One paragraph: the situation and what it proves.
    #[serde(default)]
    pub description: String,
    /// Decides everything random; `--seed` overrides it.
    pub seed: u64,
    /// Simulated time during which actors start new work and faults happen.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Liveness phase after `duration`: no new arrivals, no faults; queues must converge.
    #[serde(default, with = "humantime_serde")]
    pub drain: Duration,
    /// turmoil tick: network delivery is rounded up to it; timers inside a host are exact.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// The clients' SYN retransmission schedule (docs/kernel.md §3).
    #[serde(default)]
    pub client_kernel: ClientKernel,
    /// Users `user0@ … user{n-1}@` the first local domain, added to the configured ones.
    #[serde(default)]
    pub local_users: u32,
    /// The gatekeeper's configuration, in its own file format (`examples/gatekeeper.toml`).
    /// `server.listen`, `server.proxy_trusted` and `callbacks.nameservers` are set by the world.
    #[serde(default)]
    pub gatekeeper: toml::Table,
    /// Sender domains served by the simulated DNS and remote MX.
    #[serde(default, rename = "remote")]
    pub remotes: Vec<RemotePool>,
    /// Traffic.
    #[serde(default, rename = "actor")]
    pub actors: Vec<ActorSpec>,
    /// Faults during `duration`.
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultSpec>,
    /// How the always-on invariants apply.
    #[serde(default)]
    pub invariants: Invariants,
    /// Expectations checked at the end: metric name → `"OP NUMBER"` (or a list of them).
    #[serde(default)]
    pub expect: BTreeMap<String, Checks>,
    /// Variants run with the same seed: each overrides part of `[gatekeeper]` and adds
    /// expectations. No variants: one run.
    #[serde(default, rename = "variant")]
    pub variants: Vec<Variant>,
}

/// The SYN retransmission schedule of the simulated clients' kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum ClientKernel {
    /// Linux ≥ 6.5 (`tcp_syn_linear_timeouts = 4`): SYNs at 0, 1, 2, 3, 4, 5, 7, 11, 19, 35,
    /// 67 s, ETIMEDOUT at 131 s.
    #[default]
    #[serde(rename = "linux-6.5")]
    Linux65,
    /// Older kernels: SYNs at 0, 1, 3, 7, 15, 31, 63 s, ETIMEDOUT at 127 s.
    #[serde(rename = "linux-legacy")]
    Legacy,
}

impl ClientKernel {
    /// The name in scenario files.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientKernel::Linux65 => "linux-6.5",
            ClientKernel::Legacy => "linux-legacy",
        }
    }

    /// Offsets of the SYNs from the first one, in seconds, and the ETIMEDOUT time.
    pub fn schedule(self) -> (&'static [u64], u64) {
        match self {
            ClientKernel::Linux65 => (&[0, 1, 2, 3, 4, 5, 7, 11, 19, 35, 67], 131),
            ClientKernel::Legacy => (&[0, 1, 3, 7, 15, 31, 63], 127),
        }
    }
}

/// A pool of sender domains with one remote-MX behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemotePool {
    /// Pool name (`[a-z0-9-]`); its domains are `d<i>.<pool>.remote.test`.
    pub pool: String,
    /// How many domains.
    pub domains: u32,
    /// What their MX does with our callbacks.
    pub behaviour: Behaviour,
}

/// How a remote domain answers a callback probe (and where its DNS points).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// 250 for its users (`u<digits>`), 550 5.1.1 for anyone else.
    Normal,
    /// 250 for every address (the probe's random local part too).
    AcceptAll,
    /// 550 for every recipient.
    Reject,
    /// 451 for every recipient.
    Tempfail,
    /// Greets and answers MAIL, then never answers RCPT.
    Timeout,
    /// An MX that blocks probes: `550 5.7.1` to every recipient of a `MAIL FROM:<>`
    /// transaction, users too (a policy refusal: says nothing about the mailbox); 250 for
    /// its users otherwise.
    RefuseNull,
    /// The MX address has no host: connection refused.
    Refused,
    /// A null MX (RFC 7505).
    NullMx,
    /// NXDOMAIN.
    NoDomain,
    /// 250 for its users, a bare `550 Requested action not taken` (no enhanced code) for
    /// anyone else: a refusal that does not say the mailbox does not exist.
    #[serde(rename = "bare_550")]
    Bare550,
}

impl Behaviour {
    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Behaviour::Normal => "normal",
            Behaviour::AcceptAll => "accept_all",
            Behaviour::Reject => "reject",
            Behaviour::Tempfail => "tempfail",
            Behaviour::Timeout => "timeout",
            Behaviour::RefuseNull => "refuse_null",
            Behaviour::Refused => "refused",
            Behaviour::NullMx => "null_mx",
            Behaviour::NoDomain => "no_domain",
            Behaviour::Bare550 => "bare_550",
        }
    }
}

/// One kind of traffic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActorSpec {
    /// What it is.
    pub kind: Class,
    /// Its name in metrics (`actor.<name>.*`); defaults to the kind. Needed when two actors
    /// share a kind.
    #[serde(default)]
    pub name: Option<String>,
    /// Distinct client addresses (for `honest` and `bounce`: MTAs, each with its own queue).
    pub addresses: u32,
    /// Piecewise-linear rate: `[[time, per_hour], …]`, sessions (or, for MTAs, messages) per
    /// hour at each point, linear in between, the last value held.
    pub rate: Vec<(Dur, f64)>,
    /// Each point's rate is multiplied by a factor drawn uniformly from `1 ± jitter`.
    #[serde(default)]
    pub jitter: f64,
    /// Skew of the address choice: 0 uniform; `s > 0` Zipf-like (a few big senders).
    #[serde(default)]
    pub skew: f64,
    /// Remote pool of the sender domains (`honest`, `fake_sender`, `virus`, `dictionary`).
    #[serde(default)]
    pub senders: Option<String>,
    /// `honest`: fraction of messages to a mistyped (unknown) local recipient.
    #[serde(default)]
    pub typo_rate: f64,
    /// `prober`: fraction of probes for addresses that do not exist.
    #[serde(default)]
    pub unknown_ratio: f64,
    /// Recipients per session (`backscatter`, `dictionary`).
    #[serde(default)]
    pub rcpts: Option<u32>,
    /// The address family of its clients.
    #[serde(default)]
    pub family: Family,
    /// `ipv6`: how many of its addresses share one /64 (a host rotating through its prefix,
    /// as IPv6 hosts may). 1: each address in a /64 of its own.
    #[serde(default = "one")]
    pub per_prefix: u32,
    /// `prober`: the sender of its probes. `null` (`MAIL FROM:<>`, as Exim and the gatekeeper
    /// itself verify), `double_bounce` (Postfix's `address_verify_sender`) or `postmaster`;
    /// the latter two are `<…@d<i>.<senders pool>.remote.test>`, whose MX accepts them.
    #[serde(default)]
    pub probe_sender: ProbeSender,
    /// `bounce`: fraction of bounces that carry the original message's virus back (EICAR).
    #[serde(default)]
    pub virus_ratio: f64,
    /// `honest`: fraction of messages to `user+tag@` (newsletters, plus-addressing).
    #[serde(default)]
    pub tag_ratio: f64,
    /// `dictionary`: valid recipients given after the unknown ones in each session (a client
    /// banned mid-session must not be served them).
    #[serde(default)]
    pub valid_rcpts: u32,
    /// How its clients reach the gatekeeper through the trusted proxy: `client` (a PROXY
    /// header with the client's address) or `local` (PROXY v2 LOCAL: the proxy's own health
    /// checks, which get a greeting and 451 at MAIL, never a rule and never a ban).
    #[serde(default)]
    pub proxy: ProxyMode,
    /// `backscatter`: a real bounce MTA's queue behind each source: a session that ends
    /// without a verdict (ETIMEDOUT, refused, a 4xx or 554 greeting, a 4xx reply, a broken
    /// connection) is tried again after 5 min, doubling up to 67 min, for 5 days (Postfix's
    /// `minimal_backoff_time`, `maximal_backoff_time`, `bounce_queue_lifetime`). Without it a
    /// source tries once.
    #[serde(default)]
    pub retry: bool,
    /// `honest`, `bounce`: what an MTA does after a 5xx (or 4xx) to MAIL, RCPT, DATA or the end
    /// of DATA: `quit` (lettre's way: QUIT, the rest of the queue on a new connection) or
    /// `rset` (Postfix's: RSET, and the next message in the same connection).
    #[serde(default)]
    pub after_5xx: After5xx,
    /// `honest`, `bounce`: connections one queue run opens in parallel at most, its due
    /// messages shared among them (Postfix's `default_destination_concurrency_limit`).
    #[serde(default = "one")]
    pub connections: u32,
    /// Another actor whose addresses this one uses (its first `addresses` of them): clients
    /// behind one NAT or on one shared host. Counters still go to this actor; a ban of a shared
    /// address is judged by what every actor behind it did.
    #[serde(default)]
    pub share: Option<String>,
}

/// What an MTA does after a negative reply to a transaction command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum After5xx {
    /// QUIT; the rest of the queue run goes on a new connection (lettre).
    #[default]
    Quit,
    /// RSET and the next message in the same connection (Postfix).
    Rset,
}

fn one() -> u32 {
    1
}

/// The sender of a prober's probes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeSender {
    /// `MAIL FROM:<>`.
    #[default]
    Null,
    /// `MAIL FROM:<double-bounce@its domain>` (Postfix).
    DoubleBounce,
    /// `MAIL FROM:<postmaster@its domain>`.
    Postmaster,
}

/// What the PROXY header of an actor's connections says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProxyMode {
    /// The client's own address (PROXY v2 PROXY command).
    #[default]
    Client,
    /// PROXY v2 LOCAL: the proxy speaking for itself.
    Local,
}

/// An actor's address family.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `10.<16 + class>.x.y`.
    #[default]
    Ipv4,
    /// `fd10:<16 + class>:0:<prefix>::<n + 1>`.
    Ipv6,
}

impl ActorSpec {
    /// The actor's `i`-th address, `start` being the first ordinal of its range in its class.
    /// IPv6: the prefix number is `start + i / per_prefix`, so actors never share a /64.
    pub fn addr(&self, start: u32, i: u32) -> std::net::IpAddr {
        match self.family {
            Family::Ipv4 => self.kind.addr(start + i),
            Family::Ipv6 => self.kind.addr6(start + i, start + i / self.per_prefix.max(1)),
        }
    }
}

/// The turmoil hosts, by name.
pub const HOSTS: [&str; 6] = ["gatekeeper", "dns", "mx", "spam", "bounce", "honest"];

/// The host each class runs on.
pub fn host_of(class: Class) -> &'static str {
    match class {
        Class::Honest => "honest",
        Class::Bounce | Class::Backscatter | Class::Prober => "bounce",
        _ => "spam",
    }
}

/// A fault during the safety phase.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultSpec {
    /// No packets between two hosts (`gatekeeper`, `dns`, `mx`, `spam`, `bounce`, `honest`).
    Partition {
        /// One host.
        a: String,
        /// The other.
        b: String,
        /// Start.
        #[serde(with = "humantime_serde")]
        from: Duration,
        /// End.
        #[serde(with = "humantime_serde")]
        until: Duration,
    },
    /// Every message between two hosts takes `latency` (instead of 0–100 ms).
    Latency {
        /// One host.
        a: String,
        /// The other.
        b: String,
        /// One-way delay.
        #[serde(with = "humantime_serde")]
        latency: Duration,
        /// Start.
        #[serde(with = "humantime_serde")]
        from: Duration,
        /// End.
        #[serde(with = "humantime_serde")]
        until: Duration,
    },
    /// The DNS server stops answering.
    DnsOutage {
        /// Start.
        #[serde(with = "humantime_serde")]
        from: Duration,
        /// End.
        #[serde(with = "humantime_serde")]
        until: Duration,
    },
    /// The remote MX stops answering after the greeting (every domain).
    MxTimeout {
        /// Start.
        #[serde(with = "humantime_serde")]
        from: Duration,
        /// End.
        #[serde(with = "humantime_serde")]
        until: Duration,
    },
    /// The gatekeeper process stops at `at` and starts again after `downtime`; with `reboot`
    /// the kernel tables are lost too and the gatekeeper must re-apply its bans.
    Restart {
        /// When.
        #[serde(with = "humantime_serde")]
        at: Duration,
        /// How long it is down.
        #[serde(with = "humantime_serde")]
        downtime: Duration,
        /// The whole machine: kernel tables are empty afterwards.
        #[serde(default)]
        reboot: bool,
    },
    /// The gatekeeper host's wall clock steps by `step` at `at` (`"+1d"`, `"-2h"`: NTP
    /// correcting a bad clock, a VM resumed); its monotonic clock does not.
    ClockJump {
        /// When.
        #[serde(with = "humantime_serde")]
        at: Duration,
        /// How far, forward (`+`) or back (`-`).
        step: Step,
    },
    /// The SYN-ACK of an accepted SYN is lost with probability `rate`: the client retransmits
    /// its SYN on its schedule, and the kernel sees (and counts) it again.
    SynAckLoss {
        /// Probability of a loss, 0 to 1.
        rate: f64,
        /// Start.
        #[serde(with = "humantime_serde")]
        from: Duration,
        /// End.
        #[serde(with = "humantime_serde")]
        until: Duration,
    },
}

/// A signed duration: `"+1d"`, `"-2h 30m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Backwards.
    pub back: bool,
    /// How far.
    pub by: Duration,
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let (back, rest) = match s.trim().split_at_checked(1) {
            Some(("+", r)) => (false, r),
            Some(("-", r)) => (true, r),
            _ => return Err(serde::de::Error::custom(format!("{s:?}: a step starts with + or -"))),
        };
        let by = humantime_serde::re::humantime::parse_duration(rest.trim()).map_err(serde::de::Error::custom)?;
        Ok(Step { back, by })
    }
}

/// How the always-on invariants apply.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invariants {
    /// `measure`: bans of honest MTAs (B4 after typos) are counted, not violations.
    #[serde(default)]
    pub honest_bans: HonestBans,
}

/// Whether a ban of an honest MTA is a violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HonestBans {
    /// A violation (the default).
    #[default]
    Forbid,
    /// Counted in `honest.banned_mtas`: what `honest_typos` sets out to measure.
    Measure,
}

/// A variant of the scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Shown after the scenario's name: `honest_typos[b4=1]`.
    pub name: String,
    /// Merged over `[gatekeeper]` (tables merge key by key).
    #[serde(default)]
    pub gatekeeper: toml::Table,
    /// More expectations (replacing the scenario's for the same metric).
    #[serde(default)]
    pub expect: BTreeMap<String, Checks>,
    /// Replaces the scenario's `duration` (a shorter or longer run of the same traffic).
    #[serde(default, with = "humantime_serde")]
    pub duration: Option<Duration>,
    /// What the variant replaces instead of merging: `"expect"` (the scenario's whole
    /// expectation table) or the dotted path of a `[gatekeeper]` table (`"gate.kind"`: the
    /// variant's table stands alone, no key of the scenario's is kept).
    #[serde(default)]
    pub replace: Vec<String>,
}

/// A duration written the human way (`"90s"`, `"12h"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime_serde::re::humantime::parse_duration(&s).map(Dur).map_err(serde::de::Error::custom)
    }
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Op {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

/// What an expectation compares with: a number, or a sum of other metrics of the same run,
/// each maybe scaled, and numbers (`"<= 0.5 * honest.messages"`,
/// `">= actor.q.gave_up + actor.q.refused - 3"`).
#[derive(Debug, Clone, PartialEq)]
pub struct Bound {
    /// `(factor, metric)` terms, summed; a term without a metric is the constant `factor`.
    pub terms: Vec<(f64, Option<String>)>,
}

impl Bound {
    /// A constant.
    pub fn number(v: f64) -> Bound {
        Bound { terms: vec![(v, None)] }
    }

    /// The constant, if the bound names no metric.
    pub fn constant(&self) -> Option<f64> {
        self.terms.iter().all(|(_, m)| m.is_none()).then(|| self.terms.iter().map(|(f, _)| f).sum())
    }

    /// The bound's value, given the run's metrics (`None`: a metric the run does not have).
    pub fn value(&self, metric: impl Fn(&str) -> Option<f64>) -> Option<f64> {
        self.terms.iter().map(|(f, m)| m.as_deref().map_or(Some(*f), |m| metric(m).map(|v| f * v))).sum()
    }

    /// The metrics it names.
    pub fn metrics(&self) -> impl Iterator<Item = &str> {
        self.terms.iter().filter_map(|(_, m)| m.as_deref())
    }
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (factor, metric)) in self.terms.iter().enumerate() {
            let sign = if *factor < 0.0 { "-" } else { "+" };
            match i {
                0 if sign == "-" => write!(f, "-")?,
                0 => {}
                _ => write!(f, " {sign} ")?,
            }
            match metric {
                None => write!(f, "{}", num(factor.abs()))?,
                Some(m) if factor.abs() == 1.0 => write!(f, "{m}")?,
                Some(m) => write!(f, "{} * {m}", num(factor.abs()))?,
            }
        }
        Ok(())
    }
}

impl FromStr for Bound {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let bad =
            |why: &str| format!("{s:?}: {why}; expected terms NUMBER, METRIC or NUMBER * METRIC joined by + or -");
        let tokens: Vec<&str> = s.split_whitespace().collect();
        if tokens.is_empty() {
            return Err(bad("nothing to compare with"));
        }
        let mut terms = Vec::new();
        let mut sign = 1.0;
        let mut i = 0;
        let metric = |t: &str| {
            let ok = t.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
                && t.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-[]".contains(&b));
            ok.then(|| t.to_string())
        };
        loop {
            let t = tokens[i];
            if let Ok(v) = t.parse::<f64>() {
                if tokens.get(i + 1) == Some(&"*") {
                    let m = tokens.get(i + 2).and_then(|t| metric(t)).ok_or_else(|| bad("a metric after *"))?;
                    terms.push((sign * v, Some(m)));
                    i += 3;
                } else {
                    terms.push((sign * v, None));
                    i += 1;
                }
            } else {
                terms.push((sign, Some(metric(t).ok_or_else(|| bad(&format!("{t:?} is not a metric name")))?)));
                i += 1;
            }
            match tokens.get(i) {
                None => break,
                Some(&"+") => sign = 1.0,
                Some(&"-") => sign = -1.0,
                Some(t) => return Err(bad(&format!("{t:?} where + or - was expected (spaced)"))),
            }
            i += 1;
            if i >= tokens.len() {
                return Err(bad("a term after + or -"));
            }
        }
        if terms.iter().any(|(f, _)| !f.is_finite()) {
            return Err(bad("numbers must be finite"));
        }
        Ok(Bound { terms })
    }
}

/// `"OP BOUND"`, e.g. `">= 54000"`, `"== 0"`, `"<= 0.01 * attempts"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Expectation {
    /// The comparison.
    pub op: Op,
    /// The bound.
    pub bound: Bound,
}

impl Expectation {
    /// A constant bound.
    pub fn number(op: Op, value: f64) -> Expectation {
        Expectation { op, bound: Bound::number(value) }
    }

    /// Whether `actual` satisfies it against `value`, the bound's value (exact for integers;
    /// `==` tolerates 1e-9 for ratios). A missing value (NaN) never holds.
    pub fn holds_against(&self, actual: f64, value: f64) -> bool {
        let eps = 1e-9;
        match self.op {
            Op::Eq => (actual - value).abs() <= eps,
            Op::Ne => (actual - value).abs() > eps,
            Op::Lt => actual < value,
            Op::Le => actual <= value + eps,
            Op::Gt => actual > value,
            Op::Ge => actual + eps >= value,
        }
    }

    /// Whether `actual` satisfies a constant bound (a metric bound never holds here).
    pub fn holds(&self, actual: f64) -> bool {
        self.bound.constant().is_some_and(|v| self.holds_against(actual, v))
    }
}

impl fmt::Display for Expectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.op.as_str(), self.bound)
    }
}

impl FromStr for Expectation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (op, rest) = [("==", Op::Eq), ("!=", Op::Ne), ("<=", Op::Le), (">=", Op::Ge), ("<", Op::Lt), (">", Op::Gt)]
            .into_iter()
            .find_map(|(p, op)| s.strip_prefix(p).map(|r| (op, r)))
            .ok_or_else(|| format!("{s:?}: expected \"OP BOUND\" with OP one of == != < <= > >="))?;
        Ok(Expectation { op, bound: rest.parse()? })
    }
}

impl<'de> Deserialize<'de> for Expectation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One or more expectations on one metric: `">= 1"` or `[">= 1", "<= 5"]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Checks(pub Vec<Expectation>);

impl<'de> Deserialize<'de> for Checks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let list = match OneOrMany::deserialize(d)? {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        if list.is_empty() {
            return Err(serde::de::Error::custom("an empty list of expectations"));
        }
        list.iter().map(|s| s.parse()).collect::<Result<Vec<_>, _>>().map(Checks).map_err(serde::de::Error::custom)
    }
}

/// One concrete run: a scenario (and variant) with everything resolved.
#[derive(Debug, Clone)]
pub struct Run {
    /// `name` or `name[variant]`.
    pub name: String,
    /// The file it came from.
    pub path: PathBuf,
    /// The scenario as written (variant merged into `gatekeeper`).
    pub scenario: Scenario,
    /// The effective seed.
    pub seed: u64,
    /// Expectations: the scenario's, then the variant's.
    pub expect: BTreeMap<String, Checks>,
}

/// A scenario file that cannot run: every problem, one a line.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {}", .problems.join("; "))]
pub struct ScenarioError {
    /// The file.
    pub path: String,
    /// What is wrong.
    pub problems: Vec<String>,
}

impl Scenario {
    /// Parses and validates a scenario from text.
    pub fn parse(text: &str, path: &Path) -> Result<Scenario, ScenarioError> {
        let err = |problems| ScenarioError { path: path.display().to_string(), problems };
        let mut s: Scenario = toml::from_str(text).map_err(|e| err(vec![e.to_string().trim_end().to_string()]))?;
        if s.name.is_none() {
            s.name = path.file_stem().map(|n| n.to_string_lossy().into_owned());
        }
        let problems = s.problems();
        if problems.is_empty() { Ok(s) } else { Err(err(problems)) }
    }

    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScenarioError { path: path.display().to_string(), problems: vec![e.to_string()] })?;
        Scenario::parse(&text, path)
    }

    /// The scenario's name.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("scenario")
    }

    /// Every problem, each naming its field.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.duration.is_zero() {
            p.push("duration: must be longer than 0s".into());
        }
        // Each round trip takes two ticks; `runner::resolve` also holds the tick under the
        // gatekeeper's own timeouts.
        if self.tick.is_zero() || self.tick > Duration::from_secs(10) {
            p.push("tick: must be between 1ns and 10s".into());
        }
        if self.local_users > 100_000 {
            p.push("local_users: at most 100000".into());
        }
        let mut pools = Vec::new();
        for (i, r) in self.remotes.iter().enumerate() {
            if r.pool.is_empty() || !r.pool.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
                p.push(format!("remote[{i}].pool: {:?} must be [a-z0-9-]+", r.pool));
            }
            if pools.contains(&r.pool.as_str()) {
                p.push(format!("remote[{i}].pool: {:?} defined twice", r.pool));
            }
            pools.push(&r.pool);
            if r.domains == 0 || r.domains > 100_000 {
                p.push(format!("remote[{i}].domains: between 1 and 100000"));
            }
        }
        for (i, a) in self.actors.iter().enumerate() {
            let at = |f: &str| format!("actor[{i}] ({}).{f}", a.kind.as_str());
            if a.addresses == 0 || a.addresses > 65_000 {
                p.push(format!("{}: between 1 and 65000", at("addresses")));
            }
            if a.per_prefix == 0 || a.per_prefix > a.addresses.max(1) {
                p.push(format!("{}: between 1 and addresses ({})", at("per_prefix"), a.addresses));
            }
            if a.per_prefix > 1 && a.family != Family::Ipv6 {
                p.push(format!("{}: only for family = \"ipv6\"", at("per_prefix")));
            }
            if a.rate.is_empty() {
                p.push(format!("{}: at least one [time, per_hour] point", at("rate")));
            }
            if a.rate.windows(2).any(|w| w[1].0 <= w[0].0) {
                p.push(format!("{}: times must increase", at("rate")));
            }
            if a.rate.iter().any(|(_, r)| !(r.is_finite() && *r >= 0.0 && *r <= 1e6)) {
                p.push(format!("{}: rates between 0 and 1e6 per hour", at("rate")));
            }
            if !(0.0..1.0).contains(&a.jitter) {
                p.push(format!("{}: between 0 and 1", at("jitter")));
            }
            if !(0.0..=4.0).contains(&a.skew) {
                p.push(format!("{}: between 0 and 4", at("skew")));
            }
            let needs_senders = matches!(a.kind, Class::Honest | Class::FakeSender | Class::Virus | Class::Dictionary)
                || (a.kind == Class::Prober && a.probe_sender != ProbeSender::Null);
            match (&a.senders, needs_senders) {
                (None, true) => p.push(format!("{}: a remote pool is required", at("senders"))),
                (Some(_), false) => p.push(format!("{}: not used by this kind", at("senders"))),
                (Some(s), true) if !pools.contains(&s.as_str()) => {
                    p.push(format!("{}: no remote pool {s:?}", at("senders")));
                }
                _ => {}
            }
            if a.typo_rate != 0.0 && a.kind != Class::Honest {
                p.push(format!("{}: only for honest", at("typo_rate")));
            }
            if !(0.0..=1.0).contains(&a.typo_rate) {
                p.push(format!("{}: between 0 and 1", at("typo_rate")));
            }
            if a.unknown_ratio != 0.0 && a.kind != Class::Prober {
                p.push(format!("{}: only for prober", at("unknown_ratio")));
            }
            if !(0.0..=1.0).contains(&a.unknown_ratio) {
                p.push(format!("{}: between 0 and 1", at("unknown_ratio")));
            }
            if a.probe_sender != ProbeSender::Null && a.kind != Class::Prober {
                p.push(format!("{}: only for prober", at("probe_sender")));
            }
            for (field, v, kind) in
                [("virus_ratio", a.virus_ratio, Class::Bounce), ("tag_ratio", a.tag_ratio, Class::Honest)]
            {
                if v != 0.0 && a.kind != kind {
                    p.push(format!("{}: only for {}", at(field), kind.as_str()));
                }
                if !(0.0..=1.0).contains(&v) {
                    p.push(format!("{}: between 0 and 1", at(field)));
                }
            }
            if a.valid_rcpts != 0 && a.kind != Class::Dictionary {
                p.push(format!("{}: only for dictionary", at("valid_rcpts")));
            }
            if a.valid_rcpts > 50 {
                p.push(format!("{}: at most 50", at("valid_rcpts")));
            }
            if a.proxy == ProxyMode::Local && a.kind.is_mta() {
                p.push(format!("{}: \"local\" is for scripted clients, not MTAs", at("proxy")));
            }
            if a.retry && a.kind != Class::Backscatter {
                p.push(format!("{}: only for backscatter (MTAs always retry)", at("retry")));
            }
            if a.after_5xx != After5xx::Quit && !a.kind.is_mta() {
                p.push(format!("{}: only for honest and bounce", at("after_5xx")));
            }
            if a.connections != 1 && !a.kind.is_mta() {
                p.push(format!("{}: only for honest and bounce", at("connections")));
            }
            if a.connections == 0 || a.connections > 20 {
                p.push(format!("{}: between 1 and 20", at("connections")));
            }
            if let Some(n) = a.rcpts {
                if !matches!(a.kind, Class::Backscatter | Class::Dictionary) {
                    p.push(format!("{}: only for backscatter and dictionary", at("rcpts")));
                }
                if n == 0 || n > 100 {
                    p.push(format!("{}: between 1 and 100", at("rcpts")));
                }
            }
        }
        for (i, f) in self.faults.iter().enumerate() {
            match f {
                FaultSpec::Partition { a, b, from, until } | FaultSpec::Latency { a, b, from, until, .. } => {
                    for h in [a, b] {
                        if !HOSTS.contains(&h.as_str()) {
                            p.push(format!("fault[{i}]: unknown host {h:?} (one of {HOSTS:?})"));
                        }
                    }
                    if a == b {
                        p.push(format!("fault[{i}]: a partition needs two hosts"));
                    }
                    if from >= until {
                        p.push(format!("fault[{i}]: from must be before until"));
                    }
                }
                FaultSpec::DnsOutage { from, until } | FaultSpec::MxTimeout { from, until } => {
                    if from >= until {
                        p.push(format!("fault[{i}]: from must be before until"));
                    }
                }
                FaultSpec::Restart { at, downtime, .. } => {
                    if *at >= self.duration {
                        p.push(format!("fault[{i}].at: within duration"));
                    }
                    if downtime.is_zero() {
                        p.push(format!("fault[{i}].downtime: longer than 0s"));
                    }
                }
                FaultSpec::ClockJump { at, step } => {
                    if *at >= self.duration {
                        p.push(format!("fault[{i}].at: within duration"));
                    }
                    if step.by.is_zero() || step.by > Duration::from_secs(365 * 86_400) {
                        p.push(format!("fault[{i}].step: between 1ns and 365d"));
                    }
                }
                FaultSpec::SynAckLoss { rate, from, until } => {
                    if from >= until {
                        p.push(format!("fault[{i}]: from must be before until"));
                    }
                    if !(0.0..=1.0).contains(rate) {
                        p.push(format!("fault[{i}].rate: between 0 and 1"));
                    }
                }
            }
        }
        let mut per_class = [0u32; 8];
        for a in &self.actors {
            per_class[a.kind.index()] += a.addresses;
        }
        for (c, n) in Class::ALL.iter().zip(per_class) {
            if n > 65_000 {
                p.push(format!("actor: the {} actors use {n} addresses together; at most 65000", c.as_str()));
            }
        }
        let actor_names = self.actor_names();
        for (i, n) in actor_names.iter().enumerate() {
            if actor_names[..i].contains(n) {
                p.push(format!("actor[{i}].name: {n:?} is used twice (set `name`)"));
            }
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                p.push(format!("actor[{i}].name: {n:?} must be [A-Za-z0-9_-]+"));
            }
        }
        for (i, a) in self.actors.iter().enumerate() {
            let Some(target) = &a.share else { continue };
            match actor_names.iter().position(|n| n == target) {
                None => p.push(format!("actor[{i}].share: no actor named {target:?}")),
                Some(j) if j == i => p.push(format!("actor[{i}].share: an actor cannot share with itself")),
                Some(j) => {
                    let t = &self.actors[j];
                    if t.share.is_some() {
                        p.push(format!("actor[{i}].share: {target:?} shares addresses itself"));
                    }
                    if t.addresses < a.addresses {
                        p.push(format!("actor[{i}].addresses: at most {target:?}'s ({})", t.addresses));
                    }
                    if a.family != Family::Ipv4 || t.family != Family::Ipv4 || a.proxy != ProxyMode::Client {
                        p.push(format!("actor[{i}].share: IPv4 clients with PROXY headers only"));
                    }
                }
            }
        }
        let names = metric_names(&actor_names);
        let horizon_h = (self.duration + self.drain).as_secs().div_ceil(3600) as usize;
        let metric_problem = |scope: &str, k: &str| match Window::parse(k) {
            Some(Ok(w)) if w.until_h() > horizon_h => {
                Some(format!("{scope}: {k:?} ends after the run ({horizon_h} h)"))
            }
            Some(Ok(_)) => None,
            Some(Err(e)) => Some(format!("{scope}: {e}")),
            None if !names.iter().any(|n| n == k) => Some(format!("{scope}: unknown metric {k:?}")),
            None => None,
        };
        let mut check_expect = |scope: &str, expect: &BTreeMap<String, Checks>| {
            for (k, checks) in expect {
                let named = checks.0.iter().flat_map(|e| e.bound.metrics());
                p.extend(std::iter::once(k.as_str()).chain(named).filter_map(|m| metric_problem(scope, m)));
            }
        };
        check_expect("expect", &self.expect);
        for v in &self.variants {
            check_expect(&format!("variant {:?}.expect", v.name), &v.expect);
        }
        for v in &self.variants {
            for r in &v.replace {
                let known = r == "expect" || r.split('.').all(|seg| !seg.is_empty());
                if !known {
                    p.push(format!("variant {:?}.replace: {r:?} is neither \"expect\" nor a table path", v.name));
                } else if r != "expect" && !has_path(&self.gatekeeper, r) && !has_path(&v.gatekeeper, r) {
                    // A misspelt path would replace nothing: the variant would merge silently.
                    p.push(format!(
                        "variant {:?}.replace: {r:?} names nothing in the scenario's or the variant's [gatekeeper]",
                        v.name
                    ));
                }
            }
        }
        let mut seen = Vec::new();
        for v in &self.variants {
            if seen.contains(&&v.name) {
                p.push(format!("variant {:?}: defined twice", v.name));
            }
            seen.push(&v.name);
        }
        p
    }

    /// Each actor's name in metrics.
    pub fn actor_names(&self) -> Vec<String> {
        self.actors.iter().map(|a| a.name.clone().unwrap_or_else(|| a.kind.as_str().to_string())).collect()
    }

    /// The concrete runs: one per variant (or one), with `seed` overriding the file's.
    pub fn runs(&self, path: &Path, seed: Option<u64>) -> Vec<Run> {
        let seed = seed.unwrap_or(self.seed);
        if self.variants.is_empty() {
            return vec![Run {
                name: self.name().to_string(),
                path: path.to_path_buf(),
                scenario: self.clone(),
                seed,
                expect: self.expect.clone(),
            }];
        }
        self.variants
            .iter()
            .map(|v| {
                let mut s = self.clone();
                for path in v.replace.iter().filter(|p| *p != "expect") {
                    remove_path(&mut s.gatekeeper, path);
                }
                merge(&mut s.gatekeeper, &v.gatekeeper);
                s.duration = v.duration.unwrap_or(s.duration);
                s.variants.clear();
                let mut expect =
                    if v.replace.iter().any(|p| p == "expect") { BTreeMap::new() } else { self.expect.clone() };
                expect.extend(v.expect.iter().map(|(k, e)| (k.clone(), e.clone())));
                Run {
                    name: format!("{}[{}]", self.name(), v.name),
                    path: path.to_path_buf(),
                    scenario: s,
                    seed,
                    expect,
                }
            })
            .collect()
    }
}

/// Removes the value at a dotted path (`"gate.kind"`) of `table`, if there is one.
/// Whether the dotted `path` names a key of `table`.
fn has_path(table: &toml::Table, path: &str) -> bool {
    match path.split_once('.') {
        None => table.contains_key(path),
        Some((head, rest)) => matches!(table.get(head), Some(toml::Value::Table(t)) if has_path(t, rest)),
    }
}

fn remove_path(table: &mut toml::Table, path: &str) {
    match path.split_once('.') {
        None => {
            table.remove(path);
        }
        Some((head, rest)) => {
            if let Some(toml::Value::Table(t)) = table.get_mut(head) {
                remove_path(t, rest);
            }
        }
    }
}

/// Merges `over` into `base`: tables key by key, anything else replaced.
pub fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Every `*.toml` under the given paths (files as given, directories sorted by name).
pub fn collect(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "toml"))
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_parse() {
        let e: Expectation = ">= 54000".parse().unwrap();
        assert_eq!((e.op, e.bound.constant()), (Op::Ge, Some(54000.0)));
        assert!(e.holds(54000.0) && !e.holds(53999.0));
        let e: Expectation = "== 0".parse().unwrap();
        assert!(e.holds(0.0) && !e.holds(1.0));
        assert!("about 3".parse::<Expectation>().is_err());
        assert!("< 3 x".parse::<Expectation>().is_err());
        assert_eq!(">= -2.5".parse::<Expectation>().unwrap().bound.constant(), Some(-2.5));
        let e: Expectation = "<= 0.5 * honest.messages - 2".parse().unwrap();
        assert_eq!(e.to_string(), "<= 0.5 * honest.messages - 2");
        let metrics = |m: &str| (m == "honest.messages").then_some(10.0);
        assert_eq!(e.bound.value(metrics), Some(3.0));
        assert_eq!(e.bound.value(|_| None), None);
        assert!(!e.holds(0.0), "a metric bound needs the metrics");
        let e: Expectation = ">= actor.nat-mta.delivered + actor.q.refused - 2 * bans[1h..2h]".parse().unwrap();
        assert_eq!(e.to_string(), ">= actor.nat-mta.delivered + actor.q.refused - 2 * bans[1h..2h]");
        assert_eq!(
            e.bound.metrics().collect::<Vec<_>>(),
            ["actor.nat-mta.delivered", "actor.q.refused", "bans[1h..2h]"]
        );
        assert_eq!(e.bound.value(|_| Some(3.0)), Some(0.0));
        for bad in ["> 2 * ", "> x * y", "> a +", "> a b", ">"] {
            assert!(bad.parse::<Expectation>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_variant_may_replace_a_table() {
        let text = r#"
            seed = 1
            duration = "1h"
            tick = "1s"
            [gatekeeper.gate.kind]
            backend = "xt_recent"
            ip_list_tot = 100
            [expect]
            attempts = "> 0"
            bans = "== 0"
            [[variant]]
            name = "nft"
            replace = ["gate.kind", "expect"]
            gatekeeper = { gate = { kind = { backend = "nft" } } }
            expect = { "bans[0h..1h]" = "<= attempts" }
        "#;
        let s = Scenario::parse(text, Path::new("x.toml")).unwrap();
        let runs = s.runs(Path::new("x.toml"), None);
        let kind = &runs[0].scenario.gatekeeper["gate"]["kind"];
        assert_eq!(kind.as_table().map(|t| t.len()), Some(1), "{kind:?}");
        assert_eq!(runs[0].expect.keys().collect::<Vec<_>>(), ["bans[0h..1h]"]);
        let bad = text.replace("bans[0h..1h]", "bans[0h..3h]").replace("<= attempts", "<= nothing.here");
        let problems = Scenario::parse(&bad, Path::new("x.toml")).unwrap_err().problems;
        assert_eq!(problems.len(), 2, "{problems:?}");
        // A misspelt path would replace nothing: refused, not merged silently.
        let misspelt = text.replace(r#"replace = ["gate.kind""#, r#"replace = ["gate.kinds""#);
        let problems = Scenario::parse(&misspelt, Path::new("x.toml")).unwrap_err().problems;
        assert!(problems.len() == 1 && problems[0].contains("\"gate.kinds\" names nothing"), "{problems:?}");
    }

    #[test]
    fn merge_is_deep() {
        let mut a: toml::Table = toml::from_str("[rules]\nb4_threshold = 1\nb4_window = \"1h\"\n").unwrap();
        let b: toml::Table = toml::from_str("[rules]\nb4_threshold = 3\n").unwrap();
        merge(&mut a, &b);
        assert_eq!(a["rules"]["b4_threshold"].as_integer(), Some(3));
        assert_eq!(a["rules"]["b4_window"].as_str(), Some("1h"));
    }
}
