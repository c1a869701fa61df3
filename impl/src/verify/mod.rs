//! Callback verification of senders (rule C1, docs/design.md §2): is there a mailbox behind the
//! envelope sender? Asked by the session (through [`crate::edges::Verifier`]) after the first
//! valid recipient of a transaction with an external, non-null sender.
//!
//! [`CallbackVerifier`] ties the parts together, in this order: never probe address literals,
//! local senders or allowlisted domains; answer from the [`cache`] (per address, plus
//! per-domain accept-all flags); admit the probe within the [`limits`] (per domain and overall,
//! so that we can never be used to flood a third party) or give up with *unknown*; run the
//! [`probe`] (MX lookup over the [`dns`] edge, SMTP over the [`net`] edge with lettre); cache
//! and log the result, one `callback probe` event per probe with its evidence.
//!
//! One probe per sender at a time: a verification of a sender whose probe is in flight (an
//! MTA delivering several messages from one new sender over parallel connections) waits for
//! that probe's result instead of starting a second probe or being refused by the limits. The
//! probe runs as its own task, so a caller that goes away (its session closed, a front end's
//! timeout) never cancels it for the others; its result is cached as usual.
//!
//! The verifier only finds facts; the verdict (250, 550 with or without ban B2, 451 for a
//! while) is `policy::verified`'s.
//! It never reads a clock except through the [`Clock`] edge, and all its randomness (MX tie
//! order, the accept-all check's local part) comes from a seed, so the simulation replays it.

pub mod cache;
pub mod config;
pub mod dns;
pub mod limits;
pub mod net;
pub mod probe;
pub mod scope;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use lettre::transport::smtp::extension::ClientId;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tracing::Instrument;

pub use self::cache::{CacheError, CacheHit, CacheTtls, VerifyCache};
pub use self::config::{CacheMode, CallbacksConfig};
pub use self::dns::{DnsSettings, HickoryResolver, MxHost, MxLookup, MxResolver, ResolveError};
pub use self::limits::{LimitExceeded, ProbeLimiter, ProbeLimits};
pub use self::net::{BoxStream, Connector, Stream, TokioConnector};
pub use self::probe::{Finding, ProbeEdges, ProbeResult, ProbeSettings};
use crate::edges::{BoxFuture, Clock, Verifier};
use crate::policy::{Directory, Verification};
use crate::proto::{Domain, LocalPart, Mailbox};

/// The verifier could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The resolver's configuration is unusable: fix `callbacks.nameservers` or resolv.conf.
    #[error(transparent)]
    Resolver(#[from] ResolveError),
    /// The cache database could not be opened: check the state directory.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

/// The IO edges and shared state a [`CallbackVerifier`] runs on.
#[derive(Debug, Clone)]
pub struct VerifierEdges {
    /// MX and address lookups.
    pub resolver: Arc<dyn MxResolver>,
    /// TCP to remote MX hosts.
    pub connector: Arc<dyn Connector>,
    /// Results and accept-all flags.
    pub cache: Arc<VerifyCache>,
    /// Monotonic time for timeouts and limits, wall time for cache expiry.
    pub clock: Arc<dyn Clock>,
}

/// Counters, monotonically increasing.
#[derive(Debug, Default)]
pub struct VerifyStats {
    /// Probes made: an MX lookup and SMTP dialogues, each logged as one `callback probe` event.
    pub probes: AtomicU64,
    /// Answers from the cache (address results and accept-all flags).
    pub cache_hits: AtomicU64,
    /// Probes not made because of a limit.
    pub limited: AtomicU64,
    /// Answers from another verification's probe of the same sender, in flight: probes not
    /// made twice.
    pub shared: AtomicU64,
    /// Senders in allowlisted domains.
    pub allowlisted: AtomicU64,
    /// MX connections opened.
    pub connections: AtomicU64,
}

/// The callback cache's file in the state dir.
pub const CACHE_DB: &str = "callbacks.sqlite";

/// Callback verification (C1) over the resolver and connector edges, with a cache and limits.
#[derive(Debug)]
pub struct CallbackVerifier {
    edges: VerifierEdges,
    limiter: ProbeLimiter,
    probe: ProbeSettings,
    budget: Duration,
    allowlist: Vec<Domain>,
    directory: Option<Arc<Directory>>,
    rng: Mutex<SmallRng>,
    stats: Arc<VerifyStats>,
    in_flight: InFlightMap,
}

/// The result of a probe in flight: `None` until it is there.
type Pending = watch::Receiver<Option<Verification>>;

/// The probes in flight, by cache key (the sender in lower case). Holds live probes only: an
/// entry is removed by its probe's task when it ends (or is dropped).
type InFlightMap = Arc<Mutex<HashMap<String, Pending>>>;

/// A probe's entry in the in-flight map; dropping it (the probe is over, or its task was
/// dropped or panicked) removes the entry.
struct InFlight {
    map: InFlightMap,
    key: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

impl CallbackVerifier {
    /// A verifier configured by `[callbacks]` on the given edges; `hostname` is our EHLO name
    /// unless `hello_name` is set; `seed` drives the accept-all check's random local parts.
    pub fn new(config: &CallbacksConfig, hostname: &str, seed: u64, edges: VerifierEdges) -> Self {
        let hello = config.hello_name.clone().unwrap_or_else(|| hostname.to_string());
        CallbackVerifier {
            edges,
            limiter: ProbeLimiter::new(config.limits()),
            probe: ProbeSettings {
                hello: ClientId::Domain(hello),
                port: config.port,
                max_mx: config.max_mx,
                connect_timeout: config.connect_timeout,
                command_timeout: config.command_timeout,
                allow_private_mx: config.allow_private_mx,
            },
            budget: config.budget,
            allowlist: config.allowlist_domains(),
            directory: None,
            rng: Mutex::new(SmallRng::seed_from_u64(seed ^ 0x6761_7465_6b65_6570)),
            stats: Arc::default(),
            in_flight: Arc::default(),
        }
    }

    /// Local domains are never probed (the session never asks; this guards anyway).
    pub fn with_directory(mut self, directory: Arc<Directory>) -> Self {
        self.directory = Some(directory);
        self
    }

    /// The counters.
    pub fn stats(&self) -> &VerifyStats {
        &self.stats
    }

    /// The cache.
    pub fn cache(&self) -> &Arc<VerifyCache> {
        &self.edges.cache
    }

    /// Probes in flight now (senders, each probed once however many wait for it).
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().expect("in-flight lock").len()
    }

    fn wall_secs(&self) -> u64 {
        wall_secs(&*self.edges.clock)
    }

    fn allowlisted(&self, domain: &Domain) -> bool {
        let d = domain.as_str();
        self.allowlist.iter().any(|a| {
            let a = a.as_str();
            d == a || (d.len() > a.len() && d.ends_with(a) && d.as_bytes()[d.len() - a.len() - 1] == b'.')
        })
    }

    /// A local part that no real mailbox has, for the accept-all check.
    fn random_mailbox(&self, sender: &Mailbox) -> Mailbox {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = self.rng.lock().expect("rng lock");
        let tail: String = (0..16).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
        let local = LocalPart::parse(&format!("gk-nx-{tail}")).expect("valid dot-atom");
        Mailbox { local, host: sender.host.clone() }
    }

    /// The whole check of one sender.
    pub async fn check(&self, sender: &Mailbox) -> Verification {
        let Some(domain) = sender.domain() else {
            return Verification::Unknown { evidence: format!("{sender}: address literal, not probed") };
        };
        if self.directory.as_ref().is_some_and(|d| d.is_local(sender)) {
            return Verification::Unknown { evidence: format!("{sender}: local sender, not probed") };
        }
        if self.allowlisted(domain) {
            self.stats.allowlisted.fetch_add(1, Ordering::Relaxed);
            return Verification::Valid { evidence: "allowlisted".into() };
        }
        let key = sender.to_string().to_ascii_lowercase();
        match self.edges.cache.lookup(&key, domain.as_str(), self.wall_secs()).await {
            Some(CacheHit::Result(v)) => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(sender = %sender, result = v.kind(), "callback cached");
                let evidence = format!("cached: {}", v.evidence());
                return match v {
                    Verification::Valid { .. } => Verification::Valid { evidence },
                    Verification::AcceptAll { .. } => Verification::AcceptAll { evidence },
                    Verification::Invalid { .. } => Verification::Invalid { evidence },
                    Verification::Undeliverable { .. } => Verification::Undeliverable { evidence },
                    Verification::Unknown { .. } => Verification::Unknown { evidence },
                };
            }
            Some(CacheHit::AcceptAll(evidence)) => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(sender = %sender, result = "accept_all", "callback cached");
                return Verification::AcceptAll {
                    evidence: format!("cached: {domain} accepts any address ({evidence})"),
                };
            }
            None => {}
        }
        // Join the probe of this sender in flight, or start one within the limits: both under
        // the map's lock (never held across an await), so that a sender is probed once.
        let mut pending = {
            let mut in_flight = self.in_flight.lock().expect("in-flight lock");
            match in_flight.get(&key) {
                Some(pending) => {
                    self.stats.shared.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(sender = %sender, "callback in flight: waiting for its result");
                    pending.clone()
                }
                None => {
                    let permit = match self.limiter.try_acquire(domain.as_str(), self.edges.clock.now()) {
                        Ok(permit) => permit,
                        Err(e) => {
                            self.stats.limited.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(sender = %sender, domain = %domain, limit = %e, "callback not probed");
                            return Verification::Unknown { evidence: format!("probe not made: {e}") };
                        }
                    };
                    let (tx, rx) = watch::channel(None);
                    in_flight.insert(key.clone(), rx.clone());
                    let entry = InFlight { map: self.in_flight.clone(), key: key.clone() };
                    let probe = self.probe(sender.clone(), domain.clone(), key);
                    // Owned by its task, not by this caller: dropping this call does not cancel it.
                    tokio::spawn(
                        async move {
                            let result = probe.await;
                            drop(permit);
                            // Cached (by the probe), then handed to the waiters, then out of the
                            // map: whoever comes later finds the result in one or the other.
                            tx.send_replace(Some(result));
                            drop(entry);
                        }
                        .in_current_span(),
                    );
                    rx
                }
            }
        };
        // The probe ends by its deadline, `budget` after its start, which was no later than this
        // call: waiting for it never takes longer than a probe of our own would have.
        // `wait_for` sees a result sent before the probe's task ended; an error means none was.
        match pending.wait_for(Option::is_some).await.ok().and_then(|r| r.clone()) {
            Some(result) => result,
            None => Verification::Unknown { evidence: format!("{sender}: probe ended without a result") },
        }
    }

    /// One probe of `sender` (not in the cache, admitted by the limits) as an owned future, to
    /// run on its own task: logged, its result cached under `key`.
    fn probe(
        &self,
        sender: Mailbox,
        domain: Domain,
        key: String,
    ) -> impl std::future::Future<Output = Verification> + Send + 'static {
        self.stats.probes.fetch_add(1, Ordering::Relaxed);
        let random = self.random_mailbox(&sender);
        let started = self.edges.clock.now();
        let deadline = tokio::time::Instant::from_std(started + self.budget);
        let (edges, settings, stats) = (self.edges.clone(), self.probe.clone(), self.stats.clone());
        async move {
            let on =
                probe::ProbeEdges { resolver: &*edges.resolver, connector: &*edges.connector, clock: &*edges.clock };
            let result = probe::run(on, &settings, &sender, &domain, &random, deadline).await;
            stats.connections.fetch_add(result.connections as u64, Ordering::Relaxed);
            let elapsed = edges.clock.now().saturating_duration_since(started);
            let verification = match result.finding {
                Finding::Valid => Verification::Valid { evidence: result.evidence.clone() },
                Finding::Invalid => Verification::Invalid { evidence: result.evidence.clone() },
                Finding::Undeliverable => Verification::Undeliverable { evidence: result.evidence.clone() },
                Finding::AcceptAll => {
                    Verification::AcceptAll { evidence: format!("accept-all domain: {}", result.evidence) }
                }
                Finding::Unknown => Verification::Unknown { evidence: result.evidence.clone() },
            };
            tracing::info!(
                sender = %sender,
                domain = %domain,
                result = verification.kind(),
                evidence = %result.evidence,
                connections = result.connections,
                elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                "callback probe"
            );
            let now = wall_secs(&*edges.clock);
            if result.finding == Finding::AcceptAll {
                edges.cache.set_accept_all(domain.as_str(), &result.evidence, now).await;
            }
            edges.cache.store(&key, &verification, now).await;
            verification
        }
    }
}

/// The wall clock in seconds since the epoch, for cache expiry.
fn wall_secs(clock: &dyn Clock) -> u64 {
    clock.wall().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Verifier for CallbackVerifier {
    fn verify<'a>(&'a self, sender: &'a Mailbox) -> BoxFuture<'a, Verification> {
        Box::pin(self.check(sender))
    }
}
