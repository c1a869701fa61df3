//! The cluster (issue 15) end to end: two `gatekeeper serve` processes (the real binary) on
//! loopback sharing one real `redis-server` (Debian's, started here on a free port with a
//! temporary directory and no persistence): a ban decided on one node is refused with 554 by
//! the other within 2 s; with Redis stopped both keep serving and banning, and once it is back
//! (empty) both directions converge; a node killed with -9 catches up when restarted; `bans
//! add|remove` reach the other node; Redis with a password and TLS (a CA made here with rcgen),
//! configured as an administrator would; the B4 counters and the callback cache shared, with
//! a local fallback. And the store's server-side merge script against
//! [`gatekeeper::edges::cluster::wins`].
//!
//! Without `redis-server` each test prints `SKIP` and returns; with `GATEKEEPER_REQUIRE_TOOLS=1`
//! it fails instead (`ci/install-redis.sh` installs it).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gatekeeper::cluster::{ClusterSection, RedisStore};
use gatekeeper::edges::cluster::wins;
use gatekeeper::edges::{ClusterStore, SharedBan};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_gatekeeper");

fn redis_server() -> Option<PathBuf> {
    let found =
        ["/usr/bin/redis-server", "/usr/local/bin/redis-server"].into_iter().map(PathBuf::from).find(|p| p.exists());
    if found.is_none() {
        let why = "redis-server not installed (ci/install-redis.sh)";
        if std::env::var_os("GATEKEEPER_REQUIRE_TOOLS").is_some_and(|v| v != "0") {
            panic!("{why}; GATEKEEPER_REQUIRE_TOOLS is set");
        }
        println!("SKIP {why}");
        eprintln!("SKIP {why}");
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// TLS material for a `rediss://` Redis: a CA, and a server certificate for 127.0.0.1 it signed.
struct Tls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_tls(dir: &Path) -> Tls {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "gatekeeper test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &ca).unwrap();
    let tls = Tls { ca: dir.join("ca.pem"), cert: dir.join("redis.pem"), key: dir.join("redis.key") };
    std::fs::write(&tls.ca, ca.pem()).unwrap();
    std::fs::write(&tls.cert, cert.pem()).unwrap();
    std::fs::write(&tls.key, key.serialize_pem()).unwrap();
    tls
}

/// A redis-server of our own; killed when dropped.
struct Redis {
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
    password: Option<String>,
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    child: Option<Child>,
}

impl Redis {
    fn start(bin: PathBuf, dir: &Path, password: Option<&str>, tls: Option<&Tls>) -> Redis {
        let dir = dir.join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = Redis {
            bin,
            port: free_port(),
            dir,
            password: password.map(str::to_string),
            tls: tls.map(|t| (t.ca.clone(), t.cert.clone(), t.key.clone())),
            child: None,
        };
        r.restart();
        r
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        let auth = self.password.as_ref().map(|p| format!(":{p}@")).unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}", self.port)
    }

    /// (Re)starts it on the same port, empty (no persistence: `--save ''`).
    fn restart(&mut self) {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir"]).arg(&self.dir);
        match &self.tls {
            Some((ca, cert, key)) => {
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string(), "--tls-cert-file"]).arg(cert);
                cmd.arg("--tls-key-file").arg(key).arg("--tls-ca-cert-file").arg(ca);
                cmd.args(["--tls-auth-clients", "no"]);
            }
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
        }
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One `gatekeeper serve` process; killed when dropped.
struct Node {
    name: String,
    config: PathBuf,
    addr: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
}

/// The `[cluster]` table of a node of `redis`, with short intervals for the test.
fn cluster_table(redis: &Redis, node: &str, extra: &str) -> String {
    format!(
        "[cluster]\nredis = \"{}\"\nnode = \"{node}\"\nprefix = \"gk-test\"\ntimeout = \"300ms\"\nsync_interval = \"250ms\"\n\
         heartbeat_interval = \"500ms\"\nreconcile_interval = \"3s\"\n{extra}",
        redis.url()
    )
}

impl Node {
    fn start(dir: &Path, name: &str, cluster: &str) -> Node {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = format!(
            "[server]\nlisten = \"{addr}\"\nhostname = \"{name}.example.test\"\nstate_dir = \"{}\"\n\
             shutdown_grace = \"100ms\"\n[domains]\nlocal = [\"example.test\"]\nusers = [\"alice@example.test\"]\n\
             [bans]\nsync_interval = \"100ms\"\n{cluster}",
            home.join("state").display()
        );
        let config = home.join("gatekeeper.toml");
        std::fs::write(&config, text).unwrap();
        let mut node = Node { name: name.into(), config, addr, log: home.join("log"), child: None };
        node.restart();
        node
    }

    fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(self.addr).is_err() {
            assert!(Instant::now() < deadline, "{} did not listen; log:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `gatekeeper ARGS --config <this node's>`.
    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out =
            Command::new(BIN).args(args).arg("--config").arg(&self.config).env("RUST_LOG", "warn").output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// The first line of the greeting a client at `source` gets.
    async fn greeting(&self, source: &str) -> String {
        dialogue(self.addr, source, &[]).await.remove(0)
    }

    /// A forged local sender from `source`: 550 and a B1 ban.
    async fn forge(&self, source: &str) {
        let r = dialogue(self.addr, source, &["EHLO client.test", "MAIL FROM:<nobody@example.test>"]).await;
        assert!(r[2].starts_with("550 5.7.1"), "{}: {r:?}", self.name);
    }

    /// True if `source` is banned here (in the node's database, as `bans list` shows).
    fn lists(&self, source: &str) -> bool {
        let (ok, out) = self.cli(&["bans", "list"]);
        assert!(ok, "{out}");
        out.lines().any(|l| l.starts_with(&format!("{source} ")))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects from `source`, sends `lines`, returns every reply's first line.
async fn dialogue(server: SocketAddr, source: &str, lines: &[&str]) -> Vec<String> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
    let stream = socket.connect(server).await.unwrap();
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut replies = Vec::new();
    let read = async |r: &mut BufReader<_>| {
        let mut first = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line)).await.unwrap().unwrap_or(0);
            if first.is_empty() {
                first = line.trim_end().to_string();
            }
            if n == 0 || line.as_bytes().get(3) != Some(&b'-') {
                return first;
            }
        }
    };
    replies.push(read(&mut r).await);
    for l in lines {
        if replies.last().is_some_and(|r| r.is_empty()) {
            break;
        }
        w.write_all(format!("{l}\r\n").as_bytes()).await.unwrap();
        replies.push(read(&mut r).await);
    }
    replies
}

/// Waits up to `within` for `node` to answer `source` with 554; returns how long it took.
async fn refused_within(node: &Node, source: &str, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let g = node.greeting(source).await;
        if g.starts_with("554 ") {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{} still answers {source} {g:?} after {within:?}; log:\n{}",
            node.name,
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to `within` for `f`.
async fn eventually(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_on_one_node_is_refused_by_the_other_within_2s_and_the_cli_reaches_both() {
    let Some(bin) = redis_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(bin, dir.path(), None, None);
    let a = Node::start(dir.path(), "mx1", &cluster_table(&redis, "mx1", ""));
    let metrics = format!("127.0.0.1:{}", free_port());
    let b = Node::start(
        dir.path(),
        "mx2",
        &format!("{}[metrics]\nlisten = \"{metrics}\"\n", cluster_table(&redis, "mx2", "")),
    );
    assert!(b.greeting("127.0.0.81").await.starts_with("220 "));
    a.forge("127.0.0.81").await;
    let took = refused_within(&b, "127.0.0.81", Duration::from_secs(2)).await;
    eprintln!("ban propagation mx1 -> mx2: {took:?}");
    assert!(b.lists("127.0.0.81"), "applied through mx2's ban manager, so in its database");
    let scrape = {
        use std::io::{Read, Write};
        let mut c = TcpStream::connect(&metrics).unwrap();
        c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        text
    };
    for line in [
        "gatekeeper_cluster_connected 1",
        "gatekeeper_cluster_applied_total 1",
        "gatekeeper_cluster_reconciles_total 1",
    ] {
        assert!(scrape.lines().any(|l| l == line), "{line:?} missing in\n{scrape}");
    }

    // `bans add` on mx2 (another process beside its server) reaches mx1.
    let (ok, out) = b.cli(&["bans", "add", "127.0.0.82", "--for", "10m", "--reason", "seen in logs"]);
    assert!(ok, "{out}");
    refused_within(&a, "127.0.0.82", Duration::from_secs(3)).await;
    // `bans remove` on mx1 lifts it on mx2 too; and the B1 ban mx1 decided.
    for net in ["127.0.0.82", "127.0.0.81"] {
        let (ok, out) = a.cli(&["bans", "remove", net]);
        assert!(ok, "{out}");
        eventually(&format!("mx2 lifts {net}"), Duration::from_secs(3), || !b.lists(net)).await;
    }
    assert!(!a.greeting("127.0.0.82").await.starts_with("554 "));

    // `cluster status`: both nodes seen, in sync.
    eventually("cluster status in sync", Duration::from_secs(5), || {
        let (ok, out) = a.cli(&["cluster", "status"]);
        ok && out.contains("bans: in sync")
    })
    .await;
    let (_, out) = a.cli(&["cluster", "status"]);
    for needle in ["mx1 ", "mx2 ", "(this node)", "shared table: 0 ban(s) in force, 2 lifting(s) kept"] {
        assert!(out.contains(needle), "{needle:?} missing in\n{out}");
    }
    // A ban here that the table lacks: not in sync (exit status 1).
    let (ok, out) = a.cli(&["bans", "add", "127.0.0.83"]);
    assert!(ok, "{out}");
    let (ok, out) = b.cli(&["cluster", "status"]);
    assert!(ok && out.contains("in sync"), "mx2 is unaffected until it gets it: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_both_serve_and_ban_and_converge_when_it_is_back() {
    let Some(bin) = redis_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(bin, dir.path(), None, None);
    let a = Node::start(dir.path(), "mx1", &cluster_table(&redis, "mx1", ""));
    let b = Node::start(dir.path(), "mx2", &cluster_table(&redis, "mx2", ""));
    // One ban before the outage, known to both.
    a.forge("127.0.0.90").await;
    refused_within(&b, "127.0.0.90", Duration::from_secs(2)).await;

    redis.stop();
    // Each keeps serving and banning alone.
    assert!(a.greeting("127.0.0.91").await.starts_with("220 "));
    assert!(b.greeting("127.0.0.92").await.starts_with("220 "));
    a.forge("127.0.0.93").await;
    b.forge("127.0.0.94").await;
    assert!(a.greeting("127.0.0.93").await.starts_with("554 "));
    assert!(b.greeting("127.0.0.94").await.starts_with("554 "));
    // A lifting during the outage, too.
    let (ok, out) = b.cli(&["bans", "remove", "127.0.0.90"]);
    assert!(ok, "{out}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!b.greeting("127.0.0.93").await.starts_with("554 "), "mx2 cannot know mx1's ban yet");

    // Back, empty (no persistence): both directions converge, the lifting included.
    redis.restart();
    refused_within(&b, "127.0.0.93", Duration::from_secs(5)).await;
    refused_within(&a, "127.0.0.94", Duration::from_secs(5)).await;
    eventually("mx1 applies the lifting decided during the outage", Duration::from_secs(5), || !a.lists("127.0.0.90"))
        .await;
    // Nothing lost, nothing doubled: each node holds exactly the two bans.
    for n in [&a, &b] {
        let (ok, out) = n.cli(&["bans", "list"]);
        assert!(ok && out.contains("\n2 ban(s)"), "{}: {out}", n.name);
    }
    eventually("cluster status in sync", Duration::from_secs(5), || a.cli(&["cluster", "status"]).0).await;
    let log = a.log();
    assert!(log.contains("cluster store unreachable") && log.contains("cluster store reachable again"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_9_catches_up_when_restarted() {
    let Some(bin) = redis_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(bin, dir.path(), None, None);
    let a = Node::start(dir.path(), "mx1", &cluster_table(&redis, "mx1", ""));
    let mut b = Node::start(dir.path(), "mx2", &cluster_table(&redis, "mx2", ""));
    a.forge("127.0.0.100").await;
    refused_within(&b, "127.0.0.100", Duration::from_secs(2)).await;
    b.kill();
    a.forge("127.0.0.101").await;
    let (ok, out) = a.cli(&["bans", "remove", "127.0.0.100"]);
    assert!(ok, "{out}");
    b.restart();
    refused_within(&b, "127.0.0.101", Duration::from_secs(3)).await;
    eventually("mx2 applies the lifting it missed", Duration::from_secs(3), || !b.lists("127.0.0.100")).await;
    // And it publishes again: a ban decided on mx2 now reaches mx1.
    b.forge("127.0.0.102").await;
    refused_within(&a, "127.0.0.102", Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_with_a_password_and_tls_as_admins_configure_it() {
    let Some(bin) = redis_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tls = make_tls(dir.path());
    let redis = Redis::start(bin, dir.path(), Some("s3cret"), Some(&tls));
    // The password in a file of its own (not in the URL), the CA that signed Redis's certificate.
    let pw = dir.path().join("redis.password");
    std::fs::write(&pw, "s3cret\n").unwrap();
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let table = |node: &str| {
        format!(
            "[cluster]\nredis = \"{url}\"\nnode = \"{node}\"\npassword_file = \"{}\"\nca_file = \"{}\"\n\
             sync_interval = \"250ms\"\nheartbeat_interval = \"500ms\"\n",
            pw.display(),
            tls.ca.display()
        )
    };
    let a = Node::start(dir.path(), "mx1", &table("mx1"));
    let b = Node::start(dir.path(), "mx2", &table("mx2"));
    a.forge("127.0.0.110").await;
    refused_within(&b, "127.0.0.110", Duration::from_secs(2)).await;
    eventually("cluster status over TLS", Duration::from_secs(5), || b.cli(&["cluster", "status"]).0).await;

    // A wrong password: the node serves alone, and says why.
    let wrong = dir.path().join("wrong.password");
    std::fs::write(&wrong, "nope\n").unwrap();
    let c =
        Node::start(dir.path(), "mx3", &table("mx3").replace(&pw.display().to_string(), &wrong.display().to_string()));
    assert!(c.greeting("127.0.0.111").await.starts_with("220 "));
    c.forge("127.0.0.112").await;
    assert!(c.greeting("127.0.0.112").await.starts_with("554 "));
    eventually("mx3 warns", Duration::from_secs(5), || c.log().contains("cluster store unreachable")).await;
    let (ok, out) = c.cli(&["cluster", "status"]);
    assert!(!ok, "{out}");
    // The CA is required: without it the system's roots do not know this Redis.
    let (ok, out) =
        Node::start(dir.path(), "mx4", &table("mx4").replace("ca_file", "#ca_file")).cli(&["cluster", "status"]);
    assert!(!ok, "{out}");
    // A plain redis:// URL for a TLS port and a cert without key: check-config lists both.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[domains]\nlocal = [\"example.test\"]\n[cluster]\nredis = \"redis://127.0.0.1:1\"\nnode = \"mx 5\"\n\
         cert_file = \"x.pem\"\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for needle in [
        "cluster.node:",
        "cluster.cert_file: only for a rediss://",
        "cluster.cert_file, key_file",
        "cluster.cert_file: cannot read",
    ] {
        assert!(err.contains(needle), "{needle:?} missing in {err}");
    }
}

/// The merge script in Redis decides as [`wins`] does, for every pair of entry kinds and orders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_merges_by_the_same_rule_as_wins() {
    let Some(bin) = redis_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(bin, dir.path(), None, None);
    let section = ClusterSection { redis: redis.url(), node: "mx1".into(), ..ClusterSection::default() };
    let store = RedisStore::new(&section).unwrap();
    let entry = |n: usize, lifted: bool, at: i64, expires: i64| SharedBan {
        net: format!("192.0.2.{n}"),
        lifted,
        at_ms: at,
        expires_ms: expires,
        reason: "B1".into(),
        session: 1,
        evidence: "MAIL FROM:<x@example.test>".into(),
        offence: 1,
        node: "mx1".into(),
    };
    let shapes =
        [(false, 10, 100), (false, 20, 100), (false, 20, 200), (true, 10, 100), (true, 20, 100), (true, 30, 50)];
    let mut n = 0;
    for &(l1, a1, e1) in &shapes {
        for &(l2, a2, e2) in &shapes {
            n += 1;
            let (first, second) = (entry(n, l1, a1, e1), entry(n, l2, a2, e2));
            assert!(store.publish(first.clone()).await.unwrap());
            let won = store.publish(second.clone()).await.unwrap();
            assert_eq!(won, wins(&second, Some(&first)), "{first:?} then {second:?}");
        }
    }
    // The same pairs again, on fresh networks, in one pipeline each.
    let mut m = 1000;
    for &(l1, a1, e1) in &shapes {
        for &(l2, a2, e2) in &shapes {
            m += 1;
            let (first, second) = (entry(m % 256, l1, a1, e1), entry(m % 256, l2, a2, e2));
            let (first, second) = (
                SharedBan { net: format!("198.51.100.{}", m - 1000), ..first },
                SharedBan { net: format!("198.51.100.{}", m - 1000), ..second },
            );
            let won = store.publish_many(vec![first.clone(), second.clone()]).await.unwrap();
            assert_eq!(won, [true, wins(&second, Some(&first))], "{first:?} then {second:?}");
        }
    }
    for e in store.table().await.unwrap().into_iter().filter(|e| e.net.starts_with("198.51.100.")) {
        store.purge(vec![e.net], i64::MAX).await.unwrap();
    }
    let table = store.table().await.unwrap();
    assert_eq!(table.len(), n);
    // The log holds each winner once, in order.
    let log = store.follow("0-0".into(), 1000, Duration::from_millis(10)).await.unwrap();
    let log: Vec<_> =
        log.into_iter().filter(|(_, e)| e.as_ref().is_some_and(|e| e.net.starts_with("192.0.2."))).collect();
    let winners = shapes.len() * shapes.len()
        + shapes
            .iter()
            .flat_map(|a| shapes.iter().map(move |b| (a, b)))
            .filter(|(a, b)| wins(&entry(0, b.0, b.1, b.2), Some(&entry(0, a.0, a.1, a.2))))
            .count();
    assert_eq!(log.len(), winners);
    assert!(store.log_head().await.unwrap() >= log.last().unwrap().0);
    // Expired entries go (those still expired when purged).
    let gone = store.purge(table.iter().map(|e| e.net.clone()).collect(), 100).await.unwrap();
    assert_eq!(gone, table.iter().filter(|e| e.expires_ms <= 100).count());
    assert_eq!(store.epoch("a".into()).await.unwrap(), "a");
    assert_eq!(store.epoch("b".into()).await.unwrap(), "a", "the first proposal stays");
}

/// B4 with threshold 3: two unknown recipients on mx1, one on mx2, is three for the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dictionary_attacker_spreading_rcpts_over_both_mx_is_counted_once() {
    let Some(bin) = redis_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(bin, dir.path(), None, None);
    let rules = "[rules]\nb4_threshold = 3\n";
    let a = Node::start(dir.path(), "mx1", &format!("{rules}{}", cluster_table(&redis, "mx1", "")));
    let b = Node::start(dir.path(), "mx2", &format!("{rules}{}", cluster_table(&redis, "mx2", "")));
    // Let the counters' followers start (they follow from the moment they start).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ra, rb) = ("RCPT TO:<nobody1@example.test>", "RCPT TO:<nobody2@example.test>");
    let r = dialogue(a.addr, "127.0.0.120", &["EHLO c.test", "MAIL FROM:<x@remote.test>", ra, rb, "QUIT"]).await;
    assert!(r[3].starts_with("550") && r[4].starts_with("550") && r[5].starts_with("221"), "{r:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = dialogue(
        b.addr,
        "127.0.0.120",
        &["EHLO c.test", "MAIL FROM:<x@remote.test>", "RCPT TO:<nobody3@example.test>"],
    )
    .await;
    assert!(r[3].starts_with("550"), "{r:?}");
    eventually("mx2 bans the third unknown recipient (B4)", Duration::from_secs(2), || b.lists("127.0.0.120")).await;
    refused_within(&a, "127.0.0.120", Duration::from_secs(2)).await;
    // Alone, mx2 would have counted one: another client, one unknown recipient, no ban.
    let r = dialogue(b.addr, "127.0.0.121", &["EHLO c.test", "MAIL FROM:<x@remote.test>", ra, "QUIT"]).await;
    assert!(r[3].starts_with("550") && r[4].starts_with("221"), "{r:?}");
    assert!(!b.lists("127.0.0.121"));
}

/// The callback cache through the store: a result stored on one node is found on the other; a
/// store that is down costs one bounded wait, then none for a while.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callback_cache_is_shared_and_falls_back_to_local_when_redis_is_down() {
    use gatekeeper::policy::Verification;
    use gatekeeper::verify::{CacheHit, CacheTtls, VerifyCache};
    use std::sync::Arc;
    let Some(bin) = redis_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(bin, dir.path(), None, None);
    let section = |node: &str| ClusterSection {
        redis: redis.url(),
        node: node.into(),
        timeout: Duration::from_millis(200),
        ..ClusterSection::default()
    };
    let store_a: Arc<dyn ClusterStore> = Arc::new(RedisStore::new(&section("mx1")).unwrap());
    let store_b: Arc<dyn ClusterStore> = Arc::new(RedisStore::new(&section("mx2")).unwrap());
    let mx1 = VerifyCache::memory(CacheTtls::default(), 100).with_shared(store_a);
    let mx2 = VerifyCache::memory(CacheTtls::default(), 100).with_shared(store_b);
    let now = 1_800_000_000;
    let valid = Verification::Valid { evidence: "RCPT TO:<a@third.test>: 250 ok".into() };
    mx1.store("a@third.test", &valid, now).await;
    mx1.set_accept_all("any.test", "RCPT TO:<random@any.test>: 250", now).await;
    let mut hit = None;
    for _ in 0..40 {
        hit = mx2.lookup("a@third.test", "third.test", now + 1).await;
        if hit.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hit, Some(CacheHit::Result(valid.clone())), "probed once for the cluster");
    assert_eq!(
        mx2.lookup("b@any.test", "any.test", now + 1).await,
        Some(CacheHit::AcceptAll("RCPT TO:<random@any.test>: 250".into()))
    );
    // Kept locally: found with the store gone, at once.
    redis.stop();
    let start = Instant::now();
    assert_eq!(mx2.lookup("a@third.test", "third.test", now + 2).await, Some(CacheHit::Result(valid)));
    assert!(start.elapsed() < Duration::from_millis(500));
    // A miss asks the store once (bounded by its timeout), then not for a while.
    let start = Instant::now();
    assert_eq!(mx2.lookup("c@third.test", "third.test", now + 3).await, None);
    assert!(start.elapsed() < Duration::from_millis(1000), "{:?}", start.elapsed());
    let start = Instant::now();
    assert_eq!(mx2.lookup("d@third.test", "third.test", now + 4).await, None);
    assert!(start.elapsed() < Duration::from_millis(500), "paused: {:?}", start.elapsed());
}
