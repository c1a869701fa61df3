//! The Prometheus endpoint (`[metrics] listen`, docs/metrics.md): `GET /metrics` answered in
//! the OpenMetrics text format by a minimal HTTP/1.1 responder on plain tokio (no web
//! framework): one request per connection, at most [`REQUEST_MAX`] octets of request head
//! within [`REQUEST_TIMEOUT`], 404 for any other path, 405 for any other method, 400 for
//! anything that is not HTTP, at most [`SCRAPES_MAX`] scrapes at once.
//!
//! What it shows is what the application already counts, read at scrape time: the server's
//! [`Stats`](crate::server::Stats) (connections, refusals, `would_reject`, `would_ban`), its
//! labelled [`ServerMetrics`] (verdicts by rule and code, bans by reason, callbacks, scans,
//! deliveries, sessions, latencies), the ban manager's [`BanStats`](crate::ban::BanStats),
//! [`BanState`](crate::ban::BanState) and commit latency, the callback verifier's
//! [`VerifyStats`](crate::verify::VerifyStats), and the TLS handshake counters.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::app::App;
use crate::ban::BanManager;
use crate::server::{Server, ServerMetrics};
use crate::verify::CallbackVerifier;

/// `[metrics]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// `address:port` of the endpoint; unset: no endpoint.
    pub listen: Option<String>,
}

impl MetricsSection {
    /// Every problem of the section, each naming its field.
    pub fn problems(&self) -> Vec<String> {
        match &self.listen {
            Some(l) if l.parse::<SocketAddr>().is_err() => {
                vec![format!("metrics.listen: {l:?} is not an address:port")]
            }
            _ => Vec::new(),
        }
    }

    /// The endpoint's address, if it is on.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.listen.as_deref().and_then(|l| l.parse().ok())
    }
}

/// Longest request head read (request line and headers); beyond, 431 and close.
pub const REQUEST_MAX: usize = 8 * 1024;
/// A scrape must send its request within this, and take its answer within it again.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrapes answered at once; a connection beyond waits for its turn (within the timeout).
pub const SCRAPES_MAX: usize = 8;

/// The OpenMetrics text format's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry of everything `app` counts.
pub fn registry(app: &App) -> Registry {
    let mut r = Registry::default();
    app.server.metrics().register(&mut r);
    r.register(
        "gatekeeper_ban_commit_duration_seconds",
        "Ban order latency, the session's request to its answer (group commit, fsync, kernel)",
        app.bans.commit_seconds().clone(),
    );
    r.register_collector(Box::new(Snapshot {
        server: app.server.clone(),
        bans: app.bans.clone(),
        verifier: app.verifier.clone(),
        cluster: app.cluster.as_ref().map(|c| c.stats().clone()),
    }));
    r
}

/// The registry as text.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("writing to a String cannot fail");
    out
}

/// The counters that live as atomics in the application, read at each scrape.
#[derive(Debug)]
struct Snapshot {
    server: Server,
    bans: BanManager,
    verifier: Option<Arc<CallbackVerifier>>,
    cluster: Option<Arc<crate::cluster::ClusterStats>>,
}

/// One label `NAME="VALUE"`.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Label(&'static str, &'static str);

impl EncodeLabelSet for Label {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelSetEncoder) -> Result<(), std::fmt::Error> {
        [(self.0, self.1)].encode(encoder)
    }
}

type Enc<'a> = DescriptorEncoder<'a>;

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn counter(e: &mut Enc<'_>, name: &str, help: &str, value: u64) -> std::fmt::Result {
    let c = ConstCounter::new(value);
    c.encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(e: &mut Enc<'_>, name: &str, help: &str, value: i64) -> std::fmt::Result {
    let g = ConstGauge::new(value);
    g.encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn labelled(e: &mut Enc<'_>, kind: MetricType, name: &str, help: &str, rows: &[(Label, u64)]) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (label, value) in rows {
        let inner = m.encode_family(label)?;
        match kind {
            MetricType::Counter => ConstCounter::new(*value).encode(inner)?,
            _ => ConstGauge::new(*value as i64).encode(inner)?,
        }
    }
    Ok(())
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = self.server.stats();
        counter(&mut e, "gatekeeper_connections", "Connections accepted by the listener", load(&s.connections))?;
        labelled(
            &mut e,
            MetricType::Counter,
            "gatekeeper_connections_refused",
            "Connections refused by the gate or the caps, by reason (rate: G1 421, banned: G2 554, busy: 421)",
            &[
                (Label("reason", "rate"), load(&s.refused_rate)),
                (Label("reason", "banned"), load(&s.refused_banned)),
                (Label("reason", "busy"), load(&s.refused_busy)),
            ],
        )?;
        counter(
            &mut e,
            "gatekeeper_rate_overflow",
            "Sources accepted although the full in-process G1 table forgot one inside its window",
            load(&s.rate_overflow),
        )?;
        counter(&mut e, "gatekeeper_delivered", "Messages handed off", load(&s.delivered))?;
        counter(
            &mut e,
            "gatekeeper_would_reject",
            "Observe mode: refusals not given (the client got the accepting reply)",
            load(&s.would_reject),
        )?;
        counter(&mut e, "gatekeeper_would_ban", "Observe mode: bans not requested", load(&s.would_ban))?;
        let l = self.server.load();
        gauge(&mut e, "gatekeeper_sessions_active", "Sessions holding a slot now", count(l.sessions))?;
        gauge(
            &mut e,
            "gatekeeper_connections_open",
            "Connections open now, whatever their state",
            count(l.connections),
        )?;
        gauge(&mut e, "gatekeeper_connections_refusing", "Connections being refused now", count(l.refused))?;

        if let Some(tls) = self.server.tls() {
            labelled(
                &mut e,
                MetricType::Counter,
                "gatekeeper_tls_handshakes",
                "STARTTLS handshakes, by result (failed: error or timeout; refused: 454, max_handshakes under way)",
                &[
                    (Label("result", "completed"), load(&tls.completed)),
                    (Label("result", "failed"), load(&tls.failed)),
                    (Label("result", "refused"), load(&tls.refused)),
                ],
            )?;
        }

        let b = self.bans.stats();
        let ban_counters: [(&str, &str, &AtomicU64); 16] = [
            ("gatekeeper_ban_recorded", "Bans recorded (new or extended)", &b.recorded),
            ("gatekeeper_ban_commits", "Group commits of ban orders (database transactions)", &b.commits),
            ("gatekeeper_ban_allowlisted", "Ban orders refused: the network is allowlisted", &b.allowlisted),
            (
                "gatekeeper_ban_backend_failures",
                "Kernel backend operations that failed (each retry counts)",
                &b.backend_failures,
            ),
            (
                "gatekeeper_ban_backend_recovered",
                "Failed backend operations that later succeeded",
                &b.backend_recovered,
            ),
            ("gatekeeper_ban_reapplied", "Bans found missing from the kernel table and re-applied", &b.reapplied),
            (
                "gatekeeper_ban_capacity_warnings",
                "Warnings that an xt_recent table is near or over ip_list_tot",
                &b.capacity_warnings,
            ),
            ("gatekeeper_ban_expired", "Bans expired", &b.expired),
            ("gatekeeper_ban_removed", "Bans lifted by an administrator", &b.removed),
            ("gatekeeper_ban_synced", "Changes picked up from gatekeeper bans", &b.synced),
            (
                "gatekeeper_ban_commit_failures",
                "Ban commits the database refused (each retry counts): an alarm",
                &b.commit_failures,
            ),
            ("gatekeeper_ban_commit_recovered", "Bans committed by a retry after a failed commit", &b.commit_recovered),
            ("gatekeeper_ban_refused_full", "Automatic bans refused: bans.max_active in force", &b.refused_full),
            ("gatekeeper_ban_widened", "IPv6 /48s banned in place of the bans inside them", &b.widened),
            (
                "gatekeeper_ban_clock_steps",
                "Steps of the wall clock the bans were moved with (NTP stepping, a VM resumed)",
                &b.clock_steps,
            ),
            (
                "gatekeeper_ban_order_timeouts",
                "Ban orders a session stopped waiting for (bans.order_timeout)",
                &b.order_timeouts,
            ),
        ];
        for (name, help, c) in ban_counters {
            counter(&mut e, name, help, load(c))?;
        }
        gauge(
            &mut e,
            "gatekeeper_ban_bad_rows",
            "Bad rows skipped by the last full read of the ban database",
            load(&b.bad_rows) as i64,
        )?;
        let st = self.bans.state();
        let family =
            |[v4, v6]: [usize; 2]| [(Label("family", "ipv4"), v4 as u64), (Label("family", "ipv6"), v6 as u64)];
        labelled(
            &mut e,
            MetricType::Gauge,
            "gatekeeper_bans_active",
            "Bans in force, by address family",
            &family(st.active),
        )?;
        gauge(&mut e, "gatekeeper_bans_pending", "Kernel backend operations waiting for a retry", count(st.pending))?;
        gauge(
            &mut e,
            "gatekeeper_bans_unsaved",
            "Bans in force whose commit failed, waiting for a retry: an alarm",
            count(st.unsaved),
        )?;
        if let Some(applied) = st.applied {
            labelled(
                &mut e,
                MetricType::Gauge,
                "gatekeeper_ban_table_entries",
                "Bans written to the kernel's ban tables, by address family (one table each)",
                &family(applied),
            )?;
        }
        if let Some(capacity) = st.capacity {
            gauge(
                &mut e,
                "gatekeeper_ban_table_capacity",
                "Entries one kernel ban table holds before the kernel evicts (xt_recent ip_list_tot)",
                count(capacity),
            )?;
        }

        if let Some(c) = &self.cluster {
            gauge(
                &mut e,
                "gatekeeper_cluster_connected",
                "1 if the cluster store answered the sync's last round, 0 if this node is alone",
                i64::from(c.connected.load(std::sync::atomic::Ordering::Relaxed)),
            )?;
            counter(
                &mut e,
                "gatekeeper_cluster_published",
                "This node's bans, extensions and liftings that entered the shared table",
                load(&c.published),
            )?;
            counter(
                &mut e,
                "gatekeeper_cluster_received",
                "Other nodes' entries read from the shared log",
                load(&c.received),
            )?;
            counter(
                &mut e,
                "gatekeeper_cluster_reconciles",
                "Whole-table reconciles (start, after an outage, new epoch, periodic)",
                load(&c.reconciles),
            )?;
            counter(
                &mut e,
                "gatekeeper_cluster_failures",
                "Rounds of the sync in which the store failed (the node went on alone)",
                load(&c.failures),
            )?;
            counter(
                &mut e,
                "gatekeeper_cluster_applied",
                "Other nodes' bans and liftings that changed this node's bans",
                load(&self.bans.stats().cluster_applied),
            )?;
        }

        if let Some(v) = &self.verifier {
            let v = v.stats();
            counter(
                &mut e,
                "gatekeeper_callback_probes",
                "Callback probes made (MX lookup and SMTP dialogues)",
                load(&v.probes),
            )?;
            counter(&mut e, "gatekeeper_callback_cache_hits", "Callback answers from the cache", load(&v.cache_hits))?;
            counter(
                &mut e,
                "gatekeeper_callback_limited",
                "Callback probes not made because of a limit",
                load(&v.limited),
            )?;
            counter(
                &mut e,
                "gatekeeper_callback_shared",
                "Callback answers from a probe of the same sender already in flight",
                load(&v.shared),
            )?;
            counter(
                &mut e,
                "gatekeeper_callback_allowlisted",
                "Senders in allowlisted domains (not probed)",
                load(&v.allowlisted),
            )?;
            counter(
                &mut e,
                "gatekeeper_callback_connections",
                "MX connections opened by callback probes",
                load(&v.connections),
            )?;
        }
        Ok(())
    }
}

/// Serves `GET /metrics` from `registry` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    tracing::info!(listen = %listener.local_addr()?, "metrics endpoint: GET /metrics");
    let scrapes = Arc::new(tokio::sync::Semaphore::new(SCRAPES_MAX));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (registry, scrapes) = (registry.clone(), scrapes.clone());
                    tokio::spawn(async move {
                        let answer = async {
                            let _turn = scrapes.acquire().await;
                            answer(stream, &registry).await
                        };
                        match tokio::time::timeout(REQUEST_TIMEOUT * 2, answer).await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "metrics request failed"),
                            Err(_) => tracing::debug!(peer = %peer, "metrics request timed out"),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Metrics { head_only: bool },
    NotFound,
    BadMethod,
    Bad,
}

/// Parses the request line of `head` (everything up to the blank line).
fn parse(head: &[u8]) -> Request {
    let Ok(head) = std::str::from_utf8(head) else { return Request::Bad };
    let line = head.split("\r\n").next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Request::Bad;
    }
    let path = target.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => Request::Metrics { head_only: method == "HEAD" },
        ("GET" | "HEAD", _) => Request::NotFound,
        _ => Request::BadMethod,
    }
}

/// Reads one request head (bounded in size and time) and answers it; the connection closes.
async fn answer(mut stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        loop {
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                head.truncate(end);
                return Ok(true);
            }
            if head.len() > REQUEST_MAX {
                return Ok(false);
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before the request"));
            }
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head timeout"))??;
    let (status, content_type, body, head_only) = if !read {
        ("431 Request Header Fields Too Large", "text/plain", "request head too large\n".to_string(), false)
    } else {
        match parse(&head) {
            Request::Metrics { head_only } => ("200 OK", CONTENT_TYPE, render(registry), head_only),
            Request::NotFound => ("404 Not Found", "text/plain", "not found: try /metrics\n".into(), false),
            Request::BadMethod => ("405 Method Not Allowed", "text/plain", "GET /metrics\n".into(), false),
            Request::Bad => ("400 Bad Request", "text/plain", "bad request\n".into(), false),
        }
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        body.len(),
        if status.starts_with("405") { "Allow: GET, HEAD\r\n" } else { "" },
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "response timeout"))?
}

/// Registers the server's families alone (without an application): for tests and tools.
pub fn server_registry(metrics: &ServerMetrics) -> Registry {
    let mut r = Registry::default();
    metrics.register(&mut r);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_strictly() {
        assert_eq!(parse(b"GET /metrics HTTP/1.1\r\nHost: x"), Request::Metrics { head_only: false });
        assert_eq!(parse(b"GET /metrics?x=1 HTTP/1.0"), Request::Metrics { head_only: false });
        assert_eq!(parse(b"HEAD /metrics HTTP/1.1"), Request::Metrics { head_only: true });
        assert_eq!(parse(b"GET / HTTP/1.1"), Request::NotFound);
        assert_eq!(parse(b"POST /metrics HTTP/1.1"), Request::BadMethod);
        assert_eq!(parse(b"GET /metrics"), Request::Bad);
        assert_eq!(parse(b"EHLO x"), Request::Bad);
        assert_eq!(parse(b"\xff\xfe"), Request::Bad);
    }

    #[test]
    fn the_server_families_render_with_their_labels() {
        let m = ServerMetrics::default();
        m.bans.get_or_create(&crate::server::ReasonLabel { reason: "B1" }).inc();
        let text = render(&server_registry(&m));
        assert!(text.contains("gatekeeper_bans_total{reason=\"B1\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE gatekeeper_callback_duration_seconds histogram"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn the_section_names_its_problem() {
        let bad = MetricsSection { listen: Some("localhost".into()) };
        assert_eq!(bad.problems(), ["metrics.listen: \"localhost\" is not an address:port"]);
        assert!(MetricsSection::default().problems().is_empty());
    }
}
