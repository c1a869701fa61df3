//! The `firewall` and `bans` subcommands and the hidden `model-replay` used by ci/kernel.sh.

use std::io::{BufRead, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use gatekeeper::ban::rules::{RuleParams, nft_script, xt_rules, xt_script};
use gatekeeper::ban::{BackendKind, BanConfig, BanManager, BanOutcome, BanStore, Net, STATE_DB};
use gatekeeper::config::{Overrides, Settings};
use gatekeeper::edges::{BanOrder, Clock, SystemClock, rfc5322_date};
use gatekeeper::gate::{DEFAULT_IP_LIST_TOT, Gate, GateConfig, GateKind};
use gatekeeper::proto::escape;
use humantime_serde::re::humantime;

use super::load;

/// A kernel backend, as the CLI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KernelBackend {
    /// iptables/ip6tables with xt_recent.
    #[value(name = "xt_recent")]
    XtRecent,
    /// nftables.
    Nftables,
}

/// Which ruleset, for which configuration and port (`firewall rules` and `firewall apply`).
#[derive(Debug, Args)]
pub struct RulesetArgs {
    /// Which ruleset; default: `bans.backend`.
    #[arg(long, value_enum)]
    backend: Option<KernelBackend>,
    /// The TOML configuration.
    #[arg(long, short)]
    config: PathBuf,
    /// The port to protect; default: the port of `server.listen` (25 without an SMTP listener).
    #[arg(long)]
    port: Option<u16>,
}

/// `gatekeeper firewall ...`.
#[derive(Debug, Subcommand)]
pub enum FirewallCommand {
    /// Print the kernel ruleset (iptables + ip6tables commands, or an nft script) for the
    /// configured window, ban time and port.
    Rules(RulesetArgs),
    /// Install the ruleset in the kernel (nft: one atomic `nft -f`; iptables: each rule not yet
    /// present is appended). Keeps existing bans.
    Apply(RulesetArgs),
}

/// `gatekeeper bans ...`: the ban database in the state dir, usable while the server runs (it
/// applies the change within `bans.sync_interval`).
#[derive(Debug, Subcommand)]
pub enum BansCommand {
    /// List the active bans (and, with --history, the latest events).
    List {
        /// Also show the latest N history events.
        #[arg(long, value_name = "N")]
        history: Option<usize>,
    },
    /// Ban an address (an IPv6 address bans its /64, or the configured prefix).
    Add {
        /// The address.
        addr: Net,
        /// How long; default: `gate.ban_time`.
        #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
        for_: Option<Duration>,
        /// Why (stored as the evidence of a manual ban).
        #[arg(long, default_value = "added by hand")]
        reason: String,
    },
    /// Lift the ban of an address.
    Remove {
        /// The address (or its banned network).
        addr: Net,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 30m, 4d, 1h 30m)"))
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gatekeeper: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn params(s: &Settings, port: Option<u16>) -> RuleParams {
    let g = &s.config.gate;
    RuleParams {
        port: port.or(s.listen.map(|l| l.port())).unwrap_or(25),
        window: g.window,
        ban_time: g.ban_time,
        ipv6_prefix: g.ipv6_prefix,
        rate_size: BanConfig::nft_rate_size(g),
    }
}

fn which(backend: Option<KernelBackend>, cfg: &BanConfig) -> anyhow::Result<KernelBackend> {
    match (backend, cfg.backend) {
        (Some(b), _) => Ok(b),
        (None, BackendKind::XtRecent) => Ok(KernelBackend::XtRecent),
        (None, BackendKind::Nftables) => Ok(KernelBackend::Nftables),
        (None, BackendKind::Memory) => bail!("bans.backend is memory: say --backend xt_recent or --backend nftables"),
    }
}

/// `gatekeeper firewall ...`.
pub fn firewall(cmd: FirewallCommand) -> ExitCode {
    report(match cmd {
        FirewallCommand::Rules(RulesetArgs { backend, config, port }) => (|| {
            let s = load(&config, Overrides::default())?;
            let b = &s.config.bans;
            let text = match which(backend, b)? {
                KernelBackend::XtRecent => xt_script(&b.xt_recent, &params(&s, port)),
                KernelBackend::Nftables => nft_script(&b.nftables, &params(&s, port)),
            };
            print!("{text}");
            Ok(())
        })(),
        FirewallCommand::Apply(RulesetArgs { backend, config, port }) => (|| {
            let s = load(&config, Overrides::default())?;
            let b = &s.config.bans;
            match which(backend, b)? {
                KernelBackend::Nftables => {
                    let script = nft_script(&b.nftables, &params(&s, port));
                    gatekeeper::ban::backend::run_nft(&b.nftables.nft, &["-f", "-"], Some(&script), b.kernel_timeout)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    println!("installed table inet {}", b.nftables.table);
                }
                KernelBackend::XtRecent => {
                    for rule in xt_rules(&b.xt_recent, &params(&s, port)) {
                        let present = Command::new(rule.program)
                            .arg("-C")
                            .args(&rule.args)
                            .stderr(std::process::Stdio::null())
                            .status()
                            .with_context(|| format!("cannot run {}", rule.program))?
                            .success();
                        if present {
                            println!("present: {}", rule.append_command());
                            continue;
                        }
                        let status = Command::new(rule.program).arg("-A").args(&rule.args).status()?;
                        if !status.success() {
                            bail!("failed ({status}): {}", rule.append_command());
                        }
                        println!("added:   {}", rule.append_command());
                    }
                }
            }
            Ok(())
        })(),
    })
}

/// `gatekeeper bans ...`.
pub fn bans(cmd: BansCommand, config: &Path, state_dir: Option<PathBuf>) -> ExitCode {
    report((|| {
        let s = load(config, Overrides { state_dir, ..Overrides::default() })?;
        let c = &s.config;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let m = BanManager::open(&c.bans, &c.gate, &c.server.state_dir, clock.clone(), false)?;
        if c.cluster.enabled() {
            // The server publishes what is added or removed here to the other nodes.
            m.enable_cluster();
        }
        match cmd {
            BansCommand::List { history } => {
                let now = clock.wall();
                let bans = m.list_blocking()?;
                println!(
                    "{:<22} {:<6} {:<31} {:<16} {:>8}  EVIDENCE",
                    "NET", "REASON", "EXPIRES", "REMAINING", "SESSION"
                );
                // Evidence may quote remote text: escaped, no control character reaches a terminal.
                for b in &bans {
                    let remaining = if b.is_expired(now) { "expired".to_string() } else { short(b.remaining(now)) };
                    println!(
                        "{:<22} {:<6} {:<31} {:<16} {:>8}  {}",
                        b.net.to_string(),
                        b.reason.as_str(),
                        rfc5322_date(b.expires),
                        remaining,
                        b.session,
                        escape(&b.evidence)
                    );
                }
                println!("{} ban(s)", bans.len());
                if let Some(n) = history {
                    println!();
                    println!("{:<31} {:<7} {:<22} {:<6} {:>16}  EVIDENCE", "AT", "EVENT", "NET", "REASON", "LENGTH");
                    for h in m.history_blocking(None, n)? {
                        println!(
                            "{:<31} {:<7} {:<22} {:<6} {:>16}  {}",
                            rfc5322_date(h.at),
                            h.event,
                            h.ban.net.to_string(),
                            h.ban.reason.as_str(),
                            short(h.ban.total()),
                            escape(&h.ban.evidence)
                        );
                    }
                }
            }
            BansCommand::Add { addr, for_, reason } => {
                let net = m.key_of(addr)?;
                match m.ban_blocking(BanOrder { duration: for_, ..BanOrder::manual(net.addr(), reason) })? {
                    BanOutcome::Allowlisted(n) => bail!("{n} is allowlisted (bans.allowlist): not banned"),
                    // Manual bans are never refused; kept for completeness.
                    BanOutcome::Refused(n) => bail!("{n}: the ban table is full (bans.max_active): not banned"),
                    BanOutcome::Banned(b) | BanOutcome::Extended(b) => {
                        println!(
                            "banned {} until {} ({})",
                            b.net,
                            rfc5322_date(b.expires),
                            short(b.remaining(clock.wall()))
                        )
                    }
                }
                warn_pending(&m);
            }
            BansCommand::Remove { addr } => {
                let net = m.key_of(addr)?;
                match m.unban_blocking(net)? {
                    Some(_) => println!("removed the ban of {net}"),
                    None => println!("{net} was not banned (any kernel entry was removed anyway)"),
                }
                warn_pending(&m);
            }
        }
        Ok(())
    })())
}

fn warn_pending(m: &BanManager) {
    if m.pending_len() > 0 {
        eprintln!(
            "gatekeeper: the {} backend failed (see above); the change is recorded and the server applies it",
            m.backend().kind()
        );
    }
}

/// A duration rounded to seconds (or minutes past a day), human-readable.
fn short(d: Duration) -> String {
    let secs = d.as_secs();
    let secs = if secs > 86_400 { secs - secs % 60 } else { secs };
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// Which kernel mechanism `model-replay` evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModelKind {
    /// The xt_recent ruleset of docs/kernel.md §2.
    #[value(name = "xt_recent")]
    XtRecent,
    /// The nftables ruleset of docs/kernel.md §2.
    Nft,
}

/// `gatekeeper model-replay`: reads `JIFFIES ADDR` lines (SYNs in time order, kernel jiffies
/// as /proc/net/xt_recent shows them) and prints `JIFFIES ADDR DECISION` for each, from the
/// in-process model of the kernel rules (no bans). For the differential kernel test.
pub fn model_replay(kind: ModelKind, window: Duration, hz: u32, ipv6_prefix: u8, size: u32) -> ExitCode {
    report((|| {
        // The xt_recent tables keep the kernel's default size; `size` is the nft rate sets'.
        let kind = match kind {
            ModelKind::XtRecent => GateKind::XtRecent { ip_list_tot: DEFAULT_IP_LIST_TOT, hz },
            ModelKind::Nft => GateKind::Nft { size, hz },
        };
        let cfg = GateConfig { kind, window, ipv6_prefix, ..GateConfig::default() };
        // Jiffies come from the input; the origin is never consulted.
        let mut gate = Gate::try_new(cfg, std::time::Instant::now()).context("invalid model parameters")?;
        let stdin = std::io::stdin();
        let mut out = std::io::stdout().lock();
        for (n, line) in stdin.lock().lines().enumerate() {
            let line = line?;
            let mut it = line.split_whitespace();
            let (Some(j), Some(a)) = (it.next(), it.next()) else {
                continue;
            };
            let j: u64 = j.parse().with_context(|| format!("line {}: bad jiffies {j:?}", n + 1))?;
            let a: IpAddr = a.parse().with_context(|| format!("line {}: bad address {a:?}", n + 1))?;
            let a = a.to_canonical();
            let d = gate.check_at(j, a);
            writeln!(out, "{j} {a} {d}")?;
        }
        Ok(())
    })())
}

/// `check-config`'s warnings about the ban tables: a kernel table (xt_recent) smaller than the
/// active bans already in the state database evicts some of them at the next restore, and the
/// kernel then lets those clients in (the server still refuses them with 554).
pub fn table_warnings(s: &Settings) -> Vec<String> {
    let c = &s.config;
    if c.bans.backend != BackendKind::XtRecent {
        return Vec::new();
    }
    let mut capacity = c.bans.xt_recent.capacity as usize;
    let mut source = "bans.xt_recent.capacity".to_string();
    let sys = Path::new("/sys/module/xt_recent/parameters/ip_list_tot");
    if let Some(kernel) = std::fs::read_to_string(sys).ok().and_then(|t| t.trim().parse::<usize>().ok())
        && kernel < capacity
    {
        capacity = kernel;
        source = format!("{} on this machine", sys.display());
    }
    let db = c.server.state_dir.join(STATE_DB);
    if !db.exists() {
        return Vec::new();
    }
    let bans = match BanStore::open(&db).and_then(|mut store| store.all()) {
        Ok(bans) => bans,
        Err(e) => return vec![format!("cannot read the active bans in {}: {e}", db.display())],
    };
    let now = std::time::SystemTime::now();
    let live = bans.iter().filter(|b| !b.is_expired(now));
    let (v4, v6) = live.fold((0, 0), |(v4, v6), b| if b.net.addr().is_ipv4() { (v4 + 1, v6) } else { (v4, v6 + 1) });
    [("IPv4", v4), ("IPv6", v6)]
        .into_iter()
        .filter(|&(_, n)| n > capacity)
        .map(|(family, n)| {
            format!(
                "{n} active {family} bans in {} but the xt_recent table holds {capacity} ({source}): the kernel \
                 will evict {} of them and let those clients connect (the server still answers them 554); raise \
                 ip_list_tot (see the note above)",
                db.display(),
                n - capacity
            )
        })
        .collect()
}
