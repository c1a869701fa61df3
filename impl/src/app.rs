//! The application, assembled in one place: [`assemble`] builds the server, the ban manager,
//! the callback verifier (C1) and the virus scanner (V1) from [`Settings`] plus a set of
//! [`Edges`], and [`App::start`] connects them. `gatekeeper serve` runs it on
//! [`Edges::production`]; the simulation runs it on its world's edges, so the simulated
//! gatekeeper differs from the production one only in its edges (docs/design.md §3).
//!
//! Nothing here decides anything: every choice is the configuration's or an edge's. It must not
//! bind the listener (the caller does, and passes it to [`App::run`]) nor read configuration
//! files (that is [`Config::load`](crate::config::Config::load)).

use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use crate::ban::{BanBackend, BanError, BanManager, RestoreReport, build_backend};
use crate::cluster::{ClusterSync, RedisStore};
use crate::config::Settings;
use crate::edges::{
    BanSink, Clock, ClusterError, ClusterStore, Downstream, Listener, MaildirSpool, Observer, Scanner, SmtpRelay,
    SystemClock, Tls,
};
use crate::scan::Engine;
use crate::server::{Limits, Server};
use crate::verify::{
    CACHE_DB, CacheMode, CallbackVerifier, Connector, DnsSettings, HickoryResolver, MxResolver, ResolveError,
    TokioConnector, VerifierEdges, VerifyCache, VerifyError,
};

/// Builds the resolver for callbacks from `[callbacks]`' DNS settings and the verifier's seed.
pub type MakeResolver = Box<dyn FnOnce(DnsSettings, u64) -> Result<Arc<dyn MxResolver>, ResolveError> + Send>;

/// Given the ban manager, a part that stands beside it (a ban sink in front of it, an
/// observer that may ban through it).
pub type Tap<T> = Box<dyn FnOnce(&BanManager) -> Arc<T> + Send>;

/// Everything the application touches outside itself, except the listener (given to
/// [`App::run`]).
pub struct Edges {
    /// Monotonic and wall time, for every part.
    pub clock: Arc<dyn Clock>,
    /// The disk the state lives on: the ban database and the callback cache (production:
    /// `server.state_dir`; the simulation: a directory that outlives the host's restarts).
    pub state_dir: PathBuf,
    /// Run blocking work (SQLite, scans of big messages) on tokio's blocking pool. Production
    /// does; the simulation runs it inline, as its hosts have no threads to offload to.
    pub offload: bool,
    /// Where the ban manager applies bans: the kernel (xt_recent, nftables) or nothing beyond
    /// the server's gate (memory).
    pub ban_backend: Box<dyn BanBackend>,
    /// Where accepted messages go.
    pub downstream: Arc<dyn Downstream>,
    /// The resolver of callbacks; called only when `rules.verify_senders` is on, so a broken
    /// resolver configuration matters only then.
    pub resolver: MakeResolver,
    /// TCP to remote MX hosts, for callbacks.
    pub connector: Arc<dyn Connector>,
    /// The ban sink the server hands its bans to, in front of the ban manager. None: the
    /// manager itself.
    pub ban_sink: Option<Tap<dyn BanSink>>,
    /// Sees every verdict (the simulation counts and checks them). None: no one.
    pub observer: Option<Tap<dyn Observer>>,
    /// The store the cluster shares its bans through (`[cluster]`; production: Redis). None:
    /// this node is alone.
    pub cluster: Option<Arc<dyn ClusterStore>>,
}

impl fmt::Debug for Edges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Edges")
            .field("clock", &self.clock)
            .field("state_dir", &self.state_dir)
            .field("offload", &self.offload)
            .field("ban_backend", &self.ban_backend)
            .field("downstream", &self.downstream)
            .field("connector", &self.connector)
            .field("ban_sink", &self.ban_sink.is_some())
            .field("observer", &self.observer.is_some())
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl Edges {
    /// The production edges of `settings`: the system clock, `server.state_dir`, the ban
    /// backend `[bans]` names, the relay of `[delivery]` or a Maildir spool under
    /// `<state_dir>/maildir` (messages arrive into its `tmp/`, or into `<state_dir>/tmp` for
    /// the relay), hickory on tokio, tokio TCP. Call it inside a tokio runtime.
    pub fn production(settings: &Settings) -> Result<Edges, AppError> {
        let c = &settings.config;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let downstream: Arc<dyn Downstream> = match settings.relay {
            Some(addr) => {
                // Messages arrive into files on the state dir's filesystem, like the Maildir's.
                let path = c.server.state_dir.join("tmp");
                let timeout = c.delivery.relay_timeout;
                match SmtpRelay::new(addr, &c.server.hostname, timeout, clock.clone(), path.clone()) {
                    Ok(relay) => Arc::new(relay.with_tls(settings.relay_tls.clone())),
                    Err(error) => return Err(AppError::Spool { path, error }),
                }
            }
            None => {
                let path = c.server.state_dir.join("maildir");
                match MaildirSpool::open(&path, &c.server.hostname, clock.clone(), true) {
                    Ok(spool) => Arc::new(spool),
                    Err(error) => return Err(AppError::Spool { path, error }),
                }
            }
        };
        Ok(Edges {
            clock,
            state_dir: c.server.state_dir.clone(),
            offload: true,
            ban_backend: build_backend(&c.bans, c.gate.ipv6_prefix),
            downstream,
            resolver: Box::new(|dns, seed| Ok(Arc::new(HickoryResolver::tokio(&dns, seed)?))),
            connector: Arc::new(TokioConnector::new()),
            ban_sink: None,
            observer: None,
            cluster: if c.cluster.enabled() {
                let store = RedisStore::new(&c.cluster).map_err(AppError::Cluster)?;
                Some(Arc::new(store) as Arc<dyn ClusterStore>)
            } else {
                None
            },
        })
    }
}

/// The application could not be assembled or started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    /// The Maildir spool could not be created: check the state dir's permissions.
    #[error("cannot create the spool {}", path.display())]
    Spool {
        /// The spool's root.
        path: PathBuf,
        /// Why.
        #[source]
        error: io::Error,
    },
    /// The ban database could not be opened: check the state dir.
    #[error("cannot open the ban database")]
    Bans(#[source] BanError),
    /// The stored bans could not be read back: check the ban database.
    #[error("cannot restore the bans")]
    Restore(#[source] BanError),
    /// The resolver or the callback cache could not be set up: fix `callbacks.nameservers`
    /// (or resolv.conf) or check the state dir.
    #[error("cannot set up callback verification")]
    Verifier(#[source] VerifyError),
    /// The scanner could not be built from `[scan]`.
    #[error("scan: {0}")]
    Scanner(String),
    /// The cluster store could not be set up from `[cluster]` (a file it names).
    #[error("cluster: {0}")]
    Cluster(#[source] ClusterError),
}

/// The assembled application: the server and the ban manager behind it.
#[derive(Debug, Clone)]
pub struct App {
    /// The SMTP server (with its gate, verifier and scanner).
    pub server: Server,
    /// The ban manager: the server's ban sink (or behind it), mirrored into its gate.
    pub bans: BanManager,
    /// The callback verifier (C1), when `rules.verify_senders` is on: its counters.
    pub verifier: Option<Arc<CallbackVerifier>>,
    /// The cluster sync, when a `[cluster]` store is configured.
    pub cluster: Option<ClusterSync>,
}

/// B4 deltas waiting for the cluster sync at most (beyond, they are counted locally only).
const COUNTS_QUEUE: usize = 4096;

/// Builds the application from `settings` and `edges`, in this order: the ban manager on the
/// state dir (and its cluster sync, with a cluster store), the scanner (a clamd gets one `PING`, logged, but need not be up yet), the
/// callback verifier with its cache, the server. Nothing runs yet: see [`App::start`].
pub async fn assemble(settings: &Settings, edges: Edges) -> Result<App, AppError> {
    let c = &settings.config;
    let Edges { clock, state_dir, offload, ban_backend, downstream, resolver, connector, ban_sink, observer, cluster } =
        edges;
    // G2: bans recorded in the state database and applied by the backend.
    let bans = BanManager::open_with(&c.bans, &c.gate, &state_dir, ban_backend, clock.clone(), offload)
        .map_err(AppError::Bans)?;
    // Shared with the other MX hosts: decisions go to the outbox from the first one on.
    let cluster_store = cluster.clone();
    let mut cluster = cluster.map(|store| ClusterSync::new(bans.clone(), store, clock.clone(), &c.cluster));
    // The B4 record too: each ended session's delta goes out, the others' come in (below).
    let (counts_tx, counts_rx) = tokio::sync::mpsc::channel(COUNTS_QUEUE);
    let limits = Limits {
        max_sessions: c.server.max_sessions,
        max_refused: c.server.max_refused,
        max_sessions_per_ip: c.server.max_sessions_per_ip,
        queue_minfree: c.server.queue_minfree,
        shutdown_grace: c.server.shutdown_grace,
        shutdown_hard: c.server.shutdown_hard,
        // G1 in process only when the kernel does not gate.
        in_process_rate: !c.bans.backend.is_kernel(),
        rate_sources_max: c.server.rate_sources_max,
        proxy_trusted: settings.proxy_trusted.clone(),
    };
    let ban_sink = match ban_sink {
        Some(tap) => tap(&bans),
        None => Arc::new(bans.clone()),
    };
    let mut builder = Server::builder(settings.session.clone(), settings.directory.clone(), downstream)
        .clock(clock.clone())
        .gate(c.gate.clone())
        .limits(limits)
        .ban_sink(ban_sink);
    if cluster.is_some() {
        builder = builder.share_counts(counts_tx);
    }
    if let Some(config) = &settings.tls {
        // STARTTLS: an edge beneath the session (the simulation configures none).
        builder = builder.tls(Arc::new(Tls::new(config.clone(), c.tls.max_handshakes, c.tls.handshake_timeout)));
    }
    if let Some(tap) = observer {
        builder = builder.observer(tap(&bans));
    }
    // V1: the virus scanner.
    if c.rules.scan {
        let scanner: Arc<dyn Scanner> = match c.scan.engine {
            Engine::Builtin => Arc::new(c.scan.builtin(clock.clone()).map_err(AppError::Scanner)?.offload(offload)),
            Engine::Clamd => c.scan.start(c.rules.on_scan_failure, clock.clone()).await.map_err(AppError::Scanner)?,
        };
        builder = builder.scanner(scanner);
    }
    // C1: callback verification of external senders.
    let mut callbacks = None;
    if c.rules.verify_senders {
        let seed = c.callbacks.seed.unwrap_or_else(|| {
            let t = clock.wall().duration_since(UNIX_EPOCH).unwrap_or_default();
            t.as_secs() ^ u64::from(t.subsec_nanos()).rotate_left(32) ^ u64::from(std::process::id())
        });
        let resolver = resolver(c.callbacks.dns(), seed).map_err(|e| AppError::Verifier(e.into()))?;
        let cache = match c.callbacks.cache {
            // Its own file, beside the ban store's: the ban manager re-reads every ban whenever
            // another connection writes to its database (PRAGMA data_version, to see
            // `gatekeeper bans add|remove`), and the cache writes per probe.
            // A damaged file is moved aside (and logged): the cache must not keep port 25 down.
            CacheMode::Sqlite => {
                VerifyCache::open_sqlite_or_fresh(
                    &state_dir.join(CACHE_DB),
                    c.callbacks.ttls(),
                    c.callbacks.cache_entries_max,
                    offload,
                    clock.wall(),
                )
                .map_err(|e| AppError::Verifier(e.into()))?
                .0
            }
            CacheMode::Memory => VerifyCache::memory(c.callbacks.ttls(), c.callbacks.cache_entries_max),
        };
        // With a cluster, a third-party domain is probed once for all the nodes.
        let cache = match &cluster_store {
            Some(store) => cache.with_shared(store.clone()),
            None => cache,
        };
        let edges = VerifierEdges { resolver, connector, cache: Arc::new(cache), clock };
        let verifier = CallbackVerifier::new(&c.callbacks, &c.server.hostname, seed, edges)
            .with_directory(settings.directory.clone());
        let verifier = Arc::new(verifier);
        builder = builder.verifier(verifier.clone());
        callbacks = Some(verifier);
    }
    let server = builder.build();
    if let Some(sync) = cluster.take() {
        let target = server.clone();
        cluster = Some(sync.with_counts(counts_rx, Arc::new(move |d| target.add_shared_counts(d))));
    }
    Ok(App { server, bans, verifier: callbacks, cluster })
}

impl App {
    /// Connects the ban manager to the server's gate, re-applies the stored bans and spawns the
    /// manager's maintenance (sync with `gatekeeper bans`, expiry, retries), which runs until
    /// the runtime ends. Call it inside a tokio runtime, before [`App::run`].
    pub async fn start(&self) -> Result<RestoreReport, AppError> {
        self.bans.attach_mirror(Arc::new(self.server.clone()));
        let restored = self.bans.restore().await.map_err(AppError::Restore)?;
        tokio::spawn(self.bans.clone().run(std::future::pending()));
        if let Some(sync) = &self.cluster {
            // After the restore: the start reconcile compares the restored bans with the table.
            tokio::spawn(sync.clone().run(std::future::pending()));
        }
        Ok(restored)
    }

    /// Serves connections from `listener` until `shutdown` completes, then drains.
    pub async fn run<L: Listener>(&self, listener: L, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        self.server.run(listener, shutdown).await
    }
}
