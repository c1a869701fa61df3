//! What the other front ends (the Postfix policy service, the milter) share with the SMTP
//! server: the same session configuration and directory, the same per-client tallies (B4, the
//! probe exemption, the share test, C1's unknown senders), the same ban table, ban sink,
//! verifier, scanner and observer (docs/design.md §6, "Front ends are drivers"). They drive a
//! [`Session`] with the facts their protocol gives and carry its actions out through these
//! methods; no rule is written twice.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Server, Shared};
use crate::edges::{BanOrder, MessageFile};
use crate::policy::{BanRequest, OnUnknown, ScanOutcome, Verification};
use crate::proto::{Mailbox, Reply, escape};
use crate::session::{ClientInfo, Session, SessionConfig};

impl Server {
    /// The session configuration of new sessions (of every front end; swapped by a reload).
    pub fn session_config(&self) -> Arc<SessionConfig> {
        self.shared.live.read().expect("live lock").0.clone()
    }

    /// Now, on the server's clock.
    pub fn now(&self) -> Instant {
        self.shared.clock.now()
    }

    /// A fresh session id (logs, bans, queue ids), from the same sequence as SMTP sessions.
    pub fn next_session_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A session for a client another front end reports (Postfix's `client_address`, a
    /// milter's `{client_addr}`): it knows the client's B4 record and whether it may be
    /// banned, exactly as an SMTP connection's session does. No gate: the MTA in front owns
    /// the connection (G1 stays in the kernel).
    pub fn front_session(&self, now: Instant, id: u64, addr: IpAddr) -> Session {
        let addr = addr.to_canonical();
        let key = self.shared.client_key(addr);
        let client = {
            let t = self.shared.tallies.lock().expect("tallies lock");
            ClientInfo {
                unknown_before: t.offences.count(now, key),
                probes_before: t.probes.count(now, key),
                valid_before: t.valid.count(now, key),
                exempt: self.shared.exempt(addr),
                ..ClientInfo::new(id, addr)
            }
        };
        let (cfg, dir) = self.shared.live.read().expect("live lock").clone();
        Session::new(now, cfg, dir, client)
    }

    /// The session is over: its B4 record goes into the client's tallies, as an SMTP
    /// session's does when its connection ends.
    pub fn front_finish(&self, session: &Session) {
        let addr = session.client().addr;
        self.shared.record_b4(session, self.shared.client_key(addr));
    }

    /// Records a ban the session asked for ([`crate::session::Action::Ban`]).
    pub async fn front_ban(&self, addr: IpAddr, session: u64, request: BanRequest) {
        self.shared.apply_ban(addr, session, request).await;
    }

    /// The callback probe of `sender` (C1), as an owned future: a front end that must answer
    /// sooner than the probe takes may leave it running (its result goes into the cache).
    pub fn front_probe(&self, sender: Mailbox) -> impl Future<Output = Verification> + Send + 'static {
        let shared = self.shared.clone();
        async move { shared.probe(&sender).await }
    }

    /// C1's wait for an unknown result (see [`Session::handle_verified`]).
    pub fn front_waited(&self, session: &Session, result: &Verification, sender: &Mailbox) -> Duration {
        self.shared.unknown_waited(result, sender, session.client().addr, session.config().on_unknown)
    }

    /// A front end's session asked for a callback ([`Action::Verify`](crate::session::Action)):
    /// probes `sender` and hands the result to the session, or, if it is not there by
    /// `deadline`, logs the session's events and returns `false` (the front end answers its
    /// MTA without it; the probe goes on and fills the cache).
    pub async fn front_verify(&self, session: &mut Session, sender: Mailbox, deadline: tokio::time::Instant) -> bool {
        let mut probe = tokio::spawn(self.front_probe(sender.clone()));
        let result = match tokio::time::timeout_at(deadline, &mut probe).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Verification::Unknown { evidence: format!("probe failed: {e}") },
            Err(_) => {
                self.front_events(session);
                return false;
            }
        };
        let waited = self.front_waited(session, &result, &sender);
        session.handle_verified(self.now(), result, waited);
        true
    }

    /// After a front end's session was given input and its actions were carried out: logs its
    /// events and returns its first reply, and the 421 that closed it if one did (the first
    /// reply itself, or a later one).
    pub fn front_replies(&self, session: &mut Session) -> (Option<Reply>, Option<Reply>) {
        self.front_events(session);
        let mut replies = std::iter::from_fn(|| session.poll_reply());
        let first = replies.next();
        let closing = replies.filter(|r| r.code == 421).last().or_else(|| first.clone().filter(|r| r.code == 421));
        (first, closing)
    }

    /// Scans a message file (V1); `Failed` without a scanner.
    pub async fn front_scan(&self, file: &MessageFile) -> ScanOutcome {
        self.shared.scan(file).await
    }

    /// Logs the session's verdict events and hands them to the observer.
    pub fn front_events(&self, session: &mut Session) {
        let (addr, id) = (session.client().addr, session.client().id);
        let _ = self.shared.log_events(session, addr, id);
    }
}

impl Shared {
    /// A ban the rules asked for: in force at once in the server's table, then handed to the
    /// ban sink (persistence, the kernel); returns once the sink has it.
    pub(super) async fn apply_ban(&self, addr: IpAddr, sid: u64, request: BanRequest) {
        if self.limits.proxy_trusted.contains(&addr) {
            // Sessions of trusted peers are exempt and never ask; guard anyway.
            tracing::warn!(client = %addr, ban = request.reason.as_str(), "trusted proxy: not banned");
            return;
        }
        let duration = self.gate_config.ban_time;
        // In force at once; the manager's mirror then sets its escalated length.
        self.bans.lock().expect("bans lock").ban(self.clock.now(), self.ban_key(addr), duration);
        self.stats.bans.fetch_add(1, Ordering::Relaxed);
        self.metrics.bans.get_or_create(&super::ReasonLabel { reason: request.reason.as_str() }).inc();
        tracing::info!(reason = request.reason.as_str(), evidence = %escape(&request.evidence), ?duration, "ban");
        if let Some(sink) = &self.ban_sink {
            let order = BanOrder::from_request(addr, sid, request).decided_at(self.clock.wall()).lasting(duration);
            sink.ban(order).await;
        }
    }

    /// The callback probe of `sender`, logged; `Unknown` without a verifier.
    pub(super) async fn probe(&self, sender: &Mailbox) -> Verification {
        let start = self.clock.now();
        let result = match &self.verifier {
            Some(v) => v.verify(sender).await,
            None => Verification::Unknown { evidence: "no verifier configured".into() },
        };
        let took = self.clock.now().saturating_duration_since(start);
        self.metrics.callback(&result, took.as_secs_f64());
        tracing::info!(sender = %sender, ?result, "callback");
        result
    }

    /// C1: an unknown sender is tempfailed only for a while after this client network's
    /// first attempt with it; how long ago that was (zero for other results).
    pub(super) fn unknown_waited(
        &self,
        result: &Verification,
        sender: &Mailbox,
        addr: IpAddr,
        on_unknown: OnUnknown,
    ) -> Duration {
        match result {
            Verification::Unknown { .. } if on_unknown == OnUnknown::Tempfail => {
                let key = self.client_key(addr);
                let mut t = self.tallies.lock().expect("tallies lock");
                t.unknown_senders.waited(self.clock.now(), key, &sender.to_string())
            }
            _ => Duration::ZERO,
        }
    }
}
