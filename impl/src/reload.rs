//! SIGHUP: the configuration file and the users file read again, and what can change live
//! applied to the running server. A configuration that does not load (every problem is
//! listed) changes nothing: the old one stays.
//!
//! Live (for sessions that start after the reload; running sessions keep theirs):
//! `[smtp]`, `[domains]` (users, `users_file`, `abuse_always`, `recipient_delimiter`, and
//! `local` for the rules), `[rules]` tunables and `mode`, and the certificate and key of
//! `[tls]` (new handshakes). Everything else is read at start only, and a change to it is
//! logged as needing a restart: `[server]`, `[gate]`, `[bans]`, `[delivery]`, `[scan]`,
//! `[callbacks]`, `[metrics]`, `[cluster]`, `rules.verify_senders`, `rules.scan`, `rules.b4_window` (the B4 counters'
//! window), `tls.handshake_timeout`, `tls.max_handshakes`, and turning TLS on or off. The
//! callback verifier keeps the `domains.local` it started with.

use std::path::Path;

use crate::config::{Config, LoadError, Overrides, Settings};
use crate::server::Server;

/// The settings that take effect only at restart and differ between `old` and `new`, by
/// name.
pub fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let differs = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    let mut changed = Vec::new();
    let sections = [
        ("[server]", &old.server as &dyn std::fmt::Debug, &new.server as &dyn std::fmt::Debug),
        ("[gate]", &old.gate, &new.gate),
        ("[bans]", &old.bans, &new.bans),
        ("[delivery]", &old.delivery, &new.delivery),
        ("[scan]", &old.scan, &new.scan),
        ("[callbacks]", &old.callbacks, &new.callbacks),
        ("[metrics]", &old.metrics, &new.metrics),
        ("[postfix_policy]", &old.postfix_policy, &new.postfix_policy),
        ("[milter]", &old.milter, &new.milter),
        ("[cluster]", &old.cluster, &new.cluster),
    ];
    for (name, a, b) in sections {
        if differs(a, b) {
            changed.push(name);
        }
    }
    let (o, n) = (&old.rules, &new.rules);
    if o.verify_senders != n.verify_senders {
        changed.push("rules.verify_senders");
    }
    if o.scan != n.scan {
        changed.push("rules.scan");
    }
    if o.b4_window != n.b4_window {
        changed.push("rules.b4_window");
    }
    if old.domains.local != new.domains.local {
        changed.push("domains.local (for the callback verifier; the rules use the new list)");
    }
    let (o, n) = (&old.tls, &new.tls);
    if o.handshake_timeout != n.handshake_timeout {
        changed.push("tls.handshake_timeout");
    }
    if o.max_handshakes != n.max_handshakes {
        changed.push("tls.max_handshakes");
    }
    if o.cert.is_some() != n.cert.is_some() {
        changed.push("[tls] on or off");
    }
    changed
}

/// Loads the configuration at `path` again (with the command line's `overrides`) and
/// applies what can change live to `server`. Returns the new settings, which the caller
/// keeps as the current ones, or the problems of a configuration that was refused (the old
/// one stays in force). Everything is logged.
pub fn reload(server: &Server, path: &Path, overrides: Overrides, current: &Settings) -> Result<Settings, Vec<String>> {
    let new = match Config::load(path, overrides) {
        Ok(new) => new,
        Err(e) => {
            let problems = match &e {
                LoadError::Read { .. } | LoadError::StateDir(_) => vec![e.to_string()],
                _ => e.problems(),
            };
            tracing::error!(
                config = %path.display(),
                problems = problems.len(),
                "reload refused, the running configuration stays: {}",
                problems.join("; ")
            );
            return Err(problems);
        }
    };
    server.reload(new.session.clone(), new.directory.clone());
    if let (Some(tls), Some(config)) = (server.tls(), &new.tls) {
        tls.reload(config.clone());
    }
    for setting in restart_only_changes(&current.config, &new.config) {
        tracing::warn!(setting, "changed, but takes effect only after a restart");
    }
    tracing::info!(
        config = %path.display(),
        users = new.directory.user_count(),
        mode = ?new.session.mode,
        tls = new.tls.is_some() && server.tls().is_some(),
        "configuration reloaded"
    );
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    #[test]
    fn live_settings_need_no_restart_and_the_others_are_named() {
        let old = config("[smtp]\nrcpt_max = 100\n[rules]\nb4_threshold = 1\n");
        let live = config("[smtp]\nrcpt_max = 200\n[rules]\nb4_threshold = 3\nmode = \"observe\"\n");
        assert!(restart_only_changes(&old, &live).is_empty());
        let restart = config(
            "[server]\nmax_sessions = 10\n[rules]\nscan = true\nb4_window = \"2h\"\n[postfix_policy]\nlisten = \"127.0.0.1:10040\"\n",
        );
        assert_eq!(
            restart_only_changes(&old, &restart),
            ["[server]", "[postfix_policy]", "rules.scan", "rules.b4_window"]
        );
    }
}
