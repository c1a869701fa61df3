//! Steps of the wall clock (NTP correcting a wrong clock, a VM resumed, an administrator's
//! `date -s`): bans run in real time, so they move with the wall clock.
//!
//! Bans are recorded in wall-clock time, the only time that outlives a restart. If the wall
//! clock steps a day forward, every ban shorter than a day would expire at the next pass
//! (the firewall let go of thousands of offenders at once); a day back, every ban would run
//! a day too long (and the kernel table be re-applied with the extra day). The monotonic clock
//! never steps, so every wall-clock reading of the manager goes through [`Inner::wall`],
//! which compares the wall clock's progress with the monotonic clock's since its last reading:
//! a difference beyond [`STEP_MIN`] is a step, and every active ban's start and expiry move
//! by it, in memory and in the database, before anything is decided on the new time. A step
//! while the process is down cannot be seen; restored bans then take the stepped clock at its
//! word.

use std::time::{Duration, SystemTime};

use super::store::HistoryEvent;
use super::{Core, Inner, bump};

/// The smallest difference between the wall clock's and the monotonic clock's progress taken
/// as a step: NTP slews smaller errors gradually (at most 500 ppm) and steps only beyond
/// 128 ms, so a second is never a slew.
pub(super) const STEP_MIN: Duration = Duration::from_secs(1);

/// Moves `t` by `by`, forward or back.
fn moved(t: SystemTime, back: bool, by: Duration) -> SystemTime {
    if back { t.checked_sub(by).unwrap_or(SystemTime::UNIX_EPOCH) } else { t.checked_add(by).unwrap_or(t) }
}

impl Inner {
    /// The wall clock now; if it stepped since the last reading, the active bans move with it
    /// first (see the module documentation).
    pub(super) fn wall(&self, core: &mut Core) -> SystemTime {
        let (wall, mono) = (self.clock.wall(), self.clock.now());
        let last = core.last_read.replace((wall, mono));
        let Some((wall0, mono0)) = last else { return wall };
        let expected = wall0 + mono.saturating_duration_since(mono0);
        let (back, by) = match wall.duration_since(expected) {
            Ok(ahead) => (false, ahead),
            Err(e) => (true, e.duration()),
        };
        if by >= STEP_MIN {
            self.clock_stepped(core, back, by, wall);
        }
        wall
    }

    fn clock_stepped(&self, core: &mut Core, back: bool, by: Duration, now: SystemTime) {
        let shift = |b: &mut super::Ban| {
            b.start = moved(b.start, back, by);
            b.expires = moved(b.expires, back, by);
        };
        core.active.shift(shift);
        core.unsaved.values_mut().for_each(shift);
        for t in core.applied.values_mut() {
            *t = moved(*t, back, by);
        }
        let saved: Vec<super::Ban> =
            core.active.values().filter(|b| !core.unsaved.contains_key(&b.net)).cloned().collect();
        let written = core.store.batch(|store| saved.iter().try_for_each(|b| store.put(b, HistoryEvent::Shift, now)));
        bump(&self.stats.clock_steps);
        let sign = if back { "-" } else { "+" };
        match written.and_then(|r| r) {
            Ok(()) => {
                tracing::warn!(step = %format!("{sign}{by:?}"), bans = saved.len(), "wall clock stepped; bans moved with it")
            }
            // In force in memory; only a restart would read the old rows.
            Err(e) => tracing::error!(error = %e, "wall clock stepped; moving the bans in the database failed"),
        }
    }
}
