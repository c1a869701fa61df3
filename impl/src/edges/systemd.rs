//! systemd's service notifications (`Type=notify`, sd_notify(3)): `READY=1` once the
//! listeners are bound and the state is loaded, `RELOADING=1` … `READY=1` around a SIGHUP
//! reload, `STOPPING=1` when shutdown begins, and `WATCHDOG=1` at half of `WATCHDOG_USEC`
//! when the unit sets `WatchdogSec=` (contrib/gatekeeper.service).
//!
//! Every call is a no-op when `NOTIFY_SOCKET` is unset (not started by systemd), and a failure
//! to send is logged, never fatal: port 25 must answer whatever the service manager does.

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends `states` to the service manager, if there is one.
fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a `STATUS=` line: startup (or a reload) is complete.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `RELOADING=1` (with `MONOTONIC_USEC`, which `Type=notify-reload` requires): a reload
/// began; [`ready`] ends it.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

/// `STOPPING=1`: shutdown began (sessions drain for `server.shutdown_grace`).
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("shutting down: draining sessions")]);
}

/// The watchdog period systemd asked for (`WATCHDOG_USEC`, for this process per
/// `WATCHDOG_PID`), if any.
pub fn watchdog_period() -> Option<Duration> {
    let mut usec = 0;
    (sd_notify::watchdog_enabled(false, &mut usec) && usec > 0).then(|| Duration::from_micros(usec))
}

/// Sends `WATCHDOG=1` every half `period`, from the runtime's own timer: a runtime that no
/// longer runs its tasks stops the pings, and systemd restarts the service. Runs forever;
/// spawn it.
pub async fn watchdog(period: Duration) {
    let mut every = tokio::time::interval(period / 2);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}
