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
use std::task::{Context, Poll};
use std::time::Duration;

use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream};
use lettre::transport::smtp::extension::ClientId;
use rand::Rng;
use rand::rngs::SmallRng;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use crate::actors::{Arrivals, EICAR, arrivals};
use crate::client::connect;
use crate::invariants::Invariant;
use crate::metrics::Class;
use crate::profile::{random_local, rng};
use crate::world::World;

/// How long a message may stay queued before it is given up (Postfix's
/// `maximal_queue_lifetime`).
pub const QUEUE_LIFETIME: Duration = Duration::from_secs(5 * 24 * 3600);
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
    let start = world.cfg.ranges[index].1;
    let mut queues = Vec::with_capacity(spec.addresses as usize);
    for i in 0..spec.addresses {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        let mta = Mta {
            world: world.clone(),
            class: spec.kind,
            addr: spec.addr(start, i),
            domain: home(i),
            rng: rng(seed, &format!("mta-{index}"), u64::from(i)),
            port: 0,
        };
        tokio::spawn(mta.run(rx));
        queues.push(tx);
    }
    let end = world.cfg.duration.as_secs_f64();
    let base = tokio::time::Instant::now() - world.now();
    let mut t = world.now().as_secs_f64();
    let mut n: u64 = 0;
    let users = &world.cfg.users;
    while let Some(next) = profile.next_arrival(t, end, &mut r) {
        t = next;
        tokio::time::sleep_until(base + Duration::from_secs_f64(t)).await;
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
        {
            let mut st = world.state();
            st.bump(spec.addr(start, i), |c| c.messages += 1);
            st.pending += 1;
            st.queued.insert(id, (spec.addr(start, i), now));
        }
        if queues[i as usize].try_send(msg).is_err() {
            let mut st = world.state();
            st.pending -= 1;
            st.queued.remove(&id);
            st.violate(now, Invariant::HonestLost, spec.addr(start, i), "MTA queue full".into());
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
    port: u16,
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
                    Some(d) => tokio::time::sleep_until(base + d).await,
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

    /// Tries every due message; defers, bounces or gives up the rest.
    async fn queue_run(&mut self, queue: &mut VecDeque<Msg>) {
        // Only what was due when the run began; messages that fall due meanwhile go next.
        let start = self.world.now();
        for _ in 0..CONNECTIONS_PER_RUN {
            let due: Vec<usize> = (0..queue.len()).filter(|&i| queue[i].next_try <= start).collect();
            if due.is_empty() {
                return;
            }
            self.port = self.port.wrapping_add(1).max(1024);
            let Ok(stream) = connect(&self.world, self.addr, self.port).await else {
                return self.defer_due(queue, start);
            };
            let connected = self.world.now();
            let hello = ClientId::Domain(format!("mx.{}", self.domain));
            let conn = tokio::time::timeout(
                TRANSACTION_MAX,
                AsyncSmtpConnection::connect_with_transport(Box::new(LettreStream(stream)), &hello),
            )
            .await;
            // A 4xx or 5xx greeting (G2 554, busy 421) is a host problem, not the message's:
            // Postfix skips such a server and defers (smtp_skip_5xx_greeting).
            let Ok(Ok(mut conn)) = conn else {
                return self.defer_due(queue, start);
            };
            // lettre got a 220: a banned MTA let in (counted as honest bans elsewhere).
            self.world.check_let_in(self.addr, connected, 220);
            let mut broken = false;
            for i in due {
                if broken {
                    break;
                }
                let msg = queue[i].clone();
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
                        queue[i].next_try = Duration::MAX;
                    }
                    Ok(Err(e)) if e.is_permanent() => {
                        self.bounced(&msg, now, &e.to_string());
                        queue[i].next_try = Duration::MAX;
                        broken = true;
                    }
                    _ => {
                        // 4xx, a broken connection or a timeout: this message waits for the
                        // next queue run; lettre has given up on the connection, so the rest
                        // of this run goes on a new one.
                        let mut m = queue[i].clone();
                        queue[i].next_try = if self.requeue(&mut m, now) { m.next_try } else { Duration::MAX };
                        broken = true;
                    }
                }
            }
            queue.retain(|m| m.next_try != Duration::MAX);
            if !broken {
                let _ = tokio::time::timeout(Duration::from_secs(60), conn.quit()).await;
                return self.defer_due(queue, start);
            }
        }
        self.defer_due(queue, start);
    }

    /// Every message that was due at `start` and is still queued waits for the next queue
    /// run, or is given up.
    fn defer_due(&mut self, queue: &mut VecDeque<Msg>, start: Duration) {
        let now = self.world.now();
        let mut q = std::mem::take(queue);
        q.retain_mut(|m| m.next_try > start || self.requeue(m, now));
        *queue = q;
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
