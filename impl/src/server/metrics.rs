//! What the server counts for the metrics endpoint beyond its [`Stats`](super::Stats): the
//! labelled families (verdicts by rule and code, bans by reason, callbacks, scans, deliveries,
//! sessions by outcome) and the latencies, measured here in the IO layer on the server's
//! injected clock (the sans-IO session never reads one). `gatekeeper::metrics` registers them,
//! with the plain counters, for `GET /metrics` (docs/metrics.md).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::policy::Verification;
use crate::session::Event;

/// A verdict carried out.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerdictLabels {
    /// `G1`, `E1`, …, `proto`, `deliver`.
    pub rule: &'static str,
    /// `accept`, `tempfail`, `reject`.
    pub verdict: &'static str,
    /// The reply code.
    pub code: u16,
}

/// A verdict observe mode did not carry out.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObservedLabels {
    /// The rule.
    pub rule: &'static str,
    /// The code the client would have had.
    pub code: u16,
    /// The ban that was not requested, or `none`.
    pub would_ban: &'static str,
}

/// One label, `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `B1` … `B4`.
    pub reason: &'static str,
}

/// One label, `result`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// What came of it.
    pub result: &'static str,
}

/// One label, `outcome`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// How the session ended.
    pub outcome: &'static str,
}

/// The server's labelled metrics. Cheap to clone (the families are shared).
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    /// Sessions begun (greeted 220; refused connections are `Stats::refused_*`).
    pub sessions_opened: Counter,
    /// Sessions ended, by outcome: `banned`, `delivered` (a message handed off), `rejected`
    /// (a 4xx/5xx verdict of a rule, no ban, nothing delivered) or `none`.
    pub sessions_closed: Family<OutcomeLabel, Counter>,
    /// Verdicts carried out, by rule, verdict and code.
    pub verdicts: Family<VerdictLabels, Counter>,
    /// Observe mode: verdicts not carried out, by rule, code and the ban not requested.
    pub observed: Family<ObservedLabels, Counter>,
    /// Bans requested by the rules and carried out, by reason.
    pub bans: Family<ReasonLabel, Counter>,
    /// Callback verifications (C1), by result.
    pub callbacks: Family<ResultLabel, Counter>,
    /// How long a callback verification took (cache hits included).
    pub callback_seconds: Histogram,
    /// Virus scans (V1), by result: `clean`, `infected`, `failed`.
    pub scans: Family<ResultLabel, Counter>,
    /// Hand-offs to the downstream, by result: `ok`, `tempfail`, `reject`.
    pub deliveries: Family<ResultLabel, Counter>,
    /// How long a hand-off took (the queue commit: fsync'd into the spool, or the relay's 250).
    pub delivery_seconds: Histogram,
}

impl Default for ServerMetrics {
    /// Every family whose label values are known starts with them at zero, so that a
    /// dashboard's `rate()` has a series from the first scrape on.
    fn default() -> Self {
        let m = ServerMetrics::empty();
        for outcome in ["banned", "delivered", "rejected", "none"] {
            m.sessions_closed.get_or_create_owned(&OutcomeLabel { outcome });
        }
        for reason in ["B1", "B2", "B3", "B4"] {
            m.bans.get_or_create_owned(&ReasonLabel { reason });
        }
        for result in ["valid", "accept_all", "invalid", "undeliverable", "unknown"] {
            m.callbacks.get_or_create_owned(&ResultLabel { result });
        }
        for result in ["clean", "infected", "failed"] {
            m.scans.get_or_create_owned(&ResultLabel { result });
        }
        for result in ["ok", "tempfail", "reject"] {
            m.deliveries.get_or_create_owned(&ResultLabel { result });
        }
        m
    }
}

impl ServerMetrics {
    fn empty() -> Self {
        ServerMetrics {
            sessions_opened: Counter::default(),
            sessions_closed: Family::default(),
            verdicts: Family::default(),
            observed: Family::default(),
            bans: Family::default(),
            callbacks: Family::default(),
            // 5 ms .. 41 s: a cache hit to a whole budget.
            callback_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            scans: Family::default(),
            deliveries: Family::default(),
            // 0.5 ms .. 16 s.
            delivery_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
        }
    }
}

impl ServerMetrics {
    /// Registers every family under its `gatekeeper_…` name.
    pub fn register(&self, r: &mut Registry) {
        r.register("gatekeeper_sessions_opened", "SMTP sessions begun (greeted 220)", self.sessions_opened.clone());
        r.register(
            "gatekeeper_sessions_closed",
            "SMTP sessions ended, by outcome (banned, delivered, rejected, none)",
            self.sessions_closed.clone(),
        );
        r.register(
            "gatekeeper_verdicts",
            "Verdicts carried out, by rule, verdict and reply code",
            self.verdicts.clone(),
        );
        r.register(
            "gatekeeper_observed_verdicts",
            "Observe mode: verdicts not carried out (would_reject), by rule, code and the ban not requested",
            self.observed.clone(),
        );
        r.register("gatekeeper_bans", "Bans requested by the rules and carried out, by reason", self.bans.clone());
        r.register("gatekeeper_callbacks", "Callback verifications (C1), by result", self.callbacks.clone());
        r.register(
            "gatekeeper_callback_duration_seconds",
            "Callback verification latency (cache hits included)",
            self.callback_seconds.clone(),
        );
        r.register("gatekeeper_scans", "Virus scans (V1), by result", self.scans.clone());
        r.register("gatekeeper_deliveries", "Hand-offs to the downstream, by result", self.deliveries.clone());
        r.register(
            "gatekeeper_delivery_duration_seconds",
            "Hand-off latency (queue commit: spool fsync or the relay's reply)",
            self.delivery_seconds.clone(),
        );
    }

    /// Counts one verdict event.
    pub(super) fn event(&self, ev: &Event) {
        if ev.observed {
            let would_ban = ev.ban.map_or("none", |b| b.as_str());
            self.observed.get_or_create(&ObservedLabels { rule: ev.rule.as_str(), code: ev.code, would_ban }).inc();
        } else {
            let labels = VerdictLabels { rule: ev.rule.as_str(), verdict: ev.verdict(), code: ev.code };
            self.verdicts.get_or_create(&labels).inc();
        }
    }

    /// Counts one callback result.
    pub(super) fn callback(&self, result: &Verification, seconds: f64) {
        let result = match result {
            Verification::Valid { .. } => "valid",
            Verification::AcceptAll { .. } => "accept_all",
            Verification::Invalid { .. } => "invalid",
            Verification::Undeliverable { .. } => "undeliverable",
            Verification::Unknown { .. } => "unknown",
        };
        self.callbacks.get_or_create(&ResultLabel { result }).inc();
        self.callback_seconds.observe(seconds);
    }
}

/// What one session did, for [`ServerMetrics::sessions_closed`].
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Marks {
    pub(super) delivered: bool,
    pub(super) banned: bool,
    pub(super) rejected: bool,
}

impl Marks {
    pub(super) fn merge(&mut self, other: Marks) {
        self.delivered |= other.delivered;
        self.banned |= other.banned;
        self.rejected |= other.rejected;
    }

    pub(super) fn outcome(self) -> &'static str {
        if self.banned {
            "banned"
        } else if self.delivered {
            "delivered"
        } else if self.rejected {
            "rejected"
        } else {
            "none"
        }
    }
}
