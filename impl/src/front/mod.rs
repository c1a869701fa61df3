//! Front ends beside the SMTP server (docs/design.md §6, "Front ends are drivers"): the
//! Postfix policy service and the milter. Each parses its own protocol sans-IO ([`policy`],
//! [`milter`]) and drives the same [`Session`](crate::session::Session), rules, tallies,
//! verifier and ban manager as the SMTP server, through the server's front-end methods; a
//! verdict becomes an `action=` or a milter response only here, at the edge.

pub mod milter;
pub mod milter_service;
pub mod policy;
pub mod policy_service;

pub use self::milter_service::{MilterSection, MilterService};
pub use self::policy::{Answer, PolicyError, PolicyEvent, PolicyReceiver, Request};
pub use self::policy_service::{OnTimeout, PolicySection, PolicyService};

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;

use crate::edges::Listener;

/// The longest path a Unix-domain socket address holds (`sun_path`, 108 octets with its NUL).
pub const UNIX_PATH_MAX: usize = 107;

/// Where the policy service or the milter listens: `address:port`, or `unix:/absolute/path`
/// for a Unix-domain socket (what Postfix writes `unix:/path` in `check_policy_service` and
/// `smtpd_milters`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontAddr {
    /// TCP.
    Tcp(SocketAddr),
    /// A Unix-domain socket at this absolute path.
    Unix(PathBuf),
}

impl FrontAddr {
    /// Parses `192.0.2.1:10040`, `[::1]:10040` or `unix:/run/gatekeeper/policy.sock`;
    /// `Err` says what is wrong.
    pub fn parse(s: &str) -> Result<FrontAddr, String> {
        match s.strip_prefix("unix:") {
            Some(path) => {
                let path = Path::new(path);
                if !path.is_absolute() || path.file_name().is_none() {
                    Err(format!("{s:?}: a Unix socket needs an absolute path (unix:/run/gatekeeper/NAME.sock)"))
                } else if path.as_os_str().len() > UNIX_PATH_MAX {
                    Err(format!("{s:?}: a Unix socket path is at most {UNIX_PATH_MAX} octets"))
                } else {
                    Ok(FrontAddr::Unix(path.to_path_buf()))
                }
            }
            None => s.parse().map(FrontAddr::Tcp).map_err(|_| format!("{s:?} is not an address:port or unix:/path")),
        }
    }

    /// The TCP address, if it is one.
    pub fn tcp(&self) -> Option<SocketAddr> {
        match self {
            FrontAddr::Tcp(a) => Some(*a),
            FrontAddr::Unix(_) => None,
        }
    }
}

impl fmt::Display for FrontAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrontAddr::Tcp(a) => write!(f, "{a}"),
            FrontAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What the policy service and the milter accept connections from: any [`Listener`] (TCP,
/// the simulation's), or a Unix-domain socket. The peer is only named in logs: both protocols
/// carry the SMTP client's address themselves.
pub trait FrontListener: Send + 'static {
    /// A connected stream.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Waits for the next connection; the peer as logs name it.
    fn accept_front(&mut self) -> impl Future<Output = io::Result<(Self::Stream, String)>> + Send;
    /// What is listened on, for the log.
    fn describe(&self) -> String;
}

impl<L: Listener> FrontListener for L {
    type Stream = L::Stream;

    async fn accept_front(&mut self) -> io::Result<(Self::Stream, String)> {
        let (stream, peer) = self.accept().await?;
        Ok((stream, peer.to_string()))
    }

    fn describe(&self) -> String {
        self.local_addr().map_or_else(|e| format!("? ({e})"), |a| a.to_string())
    }
}

impl FrontListener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;

    async fn accept_front(&mut self) -> io::Result<(Self::Stream, String)> {
        let (stream, _) = self.accept().await?;
        // MTAs connect from unnamed sockets: the peer's credentials name it instead.
        let peer = match stream.peer_cred() {
            Ok(c) => format!("unix(uid={}, pid={})", c.uid(), c.pid().unwrap_or(0)),
            Err(_) => "unix".into(),
        };
        Ok((stream, peer))
    }

    fn describe(&self) -> String {
        match self.local_addr().map(|a| a.as_pathname().map(Path::to_path_buf)) {
            Ok(Some(p)) => format!("unix:{}", p.display()),
            _ => "unix:?".into(),
        }
    }
}

/// Binds a Unix-domain socket at `path` for an MTA to connect to, mode 0660 (owner and group
/// only; the socket's directory should let the MTA's user through), chowned to `owner` and/or
/// `group` (uids and gids) where given. A socket left at `path` by an earlier run is removed
/// first, unless something still accepts on it (another gatekeeper: `AddrInUse`); any other
/// kind of file is left alone (`AlreadyExists`).
pub fn bind_unix(path: &Path, owner: Option<u32>, group: Option<u32>) -> io::Result<std::os::unix::net::UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, "another process accepts on this socket"));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(io::ErrorKind::AlreadyExists, "exists and is not a socket: not replaced"));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::chown(path, owner, group)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Accepts connections from `listener` until `shutdown` completes, one task running
/// `connection` for each while fewer than `max` run (one more is closed at once, logged);
/// then every connection ends (the MTA applies its default action to what was under way).
/// `what` names the front end in the logs.
async fn accept_loop<L, F, Fut>(
    what: &'static str,
    mut listener: L,
    max: usize,
    shutdown: impl Future<Output = ()>,
    connection: F,
) -> io::Result<()>
where
    L: FrontListener,
    F: Fn(L::Stream, String) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tracing::info!(listen = %listener.describe(), front = what, "listening");
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept_front() => match accepted {
                Ok((stream, peer)) if tasks.len() < max => {
                    tasks.spawn(connection(stream, peer));
                }
                Ok((_, peer)) => tracing::warn!(%peer, max, front = what, "too many connections"),
                Err(e) => {
                    tracing::warn!(error = %e, front = what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_tcp_or_unix() {
        assert_eq!(FrontAddr::parse("127.0.0.1:10040"), Ok(FrontAddr::Tcp("127.0.0.1:10040".parse().unwrap())));
        assert_eq!(FrontAddr::parse("[::1]:10041").unwrap().to_string(), "[::1]:10041");
        let unix = FrontAddr::parse("unix:/run/gatekeeper/milter.sock").unwrap();
        assert_eq!(unix, FrontAddr::Unix("/run/gatekeeper/milter.sock".into()));
        assert_eq!(unix.to_string(), "unix:/run/gatekeeper/milter.sock");
        assert_eq!(unix.tcp(), None);
        for bad in ["unix:milter.sock", "unix:", "unix:/", "localhost:10040", "10040"] {
            assert!(FrontAddr::parse(bad).is_err(), "{bad}");
        }
        let long = format!("unix:/{}", "a".repeat(UNIX_PATH_MAX));
        assert!(FrontAddr::parse(&long).unwrap_err().contains("at most 107"));
    }

    #[test]
    fn unix_sockets_replace_a_stale_one_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("milter.sock");
        let first = bind_unix(&path, None, None).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // Something accepts on it: not taken over.
        assert_eq!(bind_unix(&path, None, None).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        // Left behind by a process that is gone: replaced.
        drop(first);
        let _second = bind_unix(&path, None, None).unwrap();
        // Not a socket: left alone.
        let file = dir.path().join("policy.sock");
        std::fs::write(&file, "data").unwrap();
        assert_eq!(bind_unix(&file, None, None).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "data");
    }
}
