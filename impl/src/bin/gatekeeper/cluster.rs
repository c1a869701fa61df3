//! The `cluster` subcommand: what the shared store says about the cluster, beside this node's
//! own ban database.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Subcommand;
use gatekeeper::ban::BanManager;
use gatekeeper::cluster::{RedisStore, view};
use gatekeeper::config::Overrides;
use gatekeeper::edges::{Clock, SystemClock, rfc5322_date};
use humantime_serde::re::humantime;

use super::load;

/// `gatekeeper cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// The nodes the store has seen, their last heartbeat, and whether this node's bans and the
    /// shared table agree (exit status 1 if they do not, 2 if the store cannot be read).
    Status,
}

/// `gatekeeper cluster ...`.
pub fn cluster(cmd: ClusterCommand, config: &Path, state_dir: Option<PathBuf>) -> ExitCode {
    match status(cmd, config, state_dir) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("gatekeeper: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn status(cmd: ClusterCommand, config: &Path, state_dir: Option<PathBuf>) -> anyhow::Result<bool> {
    let ClusterCommand::Status = cmd;
    let s = load(config, Overrides { state_dir, ..Overrides::default() })?;
    let c = &s.config;
    if !c.cluster.enabled() {
        bail!("no [cluster] redis in {}: this node is alone", config.display());
    }
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let m = BanManager::open(&c.bans, &c.gate, &c.server.state_dir, clock.clone(), false)?;
    let local = m.list_blocking()?;
    let outbox = m.outbox_len_blocking()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let now = clock.wall();
    let v = runtime.block_on(async {
        let store = RedisStore::new(&c.cluster)?;
        view(&store, &local, now).await
    });
    let v = v.context("cannot read the cluster store")?;
    println!("{:<20} {:<31} {:>10} {:>8} {:>7}", "NODE", "LAST HEARTBEAT", "AGO", "BANS", "OUTBOX");
    for n in &v.nodes {
        let at = gatekeeper::ban::store::from_ms(n.at_ms);
        let ago = now.duration_since(at).unwrap_or_default();
        let ago = humantime::format_duration(Duration::from_secs(ago.as_secs())).to_string();
        let me = if n.node == c.cluster.node { " (this node)" } else { "" };
        println!("{:<20} {:<31} {:>10} {:>8} {:>7}{me}", n.node, rfc5322_date(at), ago, n.bans, n.outbox);
    }
    println!();
    println!("shared table: {} ban(s) in force, {} lifting(s) kept", v.table_bans, v.table_lifted);
    println!("this node ({}): {} ban(s) in force, {} waiting in the outbox", c.cluster.node, v.local_bans, outbox);
    let in_sync = v.differences == 0 && outbox == 0;
    if in_sync {
        println!("bans: in sync");
    } else {
        println!("bans: NOT in sync ({} difference(s), {} unpublished)", v.differences, outbox);
    }
    Ok(in_sync)
}
