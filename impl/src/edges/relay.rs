//! The production downstream towards a real MTA: [`SmtpRelay`], which relays each accepted
//! message over SMTP with lettre. Messages arrive into files in its `tmp/` directory like the
//! Maildir spool's; lettre sends from memory, so a message is read back whole only for its
//! handoff, and those reads share one byte budget: relays wait for it, memory does not grow
//! with the number of messages handed off at once.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::clock::Clock;
use super::message::{MessageFile, available_space};
use super::ports::{BoxFuture, Downstream};
use super::trace::trace_headers;
use crate::proto::{ForwardPath, Mailbox, ReversePath};
use crate::session::{DeliveryError, Envelope};

/// Relays accepted messages to a downstream SMTP server (the real MTA) with lettre. The 250
/// is given only once the downstream has said 250 itself.
#[derive(Debug)]
pub struct SmtpRelay {
    transport: lettre::AsyncSmtpTransport<lettre::Tokio1Executor>,
    hostname: String,
    clock: Arc<dyn Clock>,
    /// Where messages are written as they arrive.
    tmp: PathBuf,
    counter: AtomicU64,
    timeout: Duration,
    /// Octets of messages read back for handoffs in progress, at most `memory_max`.
    memory: tokio::sync::Semaphore,
    memory_max: u64,
}

/// The relay's budget for messages read back at once: at least this, and at least one
/// largest message.
pub const RELAY_MEMORY_MIN: u64 = 64 * 1024 * 1024;

impl SmtpRelay {
    /// A relay to `addr` (plain SMTP, as to a local MTA on loopback) with a per-message
    /// timeout; messages arrive into `tmp` (created if needed, emptied of a crash's
    /// leftovers), and handoffs in progress hold at most `memory_max` octets of messages
    /// (at least [`RELAY_MEMORY_MIN`]).
    pub fn new(
        addr: SocketAddr,
        hostname: &str,
        timeout: Duration,
        clock: Arc<dyn Clock>,
        tmp: PathBuf,
        memory_max: u64,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(&tmp)?;
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
            }
        }
        let transport = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(addr.ip().to_string())
            .port(addr.port())
            .timeout(Some(timeout))
            .hello_name(lettre::transport::smtp::extension::ClientId::Domain(hostname.to_string()))
            .build();
        let memory_max = memory_max.clamp(RELAY_MEMORY_MIN, u64::from(u32::MAX));
        Ok(SmtpRelay {
            transport,
            hostname: hostname.to_string(),
            clock,
            tmp,
            counter: AtomicU64::new(0),
            timeout,
            memory: tokio::sync::Semaphore::new(memory_max as usize),
            memory_max,
        })
    }
}

fn lettre_address(m: &Mailbox) -> Result<lettre::Address, DeliveryError> {
    m.to_string().parse().map_err(|e| DeliveryError::Permanent(format!("address {m} not relayable: {e}")))
}

impl Downstream for SmtpRelay {
    fn create(&self, envelope: &Envelope) -> io::Result<MessageFile> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let id = format!("G{}.{n}.{}", envelope.session, std::process::id());
        let head = trace_headers(envelope, &self.hostname, &id, self.clock.wall());
        MessageFile::create(&self.tmp, &id, head.as_bytes())
    }

    fn available(&self) -> Option<u64> {
        available_space(&self.tmp).ok()
    }

    fn deliver<'a>(
        &'a self,
        envelope: &'a Envelope,
        message: MessageFile,
    ) -> BoxFuture<'a, Result<String, DeliveryError>> {
        use lettre::AsyncTransport;
        Box::pin(async move {
            let from = match &envelope.from {
                ReversePath::Null => None,
                ReversePath::Mailbox(m) => Some(lettre_address(m)?),
            };
            let mut to = Vec::with_capacity(envelope.rcpts.len());
            for r in &envelope.rcpts {
                match r {
                    ForwardPath::Mailbox(m) => to.push(lettre_address(m)?),
                    ForwardPath::Postmaster => to.push("postmaster@localhost".parse().expect("valid address")),
                }
            }
            let lettre_envelope = lettre::address::Envelope::new(from, to)
                .map_err(|e| DeliveryError::Permanent(format!("bad envelope: {e}")))?;
            let id = message.id().to_string();
            // Read back whole (lettre sends from memory) within the shared budget.
            let mut whole = message.whole().map_err(|e| DeliveryError::Temporary(format!("cannot read {id}: {e}")))?;
            let size = whole.remaining().min(self.memory_max) as u32;
            let permit = tokio::time::timeout(self.timeout, self.memory.acquire_many(size))
                .await
                .map_err(|_| DeliveryError::Temporary("relay busy: too many messages being handed off".into()))?
                .map_err(|e| DeliveryError::Temporary(e.to_string()))?;
            let mut content = Vec::with_capacity(whole.remaining() as usize);
            whole.read_to_end(&mut content).map_err(|e| DeliveryError::Temporary(format!("cannot read {id}: {e}")))?;
            let sent = self.transport.send_raw(&lettre_envelope, &content).await;
            drop(content);
            drop(permit);
            drop(message); // removes the file
            match sent {
                Ok(response) => Ok(format!("{id} ({})", response.message().collect::<Vec<_>>().join(" "))),
                Err(e) if e.is_permanent() => Err(DeliveryError::Permanent(e.to_string())),
                Err(e) => Err(DeliveryError::Temporary(e.to_string())),
            }
        })
    }
}
