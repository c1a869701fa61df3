//! Honest MTAs and bounce MTAs: real queues driven by lettre's `AsyncSmtpConnection` over
//! turmoil streams (docs/simulation.md). A message is tried at once; a connection failure, a 5xx or 4xx
//! greeting or a 4xx reply defers it to the next queue run (10–15 minutes later); a 5xx reply
//! bounces it; after its queue lifetime (5 days) it is given up, which is a lost message.
//!
//! The checkers run here as each outcome happens: a 250 must mean the message is in the spool;
//! a bounce must be of a mistyped recipient; a give-up is always a violation.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use gatekeeper::proto::Verb;

use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream};
use lettre::transport::smtp::extension::ClientId;
use rand::Rng;
use rand::rngs::SmallRng;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::actors::{Arrivals, EICAR, arrivals};
use crate::client::{Smtp, connect};
use crate::invariants::Invariant;
use crate::metrics::Class;
use crate::profile::{random_local, rng};
use crate::scenario::After5xx;
use crate::world::World;

/// How long a message may stay queued before it is given up (Postfix's
/// `maximal_queue_lifetime`).
pub const QUEUE_LIFETIME: Duration = Duration::from_secs(5 * 24 * 3600);
/// Postfix's `minimal_backoff_time` and `maximal_backoff_time`.
const BACKOFF_MIN: Duration = Duration::from_secs(300);
const BACKOFF_MAX: Duration = Duration::from_secs(4000);

/// The wait before a queue's retry number `attempt` (from 0), Postfix's way: the minimal
/// backoff, doubled at each retry, at most the maximal.
pub fn backoff(attempt: u32) -> Duration {
    (BACKOFF_MIN * 2u32.saturating_pow(attempt)).min(BACKOFF_MAX)
}
/// The longest wait between two queue runs (a deferred message is retried 10–15 min later).
pub const QUEUE_INTERVAL_MAX: Duration = Duration::from_secs(900);
/// Messages an MTA queue holds at most.
const QUEUE_MAX: usize = 10_000;
/// Connections per queue run at most (lettre abandons a connection after an error).
const CONNECTIONS_PER_RUN: u32 = 3;
/// Longest one SMTP transaction may take before the MTA gives up on the connection.
const TRANSACTION_MAX: Duration = Duration::from_secs(600);

/// One queued message.
#[derive(Debug, Clone)]
struct Msg {
    id: u64,
    from: Option<String>,
    to: String,
    typo: bool,
    /// A bounce that carries the original message's virus back (EICAR).
    virus: bool,
    submitted: Duration,
    next_try: Duration,
}

/// A turmoil stream as lettre's transport.
#[derive(Debug)]
pub struct LettreStream(pub turmoil::net::TcpStream);

impl AsyncRead for LettreStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for LettreStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for LettreStream {
    fn peer_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.peer_addr()
    }
}

/// Starts the MTAs of actor `index` and feeds them messages until the end of the safety phase.
pub async fn generator(world: Arc<World>, index: usize) {
    let Arrivals { spec, rng: mut r, profile, chooser } = arrivals(&world, index);
    let seed = world.cfg.run.seed;
    let home = |i: u32| match spec.senders.as_deref().and_then(|p| world.cfg.pool(p)) {
        Some(pool) => format!("d{}.{}.remote.test", i % pool.domains, pool.pool),
        None => format!("mta{i}.bounce.sim.test"),
    };
    let mut queues = Vec::with_capacity(spec.addresses as usize);
    for i in 0..spec.addresses {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        let mta = Mta {
            world: world.clone(),
            class: spec.kind,
            addr: world.cfg.addr_of(index, i),
            domain: home(i),
            rng: rng(seed, &format!("mta-{index}"), u64::from(i)),
            port: AtomicU16::new(0),
            after_5xx: spec.after_5xx,
            connections: spec.connections.max(1) as usize,
        };
        tokio::spawn(crate::world::ACTOR.scope(index, mta.run(rx)));
        queues.push(tx);
    }
    let end = world.cfg.duration.as_secs_f64();
    let base = tokio::time::Instant::now() - world.now();
    let mut t = world.now().as_secs_f64();
    let mut n: u64 = 0;
    let users = &world.cfg.users;
    while let Some(next) = profile.next_arrival(t, end, &mut r) {
        t = next;
        crate::wake::sleep_until(base + Duration::from_secs_f64(t)).await;
        let i = chooser.pick(&mut r);
        let typo = spec.typo_rate > 0.0 && r.random_bool(spec.typo_rate);
        let mut local = if typo {
            format!("{}{}", users[r.random_range(0..users.len())], random_local(&mut r, 2))
        } else {
            users[r.random_range(0..users.len())].clone()
        };
        // Newsletters to `user+tag@` (the recipient delimiter, DESIGN §2 E2).
        if spec.tag_ratio > 0.0 && r.random_bool(spec.tag_ratio) {
            local = format!("{local}+{}", random_local(&mut r, 5));
        }
        let virus = spec.virus_ratio > 0.0 && r.random_bool(spec.virus_ratio);
        let from = (spec.kind == Class::Honest).then(|| format!("u{}@{}", r.random_range(0..1000), home(i)));
        let now = world.now();
        // Ids: actor index in the high bits, a counter below: unique and stable.
        let id = ((index as u64) << 40) | n;
        n += 1;
        let msg =
            Msg { id, from, to: format!("{local}@{}", world.cfg.domain), typo, virus, submitted: now, next_try: now };
        let addr = world.cfg.addr_of(index, i);
        {
            let mut st = world.state();
            st.bump(addr, |c| c.messages += 1);
            st.pending += 1;
            st.queued.insert(id, (addr, now));
        }
        if queues[i as usize].try_send(msg).is_err() {
            let mut st = world.state();
            st.pending -= 1;
            st.queued.remove(&id);
            st.violate(now, Invariant::HonestLost, addr, "MTA queue full".into());
        }
    }
}

/// One MTA: its address, its queue, its retry timer.
struct Mta {
    world: Arc<World>,
    class: Class,
    addr: IpAddr,
    domain: String,
    rng: SmallRng,
    /// The source port of its last connection.
    port: AtomicU16,
    /// QUIT or RSET after a negative reply.
    after_5xx: After5xx,
    /// Parallel connections per queue run.
    connections: usize,
}

/// What became of one message in a queue run: delivered or bounced (`None`), or deferred at
/// the given time.
type Fate = (u64, Option<Duration>);

/// What a transaction in an RSET-style session ended with.
enum Verdict {
    Delivered,
    Refused(String),
    Deferred,
    /// 421: the server closes the connection.
    Closed,
}

impl Mta {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut queue: VecDeque<Msg> = VecDeque::new();
        let base = tokio::time::Instant::now() - self.world.now();
        let mut open = true;
        loop {
            let due = queue.iter().map(|m| m.next_try).min();
            if due.is_none() && !open {
                return;
            }
            let sleep = async {
                match due {
                    Some(d) => crate::wake::sleep_until(base + d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                m = rx.recv(), if open => match m {
                    Some(m) => queue.push_back(m),
                    None => open = false,
                },
                () = sleep => {}
            }
            while let Ok(m) = rx.try_recv() {
                queue.push_back(m);
            }
            let now = self.world.now();
            if queue.iter().any(|m| m.next_try <= now) {
                self.queue_run(&mut queue).await;
            }
        }
    }

    /// Tries every due message, over up to `connections` connections in parallel, each
    /// taking its share; defers (in the order the deferrals happened), bounces or gives up.
    async fn queue_run(&mut self, queue: &mut VecDeque<Msg>) {
        // Only what was due when the run began; messages that fall due meanwhile go next.
        let start = self.world.now();
        let due: Vec<Msg> = queue.iter().filter(|m| m.next_try <= start).cloned().collect();
        if due.is_empty() {
            return;
        }
        let n = self.connections.min(due.len());
        let mut shares: Vec<VecDeque<Msg>> = vec![VecDeque::new(); n];
        for (k, m) in due.into_iter().enumerate() {
            shares[k % n].push_back(m);
        }
        let this = &*self;
        let fates: Vec<Fate> = futures_util::future::join_all(shares.into_iter().map(|share| async move {
            match this.after_5xx {
                After5xx::Quit => this.deliver_lettre(share).await,
                After5xx::Rset => this.deliver_rset(share).await,
            }
        }))
        .await
        .into_iter()
        .flatten()
        .collect();
        // Deferrals draw the next try from the MTA's generator: in time order, then queue order.
        let position = |id: u64| queue.iter().position(|m| m.id == id).unwrap_or(usize::MAX);
        let mut deferred: Vec<(Duration, usize)> =
            fates.iter().filter_map(|&(id, at)| at.map(|at| (at, position(id)))).collect();
        deferred.sort_unstable();
        let mut gone: Vec<u64> = fates.iter().filter(|(_, at)| at.is_none()).map(|(id, _)| *id).collect();
        for (at, i) in deferred {
            let mut m = queue[i].clone();
            if self.requeue(&mut m, at) {
                queue[i].next_try = m.next_try;
            } else {
                gone.push(m.id);
            }
        }
        queue.retain(|m| !gone.contains(&m.id));
    }

    /// A share of a queue run over lettre: a connection per failure (lettre gives a
    /// connection up after any error), at most `CONNECTIONS_PER_RUN`.
    async fn deliver_lettre(&self, mut left: VecDeque<Msg>) -> Vec<Fate> {
        let mut fates = Vec::with_capacity(left.len());
        for _ in 0..CONNECTIONS_PER_RUN {
            if left.is_empty() {
                return fates;
            }
            let Ok(stream) = connect(&self.world, self.addr, self.next_port()).await else {
                return self.defer_all(fates, left);
            };
            let connected = self.world.now();
            let hello = ClientId::Domain(format!("mx.{}", self.domain));
            let conn = crate::wake::timeout(
                TRANSACTION_MAX,
                AsyncSmtpConnection::connect_with_transport(Box::new(LettreStream(stream)), &hello),
            )
            .await;
            // A 4xx or 5xx greeting (G2 554, busy 421) is a host problem, not the message's:
            // Postfix skips such a server and defers (smtp_skip_5xx_greeting).
            let Ok(Ok(mut conn)) = conn else {
                return self.defer_all(fates, left);
            };
            // lettre got a 220: a banned MTA let in (counted as honest bans elsewhere).
            self.world.check_let_in(self.addr, connected, 220);
            let mut broken = false;
            while let Some(msg) = left.pop_front() {
                let envelope = lettre::address::Envelope::new(
                    msg.from.as_deref().map(|f| f.parse().expect("valid sender")),
                    vec![msg.to.parse().expect("valid recipient")],
                )
                .expect("valid envelope");
                let body = self.body(&msg);
                let sent = tokio::time::timeout(TRANSACTION_MAX, conn.send(&envelope, body.as_bytes())).await;
                let now = self.world.now();
                match sent {
                    Ok(Ok(_)) => {
                        self.delivered(&msg, now);
                        fates.push((msg.id, None));
                    }
                    Ok(Err(e)) if e.is_permanent() => {
                        self.bounced(&msg, now, &e.to_string());
                        fates.push((msg.id, None));
                        broken = true;
                    }
                    _ => {
                        // 4xx, a broken connection or a timeout: this message waits for the
                        // next queue run; lettre has given up on the connection, so the rest
                        // of this run goes on a new one.
                        fates.push((msg.id, Some(now)));
                        broken = true;
                    }
                }
                if broken {
                    break;
                }
            }
            if !broken {
                let _ = tokio::time::timeout(Duration::from_secs(60), conn.quit()).await;
                return fates;
            }
        }
        self.defer_all(fates, left)
    }

    /// A share of a queue run the way Postfix sends: after a negative reply to a transaction
    /// command, RSET and the next message in the same connection; a new connection only after
    /// a 421 or a broken one (at most `CONNECTIONS_PER_RUN`). Every reply is checked on the
    /// wire ([`Smtp`]).
    async fn deliver_rset(&self, mut left: VecDeque<Msg>) -> Vec<Fate> {
        let mut fates = Vec::with_capacity(left.len());
        for _ in 0..CONNECTIONS_PER_RUN {
            if left.is_empty() {
                return fates;
            }
            let Ok(stream) = connect(&self.world, self.addr, self.next_port()).await else {
                return self.defer_all(fates, left);
            };
            let connected = self.world.now();
            let mut smtp = Smtp::new(stream, self.world.clone(), self.addr);
            let hello = async {
                let greeting = smtp.greeting().await?;
                if greeting.code != 220 {
                    if greeting.code == 554 {
                        self.world.state().bump(self.addr, |c| c.greeted_banned += 1);
                    }
                    return Ok(false);
                }
                self.world.check_let_in(self.addr, connected, 220);
                let ehlo = smtp.cmd(Verb::Ehlo, &format!("EHLO mx.{}", self.domain)).await?;
                Ok::<bool, std::io::Error>(ehlo.code == 250)
            };
            if !matches!(tokio::time::timeout(TRANSACTION_MAX, hello).await, Ok(Ok(true))) {
                smtp.quit().await;
                return self.defer_all(fates, left);
            }
            let mut broken = false;
            while let Some(msg) = left.pop_front() {
                let verdict = tokio::time::timeout(TRANSACTION_MAX, self.transaction(&mut smtp, &msg)).await;
                let now = self.world.now();
                match verdict {
                    Ok(Ok(Verdict::Delivered)) => {
                        self.delivered(&msg, now);
                        fates.push((msg.id, None));
                        continue;
                    }
                    Ok(Ok(Verdict::Refused(why))) => {
                        self.bounced(&msg, now, &why);
                        fates.push((msg.id, None));
                    }
                    Ok(Ok(Verdict::Deferred)) => fates.push((msg.id, Some(now))),
                    Ok(Ok(Verdict::Closed)) | Ok(Err(_)) | Err(_) => {
                        fates.push((msg.id, Some(now)));
                        broken = true;
                        break;
                    }
                }
                // The transaction failed: RSET, and on with the next message.
                let rset = tokio::time::timeout(TRANSACTION_MAX, smtp.cmd(Verb::Rset, "RSET")).await;
                if !matches!(rset, Ok(Ok(ref r)) if r.code == 250) {
                    broken = true;
                    break;
                }
                if !left.is_empty() {
                    self.world.state().bump(self.addr, |c| c.after_refusal += 1);
                }
            }
            if !broken {
                let _ = tokio::time::timeout(Duration::from_secs(60), smtp.quit()).await;
                return fates;
            }
        }
        self.defer_all(fates, left)
    }

    /// MAIL, RCPT, DATA and the message, stopping at the first negative reply.
    async fn transaction(&self, smtp: &mut Smtp, msg: &Msg) -> std::io::Result<Verdict> {
        let from = msg.from.as_deref().unwrap_or("");
        let steps = [(Verb::Mail, format!("MAIL FROM:<{from}>")), (Verb::Rcpt, format!("RCPT TO:<{}>", msg.to))];
        for (verb, line) in steps {
            if let Some(v) = Self::negative(smtp.cmd(verb, &line).await?) {
                return Ok(v);
            }
        }
        let data = smtp.cmd(Verb::Data, "DATA").await?;
        if data.code != 354 {
            return Ok(Self::negative(data).unwrap_or(Verdict::Deferred));
        }
        let end = smtp.message(&self.body(msg)).await?;
        Ok(Self::negative(end).unwrap_or(Verdict::Delivered))
    }

    fn negative(r: gatekeeper::proto::Reply) -> Option<Verdict> {
        match r.code {
            421 => Some(Verdict::Closed),
            400..=499 => Some(Verdict::Deferred),
            500.. => Some(Verdict::Refused(format!("{} {}", r.code, r.lines.join(" ")))),
            _ => None,
        }
    }

    /// The source port of a new connection.
    fn next_port(&self) -> u16 {
        let p = self.port.load(Ordering::Relaxed).wrapping_add(1).max(1024);
        self.port.store(p, Ordering::Relaxed);
        p
    }

    /// Every message left of a share waits for the next queue run.
    fn defer_all(&self, mut fates: Vec<Fate>, left: VecDeque<Msg>) -> Vec<Fate> {
        let now = self.world.now();
        fates.extend(left.iter().map(|m| (m.id, Some(now))));
        fates
    }

    /// Defers `m` to the next queue run; `false` if it has outlived its queue lifetime and is
    /// given up (a lost message).
    fn requeue(&mut self, m: &mut Msg, now: Duration) -> bool {
        let mut st = self.world.state();
        if now >= m.submitted + QUEUE_LIFETIME {
            st.pending -= 1;
            st.queued.remove(&m.id);
            let detail = format!(
                "message {} to {} given up after {} h in the queue",
                m.id,
                m.to,
                (now - m.submitted).as_secs() / 3600
            );
            st.violate(now, Invariant::HonestLost, self.addr, detail);
            return false;
        }
        st.bump(self.addr, |c| c.deferrals += 1);
        m.next_try = now + Duration::from_secs(self.rng.random_range(600..=900));
        true
    }

    fn delivered(&self, msg: &Msg, now: Duration) {
        let mut st = self.world.state();
        st.pending -= 1;
        st.queued.remove(&msg.id);
        st.bump(self.addr, |c| c.delivered += 1);
        st.hour(now).delivered += 1;
        st.delays_ms.push((now - msg.submitted).as_millis() as u64);
        if !st.spool.contains_key(&msg.id) {
            st.violate(
                now,
                Invariant::HonestLost,
                self.addr,
                format!("250 for message {} but it is not in the spool", msg.id),
            );
        }
        if msg.typo {
            st.violate(
                now,
                Invariant::BadReply,
                self.addr,
                format!("message to unknown recipient {} accepted", msg.to),
            );
        }
        if msg.virus && self.world.cfg.settings.session.scan {
            st.bump(self.addr, |c| c.spam_accepted += 1);
            st.violate(now, Invariant::SpamAccepted, self.addr, format!("bounce {} carrying a virus accepted", msg.id));
        }
    }

    fn bounced(&self, msg: &Msg, now: Duration, why: &str) {
        let mut st = self.world.state();
        st.pending -= 1;
        st.queued.remove(&msg.id);
        st.bump(self.addr, |c| c.bounced += 1);
        // A typo is refused 550; a bounce carrying a virus back is refused 554 (V1), not banned.
        if msg.typo || msg.virus {
            st.bump(self.addr, |c| c.bounced_expected += 1);
        } else {
            let detail = format!("message {} from {:?} to {} refused: {why}", msg.id, msg.from, msg.to);
            st.violate(now, Invariant::HonestRejected, self.addr, detail);
        }
    }

    fn body(&self, msg: &Msg) -> String {
        let from = msg.from.as_deref().unwrap_or("MAILER-DAEMON@sim.test");
        let subject = if msg.from.is_none() { "Delivery Status Notification" } else { "Hello" };
        let text = if msg.virus { EICAR } else { "simulated message" };
        format!(
            "Message-ID: <{}@{}>\r\nX-Sim-Id: {}\r\nX-Sim-Class: {}\r\nFrom: <{from}>\r\nTo: <{}>\r\nSubject: {subject}\r\n\r\n{text}\r\n",
            msg.id,
            self.domain,
            msg.id,
            self.class.as_str(),
            msg.to
        )
    }
}
