//! STARTTLS (RFC 3207) as an edge: a stream wrapper beneath the session. The session only
//! learns that TLS is available ([`Session::offer_tls`](crate::session::Session::offer_tls))
//! and when it has started; the handshake, the certificate and the limits live here. The
//! simulation configures no TLS and runs the same session and server code.
//!
//! - `[tls] cert` / `key`: PEM files (a chain, leaf first; a PKCS#8, PKCS#1 or SEC1 key),
//!   read by [`TlsSection::load`], which lists every problem; [`Tls::reload`] swaps them in
//!   on SIGHUP for new handshakes, while sessions already on TLS keep theirs.
//! - A handshake has `handshake_timeout` to finish, and at most `max_handshakes` run at once:
//!   a STARTTLS beyond gets 454 4.7.0 and the session goes on in clear text, so a flood of
//!   handshakes costs a bounded amount of CPU and never holds more than its share of tasks.
//! - rustls with the *ring* provider: no OpenSSL, TLS 1.2 and 1.3.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

/// `[tls]`: STARTTLS, off unless `cert` and `key` are given.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// The certificate chain, PEM, leaf first; relative to the config file.
    pub cert: Option<PathBuf>,
    /// Its private key, PEM; relative to the config file.
    pub key: Option<PathBuf>,
    /// How long a handshake may take after our 220 to STARTTLS.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Handshakes under way at once; a STARTTLS beyond gets 454 4.7.0.
    pub max_handshakes: usize,
}

/// `tls.handshake_timeout` by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `tls.max_handshakes` by default: a few per core is what the CPU can do at once anyway.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert: None,
            key: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
        }
    }
}

impl TlsSection {
    /// The rustls configuration of `cert` and `key` (resolved against `base`, the config
    /// file's directory), `None` when TLS is off; or every problem, each naming its field.
    pub fn load(&self, base: Option<&Path>) -> Result<Option<Arc<ServerConfig>>, Vec<String>> {
        let mut problems = Vec::new();
        if self.max_handshakes == 0 {
            problems.push("tls.max_handshakes: must be at least 1".into());
        }
        if self.handshake_timeout.is_zero() || self.handshake_timeout > crate::config::WAIT_MAX {
            problems.push("tls.handshake_timeout: must be longer than 0s and at most a day".into());
        }
        let resolve = |p: &PathBuf| base.map_or_else(|| p.clone(), |b| b.join(p));
        let config = match (&self.cert, &self.key) {
            (None, None) => None,
            (Some(_), None) => {
                problems.push("tls.key: needed with tls.cert".into());
                None
            }
            (None, Some(_)) => {
                problems.push("tls.cert: needed with tls.key".into());
                None
            }
            (Some(cert), Some(key)) => match server_config(&resolve(cert), &resolve(key)) {
                Ok(c) => Some(c),
                Err(p) => {
                    problems.extend(p);
                    None
                }
            },
        };
        if problems.is_empty() { Ok(config) } else { Err(problems) }
    }
}

/// A rustls server configuration from PEM files: every problem (unreadable file, no
/// certificate, no key, a key that does not match) is listed.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, Vec<String>> {
    let mut problems = Vec::new();
    let chain: Vec<CertificateDer<'static>> = match CertificateDer::pem_file_iter(cert) {
        Ok(iter) => match iter.collect::<Result<Vec<_>, _>>() {
            Ok(chain) if chain.is_empty() => {
                problems.push(format!("tls.cert: {}: no CERTIFICATE in it", cert.display()));
                chain
            }
            Ok(chain) => chain,
            Err(e) => {
                problems.push(format!("tls.cert: {}: {e}", cert.display()));
                Vec::new()
            }
        },
        Err(e) => {
            problems.push(format!("tls.cert: cannot read {}: {e}", cert.display()));
            Vec::new()
        }
    };
    let key = match PrivateKeyDer::from_pem_file(key) {
        Ok(k) => Some(k),
        Err(e) => {
            problems.push(format!("tls.key: {}: {e}", key.display()));
            None
        }
    };
    let (Some(key), true) = (key, problems.is_empty()) else { return Err(problems) };
    // ring, not aws-lc-rs: it builds with a C compiler alone (aws-lc wants cmake and takes
    // minutes). Its one lack, deprecated for: no post-quantum key exchange (X25519MLKEM768);
    // X25519 and the NIST curves remain, which opportunistic SMTP TLS is content with.
    #[allow(deprecated)]
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| vec![format!("tls: {e}")])?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map(Arc::new)
        .map_err(|e| vec![format!("tls.key: does not fit tls.cert {}: {e}", cert.display())])
}

/// The server's TLS: the current configuration (swapped on reload), the handshake limits and
/// their counters.
#[derive(Debug)]
pub struct Tls {
    config: RwLock<Arc<ServerConfig>>,
    handshakes: Arc<Semaphore>,
    timeout: Duration,
    /// Handshakes completed.
    pub completed: AtomicU64,
    /// Handshakes failed or timed out.
    pub failed: AtomicU64,
    /// STARTTLS refused with 454 because `max_handshakes` were under way.
    pub refused: AtomicU64,
}

impl Tls {
    /// TLS with `config`, at most `max_handshakes` at once, each within `timeout`.
    pub fn new(config: Arc<ServerConfig>, max_handshakes: usize, timeout: Duration) -> Self {
        Tls {
            config: RwLock::new(config),
            handshakes: Arc::new(Semaphore::new(max_handshakes.max(1))),
            timeout,
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// New handshakes use `config` (a renewed certificate); sessions on TLS keep theirs.
    pub fn reload(&self, config: Arc<ServerConfig>) {
        *self.config.write().expect("tls config lock") = config;
    }

    /// A place among the concurrent handshakes, if one is free now.
    pub fn permit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.handshakes.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        permit
    }

    async fn accept<S>(&self, stream: S, permit: OwnedSemaphorePermit) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.config.read().expect("tls config lock").clone();
        let result = tokio::time::timeout(self.timeout, TlsAcceptor::from(config).accept(stream))
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timeout")));
        drop(permit);
        let counter = if result.is_ok() { &self.completed } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }
}

/// A connection, in clear text or upgraded to TLS by STARTTLS.
#[derive(Debug)]
pub enum Conn<S> {
    /// Clear text.
    Plain(S),
    /// After STARTTLS.
    Tls(Box<TlsStream<S>>),
    /// A failed handshake took the stream.
    Gone,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// The TLS handshake over the clear-text stream, holding `permit` until it ends. On
    /// error the connection is gone (the stream is in no state to carry SMTP).
    pub async fn upgrade(&mut self, tls: &Tls, permit: OwnedSemaphorePermit) -> io::Result<()> {
        let Conn::Plain(stream) = std::mem::replace(self, Conn::Gone) else {
            return Err(io::Error::other("STARTTLS on a connection not in clear text"));
        };
        *self = Conn::Tls(Box::new(tls.accept(stream, permit).await?));
        Ok(())
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection gone after a failed TLS handshake")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Gone => Poll::Ready(Err(gone())),
        }
    }
}
