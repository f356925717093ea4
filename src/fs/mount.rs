//! Mounting in place: stale-mount recovery, the session, and unmounting.
//!
//! The directory's own fd must be opened *before* the mount covers it, and after
//! any stale mount (a daemon killed with -9 leaves one that answers ENOTCONN) has
//! been detached, or the fd would point into the dead mount.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use fuser::{Config as FuseConfig, MountOption, Session, SessionACL};

use super::fuse::Fuse;
use super::sys;
use super::PassthroughFs;

/// fuser's own mount(2) passes no subtype, so a membridge mount is recognised
/// by its source name (the `fsname` option) on a `fuse` filesystem.
pub const FS_NAME: &str = "membridge";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountState {
    NotMounted,
    /// A live membridge mount answers there.
    Live,
    /// A FUSE mount whose daemon is gone (ENOTCONN).
    Stale,
    /// Something else is mounted there.
    Foreign,
}

/// (fs type, source) of the topmost mount at exactly `dir`, from /proc/self/mountinfo.
fn mounted_type(dir: &Path) -> Option<(String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = dir.to_str()?;
    let mut found = None;
    for line in info.lines() {
        let mut fields = line.split(' ');
        let mount_point = fields.nth(4)?;
        if unescape(mount_point) != want {
            continue;
        }
        let rest: Vec<&str> = line.split(" - ").nth(1)?.split(' ').collect();
        // the last match is the topmost mount
        found = Some((
            rest.first()?.to_string(),
            unescape(rest.get(1).copied().unwrap_or("")),
        ));
    }
    found
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn state(dir: &Path) -> MountState {
    let Some((fstype, source)) = mounted_type(dir) else {
        return MountState::NotMounted;
    };
    if !fstype.starts_with("fuse") {
        return MountState::Foreign;
    }
    // statfs always reaches the daemon; stat may be answered from the
    // kernel's attribute cache for a while after the daemon died.
    match nix::sys::statvfs::statvfs(dir) {
        Err(nix::errno::Errno::ENOTCONN) => MountState::Stale,
        _ if source == FS_NAME => MountState::Live,
        _ => MountState::Foreign,
    }
}

/// Detach whatever FUSE mount sits at `dir` (lazily: open files keep working).
pub fn detach(dir: &Path) -> io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)
    } else {
        fusermount(&["-u", "-z"], dir)
    }
}

/// Unmount a live mount; fails with EBUSY while files on it are open.
pub fn unmount(dir: &Path) -> io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        nix::mount::umount2(dir, nix::mount::MntFlags::empty()).map_err(io::Error::from)
    } else {
        fusermount(&["-u"], dir)
    }
}

fn fusermount(args: &[&str], dir: &Path) -> io::Result<()> {
    let out = Command::new("fusermount3").args(args).arg(dir).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Resolve DIR, clear a stale mount, refuse a live one, and open the fd that
/// will reach the directory's files once the mount hides them.
pub fn prepare(dir: &Path) -> Result<(PathBuf, OwnedFd), String> {
    if let MountState::Stale = state(dir) {
        tracing::warn!(dir = %dir.display(), "clearing stale mount left by a dead daemon");
        detach(dir)
            .map_err(|e| format!("{}: stale mount could not be cleared: {e}", dir.display()))?;
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    match state(&dir) {
        MountState::Live => {
            return Err(format!(
                "{} is already mounted by membridge; `membridge unmount {}` first",
                dir.display(),
                dir.display()
            ))
        }
        MountState::Stale => detach(&dir)
            .map_err(|e| format!("{}: stale mount could not be cleared: {e}", dir.display()))?,
        MountState::Foreign | MountState::NotMounted => {}
    }
    if !dir.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    let fd = sys::open_dir_path(&dir)
        .map_err(|e| format!("{}: {}", dir.display(), io::Error::from_raw_os_error(e)))?;
    Ok((dir, fd))
}

/// Mount `fs` over `dir`. Returns once the kernel has completed the handshake,
/// so the mount is usable as soon as this returns.
pub fn mount(fs: PassthroughFs, dir: &Path, threads: usize) -> io::Result<Session<Fuse>> {
    let mut cfg = FuseConfig::default();
    cfg.mount_options = vec![
        MountOption::FSName(FS_NAME.into()),
        MountOption::Subtype("membridge".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    if nix::unistd::geteuid().is_root() {
        cfg.acl = SessionACL::All; // the user whose dir this is must reach it
    }
    cfg.n_threads = Some(threads.max(2));
    cfg.clone_fd = true;
    Session::new(Fuse(fs), dir, &cfg)
}
