//! The connector edge of callback verification: opens a TCP stream to a remote MX.
//!
//! [`Connector`] is object-safe and returns a boxed stream, so the probe runs unchanged over
//! tokio sockets here and over turmoil sockets in the simulation (which boxes its own stream
//! newtype). No timeout lives here: the probe bounds every stage itself.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::edges::BoxFuture;

/// A connected byte stream the probe can speak SMTP over.
pub trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin + fmt::Debug {}

impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + fmt::Debug> Stream for T {}

/// A boxed [`Stream`].
pub type BoxStream = Box<dyn Stream>;

/// Opens connections to remote MX hosts.
pub trait Connector: Send + Sync + fmt::Debug {
    /// Connects to `addr`; errors are reported as the probe's evidence.
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxStream>>;
}

/// The production connector: plain tokio TCP, never to one of this host's own addresses (a
/// sender domain whose MX is us would make every probe a session with ourselves).
#[derive(Debug, Clone, Default)]
pub struct TokioConnector {
    own: Vec<IpAddr>,
}

impl TokioConnector {
    /// Refuses the addresses of this host's interfaces, as they are now.
    pub fn new() -> Self {
        TokioConnector { own: interface_addresses() }
    }

    /// Refuses exactly `own` (tests).
    pub fn refusing(own: Vec<IpAddr>) -> Self {
        TokioConnector { own }
    }
}

impl Connector for TokioConnector {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxStream>> {
        Box::pin(async move {
            let ip = addr.ip().to_canonical();
            if ip.is_unspecified() || self.own.contains(&ip) {
                return Err(io::Error::new(io::ErrorKind::AddrNotAvailable, "one of our own addresses: not probed"));
            }
            let stream = tokio::net::TcpStream::connect(addr).await?;
            // Commands are small and each waits for its reply: no Nagle delay.
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as BoxStream)
        })
    }
}

/// The addresses of this host's interfaces (empty if they cannot be read: the global-address
/// rule in the probe still keeps every inside address out).
fn interface_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut own: Vec<IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|sa| {
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()).to_canonical())
            }
        })
        .collect();
    own.sort_unstable();
    own.dedup();
    own
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_hosts_addresses() {
        // Every Linux host has its loopback interface.
        assert!(TokioConnector::new().own.contains(&IpAddr::from([127, 0, 0, 1])));
    }

    #[tokio::test]
    async fn never_connects_to_itself() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refusing = TokioConnector::refusing(vec![addr.ip()]);
        let e = refusing.connect(addr).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrNotAvailable);
        let mapped = SocketAddr::new(IpAddr::V6(std::net::Ipv4Addr::LOCALHOST.to_ipv6_mapped()), addr.port());
        assert!(refusing.connect(mapped).await.is_err());
        assert!(TokioConnector::refusing(Vec::new()).connect(addr).await.is_ok());
    }
}
