//! The FUSE filesystem: a passthrough over the directory the mount covers.
//!
//! Every operation is an `*at()` call relative to the directory fd opened before
//! mounting, so the daemon still reaches the files the mount hides and unmounting
//! leaves the directory holding the latest bytes. POSIX byte-range locks are left
//! to the kernel (FUSE_POSIX_LOCKS is not negotiated): every locker is on this
//! host, and the kernel's own lock table gives exact F_SETLK/F_SETLKW/F_GETLK
//! semantics, blocking waits included, without a round trip per lock — SQLite
//! takes several locks per transaction.

mod attr;
pub mod class;
pub mod fuse;
pub mod inode;
pub mod iomode;
pub mod mount;
mod open;
mod ops;
mod sys;
#[cfg(test)]
mod tests;
pub mod virt;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{BackingId, Errno, FileAttr, FileType, FopenFlags, INodeNo};

pub(crate) use attr::attr_of;
use class::{Classifier, PathClass};
use inode::{Inode, InodeTable, ROOT};
use iomode::{IoStats, IoTable};
use virt::{VirtualFiles, VIRT_DIR_INO};

/// How long the kernel may cache entries and attributes. Everything that changes
/// a file goes through this mount, and the kernel updates sizes on its own writes.
const TTL: Duration = Duration::from_secs(1);

/// File handles of directories and virtual files live above every possible fd.
const HANDLE_BASE: u64 = 1 << 40;

enum Handle {
    Dir(Vec<(OsString, u64, FileType)>),
    Virtual(Vec<u8>),
}

/// What replication sees of replicated paths. The filesystem knows nothing of
/// SQLite or S3: it reports each mutation of a non-local path, in order, after
/// it reached the backing file and before it is acknowledged, so a committed
/// transaction is captured before SQLite learns it committed. An `Err(errno)`
/// goes back to the caller.
pub trait Replication: Send + Sync {
    /// May this mutation of a replicated path happen at all (role gate)?
    /// `pid` is the requesting thread: a secondary lets its own view applier
    /// through and nobody else.
    fn check_write(&self, _class: &PathClass, _pid: u32) -> Result<(), i32> {
        Ok(())
    }
    /// May a replicated path be created (empty, never truncated) by `pid`?
    /// Defaults to the write gate.
    fn check_create(&self, class: &PathClass, pid: u32) -> Result<(), i32> {
        self.check_write(class, pid)
    }
    /// Just before `len` bytes at `offset` are written (a truncation to
    /// `offset` passes `u64::MAX`): a hydrating secondary claims the range so
    /// that no older snapshot page lands over it.
    fn before_write(&self, _class: &PathClass, _offset: u64, _len: u64) -> Result<(), i32> {
        Ok(())
    }
    fn written(&self, class: &PathClass, offset: u64, len: u64) -> Result<(), i32>;
    fn truncated(&self, class: &PathClass, len: u64) -> Result<(), i32>;
    /// Unlinked, or renamed away.
    fn removed(&self, class: &PathClass) -> Result<(), i32>;
    /// Another file was renamed onto this path.
    fn replaced(&self, class: &PathClass) -> Result<(), i32>;
    /// fsync, or the last close of a handle that wrote.
    fn synced(&self, class: &PathClass) -> Result<(), i32>;
    /// Make a byte range readable from the backing file before a read
    /// (read-through of pages a secondary does not hold yet).
    fn before_read(&self, _class: &PathClass, _offset: u64, _len: u32) -> Result<(), i32> {
        Ok(())
    }
    /// May this open of a replicated path by `pid` be served by the kernel
    /// from the backing file (FUSE passthrough), its reads and writes never
    /// reaching the daemon? Only once replication needs to see none of
    /// them (docs/ARCHITECTURE.md, "Passthrough").
    fn kernel_io(&self, _class: &PathClass, _pid: u32) -> bool {
        false
    }
    /// How open `fh` of a replicated path by `pid` was answered.
    fn opened(&self, _class: &PathClass, _fh: u64, _pid: u32, _kernel: bool) {}
    /// Open `fh` of a replicated path was released.
    fn released(&self, _class: &PathClass, _fh: u64) {}
}

/// Lets replication drop the kernel's cached pages and attributes of a file it
/// changed behind the kernel's back (a secondary applying a transaction).
pub struct Invalidator {
    inodes: Arc<InodeTable>,
    notifier: std::sync::OnceLock<fuser::Notifier>,
}

impl Invalidator {
    /// Called once the session exists; before that there is nothing cached.
    pub fn attach(&self, notifier: fuser::Notifier) {
        let _ = self.notifier.set(notifier);
    }

    fn node_of(&self, rel: &str) -> Option<Arc<Inode>> {
        let root = self.inodes.get(ROOT)?;
        let c = std::ffi::CString::new(rel).ok()?;
        let st = sys::fstatat(root.fd(), &c).ok()?;
        self.inodes.by_key(&st)
    }

    /// Drop cached data of `rel` in `ranges` (offset, len); attributes always.
    /// Must not be called from a FUSE request thread.
    pub fn invalidate(&self, rel: &str, ranges: &[(u64, u64)]) {
        let (Some(n), Some(node)) = (self.notifier.get(), self.node_of(rel)) else {
            return;
        };
        if ranges.is_empty() {
            let _ = n.inval_inode(INodeNo(node.ino), 0, 0);
        }
        for (off, len) in ranges {
            let _ = n.inval_inode(INodeNo(node.ino), *off as i64, *len as i64);
        }
    }

    /// Forget the kernel's cached lookup of `rel` (its visibility changed).
    pub fn invalidate_entry(&self, rel: &str) {
        let Some(n) = self.notifier.get() else {
            return;
        };
        let path = Path::new(rel);
        let (Some(name), parent) = (path.file_name(), path.parent()) else {
            return;
        };
        let parent_ino = match parent.and_then(|p| p.to_str()).filter(|p| !p.is_empty()) {
            None => ROOT,
            Some(p) => match self.node_of(p) {
                Some(node) => node.ino,
                None => return,
            },
        };
        let _ = n.inval_entry(INodeNo(parent_ino), name);
    }
}

/// Plain passthrough: nothing is replicated.
pub struct NoReplication;

impl Replication for NoReplication {
    fn written(&self, _: &PathClass, _: u64, _: u64) -> Result<(), i32> {
        Ok(())
    }
    fn truncated(&self, _: &PathClass, _: u64) -> Result<(), i32> {
        Ok(())
    }
    fn removed(&self, _: &PathClass) -> Result<(), i32> {
        Ok(())
    }
    fn replaced(&self, _: &PathClass) -> Result<(), i32> {
        Ok(())
    }
    fn synced(&self, _: &PathClass) -> Result<(), i32> {
        Ok(())
    }
}

fn replicated(class: &PathClass) -> bool {
    !matches!(class, PathClass::Local)
}

/// The FUSE filesystem: every operation is passed through to the backing
/// directory (`*at()` calls on the fd opened before the mount covered it);
/// replicated paths are also reported through [`Replication`].
///
/// Its methods (`ops.rs`, `open.rs`) do the work and return what the kernel
/// is to be told; `fuse.rs` is the only code that speaks fuser's replies.
/// `B` is what a registered backing file is: fuser's [`BackingId`] when
/// mounted, anything in unit tests, which have no `/dev/fuse` to register on.
pub struct PassthroughFs<B = BackingId> {
    inodes: Arc<InodeTable>,
    repl: Arc<dyn Replication>,
    classifier: Classifier,
    virt: Arc<dyn VirtualFiles>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
    /// Running as root: created files are handed to the requesting user.
    as_root: bool,
    /// Kernel passthrough asked for (not `MEMBRIDGE_PASSTHROUGH=off`);
    /// whether the kernel agreed is in `io`.
    passthrough: bool,
    io: Arc<IoStats>,
    io_modes: IoTable<B>,
}

/// Who asks: the requesting thread and its credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// How an open (or create) is to be answered.
pub enum Open<B = BackingId> {
    /// Reads and writes of handle `fh` are served by the kernel from the
    /// registered backing file (FOPEN_PASSTHROUGH).
    Kernel { fh: u64, backing: Arc<B> },
    /// Reads and writes of handle `fh` come to the daemon, opened with `flags`.
    Daemon { fh: u64, flags: FopenFlags },
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

impl<B> PassthroughFs<B> {
    /// `root_fd` is the `O_PATH` fd of the directory, opened before it was covered.
    pub fn new(
        root_fd: std::os::fd::OwnedFd,
        classifier: Classifier,
        virt: Arc<dyn VirtualFiles>,
        repl: Arc<dyn Replication>,
        passthrough: bool,
        io: Arc<IoStats>,
    ) -> std::io::Result<PassthroughFs<B>> {
        let st = sys::fstat(root_fd.as_raw_fd()).map_err(std::io::Error::from_raw_os_error)?;
        Ok(PassthroughFs {
            inodes: Arc::new(InodeTable::new(root_fd, (st.st_dev, st.st_ino))),
            repl,
            classifier,
            virt,
            handles: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(HANDLE_BASE),
            as_root: nix::unistd::geteuid().is_root(),
            passthrough,
            io,
            io_modes: IoTable::default(),
        })
    }

    fn node(&self, ino: u64) -> Result<Arc<Inode>, Errno> {
        self.inodes.get(ino).ok_or(Errno::ESTALE)
    }

    fn child_class(&self, parent: u64, name: &OsStr) -> PathClass {
        match self.inodes.rel_path(parent) {
            Some(p) => self.classifier.classify(&p.join(name)),
            None => PathClass::Local,
        }
    }

    /// Look `name` up under `parent` in the backing dir and take a kernel reference.
    fn do_lookup(&self, parent: &Inode, name: &OsStr) -> Result<FileAttr, Errno> {
        let c = sys::cstr(name).map_err(err)?;
        let fd = sys::open_path_at(parent.fd(), &c).map_err(err)?;
        let st = sys::fstat(fd.as_raw_fd()).map_err(err)?;
        let class = self.child_class(parent.ino, name);
        let node = self.inodes.remember(fd, &st, parent.ino, name, class);
        Ok(attr_of(node.ino, &st))
    }

    fn new_handle(&self, h: Handle) -> u64 {
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, h);
        fh
    }

    /// Chowns `name` in `dir` to the requesting uid/gid: new files belong to
    /// the user who created them, not to a root daemon.
    fn give_to_caller(&self, caller: Caller, dir: RawFd, name: &std::ffi::CStr) {
        if self.as_root && (caller.uid != 0 || caller.gid != 0) {
            // SAFETY: `name` is a NUL-terminated C string borrowed for the
            // call; fchownat reads nothing else of ours (a bad `dir` is EBADF).
            unsafe {
                libc::fchownat(
                    dir,
                    name.as_ptr(),
                    caller.uid,
                    caller.gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                );
            }
        }
    }

    pub fn invalidator(&self) -> Arc<Invalidator> {
        Arc::new(Invalidator {
            inodes: self.inodes.clone(),
            notifier: std::sync::OnceLock::new(),
        })
    }

    /// A handle that is an fd of the backing file, not a directory listing
    /// or a virtual file's content.
    fn is_fd(fh: u64) -> bool {
        fh < HANDLE_BASE
    }

    fn is_virtual(ino: u64) -> bool {
        ino >= VIRT_DIR_INO
    }

    /// `.membridge` is reserved at the root: nothing real may take its name.
    fn reserved(parent: u64, name: &OsStr) -> bool {
        parent == ROOT && name == virt::DIR_NAME
    }

    /// The parent node and C name for creating `name`; `.membridge` and the
    /// virtual dir refuse with `reserved`.
    fn target(
        &self,
        parent: u64,
        name: &OsStr,
        reserved: Errno,
    ) -> Result<(Arc<Inode>, std::ffi::CString), Errno> {
        if Self::reserved(parent, name) || Self::is_virtual(parent) {
            return Err(reserved);
        }
        Ok((self.node(parent)?, sys::cstr(name).map_err(err)?))
    }
}
