//! Least privilege for `gatekeeper serve` (issue 12): private files, and the drop from root
//! to `[server] user` / `group` once the privileged work is done.
//!
//! - [`restrict_umask`]: umask 0077 at start, so every file the server creates is 0600 and
//!   every directory 0700 (state dir, spool dirs, SQLite files and their journals).
//! - [`secure_state_dir`]: creates the state dir, tightens what is already there (the dir, its
//!   entries, and the directories one level below, such as `maildir/new`) to 0700/0600, and
//!   hands it to the serving user, so that the databases and the spool open after the drop.
//! - [`hand_over_xt_tables`]: for xt_recent, the ban tables' `/proc` files are chowned to the
//!   serving user (the alternative, across rule reloads that recreate them, is the module's
//!   `ip_list_uid` / `ip_list_gid` parameters, docs/kernel.md).
//! - [`drop_to`]: `setgroups`, `setgid`, `setuid`, in that order, keeping only `CAP_NET_ADMIN`
//!   when the nft backend needs it (then also as an ambient capability, so that the `nft`
//!   child inherits it). It must run while the process has one thread: capabilities are per
//!   thread, and threads started afterwards (tokio's) inherit the caller's.
//!
//! Nothing here decides policy or reads the configuration file; the binary calls it in order.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Group, Uid, User};

/// The user and group to serve as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user's name.
    pub user: String,
    /// Its uid.
    pub uid: u32,
    /// The group's name.
    pub group: String,
    /// Its gid: `[server] group`, or the user's primary group.
    pub gid: u32,
}

/// Looks `user` and `group` (default: the user's primary group) up in the system's databases.
/// Each problem is one line naming its field, for `check-config`.
pub fn resolve(user: &str, group: Option<&str>) -> Result<Identity, Vec<String>> {
    let mut problems = Vec::new();
    let u = match User::from_name(user) {
        Ok(Some(u)) => Some(u),
        Ok(None) => {
            problems.push(format!("server.user: no user {user:?} on this system"));
            None
        }
        Err(e) => {
            problems.push(format!("server.user: cannot look {user:?} up: {e}"));
            None
        }
    };
    let g = match group {
        Some(name) => match Group::from_name(name) {
            Ok(Some(g)) => Some(g),
            Ok(None) => {
                problems.push(format!("server.group: no group {name:?} on this system"));
                None
            }
            Err(e) => {
                problems.push(format!("server.group: cannot look {name:?} up: {e}"));
                None
            }
        },
        None => u.as_ref().and_then(|u| Group::from_gid(u.gid).ok().flatten()),
    };
    match (u, problems.is_empty()) {
        (Some(u), true) => {
            let (gid, group) = match g {
                Some(g) => (g.gid, g.name),
                // A primary group without a name in /etc/group.
                None => (u.gid, u.gid.to_string()),
            };
            Ok(Identity { user: u.name, uid: u.uid.as_raw(), group, gid: gid.as_raw() })
        }
        _ => Err(problems),
    }
}

/// Sets the umask to 0077: files the process creates are 0600, directories 0700.
pub fn restrict_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

/// What [`secure_state_dir`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Secured {
    /// Paths whose mode was tightened (group or other bits removed).
    pub tightened: Vec<PathBuf>,
    /// Paths handed to the serving user.
    pub chowned: Vec<PathBuf>,
}

/// Creates `dir` (0700) if needed; removes group and other bits from it, its entries and the
/// directories one level below (0700 directories, 0600 files; deeper files are behind a 0700
/// directory already); with `owner`, chowns the same paths to it. Symbolic links are left
/// alone (never followed).
pub fn secure_state_dir(dir: &Path, owner: Option<&Identity>) -> io::Result<Secured> {
    std::fs::create_dir_all(dir)?;
    let mut out = Secured::default();
    let mut paths = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_dir = std::fs::symlink_metadata(&path)?.is_dir();
        if is_dir {
            for inner in std::fs::read_dir(&path)? {
                let inner = inner?.path();
                if std::fs::symlink_metadata(&inner)?.is_dir() {
                    paths.push(inner);
                }
            }
        }
        paths.push(path);
    }
    for path in paths {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.mode() & 0o077 != 0 {
            let mode = if meta.is_dir() { 0o700 } else { 0o600 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            out.tightened.push(path.clone());
        }
        if let Some(o) = owner
            && (meta.uid() != o.uid || meta.gid() != o.gid)
        {
            std::os::unix::fs::lchown(&path, Some(o.uid), Some(o.gid))?;
            out.chowned.push(path);
        }
    }
    Ok(out)
}

/// Chowns the xt_recent ban tables (`/proc/net/xt_recent/NAME`) to `owner`, so that it can
/// write bans after the drop. A table that cannot be chowned is a warning with the lasting
/// fix: the `xt_recent` module's `ip_list_uid` / `ip_list_gid` (a rule reload recreates the
/// files with those owners).
pub fn hand_over_xt_tables(tables: &[PathBuf], owner: &Identity) -> Vec<String> {
    let mut warnings = Vec::new();
    for t in tables {
        if let Err(e) = std::os::unix::fs::chown(t, Some(owner.uid), Some(owner.gid)) {
            warnings.push(format!(
                "{}: cannot hand it to {} ({e}); bans will fail with permission denied until it is: load the rules \
                 first, or set xt_recent's ip_list_uid={} ip_list_gid={} (kernel command line or modprobe options)",
                t.display(),
                owner.user,
                owner.uid,
                owner.gid
            ));
        }
    }
    warnings
}

/// The privilege drop failed: the server must not go on as root by accident.
#[derive(Debug, thiserror::Error)]
pub enum DropError {
    /// Not root (nor the target user already).
    #[error("server.user = {user:?} needs the server to be started as root (running as uid {uid})")]
    NotRoot {
        /// The configured user.
        user: String,
        /// Who we are.
        uid: u32,
    },
    /// A system call refused.
    #[error("dropping to {user}: {step}: {error}")]
    Step {
        /// The configured user.
        user: String,
        /// Which step.
        step: &'static str,
        /// Why.
        error: String,
    },
}

/// Drops from root to `id`: supplementary groups reduced to `id.gid`, then `setgid`, then
/// `setuid` (real, effective and saved ids). With `keep_net_admin`, `CAP_NET_ADMIN` alone is
/// kept (permitted, effective, inheritable and ambient: an `nft` child inherits it); without,
/// no capability is left. Verified afterwards: going back to root must fail. Call it while
/// the process has a single thread. Already running as `id` (not root): nothing to do.
pub fn drop_to(id: &Identity, keep_net_admin: bool) -> Result<(), DropError> {
    let step = |step: &'static str| {
        let user = id.user.clone();
        move |e: &dyn std::fmt::Display| DropError::Step { user: user.clone(), step, error: e.to_string() }
    };
    let me = Uid::current();
    if !me.is_root() {
        if me.as_raw() == id.uid && Uid::effective().as_raw() == id.uid {
            return Ok(());
        }
        return Err(DropError::NotRoot { user: id.user.clone(), uid: me.as_raw() });
    }
    let (uid, gid) = (Uid::from_raw(id.uid), Gid::from_raw(id.gid));
    // The bounding set first (it needs CAP_SETPCAP, which root still has): no exec'd program
    // can regain what is dropped here. Capabilities this kernel does not know are skipped.
    for cap in caps::all() {
        if !(keep_net_admin && cap == Capability::CAP_NET_ADMIN) {
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    nix::unistd::setgroups(&[gid]).map_err(|e| step("setgroups")(&e))?;
    if keep_net_admin {
        nix::sys::prctl::set_keepcaps(true).map_err(|e| step("keepcaps")(&e))?;
    }
    nix::unistd::setgid(gid).map_err(|e| step("setgid")(&e))?;
    nix::unistd::setuid(uid).map_err(|e| step("setuid")(&e))?;
    let only: CapsHashSet = if keep_net_admin { [Capability::CAP_NET_ADMIN].into() } else { CapsHashSet::new() };
    if keep_net_admin {
        for set in [CapSet::Permitted, CapSet::Inheritable, CapSet::Effective] {
            caps::set(None, set, &only).map_err(|e| step("capset")(&e))?;
        }
        caps::raise(None, CapSet::Ambient, Capability::CAP_NET_ADMIN).map_err(|e| step("ambient")(&e))?;
        nix::sys::prctl::set_keepcaps(false).map_err(|e| step("keepcaps")(&e))?;
    }
    // Verify: the ids, the capabilities, and that root cannot be had back.
    let ids_ok = Uid::current() == uid && Uid::effective() == uid && Gid::current() == gid && Gid::effective() == gid;
    let permitted = caps::read(None, CapSet::Permitted).map_err(|e| step("capget")(&e))?;
    if !ids_ok || permitted != only || nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(DropError::Step {
            user: id.user.clone(),
            step: "verify",
            error: format!("still privileged (capabilities {permitted:?})"),
        });
    }
    Ok(())
}

/// How many threads this process has (from `/proc/self/task`), if it can tell.
pub fn thread_count() -> Option<usize> {
    std::fs::read_dir("/proc/self/task").ok().map(|d| d.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_names_are_problems_naming_their_field() {
        let err = resolve("no-such-user-gk", Some("no-such-group-gk")).unwrap_err();
        assert_eq!(err.len(), 2, "{err:?}");
        assert!(err[0].starts_with("server.user: no user \"no-such-user-gk\""), "{err:?}");
        assert!(err[1].starts_with("server.group: no group \"no-such-group-gk\""), "{err:?}");
        let root = resolve("root", None).unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
    }

    #[test]
    fn the_state_dir_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join("maildir/new")).unwrap();
        for (p, mode) in [("", 0o755), ("maildir", 0o755), ("maildir/new", 0o775)] {
            std::fs::set_permissions(state.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
        }
        std::fs::write(state.join("state.sqlite"), "").unwrap();
        std::fs::set_permissions(state.join("state.sqlite"), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(state.join("maildir/new/1.msg"), "").unwrap();
        std::fs::set_permissions(state.join("maildir/new/1.msg"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let done = secure_state_dir(&state, None).unwrap();
        assert_eq!(done.tightened.len(), 4, "{done:?}");
        let mode = |p: &str| std::fs::metadata(state.join(p)).unwrap().mode() & 0o777;
        assert_eq!((mode(""), mode("maildir"), mode("maildir/new")), (0o700, 0o700, 0o700));
        assert_eq!(mode("state.sqlite"), 0o600);
        assert_eq!(mode("maildir/new/1.msg"), 0o644, "deeper files are behind a 0700 directory");
        assert_eq!(secure_state_dir(&state, None).unwrap(), Secured::default(), "nothing left to do");
    }
}
