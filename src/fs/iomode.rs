//! Kernel passthrough: which opens the kernel serves from the backing file
//! with no daemon round trip, and the bookkeeping the kernel's io-mode rules
//! require (docs/ARCHITECTURE.md, "Passthrough").
//!
//! The kernel (fs/fuse/iomode.c) keeps one io mode per FUSE inode: while any
//! file of an inode is open in passthrough, every new open of it must be
//! passthrough too, with the same backing file (else the open fails with
//! EIO); while any is open in the cached mode, a passthrough open fails
//! (EIO). The mode resets once the last file of either kind is closed. This
//! module tracks the same counts per inode so the daemon never answers an
//! open with a mode the kernel would refuse.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use fuser::BackingId;

use super::class::PathClass;
pub use crate::status::io::{IoDoc, IoStats};

/// Path classes as indices of `IoStats`'s per-class counters (named by
/// `status::io::CLASSES`).
pub fn class_index(c: &PathClass) -> usize {
    match c {
        PathClass::Local => 0,
        PathClass::Database(_) => 1,
        PathClass::Sidecar(..) => 2,
        PathClass::File(_) => 3,
    }
}

/// How one open is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenPath {
    /// FOPEN_PASSTHROUGH with the inode's backing file.
    Kernel,
    /// Reads and writes reach the daemon; `keep_cache` is false when the
    /// kernel's page cache of the inode may predate writes made in
    /// passthrough (which bypass that cache).
    Daemon { keep_cache: bool },
    /// The inode is open in passthrough and this open may not be: the
    /// kernel would refuse a cached open (EIO), and passing it through
    /// would skip the daemon's checks. Answered EBUSY.
    Busy,
}

/// The io-mode state of one inode, as this daemon answered its opens.
struct InodeIo<B> {
    kernel: usize,
    daemon: usize,
    /// Passthrough writes may have changed the file since the kernel last
    /// cached its pages: the next cached open drops that cache.
    stale_cache: bool,
    backing: Option<Arc<B>>,
}

impl<B> Default for InodeIo<B> {
    fn default() -> Self {
        InodeIo {
            kernel: 0,
            daemon: 0,
            stale_cache: false,
            backing: None,
        }
    }
}

/// The decision, from the wish (may this open bypass the daemon?) and the
/// inode's open files. Mirrors fs/fuse/iomode.c: an inode open in
/// passthrough takes only passthrough opens, one open cached takes no
/// passthrough open.
fn choose(wants_kernel: bool, kernel: usize, daemon: usize, stale_cache: bool) -> OpenPath {
    match (wants_kernel, kernel > 0, daemon > 0) {
        (true, true, _) => OpenPath::Kernel,
        (false, true, _) => OpenPath::Busy,
        (true, false, false) => OpenPath::Kernel,
        (_, false, _) => OpenPath::Daemon {
            keep_cache: !stale_cache,
        },
    }
}

/// Per-inode open counts and backing files, and the mode of each handle.
/// `B` is a registered backing file ([`BackingId`] when mounted).
pub struct IoTable<B = BackingId> {
    inner: Mutex<Tables<B>>,
}

impl<B> Default for IoTable<B> {
    fn default() -> Self {
        IoTable {
            inner: Mutex::new(Tables {
                inodes: HashMap::new(),
                handles: HashMap::new(),
            }),
        }
    }
}

struct Tables<B> {
    inodes: HashMap<u64, InodeIo<B>>,
    /// fh → (inode, opened in passthrough).
    handles: HashMap<u64, (u64, bool)>,
}

/// What [`IoTable::open`] settled on.
pub enum Opened<B = BackingId> {
    Kernel(Arc<B>),
    Daemon { keep_cache: bool },
}

impl<B> IoTable<B> {
    /// Decide how handle `fh` (an open fd of inode `ino`) is served and
    /// record it. `register` makes the inode's backing file when the inode
    /// has none; if it fails, passthrough is turned off for the mount
    /// and the open takes the daemon's path if the kernel allows it.
    pub fn open<F: AsFd>(
        &self,
        stats: &IoStats,
        ino: u64,
        fh: u64,
        wants_kernel: bool,
        fd: F,
        register: impl FnOnce(F) -> std::io::Result<B>,
    ) -> Result<Opened<B>, fuser::Errno> {
        let mut t = self.inner.lock().unwrap();
        let e = t.inodes.entry(ino).or_default();
        let mut path = choose(wants_kernel, e.kernel, e.daemon, e.stale_cache);
        let mut backing = None;
        if path == OpenPath::Kernel {
            backing = match &e.backing {
                Some(b) => Some(b.clone()),
                None => match register(fd) {
                    Ok(b) => Some(Arc::new(b)),
                    Err(err) => {
                        stats.set_off(&off_reason(&err));
                        path = choose(false, e.kernel, e.daemon, e.stale_cache);
                        None
                    }
                },
            };
        }
        let opened = match (path, backing) {
            (OpenPath::Kernel, Some(b)) => {
                e.kernel += 1;
                e.stale_cache = true;
                e.backing = Some(b.clone());
                stats.kernel_opened();
                Opened::Kernel(b)
            }
            (OpenPath::Daemon { keep_cache }, _) => {
                e.daemon += 1;
                e.stale_cache = false;
                stats.daemon_opened();
                Opened::Daemon { keep_cache }
            }
            _ => return Err(fuser::Errno::EBUSY),
        };
        let kernel = matches!(opened, Opened::Kernel(_));
        t.handles.insert(fh, (ino, kernel));
        Ok(opened)
    }

    /// The handle is released: the last passthrough file of an inode drops
    /// its backing id (the kernel reset the inode's mode at the close).
    /// True when that was the inode's last passthrough open.
    pub fn release(&self, fh: u64) -> bool {
        let mut t = self.inner.lock().unwrap();
        let Some((ino, kernel)) = t.handles.remove(&fh) else {
            return false;
        };
        let Some(e) = t.inodes.get_mut(&ino) else {
            return false;
        };
        if kernel {
            e.kernel = e.kernel.saturating_sub(1);
            if e.kernel == 0 {
                e.backing = None;
                return true;
            }
        } else {
            e.daemon = e.daemon.saturating_sub(1);
        }
        false
    }

    /// The kernel forgot the inode, and its page cache with it.
    pub fn forget(&self, ino: u64) {
        let mut t = self.inner.lock().unwrap();
        if t.inodes
            .get(&ino)
            .is_some_and(|e| e.kernel == 0 && e.daemon == 0)
        {
            t.inodes.remove(&ino);
        }
    }
}

fn off_reason(err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EPERM) => format!(
            "registering a backing file was refused ({err}): the daemon needs CAP_SYS_ADMIN, \
             and the kernel must have agreed to passthrough at mount"
        ),
        Some(libc::ELOOP) => format!(
            "registering a backing file failed ({err}): the backing directory is on a stacked \
             filesystem deeper than passthrough allows"
        ),
        _ => format!("registering a backing file failed: {err}"),
    }
}

/// Registers and at once unregisters a backing file on the session's
/// `/dev/fuse` fd: the one way to learn at mount whether passthrough opens
/// will work (the kernel agreed at INIT, the daemon has CAP_SYS_ADMIN).
pub fn probe(dev_fuse: impl AsFd, stats: &IoStats) {
    if stats.is_off() {
        return;
    }
    let file = match memfd() {
        Ok(f) => f,
        Err(e) => return stats.set_off(&format!("no file to probe passthrough with: {e}")),
    };
    match BackingId::create_raw(&dev_fuse, &file) {
        Ok(id) => {
            close_backing(&dev_fuse, id);
            stats.set_on();
            tracing::info!("kernel passthrough on: local paths are read and written by the kernel");
        }
        Err(e) => stats.set_off(&off_reason(&e)),
    }
}

fn memfd() -> std::io::Result<std::fs::File> {
    let name = c"membridge-probe";
    // SAFETY: `name` is a NUL-terminated string; memfd_create returns a new
    // fd or -1 and touches nothing else.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// FUSE_DEV_IOC_BACKING_CLOSE: `_IOW(229, 2, uint32_t)` (include/uapi/linux/fuse.h).
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = (1 << 30) | (4 << 16) | (229 << 8) | 2;

fn close_backing(dev_fuse: impl AsFd, id: u32) {
    use std::os::fd::AsRawFd;
    // SAFETY: the ioctl reads one u32 from the pointer, which is live for the call.
    unsafe {
        libc::ioctl(
            dev_fuse.as_fd().as_raw_fd(),
            FUSE_DEV_IOC_BACKING_CLOSE,
            &id as *const u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inode_open_in_passthrough_takes_only_passthrough_opens() {
        assert_eq!(choose(true, 1, 0, true), OpenPath::Kernel);
        assert_eq!(choose(false, 1, 0, true), OpenPath::Busy);
    }

    #[test]
    fn an_inode_open_cached_takes_no_passthrough_open() {
        assert_eq!(
            choose(true, 0, 2, false),
            OpenPath::Daemon { keep_cache: true }
        );
    }

    #[test]
    fn the_first_cached_open_after_passthrough_drops_the_page_cache() {
        assert_eq!(
            choose(false, 0, 0, true),
            OpenPath::Daemon { keep_cache: false }
        );
        assert_eq!(choose(true, 0, 0, true), OpenPath::Kernel);
    }

    #[test]
    fn a_failed_registration_turns_passthrough_off_and_serves_the_open() {
        let stats = IoStats::default();
        stats.set_on();
        let t = IoTable::<BackingId>::default();
        let f = memfd().unwrap();
        let r = t.open(&stats, 7, 3, true, &f, |_| {
            Err(std::io::Error::from_raw_os_error(libc::EPERM))
        });
        assert!(matches!(r, Ok(Opened::Daemon { keep_cache: true })));
        let doc = stats.doc();
        assert_eq!(doc.passthrough, "off");
        assert!(doc
            .passthrough_off_reason
            .unwrap()
            .contains("CAP_SYS_ADMIN"));
        // The inode is open cached: the kernel would refuse a passthrough open.
        let r = t.open(&stats, 7, 4, true, &f, |_| unreachable!("cached inode"));
        assert!(matches!(r, Ok(Opened::Daemon { .. })));
        t.release(3);
        t.release(4);
        t.forget(7);
        assert!(t.inner.lock().unwrap().inodes.is_empty());
    }
}
