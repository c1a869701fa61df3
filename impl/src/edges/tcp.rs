//! The production [`Listener`]: a tokio TCP listener bound with a listen backlog deep enough
//! for a flood, and the descriptor limit ([`raise_nofile_limit`]) its connections need.

use std::io;
use std::net::SocketAddr;

use super::ports::Listener;

/// Listen backlog of [`tcp_listener`]: room for a burst of SYNs while the accept loop is busy
/// (the kernel caps it at `net.core.somaxconn`, 4096 since Linux 5.4). tokio's and std's
/// `bind` ask for 128, which a flood overflows: the overflowing clients' SYNs are dropped and
/// only retransmitted a second later (measured by the load benchmark: 500 clients connecting at
/// once, 127 of them waited 1 s).
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener on `addr` with [`LISTEN_BACKLOG`] and `SO_REUSEADDR` (as std does).
/// Must be called inside a tokio runtime.
pub fn tcp_listener(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Descriptors the process needs besides its connections: the listener, the databases, logs,
/// the ban backend, connections to clamd, the relay and callback targets.
pub const NOFILE_SPARE: u64 = 256;

/// `RLIMIT_NOFILE` after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit before.
    pub was: u64,
    /// The soft limit now in force (the hard limit, if it could be raised).
    pub now: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (systemd and most shells start services
/// with a soft limit of 1024, far below a mail server's connections), and returns what is in
/// force. Infinite limits are reported as `u64::MAX`.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let was = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    if was >= hard {
        return Ok(NofileLimit { was, now: was });
    }
    setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum })?;
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    Ok(NofileLimit { was, now })
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        // Replies are small and written once per batch: no Nagle delay.
        let _ = stream.set_nodelay(true);
        Ok((stream, peer))
    }
    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::TcpListener::local_addr(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_soft_limit_is_raised_to_the_hard_limit() {
        let limit = raise_nofile_limit().unwrap();
        assert!(limit.now >= limit.was);
        let again = raise_nofile_limit().unwrap();
        assert_eq!(again, NofileLimit { was: limit.now, now: limit.now }, "already at the hard limit");
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum.unwrap_or(u64::MAX);
        assert_eq!(limit.now, hard);
    }

    #[tokio::test]
    async fn tcp_listener_accepts() {
        let listener = tcp_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_stream, peer) = tokio::net::TcpListener::accept(&listener).await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
    }
}
