//! The TOML configuration: its shape (every table `deny_unknown_fields`), its embedded
//! defaults, and its validation, which lists every problem at once instead of stopping at the
//! first. `examples/gatekeeper.toml` documents each field.
//!
//! Durations are written the human way: `"60s"`, `"5m"`, `"4d"`, `"1h 30m"`, and bounded:
//! a timeout or interval by [`WAIT_MAX`], a window, time to live, ban length or retention by
//! [`PERIOD_MAX`]. They are added to `Instant`s and `SystemTime`s (deadlines, expiries), which
//! panic on overflow: `"500000000000y"` parses, and is refused here with the other problems.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::ban::{BackendKind, BanConfig};
use crate::gate::{GateConfig, GateKind};
use crate::policy::{Directory, OnScanFailure, OnUnknown, PolicyConfig};
use crate::proto::Domain;
use crate::scan::ScanConfig;
use crate::session::SessionConfig;
use crate::verify::CallbacksConfig;

/// Longest timeout or interval: a day. A longer wait for a peer or a periodic task is a typo.
pub const WAIT_MAX: Duration = Duration::from_secs(86_400);

/// Longest window, time to live, ban length or retention: ten years (of 365.25 days, as the
/// duration syntax counts them).
pub const PERIOD_MAX: Duration = Duration::from_secs(10 * 31_557_600);

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listening, identity, state and concurrency.
    pub server: ServerSection,
    /// SMTP limits and timeouts.
    pub smtp: SmtpSection,
    /// Local domains and users.
    pub domains: DomainsSection,
    /// Rule tunables.
    pub rules: RulesSection,
    /// The connection and ban gate.
    pub gate: GateConfig,
    /// Ban backend, persistence, allowlist and escalation.
    pub bans: BanConfig,
    /// Where accepted mail goes.
    pub delivery: DeliverySection,
    /// The virus scanner behind `rules.scan` (V1).
    pub scan: ScanConfig,
    /// Callback probes behind `rules.verify_senders` (C1).
    pub callbacks: CallbacksConfig,
    /// STARTTLS.
    pub tls: crate::edges::TlsSection,
    /// The Postfix policy service (docs/postfix.md).
    pub postfix_policy: crate::front::PolicySection,
    /// The milter for Postfix and sendmail (docs/postfix.md).
    pub milter: crate::front::MilterSection,
    /// The Prometheus endpoint (docs/metrics.md).
    pub metrics: crate::metrics::MetricsSection,
    /// Several MX hosts sharing bans through Redis (docs/cluster.md).
    pub cluster: crate::cluster::ClusterSection,
}

/// `server.queue_minfree` by default: 256 MiB, ten largest messages of the default size.
pub const DEFAULT_QUEUE_MINFREE: u64 = 256 * 1024 * 1024;

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Address to listen on for SMTP; `""`: no SMTP front end (only the Postfix policy service
    /// and/or the milter serve; one of them must be set).
    pub listen: String,
    /// Our host name in the greeting, EHLO and Received headers.
    pub hostname: String,
    /// Directory for the spool and, later, the ban database.
    pub state_dir: PathBuf,
    /// Concurrent sessions overall; beyond it new connections get 421.
    pub max_sessions: usize,
    /// Concurrent connections being refused (554 banned, 421 rate-limited or busy), each held
    /// at most 2 s; beyond it a connection gets 421 and is closed at once. Every connection
    /// counts: at most `max_sessions + max_refused` are open.
    pub max_refused: usize,
    /// Concurrent sessions from one address.
    pub max_sessions_per_ip: usize,
    /// Sources the in-process G1 table remembers (embedded default, no kernel gate). When it
    /// is full of sources inside their window, the least recently seen is forgotten: G1
    /// fails open for that source, with a warning. Bans never live there.
    pub rate_sources_max: u32,
    /// Octets that must stay free on the state dir's filesystem (where messages are written as
    /// they arrive, beside the ban database): below it MAIL gets 452 4.3.1, so mail stops
    /// while bans (a few hundred octets each) can still be saved. 0: no threshold.
    pub queue_minfree: u64,
    /// On SIGTERM/SIGINT: how long running sessions may go on before they get 421.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// After `shutdown_grace`: how long sessions still running get for their 421 and a
    /// hand-off in progress; then they are dropped and the server stops.
    #[serde(with = "humantime_serde")]
    pub shutdown_hard: Duration,
    /// Peers (e.g. HAProxy) whose PROXY protocol header gives the client address. Empty: the
    /// PROXY protocol is refused from everyone.
    pub proxy_trusted: Vec<String>,
    /// Serve as this user: `gatekeeper serve`, started as root, binds, prepares the state dir
    /// and the kernel tables, then drops to it (keeping only `CAP_NET_ADMIN` for nftables).
    /// Unset: no drop.
    pub user: Option<String>,
    /// Serve as this group (needs `user`); unset: the user's primary group.
    pub group: Option<String>,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "127.0.0.1:2525".into(),
            hostname: "gatekeeper.example.test".into(),
            state_dir: PathBuf::from("state"),
            max_sessions: 2000,
            max_refused: crate::server::DEFAULT_MAX_REFUSED,
            max_sessions_per_ip: 10,
            rate_sources_max: crate::server::DEFAULT_RATE_SOURCES_MAX,
            queue_minfree: DEFAULT_QUEUE_MINFREE,
            shutdown_grace: Duration::from_secs(30),
            shutdown_hard: crate::server::DEFAULT_SHUTDOWN_HARD,
            proxy_trusted: Vec::new(),
            user: None,
            group: None,
        }
    }
}

/// `[smtp]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpSection {
    /// Largest message in octets (advertised as SIZE).
    pub size_max: u64,
    /// Recipients per message (RFC 5321 §4.5.3.1.8 requires at least 100).
    pub rcpt_max: usize,
    /// 4xx/5xx replies before 421 and close.
    pub errors_max: u32,
    /// Wait for a command or DATA (RFC 5321 §4.5.3.2.7: 5 minutes).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// The same wait once a client has had a 5xx.
    #[serde(with = "humantime_serde")]
    pub penalty_timeout: Duration,
    /// Longest session.
    #[serde(with = "humantime_serde")]
    pub session_max: Duration,
    /// Messages per session; a MAIL beyond gets 421 4.7.0 and the session closes.
    pub messages_max: u64,
    /// Messages per client (its ban key) per hour, all sessions together; a MAIL beyond gets
    /// 451 4.7.1. 0: no limit.
    pub client_messages_max: u32,
}

impl Default for SmtpSection {
    fn default() -> Self {
        let s = SessionConfig::default();
        SmtpSection {
            size_max: s.size_max,
            rcpt_max: s.rcpt_max,
            errors_max: s.errors_max,
            command_timeout: s.command_timeout,
            penalty_timeout: s.penalty_timeout,
            session_max: s.session_max,
            messages_max: s.messages_max,
            client_messages_max: s.client_messages_max,
        }
    }
}

/// `[domains]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DomainsSection {
    /// Domains we receive mail for.
    pub local: Vec<String>,
    /// Existing addresses (`local@domain`).
    pub users: Vec<String>,
    /// A file with more addresses, one a line (`#` comments); relative to the config file.
    pub users_file: Option<PathBuf>,
    /// `abuse@` every local domain exists (RFC 2142).
    pub abuse_always: bool,
    /// Each character ends the mailbox part of a local part: with `+`, `alice+news@` is
    /// `alice@` for every existence check. Empty: off.
    pub recipient_delimiter: String,
}

impl Default for DomainsSection {
    fn default() -> Self {
        DomainsSection {
            local: vec!["example.test".into()],
            users: vec!["alice@example.test".into(), "bob@example.test".into()],
            users_file: None,
            abuse_always: true,
            recipient_delimiter: crate::policy::DEFAULT_RECIPIENT_DELIMITER.into(),
        }
    }
}

/// `[rules]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesSection {
    /// B4: unknown recipients (non-null sender) within `b4_window` before a ban.
    pub b4_threshold: u32,
    /// B4 counting window.
    #[serde(with = "humantime_serde")]
    pub b4_window: Duration,
    /// B4's share test: no ban while unknown recipients are below this percentage of the
    /// client's local recipients in the window ...
    pub b4_unknown_share_max: u32,
    /// ... once it gave at least this many.
    pub b4_share_min_recipients: u32,
    /// Callback verification of external senders (C1), configured in `[callbacks]`.
    pub verify_senders: bool,
    /// An inconclusive callback: `tempfail` (451, for at most `unknown_sender_tempfail_max`)
    /// or `accept`.
    pub on_unknown_sender: OnUnknown,
    /// How long after the first attempt of a (client network, sender) an unknown sender is
    /// tempfailed; a retry after that is accepted, so no honest message waits until its
    /// sender's queue gives up.
    #[serde(with = "humantime_serde")]
    pub unknown_sender_tempfail_max: Duration,
    /// Virus scanning (V1) with the `[scan]` engine.
    pub scan: bool,
    /// A failed scan: `tempfail` (451) or `accept`.
    pub on_scan_failure: OnScanFailure,
    /// `enforce` the verdicts, or `observe` them only (logged and counted as `would_reject`
    /// and `would_ban`; the client is accepted and nobody is banned).
    pub mode: crate::session::Mode,
}

impl Default for RulesSection {
    fn default() -> Self {
        let p = PolicyConfig::default();
        RulesSection {
            b4_threshold: p.b4_threshold,
            b4_window: p.b4_window,
            b4_unknown_share_max: p.b4_unknown_share_max,
            b4_share_min_recipients: p.b4_share_min_recipients,
            verify_senders: false,
            on_unknown_sender: OnUnknown::Tempfail,
            unknown_sender_tempfail_max: p.unknown_sender_tempfail_max,
            scan: false,
            on_scan_failure: OnScanFailure::Tempfail,
            mode: crate::session::Mode::Enforce,
        }
    }
}

/// `[delivery]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySection {
    /// Relay accepted mail to this SMTP server (`host:port`, e.g. the local MTA on
    /// `127.0.0.1:10025`). Unset: a Maildir spool under `<state_dir>/maildir`.
    pub relay: Option<String>,
    /// Per-message timeout of the relay.
    #[serde(with = "humantime_serde")]
    pub relay_timeout: Duration,
    /// STARTTLS towards the relay: `none`, `may` (when offered; the default) or `verify`.
    pub relay_tls: crate::edges::RelayTlsMode,
    /// `verify`: the CA certificates (PEM) the relay's certificate must chain to; relative to
    /// the config file.
    pub relay_ca: Option<PathBuf>,
    /// `verify`: the name the relay's certificate must have (default: its IP address).
    pub relay_tls_name: Option<String>,
}

impl Default for DeliverySection {
    fn default() -> Self {
        DeliverySection {
            relay: None,
            relay_timeout: Duration::from_secs(60),
            relay_tls: crate::edges::RelayTlsMode::default(),
            relay_ca: None,
            relay_tls_name: None,
        }
    }
}

/// A configuration that failed to load: every problem, one a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct ConfigError {
    /// What is wrong, each naming the field.
    pub problems: Vec<String>,
}

/// Where [`Config::load`] reads a configuration from.
#[derive(Debug, Clone)]
pub enum Source<'a> {
    /// A TOML file; relative paths in it are resolved against its directory.
    File(&'a Path),
    /// A TOML table already read (the simulation's `[gatekeeper]` section); relative paths in
    /// it are resolved against `base`.
    Table {
        /// The table, shaped like the file.
        table: toml::Table,
        /// The directory relative paths are resolved against (none: the current directory).
        base: Option<&'a Path>,
    },
}

impl<'a> From<&'a Path> for Source<'a> {
    fn from(path: &'a Path) -> Self {
        Source::File(path)
    }
}

impl<'a> From<&'a PathBuf> for Source<'a> {
    fn from(path: &'a PathBuf) -> Self {
        Source::File(path)
    }
}

/// What the one running the gatekeeper decides over the file: the command line's `--listen`
/// and `--state-dir`, and the simulation's world (where it listens, which kernel is in front of
/// it, its users, its seed). Applied after parsing, before validation, so an override is
/// checked like the file's own value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `server.listen`.
    pub listen: Option<String>,
    /// `server.state_dir`; a relative one is taken from the current directory, not the file's.
    pub state_dir: Option<PathBuf>,
    /// The ban backend is the kernel mechanism `gate.kind` models: `bans.backend` becomes
    /// `xt_recent` (with `bans.xt_recent.capacity` = `gate.kind.ip_list_tot`) or `nftables`.
    /// The simulation's kernel model in front of the gatekeeper is that kernel.
    pub backend_from_gate: bool,
    /// More users of the first local domain, by local part (added to `domains.users`).
    pub local_users: Vec<String>,
    /// `callbacks.seed`.
    pub callbacks_seed: Option<u64>,
}

impl Overrides {
    fn apply(self, config: &mut Config) -> Result<(), LoadError> {
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(dir) = self.state_dir {
            config.server.state_dir = std::path::absolute(dir).map_err(LoadError::StateDir)?;
        }
        if self.backend_from_gate {
            config.bans.backend = match config.gate.kind {
                GateKind::XtRecent { ip_list_tot, .. } => {
                    config.bans.xt_recent.capacity = ip_list_tot;
                    BackendKind::XtRecent
                }
                GateKind::Nft { .. } => BackendKind::Nftables,
            };
        }
        // Without a local domain there is nowhere to add them; validation says so.
        if let Some(domain) = config.domains.local.first() {
            config.domains.users.extend(self.local_users.iter().map(|local| format!("{local}@{domain}")));
        }
        if let Some(seed) = self.callbacks_seed {
            config.callbacks.seed = Some(seed);
        }
        Ok(())
    }
}

/// A configuration that failed to load, by the stage that failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read: check its path and permissions.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// Not TOML, or not the configuration's shape (the message has the position): fix the
    /// syntax or the field name.
    #[error(transparent)]
    Parse(ConfigError),
    /// The state dir override could not be made absolute (it is empty, or there is no current
    /// directory): give another.
    #[error(transparent)]
    StateDir(std::io::Error),
    /// Parsed, but with problems, each naming its field: fix them all.
    #[error(transparent)]
    Invalid(ConfigError),
}

impl LoadError {
    /// What is wrong, one a line.
    pub fn problems(&self) -> Vec<String> {
        match self {
            LoadError::Parse(e) | LoadError::Invalid(e) => e.problems.clone(),
            LoadError::Read { .. } | LoadError::StateDir(_) => vec![self.to_string()],
        }
    }
}

/// A validated configuration, ready to build a server from.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file as read.
    pub config: Config,
    /// The SMTP listening address; `None` (`server.listen = ""`): no SMTP front end, only the
    /// Postfix policy service and/or the milter.
    pub listen: Option<SocketAddr>,
    /// Session limits and rule tunables.
    pub session: Arc<SessionConfig>,
    /// Local domains and users.
    pub directory: Arc<Directory>,
    /// Relay target, if any.
    pub relay: Option<SocketAddr>,
    /// Trusted PROXY peers.
    pub proxy_trusted: Vec<std::net::IpAddr>,
    /// Whom to serve as (`server.user` / `server.group`, looked up), if anyone.
    pub identity: Option<crate::privilege::Identity>,
    /// STARTTLS's certificate and key, loaded (`[tls]`), if configured.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
    /// STARTTLS towards the relay (`[delivery] relay_tls`), if there is a relay and it is on.
    pub relay_tls: Option<crate::edges::RelayTls>,
}

impl Config {
    /// Parses TOML text; syntax errors and unknown fields are reported with their position.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError { problems: vec![e.to_string().trim_end().to_string()] })
    }

    /// The configuration loader: reads `source`, parses it, applies `overrides`, validates.
    /// Every user loads through here: `gatekeeper serve`, `check-config`, `firewall`, `bans`
    /// and the simulation (whose world-specific choices are overrides).
    pub fn load<'a>(source: impl Into<Source<'a>>, overrides: Overrides) -> Result<Settings, LoadError> {
        let (mut config, base) = match source.into() {
            Source::File(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| LoadError::Read { path: path.to_path_buf(), error })?;
                (Config::parse(&text).map_err(LoadError::Parse)?, path.parent())
            }
            Source::Table { table, base } => {
                let config = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
                    LoadError::Parse(ConfigError { problems: vec![e.to_string().trim_end().to_string()] })
                })?;
                (config, base)
            }
        };
        overrides.apply(&mut config)?;
        config.validate(base).map_err(LoadError::Invalid)
    }

    /// Every duration over its bound ([`WAIT_MAX`], [`PERIOD_MAX`]), as problems. `[gate]`'s
    /// `window` and `ban_time` are bounded by the gate itself (the kernel's 32-bit seconds) and
    /// `bans.sync_interval` by its own 60 s, so they are not repeated here.
    fn overlong_durations(&self) -> Vec<String> {
        let (b, c) = (&self.bans, &self.callbacks);
        let waits = [
            ("server.shutdown_grace", self.server.shutdown_grace),
            ("server.shutdown_hard", self.server.shutdown_hard),
            ("smtp.command_timeout", self.smtp.command_timeout),
            ("smtp.penalty_timeout", self.smtp.penalty_timeout),
            ("smtp.session_max", self.smtp.session_max),
            ("delivery.relay_timeout", self.delivery.relay_timeout),
            ("bans.retry_interval", b.retry_interval),
            ("bans.reconcile_interval", b.reconcile_interval),
            ("callbacks.dns_timeout", c.dns_timeout),
            ("callbacks.connect_timeout", c.connect_timeout),
            ("callbacks.command_timeout", c.command_timeout),
            ("callbacks.budget", c.budget),
            ("scan.timeout", self.scan.timeout),
        ];
        let periods = [
            ("rules.b4_window", self.rules.b4_window),
            ("rules.unknown_sender_tempfail_max", self.rules.unknown_sender_tempfail_max),
            ("bans.history_keep", b.history_keep),
            ("bans.escalation.max", b.escalation.max),
            ("bans.escalation.lookback", b.escalation.lookback),
            ("callbacks.positive_ttl", c.positive_ttl),
            ("callbacks.negative_ttl", c.negative_ttl),
            ("callbacks.unknown_ttl", c.unknown_ttl),
            ("callbacks.accept_all_ttl", c.accept_all_ttl),
            ("callbacks.rate_window", c.rate_window),
        ];
        let show = humantime_serde::re::humantime::format_duration;
        let over = |max: Duration| {
            move |&(name, d): &(&str, Duration)| {
                (d > max).then(|| format!("{name}: {} is longer than the maximum {}", show(d), show(max)))
            }
        };
        waits.iter().filter_map(over(WAIT_MAX)).chain(periods.iter().filter_map(over(PERIOD_MAX))).collect()
    }

    /// Checks everything and builds the runtime settings; relative paths are resolved against
    /// `base` (the config file's directory).
    pub fn validate(self, base: Option<&Path>) -> Result<Settings, ConfigError> {
        let mut problems = Vec::new();
        let smtp = !self.server.listen.trim().is_empty();
        let listen = if smtp {
            self.server
                .listen
                .parse::<SocketAddr>()
                .map_err(|e| {
                    problems.push(format!("server.listen: {:?} is not an address:port ({e})", self.server.listen))
                })
                .ok()
        } else {
            if self.postfix_policy.addr().is_none() && self.milter.addr().is_none() {
                problems.push(
                    "server.listen: empty (no SMTP front end), and neither postfix_policy.listen nor milter.listen \
                     is set: nothing would be served"
                        .into(),
                );
            }
            None
        };
        if Domain::parse(&self.server.hostname).is_err() {
            problems.push(format!("server.hostname: {:?} is not a domain name", self.server.hostname));
        }
        problems.extend(self.postfix_policy.problems());
        problems.extend(self.metrics.problems());
        if let (Some(m), Some(l)) = (self.metrics.addr(), listen)
            && m == l
        {
            problems.push(format!("metrics.listen: {m} is server.listen too"));
        }
        let policy = self.postfix_policy.addr().and_then(|p| p.tcp());
        if let (Some(m), Some(p)) = (self.metrics.addr(), policy)
            && m == p
        {
            problems.push(format!("metrics.listen: {m} is postfix_policy.listen too"));
        }
        problems.extend(self.milter.problems());
        match self.milter.addr() {
            Some(crate::front::FrontAddr::Tcp(a)) => {
                for (name, other) in [
                    ("server.listen", listen),
                    ("postfix_policy.listen", policy),
                    ("metrics.listen", self.metrics.addr()),
                ] {
                    if other == Some(a) {
                        problems.push(format!("milter.listen: {a} is {name} too"));
                    }
                }
            }
            Some(unix) if self.postfix_policy.addr() == Some(unix.clone()) => {
                problems.push(format!("milter.listen: {unix} is postfix_policy.listen too"));
            }
            _ => {}
        }
        for (name, group, addr) in [
            ("postfix_policy", &self.postfix_policy.socket_group, self.postfix_policy.addr()),
            ("milter", &self.milter.socket_group, self.milter.addr()),
        ] {
            let Some(group) = group else { continue };
            if !matches!(addr, Some(crate::front::FrontAddr::Unix(_))) {
                problems.push(format!("{name}.socket_group: only for a unix:/path listen"));
            } else if !matches!(nix::unistd::Group::from_name(group), Ok(Some(_))) {
                problems.push(format!("{name}.socket_group: no group {group:?} on this system"));
            }
        }
        if self.server.max_sessions == 0 {
            problems.push("server.max_sessions: must be at least 1".into());
        }
        if self.server.max_refused == 0 {
            problems.push("server.max_refused: must be at least 1".into());
        }
        if self.server.max_sessions_per_ip == 0 {
            problems.push("server.max_sessions_per_ip: must be at least 1".into());
        }
        if self.server.rate_sources_max < 1000 || self.server.rate_sources_max > crate::gate::MAX_TABLE_ENTRIES {
            problems.push(format!(
                "server.rate_sources_max: {} is not between 1000 and {} (G1 must remember every source of a window)",
                self.server.rate_sources_max,
                crate::gate::MAX_TABLE_ENTRIES
            ));
        }
        let identity = match (&self.server.user, &self.server.group) {
            (Some(user), group) => {
                crate::privilege::resolve(user, group.as_deref()).map_err(|p| problems.extend(p)).ok()
            }
            (None, Some(_)) => {
                problems.push("server.group: needs server.user".into());
                None
            }
            (None, None) => None,
        };
        let mut proxy_trusted = Vec::new();
        for p in &self.server.proxy_trusted {
            match p.parse() {
                Ok(ip) => proxy_trusted.push(ip),
                Err(_) => problems.push(format!("server.proxy_trusted: {p:?} is not an IP address")),
            }
        }
        if self.smtp.size_max < 1024 {
            problems.push("smtp.size_max: must be at least 1024 octets".into());
        }
        if self.smtp.rcpt_max < 100 {
            problems.push("smtp.rcpt_max: RFC 5321 §4.5.3.1.8 requires at least 100".into());
        }
        if self.smtp.errors_max == 0 {
            problems.push("smtp.errors_max: must be at least 1".into());
        }
        if self.smtp.messages_max == 0 {
            problems.push("smtp.messages_max: must be at least 1".into());
        }
        for (name, d) in [
            ("server.shutdown_hard", self.server.shutdown_hard),
            ("smtp.command_timeout", self.smtp.command_timeout),
            ("smtp.penalty_timeout", self.smtp.penalty_timeout),
            ("smtp.session_max", self.smtp.session_max),
            ("rules.b4_window", self.rules.b4_window),
            ("delivery.relay_timeout", self.delivery.relay_timeout),
        ] {
            if d.is_zero() {
                problems.push(format!("{name}: must be longer than 0s"));
            }
        }
        problems.extend(self.overlong_durations());
        if self.smtp.command_timeout < Duration::from_secs(300) && !self.smtp.command_timeout.is_zero() {
            // Allowed (tests use short ones), but RFC 5321 §4.5.3.2.7 says 5 minutes; no error.
        }
        if self.rules.b4_threshold == 0 {
            problems.push("rules.b4_threshold: must be at least 1".into());
        }
        if self.rules.b4_unknown_share_max > 100 {
            problems.push(format!(
                "rules.b4_unknown_share_max: {} % is over 100 (0 turns the share test off)",
                self.rules.b4_unknown_share_max
            ));
        }
        if self.rules.b4_share_min_recipients == 0 {
            problems.push("rules.b4_share_min_recipients: must be at least 1".into());
        }
        let mut domains = Vec::new();
        if self.domains.local.is_empty() {
            problems.push("domains.local: at least one local domain is needed".into());
        }
        for d in &self.domains.local {
            match Domain::parse(d) {
                Ok(d) => domains.push(d),
                Err(e) => problems.push(format!("domains.local: {d:?}: {e}")),
            }
        }
        let delimiter = &self.domains.recipient_delimiter;
        if delimiter.chars().any(|c| !c.is_ascii_graphic() || matches!(c, '@' | '"' | '<' | '>' | '\\')) {
            problems.push(format!(
                "domains.recipient_delimiter: {delimiter:?}: only printable ASCII other than @ \" < > \\"
            ));
        }
        let mut directory = Directory::new(domains, self.domains.abuse_always).with_recipient_delimiter(delimiter);
        for e in directory.add_list(&self.domains.users.join("\n")) {
            problems.push(format!("domains.users: {}", e.to_string().replacen("line ", "entry ", 1)));
        }
        if let Some(file) = &self.domains.users_file {
            let path = base.map_or_else(|| file.clone(), |b| b.join(file));
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    for e in directory.add_list(&text) {
                        problems.push(format!("domains.users_file {}: {e}", path.display()));
                    }
                }
                Err(e) => problems.push(format!("domains.users_file: cannot read {}: {e}", path.display())),
            }
        }
        let relay = self.delivery.relay.as_ref().and_then(|r| {
            r.parse::<SocketAddr>()
                .map_err(|e| problems.push(format!("delivery.relay: {r:?} is not an address:port ({e})")))
                .ok()
        });
        let relay_tls = relay.and_then(|addr| {
            let d = &self.delivery;
            let ca = d.relay_ca.as_ref().map(|p| base.map_or_else(|| p.clone(), |b| b.join(p)));
            crate::edges::RelayTls::new(d.relay_tls, ca.as_deref(), d.relay_tls_name.as_deref(), addr)
                .map_err(|p| problems.extend(p))
                .ok()
                .flatten()
        });
        problems.extend(self.gate.problems().into_iter().map(|p| format!("gate.{p}")));
        problems.extend(self.bans.problems().into_iter().map(|p| format!("bans.{p}")));
        problems.extend(self.bans.problems_with_gate(&self.gate));
        problems.extend(self.callbacks.problems().into_iter().map(|p| format!("callbacks.{p}")));
        problems.extend(self.scan.problems().into_iter().map(|p| format!("scan.{p}")));
        problems.extend(self.cluster.problems().into_iter().map(|p| format!("cluster.{p}")));
        let mut cluster = self.cluster.clone();
        problems.extend(cluster.resolve(base).into_iter().map(|p| format!("cluster.{p}")));
        let tls = self.tls.load(base).map_err(|p| problems.extend(p)).ok().flatten();
        let oversize_tempfail = self.scan.on_oversize == Some(OnScanFailure::Tempfail);
        if oversize_tempfail && self.rules.on_scan_failure == OnScanFailure::Accept {
            // A failed scan is accepted then, so an oversize tempfail could not be given.
            problems.push("scan.on_oversize: \"tempfail\" contradicts rules.on_scan_failure = \"accept\"".into());
        }
        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let mut config = self;
        config.cluster = cluster;
        if let Some(base) = base
            && config.server.state_dir.is_relative()
        {
            config.server.state_dir = base.join(&config.server.state_dir);
        }
        let session = SessionConfig {
            hostname: config.server.hostname.clone(),
            size_max: config.smtp.size_max,
            rcpt_max: config.smtp.rcpt_max,
            errors_max: config.smtp.errors_max,
            command_timeout: config.smtp.command_timeout,
            penalty_timeout: config.smtp.penalty_timeout,
            session_max: config.smtp.session_max,
            messages_max: config.smtp.messages_max,
            client_messages_max: config.smtp.client_messages_max,
            verify_senders: config.rules.verify_senders,
            on_unknown: config.rules.on_unknown_sender,
            scan: config.rules.scan,
            on_scan_failure: config.rules.on_scan_failure,
            policy: PolicyConfig {
                b4_threshold: config.rules.b4_threshold,
                b4_window: config.rules.b4_window,
                b4_unknown_share_max: config.rules.b4_unknown_share_max,
                b4_share_min_recipients: config.rules.b4_share_min_recipients,
                unknown_sender_tempfail_max: config.rules.unknown_sender_tempfail_max,
            },
            mode: config.rules.mode,
        };
        Ok(Settings {
            listen,
            session: Arc::new(session),
            directory: Arc::new(directory),
            relay,
            proxy_trusted,
            identity,
            tls,
            relay_tls,
            config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_tls_problems_are_listed_with_the_others() {
        let text = "[server]\nmax_sessions = 0\n[delivery]\nrelay = \"127.0.0.1:10025\"\nrelay_tls = \"verify\"\n";
        let err = Config::parse(text).unwrap().validate(None).unwrap_err();
        assert!(err.problems.iter().any(|p| p.starts_with("server.max_sessions")), "{err:?}");
        assert!(err.problems.iter().any(|p| p.starts_with("delivery.relay_ca: needed")), "{err:?}");
        let may = Config::parse("[delivery]\nrelay = \"127.0.0.1:10025\"\n").unwrap().validate(None).unwrap();
        assert!(may.relay_tls.is_some(), "STARTTLS when offered, by default");
        let none = "[delivery]\nrelay = \"127.0.0.1:10025\"\nrelay_tls = \"none\"\n";
        assert!(Config::parse(none).unwrap().validate(None).unwrap().relay_tls.is_none());
    }

    #[test]
    fn shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gatekeeper.toml");
        let settings = Config::load(&path, Overrides::default()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(settings.listen, Some("127.0.0.1:2525".parse().unwrap()));
        assert_eq!(settings.directory.user_count(), 2);
    }

    #[test]
    fn empty_file_is_the_embedded_defaults() {
        let s = Config::parse("").unwrap().validate(None).unwrap();
        assert_eq!(s.session.rcpt_max, 100);
        assert!(s.relay.is_none());
    }

    #[test]
    fn every_problem_is_listed() {
        let text = r#"
            [server]
            listen = "nowhere"
            hostname = "bad host"
            max_sessions = 0
            [smtp]
            rcpt_max = 10
            command_timeout = "0s"
            [domains]
            local = ["example.test", "-bad"]
            users = ["carol", "x@other.test"]
            recipient_delimiter = "+@"
            [rules]
            b4_threshold = 0
            [delivery]
            relay = "mta"
        "#;
        let err = Config::parse(text).unwrap().validate(None).unwrap_err();
        let all = err.problems.join("\n");
        for needle in [
            "server.listen",
            "server.hostname",
            "server.max_sessions",
            "smtp.rcpt_max",
            "smtp.command_timeout",
            "domains.local: \"-bad\"",
            "domains.users: entry 1",
            "domains.users: entry 2",
            "domains.recipient_delimiter",
            "rules.b4_threshold",
            "delivery.relay",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
        assert_eq!(err.problems.len(), 11, "{all}");
    }

    #[test]
    fn bans_section_is_checked_with_the_gate() {
        let c = Config::parse("[bans]\nbackend = \"nftables\"\nallowlist = [\"10.0.0.0/99\"]\n").unwrap();
        let err = c.validate(None).unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains("bans.allowlist"), "{all}");
        assert!(all.contains("gate.kind.backend = \"nft\""), "{all}");
        let ok = "[bans]\nbackend = \"nftables\"\n[gate.kind]\nbackend = \"nft\"\n";
        let s = Config::parse(ok).unwrap().validate(None).unwrap();
        assert_eq!(s.config.bans.backend, crate::ban::BackendKind::Nftables);
        assert!(Config::parse("[bans]\nban_secs = 1\n").is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = Config::parse("[server]\nlisten_on = \"x\"\n").unwrap_err();
        assert!(err.problems[0].contains("listen_on"), "{err}");
        let err = Config::parse("[nonsense]\n").unwrap_err();
        assert!(err.problems[0].contains("nonsense"), "{err}");
    }

    #[test]
    fn scan_section() {
        let text = r#"
            [rules]
            scan = true
            on_scan_failure = "accept"
            [scan]
            engine = "clamd"
            clamd = "tcp:127.0.0.1:3310"
            timeout = "10s"
            stream_max = 1048576
            on_oversize = "accept"
        "#;
        let s = Config::parse(text).unwrap().validate(None).unwrap();
        assert!(s.session.scan);
        assert_eq!(s.config.scan.timeout, Duration::from_secs(10));
        let text = r#"
            [rules]
            on_scan_failure = "accept"
            [scan]
            engine = "clamd"
            clamd = "127.0.0.1:3310"
            on_oversize = "tempfail"
            signatures = [{ name = "X", text = "short" }]
        "#;
        let err = Config::parse(text).unwrap().validate(None).unwrap_err();
        let all = err.problems.join("\n");
        for needle in ["scan.clamd", "scan.signatures: only", "scan.signatures[0]: at least", "scan.on_oversize"] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
        let err = Config::parse("[scan]\nengine = \"sophos\"\n").unwrap_err();
        assert!(err.problems[0].contains("sophos"), "{err}");
    }

    #[test]
    fn overrides_are_applied_then_checked() {
        let text = "[domains]\nlocal = [\"example.test\"]\nusers = []\n[gate.kind]\nbackend = \"xt_recent\"\nip_list_tot = 300\n";
        let table: toml::Table = toml::from_str(text).unwrap();
        let overrides = Overrides {
            listen: Some("0.0.0.0:25".into()),
            state_dir: Some("/var/lib/gk".into()),
            backend_from_gate: true,
            local_users: vec!["user0".into(), "user1".into()],
            callbacks_seed: Some(7),
        };
        let s = Config::load(Source::Table { table: table.clone(), base: Some(Path::new("/etc")) }, overrides).unwrap();
        assert_eq!(s.listen, Some("0.0.0.0:25".parse().unwrap()));
        assert_eq!(s.config.server.state_dir, Path::new("/var/lib/gk"));
        assert_eq!(s.config.bans.backend, crate::ban::BackendKind::XtRecent);
        assert_eq!(s.config.bans.xt_recent.capacity, 300);
        assert_eq!(s.config.domains.users, ["user0@example.test", "user1@example.test"]);
        assert_eq!(s.config.callbacks.seed, Some(7));
        // Without overrides, a relative state dir is the file's.
        let s = Config::load(Source::Table { table, base: Some(Path::new("/etc")) }, Overrides::default()).unwrap();
        assert_eq!(s.config.server.state_dir, Path::new("/etc/state"));
        let bad = Overrides { listen: Some("nowhere".into()), ..Overrides::default() };
        let err = Config::load(Source::Table { table: toml::Table::new(), base: None }, bad).unwrap_err();
        assert!(matches!(&err, LoadError::Invalid(_)) && err.problems()[0].starts_with("server.listen"), "{err}");
        let err = Config::load(Path::new("/nonexistent/gatekeeper.toml"), Overrides::default()).unwrap_err();
        assert!(err.problems()[0].starts_with("cannot read /nonexistent/gatekeeper.toml: "), "{err}");
    }

    /// `server.listen = ""`: no SMTP front end, allowed only beside the policy service or the
    /// milter (issue 14 item 3).
    #[test]
    fn smtp_listener_is_optional_beside_another_front_end() {
        let policy_only = "[server]\nlisten = \"\"\n[postfix_policy]\nlisten = \"127.0.0.1:10040\"\n";
        assert_eq!(Config::parse(policy_only).unwrap().validate(None).unwrap().listen, None);
        let milter_only = "[server]\nlisten = \"\"\n[milter]\nlisten = \"127.0.0.1:10041\"\n";
        assert_eq!(Config::parse(milter_only).unwrap().validate(None).unwrap().listen, None);
        let err = Config::parse("[server]\nlisten = \"\"\n").unwrap().validate(None).unwrap_err();
        assert!(err.problems.iter().any(|p| p.contains("nothing would be served")), "{err}");
    }

    /// `listen = "unix:/path"` for the policy service and the milter, each its own path, and
    /// `socket_group` only with one.
    #[test]
    fn front_ends_listen_on_unix_sockets() {
        let text = "[server]\nlisten = \"\"\n[postfix_policy]\nlisten = \"unix:/run/gatekeeper/policy.sock\"\n\
                    socket_group = \"root\"\n[milter]\nlisten = \"unix:/run/gatekeeper/milter.sock\"\n";
        let s = Config::parse(text).unwrap().validate(None).unwrap();
        assert_eq!(s.config.milter.addr(), Some(crate::front::FrontAddr::Unix("/run/gatekeeper/milter.sock".into())));
        let text = "[postfix_policy]\nlisten = \"unix:/run/gk.sock\"\n[milter]\nlisten = \"unix:/run/gk.sock\"\n\
                    socket_group = \"no-such-group-gk\"\n[metrics]\n";
        let err = Config::parse(text).unwrap().validate(None).unwrap_err();
        let p = err.problems.join("\n");
        assert!(p.contains("milter.listen: unix:/run/gk.sock is postfix_policy.listen too"), "{p}");
        assert!(p.contains("milter.socket_group: no group \"no-such-group-gk\""), "{p}");
        let text = "[postfix_policy]\nlisten = \"127.0.0.1:10040\"\nsocket_group = \"root\"\n\
                    [milter]\nlisten = \"unix:gk.sock\"\n";
        let p = Config::parse(text).unwrap().validate(None).unwrap_err().problems.join("\n");
        assert!(p.contains("postfix_policy.socket_group: only for a unix:/path listen"), "{p}");
        assert!(p.contains("milter.listen: \"unix:gk.sock\": a Unix socket needs an absolute path"), "{p}");
    }

    #[test]
    fn durations_have_upper_bounds() {
        let text = r#"
            [server]
            shutdown_grace = "2days"
            [smtp]
            command_timeout = "500000000000y"
            session_max = "1day"
            [rules]
            b4_window = "11y"
            [bans]
            history_keep = "10y"
            [callbacks]
            budget = "25h"
            positive_ttl = "100y"
            [scan]
            timeout = "1000000d"
        "#;
        let err = Config::parse(text).unwrap().validate(None).unwrap_err();
        let all = err.problems.join("\n");
        for needle in [
            "server.shutdown_grace: 2days is longer than the maximum 1day",
            "smtp.command_timeout: ",
            "rules.b4_window: 11years",
            "callbacks.budget: 1day 1h is longer than the maximum 1day",
            "callbacks.positive_ttl: 100years is longer than the maximum 10years",
            "scan.timeout: ",
        ] {
            assert!(all.contains(needle), "missing {needle} in:\n{all}");
        }
        // The bounds themselves are allowed; the shipped defaults are far below them.
        assert_eq!(err.problems.len(), 6, "{all}");
        assert!(Config::default().overlong_durations().is_empty());
    }

    #[test]
    fn rules_of_issue_11_are_configurable() {
        let s = Config::parse("").unwrap().validate(None).unwrap();
        assert_eq!(s.session.policy.unknown_sender_tempfail_max, Duration::from_secs(1800));
        assert!(s.directory.exists(&crate::proto::Mailbox::parse("alice+news@example.test").unwrap()));
        let text = "[domains]\nrecipient_delimiter = \"\"\n[rules]\nunknown_sender_tempfail_max = \"2h\"\n";
        let s = Config::parse(text).unwrap().validate(None).unwrap();
        assert_eq!(s.session.policy.unknown_sender_tempfail_max, Duration::from_secs(7200));
        assert!(!s.directory.exists(&crate::proto::Mailbox::parse("alice+news@example.test").unwrap()));
    }

    #[test]
    fn durations_are_human() {
        let c = Config::parse("[smtp]\ncommand_timeout = \"2m 30s\"\n").unwrap();
        assert_eq!(c.smtp.command_timeout, Duration::from_secs(150));
    }
}
