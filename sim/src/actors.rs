//! The traffic that is not an MTA queue: backscatter sources, forged-local, fake-sender,
//! virus and dictionary spammers, and callback probers. Each actor is one generator task on its
//! traffic host that draws arrivals from its rate profile and spawns one task per session.
//!
//! Every session checks what it sees as it happens: the reply codes (in [`Smtp`]), the rule
//! outcome its class must get, and, for offenders, that the ban was decided in this very
//! session. Honest MTAs and bounce MTAs live in [`crate::mta`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use gatekeeper::policy::{BanReason, OnUnknown};
use gatekeeper::proto::Verb;
use rand::Rng;
use rand::rngs::SmallRng;

use crate::client::{Smtp, connect_as};
use crate::invariants::Invariant;
use crate::metrics::Class;
use crate::mta;
use crate::profile::{Chooser, Profile, random_local, rng};
use crate::scenario::{ActorSpec, Behaviour, ProbeSender, ProxyMode};
use crate::world::World;

/// The EICAR test file (the built-in scanner's signature).
pub const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

/// What one session will do, drawn by the generator.
#[derive(Debug, Clone)]
struct Script {
    class: Class,
    addr: IpAddr,
    port: u16,
    helo: String,
    /// MAIL FROM path, with brackets.
    from: String,
    /// RCPT TO addresses and whether each exists.
    rcpts: Vec<(String, bool)>,
    /// What the PROXY header says.
    proxy: ProxyMode,
}

/// What a session showed, judged when it ends.
#[derive(Debug, Clone, Copy, Default)]
struct Outcome {
    /// An offender reached its offence: it must have been banned in this session.
    offended: bool,
    /// Probe-shaped (DESIGN §2, E2): a non-null sender, one recipient refused as unknown, no
    /// DATA. B4 remembers it for its window.
    probe: bool,
    /// The session ended with a verdict (2xx or 5xx), not a 4xx, a 554 greeting or a broken
    /// connection: a retrying source is done with it.
    verdict: bool,
}

/// A retrying source's queue (Postfix) retries on [`mta::backoff`] for `bounce_queue_lifetime`,
/// whose default is `maximal_queue_lifetime`'s.
const BOUNCE_LIFETIME: Duration = mta::QUEUE_LIFETIME;

/// What drives actor `index`'s arrivals: its spec, its seeded RNG, its rate profile (drawn
/// from that RNG first) and its address chooser. Shared by spammers and MTA actors so that
/// every kind consumes its seed the same way.
pub(crate) struct Arrivals {
    pub spec: ActorSpec,
    pub rng: SmallRng,
    pub profile: Profile,
    pub chooser: Chooser,
}

pub(crate) fn arrivals(world: &World, index: usize) -> Arrivals {
    let spec = world.cfg.actors[index].clone();
    let mut rng = rng(world.cfg.run.seed, "actor", index as u64);
    let points: Vec<(Duration, f64)> = spec.rate.iter().map(|(t, v)| (t.0, *v)).collect();
    let profile = Profile::new(&points, spec.jitter, &mut rng);
    let chooser = Chooser::new(spec.addresses, spec.skew);
    Arrivals { spec, rng, profile, chooser }
}

/// Runs actor `index` of the scenario until the end of the safety phase.
pub async fn generator(world: Arc<World>, index: usize) {
    let Arrivals { spec, rng: mut r, profile, chooser } = arrivals(&world, index);
    let end = world.cfg.duration.as_secs_f64();
    let start = tokio::time::Instant::now();
    let base = start - world.now();
    let mut t = world.now().as_secs_f64();
    let mut n: u64 = 0;
    while let Some(next) = profile.next_arrival(t, end, &mut r) {
        t = next;
        crate::wake::sleep_until(base + Duration::from_secs_f64(t)).await;
        let addr = world.cfg.addr_of(index, chooser.pick(&mut r));
        let script = draw(&world, &spec, addr, n, &mut r);
        n += 1;
        let w = world.clone();
        let retry = spec.retry;
        tokio::spawn(crate::world::ACTOR.scope(index, source(w, script, retry)));
    }
}

/// One session of a source; with `retry`, tried again on a bounce queue's schedule until it
/// ends with a verdict or its lifetime is over.
async fn source(world: Arc<World>, s: Script, retry: bool) {
    let first = world.now();
    let mut attempt = 0;
    while !session(world.clone(), s.clone()).await && retry {
        let backoff = mta::backoff(attempt);
        if world.now() + backoff >= first + BOUNCE_LIFETIME {
            world.state().bump(s.addr, |c| c.abandoned += 1);
            return;
        }
        crate::wake::sleep(backoff).await;
        attempt += 1;
        world.state().bump(s.addr, |c| c.retries += 1);
    }
}

fn draw(world: &World, spec: &ActorSpec, addr: IpAddr, n: u64, r: &mut SmallRng) -> Script {
    let cfg = &world.cfg;
    let domain = &cfg.domain;
    let user = |r: &mut SmallRng| format!("{}@{domain}", cfg.users[r.random_range(0..cfg.users.len())]);
    let sender_domain = |r: &mut SmallRng| {
        let pool = spec.senders.as_deref().and_then(|p| cfg.pool(p)).expect("validated sender pool");
        format!("d{}.{}.remote.test", r.random_range(0..pool.domains), pool.pool)
    };
    let port = 1024 + (n % 60_000) as u16;
    let host = addr.to_string().replace(['.', ':'], "-");
    let helo = format!("h{host}.{}.sim.test", spec.kind.as_str().replace('_', "-"));
    let rcpts_n = spec.rcpts.unwrap_or(1);
    let (from, rcpts) = match spec.kind {
        Class::Backscatter => {
            let rcpts = (0..rcpts_n).map(|_| (format!("{}@{domain}", random_local(r, 8)), false)).collect();
            ("<>".to_string(), rcpts)
        }
        Class::ForgedLocal => (format!("<{}@{domain}>", random_local(r, 8)), vec![(user(r), true)]),
        Class::FakeSender => (format!("<{}@{}>", random_local(r, 10), sender_domain(r)), vec![(user(r), true)]),
        Class::Virus => (format!("<u{}@{}>", r.random_range(0..1000), sender_domain(r)), vec![(user(r), true)]),
        Class::Dictionary => {
            let mut rcpts: Vec<(String, bool)> =
                (0..rcpts_n).map(|_| (format!("{}@{domain}", random_local(r, 6)), false)).collect();
            rcpts.extend((0..spec.valid_rcpts).map(|_| (user(r), true)));
            (format!("<u{}@{}>", r.random_range(0..1000), sender_domain(r)), rcpts)
        }
        Class::Prober => {
            let unknown = r.random_bool(spec.unknown_ratio);
            let rcpt = if unknown { (format!("{}@{domain}", random_local(r, 8)), false) } else { (user(r), true) };
            // A prober verifies from its own domain, always the same one per address.
            let own = |local: &str| {
                let pool = spec.senders.as_deref().and_then(|p| cfg.pool(p)).expect("validated sender pool");
                let i = Class::ordinal(addr).unwrap_or(0) % pool.domains;
                format!("<{local}@d{i}.{}.remote.test>", pool.pool)
            };
            let from = match spec.probe_sender {
                ProbeSender::Null => "<>".to_string(),
                ProbeSender::DoubleBounce => own("double-bounce"),
                ProbeSender::Postmaster => own("postmaster"),
            };
            (from, vec![rcpt])
        }
        Class::Honest | Class::Bounce => unreachable!("MTAs are driven by mta::generator"),
    };
    Script { class: spec.kind, addr, port, helo, from, rcpts, proxy: spec.proxy }
}

/// Longest a spam session may take before the client gives up.
const SESSION_MAX: Duration = Duration::from_secs(1200);

/// One session; whether it ended with a verdict.
async fn session(world: Arc<World>, s: Script) -> bool {
    let Ok(stream) = connect_as(&world, s.addr, s.port, s.proxy).await else { return false };
    let start = world.now();
    let mut smtp = Smtp::new(stream, world.clone(), s.addr);
    let outcome = tokio::time::timeout(SESSION_MAX, dialogue(&world, &mut smtp, &s, start)).await;
    let outcome = match outcome {
        Ok(Ok(outcome)) => {
            smtp.quit().await;
            outcome
        }
        _ => Outcome::default(),
    };
    if outcome.probe {
        world.record_probe(s.addr);
    }
    if outcome.offended {
        check_banned(&world, &s, start);
    }
    outcome.verdict
}

/// The dialogue, and what it showed (`Outcome`) if it ran to its end.
async fn dialogue(world: &World, smtp: &mut Smtp, s: &Script, start: Duration) -> std::io::Result<Outcome> {
    let nothing = Outcome::default();
    let greeting = smtp.greeting().await?;
    if s.proxy == ProxyMode::Client {
        world.check_let_in(s.addr, start, greeting.code);
    }
    match greeting.code {
        220 => {}
        554 => {
            world.state().bump(s.addr, |c| c.greeted_banned += 1);
            return Ok(nothing);
        }
        _ => {
            world.state().bump(s.addr, |c| c.greeted_busy += 1);
            return Ok(nothing);
        }
    }
    let ehlo = smtp.cmd(Verb::Ehlo, &format!("EHLO {}", s.helo)).await?;
    if ehlo.is_negative() {
        return Ok(nothing);
    }
    let mail = smtp.cmd(Verb::Mail, &format!("MAIL FROM:{}", s.from)).await?;
    if s.proxy == ProxyMode::Local {
        // The proxy's own health check: no client address, so no rule and no transaction.
        if mail.code == 451 {
            world.state().bump(s.addr, |c| c.tempfailed += 1);
        } else {
            unexpected(
                world,
                s,
                Invariant::BadReply,
                format!("MAIL in a PROXY LOCAL session got {}, not 451", mail.code),
            );
        }
        return Ok(nothing);
    }
    let on_unknown = world.cfg.settings.session.on_unknown;
    match s.class {
        Class::ForgedLocal => {
            if mail.code == 250 {
                unexpected(
                    world,
                    s,
                    Invariant::SpamAccepted,
                    format!("forged local sender {} accepted at MAIL", s.from),
                );
                return Ok(nothing);
            }
            return Ok(Outcome { offended: mail.code == 550, probe: false, verdict: true });
        }
        _ if s.from == "<>" && mail.code >= 500 => {
            unexpected(
                world,
                s,
                Invariant::BadReply,
                format!("MAIL FROM:<> refused with {} (RFC 5321 §4.5.5)", mail.code),
            );
            return Ok(Outcome { verdict: true, ..nothing });
        }
        _ if mail.code != 250 => return Ok(Outcome { verdict: mail.code >= 500, ..nothing }),
        _ => {}
    }
    let mut accepted = 0;
    let mut unknown = 0u32;
    let mut first_unknown = None;
    let mut offended = false;
    let mut closed = false;
    let mut tempfailed = false;
    // C1 (docs/design.md §2): an NXDOMAIN sender is refused without a ban, and so is a refusal
    // that does not say the mailbox does not exist (a bare 550, a policy 5.7.1); an accept-all
    // domain's sender is valid-but-unverifiable, so accepted.
    let sender_behaviour =
        s.from.trim_matches(['<', '>']).rsplit_once('@').and_then(|(_, d)| world.cfg.behaviour_of(d));
    let proves_no_mailbox = matches!(sender_behaviour, Some(Behaviour::Normal | Behaviour::Reject | Behaviour::NullMx));
    for (rcpt, exists) in &s.rcpts {
        let sent = world.now();
        let r = smtp.cmd(Verb::Rcpt, &format!("RCPT TO:<{rcpt}>")).await?;
        world.check_served_after_ban(s.addr, start, sent, &format!("RCPT TO:<{rcpt}>"), r.code);
        match s.class {
            Class::Backscatter | Class::Prober => {
                let want = if *exists { 250 } else { 550 };
                if r.code != want && r.code != 421 {
                    unexpected(
                        world,
                        s,
                        Invariant::BadReply,
                        format!("{} to {rcpt} (exists: {exists}) got {}, not {want}", s.from, r.code),
                    );
                }
                if s.class == Class::Prober {
                    world.state().bump(s.addr, |c| c.offending += 1);
                }
            }
            Class::FakeSender => match r.code {
                550 => offended = proves_no_mailbox,
                // Unknown is accepted only on a retry after the tempfail window: these senders
                // are random and never retried, so only an accept-all domain lets them in.
                250 if on_unknown == OnUnknown::Tempfail && sender_behaviour != Some(Behaviour::AcceptAll) => {
                    unexpected(world, s, Invariant::SpamAccepted, format!("fake sender {} got 250 for {rcpt}", s.from));
                }
                _ => {}
            },
            Class::Dictionary if r.code == 250 && !exists => {
                unexpected(world, s, Invariant::BadReply, format!("unknown recipient {rcpt} accepted"));
            }
            _ => {}
        }
        if r.code == 550 && !exists {
            unknown += 1;
            first_unknown.get_or_insert(sent);
        }
        if r.code == 250 {
            accepted += 1;
        }
        if (400..500).contains(&r.code) && r.code != 421 {
            world.state().bump(s.addr, |c| c.tempfailed += 1);
        }
        tempfailed |= (400..500).contains(&r.code);
        if r.code == 421 {
            closed = true;
            break;
        }
    }
    let null = s.from == "<>";
    let data = accepted > 0 && s.class != Class::Prober && !closed;
    let probe = !null && s.rcpts.len() == 1 && unknown == 1 && !data && !closed;
    if s.class == Class::Dictionary {
        offended = judge_dictionary(world, s, unknown, accepted, data, first_unknown);
    }
    let verdict = !tempfailed && !closed;
    if !data {
        return Ok(Outcome { offended, probe, verdict });
    }
    let sent = world.now();
    let reply = smtp.cmd(Verb::Data, "DATA").await?;
    world.check_served_after_ban(s.addr, start, sent, "DATA", reply.code);
    if reply.code != 354 {
        return Ok(Outcome { offended, probe, verdict: reply.code >= 500 });
    }
    let body = if s.class == Class::Virus {
        format!("Subject: invoice\r\nX-Sim-Class: {}\r\n\r\n{EICAR}\r\n", s.class.as_str())
    } else {
        format!("Subject: offer\r\nX-Sim-Class: {}\r\n\r\nbuy now\r\n", s.class.as_str())
    };
    let sent = world.now();
    let end = smtp.message(&body).await?;
    world.check_served_after_ban(s.addr, start, sent, "the end of DATA", end.code);
    match (s.class, end.code) {
        (Class::Virus, 554) => offended = true,
        (Class::Virus, 250) => {
            unexpected(world, s, Invariant::SpamAccepted, "virus accepted".into());
        }
        (_, 250) => world.state().bump(s.addr, |c| c.spam_accepted += 1),
        _ => {}
    }
    Ok(Outcome { offended, probe, verdict: !(400..500).contains(&end.code) })
}

/// Whether a dictionary session must have been banned (B4, DESIGN §2), judged only where
/// the session alone decides it: `unknown` recipients refused, `valid` accepted, DATA given
/// or not, the first unknown one sent at `first_unknown`.
fn judge_dictionary(
    world: &World,
    s: &Script,
    unknown: u32,
    valid: u32,
    data: bool,
    first_unknown: Option<Duration>,
) -> bool {
    let p = &world.cfg.settings.session.policy;
    let Some(at) = first_unknown else { return false };
    // The share test may spare a client whose recipients were mostly valid.
    let seen = unknown + valid;
    if seen >= p.b4_share_min_recipients && unknown * 100 < p.b4_unknown_share_max * seen {
        return false;
    }
    let probe_shaped = unknown == 1 && s.rcpts.len() == 1 && !data;
    if probe_shaped {
        // Not an offence, unless this network ended a probe-shaped session within the window.
        let st = world.state();
        p.b4_threshold == 1 && world.probed_within_window(&st, s.addr, at, true)
    } else {
        unknown >= p.b4_threshold
    }
}

fn unexpected(world: &World, s: &Script, invariant: Invariant, detail: String) {
    let now = world.now();
    let mut st = world.state();
    st.bump(s.addr, |c| c.unexpected += 1);
    st.violate(now, invariant, s.addr, detail);
}

/// Offenders must be banned, with the right reason, in the session that proved them.
fn check_banned(world: &World, s: &Script, start: Duration) {
    let want = match s.class {
        Class::ForgedLocal => BanReason::ForgedLocalSender,
        Class::FakeSender => BanReason::FakeSender,
        Class::Virus => BanReason::Virus,
        Class::Dictionary => BanReason::UnknownRecipient,
        _ => return,
    };
    let now = world.now();
    let mut st = world.state();
    st.bump(s.addr, |c| c.offending += 1);
    let banned = world.ban_of(&st, s.addr).is_some_and(|b| b.at >= start && b.reason == want);
    if banned {
        st.bump(s.addr, |c| c.banned_in_session += 1);
        if let Some(at) = world.ban_of(&st, s.addr).map(|b| b.at) {
            world.earned(&mut st, s.addr, at);
        }
    } else {
        let detail = format!(
            "{} client offended ({}) but was not banned ({}) in that session",
            s.class.as_str(),
            s.from,
            want.as_str()
        );
        st.violate(now, Invariant::OffenderNotBanned, s.addr, detail);
    }
}
