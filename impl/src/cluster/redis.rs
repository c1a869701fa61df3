//! [`RedisStore`]: the production [`ClusterStore`], on Redis (the `redis` crate on tokio,
//! rustls for `rediss://`).
//!
//! Keys, under `[cluster] prefix` (`gatekeeper` by default):
//!
//! - `PREFIX:bans`: a hash, network → encoded [`SharedBan`] (the table);
//! - `PREFIX:bans:log`: a stream of the entries that changed the table (fields `net`,
//!   `entry`, `node`), trimmed to about `log_max` entries;
//! - `PREFIX:nodes`: a hash, node → its last [`NodeBeat`] as JSON;
//! - `PREFIX:cb:KEY`: the shared callback cache, one string per entry, expiring by itself;
//! - `PREFIX:b4:log`: a stream of B4 deltas (field `delta`, JSON), trimmed like the bans' log;
//! - `PREFIX:epoch`: set once by the first node that finds it missing; a Redis that lost its
//!   data (restarted without persistence) has none, which tells the nodes to publish again.
//!
//! The merge rule ([`crate::edges::cluster::wins`]) runs inside Redis as a Lua script, so that
//! a read-compare-write of two nodes cannot interleave. Two connections, each re-established
//! by the `redis` crate's connection manager after a failure: one for commands, one for the
//! blocking log read (which would hold up the commands queued behind it on a shared,
//! multiplexed connection), and one more for the counters' log. Every call is bounded by
//! `[cluster] timeout`.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamReadReply;
use redis::{Client, IntoConnectionInfo, Script, TlsCertificates};

use super::ClusterSection;
use super::config::redact;
use crate::edges::cluster::{CountEntry, LogEntry};
use crate::edges::{BoxFuture, ClusterError, ClusterStore, CountDelta, NodeBeat, SharedBan};

/// The merge rule of [`crate::edges::cluster::wins`], in Lua. KEYS: table, log. ARGV: net,
/// encoded entry, node, log_max. Returns 1 if the entry won (and was logged), else 0.
const PUBLISH: &str = r"
local function head(v)
  local kind, exp, at = string.match(v, '^(%a+) (%-?%d+) (%-?%d+) ')
  return kind, tonumber(exp), tonumber(at)
end
local nk, ne, na = head(ARGV[2])
if not nk then return redis.error_reply('gatekeeper: bad entry') end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local ok, oe, oa = head(old)
  if ok then
    local win
    if nk == 'ban' and ok == 'ban' then win = ne > oe
    elseif nk == 'ban' then win = na > oa
    elseif ok == 'ban' then win = na >= oa
    else win = na > oa end
    if not win then return 0 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'net', ARGV[1], 'entry', ARGV[2], 'node', ARGV[3])
return 1
";

/// Deletes the table entries of ARGV[2..] still expired at ARGV[1] (unix ms).
const PURGE: &str = r"
local n = 0
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  if v then
    local exp = tonumber(string.match(v, '^%a+ (%-?%d+) '))
    if exp and exp <= tonumber(ARGV[1]) then
      redis.call('HDEL', KEYS[1], ARGV[i])
      n = n + 1
    end
  end
end
return n
";

/// The production cluster store.
pub struct RedisStore {
    commands: ConnectionManager,
    reader: ConnectionManager,
    counts_reader: ConnectionManager,
    timeout: Duration,
    url: String,
    log_max: u64,
    table: String,
    log: String,
    nodes: String,
    epoch: String,
    prefix: String,
    counts: String,
    publish: Script,
    purge: Script,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore").field("url", &self.url).field("table", &self.table).finish_non_exhaustive()
    }
}

fn err(e: impl fmt::Display) -> ClusterError {
    ClusterError(e.to_string())
}

impl RedisStore {
    /// The store `section` names. Connects lazily (on the first call, and again after a
    /// failure): a Redis that is down at start is no error. Call inside a tokio runtime.
    pub fn new(section: &ClusterSection) -> Result<RedisStore, ClusterError> {
        let url = section.redis.trim();
        let mut info = url.into_connection_info().map_err(err)?;
        if let Some(path) = &section.password_file {
            let pw = std::fs::read_to_string(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
            let settings = info.redis_settings().clone().set_password(pw.trim_end_matches(['\r', '\n']));
            info = info.set_redis_settings(settings);
        }
        let client = if section.tls() {
            let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| err(format!("{}: {e}", p.display())));
            let root_cert = section.ca_file.as_deref().map(read).transpose()?;
            let client_tls = match (&section.cert_file, &section.key_file) {
                (Some(c), Some(k)) => Some(redis::ClientTlsConfig { client_cert: read(c)?, client_key: read(k)? }),
                _ => None,
            };
            Client::build_with_tls(info, TlsCertificates { client_tls, root_cert }).map_err(err)?
        } else {
            Client::open(info).map_err(err)?
        };
        let config = |response: Duration| {
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(section.timeout))
                .set_response_timeout(Some(response))
                .set_number_of_retries(1)
                .set_max_delay(section.timeout)
        };
        let commands = ConnectionManager::new_lazy_with_config(client.clone(), config(section.timeout)).map_err(err)?;
        // The log read blocks up to `sync_interval` by design.
        let reader =
            ConnectionManager::new_lazy_with_config(client.clone(), config(section.timeout + section.sync_interval))
                .map_err(err)?;
        let counts_reader =
            ConnectionManager::new_lazy_with_config(client, config(section.timeout + section.sync_interval))
                .map_err(err)?;
        let p = &section.prefix;
        Ok(RedisStore {
            commands,
            reader,
            counts_reader,
            timeout: section.timeout,
            url: redact(url),
            log_max: section.log_max,
            table: format!("{p}:bans"),
            log: format!("{p}:bans:log"),
            nodes: format!("{p}:nodes"),
            epoch: format!("{p}:epoch"),
            prefix: p.clone(),
            counts: format!("{p}:b4:log"),
            publish: Script::new(PUBLISH),
            purge: Script::new(PURGE),
        })
    }

    /// Runs `f` within `wait`: a store that does not answer is an error, never a hang.
    async fn bounded<T>(
        &self,
        wait: Duration,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        match tokio::time::timeout(wait, f).await {
            Ok(r) => r.map_err(|e| ClusterError(format!("{}: {e}", self.url))),
            Err(_) => Err(ClusterError(format!("{}: no answer within {wait:?}", self.url))),
        }
    }
}

impl ClusterStore for RedisStore {
    fn publish(&self, entry: SharedBan) -> BoxFuture<'_, Result<bool, ClusterError>> {
        Box::pin(async move {
            let mut con = self.commands.clone();
            let mut call = self.publish.key(&self.table);
            call.key(&self.log).arg(&entry.net).arg(entry.encode()).arg(&entry.node).arg(self.log_max);
            let won: i64 = self.bounded(self.timeout, call.invoke_async(&mut con)).await?;
            Ok(won == 1)
        })
    }

    fn publish_many(&self, entries: Vec<SharedBan>) -> BoxFuture<'_, Result<Vec<bool>, ClusterError>> {
        Box::pin(async move {
            if entries.is_empty() {
                return Ok(Vec::new());
            }
            let mut con = self.commands.clone();
            // One pipeline: the script loaded (a no-op when it is; Redis may have restarted
            // empty), then one EVALSHA per entry, each atomic, in order.
            let mut pipe = redis::pipe();
            pipe.cmd("SCRIPT").arg("LOAD").arg(PUBLISH).ignore();
            for e in &entries {
                pipe.cmd("EVALSHA").arg(self.publish.get_hash()).arg(2).arg(&self.table).arg(&self.log);
                pipe.arg(&e.net).arg(e.encode()).arg(&e.node).arg(self.log_max);
            }
            let won: Vec<i64> = self.bounded(self.timeout, pipe.query_async(&mut con)).await?;
            Ok(won.into_iter().map(|w| w == 1).collect())
        })
    }

    fn follow(&self, cursor: String, max: usize, wait: Duration) -> BoxFuture<'_, Result<Vec<LogEntry>, ClusterError>> {
        Box::pin(async move {
            let mut con = self.reader.clone();
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(max.max(1)).arg("BLOCK").arg(wait.as_millis() as u64).arg("STREAMS");
            cmd.arg(&self.log).arg(&cursor);
            let reply: Option<StreamReadReply> = self.bounded(self.timeout + wait, cmd.query_async(&mut con)).await?;
            let mut out = Vec::new();
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                for id in key.ids {
                    let entry = id.get::<String>("entry").and_then(|s| SharedBan::decode(&s));
                    out.push((id.id, entry));
                }
            }
            Ok(out)
        })
    }

    fn log_head(&self) -> BoxFuture<'_, Result<String, ClusterError>> {
        Box::pin(async move {
            let mut con = self.commands.clone();
            let mut cmd = redis::cmd("XREVRANGE");
            cmd.arg(&self.log).arg("+").arg("-").arg("COUNT").arg(1);
            let reply: redis::streams::StreamRangeReply = self.bounded(self.timeout, cmd.query_async(&mut con)).await?;
            Ok(reply.ids.into_iter().next().map_or_else(|| "0-0".to_string(), |id| id.id))
        })
    }

    fn table(&self) -> BoxFuture<'_, Result<Vec<SharedBan>, ClusterError>> {
        Box::pin(async move {
            let mut con = self.commands.clone();
            let mut out = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let mut cmd = redis::cmd("HSCAN");
                cmd.arg(&self.table).arg(cursor).arg("COUNT").arg(1000);
                let (next, pairs): (u64, Vec<String>) = self.bounded(self.timeout, cmd.query_async(&mut con)).await?;
                out.extend(pairs.chunks(2).filter_map(|kv| kv.get(1).and_then(|v| SharedBan::decode(v))));
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            Ok(out)
        })
    }

    fn purge(&self, nets: Vec<String>, now_ms: i64) -> BoxFuture<'_, Result<usize, ClusterError>> {
        Box::pin(async move {
            if nets.is_empty() {
                return Ok(0);
            }
            let mut con = self.commands.clone();
            let mut n = 0;
            for chunk in nets.chunks(500) {
                let mut call = self.purge.key(&self.table);
                call.arg(now_ms);
                for net in chunk {
                    call.arg(net);
                }
                let gone: i64 = self.bounded(self.timeout, call.invoke_async(&mut con)).await?;
                n += gone as usize;
            }
            Ok(n)
        })
    }

    fn heartbeat(&self, beat: NodeBeat) -> BoxFuture<'_, Result<(), ClusterError>> {
        Box::pin(async move {
            let mut con = self.commands.clone();
            let json = serde_json::to_string(&beat).map_err(err)?;
            let mut cmd = redis::cmd("HSET");
            cmd.arg(&self.nodes).arg(&beat.node).arg(json);
            let _: i64 = self.bounded(self.timeout, cmd.query_async(&mut con)).await?;
            Ok(())
        })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeBeat>, ClusterError>> {
        Box::pin(async move {
            let mut con = self.commands.clone();
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(&self.nodes);
            let pairs: Vec<String> = self.bounded(self.timeout, cmd.query_async(&mut con)).await?;
            let mut out: Vec<NodeBeat> =
                pairs.chunks(2).filter_map(|kv| kv.get(1).and_then(|v| serde_json::from_str(v).ok())).collect();
            out.sort_by(|a, b| a.node.cmp(&b.node));
            Ok(out)
        })
    }

    fn epoch(&self, fresh: String) -> BoxFuture<'_, Result<String, ClusterError>> {
        Box::pin(async move {
            let mut con = self.commands.clone();
            // SET NX then GET: the first node to find it missing names the epoch for all.
            let mut set = redis::cmd("SET");
            set.arg(&self.epoch).arg(&fresh).arg("NX");
            let _: Option<String> = self.bounded(self.timeout, set.query_async(&mut con)).await?;
            let mut get = redis::cmd("GET");
            get.arg(&self.epoch);
            let epoch: Option<String> = self.bounded(self.timeout, get.query_async(&mut con)).await?;
            Ok(epoch.unwrap_or(fresh))
        })
    }

    fn cache_get(&self, keys: Vec<String>) -> BoxFuture<'_, Result<Vec<Option<String>>, ClusterError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let mut con = self.commands.clone();
            let mut cmd = redis::cmd("MGET");
            for k in &keys {
                cmd.arg(format!("{}:cb:{k}", self.prefix));
            }
            self.bounded(self.timeout, cmd.query_async(&mut con)).await
        })
    }

    fn cache_put(&self, key: String, value: String, ttl: Duration) -> BoxFuture<'_, Result<(), ClusterError>> {
        Box::pin(async move {
            let mut con = self.commands.clone();
            let mut cmd = redis::cmd("SET");
            cmd.arg(format!("{}:cb:{key}", self.prefix)).arg(value).arg("PX").arg(ttl.as_millis().max(1) as u64);
            let _: Option<String> = self.bounded(self.timeout, cmd.query_async(&mut con)).await?;
            Ok(())
        })
    }

    fn count(&self, deltas: Vec<CountDelta>) -> BoxFuture<'_, Result<(), ClusterError>> {
        Box::pin(async move {
            if deltas.is_empty() {
                return Ok(());
            }
            let mut con = self.commands.clone();
            let mut pipe = redis::pipe();
            for d in &deltas {
                let json = serde_json::to_string(d).map_err(err)?;
                pipe.cmd("XADD").arg(&self.counts).arg("MAXLEN").arg("~").arg(self.log_max).arg("*");
                pipe.arg("delta").arg(json).ignore();
            }
            let () = self.bounded(self.timeout, pipe.query_async(&mut con)).await?;
            Ok(())
        })
    }

    fn follow_counts(
        &self,
        cursor: String,
        max: usize,
        wait: Duration,
    ) -> BoxFuture<'_, Result<Vec<CountEntry>, ClusterError>> {
        Box::pin(async move {
            let mut con = self.counts_reader.clone();
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT").arg(max.max(1)).arg("BLOCK").arg(wait.as_millis() as u64).arg("STREAMS");
            cmd.arg(&self.counts).arg(&cursor);
            let reply: Option<StreamReadReply> = self.bounded(self.timeout + wait, cmd.query_async(&mut con)).await?;
            let mut out = Vec::new();
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                for id in key.ids {
                    let delta = id.get::<String>("delta").and_then(|s| serde_json::from_str(&s).ok());
                    out.push((id.id, delta));
                }
            }
            Ok(out)
        })
    }
}
