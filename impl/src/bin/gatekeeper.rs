//! The `gatekeeper` command: parse the CLI, load the configuration, bind, and run the server
//! until SIGTERM or SIGINT. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use gatekeeper::config::{Config, Settings};
use gatekeeper::edges::{Clock, Downstream, MaildirSpool, SmtpRelay, SystemClock};
use gatekeeper::server::{Limits, Server};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(s) => {
                println!(
                    "{}: OK (listen {}, {} local domain(s), {} user(s), delivery: {})",
                    config.display(),
                    s.listen,
                    s.directory.domains().count(),
                    s.directory.user_count(),
                    s.relay.map_or_else(|| "Maildir spool".to_string(), |r| format!("relay to {r}")),
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {} problem(s):", config.display(), e.problems.len());
                for p in &e.problems {
                    eprintln!("  - {p}");
                }
                ExitCode::from(2)
            }
        },
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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
    }
}

fn serve(config: PathBuf, listen: Option<String>, state_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let mut settings = load_with_overrides(&config, listen, state_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
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
            in_process_rate: true,
            proxy_trusted: std::mem::take(&mut settings.proxy_trusted),
        };
        let server = Server::builder(settings.session.clone(), settings.directory.clone(), downstream)
            .clock(clock)
            .gate(c.gate.clone())
            .limits(limits)
            .build();
        server.run(listener, shutdown_signal()).await?;
        Ok(())
    })
}

fn load_with_overrides(
    config: &std::path::Path,
    listen: Option<String>,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<Settings> {
    let text = std::fs::read_to_string(config).with_context(|| format!("cannot read {}", config.display()))?;
    let mut parsed = Config::parse(&text).map_err(|e| anyhow::anyhow!("{}:\n{e}", config.display()))?;
    if let Some(l) = listen {
        parsed.server.listen = l;
    }
    if let Some(d) = state_dir {
        parsed.server.state_dir = std::path::absolute(d)?;
    }
    parsed
        .validate(config.parent())
        .map_err(|e| anyhow::anyhow!("{}: {} problem(s):\n{e}", config.display(), e.problems.len()))
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
