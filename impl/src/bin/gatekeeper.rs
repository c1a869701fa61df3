//! The `gatekeeper` command: parse the CLI, load the configuration, bind, drop privileges and
//! run the server until SIGTERM or SIGINT. Everything else lives in the library.

#[path = "gatekeeper/bans.rs"]
mod bans;
#[path = "gatekeeper/cluster.rs"]
mod cluster;
#[path = "gatekeeper/logfields.rs"]
mod logfields;
#[path = "gatekeeper/logwriter.rs"]
mod logwriter;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gatekeeper::app::{Edges, assemble};
use gatekeeper::config::{Config, LoadError, Overrides, Settings};
use gatekeeper::edges::systemd;
use gatekeeper::front::{FrontAddr, MilterService, PolicyService};

/// SMTP gatekeeper against backscatter floods: connection gate, early rejects, bans.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve SMTP until SIGTERM or SIGINT.
    Serve {
        /// The TOML configuration (see examples/gatekeeper.toml).
        #[arg(long, short)]
        config: PathBuf,
        /// Listen here instead of `server.listen`.
        #[arg(long)]
        listen: Option<String>,
        /// Keep state (spool, bans) here instead of `server.state_dir`.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Check a configuration, list every problem, exit non-zero if there is one.
    CheckConfig {
        /// The TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The kernel firewall rules for the ban backends (xt_recent, nftables).
    Firewall {
        #[command(subcommand)]
        command: bans::FirewallCommand,
    },
    /// List, add or remove bans in the state dir (the running server applies changes).
    Bans {
        /// The TOML configuration.
        #[arg(long, short, global = true, default_value = "gatekeeper.toml")]
        config: PathBuf,
        /// The state dir instead of `server.state_dir`.
        #[arg(long, global = true)]
        state_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: bans::BansCommand,
    },
    /// The cluster of MX hosts sharing bans through Redis (`[cluster]`).
    Cluster {
        /// The TOML configuration.
        #[arg(long, short, global = true, default_value = "gatekeeper.toml")]
        config: PathBuf,
        /// The state dir instead of `server.state_dir`.
        #[arg(long, global = true)]
        state_dir: Option<PathBuf>,
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Replays SYN times (`JIFFIES ADDR` lines on stdin) through the kernel model (ci/kernel.sh).
    #[command(hide = true)]
    ModelReplay {
        /// The ruleset modelled.
        #[arg(long, value_enum)]
        kind: bans::ModelKind,
        /// The G1 window.
        #[arg(long, value_parser = humantime_serde::re::humantime::parse_duration)]
        window: std::time::Duration,
        /// Kernel HZ.
        #[arg(long, default_value_t = 250)]
        hz: u32,
        /// IPv6 prefix of the rate keys.
        #[arg(long, default_value_t = 64)]
        ipv6_prefix: u8,
        /// nft rate set size.
        #[arg(long, default_value_t = 65535)]
        size: u32,
    },
}

fn main() -> ExitCode {
    // Every file any command creates (state, spool, databases) is private: 0600, dirs 0700.
    gatekeeper::privilege::restrict_umask();
    let cli = Cli::parse();
    // Flushes the log when main returns (dropped after the match).
    let _log = init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config, Overrides::default()) {
            Ok(s) => {
                println!(
                    "{}: OK (listen {}, {} local domain(s), {} user(s), delivery: {})",
                    config.display(),
                    listening(&s),
                    s.directory.domains().count(),
                    s.directory.user_count(),
                    s.relay.map_or_else(|| "Maildir spool".to_string(), |r| format!("relay to {r}")),
                );
                for note in s.config.bans.notes(&s.config.gate) {
                    println!("  - {note}");
                }
                for warning in bans::table_warnings(&s) {
                    println!("  - WARNING: {warning}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                let problems = e.problems();
                eprintln!("{}: {} problem(s):", config.display(), problems.len());
                for p in &problems {
                    eprintln!("  - {p}");
                }
                ExitCode::from(2)
            }
        },
        Command::Firewall { command } => bans::firewall(command),
        Command::Bans { config, state_dir, command } => bans::bans(command, &config, state_dir),
        Command::Cluster { config, state_dir, command } => cluster::cluster(command, &config, state_dir),
        Command::ModelReplay { kind, window, hz, ipv6_prefix, size } => {
            bans::model_replay(kind, window, hz, ipv6_prefix, size)
        }
        Command::Serve { config, listen, state_dir } => match serve(config, listen, state_dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gatekeeper: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Lines go to stderr through [`logwriter`]: formatted on the logging thread, written in
/// batches by one writer thread. The guard flushes them.
fn init_logging(format: LogFormat) -> logwriter::Guard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour only on a terminal: log files stay plain text, cheap to write and to count.
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi);
    let (writer, guard) = logwriter::stderr();
    let builder = builder.with_writer(writer);
    match format {
        LogFormat::Text if ansi => builder.init(),
        // The same lines, without painting each part in no colour (logfields).
        LogFormat::Text => {
            builder.fmt_fields(logfields::PlainFields).event_format(logfields::PlainLine { timestamps: true }).init()
        }
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
    guard
}

/// Serves: binds the listener and prepares the state dir and the kernel tables while still
/// single-threaded and privileged, drops to `[server] user` if set (capabilities are per
/// thread: the runtime's threads start after the drop and inherit what is left), then runs.
fn serve(config: PathBuf, listen: Option<String>, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    use gatekeeper::privilege;
    let overrides = Overrides { listen, state_dir, ..Overrides::default() };
    let settings = load(&config, overrides.clone())?;
    // Before anything holds descriptors; raising the soft limit needs no privilege.
    check_nofile(&settings);
    let c = &settings.config;
    // A deep accept backlog: a flood must not overflow the kernel's queue (tokio's is 128).
    // Bound on a thread-less runtime, handed over to the serving runtime below.
    let listener = settings.listen.map(|addr| bind_tcp(addr, || format!("cannot listen on {addr}"))).transpose()?;
    // The Postfix policy service and the milter, if configured, bound here too (before any
    // privilege drop: a Unix socket is handed to the serving user here).
    let identity = settings.identity.as_ref();
    let policy_listener = c
        .postfix_policy
        .addr()
        .map(|a| bind_front(&a, c.postfix_policy.socket_group.as_deref(), identity, "postfix_policy.listen"))
        .transpose()?;
    let milter_listener = c
        .milter
        .addr()
        .map(|a| bind_front(&a, c.milter.socket_group.as_deref(), identity, "milter.listen"))
        .transpose()?;
    // The metrics endpoint, if configured: bound here too.
    let metrics_listener = match c.metrics.addr() {
        Some(addr) => {
            let l = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()?
                .block_on(async { tokio::net::TcpListener::bind(addr).await?.into_std() })
                .with_context(|| format!("cannot listen on {addr} (metrics.listen)"))?;
            Some(l)
        }
        None => None,
    };
    let secured = privilege::secure_state_dir(&c.server.state_dir, identity)
        .with_context(|| format!("cannot prepare the state dir {}", c.server.state_dir.display()))?;
    for path in &secured.tightened {
        tracing::warn!(path = %path.display(), "was readable by others: made private (0700 dirs, 0600 files)");
    }
    if let Some(id) = identity {
        if c.bans.backend == gatekeeper::ban::BackendKind::XtRecent {
            let x = &c.bans.xt_recent;
            let tables = [x.proc_dir.join(&x.ban_table), x.proc_dir.join(&x.ban_table6)];
            for w in privilege::hand_over_xt_tables(&tables, id) {
                tracing::warn!("{w}");
            }
        }
        if privilege::thread_count().is_some_and(|n| n > 1) {
            anyhow::bail!("internal: privileges must be dropped while single-threaded");
        }
        // nft needs CAP_NET_ADMIN for every ban; nothing else does.
        let keep_net_admin = c.bans.backend == gatekeeper::ban::BackendKind::Nftables;
        privilege::drop_to(id, keep_net_admin)?;
        tracing::info!(user = %id.user, uid = id.uid, group = %id.group, gid = id.gid, cap_net_admin = keep_net_admin,
            "privileges dropped");
    }
    // Privileges are dropped: threads may start. Log lines are written in batches from here on.
    logwriter::start();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = listener.map(tokio::net::TcpListener::from_std).transpose()?;
        let app = assemble(&settings, Edges::production(&settings)?).await?;
        app.start().await?;
        let policy_config = settings.config.postfix_policy.clone();
        let milter_config = settings.config.milter.clone();
        let milter_dir = settings.config.server.state_dir.join("milter");
        let status = ready_status(&settings);
        tokio::spawn(reload_on_sighup(app.server.clone(), config, overrides, settings));
        // One signal stops every listener.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            systemd::stopping();
            let _ = stop_tx.send(true);
        });
        // The listeners are bound (above, before the drop) and the bans restored: ready.
        systemd::ready(&status);
        if let Some(period) = systemd::watchdog_period() {
            tracing::info!(?period, "systemd watchdog: pinging at half the period");
            tokio::spawn(systemd::watchdog(period));
        }
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        if let Some(l) = metrics_listener {
            let registry = std::sync::Arc::new(gatekeeper::metrics::registry(&app));
            let l = tokio::net::TcpListener::from_std(l)?;
            // Until the process ends: the drain after SIGTERM stays observable.
            tokio::spawn(gatekeeper::metrics::serve(l, registry, std::future::pending()));
        }
        let policy = async {
            let service = PolicyService::new(app.server.clone(), policy_config);
            match policy_listener {
                Some(FrontListener::Tcp(l)) => {
                    service.run(tokio::net::TcpListener::from_std(l)?, stopped(stop_rx.clone())).await
                }
                Some(FrontListener::Unix(l, _socket)) => {
                    service.run(tokio::net::UnixListener::from_std(l)?, stopped(stop_rx.clone())).await
                }
                None => Ok(()),
            }
        };
        let milter = async {
            match milter_listener {
                Some(l) => {
                    // Messages are written here for the scan, and removed after it; a crash
                    // may leave some behind, removed now.
                    prepare_private_dir(&milter_dir)
                        .with_context(|| format!("cannot prepare {}", milter_dir.display()))?;
                    let service = MilterService::new(app.server.clone(), milter_config, milter_dir);
                    match l {
                        FrontListener::Tcp(l) => {
                            service.run(tokio::net::TcpListener::from_std(l)?, stopped(stop_rx.clone())).await?
                        }
                        FrontListener::Unix(l, _socket) => {
                            service.run(tokio::net::UnixListener::from_std(l)?, stopped(stop_rx.clone())).await?
                        }
                    }
                    Ok::<(), anyhow::Error>(())
                }
                None => Ok(()),
            }
        };
        let smtp = async {
            match listener {
                Some(l) => app.run(l, stopped(stop_rx.clone())).await.map_err(anyhow::Error::from),
                // No SMTP front end: the policy service and/or the milter serve alone.
                None => Ok(()),
            }
        };
        let policy = async { policy.await.map_err(anyhow::Error::from) };
        tokio::try_join!(smtp, policy, milter)?;
        Ok(())
    })
}

/// A policy service's or milter's listener, bound before the privilege drop.
enum FrontListener {
    Tcp(std::net::TcpListener),
    /// With its socket file, removed when the service is done with it.
    Unix(std::os::unix::net::UnixListener, SocketFile),
}

/// A Unix socket's path, removed when dropped: when its service stops, or fails to start.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds a TCP listener with the SMTP listener's deep backlog ([`gatekeeper::edges::tcp_listener`]),
/// on a thread-less runtime, for the serving runtime to take over.
fn bind_tcp(addr: SocketAddr, context: impl FnOnce() -> String) -> anyhow::Result<std::net::TcpListener> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?
        .block_on(async { gatekeeper::edges::tcp_listener(addr)?.into_std() })
        .with_context(context)
}

/// Binds a front end's listener: TCP with the SMTP listener's backlog, or a Unix socket
/// (mode 0660) owned by the serving user, in `socket_group` (or the serving user's group).
fn bind_front(
    addr: &FrontAddr,
    socket_group: Option<&str>,
    owner: Option<&gatekeeper::privilege::Identity>,
    field: &str,
) -> anyhow::Result<FrontListener> {
    match addr {
        FrontAddr::Tcp(a) => Ok(FrontListener::Tcp(bind_tcp(*a, || format!("cannot listen on {a} ({field})"))?)),
        FrontAddr::Unix(path) => {
            let gid = match socket_group {
                Some(name) => Some(
                    nix::unistd::Group::from_name(name)
                        .with_context(|| format!("cannot look group {name:?} up"))?
                        .with_context(|| format!("no group {name:?} on this system ({field})"))?
                        .gid
                        .as_raw(),
                ),
                None => owner.map(|o| o.gid),
            };
            let l = gatekeeper::front::bind_unix(path, owner.map(|o| o.uid), gid)
                .with_context(|| format!("cannot listen on {addr} ({field})"))?;
            Ok(FrontListener::Unix(l, SocketFile(path.clone())))
        }
    }
}

/// Creates `dir` (mode 0700) or empties it of files.
fn prepare_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// On SIGHUP, reads the configuration and the users file again and applies what can change
/// live (see [`gatekeeper::reload`]); a configuration with problems is refused, logged with
/// every problem, and the running one stays.
async fn reload_on_sighup(
    server: gatekeeper::server::Server,
    config: PathBuf,
    overrides: Overrides,
    mut current: Settings,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler: no reload");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!(config = %config.display(), "SIGHUP: reloading");
        systemd::reloading();
        let path = config.clone();
        let (server2, overrides2, current2) = (server.clone(), overrides.clone(), current.clone());
        // Reading files (users, certificates) off the runtime's threads.
        let result =
            tokio::task::spawn_blocking(move || gatekeeper::reload::reload(&server2, &path, overrides2, &current2))
                .await;
        // Ready again either way: a refused configuration leaves the running one in force.
        match result {
            Ok(Ok(new)) => {
                current = new;
                systemd::ready(&ready_status(&current));
            }
            Ok(Err(problems)) => systemd::ready(&format!(
                "reload refused ({} problem(s), see the log); {}",
                problems.len(),
                ready_status(&current)
            )),
            Err(_) => systemd::ready(&format!("reload failed (see the log); {}", ready_status(&current))),
        }
    }
}

/// What serves, and where: the SMTP listener, the policy service, the milter.
fn listening(s: &Settings) -> String {
    let c = &s.config;
    let mut parts = Vec::new();
    if let Some(l) = s.listen {
        parts.push(format!("{l} (SMTP)"));
    }
    if let Some(p) = &c.postfix_policy.listen {
        parts.push(format!("{p} (policy service)"));
    }
    if let Some(m) = c.milter.addr() {
        parts.push(format!("{m} (milter)"));
    }
    parts.join(", ")
}

/// systemd's `STATUS=` line while serving.
fn ready_status(settings: &Settings) -> String {
    format!(
        "serving on {}, mode {}, {} user(s)",
        listening(settings),
        format!("{:?}", settings.session.mode).to_lowercase(),
        settings.directory.user_count()
    )
}

/// Raises `RLIMIT_NOFILE` to its hard limit and says, loudly, when even that is too low for
/// the configured connections: every connection is a descriptor (`max_sessions +
/// max_refused`), a session receiving a message holds its file too, and the rest of the
/// process needs some ([`gatekeeper::edges::NOFILE_SPARE`]). Too low, the server still runs
/// (port 25 must answer), but accepts fail with EMFILE under load.
fn check_nofile(settings: &Settings) {
    let s = &settings.config.server;
    let connections = (s.max_sessions + s.max_refused) as u64;
    let need = connections + gatekeeper::edges::NOFILE_SPARE;
    let with_messages = need + s.max_sessions as u64;
    match gatekeeper::edges::raise_nofile_limit() {
        Ok(limit) if limit.now < need => tracing::warn!(
            limit = limit.now,
            need,
            "RLIMIT_NOFILE is below server.max_sessions + server.max_refused + {}: connections will fail \
             with EMFILE under load; raise the hard limit (systemd LimitNOFILE=, ulimit -Hn) or lower \
             server.max_sessions",
            gatekeeper::edges::NOFILE_SPARE
        ),
        Ok(limit) if limit.now < with_messages => tracing::warn!(
            limit = limit.now,
            need = with_messages,
            "RLIMIT_NOFILE covers the connections but not every session receiving a message at once; \
             raise the hard limit (systemd LimitNOFILE=) for full load"
        ),
        Ok(limit) => tracing::info!(was = limit.was, now = limit.now, need = with_messages, "RLIMIT_NOFILE"),
        Err(e) => tracing::warn!(error = %e, need, "cannot raise RLIMIT_NOFILE"),
    }
}

/// Loads the configuration file with the command line's overrides; the error says which file
/// and, when it is invalid, every problem.
fn load(config: &Path, overrides: Overrides) -> anyhow::Result<Settings> {
    Config::load(config, overrides).map_err(|e| match e {
        LoadError::Parse(e) => anyhow::anyhow!("{}:\n{e}", config.display()),
        LoadError::Invalid(e) => anyhow::anyhow!("{}: {} problem(s):\n{e}", config.display(), e.problems.len()),
        e => e.into(),
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}
