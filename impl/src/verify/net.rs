//! The connector edge of callback verification: opens a TCP stream to a remote MX.
//!
//! [`Connector`] is object-safe and returns a boxed stream, so the probe runs unchanged over
//! tokio sockets here and over turmoil sockets in the simulation (which boxes its own stream
//! newtype). No timeout lives here: the probe bounds every stage itself.

use std::fmt;
use std::io;
use std::net::SocketAddr;

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

/// The production connector: plain tokio TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioConnector;

impl Connector for TokioConnector {
    fn connect(&self, addr: SocketAddr) -> BoxFuture<'_, io::Result<BoxStream>> {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            // Commands are small and each waits for its reply: no Nagle delay.
            let _ = stream.set_nodelay(true);
            Ok(Box::new(stream) as BoxStream)
        })
    }
}
