//! DNS inside the simulation: hickory's resolver runtime over turmoil sockets (for the
//! gatekeeper's real callback verifier) and a DNS server host that serves the remote pools'
//! MX and address records from a hickory `Catalog` over turmoil UDP (docs/simulation.md).
//!
//! Time comes from tokio's clock, which turmoil drives, and `turmoil::since_epoch` for wall
//! time; nothing here reads the OS clock. The server drops every query while a `dns_outage`
//! fault is active, so resolvers time out exactly as they would against a dead server.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use hickory_resolver::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_resolver::net::runtime::{DnsTcpStream, DnsUdpSocket, RuntimeProvider, Time, TokioHandle};
use hickory_server::net::BufDnsStreamHandle;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::rr::rdata::{A, MX, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandle};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};

use gatekeeper::edges::BoxFuture;
use gatekeeper::proto::Domain;
use gatekeeper::verify::{DnsSettings, HickoryResolver, MxLookup, MxResolver, ResolveError};

use crate::scenario::Behaviour;
use crate::world::World;

/// The address of a host that does not exist: connecting to it is refused at once.
pub const DEAD_MX: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// hickory's runtime over turmoil: UDP and TCP sockets of the current simulated host, tokio's
/// (simulated) timers.
#[derive(Clone, Default)]
pub struct TurmoilRuntime {
    handle: TokioHandle,
}

impl std::fmt::Debug for TurmoilRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TurmoilRuntime")
    }
}

/// Timers on tokio's clock; wall time from the simulation's epoch.
#[derive(Debug, Clone, Copy)]
pub struct SimTime;

#[async_trait::async_trait]
impl Time for SimTime {
    async fn delay_for(duration: Duration) {
        crate::wake::sleep(duration).await;
    }

    async fn timeout<F: 'static + Future + Send>(duration: Duration, future: F) -> Result<F::Output, io::Error> {
        crate::wake::timeout(duration, future).await.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))
    }

    fn current_time() -> u64 {
        turmoil::since_epoch().unwrap_or_default().as_secs()
    }
}

type Readable = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// A turmoil UDP socket with the poll interface hickory wants: `try_recv_from` plus a stored
/// `readable()` future.
pub struct SimUdp {
    socket: Arc<turmoil::net::UdpSocket>,
    readable: Mutex<Option<Readable>>,
}

impl std::fmt::Debug for SimUdp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimUdp").field("socket", &self.socket).finish_non_exhaustive()
    }
}

impl DnsUdpSocket for SimUdp {
    type Time = SimTime;

    fn poll_recv_from(&self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<(usize, SocketAddr)>> {
        loop {
            match self.socket.try_recv_from(buf) {
                Ok(r) => return Poll::Ready(Ok(r)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            let mut slot = self.readable.lock().expect("readable lock");
            let fut = slot.get_or_insert_with(|| {
                let s = self.socket.clone();
                Box::pin(async move { s.readable().await })
            });
            match fut.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => {
                    *slot = None;
                    r?;
                }
            }
        }
    }

    fn poll_send_to(&self, _cx: &mut Context<'_>, buf: &[u8], target: SocketAddr) -> Poll<io::Result<usize>> {
        Poll::Ready(self.socket.try_send_to(buf, target))
    }
}

/// A turmoil TCP stream for hickory (DNS over TCP after a truncated UDP answer).
pub struct SimTcp(AsyncIoTokioAsStd<turmoil::net::TcpStream>);

impl std::fmt::Debug for SimTcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SimTcp").field(&self.0.0).finish()
    }
}

impl futures_io::AsyncRead for SimTcp {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl futures_io::AsyncWrite for SimTcp {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

impl DnsTcpStream for SimTcp {
    type Time = SimTime;
}

impl RuntimeProvider for TurmoilRuntime {
    type Handle = TokioHandle;
    type Timer = SimTime;
    type Udp = SimUdp;
    type Tcp = SimTcp;

    fn create_handle(&self) -> Self::Handle {
        self.handle.clone()
    }

    fn connect_tcp(
        &self,
        server_addr: SocketAddr,
        _bind_addr: Option<SocketAddr>,
        timeout: Option<Duration>,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Tcp>>>> {
        Box::pin(async move {
            let wait = timeout.unwrap_or(Duration::from_secs(5));
            match crate::wake::timeout(wait, turmoil::net::TcpStream::connect(server_addr)).await {
                Ok(Ok(s)) => Ok(SimTcp(AsyncIoTokioAsStd(s))),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "TCP connect timed out")),
            }
        })
    }

    fn bind_udp(
        &self,
        local_addr: SocketAddr,
        _server_addr: SocketAddr,
    ) -> Pin<Box<dyn Send + Future<Output = io::Result<Self::Udp>>>> {
        Box::pin(async move {
            let socket = turmoil::net::UdpSocket::bind(local_addr).await?;
            Ok(SimUdp { socket: Arc::new(socket), readable: Mutex::new(None) })
        })
    }
}

/// The gatekeeper's production resolver ([`HickoryResolver`]) on turmoil, built afresh for
/// every lookup.
///
/// A long-lived hickory resolver keeps a pool of connections per name server and picks among
/// them by a smoothed RTT that starts at a random value from the OS and decays on the real
/// clock (`std::time::Instant`); once concurrent lookups have opened two, which one carries a
/// query — and so the order of packets within a tick — differs between processes. A fresh
/// resolver per lookup has no pool to choose from: each query uses the connection it opened.
/// The response cache is off in production too, so nothing else changes.
#[derive(Debug)]
pub struct FreshResolver {
    settings: DnsSettings,
    seed: u64,
    lookups: AtomicU64,
}

impl FreshResolver {
    /// Resolves with `settings`; `seed` orders MX hosts of equal preference.
    pub fn new(settings: DnsSettings, seed: u64) -> Self {
        FreshResolver { settings, seed, lookups: AtomicU64::new(0) }
    }

    fn resolver(&self) -> Result<HickoryResolver<TurmoilRuntime>, ResolveError> {
        let n = self.lookups.fetch_add(1, Ordering::Relaxed);
        HickoryResolver::with_provider(&self.settings, TurmoilRuntime::default(), self.seed ^ n.rotate_left(32))
    }
}

impl MxResolver for FreshResolver {
    fn lookup_mx<'a>(&'a self, domain: &'a Domain) -> BoxFuture<'a, Result<MxLookup, ResolveError>> {
        Box::pin(async move { self.resolver()?.lookup_mx(domain).await })
    }

    fn lookup_host<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<Vec<IpAddr>, ResolveError>> {
        Box::pin(async move { self.resolver()?.lookup_host(host).await })
    }
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("valid DNS name")
}

fn record(owner: &str, rdata: RData) -> Record {
    Record::from_rdata(name(owner), 300, rdata)
}

/// The zone `remote.test.`: `mx.remote.test` is the remote MX host; every pool domain has an
/// MX per its behaviour (a dead host for `refused`, RFC 7505's `.` for `null_mx`, nothing for
/// `no_domain`).
pub fn zone(world: &World, mx: Ipv4Addr) -> InMemoryZoneHandler<TokioRuntimeProvider> {
    let mut zone = InMemoryZoneHandler::empty(name("remote.test."), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(name("ns.remote.test."), name("hostmaster.remote.test."), 1, 3600, 600, 86_400, 60);
    let mut records = vec![
        record("remote.test.", RData::SOA(soa)),
        record("mx.remote.test.", RData::A(A(mx))),
        record("dead.remote.test.", RData::A(A(DEAD_MX))),
    ];
    for pool in &world.cfg.remotes {
        for i in 0..pool.domains {
            let domain = format!("d{i}.{}.remote.test.", pool.pool);
            let exchange = match pool.behaviour {
                Behaviour::NoDomain => continue,
                Behaviour::NullMx => (0, name(".")),
                Behaviour::Refused => (10, name("dead.remote.test.")),
                _ => (10, name("mx.remote.test.")),
            };
            records.push(record(&domain, RData::MX(MX::new(exchange.0, exchange.1))));
        }
    }
    for r in records {
        zone.upsert_mut(r, 1);
    }
    zone
}

/// The DNS server host: answers from the zone on UDP port 53, except during an outage.
pub async fn serve(world: Arc<World>, mx: Ipv4Addr) -> turmoil::Result {
    let mut catalog = Catalog::new();
    let handler: Arc<dyn ZoneHandler> = Arc::new(zone(&world, mx));
    catalog.upsert(LowerName::from(name("remote.test.")), vec![handler]);
    let socket = turmoil::net::UdpSocket::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), 53)).await?;
    let mut buf = vec![0u8; 4096];
    // The zone never changes during a run, so an answer depends only on the question: the
    // same query (all but its 2-byte ID) gets the same answer (all but the ID) from a cache,
    // not from another walk of the zone. Bounded: emptied when full.
    let mut answered: HashMap<Vec<u8>, Vec<Vec<u8>>> = HashMap::new();
    loop {
        let (n, src) = socket.recv_from(&mut buf).await?;
        if world.cfg.dns_down(world.now()) || n < 12 {
            continue;
        }
        let (id, question) = (&buf[..2], &buf[2..n]);
        if let Some(answers) = answered.get(question) {
            for tail in answers {
                let _ = socket.send_to(&[id, tail].concat(), src).await;
            }
            continue;
        }
        let Ok(request) = Request::from_bytes(buf[..n].to_vec(), src, Protocol::Udp) else { continue };
        let (handle, mut answers) = BufDnsStreamHandle::new(src);
        let response = ResponseHandle::new(src, handle, Protocol::Udp);
        catalog.handle_request::<_, SimTime>(&request, response).await;
        let mut sent = Vec::new();
        while let Some(Some(answer)) = answers.next().now_or_never() {
            let (bytes, to) = answer.into_parts();
            let _ = socket.send_to(&bytes, to).await;
            sent.push(bytes.get(2..).unwrap_or_default().to_vec());
        }
        if answered.len() >= ANSWERS_CACHED {
            answered.clear();
        }
        answered.insert(question.to_vec(), sent);
    }
}

/// The most distinct questions whose answers the simulated DNS server keeps.
const ANSWERS_CACHED: usize = 1 << 16;

/// Polls a future once.
trait NowOrNever: Future + Sized {
    fn now_or_never(self) -> Option<Self::Output>;
}

impl<F: Future> NowOrNever for F {
    fn now_or_never(self) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut fut = std::pin::pin!(self);
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        }
    }
}
