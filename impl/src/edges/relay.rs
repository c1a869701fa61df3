//! The production downstream towards a real MTA: [`SmtpRelay`], which relays each accepted
//! message over SMTP with lettre.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::clock::Clock;
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
}

impl SmtpRelay {
    /// A relay to `addr` (plain SMTP, as to a local MTA on loopback) with a per-message timeout.
    pub fn new(addr: SocketAddr, hostname: &str, timeout: Duration, clock: Arc<dyn Clock>) -> Self {
        let transport = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::builder_dangerous(addr.ip().to_string())
            .port(addr.port())
            .timeout(Some(timeout))
            .hello_name(lettre::transport::smtp::extension::ClientId::Domain(hostname.to_string()))
            .build();
        SmtpRelay { transport, hostname: hostname.to_string(), clock }
    }
}

fn lettre_address(m: &Mailbox) -> Result<lettre::Address, DeliveryError> {
    m.to_string().parse().map_err(|e| DeliveryError::Permanent(format!("address {m} not relayable: {e}")))
}

impl Downstream for SmtpRelay {
    fn deliver<'a>(&'a self, envelope: &'a Envelope, message: Bytes) -> BoxFuture<'a, Result<String, DeliveryError>> {
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
            let id = format!("G{}", envelope.session);
            let mut content = trace_headers(envelope, &self.hostname, &id, self.clock.wall()).into_bytes();
            content.extend_from_slice(&message);
            match self.transport.send_raw(&lettre_envelope, &content).await {
                Ok(response) => Ok(format!("{id} ({})", response.message().collect::<Vec<_>>().join(" "))),
                Err(e) if e.is_permanent() => Err(DeliveryError::Permanent(e.to_string())),
                Err(e) => Err(DeliveryError::Temporary(e.to_string())),
            }
        })
    }
}
