//! The remote MX host: the mail servers of every remote pool's domains, answering the
//! gatekeeper's callback probes per the domain's behaviour (RFC 5321 replies, enhanced codes).
//!
//! It only ever talks to the gatekeeper (honest MTAs and spammers do not receive mail here), so
//! every RCPT it sees is a callback, and it counts them. During an `mx_timeout` fault it greets
//! and then never answers.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::scenario::Behaviour;
use crate::world::World;

/// Serves port 25 until the simulation ends.
pub async fn serve(world: Arc<World>) -> turmoil::Result {
    let listener = turmoil::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::UNSPECIFIED), 25)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let w = world.clone();
        tokio::spawn(async move {
            let _ = session(w, stream).await;
        });
    }
}

async fn session(world: Arc<World>, stream: turmoil::net::TcpStream) -> std::io::Result<()> {
    let (r, mut w) = tokio::io::split(stream);
    let mut r = BufReader::new(r);
    w.write_all(b"220 mx.remote.test ESMTP\r\n").await?;
    let mut line = String::new();
    let mut hang = false;
    // The transaction's MAIL FROM was `<>` (every callback of the gatekeeper's is).
    let mut null_sender = false;
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 || line.len() > 1000 {
            return Ok(());
        }
        if hang || world.cfg.mx_hanging(world.now()) {
            // Read on and never answer, until the prober gives up and closes.
            hang = true;
            continue;
        }
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            b"250-mx.remote.test\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            null_sender = line[10..].trim() == "<>";
            b"250 2.1.0 Ok\r\n"
        } else if upper.starts_with("RCPT TO:") {
            world.state().c.callbacks += 1;
            let address = line[8..].trim().trim_start_matches('<').trim_end_matches('>');
            let (local, domain) = address.rsplit_once('@').unwrap_or((address, ""));
            let user = is_user(local);
            match world.cfg.behaviour_of(&domain.to_ascii_lowercase()) {
                Some(Behaviour::AcceptAll) => b"250 2.1.5 Ok\r\n",
                Some(Behaviour::Normal | Behaviour::Bare550) if user => b"250 2.1.5 Ok\r\n",
                Some(Behaviour::RefuseNull) if null_sender => {
                    b"550 5.7.1 Probes from the null sender are not accepted here\r\n"
                }
                Some(Behaviour::RefuseNull) if user => b"250 2.1.5 Ok\r\n",
                Some(Behaviour::Bare550) => b"550 Requested action not taken\r\n",
                Some(Behaviour::Tempfail) => b"451 4.3.0 Try again later\r\n",
                Some(Behaviour::Timeout) => {
                    hang = true;
                    continue;
                }
                _ => b"550 5.1.1 No such user\r\n",
            }
        } else if upper.starts_with("QUIT") {
            w.write_all(b"221 2.0.0 Bye\r\n").await?;
            return Ok(());
        } else if upper.starts_with("RSET") || upper.starts_with("NOOP") {
            b"250 2.0.0 Ok\r\n"
        } else {
            b"502 5.5.2 Command not implemented\r\n"
        };
        w.write_all(reply).await?;
    }
}

/// The users of a remote domain: `u<digits>`, and the role addresses every MTA accepts
/// (`postmaster`, RFC 5321 §4.5.1; Postfix's `double-bounce`).
fn is_user(local: &str) -> bool {
    (local.len() > 1 && local.starts_with(['u', 'U']) && local[1..].bytes().all(|b| b.is_ascii_digit()))
        || local.eq_ignore_ascii_case("postmaster")
        || local.eq_ignore_ascii_case("double-bounce")
}
