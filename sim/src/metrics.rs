//! What a run counts: actor classes and their address ranges, counters, hourly buckets, and
//! the flat metric names that expectations refer to.
//!
//! Counters are plain integers indexed by enums (no strings on the hot path, no hash order);
//! they become a sorted `name → value` map only when the report is built.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use gatekeeper::policy::{BanReason, Rule};
use serde::Deserialize;

use crate::invariants::Invariant;

/// A kind of traffic, each with its own addresses (`10.<16 + index>.x.y`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Third-party servers bouncing spam that forged our domain: `<>` to random local parts.
    Backscatter,
    /// Null-sender bounces to real users, from MTAs with queues.
    Bounce,
    /// Spammers forging a sender in our domain that does not exist (B1).
    ForgedLocal,
    /// Spammers with non-existent external senders (B2 by callback).
    FakeSender,
    /// Virus senders (B3).
    Virus,
    /// Dictionary attacks: a real sender domain, unknown local recipients (B4).
    Dictionary,
    /// Other servers verifying our addresses by callback (R1).
    Prober,
    /// Honest MTAs with queues (lettre).
    Honest,
}

impl Class {
    /// Every class, in report order.
    pub const ALL: [Class; 8] = [
        Class::Backscatter,
        Class::Bounce,
        Class::ForgedLocal,
        Class::FakeSender,
        Class::Virus,
        Class::Dictionary,
        Class::Prober,
        Class::Honest,
    ];

    /// Index into per-class arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The stable name (metric prefix).
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Backscatter => "backscatter",
            Class::Bounce => "bounce",
            Class::ForgedLocal => "forged_local",
            Class::FakeSender => "fake_sender",
            Class::Virus => "virus",
            Class::Dictionary => "dictionary",
            Class::Prober => "prober",
            Class::Honest => "honest",
        }
    }

    /// Clients that must never be banned (docs/design.md §5).
    pub fn is_protected(self) -> bool {
        matches!(self, Class::Backscatter | Class::Bounce | Class::Prober | Class::Honest)
    }

    /// MTAs with queues (messages, delivery delays).
    pub fn is_mta(self) -> bool {
        matches!(self, Class::Honest | Class::Bounce)
    }

    /// The `n`-th address of this class (`n < 65000`).
    pub fn addr(self, n: u32) -> IpAddr {
        let base = (10u32 << 24) | ((16 + self as u32) << 16);
        IpAddr::V4(Ipv4Addr::from(base + 1 + n))
    }

    /// The `n`-th IPv6 address of this class (`n < 65000`), in /64 number `prefix`
    /// (`< 65536`): `fd10:<16 + class>:0:<prefix>::<n + 1>`.
    pub fn addr6(self, n: u32, prefix: u32) -> IpAddr {
        let [class, prefix, n] = [16 + self as u32, prefix, n + 1].map(|v| u16::try_from(v).expect("< 65536"));
        IpAddr::V6(Ipv6Addr::new(0xfd10, class, 0, prefix, 0, 0, 0, n))
    }

    /// The class an address belongs to.
    pub fn of(addr: IpAddr) -> Option<Class> {
        let class = match addr.to_canonical() {
            IpAddr::V4(v4) => match v4.octets() {
                [10, c, ..] => c,
                _ => return None,
            },
            IpAddr::V6(v6) => match v6.segments() {
                [0xfd10, c, ..] => u8::try_from(c).ok()?,
                _ => return None,
            },
        };
        Class::ALL.get(usize::from(class.checked_sub(16)?)).copied()
    }

    /// The ordinal `n` of an address of [`Class::addr`] or [`Class::addr6`].
    pub fn ordinal(addr: IpAddr) -> Option<u32> {
        let low = match addr.to_canonical() {
            IpAddr::V4(v4) => u32::from(v4) & 0xffff,
            IpAddr::V6(v6) => u32::from(v6.segments()[7]),
        };
        low.checked_sub(1)
    }
}

/// Counters of one class.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClassCounters {
    /// Connection attempts (`connect()` calls).
    pub attempts: u64,
    /// SYNs sent, retransmissions included.
    pub syns: u64,
    /// SYNs the kernel dropped for G1.
    pub drop_rate: u64,
    /// SYNs the kernel dropped for G2.
    pub drop_banned: u64,
    /// Attempts that ended in ETIMEDOUT.
    pub gave_up: u64,
    /// Attempts that met G1 and got in on a later retransmission (non-sliding window).
    pub rate_delayed: u64,
    /// Attempts refused (gatekeeper down).
    pub refused: u64,
    /// TCP connections established.
    pub sessions: u64,
    /// Sessions greeted with 554 (banned in the gatekeeper).
    pub greeted_banned: u64,
    /// Sessions greeted with 421.
    pub greeted_busy: u64,
    /// Sessions that reached their offence (offenders) or their probe (probers).
    pub offending: u64,
    /// Offending sessions banned in that same session.
    pub banned_in_session: u64,
    /// Ban orders for this class's addresses.
    pub bans: u64,
    /// Distinct addresses banned at least once.
    pub banned_addrs: u64,
    /// Messages submitted to MTAs.
    pub messages: u64,
    /// Messages delivered (250 after DATA, and in the spool).
    pub delivered: u64,
    /// Messages bounced (5xx).
    pub bounced: u64,
    /// Bounces that were right (mistyped recipients).
    pub bounced_expected: u64,
    /// Delivery attempts deferred (4xx, connection failure).
    pub deferrals: u64,
    /// Messages spooled twice (a 250 lost in a restart: allowed, counted).
    pub duplicates: u64,
    /// Spam messages the gatekeeper accepted (250 after DATA).
    pub spam_accepted: u64,
    /// Scripted sessions that got a 4xx at MAIL, RCPT or the end of DATA.
    pub tempfailed: u64,
    /// Replies that did not match the expected rule outcome (counted also as violations).
    pub unexpected: u64,
    /// Accepted SYNs whose SYN-ACK was lost (`syn_ack_loss`): the client retransmitted.
    pub syn_acks_lost: u64,
    /// Sessions tried again by a retrying source (`retry`) after one without a verdict.
    pub retries: u64,
    /// Sessions of a retrying source given up without a verdict (its queue lifetime over).
    pub abandoned: u64,
    /// Transactions an MTA began on a connection after one of its transactions there was
    /// refused or deferred (Postfix's RSET, then the next message; `after_5xx = "rset"`).
    pub after_refusal: u64,
}

/// Per-hour totals for the graph.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Hour {
    /// Connection attempts.
    pub attempts: u64,
    /// SYNs dropped by the kernel (G1 + G2).
    pub kernel_drops: u64,
    /// 5xx verdicts.
    pub rejects: u64,
    /// 4xx verdicts.
    pub tempfails: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Bans decided.
    pub bans: u64,
}

/// The fields of an hourly bucket, by name: what a time-windowed metric may sum.
pub const HOUR_FIELDS: [&str; 6] = ["attempts", "kernel_drops", "rejects", "tempfails", "delivered", "bans"];

impl Hour {
    fn field(&self, i: usize) -> u64 {
        [self.attempts, self.kernel_drops, self.rejects, self.tempfails, self.delivered, self.bans][i]
    }
}

/// A time-windowed metric, `FIELD[FROM..UNTIL]` (`"bans[2h..3h]"`): the sum of an hourly
/// bucket's field over the whole hours from `FROM` to `UNTIL` (say, bans during a fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    field: usize,
    from_h: usize,
    until_h: usize,
}

impl Window {
    /// `None` if `name` is no windowed metric at all; otherwise the window or what is wrong
    /// with it.
    pub fn parse(name: &str) -> Option<Result<Window, String>> {
        let (field, rest) = name.split_once('[')?;
        let range = rest.strip_suffix(']')?;
        Some((|| {
            let field = HOUR_FIELDS
                .iter()
                .position(|f| *f == field)
                .ok_or_else(|| format!("{name:?}: a window sums one of {HOUR_FIELDS:?}"))?;
            let (from, until) = range.split_once("..").ok_or_else(|| format!("{name:?}: FROM..UNTIL"))?;
            let hours = |t: &str| {
                let d =
                    humantime_serde::re::humantime::parse_duration(t.trim()).map_err(|e| format!("{name:?}: {e}"))?;
                if d.as_secs() % 3600 != 0 || d.subsec_nanos() != 0 {
                    return Err(format!("{name:?}: windows are whole hours (the hourly buckets)"));
                }
                Ok((d.as_secs() / 3600) as usize)
            };
            let (from_h, until_h) = (hours(from)?, hours(until)?);
            if from_h >= until_h {
                return Err(format!("{name:?}: FROM must be before UNTIL"));
            }
            Ok(Window { field, from_h, until_h })
        })())
    }

    /// The sum over the window.
    pub fn value(&self, hours: &[Hour]) -> f64 {
        let end = self.until_h.min(hours.len());
        hours.get(self.from_h.min(end)..end).unwrap_or_default().iter().map(|h| h.field(self.field)).sum::<u64>() as f64
    }

    /// The window's end, in hours.
    pub fn until_h(&self) -> usize {
        self.until_h
    }
}

/// The rules whose verdicts are counted.
pub const RULES: [Rule; 8] = [Rule::G1, Rule::G2, Rule::E1, Rule::E2, Rule::C1, Rule::V1, Rule::Proto, Rule::Deliver];

/// Ban reasons counted.
pub const REASONS: [BanReason; 5] = [
    BanReason::ForgedLocalSender,
    BanReason::FakeSender,
    BanReason::Virus,
    BanReason::UnknownRecipient,
    BanReason::Manual,
];

/// Index of a rule in [`RULES`].
pub fn rule_index(rule: Rule) -> usize {
    RULES.iter().position(|r| *r == rule).unwrap_or(RULES.len() - 1)
}

/// Index of a reason in [`REASONS`].
pub fn reason_index(reason: BanReason) -> usize {
    REASONS.iter().position(|r| *r == reason).unwrap_or(REASONS.len() - 1)
}

/// Every counter of a run.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Per class.
    pub class: [ClassCounters; 8],
    /// 5xx verdicts by rule.
    pub rejects: [u64; 8],
    /// 4xx verdicts by rule.
    pub tempfails: [u64; 8],
    /// Bans by reason.
    pub bans: [u64; 5],
    /// Callback probes the remote MX saw (RCPT from the gatekeeper).
    pub callbacks: u64,
    /// C1 verdicts: accepted, rejected, tempfailed.
    pub c1: [u64; 3],
    /// SYNs the kernel accepted from an address whose ban was still running (xt_recent evicted
    /// it: docs/kernel.md §4 pitfall 1).
    pub accepted_while_banned: u64,
    /// Gatekeeper restarts.
    pub restarts: u64,
    /// Bans re-applied after a restart.
    pub reapplied: u64,
    /// Invariant violations by kind.
    pub violations: [u64; 8],
}

impl Counters {
    /// The counters of `class`.
    pub fn of(&mut self, class: Class) -> &mut ClassCounters {
        &mut self.class[class.index()]
    }
}

/// Delay statistics of delivered honest messages (seconds).
#[derive(Debug, Clone, Copy, Default)]
pub struct Delays {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Delays {
    /// From delays in milliseconds (nearest-rank percentiles).
    pub fn from_ms(mut ms: Vec<u64>) -> Delays {
        if ms.is_empty() {
            return Delays::default();
        }
        ms.sort_unstable();
        let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1] as f64 / 1000.0;
        Delays { p50: rank(0.5), p99: rank(0.99), max: *ms.last().unwrap_or(&0) as f64 / 1000.0 }
    }
}

const CLASS_FIELDS: [&str; 27] = [
    "attempts",
    "syns",
    "drop_rate",
    "drop_banned",
    "gave_up",
    "rate_delayed",
    "refused",
    "sessions",
    "greeted_banned",
    "greeted_busy",
    "offending",
    "banned_in_session",
    "bans",
    "banned_addrs",
    "messages",
    "delivered",
    "bounced",
    "bounced_expected",
    "deferrals",
    "duplicates",
    "spam_accepted",
    "tempfailed",
    "unexpected",
    "syn_acks_lost",
    "retries",
    "abandoned",
    "after_refusal",
];

fn class_values(c: &ClassCounters) -> [u64; 27] {
    [
        c.attempts,
        c.syns,
        c.drop_rate,
        c.drop_banned,
        c.gave_up,
        c.rate_delayed,
        c.refused,
        c.sessions,
        c.greeted_banned,
        c.greeted_busy,
        c.offending,
        c.banned_in_session,
        c.bans,
        c.banned_addrs,
        c.messages,
        c.delivered,
        c.bounced,
        c.bounced_expected,
        c.deferrals,
        c.duplicates,
        c.spam_accepted,
        c.tempfailed,
        c.unexpected,
        c.syn_acks_lost,
        c.retries,
        c.abandoned,
        c.after_refusal,
    ]
}

/// Values computed at the end of a run, beside the counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Final {
    /// Honest (and bounce) messages still queued at the end.
    pub pending: u64,
    /// Delivery delays of honest and bounce messages.
    pub delays: Delays,
    /// Honest MTAs banned at least once.
    pub banned_mtas: u64,
    /// Distinct addresses banned.
    pub banned_distinct: u64,
    /// Simulated hours.
    pub sim_hours: f64,
    /// Distinct client addresses that tried to connect.
    pub addresses: u64,
}

fn put_counters(m: &mut BTreeMap<String, f64>, prefix: &str, cc: &ClassCounters) {
    for (name, v) in CLASS_FIELDS.iter().zip(class_values(cc)) {
        m.insert(format!("{prefix}.{name}"), v as f64);
    }
    let ratio = if cc.offending == 0 { 1.0 } else { cc.banned_in_session as f64 / cc.offending as f64 };
    m.insert(format!("{prefix}.banned_in_session_ratio"), ratio);
}

/// The flat metrics (`name → value`), sorted by name. `actors` are the per-actor counters
/// with their names.
pub fn flatten(c: &Counters, f: &Final, actors: &[(String, ClassCounters)]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for class in Class::ALL {
        put_counters(&mut m, class.as_str(), &c.class[class.index()]);
    }
    for (name, cc) in actors {
        put_counters(&mut m, &format!("actor.{name}"), cc);
    }
    let mut put = |k: String, v: f64| {
        m.insert(k, v);
    };
    let sum = |pick: fn(&ClassCounters) -> u64| c.class.iter().map(pick).sum::<u64>() as f64;
    put("attempts".into(), sum(|c| c.attempts));
    put("addresses".into(), f.addresses as f64);
    put("syns".into(), sum(|c| c.syns));
    put("sessions".into(), sum(|c| c.sessions));
    put("kernel.drop_rate".into(), sum(|c| c.drop_rate));
    put("kernel.drop_banned".into(), sum(|c| c.drop_banned));
    put("kernel.drops".into(), sum(|c| c.drop_rate + c.drop_banned));
    put("kernel.accepted_while_banned".into(), c.accepted_while_banned as f64);
    put("gave_up".into(), sum(|c| c.gave_up));
    put("rate_delayed".into(), sum(|c| c.rate_delayed));
    put("refused".into(), sum(|c| c.refused));
    for (i, r) in RULES.iter().enumerate() {
        put(format!("rejects.{}", r.as_str()), c.rejects[i] as f64);
        put(format!("tempfails.{}", r.as_str()), c.tempfails[i] as f64);
    }
    put("rejects".into(), c.rejects.iter().sum::<u64>() as f64);
    put("tempfails".into(), c.tempfails.iter().sum::<u64>() as f64);
    for (i, r) in REASONS.iter().enumerate() {
        put(format!("bans.{}", r.as_str()), c.bans[i] as f64);
    }
    put("bans".into(), c.bans.iter().sum::<u64>() as f64);
    put("bans.distinct".into(), f.banned_distinct as f64);
    put("callbacks".into(), c.callbacks as f64);
    put("callbacks.valid".into(), c.c1[0] as f64);
    put("callbacks.invalid".into(), c.c1[1] as f64);
    put("callbacks.unknown".into(), c.c1[2] as f64);
    let mta = |pick: fn(&ClassCounters) -> u64| {
        (pick(&c.class[Class::Honest.index()]) + pick(&c.class[Class::Bounce.index()])) as f64
    };
    let messages = mta(|c| c.messages);
    let expected_bounces = mta(|c| c.bounced_expected);
    let delivered = mta(|c| c.delivered);
    put("mail.messages".into(), messages);
    put("mail.delivered".into(), delivered);
    put("mail.bounced".into(), mta(|c| c.bounced));
    put("mail.pending".into(), f.pending as f64);
    let wanted = messages - expected_bounces;
    put("mail.delivered_ratio".into(), if wanted <= 0.0 { 1.0 } else { delivered / wanted });
    put("mail.delay_p50".into(), f.delays.p50);
    put("mail.delay_p99".into(), f.delays.p99);
    put("mail.delay_max".into(), f.delays.max);
    put("mail.banned_mtas".into(), f.banned_mtas as f64);
    put("restarts".into(), c.restarts as f64);
    put("bans.reapplied".into(), c.reapplied as f64);
    for (i, k) in Invariant::ALL.iter().enumerate() {
        put(format!("violations.{}", k.as_str()), c.violations[i] as f64);
    }
    put("violations".into(), c.violations.iter().sum::<u64>() as f64);
    put("sim_hours".into(), f.sim_hours);
    m
}

/// Every metric name an expectation may use, given each actor's name in metrics.
pub fn metric_names(actor_names: &[String]) -> Vec<String> {
    let actors: Vec<(String, ClassCounters)> =
        actor_names.iter().map(|n| (n.clone(), ClassCounters::default())).collect();
    flatten(&Counters::default(), &Final::default(), &actors).into_keys().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_map_back_to_their_class() {
        for class in Class::ALL {
            for n in [0, 1, 255, 256, 64_999] {
                for a in [class.addr(n), class.addr6(n, n / 7)] {
                    assert_eq!((Class::of(a), Class::ordinal(a)), (Some(class), Some(n)), "{class:?} {a}");
                }
            }
        }
        assert_eq!(Class::of("192.168.0.1".parse().unwrap()), None);
        assert_eq!(Class::of("2001:db8::1".parse().unwrap()), None);
        assert_ne!(Class::Backscatter.addr(0), Class::Backscatter.addr(1));
        assert_eq!(Class::ForgedLocal.addr6(4, 3).to_string(), "fd10:12:0:3::5");
    }

    #[test]
    fn windows_sum_whole_hours() {
        let hours: Vec<Hour> = (0..5).map(|i| Hour { bans: i, attempts: 10, ..Hour::default() }).collect();
        let w = Window::parse("bans[1h..3h]").unwrap().unwrap();
        assert_eq!(w.value(&hours), 3.0);
        assert_eq!(Window::parse("attempts[4h..9h]").unwrap().unwrap().value(&hours), 10.0);
        assert!(Window::parse("bans").is_none());
        assert!(Window::parse("bans[3h..1h]").unwrap().is_err());
        assert!(Window::parse("bans[30m..1h]").unwrap().is_err());
        assert!(Window::parse("nothing[0h..1h]").unwrap().is_err());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let d = Delays::from_ms((1..=100).map(|s| s * 1000).collect());
        assert_eq!((d.p50, d.p99, d.max), (50.0, 99.0, 100.0));
        assert_eq!(Delays::from_ms(vec![]).max, 0.0);
    }
}
