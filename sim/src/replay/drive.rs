//! The replay itself: the logged sessions, in order of their start, become clients of the
//! simulated gatekeeper — the same assembled application as every scenario's
//! ([`crate::gk::run`]), on the given configuration — that connect at the logged times from
//! the logged addresses, through the kernel model, and say what the log says they said.
//!
//! - Addresses: local recipients and senders are sent as logged (the configuration's directory
//!   decides who exists); an external sender's domain is mapped onto the simulation's remote
//!   pool `replay` (accept-all MXs), since no log says what the real MX would answer a
//!   callback: C1 never proves a replayed sender fake (no B2), and never tempfails one.
//! - Retries: a message the MTA took that the gatekeeper tempfailed, or whose connection it
//!   dropped, is retried from the same address like a Postfix queue (5, 10, 20, 40 min, then
//!   every 66 min) — or after the interval this client showed in the log, when it retried
//!   something the MTA itself had tempfailed. A message the MTA tempfailed is retried as the
//!   log shows (its later sessions); if the gatekeeper took it the first time, the logged retry
//!   does not deliver it twice.
//! - Message contents are not in a log: every replayed message is clean (no V1/B3).
//!
//! Sessions stream from a reader thread through a bounded channel, in batches (a hand-over per
//! session cost a futex wake each, a tenth of the replay): memory follows the log's
//! concurrency, not its length. Per client the replay keeps a few counters ([`Cost`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use gatekeeper::policy::BanReason;
use gatekeeper::proto::Verb;

use super::assemble::{Loc, LoggedSession, Txn};
use super::event::{LOCAL, key_of};
use super::{Format, LineStats, LogReader, input};
use crate::client::{ConnectError, Smtp, connect};
use crate::metrics::Class;
use crate::mta::{self, QUEUE_LIFETIME};
use crate::scenario::Scenario;
use crate::world::{Sabotage, World};

/// What the replay is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The log files (any order: rotated ones are read oldest first).
    pub files: Vec<PathBuf>,
    /// Which program wrote them.
    pub format: Format,
    /// The gatekeeper's configuration file.
    pub config: PathBuf,
    /// The year of year-less timestamps (default: the oldest file's).
    pub year: Option<i64>,
    /// Offset of year-less and zone-less timestamps from UTC, seconds.
    pub utc_offset_secs: i64,
    /// The seed (turmoil's and the callbacks').
    pub seed: u64,
    /// turmoil's tick.
    pub tick: Duration,
    /// How long after the last logged session retries may still run.
    pub drain: Duration,
}

/// Remote sender domains of the replay pool.
const POOL_DOMAINS: u32 = 1000;
/// Longest a replayed session may take.
const SESSION_MAX: Duration = Duration::from_secs(1800);

/// What one client cost the gatekeeper, and what it got.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cost {
    /// Logged sessions.
    pub logged: u32,
    /// Connection attempts in the replay (retries included).
    pub attempts: u32,
    /// Attempts the kernel dropped entirely (G1 or G2).
    pub dropped: u32,
    /// SMTP commands sent.
    pub commands: u32,
    /// 4xx and 5xx replies.
    pub refusals: u32,
    /// Messages the MTA took.
    pub mta_accepted: u32,
    /// ... and the gatekeeper delivered.
    pub delivered: u32,
    /// Bans.
    pub bans: u32,
}

impl Cost {
    /// One number to rank by: what the client made the gatekeeper do.
    pub fn weight(&self) -> u64 {
        u64::from(self.attempts) + u64::from(self.commands) + u64::from(self.refusals)
    }
}

/// A ban and the log lines of the session that earned it.
#[derive(Debug, Clone)]
pub struct BanSeen {
    /// The client.
    pub client: IpAddr,
    /// Why.
    pub reason: BanReason,
    /// When (ms since the epoch).
    pub at_ms: i64,
    /// The lines of the logged session that earned it.
    pub lines: Vec<Loc>,
}

/// A message the MTA took that the gatekeeper did not deliver at once.
#[derive(Debug, Clone)]
pub struct Difference {
    /// The client.
    pub client: IpAddr,
    /// The sender (empty: `<>`).
    pub from: Box<str>,
    /// Recipients the MTA accepted.
    pub rcpts: u32,
    /// When it was logged (ms since the epoch).
    pub at_ms: i64,
    /// The log line of the session.
    pub line: Loc,
    /// What the gatekeeper did: `rejected 550 at RCPT`, `delayed 25 min`, `never delivered`.
    pub what: String,
    /// Honest-looking: the same client got mail from the same sender delivered by the MTA later.
    pub review: bool,
    /// The gatekeeper finally delivered it (after retries).
    pub delayed: bool,
}

/// Everything the replay found, beside the scenario report.
#[derive(Debug, Default)]
pub struct Findings {
    /// Lines read.
    pub lines: LineStats,
    /// Sessions replayed.
    pub sessions: u64,
    /// The log's first and last time.
    pub span_ms: Option<(i64, i64)>,
    /// Logged sessions whose connection the kernel would have dropped: (G1, G2).
    pub dropped: (u64, u64),
    /// Retry connections the kernel dropped: (G1, G2).
    pub retry_dropped: (u64, u64),
    /// Logged sessions the gatekeeper greeted 554 (banned) or 421.
    pub refused_greeting: u64,
    /// Logged sessions let in only after SYN retransmissions (G1, non-sliding).
    pub rate_delayed: u64,
    /// Bans with the lines that earned them.
    pub bans: Vec<BanSeen>,
    /// Messages the MTA took: in all, delivered at once, delayed, rejected, never delivered.
    pub mta_messages: u64,
    /// ... delivered by the gatekeeper in the session the log shows.
    pub same: u64,
    /// ... delivered only after retries.
    pub delayed: u64,
    /// ... refused for good (5xx).
    pub rejected: u64,
    /// ... still undelivered at the end.
    pub undelivered: u64,
    /// Messages the MTA refused that the gatekeeper accepted.
    pub let_in: u64,
    /// The differences (the first [`DIFFERENCES_KEPT`]).
    pub differences: Vec<Difference>,
    /// Differences flagged for review (all counted).
    pub review: u64,
    /// The top clients by cost.
    pub top: Vec<(IpAddr, Cost)>,
    /// Distinct clients.
    pub clients: u64,
    /// Input file names (for `file:line`).
    pub files: Vec<PathBuf>,
    /// Retry connections the replay made for messages the gatekeeper tempfailed.
    pub retries: u64,
    /// Logged retries not replayed because the gatekeeper had delivered the message already.
    pub duplicates_skipped: u64,
}

/// Differences kept with their details.
pub const DIFFERENCES_KEPT: usize = 200;
/// Bans kept with their lines.
pub const BANS_KEPT: usize = 10_000;

/// A pending message of a replayed client: what is still to deliver.
#[derive(Debug, Clone)]
struct Pending {
    id: u64,
    client: IpAddr,
    helo: Box<str>,
    from: Box<str>,
    rcpts: Vec<Box<str>>,
    logged_ms: i64,
    line: Loc,
    first: Duration,
    attempt: u32,
}

#[derive(Debug, Default)]
struct Shared {
    costs: HashMap<IpAddr, Cost>,
    findings: Findings,
    /// (client key, sender, rcpt) the gatekeeper delivered though the MTA tempfailed it: the
    /// log's retry must not deliver it twice.
    delivered_early: HashMap<u64, ()>,
    /// (client key, sender, rcpt) the MTA tempfailed, and when: a later logged session with
    /// the same shows this client's own retry interval.
    mta_tempfailed: HashMap<u64, i64>,
    /// A client's retry interval as the log showed it.
    observed_gap: HashMap<IpAddr, Duration>,
    /// Gatekeeper refusals of MTA-accepted messages, to be checked for review at the end:
    /// (client-sender key, logged ms, index into differences or none).
    to_review: Vec<(u64, i64, Option<usize>)>,
    /// Bans already attributed: ban key → decided at.
    bans_seen: HashMap<IpAddr, Duration>,
    generator_done: bool,
    in_flight: u64,
    /// Messages waiting in a replayed client's queue for their next retry.
    queued: u64,
    /// Those messages, per client: one retry task per client sends them all in one connection,
    /// as an MTA's queue does. What is left at the end is reported.
    queues: std::collections::BTreeMap<IpAddr, Vec<Pending>>,
    next_pending: u64,
    last_start: Duration,
}

struct Ctx {
    world: Arc<World>,
    shared: Mutex<Shared>,
    epoch_ms: i64,
    local: String,
    local_domains: Vec<String>,
    feed: Mutex<Feed>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("epoch_ms", &self.epoch_ms).finish_non_exhaustive()
    }
}

/// What the reader thread learned of the whole log: per (client, sender), when the MTA last
/// took a message (for "honest-looking": delivered later from the same client).
/// `(last, count)`: a message logged at `t` has a later one if `last > t`, or `last == t` with
/// more than one message at `last` (syslog stamps have whole seconds).
/// Keyed by a hash of (client, sender), 8 octets: this map is the replay's one aggregate that
/// grows with the log (with its distinct client-sender pairs, not its lines).
type LaterMap = HashMap<u64, (i64, u32)>;

/// The [`LaterMap`] key of a client and a sender.
fn pair_key(client: IpAddr, sender: &str) -> u64 {
    let c = match client {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    key_of(&[&c, sender.as_bytes()])
}

/// The reader thread's result: line counts, [`LaterMap`], the log's time span.
type ReadResult = (LineStats, LaterMap, Option<(i64, i64)>);

/// The replay's scenario: the configuration file as `[gatekeeper]`, the accept-all pool.
fn scenario(opts: &Options) -> anyhow::Result<crate::scenario::Run> {
    let text = std::fs::read_to_string(&opts.config).map_err(|e| anyhow::anyhow!("{}: {e}", opts.config.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", opts.config.display()))?;
    // What the simulation provides itself (edges), or runs without (TLS, the other front ends).
    for t in ["tls", "postfix_policy", "milter", "metrics", "delivery"] {
        table.remove(t);
    }
    if let Some(toml::Value::Table(server)) = table.get_mut("server") {
        for k in ["listen", "state_dir", "user", "group", "proxy_trusted"] {
            server.remove(k);
        }
    }
    let tick = format!("{}ms", opts.tick.as_millis().max(1));
    let head = format!(
        "seed = {}\nduration = \"1h\"\ndrain = \"0s\"\ntick = \"{tick}\"\n[[remote]]\npool = \"replay\"\ndomains = {POOL_DOMAINS}\nbehaviour = \"accept_all\"\n",
        opts.seed
    );
    let mut s = Scenario::parse(&head, &opts.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    s.name = Some("replay".into());
    s.gatekeeper = table;
    Ok(s.runs(&opts.config, Some(opts.seed)).remove(0))
}

/// Replays the log and reports.
pub fn replay(
    opts: &Options,
    progress: &mut dyn crate::runner::Progress,
) -> anyhow::Result<(crate::report::Report, Findings)> {
    let wall = Instant::now();
    let run = scenario(opts)?;
    let mut cfg = crate::runner::resolve(&run, Sabotage::None).map_err(|e| anyhow::anyhow!("{e}"))?;
    let files = input::order(opts.files.clone());
    let year = opts.year.or_else(|| files.first().and_then(|f| input::mtime_year(f))).unwrap_or(2026);

    // The reader thread: lines → sessions → a bounded channel.
    let (tx, rx) = sync_channel::<Vec<LoggedSession>>(FEED_BATCHES);
    let reader = {
        let (files, format, offset) = (files.clone(), opts.format, opts.utc_offset_secs);
        std::thread::spawn(move || read(files, format, year, offset, tx))
    };
    // The first session fixes the epoch: simulated time 0 is the start of its hour.
    let mut feed = Feed { rx, batch: Vec::new().into_iter() };
    let first = feed.next();
    let Some(first) = first else {
        let (stats, _, span) = reader.join().map_err(|_| anyhow::anyhow!("the log reader panicked"))??;
        anyhow::bail!("no SMTP sessions in the log ({} lines, {} unknown; span {span:?})", stats.lines, stats.unknown);
    };
    let epoch_ms = first.start_ms - first.start_ms.rem_euclid(3_600_000);
    cfg.epoch = UNIX_EPOCH + Duration::from_millis(epoch_ms.max(0) as u64);
    let local = cfg.domain.clone();
    let local_domains = cfg.settings.config.domains.local.clone();
    let tick = cfg.tick;
    let world = World::new(cfg, wall);
    world.state().replay = true;
    let ctx = Arc::new(Ctx {
        world: world.clone(),
        shared: Mutex::new(Shared::default()),
        epoch_ms,
        local,
        local_domains,
        feed: Mutex::new(feed),
    });
    // On tmpfs when there is one, as the scenario runner does: SQLite's fsyncs and the spool's
    // files then cost what they cost on a server's disk cache.
    let shm = std::path::Path::new("/dev/shm");
    let state_dir = match tempfile::Builder::new().prefix("gatekeeper-replay-").tempdir_in(shm) {
        Ok(d) if shm.is_dir() => d,
        _ => tempfile::Builder::new().prefix("gatekeeper-replay-").tempdir()?,
    };
    let wakes = crate::wake::Wakes::install();
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(400 * 86_400))
        .tick_duration(tick)
        .epoch(world.cfg.epoch)
        .rng_seed(opts.seed)
        .tcp_capacity(1 << 16)
        .udp_capacity(1 << 12)
        .build();
    {
        let (w, dir) = (world.clone(), state_dir.path().to_path_buf());
        sim.host("gatekeeper", move || crate::gk::run(w.clone(), dir.clone()));
    }
    {
        let w = world.clone();
        sim.host("dns", move || {
            let w = w.clone();
            async move {
                let IpAddr::V4(mx) = turmoil::lookup("mx") else { unreachable!("turmoil hosts are IPv4") };
                crate::dns::serve(w, mx).await
            }
        });
    }
    {
        let w = world.clone();
        sim.host("mx", move || crate::remote::serve(w.clone()));
    }
    for host in ["spam", "bounce"] {
        sim.host(host, || async {
            std::future::pending::<()>().await;
            Ok(())
        });
    }
    {
        let (c, first) = (ctx.clone(), Mutex::new(Some(first)));
        sim.host("honest", move || {
            let (c, f) = (c.clone(), first.lock().expect("first").take());
            async move {
                generator(c, f).await;
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }
    let drain = opts.drain;
    let mut step: u64 = 0;
    let mut until = Duration::from_secs(3600);
    loop {
        // Quiet time is skipped up to the next timer of the world (a logged session's start, a
        // queue's retry), an hour at most, or the end of the drain.
        let by = crate::runner::quiet_step(&sim, &wakes, tick, until);
        sim.step_by(by).map_err(|e| anyhow::anyhow!("simulation failed at {:?}: {e}", sim.elapsed()))?;
        step += 1;
        let now = sim.elapsed();
        let (done, busy, last) = {
            let s = ctx.shared.lock().expect("shared");
            (s.generator_done, s.in_flight + s.queued, s.last_start)
        };
        if step.is_multiple_of(4096) {
            progress.tick(0.0, now);
        }
        if done && (busy == 0 || now > last + drain) {
            break;
        }
        until = if done { (last + drain).max(now) } else { now + Duration::from_secs(3600) };
    }
    let horizon = sim.elapsed();
    drop(sim);
    let (stats, later, span) = reader.join().map_err(|_| anyhow::anyhow!("the log reader panicked"))??;
    let mut shared = std::mem::take(&mut *ctx.shared.lock().expect("shared"));
    // Honest-looking: the MTA took mail from the same client and sender after this one.
    for (pair, at, diff) in std::mem::take(&mut shared.to_review) {
        if later.get(&pair).is_some_and(|&(last, n)| last > at || (last == at && n > 1)) {
            shared.findings.review += 1;
            if let Some(i) = diff {
                shared.findings.differences[i].review = true;
            }
        }
    }
    // Still queued when the replay ended: not delivered within the drain.
    for p in std::mem::take(&mut shared.queues).into_values().flatten() {
        shared.findings.undelivered += 1;
        let what = format!("still undelivered at the end, after {} retries", p.attempt);
        let i = push_retry_difference(&mut shared.findings, &p, what, false);
        if later
            .get(&pair_key(p.client, &p.from))
            .is_some_and(|&(last, n)| last > p.logged_ms || (last == p.logged_ms && n > 1))
        {
            shared.findings.review += 1;
            if let Some(i) = i {
                shared.findings.differences[i].review = true;
            }
        }
    }
    let mut f = shared.findings;
    f.lines = stats;
    f.span_ms = span;
    f.files = files;
    f.clients = shared.costs.len() as u64;
    let mut top: Vec<(IpAddr, Cost)> = shared.costs.into_iter().collect();
    top.sort_by(|a, b| b.1.weight().cmp(&a.1.weight()).then(a.0.cmp(&b.0)));
    top.truncate(10);
    f.top = top;
    let mut report = crate::runner::report(&world, wall.elapsed());
    // The run's own span, not the placeholder scenario's.
    report.scenario = "replay".into();
    report.file = f.files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ");
    report.description =
        format!("log replay of {} lines ({} sessions) on {}", f.lines.lines, f.sessions, opts.config.display());
    report.setup.duration_h = horizon.as_secs_f64() / 3600.0;
    report.setup.drain_h = 0.0;
    report.metrics.insert("sim_hours".into(), horizon.as_secs_f64() / 3600.0);
    report.timing = crate::report::Timing { steps: step, ..crate::report::Timing::measure(horizon, wall.elapsed()) };
    Ok((report, f))
}

/// Reads the log into sessions and drops them: the parser's own speed and memory (`--parse-only`).
/// Returns the line counts, the sessions and the most sessions held at once.
pub fn parse_only(opts: &Options) -> anyhow::Result<(LineStats, u64, u64)> {
    let files = input::order(opts.files.clone());
    let year = opts.year.or_else(|| files.first().and_then(|f| input::mtime_year(f))).unwrap_or(2026);
    let mut reader = LogReader::new(opts.format, year, opts.utc_offset_secs);
    let mut sessions = 0u64;
    input::read_all(&files, &mut reader, |_| {
        sessions += 1;
        true
    })?;
    Ok((reader.stats, sessions, reader.asm.stats.held_max))
}

/// The reader thread.
fn read(
    files: Vec<PathBuf>,
    format: Format,
    year: i64,
    offset: i64,
    tx: SyncSender<Vec<LoggedSession>>,
) -> anyhow::Result<ReadResult> {
    let mut batch = Vec::with_capacity(FEED_BATCH);
    let mut reader = LogReader::new(format, year, offset);
    let mut later: LaterMap = HashMap::new();
    input::read_all(&files, &mut reader, |s| {
        for t in &s.txns {
            if t.queued && t.accepted().next().is_some() {
                let from = t.from.as_deref().unwrap_or("");
                let e = later.entry(pair_key(s.client, from)).or_insert((s.start_ms, 0));
                if s.start_ms > e.0 {
                    *e = (s.start_ms, 0);
                }
                if s.start_ms == e.0 {
                    e.1 += 1;
                }
            }
        }
        batch.push(s);
        batch.len() < FEED_BATCH || tx.send(std::mem::replace(&mut batch, Vec::with_capacity(FEED_BATCH))).is_ok()
    })?;
    if !batch.is_empty() {
        // The replay may have stopped reading: then nobody wants the rest.
        let _ = tx.send(batch);
    }
    Ok((reader.stats, later, reader.span_ms))
}

/// Sessions per hand-over from the reader thread, and hand-overs the channel holds.
const FEED_BATCH: usize = 256;
const FEED_BATCHES: usize = 16;

/// The receiving end of the reader thread's batches, one session at a time.
struct Feed {
    rx: Receiver<Vec<LoggedSession>>,
    batch: std::vec::IntoIter<LoggedSession>,
}

impl Feed {
    /// The next session in the log's order; `None` once the reader is done.
    fn next(&mut self) -> Option<LoggedSession> {
        loop {
            if let Some(s) = self.batch.next() {
                return Some(s);
            }
            self.batch = self.rx.recv().ok()?.into_iter();
        }
    }
}

/// Spawns each logged session at its time.
async fn generator(ctx: Arc<Ctx>, first: Option<LoggedSession>) {
    let start = tokio::time::Instant::now();
    let base = start - ctx.world.now();
    let mut next = first;
    while let Some(s) = next.take().or_else(|| ctx.feed.lock().expect("feed").next()) {
        let at = Duration::from_millis((s.start_ms - ctx.epoch_ms).max(0) as u64);
        crate::wake::sleep_until(base + at).await;
        {
            let mut sh = ctx.shared.lock().expect("shared");
            sh.in_flight += 1;
            sh.last_start = sh.last_start.max(at);
            sh.findings.sessions += 1;
        }
        let c = ctx.clone();
        tokio::spawn(async move {
            play(&c, s).await;
            c.shared.lock().expect("shared").in_flight -= 1;
        });
    }
    ctx.shared.lock().expect("shared").generator_done = true;
}

/// What the log's session was, for the per-class counters: what the MTA did with it.
fn class_of(s: &LoggedSession, local_domains: &[String]) -> Class {
    let mut class = Class::Prober;
    for t in &s.txns {
        let from = t.from.as_deref().unwrap_or("");
        let took = t.queued && t.accepted().next().is_some();
        let domain = from.rsplit_once('@').map(|x| x.1.to_ascii_lowercase());
        let local = domain.is_some_and(|d| local_domains.iter().any(|l| l.eq_ignore_ascii_case(&d)));
        let c = match (from.is_empty(), took) {
            // A local sender from outside: forged, or a user who should submit (either way
            // not a remote MTA's mail).
            (false, _) if local => Class::ForgedLocal,
            (true, true) => Class::Bounce,
            (false, true) => Class::Honest,
            (true, false) => Class::Backscatter,
            (false, false) if matches!(t.refused, Some((super::event::Stage::Mail, _))) => Class::ForgedLocal,
            (false, false) => Class::Dictionary,
        };
        // The most benign transaction names the session.
        if class == Class::Prober || matches!(c, Class::Honest | Class::Bounce) {
            class = c;
        }
    }
    class
}

fn msg_key(client: IpAddr, from: &str, rcpt: &str) -> u64 {
    let c = client.to_string();
    key_of(&[c.as_bytes(), from.as_bytes(), rcpt.to_ascii_lowercase().as_bytes()])
}

impl Ctx {
    /// The address as the gatekeeper gets it: `{local}` filled in, an external domain mapped
    /// onto the accept-all pool.
    fn sender(&self, from: &str) -> String {
        if from.is_empty() {
            return String::new();
        }
        let from = from.replace(LOCAL, &self.local);
        let Some((localpart, domain)) = from.rsplit_once('@') else { return from };
        if self.local_domains.iter().any(|l| l.eq_ignore_ascii_case(domain)) {
            return from;
        }
        let i = key_of(&[domain.to_ascii_lowercase().as_bytes()]) % u64::from(POOL_DOMAINS);
        let localpart = if localpart.is_empty() { "x" } else { localpart };
        format!("{localpart}@d{i}.replay.remote.test")
    }

    fn rcpt(&self, to: &str) -> String {
        to.replace(LOCAL, &self.local)
    }

    fn ms_of(&self, sim: Duration) -> i64 {
        self.epoch_ms + sim.as_millis() as i64
    }
}

/// How one replayed transaction ended for its MTA-accepted recipients.
enum TxnEnd {
    Delivered,
    Rejected(u16, &'static str),
    Retry,
}

/// Plays one logged session.
async fn play(ctx: &Arc<Ctx>, s: LoggedSession) {
    let w = &ctx.world;
    let class = class_of(&s, &ctx.local_domains);
    let started = w.now();
    {
        let mut sh = ctx.shared.lock().expect("shared");
        let c = sh.costs.entry(s.client).or_default();
        c.logged += 1;
        c.attempts += 1;
        // Observed retries: the MTA tempfailed (client, sender, rcpt) earlier, here it is again.
        for t in &s.txns {
            let from = t.from.as_deref().unwrap_or("");
            for r in &t.rcpts {
                let k = msg_key(s.client, from, &r.addr);
                if let Some(t0) = sh.mta_tempfailed.remove(&k) {
                    let gap = Duration::from_millis((s.start_ms - t0).max(0) as u64);
                    if gap >= Duration::from_secs(60) {
                        sh.observed_gap.insert(s.client, gap);
                    }
                }
                if r.code / 100 == 4 {
                    sh.mta_tempfailed.insert(k, s.start_ms);
                }
            }
        }
    }
    {
        let mut st = w.state();
        st.c.of(class).attempts += 1;
        st.c.of(class).messages += s.txns.iter().filter(|t| t.queued).count() as u64;
    }
    let helo: Box<str> = s.helo.clone().unwrap_or_else(|| format!("[{}]", s.client).into());
    let port = 1024 + (key_of(&[&s.start_ms.to_le_bytes()]) % 60_000) as u16;
    let ends = match connect(w, s.client, port).await {
        Ok(stream) => {
            w.state().c.of(class).sessions += 1;
            // Let in on a SYN retransmission (G1's window, non-sliding): the first one goes 1 s
            // after the SYN; a handshake itself takes up to two ticks.
            let delayed = w.now() - started > Duration::from_secs(1) + 2 * w.cfg.tick;
            let mut smtp = Smtp::new(stream, w.clone(), s.client);
            let r = tokio::time::timeout(SESSION_MAX, dialogue(ctx, &mut smtp, &helo, s.client, &s.txns, class, true))
                .await;
            smtp.quit().await;
            let mut sh = ctx.shared.lock().expect("shared");
            if delayed {
                sh.findings.rate_delayed += 1;
            }
            match r {
                Ok((ends, greeted)) => {
                    if greeted != 220 {
                        sh.findings.refused_greeting += 1;
                    }
                    ends
                }
                Err(_) => s.txns.iter().map(|_| TxnEnd::Retry).collect(),
            }
        }
        Err(e) => {
            let banned = {
                let mut st = w.state();
                let banned = w.ban_live(&st, s.client, w.now());
                let c = st.c.of(class);
                c.gave_up += 1;
                if e == ConnectError::TimedOut {
                    if banned { c.drop_banned += 1 } else { c.drop_rate += 1 }
                }
                banned
            };
            let mut sh = ctx.shared.lock().expect("shared");
            sh.costs.entry(s.client).or_default().dropped += 1;
            if e == ConnectError::TimedOut {
                if banned {
                    sh.findings.dropped.1 += 1;
                } else {
                    sh.findings.dropped.0 += 1;
                }
            }
            s.txns.iter().map(|_| TxnEnd::Retry).collect()
        }
    };
    note_ban(ctx, &s, started, class);
    // What became of the messages the MTA took; retries for those tempfailed.
    let mut retries = Vec::new();
    {
        let mut sh = ctx.shared.lock().expect("shared");
        for (t, end) in s.txns.iter().zip(ends) {
            let took: Vec<Box<str>> = t.accepted().map(|r| r.addr.clone()).collect();
            if !t.queued || took.is_empty() {
                if matches!(end, TxnEnd::Delivered) {
                    sh.findings.let_in += 1;
                }
                continue;
            }
            sh.findings.mta_messages += 1;
            sh.costs.entry(s.client).or_default().mta_accepted += 1;
            let from = t.from.clone().unwrap_or_default();
            match end {
                TxnEnd::Delivered => {
                    sh.findings.same += 1;
                    sh.costs.entry(s.client).or_default().delivered += 1;
                    let mut st = w.state();
                    st.delays_ms.push(0);
                }
                TxnEnd::Rejected(code, stage) => {
                    sh.findings.rejected += 1;
                    let what = format!("rejected {code} at {stage}");
                    let i = push_difference(&mut sh.findings, &s, &from, took.len() as u32, what, false);
                    sh.to_review.push((pair_key(s.client, &from), s.start_ms, i));
                }
                TxnEnd::Retry => retries.push(Pending {
                    id: 0,
                    client: s.client,
                    helo: helo.clone(),
                    from,
                    rcpts: took,
                    logged_ms: s.start_ms,
                    line: s.lines.first().copied().unwrap_or_default(),
                    first: started,
                    attempt: 0,
                }),
            }
        }
    }
    if retries.is_empty() {
        return;
    }
    let spawn = {
        let mut sh = ctx.shared.lock().expect("shared");
        sh.queued += retries.len() as u64;
        let idle = sh.queues.get(&s.client).is_none_or(Vec::is_empty);
        for mut p in retries {
            sh.next_pending += 1;
            p.id = sh.next_pending;
            sh.queues.entry(s.client).or_default().push(p);
        }
        idle
    };
    if spawn {
        let c = ctx.clone();
        let client = s.client;
        tokio::spawn(async move { retry(c, client, class).await });
    }
}

fn push_difference(
    f: &mut Findings,
    s: &LoggedSession,
    from: &str,
    rcpts: u32,
    what: String,
    delayed: bool,
) -> Option<usize> {
    if f.differences.len() >= DIFFERENCES_KEPT {
        return None;
    }
    f.differences.push(Difference {
        client: s.client,
        from: from.into(),
        rcpts,
        at_ms: s.start_ms,
        line: s.lines.first().copied().unwrap_or_default(),
        what,
        review: false,
        delayed,
    });
    Some(f.differences.len() - 1)
}

/// A ban decided during this session: attribute it to the session's log lines.
fn note_ban(ctx: &Ctx, s: &LoggedSession, started: Duration, class: Class) {
    let w = &ctx.world;
    let ban = {
        let st = w.state();
        w.ban_of(&st, s.client).copied()
    };
    let Some(b) = ban else { return };
    if b.at < started {
        return;
    }
    let key = w.ban_key(s.client);
    let mut sh = ctx.shared.lock().expect("shared");
    if sh.bans_seen.get(&key) == Some(&b.at) {
        return;
    }
    // The first ban of this key also counts an address banned; a later one only a ban.
    let first = sh.bans_seen.insert(key, b.at).is_none();
    {
        let mut st = w.state();
        let c = st.c.of(class);
        c.bans += 1;
        if first {
            c.banned_addrs += 1;
        }
    }
    sh.costs.entry(s.client).or_default().bans += 1;
    if sh.findings.bans.len() < BANS_KEPT {
        let at_ms = ctx.ms_of(b.at);
        sh.findings.bans.push(BanSeen { client: s.client, reason: b.reason, at_ms, lines: s.lines.clone() });
    }
}

/// One session's dialogue: per transaction, how it ended for the MTA-accepted recipients;
/// and the greeting's code.
async fn dialogue(
    ctx: &Ctx,
    smtp: &mut Smtp,
    helo: &str,
    client: IpAddr,
    txns: &[Txn],
    class: Class,
    logged: bool,
) -> (Vec<TxnEnd>, u16) {
    let mut ends: Vec<TxnEnd> = Vec::with_capacity(txns.len());
    let fill = |ends: &mut Vec<TxnEnd>, e: fn() -> TxnEnd| {
        while ends.len() < txns.len() {
            ends.push(e());
        }
    };
    let mut commands = 0u32;
    let mut refusals = 0u32;
    let greeting = match smtp.greeting().await {
        Ok(r) => r.code,
        Err(_) => {
            fill(&mut ends, || TxnEnd::Retry);
            return (ends, 0);
        }
    };
    let result = async {
        if greeting != 220 {
            let stage = if greeting == 554 { "connect (banned)" } else { "connect" };
            return Err((greeting, stage));
        }
        commands += 1;
        let r = smtp.cmd(Verb::Ehlo, &format!("EHLO {helo}")).await.map_err(|_| (421, "EHLO"))?;
        if r.code != 250 {
            return Err((r.code, "EHLO"));
        }
        for t in txns {
            let Some(from) = t.from.as_deref() else {
                ends.push(TxnEnd::Retry);
                continue;
            };
            let sender = ctx.sender(from);
            commands += 1;
            let r = smtp.cmd(Verb::Mail, &format!("MAIL FROM:<{sender}>")).await.map_err(|_| (421, "MAIL"))?;
            if r.code != 250 {
                refusals += 1;
                if r.code == 421 {
                    return Err((421, "MAIL"));
                }
                ends.push(if r.code >= 500 { TxnEnd::Rejected(r.code, "MAIL") } else { TxnEnd::Retry });
                commands += 1;
                let _ = smtp.cmd(Verb::Rset, "RSET").await;
                continue;
            }
            let mut accepted = 0;
            let mut worst: Option<u16> = None;
            for rc in &t.rcpts {
                // Only what the log shows the client sent; skip recipients delivered already
                // (a logged retry of what the gatekeeper took the first time).
                let k = msg_key(client, from, &rc.addr);
                if logged && ctx.shared.lock().expect("shared").delivered_early.contains_key(&k) {
                    ctx.shared.lock().expect("shared").findings.duplicates_skipped += 1;
                    continue;
                }
                commands += 1;
                let r = smtp
                    .cmd(Verb::Rcpt, &format!("RCPT TO:<{}>", ctx.rcpt(&rc.addr)))
                    .await
                    .map_err(|_| (421, "RCPT"))?;
                if r.code == 250 {
                    accepted += 1;
                    if rc.code / 100 == 4 {
                        ctx.shared.lock().expect("shared").delivered_early.insert(k, ());
                    }
                } else {
                    refusals += 1;
                    if rc.code / 100 == 2 {
                        worst = Some(worst.map_or(r.code, |w: u16| w.max(r.code)));
                    }
                    if r.code == 421 {
                        return Err((421, "RCPT"));
                    }
                }
            }
            if accepted == 0 {
                ends.push(match worst {
                    Some(c) if c >= 500 => TxnEnd::Rejected(c, "RCPT"),
                    Some(_) => TxnEnd::Retry,
                    None => TxnEnd::Rejected(550, "RCPT"),
                });
                commands += 1;
                let _ = smtp.cmd(Verb::Rset, "RSET").await;
                continue;
            }
            commands += 2;
            let r = smtp.cmd(Verb::Data, "DATA").await.map_err(|_| (421, "DATA"))?;
            if r.code != 354 {
                refusals += 1;
                ends.push(if r.code >= 500 { TxnEnd::Rejected(r.code, "DATA") } else { TxnEnd::Retry });
                if r.code == 421 {
                    return Err((421, "DATA"));
                }
                continue;
            }
            let r = smtp
                .message("Subject: replay\r\nX-Replay: 1\r\n\r\nreplayed\r\n")
                .await
                .map_err(|_| (421, "end of DATA"))?;
            ends.push(match r.code {
                250 => {
                    let now = ctx.world.now();
                    let mut st = ctx.world.state();
                    st.hour(now).delivered += 1;
                    if class.is_mta() {
                        st.c.of(class).delivered += 1;
                    }
                    TxnEnd::Delivered
                }
                c if c >= 500 => {
                    refusals += 1;
                    TxnEnd::Rejected(c, "end of DATA")
                }
                c => {
                    refusals += 1;
                    if c == 421 {
                        return Err((421, "end of DATA"));
                    }
                    TxnEnd::Retry
                }
            });
        }
        Ok(())
    }
    .await;
    if let Err((code, stage)) = result {
        // The session ended here: what is left is retried (4xx) or refused (5xx).
        while ends.len() < txns.len() {
            ends.push(if code >= 500 { TxnEnd::Rejected(code, stage) } else { TxnEnd::Retry });
        }
        if code != 220 {
            refusals += 1;
        }
    }
    {
        let mut sh = ctx.shared.lock().expect("shared");
        let c = sh.costs.entry(client).or_default();
        c.commands += commands;
        c.refusals += refusals;
    }
    fill(&mut ends, || TxnEnd::Retry);
    (ends, greeting)
}

/// The queue of a replayed client: messages the MTA took and the gatekeeper tempfailed (or
/// never saw), retried together in one connection from the same address, like an MTA's queue,
/// at the interval this client showed in the log, else on Postfix's backoff. Runs while the
/// client's queue holds anything.
async fn retry(ctx: Arc<Ctx>, client: IpAddr, class: Class) {
    let w = ctx.world.clone();
    let mut attempt: u32 = 0;
    loop {
        let gap = ctx.shared.lock().expect("shared").observed_gap.get(&client).copied();
        let backoff = gap.unwrap_or_else(|| mta::backoff(attempt));
        attempt += 1;
        crate::wake::sleep(backoff).await;
        let now = w.now();
        // Messages past the queue lifetime are given up; the rest go in one connection.
        let msgs: Vec<Pending> = {
            let mut sh = ctx.shared.lock().expect("shared");
            let queue = sh.queues.remove(&client).unwrap_or_default();
            let (expired, live): (Vec<Pending>, Vec<Pending>) =
                queue.into_iter().partition(|p| now - p.first > QUEUE_LIFETIME);
            for p in expired {
                sh.queued -= 1;
                sh.findings.undelivered += 1;
                let i = push_retry_difference(&mut sh.findings, &p, "never delivered (queue lifetime)".into(), false);
                sh.to_review.push((pair_key(p.client, &p.from), p.logged_ms, i));
            }
            if live.is_empty() {
                return;
            }
            sh.queues.insert(client, live.clone());
            sh.findings.retries += 1;
            sh.costs.entry(client).or_default().attempts += 1;
            sh.in_flight += 1;
            live
        };
        let mut msgs = msgs;
        for p in &mut msgs {
            p.attempt += 1;
        }
        let tried: Vec<u64> = msgs.iter().map(|p| p.id).collect();
        w.state().c.of(class).deferrals += 1;
        let port = 1024 + (key_of(&[&msgs[0].logged_ms.to_le_bytes(), &attempt.to_le_bytes()]) % 60_000) as u16;
        let txns: Vec<Txn> = msgs
            .iter()
            .map(|p| Txn {
                from: Some(p.from.clone()),
                rcpts: p.rcpts.iter().map(|r| super::assemble::Rcpt { addr: r.clone(), code: 250 }).collect(),
                queued: true,
                ..Txn::default()
            })
            .collect();
        let ends: Vec<TxnEnd> = match connect(&w, client, port).await {
            Ok(stream) => {
                let mut smtp = Smtp::new(stream, w.clone(), client);
                let helo = msgs[0].helo.clone();
                let r =
                    tokio::time::timeout(SESSION_MAX, dialogue(&ctx, &mut smtp, &helo, client, &txns, class, false))
                        .await;
                smtp.quit().await;
                r.map(|(e, _)| e).unwrap_or_else(|_| txns.iter().map(|_| TxnEnd::Retry).collect())
            }
            Err(e) => {
                let banned = {
                    let mut st = w.state();
                    let banned = w.ban_live(&st, client, w.now());
                    if e == ConnectError::TimedOut {
                        let c = st.c.of(class);
                        if banned { c.drop_banned += 1 } else { c.drop_rate += 1 }
                    }
                    banned
                };
                let mut sh = ctx.shared.lock().expect("shared");
                sh.costs.entry(client).or_default().dropped += 1;
                if e == ConnectError::TimedOut {
                    if banned { sh.findings.retry_dropped.1 += 1 } else { sh.findings.retry_dropped.0 += 1 }
                }
                drop(sh);
                txns.iter().map(|_| TxnEnd::Retry).collect()
            }
        };
        let mut sh = ctx.shared.lock().expect("shared");
        sh.in_flight -= 1;
        let mut left = Vec::new();
        for (p, end) in msgs.into_iter().zip(ends) {
            match end {
                TxnEnd::Retry => {
                    left.push(p);
                    continue;
                }
                TxnEnd::Delivered => {
                    let delay = w.now() - p.first;
                    sh.findings.delayed += 1;
                    sh.costs.entry(client).or_default().delivered += 1;
                    w.state().delays_ms.push(delay.as_millis() as u64);
                    let what = format!("delayed {} by {} retries", crate::fmt::secs(delay.as_secs_f64()), p.attempt);
                    let i = push_retry_difference(&mut sh.findings, &p, what, true);
                    sh.to_review.push((pair_key(p.client, &p.from), p.logged_ms, i));
                }
                TxnEnd::Rejected(code, stage) => {
                    sh.findings.rejected += 1;
                    let what = format!("rejected {code} at {stage} on retry {}", p.attempt);
                    let i = push_retry_difference(&mut sh.findings, &p, what, false);
                    sh.to_review.push((pair_key(p.client, &p.from), p.logged_ms, i));
                }
            }
            sh.queued -= 1;
        }
        // Messages queued by sessions that ran meanwhile are in the queue beside the ones just
        // tried: keep those, and the tried ones still to retry (with their attempt counts).
        let queue = sh.queues.remove(&client).unwrap_or_default();
        let mut next = left;
        let tried: std::collections::BTreeSet<u64> = tried.into_iter().collect();
        next.extend(queue.into_iter().filter(|p| !tried.contains(&p.id)));
        if next.is_empty() {
            return;
        }
        sh.queues.insert(client, next);
    }
}

fn push_retry_difference(f: &mut Findings, p: &Pending, what: String, delayed: bool) -> Option<usize> {
    if f.differences.len() >= DIFFERENCES_KEPT {
        return None;
    }
    f.differences.push(Difference {
        client: p.client,
        from: p.from.clone(),
        rcpts: p.rcpts.len() as u32,
        at_ms: p.logged_ms,
        line: p.line,
        what,
        review: false,
        delayed,
    });
    Some(f.differences.len() - 1)
}
