//! The `[cluster]` table: the shared store and this node's name. No `redis`: no cluster (the
//! node is alone, as before). `examples/gatekeeper.toml` documents each field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// The store: `redis://[:PASSWORD@]HOST[:PORT][/DB]`, or `rediss://…` for TLS. Empty: no
    /// cluster.
    pub redis: String,
    /// This node's name in the cluster (unique per MX host): letters, digits, `.`, `-`, `_`.
    pub node: String,
    /// Prefix of every key the cluster uses, so that several clusters may share one Redis.
    pub prefix: String,
    /// A file holding the Redis password (instead of one in the URL); its trailing newline is
    /// not part of it.
    pub password_file: Option<PathBuf>,
    /// `rediss://`: the CA that signed the Redis server's certificate (PEM). Unset: the system's.
    pub ca_file: Option<PathBuf>,
    /// `rediss://`: a client certificate (PEM), when Redis asks for one (`tls-auth-clients`).
    pub cert_file: Option<PathBuf>,
    /// `rediss://`: the client certificate's key (PEM).
    pub key_file: Option<PathBuf>,
    /// Longest wait for one store call (and for a connection): past it the node goes on
    /// alone. Sessions never wait on the store.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Longest time between two looks at the outbox and at the shared log when nothing woke
    /// the sync (a ban decided here wakes it at once; so does an entry in the log).
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// How often this node records its heartbeat (and checks the store's epoch).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often the whole shared table is reconciled with the local bans, besides on start
    /// and after an outage.
    #[serde(with = "humantime_serde")]
    pub reconcile_interval: Duration,
    /// Entries the shared log keeps (approximately): a node that falls further behind
    /// catches up from the table.
    pub log_max: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            redis: String::new(),
            node: String::new(),
            prefix: "gatekeeper".into(),
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            timeout: Duration::from_millis(500),
            sync_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(5),
            reconcile_interval: Duration::from_secs(60),
            log_max: 100_000,
        }
    }
}

/// A node name or key prefix: 1–64 of letters, digits, `.`, `-`, `_`.
fn is_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl ClusterSection {
    /// True if a cluster is configured.
    pub fn enabled(&self) -> bool {
        !self.redis.trim().is_empty()
    }

    /// True for `rediss://`.
    pub fn tls(&self) -> bool {
        self.redis.trim_start().starts_with("rediss://")
    }

    /// Every problem, each naming its field (without the `cluster.` prefix).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if !self.enabled() {
            if !self.node.is_empty() {
                p.push("node: set, but redis is not (no cluster without a store)".into());
            }
            return p;
        }
        let url = self.redis.trim();
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            p.push(format!("redis: {:?} is not a redis:// or rediss:// URL", redact(url)));
        } else if let Err(e) = ::redis::Client::open(url) {
            p.push(format!("redis: {:?}: {e}", redact(url)));
        }
        if !is_name(&self.node) {
            p.push(format!("node: {:?} must be 1-64 letters, digits, '.', '-' or '_' (unique per MX host)", self.node));
        }
        if !is_name(&self.prefix) {
            p.push(format!("prefix: {:?} must be 1-64 letters, digits, '.', '-' or '_'", self.prefix));
        }
        if !self.tls() {
            for (name, f) in [("ca_file", &self.ca_file), ("cert_file", &self.cert_file), ("key_file", &self.key_file)]
            {
                if f.is_some() {
                    p.push(format!("{name}: only for a rediss:// (TLS) store"));
                }
            }
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            p.push("cert_file, key_file: give both or neither".into());
        }
        for (name, d) in [
            ("timeout", self.timeout),
            ("sync_interval", self.sync_interval),
            ("heartbeat_interval", self.heartbeat_interval),
            ("reconcile_interval", self.reconcile_interval),
        ] {
            if d.is_zero() {
                p.push(format!("{name}: must be longer than 0s"));
            } else if d > crate::config::WAIT_MAX {
                p.push(format!("{name}: longer than a day"));
            }
        }
        if self.log_max < 100 {
            p.push("log_max: must be at least 100".into());
        }
        p
    }

    /// Resolves the relative paths against `base` (the configuration file's directory) and
    /// checks that the files can be read.
    pub fn resolve(&mut self, base: Option<&Path>) -> Vec<String> {
        let mut p = Vec::new();
        for (name, f) in [
            ("password_file", &mut self.password_file),
            ("ca_file", &mut self.ca_file),
            ("cert_file", &mut self.cert_file),
            ("key_file", &mut self.key_file),
        ] {
            if let Some(path) = f {
                if let Some(base) = base
                    && path.is_relative()
                {
                    *path = base.join(&*path);
                }
                if let Err(e) = std::fs::metadata(&*path) {
                    p.push(format!("{name}: cannot read {}: {e}", path.display()));
                }
            }
        }
        p
    }
}

/// `url` without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(redis: &str, node: &str) -> ClusterSection {
        ClusterSection { redis: redis.into(), node: node.into(), ..ClusterSection::default() }
    }

    #[test]
    fn off_by_default_and_valid_when_complete() {
        assert!(!ClusterSection::default().enabled());
        assert!(ClusterSection::default().problems().is_empty());
        assert!(section("redis://127.0.0.1:6379", "mx1").problems().is_empty());
        let tls =
            ClusterSection { ca_file: Some("ca.pem".into()), ..section("rediss://:pw@redis.example:6380/2", "mx-2") };
        assert!(tls.problems().is_empty(), "{:?}", tls.problems());
    }

    #[test]
    fn every_problem_is_listed() {
        let bad = ClusterSection {
            cert_file: Some("c.pem".into()),
            timeout: Duration::ZERO,
            log_max: 1,
            ..section("http://:secret@x", "mx 1")
        };
        let p = bad.problems();
        assert_eq!(p.len(), 6, "{p:#?}");
        assert!(p[0].starts_with("redis: \"http://***@x\""), "the password is not shown: {}", p[0]);
        assert!(p.iter().any(|s| s.starts_with("node:")));
        assert!(p.iter().any(|s| s.starts_with("cert_file: only for a rediss://")));
        assert!(p.iter().any(|s| s.starts_with("cert_file, key_file")));
        assert!(p.iter().any(|s| s.starts_with("timeout:")));
        assert!(p.iter().any(|s| s.starts_with("log_max:")));
        assert_eq!(section("", "mx1").problems().len(), 1, "a node without a store");
    }
}
