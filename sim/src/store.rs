//! The cluster store as a simulated host (docs/cluster.md, docs/design.md §6: the store is an
//! edge): [`serve`] runs on a turmoil host and keeps what Redis keeps for the cluster (the
//! table of shared bans merged by the same rule, [`gatekeeper::edges::cluster::wins`], the
//! bans' log, heartbeats, the epoch, the callback cache, the B4 counters' log), and
//! [`SimStore`] is the gatekeeper's [`ClusterStore`] reaching it over turmoil TCP, one JSON line
//! per request and per answer, each call bounded by a timeout as the Redis one is. A partition
//! between a gatekeeper host and the store host is then a Redis outage for that node.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatekeeper::edges::cluster::{CountEntry, LogEntry, wins};
use gatekeeper::edges::{BoxFuture, ClusterError, ClusterStore, CountDelta, NodeBeat, SharedBan};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The store's port.
pub const PORT: u16 = 6379;

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Request {
    Publish(SharedBan),
    Follow { cursor: String, max: usize, wait_ms: u64 },
    LogHead,
    Table,
    Purge { nets: Vec<String>, now_ms: i64 },
    Heartbeat(NodeBeat),
    Nodes,
    Epoch(String),
    CacheGet(Vec<String>),
    CachePut { key: String, value: String, ttl_ms: u64 },
    Count(Vec<CountDelta>),
    FollowCounts { cursor: String, max: usize, wait_ms: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Won(bool),
    Log(Vec<LogEntry>),
    Id(String),
    Table(Vec<SharedBan>),
    Count(usize),
    Done,
    Nodes(Vec<NodeBeat>),
    Values(Vec<Option<String>>),
    Counts(Vec<CountEntry>),
}

/// What the store holds.
#[derive(Debug, Default)]
struct State {
    table: BTreeMap<String, SharedBan>,
    log: Vec<SharedBan>,
    nodes: BTreeMap<String, NodeBeat>,
    epoch: Option<String>,
    /// key → (value, expiry on the store's clock).
    cache: BTreeMap<String, (String, tokio::time::Instant)>,
    counts: Vec<CountDelta>,
}

/// The store's state and who waits for its logs.
#[derive(Debug, Default)]
struct Store {
    state: Mutex<State>,
    appended: tokio::sync::Notify,
}

/// Log ids are `N-0`, N the 1-based position; `0-0` is before the first, `$` the end.
fn position(cursor: &str, len: usize) -> usize {
    if cursor == "$" {
        return len;
    }
    cursor.split('-').next().and_then(|n| n.parse().ok()).unwrap_or(0).min(len)
}

impl Store {
    fn answer(&self, req: Request) -> Answer {
        let mut st = self.state.lock().expect("store lock");
        match req {
            Request::Publish(entry) => {
                let won = wins(&entry, st.table.get(&entry.net));
                if won {
                    st.table.insert(entry.net.clone(), entry.clone());
                    st.log.push(entry);
                    self.appended.notify_waiters();
                }
                Answer::Won(won)
            }
            Request::Follow { cursor, max, .. } => {
                let from = position(&cursor, st.log.len());
                let out = st.log[from..]
                    .iter()
                    .take(max)
                    .enumerate()
                    .map(|(i, e)| (format!("{}-0", from + i + 1), Some(e.clone())))
                    .collect();
                Answer::Log(out)
            }
            Request::LogHead => Answer::Id(format!("{}-0", st.log.len())),
            Request::Table => Answer::Table(st.table.values().cloned().collect()),
            Request::Purge { nets, now_ms } => {
                let mut n = 0;
                for net in nets {
                    if st.table.get(&net).is_some_and(|e| e.is_expired(now_ms)) {
                        st.table.remove(&net);
                        n += 1;
                    }
                }
                Answer::Count(n)
            }
            Request::Heartbeat(beat) => {
                st.nodes.insert(beat.node.clone(), beat);
                Answer::Done
            }
            Request::Nodes => Answer::Nodes(st.nodes.values().cloned().collect()),
            Request::Epoch(proposal) => Answer::Id(st.epoch.get_or_insert(proposal).clone()),
            Request::CacheGet(keys) => {
                let now = tokio::time::Instant::now();
                let values = keys
                    .iter()
                    .map(|k| st.cache.get(k).filter(|(_, exp)| *exp > now).map(|(v, _)| v.clone()))
                    .collect();
                Answer::Values(values)
            }
            Request::CachePut { key, value, ttl_ms } => {
                let exp = tokio::time::Instant::now() + Duration::from_millis(ttl_ms);
                st.cache.insert(key, (value, exp));
                Answer::Done
            }
            Request::Count(deltas) => {
                st.counts.extend(deltas);
                self.appended.notify_waiters();
                Answer::Done
            }
            Request::FollowCounts { cursor, max, .. } => {
                let from = position(&cursor, st.counts.len());
                let out = st.counts[from..]
                    .iter()
                    .take(max)
                    .enumerate()
                    .map(|(i, d)| (format!("{}-0", from + i + 1), Some(d.clone())))
                    .collect();
                Answer::Counts(out)
            }
        }
    }

    /// Answers `req`, waiting up to its `wait_ms` for a log entry after its cursor.
    async fn answer_waiting(&self, req: Request) -> Answer {
        let wait = match &req {
            Request::Follow { wait_ms, .. } | Request::FollowCounts { wait_ms, .. } => *wait_ms,
            _ => return self.answer(req),
        };
        // `$` means the end as of the request, not of each look.
        let req = match req {
            Request::Follow { cursor, max, wait_ms } if cursor == "$" => {
                let len = self.state.lock().expect("store lock").log.len();
                Request::Follow { cursor: format!("{len}-0"), max, wait_ms }
            }
            Request::FollowCounts { cursor, max, wait_ms } if cursor == "$" => {
                let len = self.state.lock().expect("store lock").counts.len();
                Request::FollowCounts { cursor: format!("{len}-0"), max, wait_ms }
            }
            other => other,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait);
        loop {
            let notified = self.appended.notified();
            let answer = self.answer(req.clone());
            let empty = match &answer {
                Answer::Log(v) => v.is_empty(),
                Answer::Counts(v) => v.is_empty(),
                _ => false,
            };
            if !empty || tokio::time::Instant::now() >= deadline {
                return answer;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}

/// Runs the store on the current turmoil host until the simulation ends.
pub async fn serve() -> turmoil::Result {
    let store = Arc::new(Store::default());
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let store = store.clone();
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(stream);
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(req) = serde_json::from_str::<Request>(&line) else { return };
                let answer = store.answer_waiting(req).await;
                let mut text = serde_json::to_string(&answer).expect("an answer serialises");
                text.push('\n');
                if w.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The gatekeeper's side: a [`ClusterStore`] on the store host, one connection per call.
#[derive(Debug, Clone)]
pub struct SimStore {
    host: String,
    timeout: Duration,
}

impl SimStore {
    /// The store on `host`; each call gives up after `timeout` (plus its own wait).
    pub fn new(host: &str, timeout: Duration) -> Self {
        SimStore { host: host.to_string(), timeout }
    }

    async fn call(&self, req: Request, wait: Duration) -> Result<Answer, ClusterError> {
        let exchange = async {
            let stream = turmoil::net::TcpStream::connect((self.host.as_str(), PORT)).await?;
            let (r, mut w) = tokio::io::split(stream);
            let mut text = serde_json::to_string(&req).map_err(std::io::Error::other)?;
            text.push('\n');
            w.write_all(text.as_bytes()).await?;
            let mut line = String::new();
            BufReader::new(r).read_line(&mut line).await?;
            serde_json::from_str::<Answer>(&line).map_err(std::io::Error::other)
        };
        match crate::wake::timeout(self.timeout + wait, exchange).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(ClusterError(format!("{}: {e}", self.host))),
            Err(_) => Err(ClusterError(format!("{}: no answer within {:?}", self.host, self.timeout + wait))),
        }
    }
}

fn unexpected(a: Answer) -> ClusterError {
    ClusterError(format!("unexpected answer {a:?}"))
}

impl ClusterStore for SimStore {
    fn publish(&self, entry: SharedBan) -> BoxFuture<'_, Result<bool, ClusterError>> {
        Box::pin(async move {
            match self.call(Request::Publish(entry), Duration::ZERO).await? {
                Answer::Won(w) => Ok(w),
                a => Err(unexpected(a)),
            }
        })
    }

    fn follow(&self, cursor: String, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<LogEntry>, ClusterError>> {
        Box::pin(async move {
            let wait_ms = wait.as_millis() as u64;
            match self.call(Request::Follow { cursor, max, wait_ms }, wait).await? {
                Answer::Log(v) => Ok(v),
                a => Err(unexpected(a)),
            }
        })
    }

    fn log_head(&self) -> BoxFuture<'_, Result<String, ClusterError>> {
        Box::pin(async move {
            match self.call(Request::LogHead, Duration::ZERO).await? {
                Answer::Id(id) => Ok(id),
                a => Err(unexpected(a)),
            }
        })
    }

    fn table(&self) -> BoxFuture<'_, Result<Vec<SharedBan>, ClusterError>> {
        Box::pin(async move {
            match self.call(Request::Table, Duration::ZERO).await? {
                Answer::Table(t) => Ok(t),
                a => Err(unexpected(a)),
            }
        })
    }

    fn purge(&self, nets: Vec<String>, now_ms: i64) -> BoxFuture<'_, Result<usize, ClusterError>> {
        Box::pin(async move {
            match self.call(Request::Purge { nets, now_ms }, Duration::ZERO).await? {
                Answer::Count(n) => Ok(n),
                a => Err(unexpected(a)),
            }
        })
    }

    fn heartbeat(&self, beat: NodeBeat) -> BoxFuture<'_, Result<(), ClusterError>> {
        Box::pin(async move {
            match self.call(Request::Heartbeat(beat), Duration::ZERO).await? {
                Answer::Done => Ok(()),
                a => Err(unexpected(a)),
            }
        })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeBeat>, ClusterError>> {
        Box::pin(async move {
            match self.call(Request::Nodes, Duration::ZERO).await? {
                Answer::Nodes(n) => Ok(n),
                a => Err(unexpected(a)),
            }
        })
    }

    fn epoch(&self, proposal: String) -> BoxFuture<'_, Result<String, ClusterError>> {
        Box::pin(async move {
            match self.call(Request::Epoch(proposal), Duration::ZERO).await? {
                Answer::Id(id) => Ok(id),
                a => Err(unexpected(a)),
            }
        })
    }

    fn cache_get(&self, keys: Vec<String>) -> BoxFuture<'_, Result<Vec<Option<String>>, ClusterError>> {
        Box::pin(async move {
            match self.call(Request::CacheGet(keys), Duration::ZERO).await? {
                Answer::Values(v) => Ok(v),
                a => Err(unexpected(a)),
            }
        })
    }

    fn cache_put(&self, key: String, value: String, ttl: Duration) -> BoxFuture<'_, Result<(), ClusterError>> {
        Box::pin(async move {
            let ttl_ms = ttl.as_millis() as u64;
            match self.call(Request::CachePut { key, value, ttl_ms }, Duration::ZERO).await? {
                Answer::Done => Ok(()),
                a => Err(unexpected(a)),
            }
        })
    }

    fn count(&self, deltas: Vec<CountDelta>) -> BoxFuture<'_, Result<(), ClusterError>> {
        Box::pin(async move {
            match self.call(Request::Count(deltas), Duration::ZERO).await? {
                Answer::Done => Ok(()),
                a => Err(unexpected(a)),
            }
        })
    }

    fn follow_counts(
        &self,
        cursor: String,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<CountEntry>, ClusterError>> {
        Box::pin(async move {
            let wait_ms = wait.as_millis() as u64;
            match self.call(Request::FollowCounts { cursor, max, wait_ms }, wait).await? {
                Answer::Counts(v) => Ok(v),
                a => Err(unexpected(a)),
            }
        })
    }
}
