//! The production [`Listener`]: a tokio TCP listener bound with a listen backlog deep enough
//! for a flood.

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

    #[tokio::test]
    async fn tcp_listener_accepts() {
        let listener = tcp_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_stream, peer) = tokio::net::TcpListener::accept(&listener).await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
    }
}
