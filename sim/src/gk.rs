//! The gatekeeper host: the application `gatekeeper serve` runs, built by the same function
//! (`gatekeeper::app::assemble`) from the scenario's settings, on the simulation's edges:
//!
//! - the clock is turmoil's ([`SimClock`]), the state dir one that outlives restarts, and
//!   blocking work runs inline;
//! - the ban backend is the kernel firewall model ([`KernelBackend`]), and the ban sink is
//!   wrapped (`LedgerSink`) so every ban decision reaches the world's ledger first;
//! - the downstream is the world's spool (`Spool`): messages arrive into files under the state
//!   dir as in production, and the spool reads back only their headers;
//! - an [`Observer`] (`Watch`) counts every verdict and checks it as it happens;
//! - DNS and TCP for callbacks go over turmoil ([`crate::dns`], [`SimConnector`]); hickory's
//!   resolver is built per lookup ([`crate::dns::FreshResolver`], for determinism).
//!
//! The world's other choices (listen address, the kernel as ban backend, the users, the
//! callbacks' seed) are configuration overrides, made by `runner::resolve`; only the traffic
//! hosts' addresses, trusted for PROXY, are set here, as they exist only inside turmoil.
//!
//! The host is restartable: its state directory (bans, callback cache) and the spool outlive
//! the process, as a disk would, and the ban manager restores the bans on start.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gatekeeper::app::{Edges, assemble};
use gatekeeper::ban::{BackendError, BackendKind, BanBackend, BanManager, Net, NetList};
use gatekeeper::edges::{BanOrder, BanSink, BoxFuture, Downstream, MessageFile, Observer};
use gatekeeper::gate::GateKind;
use gatekeeper::policy::{BanReason, Rule};
use gatekeeper::session::{DeliveryError, Envelope, Event};
use gatekeeper::verify::{BoxStream, Connector};

use crate::dns::FreshResolver;
use crate::invariants::Invariant;
use crate::metrics::{Class, rule_index};
use crate::net::{SimClock, SimListener};
use crate::world::{Sabotage, World};

/// Runs the gatekeeper until the host is crashed or the simulation ends.
pub async fn run(world: Arc<World>, state_dir: PathBuf) -> turmoil::Result {
    let cfg = &world.cfg;
    // The traffic hosts speak PROXY for the many clients each of them plays; their addresses
    // exist only inside turmoil, so the world sets them here rather than in the configuration.
    let mut settings = cfg.settings.clone();
    settings.proxy_trusted = ["spam", "bounce", "honest"].iter().map(|h| turmoil::lookup(*h)).collect();
    // turmoil's hosts live in 192.168.0.0/16, an inside network the production default never
    // probes (impl/tests/callbacks.rs shows that refusal); here every remote MX lives there.
    settings.config.callbacks.allow_private_mx = true;
    let (sink_world, watch_world) = (world.clone(), world.clone());
    let spool = Spool::open(world.clone(), state_dir.join("incoming"))?;
    let edges = Edges {
        clock: Arc::new(SimClock::new(cfg.epoch, world.wall_step_ms.clone())),
        state_dir,
        offload: false,
        ban_backend: Box::new(KernelBackend { world: world.clone(), listed_at: AtomicU64::new(u64::MAX) }),
        downstream: Arc::new(spool),
        resolver: Box::new(|mut dns, seed| {
            dns.nameservers = vec![SocketAddr::new(turmoil::lookup("dns"), 53)];
            dns.os_port_selection = true;
            Ok(Arc::new(FreshResolver::new(dns, seed)))
        }),
        connector: Arc::new(SimConnector),
        ban_sink: Some(Box::new(move |manager| Arc::new(LedgerSink { world: sink_world, manager: manager.clone() }))),
        observer: Some(Box::new(move |manager| Arc::new(Watch { world: watch_world, manager: manager.clone() }))),
        cluster: None,
    };
    let app = assemble(&settings, edges).await.map_err(io::Error::other)?;
    let restored = app.start().await.map_err(io::Error::other)?;
    {
        let mut st = world.state();
        st.c.reapplied += restored.restored as u64;
        st.kernel_lost = false;
    }
    let listener = SimListener::bind(settings.listen.expect("the world sets server.listen")).await?;
    app.run(listener, std::future::pending()).await?;
    Ok(())
}

/// The kernel firewall model as the ban manager's backend (xt_recent or nftables per the
/// gate's kind).
#[derive(Debug)]
pub struct KernelBackend {
    world: Arc<World>,
    /// The kernel's [`losses`](crate::world::Kernel::losses) at the last [`list`](BanBackend::list);
    /// `u64::MAX` before the first.
    listed_at: AtomicU64,
}

impl BanBackend for KernelBackend {
    fn kind(&self) -> BackendKind {
        match self.world.cfg.settings.config.gate.kind {
            GateKind::XtRecent { .. } => BackendKind::XtRecent,
            GateKind::Nft { .. } => BackendKind::Nftables,
        }
    }

    fn apply(&self, net: Net, remaining: Duration, _total: Duration) -> Result<(), BackendError> {
        let now = self.world.now();
        self.world.kernel().ban(now, net.addr(), remaining);
        Ok(())
    }

    fn remove(&self, net: Net) -> Result<(), BackendError> {
        self.world.kernel().unban(net.addr());
        Ok(())
    }

    fn expires_itself(&self) -> bool {
        self.kind() == BackendKind::Nftables
    }

    fn list(&self) -> Result<Option<NetList>, BackendError> {
        let prefix = self.world.cfg.settings.config.gate.ipv6_prefix;
        let now = self.world.now();
        let kernel = self.world.kernel();
        self.listed_at.store(kernel.losses(), Ordering::Relaxed);
        Ok(Some(kernel.banned(now).into_iter().map(|a| Net::ban_key(a, prefix)).collect()))
    }

    /// The model knows what a real kernel cannot tell: whether anything but the gatekeeper's
    /// own removes and expiry took a ban out since the last read-back. Reading thousands of
    /// bans back every 30 s was a fifth of a simulated month; the reconcile itself still runs
    /// after every reboot, eviction or refused add, as it would find something only then.
    fn may_have_lost(&self) -> bool {
        self.world.kernel().losses() != self.listed_at.load(Ordering::Relaxed)
    }

    fn capacity(&self) -> Option<usize> {
        match self.world.cfg.settings.config.gate.kind {
            GateKind::XtRecent { ip_list_tot, .. } => Some(ip_list_tot as usize),
            GateKind::Nft { .. } => None,
        }
    }
}

/// Records every ban decision in the world's ledger, then hands it to the ban manager.
#[derive(Debug)]
struct LedgerSink {
    world: Arc<World>,
    manager: BanManager,
}

impl BanSink for LedgerSink {
    fn exempt(&self, addr: IpAddr) -> bool {
        self.manager.is_allowlisted(addr)
    }

    fn ban(&self, order: BanOrder) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.manager.is_allowlisted(order.addr) {
                return BanSink::ban(&self.manager, order).await;
            }
            // The oracle's length comes from the configuration (`[gate] ban_time`, escalated by
            // the world's own count of earlier bans), never from the order: a gatekeeper that
            // banned for less is then caught letting a client in whose ban still runs.
            let ban_time = self.world.cfg.settings.config.gate.ban_time;
            let duration =
                if order.reason == BanReason::Manual { order.duration.unwrap_or(ban_time) } else { ban_time };
            self.world.record_ban(order.addr, order.reason, duration, &order.evidence);
            if self.world.cfg.sabotage == Sabotage::LoseForgedBans && order.reason == BanReason::ForgedLocalSender {
                return;
            }
            BanSink::ban(&self.manager, order).await;
        })
    }
}

/// The world's spool: records message ids; a duplicate is a 250 lost in a restart. Messages
/// arrive into files in `dir` (emptied when the host starts, as a restart leaves a crash's
/// partial files behind), named deterministically by session.
#[derive(Debug)]
struct Spool {
    world: Arc<World>,
    dir: PathBuf,
    counter: std::sync::atomic::AtomicU64,
}

/// Octets of a message's head the spool reads back for its `X-Sim-` headers.
const HEAD_MAX: u64 = 64 * 1024;

impl Spool {
    fn open(world: Arc<World>, dir: PathBuf) -> io::Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(Spool { world, dir, counter: std::sync::atomic::AtomicU64::new(0) })
    }
}

impl Downstream for Spool {
    fn create(&self, envelope: &Envelope) -> io::Result<MessageFile> {
        let n = self.counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        MessageFile::create(&self.dir, &format!("{}.{n}", envelope.session), b"")
    }

    fn deliver<'a>(
        &'a self,
        _envelope: &'a Envelope,
        message: MessageFile,
    ) -> BoxFuture<'a, Result<String, DeliveryError>> {
        Box::pin(async move {
            use std::io::Read;
            let mut head = Vec::new();
            let read = message.content().and_then(|c| c.take(HEAD_MAX).read_to_end(&mut head));
            drop(message); // the world keeps ids, not files
            if let Err(e) = read {
                return Err(DeliveryError::Temporary(format!("spool read failed: {e}")));
            }
            let message = head;
            let Some(id) = header(&message, "X-Sim-Id: ").and_then(|v| v.parse::<u64>().ok()) else {
                return Ok("spam".to_string());
            };
            let now = self.world.now();
            let class = match header(&message, "X-Sim-Class: ") {
                Some("bounce") => Class::Bounce,
                _ => Class::Honest,
            };
            let mut st = self.world.state();
            match st.spool.get_mut(&id) {
                Some(s) => {
                    s.copies += 1;
                    st.c.of(class).duplicates += 1;
                }
                None => {
                    st.spool.insert(id, crate::world::Spooled { at: now, copies: 1 });
                }
            }
            Ok(format!("S{id}"))
        })
    }
}

fn header<'a>(message: &'a [u8], name: &str) -> Option<&'a str> {
    let head_end = message.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(message.len());
    let head = std::str::from_utf8(&message[..head_end]).ok()?;
    head.split("\r\n").find_map(|l| l.strip_prefix(name)).map(str::trim)
}

/// Sees every verdict: counts it, checks it, and (sabotage) breaks a rule on purpose.
#[derive(Debug)]
struct Watch {
    world: Arc<World>,
    manager: BanManager,
}

impl Observer for Watch {
    fn on_event(&self, client: IpAddr, session: u64, event: &Event) {
        let now = self.world.now();
        let mut st = self.world.state();
        let i = rule_index(event.rule);
        match event.code {
            400..=499 => {
                st.c.tempfails[i] += 1;
                st.hour(now).tempfails += 1;
            }
            500.. => {
                st.c.rejects[i] += 1;
                st.hour(now).rejects += 1;
            }
            _ => {}
        }
        if event.rule == Rule::C1 {
            st.c.c1[match event.code {
                200..=299 => 0,
                500.. => 1,
                _ => 2,
            }] += 1;
        }
        // The code must be one RFC 5321 §4.3.2 allows for the exchange it answered.
        if event.verb().is_some_and(|verb| !verb.allows(event.code)) {
            let detail = format!("{} answered {} ({})", event.command, event.code, event.rule);
            st.violate(now, Invariant::BadReply, client, detail);
        }
        if event.rule == Rule::G2 && event.code == 554 && !self.world.ban_live(&st, client, now) {
            let detail = match self.world.ban_of(&st, client) {
                Some(b) => format!("refused as banned {:.3} s after the ban expired", (now - b.expires).as_secs_f64()),
                None => "refused as banned; no ban was decided".to_string(),
            };
            st.violate(now, Invariant::BanOutlived, client, detail);
        }
        drop(st);
        if self.world.cfg.sabotage == Sabotage::BanNullSenders
            && event.rule == Rule::E2
            && event.code == 550
            && event.ban.is_none()
        {
            let ban_time = self.world.cfg.settings.config.gate.ban_time;
            self.world.record_ban(client, BanReason::UnknownRecipient, ban_time, "sabotage");
            let _ = self.manager.ban_blocking(BanOrder {
                addr: client,
                reason: BanReason::UnknownRecipient,
                session,
                evidence: "sabotage: unknown recipient, any sender".into(),
                at: None,
                duration: Some(ban_time),
            });
        }
    }
}

/// TCP to remote MX hosts over turmoil.
#[derive(Debug, Clone, Copy)]
pub struct SimConnector;

impl Connector for SimConnector {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxStream>> {
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect(addr).await?;
            Ok(Box::new(stream) as BoxStream)
        })
    }
}
