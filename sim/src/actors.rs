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

use crate::client::{Smtp, connect};
use crate::invariants::Invariant;
use crate::metrics::Class;
use crate::profile::{Chooser, Profile, random_local, rng};
use crate::scenario::{ActorSpec, Behaviour};
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
}

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
    let first = world.cfg.ranges[index].1;
    let end = world.cfg.duration.as_secs_f64();
    let start = tokio::time::Instant::now();
    let base = start - world.now();
    let mut t = world.now().as_secs_f64();
    let mut n: u64 = 0;
    while let Some(next) = profile.next_arrival(t, end, &mut r) {
        t = next;
        tokio::time::sleep_until(base + Duration::from_secs_f64(t)).await;
        let addr = spec.addr(first, chooser.pick(&mut r));
        let script = draw(&world, &spec, addr, n, &mut r);
        n += 1;
        let w = world.clone();
        tokio::spawn(async move { session(w, script).await });
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
            let rcpts = (0..rcpts_n).map(|_| (format!("{}@{domain}", random_local(r, 6)), false)).collect();
            (format!("<u{}@{}>", r.random_range(0..1000), sender_domain(r)), rcpts)
        }
        Class::Prober => {
            let unknown = r.random_bool(spec.unknown_ratio);
            let rcpt = if unknown { (format!("{}@{domain}", random_local(r, 8)), false) } else { (user(r), true) };
            ("<>".to_string(), vec![rcpt])
        }
        Class::Honest | Class::Bounce => unreachable!("MTAs are driven by mta::generator"),
    };
    Script { class: spec.kind, addr, port, helo, from, rcpts }
}

/// Longest a spam session may take before the client gives up.
const SESSION_MAX: Duration = Duration::from_secs(1200);

async fn session(world: Arc<World>, s: Script) {
    let start = world.now();
    let Ok(stream) = connect(&world, s.addr, s.port).await else { return };
    let mut smtp = Smtp::new(stream, world.clone(), s.addr);
    let outcome = tokio::time::timeout(SESSION_MAX, dialogue(&world, &mut smtp, &s)).await;
    let offended = match outcome {
        Ok(Ok(offended)) => {
            smtp.quit().await;
            offended
        }
        _ => false,
    };
    if offended {
        check_banned(&world, &s, start);
    }
}

/// The dialogue; `Ok(true)` if the client offended (offenders) and the session may be judged.
async fn dialogue(world: &World, smtp: &mut Smtp, s: &Script) -> std::io::Result<bool> {
    let greeting = smtp.greeting().await?;
    match greeting.code {
        220 => {}
        554 => {
            world.state().bump(s.addr, |c| c.greeted_banned += 1);
            return Ok(false);
        }
        _ => {
            world.state().bump(s.addr, |c| c.greeted_busy += 1);
            return Ok(false);
        }
    }
    let ehlo = smtp.cmd(Verb::Ehlo, &format!("EHLO {}", s.helo)).await?;
    if ehlo.is_negative() {
        return Ok(false);
    }
    let mail = smtp.cmd(Verb::Mail, &format!("MAIL FROM:{}", s.from)).await?;
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
                return Ok(false);
            }
            return Ok(mail.code == 550);
        }
        _ if s.from == "<>" && mail.code >= 500 => {
            unexpected(
                world,
                s,
                Invariant::BadReply,
                format!("MAIL FROM:<> refused with {} (RFC 5321 §4.5.5)", mail.code),
            );
            return Ok(false);
        }
        _ if mail.code != 250 => return Ok(false),
        _ => {}
    }
    let mut accepted = 0;
    let mut offended = false;
    // C1 (docs/design.md §2): an NXDOMAIN sender is refused without a ban, and an accept-all
    // domain's sender is valid-but-unverifiable, so accepted.
    let sender_behaviour =
        s.from.trim_matches(['<', '>']).rsplit_once('@').and_then(|(_, d)| world.cfg.behaviour_of(d));
    for (rcpt, exists) in &s.rcpts {
        let r = smtp.cmd(Verb::Rcpt, &format!("RCPT TO:<{rcpt}>")).await?;
        match s.class {
            Class::Backscatter | Class::Prober => {
                let want = if *exists { 250 } else { 550 };
                if r.code != want && r.code != 421 {
                    unexpected(
                        world,
                        s,
                        Invariant::BadReply,
                        format!("<> to {rcpt} (exists: {exists}) got {}, not {want}", r.code),
                    );
                }
                if s.class == Class::Prober {
                    world.state().bump(s.addr, |c| c.offending += 1);
                }
            }
            Class::FakeSender => match r.code {
                550 => offended = sender_behaviour != Some(Behaviour::NoDomain),
                250 if on_unknown == OnUnknown::Tempfail && sender_behaviour != Some(Behaviour::AcceptAll) => {
                    unexpected(world, s, Invariant::SpamAccepted, format!("fake sender {} got 250 for {rcpt}", s.from));
                }
                _ => {}
            },
            Class::Dictionary => {
                if r.code == 250 {
                    unexpected(world, s, Invariant::BadReply, format!("unknown recipient {rcpt} accepted"));
                }
                offended |= r.code == 550;
            }
            _ => {}
        }
        if r.code == 250 {
            accepted += 1;
        }
        if (400..500).contains(&r.code) && r.code != 421 {
            world.state().bump(s.addr, |c| c.tempfailed += 1);
        }
        if r.code == 421 {
            return Ok(offended);
        }
    }
    if offended && s.class == Class::Dictionary {
        // B4 bans once the client has given `b4_threshold` unknown recipients in the window;
        // the session is judged only if it alone reached the threshold.
        let threshold = world.cfg.settings.session.policy.b4_threshold;
        offended = s.rcpts.len() as u32 >= threshold;
    }
    if accepted == 0 || s.class == Class::Prober {
        return Ok(offended);
    }
    let data = smtp.cmd(Verb::Data, "DATA").await?;
    if data.code != 354 {
        return Ok(offended);
    }
    let body = if s.class == Class::Virus {
        format!("Subject: invoice\r\nX-Sim-Class: {}\r\n\r\n{EICAR}\r\n", s.class.as_str())
    } else {
        format!("Subject: offer\r\nX-Sim-Class: {}\r\n\r\nbuy now\r\n", s.class.as_str())
    };
    let end = smtp.message(&body).await?;
    match (s.class, end.code) {
        (Class::Virus, 554) => offended = true,
        (Class::Virus, 250) => {
            unexpected(world, s, Invariant::SpamAccepted, "virus accepted".into());
        }
        (_, 250) => world.state().bump(s.addr, |c| c.spam_accepted += 1),
        _ => {}
    }
    Ok(offended)
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
