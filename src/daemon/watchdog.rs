//! The watchdog beside the daemon (docs/ARCHITECTURE.md, "Passthrough": the
//! daemon's own requests of its mount).
//!
//! The daemon's own threads make requests of its own mount (the view
//! applier's and the checkpointer's SQLite, arming the guard). Killed in the
//! middle of one, its last thread waits for an answer only the daemon could
//! give, the process never finishes exiting, the connection is never
//! aborted, and every client of the mount hangs. A process beside it
//! (`membridge __watchdog`, spawned once the mount is ready) aborts the
//! connection once the daemon is dead, as `/sys/fs/fuse/connections/N/abort`
//! allows; clients then get ENOTCONN, as after any daemon crash.
//!
//! It must abort *that* mount's connection and no other: the kernel gives
//! an unmounted FUSE device number to the next mount at once, and mount ids
//! of `/proc/self/mountinfo` are reused too. The mount is named by its
//! unique id (`STATX_MNT_ID_UNIQUE`, Linux 6.8), which is never reused, and
//! looked up with `statmount(2)`, which asks nothing of the mounted
//! filesystem (a dead daemon's mount cannot answer a stat). Kernels without
//! them get the device number alone.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// How often the daemon's state is looked at, in case it hangs as a zombie
/// (the pidfd alone reports the exit of the whole process).
const TICK: Duration = Duration::from_millis(250);

/// `statmount(2)`, the same number on every architecture (the unified
/// syscall table); libc does not name it for every target yet.
const SYS_STATMOUNT: libc::c_long = 457;
const STATMOUNT_SB_BASIC: u64 = 0x1;

/// The mount as the watchdog names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountId {
    /// The FUSE device's minor number: `/sys/fs/fuse/connections/<minor>`.
    pub minor: u32,
    /// `STATX_MNT_ID_UNIQUE`, where the kernel has it.
    pub unique: Option<u64>,
}

impl MountId {
    /// The mount at `dir` (a stat of it: the daemon must be serving).
    pub fn of(dir: &Path) -> std::io::Result<MountId> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
        // SAFETY: statx is plain old data; all-zero is a valid value.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is NUL-terminated and `stx` is valid for writes,
        // both for the duration of the call.
        let rc = unsafe {
            libc::statx(
                libc::AT_FDCWD,
                path.as_ptr(),
                0,
                libc::STATX_BASIC_STATS | libc::STATX_MNT_ID_UNIQUE,
                &mut stx,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(MountId {
            minor: stx.stx_dev_minor,
            unique: (stx.stx_mask & libc::STATX_MNT_ID_UNIQUE != 0).then_some(stx.stx_mnt_id),
        })
    }

    /// Is this mount still there? Asked without touching it.
    pub fn present(&self) -> bool {
        match self.unique.map(statmount_exists) {
            Some(Some(present)) => present,
            _ => minor_mounted(self.minor),
        }
    }
}

/// `Some(false)` when no mount has this unique id any more; `None` when the
/// kernel cannot say (no statmount).
fn statmount_exists(unique: u64) -> Option<bool> {
    /// struct mnt_id_req, version 0.
    #[repr(C)]
    struct MntIdReq {
        size: u32,
        spare: u32,
        mnt_id: u64,
        param: u64,
    }
    let req = MntIdReq {
        size: std::mem::size_of::<MntIdReq>() as u32,
        spare: 0,
        mnt_id: unique,
        param: STATMOUNT_SB_BASIC,
    };
    let mut buf = vec![0u64; 512];
    // SAFETY: `req` is a valid mnt_id_req and `buf` is valid for writes of
    // the size passed, both for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            SYS_STATMOUNT,
            &req as *const MntIdReq,
            buf.as_mut_ptr(),
            buf.len() * 8,
            0u32,
        )
    };
    if rc == 0 {
        return Some(true);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENOENT) => Some(false),
        _ => None,
    }
}

/// The fallback: some mount has the device `0:minor`.
fn minor_mounted(minor: u32) -> bool {
    let dev = format!("0:{minor}");
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|s| s.lines().any(|l| l.split(' ').nth(2) == Some(dev.as_str())))
}

/// Spawn the watchdog of the mount at `dir`, served by this process.
pub fn spawn(dir: &Path) {
    use std::os::unix::process::CommandExt;
    let id = match MountId::of(dir) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(error = %e, "no watchdog for the FUSE connection: a crash of this daemon may leave the mount hanging");
            return;
        }
    };
    let mut cmd = match std::env::current_exe() {
        Ok(exe) => std::process::Command::new(exe),
        Err(e) => {
            tracing::warn!(error = %e, "no watchdog for the FUSE connection: a crash of this daemon may leave the mount hanging");
            return;
        }
    };
    cmd.arg("__watchdog")
        .arg(std::process::id().to_string())
        .arg(id.minor.to_string());
    if let Some(u) = id.unique {
        cmd.arg(u.to_string());
    }
    let spawned = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .env_remove(super::READY_FD_ENV)
        .process_group(0)
        .spawn();
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no watchdog for the FUSE connection: a crash of this daemon may leave the mount hanging");
    }
}

/// `membridge __watchdog PID MINOR [UNIQUE]`: wait for the daemon's death,
/// then abort its connection if its mount is still there.
pub fn run(pid: i32, id: MountId) {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative return of pidfd_open is an fd we now own.
    let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd as i32) });
    while !dead(pid, pidfd.as_ref()) {}
    if id.present() {
        abort(id.minor);
    }
}

/// Blocks up to [`TICK`]; true once the daemon has exited or is a zombie.
fn dead(pid: i32, pidfd: Option<&OwnedFd>) -> bool {
    match pidfd {
        Some(fd) => {
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            if unsafe { libc::poll(&mut p, 1, TICK.as_millis() as i32) } > 0 {
                return true;
            }
        }
        None => std::thread::sleep(TICK),
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name's closing parenthesis.
    let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
    matches!(state, None | Some('Z') | Some('X'))
}

fn abort(minor: u32) {
    let conn = format!("/sys/fs/fuse/connections/{minor}/abort");
    if !Path::new(&conn).exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
            .stderr(std::process::Stdio::null())
            .status();
    }
    let _ = std::fs::write(&conn, b"1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mount_is_named_by_an_id_that_is_never_reused() {
        let id = MountId::of(Path::new("/proc")).unwrap();
        assert!(id.present());
        if let Some(u) = id.unique {
            assert_eq!(statmount_exists(u), Some(true));
            // Unique ids count up from 2^32 and are never given out twice.
            assert_eq!(statmount_exists(u64::MAX - 1), Some(false));
        }
    }
}
