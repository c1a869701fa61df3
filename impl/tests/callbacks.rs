//! Callback verification (C1) with real parts on loopback: a hickory-server DNS server (UDP and
//! TCP) with an in-memory zone, small SMTP servers that answer 250, 550, 451, policy 5xx, a
//! bare 550, refuse EHLO, accept everything or never answer, and the real gatekeeper server.
//!
//! Each test owns a block `127.<net>.0.0/24`; its SMTP servers share one port on several
//! loopback addresses, because the probe connects to every MX on the configured port.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gatekeeper::config::Config;
use gatekeeper::edges::{Clock, MaildirSpool, SystemClock, Verifier};
use gatekeeper::policy::{Directory, Verification};
use gatekeeper::proto::{Domain, Mailbox};
use gatekeeper::server::{Limits, Server};
use gatekeeper::verify::{
    CacheMode, CallbackVerifier, CallbacksConfig, DnsSettings, HickoryResolver, MxHost, MxLookup, MxResolver,
    TokioConnector, VerifierEdges, VerifyCache,
};
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::op::{Message, ResponseCode};
use hickory_server::proto::rr::rdata::{A, MX, SOA, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

// ---------------------------------------------------------------------------------------------
// The world: DNS, remote MX hosts.

/// What an in-test SMTP server does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// alice and bob exist (250), everyone else 550 5.1.1.
    Users,
    /// 451 to every RCPT.
    Tempfail,
    /// Accepts the connection, never says a word.
    Silent,
    /// 250 to every RCPT.
    AcceptAll,
    /// 500 to EHLO, then like `Users` after HELO.
    NoEhlo,
    /// 550 5.7.1 to every RCPT: a policy block of us, not a verdict on the sender.
    Policy,
    /// A bare `550` without an enhanced code to every RCPT: no evidence either way.
    Bare,
}

const USERS: u8 = 10;
const TEMPFAIL: u8 = 11;
const SILENT: u8 = 12;
const ACCEPT_ALL: u8 = 13;
const NO_EHLO: u8 = 14;
const POLICY: u8 = 15;
const BARE: u8 = 17;
/// Nothing listens here: connection refused.
const REFUSED: u8 = 16;
/// The gatekeeper itself, as the MX of `example.test`.
const GATEKEEPER: u8 = 20;

const MX_HOSTS: [(u8, Behaviour); 7] = [
    (USERS, Behaviour::Users),
    (TEMPFAIL, Behaviour::Tempfail),
    (SILENT, Behaviour::Silent),
    (ACCEPT_ALL, Behaviour::AcceptAll),
    (NO_EHLO, Behaviour::NoEhlo),
    (POLICY, Behaviour::Policy),
    (BARE, Behaviour::Bare),
];

/// Every line each MX host received, with `CONNECT` for each connection.
#[derive(Debug, Clone, Default)]
struct Log(Arc<Mutex<Vec<(u8, String)>>>);

impl Log {
    fn push(&self, host: u8, line: &str) {
        self.0.lock().unwrap().push((host, line.to_string()));
    }
    fn lines(&self, host: u8) -> Vec<String> {
        self.0.lock().unwrap().iter().filter(|(h, _)| *h == host).map(|(_, l)| l.clone()).collect()
    }
    fn connections(&self, host: u8) -> usize {
        self.lines(host).iter().filter(|l| *l == "CONNECT").count()
    }
    fn total_connections(&self) -> usize {
        self.0.lock().unwrap().iter().filter(|(_, l)| l == "CONNECT").count()
    }
}

struct World {
    net: u8,
    dns: SocketAddr,
    port: u16,
    log: Log,
    /// The listener for the gatekeeper's own address, on the shared port.
    gatekeeper: Option<TcpListener>,
    _dns: hickory_server::Server<Catalog>,
}

fn ip(net: u8, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, net, 0, host)
}

impl World {
    async fn start(net: u8) -> World {
        let (port, mut listeners) = bind_common_port(net).await;
        let log = Log::default();
        let gatekeeper = listeners.pop();
        for (listener, (host, behaviour)) in listeners.into_iter().zip(MX_HOSTS) {
            tokio::spawn(smtp_server(listener, host, behaviour, log.clone()));
        }
        let (dns, server) = start_dns(net).await;
        World { net, dns, port, log, gatekeeper, _dns: server }
    }

    fn ip(&self, host: u8) -> Ipv4Addr {
        ip(self.net, host)
    }

    fn config(&self) -> CallbacksConfig {
        CallbacksConfig {
            nameservers: vec![self.dns.to_string()],
            dns_timeout: Duration::from_millis(500),
            dns_attempts: 1,
            port: self.port,
            connect_timeout: Duration::from_millis(500),
            command_timeout: Duration::from_millis(400),
            budget: Duration::from_secs(3),
            max_mx: 2,
            cache: CacheMode::Memory,
            seed: Some(7),
            // Every MX of this world lives on loopback.
            allow_private_mx: true,
            ..CallbacksConfig::default()
        }
    }

    fn verifier(&self, config: &CallbacksConfig, cache: VerifyCache) -> CallbackVerifier {
        let resolver = HickoryResolver::tokio(&config.dns(), 7).unwrap();
        let edges = VerifierEdges {
            resolver: Arc::new(resolver),
            connector: Arc::new(TokioConnector::new()),
            cache: Arc::new(cache),
            clock: Arc::new(SystemClock),
        };
        CallbackVerifier::new(config, "gk.example.test", 7, edges)
    }

    fn memory_verifier(&self, config: &CallbacksConfig) -> CallbackVerifier {
        self.verifier(config, VerifyCache::memory(config.ttls(), 1000))
    }
}

/// One port free on every MX address and the gatekeeper's.
async fn bind_common_port(net: u8) -> (u16, Vec<TcpListener>) {
    let hosts: Vec<u8> = MX_HOSTS.iter().map(|(h, _)| *h).chain([GATEKEEPER]).collect();
    for _ in 0..20 {
        let first = TcpListener::bind((ip(net, hosts[0]), 0)).await.unwrap();
        let port = first.local_addr().unwrap().port();
        let mut listeners = vec![first];
        for h in &hosts[1..] {
            match TcpListener::bind((ip(net, *h), port)).await {
                Ok(l) => listeners.push(l),
                Err(_) => break,
            }
        }
        if listeners.len() == hosts.len() {
            return (port, listeners);
        }
    }
    panic!("no common port");
}

async fn smtp_server(listener: TcpListener, host: u8, behaviour: Behaviour, log: Log) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { return };
        tokio::spawn(smtp_session(stream, host, behaviour, log.clone()));
    }
}

async fn smtp_session(stream: TcpStream, host: u8, behaviour: Behaviour, log: Log) {
    log.push(host, "CONNECT");
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    if behaviour == Behaviour::Silent {
        // Hold the connection open, never greet, until the prober gives up.
        let mut sink = String::new();
        while r.read_line(&mut sink).await.is_ok_and(|n| n > 0) {}
        return;
    }
    let _ = w.write_all(b"220 mx.test ESMTP\r\n").await;
    loop {
        let mut line = String::new();
        if !r.read_line(&mut line).await.is_ok_and(|n| n > 0) {
            return;
        }
        let line = line.trim_end().to_string();
        log.push(host, &line);
        let upper = line.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            if behaviour == Behaviour::NoEhlo {
                "500 5.5.1 Command unrecognized"
            } else {
                "250-mx.test\r\n250 PIPELINING"
            }
        } else if upper.starts_with("HELO") {
            "250 mx.test"
        } else if upper.starts_with("MAIL FROM:") {
            "250 2.1.0 Ok"
        } else if upper.starts_with("RCPT TO:") {
            let local = upper.trim_start_matches("RCPT TO:<").split('@').next().unwrap_or("").to_string();
            match behaviour {
                Behaviour::Tempfail => "451 4.7.1 Greylisted, try again later",
                Behaviour::AcceptAll => "250 2.1.5 Ok",
                Behaviour::Policy => "550 5.7.1 Client host rejected: listed at a blocklist",
                Behaviour::Bare => "550 User unknown",
                _ if local == "ALICE" || local == "BOB" => "250 2.1.5 Ok",
                _ => "550 5.1.1 User unknown",
            }
        } else if upper.starts_with("QUIT") {
            let _ = w.write_all(b"221 2.0.0 Bye\r\n").await;
            return;
        } else {
            "502 5.5.2 Command not recognized"
        };
        if w.write_all(format!("{reply}\r\n").as_bytes()).await.is_err() {
            return;
        }
    }
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn record(owner: &str, rdata: RData) -> Record {
    Record::from_rdata(name(owner), 300, rdata)
}

fn mx(owner: &str, preference: u16, exchange: &str) -> Record {
    record(owner, RData::MX(MX::new(preference, name(exchange))))
}

fn a(owner: &str, addr: Ipv4Addr) -> Record {
    record(owner, RData::A(A(addr)))
}

/// The zone `test.`; the gatekeeper's own domain `example.test` has it as MX.
fn zone(net: u8) -> InMemoryZoneHandler<TokioRuntimeProvider> {
    let mut zone = InMemoryZoneHandler::empty(name("test."), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(name("ns.test."), name("hostmaster.test."), 1, 3600, 600, 86_400, 60);
    let mut records = vec![record("test.", RData::SOA(soa))];
    for (domain, host) in [
        ("users", USERS),
        ("tempfail", TEMPFAIL),
        ("silent", SILENT),
        ("acceptall", ACCEPT_ALL),
        ("helo", NO_EHLO),
        ("policy", POLICY),
        ("bare", BARE),
        ("refused", REFUSED),
        ("gk", GATEKEEPER),
    ] {
        records.push(a(&format!("mx-{domain}.test."), ip(net, host)));
        if domain != "refused" && domain != "gk" {
            records.push(mx(&format!("{domain}.test."), 10, &format!("mx-{domain}.test.")));
        }
    }
    records.extend([
        // The first MX never answers or refuses: the second is asked.
        mx("fallback.test.", 10, "mx-silent.test."),
        mx("fallback.test.", 20, "mx-users.test."),
        mx("refused.test.", 10, "mx-refused.test."),
        mx("refused.test.", 20, "mx-users.test."),
        // Two MX of equal preference and a backup.
        mx("ties.test.", 10, "a.ties.test."),
        mx("ties.test.", 10, "b.ties.test."),
        mx("ties.test.", 20, "c.ties.test."),
        a("a.ties.test.", ip(net, USERS)),
        a("b.ties.test.", ip(net, USERS)),
        a("c.ties.test.", ip(net, USERS)),
        // No MX: the A record is the implicit MX (RFC 5321 §5.1).
        a("implicit.test.", ip(net, USERS)),
        // RFC 7505 null MX.
        mx("nullmx.test.", 0, "."),
        // Exists, but neither MX nor address.
        record("nomail.test.", RData::TXT(TXT::new(vec!["v=spf1 -all".into()]))),
        // The gatekeeper's own domain.
        mx("example.test.", 10, "mx-gk.test."),
    ]);
    // More MX than fit a UDP answer: the resolver must retry over TCP.
    for i in 0..80u16 {
        records.push(mx("big.test.", i, &format!("mx{i:02}.with-a-rather-long-name.big.test.")));
    }
    for r in records {
        assert!(zone.upsert_mut(r, 1));
    }
    zone
}

async fn start_dns(net: u8) -> (SocketAddr, hickory_server::Server<Catalog>) {
    let udp = UdpSocket::bind((ip(net, 53), 0)).await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    let mut catalog = Catalog::new();
    let handler: Arc<dyn ZoneHandler> = Arc::new(zone(net));
    catalog.upsert(LowerName::from(name("test.")), vec![handler]);
    let mut server = hickory_server::Server::new(catalog);
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 64);
    (addr, server)
}

/// A DNS server that answers SERVFAIL to everything.
async fn servfail_dns(net: u8) -> SocketAddr {
    let socket = UdpSocket::bind((ip(net, 54), 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
            let mut response = Message::response(query.metadata.id, query.metadata.op_code);
            response.metadata.response_code = ResponseCode::ServFail;
            response.add_queries(query.queries.clone());
            let _ = socket.send_to(&response.to_vec().unwrap(), peer).await;
        }
    });
    addr
}

/// A DNS server that never answers.
async fn mute_dns(net: u8) -> (SocketAddr, UdpSocket) {
    let socket = UdpSocket::bind((ip(net, 55), 0)).await.unwrap();
    (socket.local_addr().unwrap(), socket)
}

fn mailbox(s: &str) -> Mailbox {
    Mailbox::parse(s).unwrap()
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Valid,
    AcceptAll,
    Invalid,
    Undeliverable,
    Unknown,
}

fn kind(v: &Verification) -> (Kind, &str) {
    let k = match v {
        Verification::Valid { .. } => Kind::Valid,
        Verification::AcceptAll { .. } => Kind::AcceptAll,
        Verification::Invalid { .. } => Kind::Invalid,
        Verification::Undeliverable { .. } => Kind::Undeliverable,
        Verification::Unknown { .. } => Kind::Unknown,
    };
    (k, v.evidence())
}

fn assert_result(v: &Verification, expected: Kind, evidence: &str) {
    let (k, e) = kind(v);
    assert_eq!(k, expected, "{v:?}");
    assert!(e.contains(evidence), "evidence {e:?} lacks {evidence:?}");
}

// ---------------------------------------------------------------------------------------------
// The resolver edge against a real DNS server.

#[tokio::test]
async fn resolver_answers_from_a_real_dns_server() {
    let w = World::start(61).await;
    let settings = DnsSettings {
        nameservers: vec![w.dns],
        timeout: Duration::from_millis(500),
        attempts: 1,
        ..DnsSettings::default()
    };
    let r = HickoryResolver::tokio(&settings, 1).unwrap();
    let d = |s: &str| Domain::parse(s).unwrap();
    assert_eq!(
        r.lookup_mx(&d("users.test")).await.unwrap(),
        MxLookup::Hosts(vec![MxHost { name: "mx-users.test".into(), preference: 10 }])
    );
    assert_eq!(r.lookup_mx(&d("implicit.test")).await.unwrap(), MxLookup::Implicit(vec![IpAddr::V4(w.ip(USERS))]));
    assert_eq!(r.lookup_mx(&d("nullmx.test")).await.unwrap(), MxLookup::NullMx);
    assert_eq!(r.lookup_mx(&d("nomail.test")).await.unwrap(), MxLookup::NoMailHost);
    assert_eq!(r.lookup_mx(&d("missing.test")).await.unwrap(), MxLookup::NoDomain);
    assert_eq!(r.lookup_host("mx-users.test").await.unwrap(), vec![IpAddr::V4(w.ip(USERS))]);
    assert_eq!(r.lookup_host("nothere.test").await.unwrap(), Vec::<IpAddr>::new());
    // 80 MX records do not fit in UDP: the truncated answer is retried over TCP.
    match r.lookup_mx(&d("big.test")).await.unwrap() {
        MxLookup::Hosts(hosts) => {
            assert_eq!(hosts.len(), 80);
            assert!(hosts.windows(2).all(|p| p[0].preference < p[1].preference));
        }
        other => panic!("{other:?}"),
    }
    // Equal preferences in a seeded random order; the backup always last.
    let mut orders = std::collections::BTreeSet::new();
    for seed in 0..12 {
        let r = HickoryResolver::tokio(&settings, seed).unwrap();
        let MxLookup::Hosts(hosts) = r.lookup_mx(&d("ties.test")).await.unwrap() else { panic!() };
        let names: Vec<String> = hosts.iter().map(|h| h.name.clone()).collect();
        assert_eq!(names[2], "c.ties.test");
        orders.insert(names[..2].join(","));
    }
    assert_eq!(orders.len(), 2, "{orders:?}");
    // SERVFAIL and silence are temporary failures, within the timeout.
    let servfail = DnsSettings { nameservers: vec![servfail_dns(61).await], ..settings.clone() };
    let r = HickoryResolver::tokio(&servfail, 1).unwrap();
    assert!(r.lookup_mx(&d("users.test")).await.is_err());
    let (mute, _socket) = mute_dns(61).await;
    let r = HickoryResolver::tokio(&DnsSettings { nameservers: vec![mute], ..settings }, 1).unwrap();
    let t = Instant::now();
    assert!(r.lookup_mx(&d("users.test")).await.is_err());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Every outcome of a probe.

#[tokio::test]
async fn every_outcome_with_its_evidence() {
    let w = World::start(62).await;
    let v = w.memory_verifier(&w.config());
    for (sender, expected, evidence) in [
        ("alice@users.test", Kind::Valid, "RCPT TO:<alice@users.test>: 250 2.1.5 Ok"),
        ("nobody@users.test", Kind::Invalid, "550 5.1.1 User unknown"),
        ("someone@tempfail.test", Kind::Unknown, "451 4.7.1"),
        ("someone@silent.test", Kind::Unknown, "greeting: timed out"),
        ("alice@fallback.test", Kind::Valid, "mx-users.test["),
        ("alice@refused.test", Kind::Valid, "mx-users.test["),
        ("someone@acceptall.test", Kind::AcceptAll, "accept-all"),
        ("alice@helo.test", Kind::Valid, "250 2.1.5"),
        ("nobody@helo.test", Kind::Invalid, "550 5.1.1"),
        ("someone@policy.test", Kind::Unknown, "550 5.7.1"),
        ("nobody@bare.test", Kind::Unknown, "550 User unknown"),
        ("alice@implicit.test", Kind::Valid, "implicit.test["),
        ("someone@nullmx.test", Kind::Invalid, "null MX"),
        ("someone@nomail.test", Kind::Undeliverable, "neither MX nor A/AAAA"),
        ("someone@missing.test", Kind::Undeliverable, "NXDOMAIN"),
    ] {
        let t = Instant::now();
        let result = v.verify(&mailbox(sender)).await;
        assert_result(&result, expected, evidence);
        assert!(t.elapsed() < Duration::from_secs(2), "{sender}: {:?}", t.elapsed());
    }
    // The dialogue, as the users MX heard it: MAIL FROM:<>, the sender, a random address, QUIT.
    let heard = w.log.lines(USERS);
    let first = heard.iter().position(|l| l == "RCPT TO:<alice@users.test>").unwrap();
    assert_eq!(heard[first - 1], "MAIL FROM:<>");
    assert!(heard[first - 2].starts_with("EHLO gk.example.test"), "{heard:?}");
    assert!(heard[first + 1].starts_with("RCPT TO:<gk-nx-") && heard[first + 1].ends_with("@users.test>"));
    assert_eq!(heard[first + 2], "QUIT");
    assert!(!heard.iter().any(|l| l.starts_with("DATA")));
    // A refused sender needs no accept-all check.
    let refused = heard.iter().position(|l| l == "RCPT TO:<nobody@users.test>").unwrap();
    assert_eq!(heard[refused + 1], "QUIT");
    // EHLO refused: HELO on a second connection.
    let helo = w.log.lines(NO_EHLO);
    assert!(helo.iter().any(|l| l.starts_with("HELO gk.example.test")), "{helo:?}");
    assert_eq!(v.stats().probes.load(Ordering::Relaxed), 15);
}

/// DESIGN §2 C1: probes never go to inside addresses. With the shipped default, a sender whose
/// MX lives on loopback is not verified either way (unknown: never banned for it), and no
/// connection is made; the evidence says why.
#[tokio::test]
async fn inside_mx_addresses_are_never_probed_by_default() {
    let w = World::start(70).await;
    let config = CallbacksConfig { allow_private_mx: false, ..w.config() };
    let v = w.memory_verifier(&config);
    for sender in ["nobody@users.test", "alice@users.test", "alice@implicit.test"] {
        let result = v.verify(&mailbox(sender)).await;
        assert_result(&result, Kind::Unknown, "not a global address, not probed");
    }
    assert_eq!(w.log.total_connections(), 0);
    // What needs no connection still counts: a null MX, a domain that does not exist.
    assert_result(&v.verify(&mailbox("someone@nullmx.test")).await, Kind::Invalid, "null MX");
    assert_result(&v.verify(&mailbox("someone@missing.test")).await, Kind::Undeliverable, "NXDOMAIN");
}

#[tokio::test]
async fn dns_failures_are_unknown_and_never_invalid() {
    let w = World::start(63).await;
    let mut config = w.config();
    config.nameservers = vec![servfail_dns(63).await.to_string()];
    let v = w.memory_verifier(&config);
    assert_result(&v.verify(&mailbox("a@users.test")).await, Kind::Unknown, "MX lookup for users.test");
    let (mute, _socket) = mute_dns(63).await;
    config.nameservers = vec![mute.to_string()];
    let v = w.memory_verifier(&config);
    let t = Instant::now();
    assert_result(&v.verify(&mailbox("a@users.test")).await, Kind::Unknown, "MX lookup for users.test");
    assert!(t.elapsed() < Duration::from_secs(3));
    // The budget bounds the whole probe: two silent MX hosts with long timeouts.
    let mut config = w.config();
    config.command_timeout = Duration::from_secs(5);
    config.budget = Duration::from_millis(700);
    let v = w.memory_verifier(&config);
    let t = Instant::now();
    assert_result(&v.verify(&mailbox("a@silent.test")).await, Kind::Unknown, "timed out");
    assert!(t.elapsed() < Duration::from_millis(1500), "{:?}", t.elapsed());
}

// ---------------------------------------------------------------------------------------------
// The cache.

#[tokio::test]
async fn cached_results_are_not_probed_again_even_after_a_restart() {
    let w = World::start(64).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.sqlite");
    let config = w.config();
    let open = || VerifyCache::open_sqlite(&path, config.ttls(), 1000, true).unwrap();
    let v = w.verifier(&config, open());
    assert_result(&v.verify(&mailbox("alice@users.test")).await, Kind::Valid, "250");
    assert_result(&v.verify(&mailbox("nobody@users.test")).await, Kind::Invalid, "550 5.1.1");
    assert_result(&v.verify(&mailbox("x@acceptall.test")).await, Kind::AcceptAll, "accept-all");
    assert_eq!(w.log.total_connections(), 3);
    // A second message: answered from the cache, no connection.
    assert_result(&v.verify(&mailbox("alice@users.test")).await, Kind::Valid, "cached: ");
    assert_result(&v.verify(&mailbox("NoBody@users.test")).await, Kind::Invalid, "cached: ");
    // Another address at an accept-all domain: the domain's flag answers.
    assert_result(&v.verify(&mailbox("y@acceptall.test")).await, Kind::AcceptAll, "accepts any address");
    assert_eq!(w.log.total_connections(), 3);
    assert_eq!(v.stats().cache_hits.load(Ordering::Relaxed), 3);
    drop(v);
    // Restart: a new verifier on the same database file.
    let v = w.verifier(&config, open());
    assert_result(&v.verify(&mailbox("alice@users.test")).await, Kind::Valid, "cached: ");
    assert_result(&v.verify(&mailbox("nobody@users.test")).await, Kind::Invalid, "cached: ");
    assert_result(&v.verify(&mailbox("z@acceptall.test")).await, Kind::AcceptAll, "accepts any address");
    assert_eq!(w.log.total_connections(), 3);
    assert_eq!(v.stats().probes.load(Ordering::Relaxed), 0);
    // The ban store shares the file: our tables are prefixed.
    let conn = rusqlite_tables(&path);
    assert!(conn.iter().all(|t| t.starts_with("callback_")), "{conn:?}");
}

fn rusqlite_tables(path: &std::path::Path) -> Vec<String> {
    // Read the schema with the sqlite3 file format's own catalog, through the cache's driver.
    let c = rusqlite::Connection::open(path).unwrap();
    let mut s = c.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").unwrap();
    s.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

#[tokio::test]
async fn each_kind_of_result_expires_on_its_own_schedule() {
    let w = World::start(65).await;
    let config = w.config();
    // Real monotonic time for timeouts; a wall clock the test moves for cache expiry.
    let clock = Arc::new(WallOffset::default());
    let resolver = HickoryResolver::tokio(&config.dns(), 7).unwrap();
    let edges = VerifierEdges {
        resolver: Arc::new(resolver),
        connector: Arc::new(TokioConnector::new()),
        cache: Arc::new(VerifyCache::memory(config.ttls(), 1000)),
        clock: clock.clone(),
    };
    let v = CallbackVerifier::new(&config, "gk.example.test", 7, edges);
    for sender in ["a@tempfail.test", "alice@users.test", "nobody@users.test"] {
        let first = v.verify(&mailbox(sender)).await;
        let again = v.verify(&mailbox(sender)).await;
        assert_result(&again, kind(&first).0, "cached: ");
    }
    assert_eq!(v.stats().probes.load(Ordering::Relaxed), 3);
    let probes_after = |secs: u64| {
        let (v, clock) = (&v, clock.clone());
        async move {
            clock.0.store(secs, Ordering::Relaxed);
            for sender in ["a@tempfail.test", "alice@users.test", "nobody@users.test"] {
                v.verify(&mailbox(sender)).await;
            }
            v.stats().probes.load(Ordering::Relaxed)
        }
    };
    assert_eq!(probes_after(299).await, 3, "all cached");
    assert_eq!(probes_after(300).await, 4, "unknown: 5 minutes");
    assert_eq!(probes_after(86_400 + 299).await, 6, "invalid: 1 day (and the unknown again)");
    assert_eq!(probes_after(86_400 + 598).await, 6, "all cached again");
    assert_eq!(probes_after(7 * 86_400 + 299).await, 9, "valid: 7 days (and the others again)");
}

/// The system clock with its wall time moved forward by a number of seconds.
#[derive(Debug, Default)]
struct WallOffset(std::sync::atomic::AtomicU64);

impl Clock for WallOffset {
    fn now(&self) -> std::time::Instant {
        SystemClock.now()
    }
    fn wall(&self) -> std::time::SystemTime {
        SystemClock.wall() + Duration::from_secs(self.0.load(Ordering::Relaxed))
    }
}

// ---------------------------------------------------------------------------------------------
// Limits, allowlist, guards.

#[tokio::test]
async fn probes_are_limited_per_domain_and_overall() {
    let w = World::start(66).await;
    let mut config = w.config();
    config.domain_rate = 3;
    let v = w.memory_verifier(&config);
    // Concurrency per domain: two probes of silent.test run, the third is not made.
    let (sa, sb, sc) = (mailbox("a@silent.test"), mailbox("b@silent.test"), mailbox("c@silent.test"));
    let (a, b, c) = tokio::join!(v.verify(&sa), v.verify(&sb), v.verify(&sc));
    assert_result(&a, Kind::Unknown, "timed out");
    assert_result(&b, Kind::Unknown, "timed out");
    assert_result(&c, Kind::Unknown, "probe not made: 2 probes of this domain already running");
    assert_eq!(w.log.connections(SILENT), 2, "two probes, one connection each");
    // Rate per domain: the fourth probe of users.test in the window is not made...
    for local in ["u1", "u2", "alice"] {
        v.verify(&mailbox(&format!("{local}@users.test"))).await;
    }
    assert_result(
        &v.verify(&mailbox("bob@users.test")).await,
        Kind::Unknown,
        "3 probes of this domain in the current window",
    );
    // ...but another domain on the same MX host is probed, and cached answers still flow.
    assert_result(&v.verify(&mailbox("alice@implicit.test")).await, Kind::Valid, "250");
    assert_result(&v.verify(&mailbox("alice@users.test")).await, Kind::Valid, "cached");
    assert_eq!(v.stats().limited.load(Ordering::Relaxed), 2);
    // The global cap.
    let mut config = w.config();
    config.max_concurrent = 1;
    let v = w.memory_verifier(&config);
    let (sd, alice) = (mailbox("d@silent.test"), mailbox("alice@users.test"));
    let (a, b) = tokio::join!(v.verify(&sd), v.verify(&alice));
    assert_result(&a, Kind::Unknown, "timed out");
    assert_result(&b, Kind::Unknown, "probe not made: 1 probes already running");
}

#[tokio::test]
async fn concurrent_verifications_of_one_sender_share_one_probe() {
    let w = World::start(71).await;
    let config = w.config();
    assert_eq!(config.domain_concurrency, 2);
    let v = w.memory_verifier(&config);
    // An MTA delivering five messages from one new sender over parallel connections: one probe
    // (a slow one: the first MX never answers), five answers. Meanwhile two other senders of
    // the same domain: one takes the domain's second slot, the third is refused as before.
    let alice = mailbox("alice@fallback.test");
    let upper = mailbox("ALICE@fallback.test");
    let (bob, carol) = (mailbox("bob@fallback.test"), mailbox("carol@fallback.test"));
    let (a1, a2, a3, a4, a5, b, c) = tokio::join!(
        v.verify(&alice),
        v.verify(&alice),
        v.verify(&upper),
        v.verify(&alice),
        v.verify(&alice),
        v.verify(&bob),
        v.verify(&carol),
    );
    for a in [&a1, &a2, &a3, &a4, &a5] {
        assert_result(a, Kind::Valid, "250");
        assert_eq!(a, &a1, "every caller gets the one probe's finding");
    }
    assert_result(&b, Kind::Valid, "250");
    assert_result(&c, Kind::Unknown, "probe not made: 2 probes of this domain already running");
    let stats = v.stats();
    assert_eq!(stats.probes.load(Ordering::Relaxed), 2, "alice's and bob's");
    assert_eq!(stats.shared.load(Ordering::Relaxed), 4);
    assert_eq!(stats.limited.load(Ordering::Relaxed), 1);
    assert_eq!(w.log.connections(SILENT), 2, "one MX connection per probe");
    let rcpt = |who: &str| w.log.lines(USERS).iter().filter(|l| l.eq_ignore_ascii_case(who)).count();
    assert_eq!(rcpt("RCPT TO:<alice@fallback.test>"), 1);
    assert_eq!(rcpt("RCPT TO:<bob@fallback.test>"), 1);
    // The map holds live probes only; the result was cached once.
    assert_eq!(v.in_flight(), 0);
    assert_result(&v.verify(&upper).await, Kind::Valid, "cached");
    assert_eq!(stats.probes.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn a_caller_that_goes_away_does_not_cancel_the_shared_probe() {
    let w = World::start(72).await;
    let v = w.memory_verifier(&w.config());
    let alice = mailbox("alice@fallback.test");
    // The caller that started the probe and a second one go away after 50 ms (their sessions
    // closed); the third still gets the probe's result, some 400 ms later.
    let gone = || tokio::time::timeout(Duration::from_millis(50), v.verify(&alice));
    let (first, second, third) = tokio::join!(gone(), gone(), v.verify(&alice));
    assert!(first.is_err() && second.is_err());
    assert_result(&third, Kind::Valid, "250");
    assert_eq!(v.stats().probes.load(Ordering::Relaxed), 1);
    assert_eq!(v.stats().shared.load(Ordering::Relaxed), 2);
    assert_eq!(w.log.connections(SILENT), 1);
    // Nobody waits at all: the probe still runs to its end, fills the cache, leaves the map.
    let bob = mailbox("bob@fallback.test");
    assert!(tokio::time::timeout(Duration::from_millis(50), v.verify(&bob)).await.is_err());
    assert_eq!(v.in_flight(), 1);
    let start = Instant::now();
    while v.in_flight() > 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "the probe never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_result(&v.verify(&bob).await, Kind::Valid, "cached");
    assert_eq!(v.stats().probes.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn allowlisted_local_and_literal_senders_are_never_probed() {
    let w = World::start(67).await;
    let mut config = w.config();
    config.allowlist = vec!["users.test".into()];
    let directory = Arc::new(Directory::new([Domain::parse("tempfail.test").unwrap()], true));
    let v = w.memory_verifier(&config).with_directory(directory);
    assert_result(&v.verify(&mailbox("nobody@users.test")).await, Kind::Valid, "allowlisted");
    assert_result(&v.verify(&mailbox("nobody@sub.users.test")).await, Kind::Valid, "allowlisted");
    assert_result(&v.verify(&mailbox("x@tempfail.test")).await, Kind::Unknown, "local sender");
    assert_result(&v.verify(&mailbox("x@[127.0.0.1]")).await, Kind::Unknown, "address literal");
    assert_eq!(w.log.total_connections(), 0);
    // A suffix that is not a subdomain is not allowlisted.
    assert_result(&v.verify(&mailbox("x@notusers.test")).await, Kind::Undeliverable, "NXDOMAIN");
}

// ---------------------------------------------------------------------------------------------
// The real server: C1 end to end, and R1 (we answer others' probes correctly).

const GATEKEEPER_TOML: &str = r#"
[server]
hostname = "mx.example.test"
[domains]
local = ["example.test"]
users = ["alice@example.test"]
[rules]
verify_senders = true
on_unknown_sender = "tempfail"
[callbacks]
cache = "memory"
allow_private_mx = true
"#;

struct Client {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Client {
    async fn connect(server: SocketAddr, source: Ipv4Addr) -> Client {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source.into(), 0)).unwrap();
        let (r, w) = socket.connect(server).await.unwrap().into_split();
        let mut c = Client { r: BufReader::new(r), w };
        assert!(c.reply().await.starts_with("220"));
        c
    }

    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            tokio::time::timeout(Duration::from_secs(10), self.r.read_line(&mut line)).await.unwrap().unwrap();
            all.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return all;
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.w.write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
        self.reply().await
    }
}

#[tokio::test]
async fn server_refuses_and_bans_fake_senders_and_answers_probes_correctly() {
    let mut w = World::start(68).await;
    let toml = format!("{GATEKEEPER_TOML}nameservers = [\"{}\"]\nport = {}\n", w.dns, w.port);
    let settings = Config::parse(&toml).unwrap().validate(None).unwrap();
    assert!(settings.session.verify_senders);
    let mut config = settings.config.callbacks.clone();
    config.command_timeout = Duration::from_millis(400);
    config.connect_timeout = Duration::from_millis(500);
    config.budget = Duration::from_secs(3);
    let verifier = Arc::new(w.memory_verifier(&config).with_directory(settings.directory.clone()));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(SystemClock);
    let spool = MaildirSpool::open(dir.path().join("maildir"), "mx.example.test", clock.clone(), true).unwrap();
    // The probes below come from one address: the in-process G1 gate would allow one a minute.
    let limits = Limits { in_process_rate: false, shutdown_grace: Duration::from_millis(100), ..Limits::default() };
    let server = Server::builder(settings.session.clone(), settings.directory.clone(), Arc::new(spool))
        .clock(clock)
        .gate(settings.config.gate.clone())
        .limits(limits)
        .verifier(verifier.clone())
        .build();
    let listener = w.gatekeeper.take().unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let s = server.clone();
        tokio::spawn(async move {
            s.run(listener, async {
                let _ = stopped.await;
            })
            .await
        })
    };

    // R1: our own probe, through DNS (example.test MX is the gatekeeper), against the server.
    let prober = w.memory_verifier(&w.config());
    assert_result(&prober.verify(&mailbox("alice@example.test")).await, Kind::Valid, "mx-gk.test[");
    assert_result(&prober.verify(&mailbox("nobody@example.test")).await, Kind::Invalid, "550 5.1.1");
    assert_result(&prober.verify(&mailbox("postmaster@example.test")).await, Kind::Valid, "250");
    assert_eq!(server.stats().bans.load(Ordering::Relaxed), 0, "a callback prober is never banned");

    // C1: a fake sender gets 550 5.1.7 and is banned.
    let fake = w.ip(100);
    let mut c = Client::connect(addr, fake).await;
    c.cmd("EHLO spam.test").await;
    assert!(c.cmd("MAIL FROM:<nobody@users.test>").await.starts_with("250"));
    let reply = c.cmd("RCPT TO:<alice@example.test>").await;
    assert!(reply.starts_with("550 5.1.7"), "{reply}");
    assert!(server.is_banned(fake.into()));
    // A valid sender gets 250 and its message is taken.
    let honest = w.ip(101);
    let mut c = Client::connect(addr, honest).await;
    c.cmd("EHLO honest.test").await;
    assert!(c.cmd("MAIL FROM:<alice@users.test>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@example.test>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    assert!(c.cmd("Subject: hi\r\n\r\nhello\r\n.").await.starts_with("250"));
    assert!(!server.is_banned(honest.into()));
    // Inconclusive: 451 4.4.3, never a ban.
    let greylisted = w.ip(102);
    let mut c = Client::connect(addr, greylisted).await;
    c.cmd("EHLO grey.test").await;
    c.cmd("MAIL FROM:<someone@tempfail.test>").await;
    assert!(c.cmd("RCPT TO:<alice@example.test>").await.starts_with("451 4.4.3"));
    assert!(!server.is_banned(greylisted.into()));
    // A second message from the valid sender: the cache answers, no new probe.
    let before = w.log.connections(USERS);
    let mut c = Client::connect(addr, w.ip(103)).await;
    c.cmd("EHLO honest.test").await;
    c.cmd("MAIL FROM:<alice@users.test>").await;
    assert!(c.cmd("RCPT TO:<alice@example.test>").await.starts_with("250"));
    assert_eq!(w.log.connections(USERS), before);
    assert_eq!(verifier.stats().probes.load(Ordering::Relaxed), 3);

    let _ = stop.send(());
    running.await.unwrap().unwrap();
}

#[test]
fn shipped_example_documents_every_callbacks_field() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gatekeeper.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let start = text.find("# [callbacks]").expect("a commented [callbacks] section");
    let uncommented: String = text[start..]
        .lines()
        .take_while(|l| l.starts_with('#'))
        .map(|l| format!("{}\n", l.trim_start_matches('#').trim_start()))
        .collect();
    let config = Config::parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
    let defaults = CallbacksConfig::default();
    let c = &config.callbacks;
    assert_eq!(
        (c.positive_ttl, c.negative_ttl, c.unknown_ttl),
        (defaults.positive_ttl, defaults.negative_ttl, defaults.unknown_ttl)
    );
    assert_eq!(
        (c.domain_concurrency, c.domain_rate, c.max_mx),
        (defaults.domain_concurrency, defaults.domain_rate, defaults.max_mx)
    );
    assert!(config.validate(None).is_ok());
    let bad =
        Config::parse("[rules]\nverify_senders = true\n[callbacks]\nmax_mx = 0\nnameservers = [\"x\"]\n").unwrap();
    let err = bad.validate(None).unwrap_err().problems.join("\n");
    assert!(err.contains("callbacks.max_mx") && err.contains("callbacks.nameservers"), "{err}");
}

/// The system clock moved forward by a number of seconds, monotonic and wall alike: the
/// server's notion of time for the unknown-sender window, without waiting 30 minutes.
#[derive(Debug, Default)]
struct Shifted(std::sync::atomic::AtomicU64);

impl Shifted {
    fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::Relaxed);
    }
}

impl Clock for Shifted {
    fn now(&self) -> std::time::Instant {
        SystemClock.now() + Duration::from_secs(self.0.load(Ordering::Relaxed))
    }
    fn wall(&self) -> std::time::SystemTime {
        SystemClock.wall() + Duration::from_secs(self.0.load(Ordering::Relaxed))
    }
}

/// C1 as docs/design.md §2 (rules) has it, end to end: accept-all domains are accepted; an
/// unknown sender is tempfailed only within `unknown_sender_tempfail_max` of its first
/// attempt and accepted on a retry after it; a bare 550 and NXDOMAIN never ban.
#[tokio::test]
async fn server_accepts_after_the_unknown_window_and_bans_only_on_evidence() {
    let mut w = World::start(69).await;
    let toml = format!("{GATEKEEPER_TOML}nameservers = [\"{}\"]\nport = {}\n", w.dns, w.port);
    let settings = Config::parse(&toml).unwrap().validate(None).unwrap();
    assert_eq!(settings.session.policy.unknown_sender_tempfail_max, Duration::from_secs(1800), "the default");
    let mut config = settings.config.callbacks.clone();
    config.command_timeout = Duration::from_millis(400);
    config.connect_timeout = Duration::from_millis(500);
    config.budget = Duration::from_secs(3);
    let verifier = Arc::new(w.memory_verifier(&config).with_directory(settings.directory.clone()));
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(Shifted::default());
    let spool = MaildirSpool::open(dir.path().join("maildir"), "mx.example.test", clock.clone(), true).unwrap();
    let limits = Limits { in_process_rate: false, shutdown_grace: Duration::from_millis(100), ..Limits::default() };
    let server = Server::builder(settings.session.clone(), settings.directory.clone(), Arc::new(spool))
        .clock(clock.clone())
        .gate(settings.config.gate.clone())
        .limits(limits)
        .verifier(verifier)
        .build();
    let listener = w.gatekeeper.take().unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = {
        let s = server.clone();
        tokio::spawn(async move {
            s.run(listener, async {
                let _ = stopped.await;
            })
            .await
        })
    };
    let rcpt_from = |client: Ipv4Addr, sender: &'static str| async move {
        let mut c = Client::connect(addr, client).await;
        c.cmd("EHLO client.test").await;
        assert!(c.cmd(&format!("MAIL FROM:<{sender}>")).await.starts_with("250"));
        let reply = c.cmd("RCPT TO:<alice@example.test>").await;
        (c, reply)
    };

    // An accept-all domain: valid but unverifiable, accepted at once and delivered.
    let (mut c, reply) = rcpt_from(w.ip(110), "anyone@acceptall.test").await;
    assert!(reply.starts_with("250"), "{reply}");
    assert!(c.cmd("DATA").await.starts_with("354"));
    assert!(c.cmd("Subject: hi\r\n\r\nhello\r\n.").await.starts_with("250"));

    // A bare 550 from the sender's MX is no evidence: unknown (451), never a ban.
    let (_, reply) = rcpt_from(w.ip(111), "nobody@bare.test").await;
    assert!(reply.starts_with("451 4.4.3"), "{reply}");
    assert!(!server.is_banned(w.ip(111).into()));

    // NXDOMAIN: refused, never a ban, and the session goes on.
    let (mut c, reply) = rcpt_from(w.ip(112), "someone@missing.test").await;
    assert!(reply.starts_with("550 5.1.7"), "{reply}");
    assert!(!server.is_banned(w.ip(112).into()));
    assert!(c.cmd("RCPT TO:<postmaster@example.test>").await.starts_with("250"), "not closed");

    // A sender whose MX always tempfails: 451 within the window of this client's first
    // attempt, accepted on a retry after it. Another client starts its own window.
    let retrier = w.ip(113);
    let (_, reply) = rcpt_from(retrier, "someone@tempfail.test").await;
    assert!(reply.starts_with("451 4.4.3"), "{reply}");
    clock.advance(29 * 60);
    let (_, reply) = rcpt_from(retrier, "someone@tempfail.test").await;
    assert!(reply.starts_with("451 4.4.3"), "29 minutes later: {reply}");
    clock.advance(60);
    let (mut c, reply) = rcpt_from(retrier, "someone@tempfail.test").await;
    assert!(reply.starts_with("250"), "30 minutes after the first attempt: {reply}");
    assert!(c.cmd("DATA").await.starts_with("354"));
    assert!(c.cmd("Subject: at last\r\n\r\nhello\r\n.").await.starts_with("250"));
    let (_, reply) = rcpt_from(w.ip(114), "someone@tempfail.test").await;
    assert!(reply.starts_with("451 4.4.3"), "another client's first attempt: {reply}");
    assert_eq!(server.stats().bans.load(Ordering::Relaxed), 0);
    assert_eq!(server.stats().delivered.load(Ordering::Relaxed), 2);

    let _ = stop.send(());
    running.await.unwrap().unwrap();
}
