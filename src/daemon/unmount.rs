//! `membridge unmount` and `membridge status`'s side of the mount: asking the
//! daemon to let go of its own files on the mount, unmounting, and waiting
//! for the daemon to finish.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::fs::mount;

/// `membridge unmount`: unmount, then wait for the daemon to finish its work.
pub fn unmount(dir: &Path, lazy: bool) -> Result<()> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let pid = read_status(&dir).ok().map(|s| s.pid);
    match mount::state(&dir) {
        mount::MountState::NotMounted => bail!("{} is not mounted", dir.display()),
        mount::MountState::Foreign => {
            bail!(
                "{} is not a membridge mount; refusing to unmount it",
                dir.display()
            )
        }
        mount::MountState::Stale => {
            mount::detach(&dir)
                .with_context(|| format!("clearing stale mount {}", dir.display()))?;
            println!("membridge: cleared stale mount {}", dir.display());
            return Ok(());
        }
        mount::MountState::Live => {}
    }
    if let Some(pid) = pid {
        // The view's own connections on the mount would keep it busy (or,
        // detached, alive): the daemon closes them for a moment.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGUSR1,
        );
    }
    let res = if lazy {
        std::thread::sleep(Duration::from_millis(100));
        mount::detach(&dir)
    } else {
        unmount_live(&dir, pid.is_some())
    };
    if let Err(e) = res {
        if e.raw_os_error() == Some(libc::EBUSY) {
            bail!(
                "{} is busy: files on it are still open (close them, or use --lazy to detach now and finish when they close)",
                dir.display()
            );
        }
        return Err(anyhow!(e)).with_context(|| format!("unmounting {}", dir.display()));
    }
    if let Some(pid) = pid {
        wait_exit(pid, Duration::from_secs(60));
    }
    println!("membridge: unmounted {}", dir.display());
    Ok(())
}

/// How long the view keeps its files on the mount closed for an unmount.
pub(super) const UNMOUNT_PAUSE: Duration = Duration::from_secs(5);

/// Unmount, retrying briefly while the daemon closes the view's own
/// connections (it was sent SIGUSR1 when `asked`).
fn unmount_live(dir: &Path, asked: bool) -> std::io::Result<()> {
    let start = Instant::now();
    loop {
        if asked {
            std::thread::sleep(Duration::from_millis(50));
        }
        match mount::unmount(dir) {
            Err(e)
                if asked
                    && e.raw_os_error() == Some(libc::EBUSY)
                    && start.elapsed() < UNMOUNT_PAUSE / 5 => {}
            other => return other,
        }
    }
}

fn wait_exit(pid: u32, limit: Duration) {
    let start = Instant::now();
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    while start.elapsed() < limit {
        if nix::sys::signal::kill(pid, None).is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn read_status(dir: &Path) -> Result<crate::status::StatusDoc> {
    let p = dir.join(".membridge/status.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}
