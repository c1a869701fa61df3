//! The `gatekeeper` command: parse the CLI, load the configuration, bind, and run the server
//! until SIGTERM or SIGINT. Everything else lives in the library.

#[path = "gatekeeper/bans.rs"]
mod bans;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gatekeeper::config::{Config, LoadError, Overrides, Settings};
use gatekeeper::edges::{Clock, Downstream, MaildirSpool, SmtpRelay, SystemClock, Verifier};
use gatekeeper::server::{Limits, Server};
use gatekeeper::verify::CallbackVerifier;

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
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config, Overrides::default()) {
            Ok(s) => {
                println!(
                    "{}: OK (listen {}, {} local domain(s), {} user(s), delivery: {})",
                    config.display(),
                    s.listen,
                    s.directory.domains().count(),
                    s.directory.user_count(),
                    s.relay.map_or_else(|| "Maildir spool".to_string(), |r| format!("relay to {r}")),
                );
                for note in s.config.bans.notes(&s.config.gate) {
                    println!("  - {note}");
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

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour only on a terminal: log files stay plain text, cheap to write and to count.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

fn serve(config: PathBuf, listen: Option<String>, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let mut settings = load(&config, Overrides { listen, state_dir, ..Overrides::default() })?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        // A deep accept backlog: a flood must not overflow the kernel's queue (tokio's is 128).
        let listener = gatekeeper::edges::tcp_listener(settings.listen)
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let c = &settings.config;
        let downstream: Arc<dyn Downstream> = match settings.relay {
            Some(addr) => Arc::new(SmtpRelay::new(addr, &c.server.hostname, c.delivery.relay_timeout, clock.clone())),
            None => {
                let root = c.server.state_dir.join("maildir");
                Arc::new(
                    MaildirSpool::open(&root, &c.server.hostname, clock.clone(), true)
                        .with_context(|| format!("cannot create the spool {}", root.display()))?,
                )
            }
        };
        let limits = Limits {
            max_sessions: c.server.max_sessions,
            max_sessions_per_ip: c.server.max_sessions_per_ip,
            shutdown_grace: c.server.shutdown_grace,
            // G1 in process only when the kernel does not gate.
            in_process_rate: !c.bans.backend.is_kernel(),
            proxy_trusted: std::mem::take(&mut settings.proxy_trusted),
        };
        // C1: callback verification of external senders, with its cache in the state database.
        let verifier: Option<Arc<dyn Verifier>> = match c.rules.verify_senders {
            true => Some(Arc::new(
                CallbackVerifier::production(&c.callbacks, &c.server.hostname, &c.server.state_dir, clock.clone())
                    .context("cannot set up callback verification")?
                    .with_directory(settings.directory.clone()),
            )),
            false => None,
        };
        // V1: the virus scanner; a clamd gets one PING (logged) but need not be up yet.
        let scanner = match c.rules.scan {
            true => {
                let scanner = c.scan.start(c.rules.on_scan_failure, clock.clone()).await;
                Some(scanner.map_err(|e| anyhow::anyhow!("scan: {e}"))?)
            }
            false => None,
        };
        // G2: bans recorded in the state database and pushed to the configured backend.
        let ban_manager = bans::open_manager(&settings, clock.clone())?;
        let builder = Server::builder(settings.session.clone(), settings.directory.clone(), downstream)
            .clock(clock)
            .gate(c.gate.clone())
            .limits(limits)
            .ban_sink(Arc::new(ban_manager.clone()));
        let builder = match scanner {
            Some(s) => builder.scanner(s),
            None => builder,
        };
        let server = match verifier {
            Some(v) => builder.verifier(v),
            None => builder,
        }
        .build();
        bans::start(&ban_manager, &server).await?;
        server.run(listener, shutdown_signal()).await?;
        Ok(())
    })
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
