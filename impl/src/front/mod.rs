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

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::edges::Listener;

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
    L: Listener,
    F: Fn(L::Stream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tracing::info!(listen = %listener.local_addr()?, front = what, "listening");
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => match accepted {
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
