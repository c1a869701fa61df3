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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use lettre::transport::smtp::extension::ClientId;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

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
    stats: VerifyStats,
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
            stats: VerifyStats::default(),
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

    fn wall_secs(&self) -> u64 {
        self.edges.clock.wall().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
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
        let permit = match self.limiter.try_acquire(domain.as_str(), self.edges.clock.now()) {
            Ok(permit) => permit,
            Err(e) => {
                self.stats.limited.fetch_add(1, Ordering::Relaxed);
                tracing::info!(sender = %sender, domain = %domain, limit = %e, "callback not probed");
                return Verification::Unknown { evidence: format!("probe not made: {e}") };
            }
        };
        self.stats.probes.fetch_add(1, Ordering::Relaxed);
        let random = self.random_mailbox(sender);
        let started = self.edges.clock.now();
        let deadline = tokio::time::Instant::from_std(started + self.budget);
        let edges = probe::ProbeEdges {
            resolver: &*self.edges.resolver,
            connector: &*self.edges.connector,
            clock: &*self.edges.clock,
        };
        let result = probe::run(edges, &self.probe, sender, domain, &random, deadline).await;
        drop(permit);
        self.stats.connections.fetch_add(result.connections as u64, Ordering::Relaxed);
        let elapsed = self.edges.clock.now().saturating_duration_since(started);
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
        let now = self.wall_secs();
        if result.finding == Finding::AcceptAll {
            self.edges.cache.set_accept_all(domain.as_str(), &result.evidence, now).await;
        }
        self.edges.cache.store(&key, &verification, now).await;
        verification
    }
}

impl Verifier for CallbackVerifier {
    fn verify<'a>(&'a self, sender: &'a Mailbox) -> BoxFuture<'a, Verification> {
        Box::pin(self.check(sender))
    }
}
