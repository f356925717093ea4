//! The FUSE filesystem: a passthrough over the directory the mount covers.
//!
//! Every operation is an `*at()` call relative to the directory fd opened before
//! mounting, so the daemon still reaches the files the mount hides and unmounting
//! leaves the directory holding the latest bytes. POSIX byte-range locks are left
//! to the kernel (FUSE_POSIX_LOCKS is not negotiated): every locker is on this
//! host, and the kernel's own lock table gives exact F_SETLK/F_SETLKW/F_GETLK
//! semantics, blocking waits included, without a round trip per lock — SQLite
//! takes several locks per transaction.

pub mod class;
pub mod inode;
pub mod iomode;
pub mod mount;
mod sys;
pub mod virt;

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};

use class::{Classifier, PathClass};
use inode::{Inode, InodeTable, ROOT};
use iomode::{IoStats, IoTable, Opened};
use virt::{VirtualFiles, VIRT_DIR_INO};

/// How long the kernel may cache entries and attributes. Everything that changes
/// a file goes through this mount, and the kernel updates sizes on its own writes.
const TTL: Duration = Duration::from_secs(1);

/// A lookup answer of inode 0: "no such entry", which the kernel caches for
/// the TTL (an ENOENT error it does not). SQLite looks for `-journal` and
/// `-wal` at every read transaction; uncached, each was a round trip. Only
/// the daemon creates files behind the kernel's back, and it invalidates
/// those entries (see [`Invalidator::invalidate_entry`]).
const NEGATIVE: FileAttr = FileAttr {
    ino: INodeNo(0),
    size: 0,
    blocks: 0,
    atime: std::time::UNIX_EPOCH,
    mtime: std::time::UNIX_EPOCH,
    ctime: std::time::UNIX_EPOCH,
    crtime: std::time::UNIX_EPOCH,
    kind: FileType::RegularFile,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    rdev: 0,
    blksize: 0,
    flags: 0,
};

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
pub struct PassthroughFs {
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
    io_modes: IoTable,
}

fn err(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn ts(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0) + Duration::from_nanos(nsec as u64)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn dirent_type(d: u8) -> FileType {
    match d {
        libc::DT_DIR => FileType::Directory,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        libc::DT_SOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

pub(crate) fn attr_of(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: ts(st.st_atime, st.st_atime_nsec),
        mtime: ts(st.st_mtime, st.st_mtime_nsec),
        ctime: ts(st.st_ctime, st.st_ctime_nsec),
        crtime: ts(st.st_ctime, st.st_ctime_nsec),
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn time_spec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => {
            let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
            libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            }
        }
    }
}

impl PassthroughFs {
    /// `root_fd` is the `O_PATH` fd of the directory, opened before it was covered.
    pub fn new(
        root_fd: std::os::fd::OwnedFd,
        classifier: Classifier,
        virt: Arc<dyn VirtualFiles>,
        repl: Arc<dyn Replication>,
        passthrough: bool,
        io: Arc<IoStats>,
    ) -> std::io::Result<PassthroughFs> {
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

    /// May an open of this class be served by the kernel from the backing
    /// file? Local paths, whose bytes the daemon need not see, and
    /// replicated ones when replication says so (docs/ARCHITECTURE.md,
    /// "Passthrough").
    ///
    /// Not a file with set-id bits opened by a non-root user: the kernel
    /// writes a backing file with the daemon's credentials, so such a write
    /// would not clear the bits as the caller's own write does.
    fn wants_kernel(&self, class: &PathClass, req: &Request, fd: RawFd) -> bool {
        if !self.io.enabled() {
            return false;
        }
        if replicated(class) && !self.repl.kernel_io(class, req.pid()) {
            return false;
        }
        req.uid() == 0
            || sys::fstat(fd).is_ok_and(|st| st.st_mode & (libc::S_ISUID | libc::S_ISGID) == 0)
    }

    fn report_open(
        &self,
        class: &PathClass,
        fh: u64,
        req: &Request,
        opened: &Result<Opened, Errno>,
    ) {
        if let (true, Ok(o)) = (replicated(class), opened) {
            self.repl
                .opened(class, fh, req.pid(), matches!(o, Opened::Kernel(_)));
        }
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<Inode>, Errno> {
        self.inodes.get(ino.0).ok_or(Errno::ESTALE)
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
    fn give_to_caller(&self, req: &Request, dir: RawFd, name: &std::ffi::CStr) {
        if self.as_root && (req.uid() != 0 || req.gid() != 0) {
            // SAFETY: `name` is a NUL-terminated C string borrowed for the
            // call; fchownat reads nothing else of ours (a bad `dir` is EBADF).
            unsafe {
                libc::fchownat(
                    dir,
                    name.as_ptr(),
                    req.uid(),
                    req.gid(),
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

    fn is_virtual(ino: INodeNo) -> bool {
        ino.0 >= VIRT_DIR_INO
    }

    /// `.membridge` is reserved at the root: nothing real may take its name.
    fn reserved(parent: INodeNo, name: &OsStr) -> bool {
        parent.0 == ROOT && name == virt::DIR_NAME
    }
}

impl Filesystem for PassthroughFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // KILLPRIV_V2: the daemon clears set-id bits itself (see
        // `sys::kill_suidgid`), so the kernel stops asking for
        // `security.capability` with a GETXATTR round trip before every write.
        let wanted = InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_EXPORT_SUPPORT
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        let _ = config.add_capabilities(wanted & config.capabilities());
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        // Passthrough (Linux 6.9+): depth 2 lets the backing directory sit
        // on a stacked filesystem (overlayfs) itself. Whether backing files
        // can be registered (CAP_SYS_ADMIN) is probed once mounted.
        if !self.passthrough {
            self.io.set_off("disabled by MEMBRIDGE_PASSTHROUGH=off");
        } else if config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok()
        {
            tracing::debug!("kernel offers FUSE passthrough");
        } else {
            self.io.set_off(
                "the kernel does not offer FUSE passthrough (Linux 6.9+ with CONFIG_FUSE_PASSTHROUGH)",
            );
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if Self::reserved(parent, name) {
            return reply.entry(&TTL, &self.virt.dir_attr(), Generation(0));
        }
        if parent.0 == VIRT_DIR_INO {
            return match self.virt.lookup(name) {
                Some(a) => reply.entry(&Duration::ZERO, &a, Generation(0)),
                None => reply.error(Errno::ENOENT),
            };
        }
        let parent = match self.node(parent) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        match self.do_lookup(&parent, name) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) if e == Errno::ENOENT => reply.entry(&TTL, &NEGATIVE, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if !Self::is_virtual(ino) {
            self.inodes.forget(ino.0, nlookup);
            if self.inodes.get(ino.0).is_none() {
                self.io_modes.forget(ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if Self::is_virtual(ino) {
            return match self.virt.attr(ino.0) {
                Some(a) => reply.attr(&Duration::ZERO, &a),
                None => reply.error(Errno::ENOENT),
            };
        }
        let st = match fh {
            Some(fh) if fh.0 < HANDLE_BASE => sys::fstat(fh.0 as RawFd),
            _ => match self.node(ino) {
                Ok(n) => sys::fstat(n.fd()),
                Err(e) => return reply.error(e),
            },
        };
        match st {
            Ok(st) => reply.attr(&TTL, &attr_of(ino.0, &st)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if Self::is_virtual(ino) {
            return reply.error(Errno::EROFS);
        }
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let open_fd = fh.filter(|f| f.0 < HANDLE_BASE).map(|f| f.0 as RawFd);
        let class = node.class();
        let result = (|| -> Result<(), i32> {
            if let Some(mode) = mode {
                sys::chmod_path_fd(node.fd(), mode)?;
            }
            if uid.is_some() || gid.is_some() {
                sys::chown_fd(node.fd(), uid, gid)?;
            }
            if let Some(size) = size {
                if replicated(&class) {
                    self.repl.check_write(&class, req.pid())?;
                    self.repl.before_write(&class, size, u64::MAX)?;
                }
                match open_fd {
                    Some(fd) => sys::ftruncate(fd, size)?,
                    None => sys::truncate_path_fd(node.fd(), size)?,
                }
                // KILLPRIV_V2 leaves this to us; an explicit mode wins.
                if req.uid() != 0 && mode.is_none() {
                    sys::kill_suidgid(node.fd())?;
                }
                if replicated(&class) {
                    self.repl.truncated(&class, size)?;
                }
            }
            if atime.is_some() || mtime.is_some() {
                sys::utimens(
                    node.fd(),
                    node.is_symlink,
                    [time_spec(atime), time_spec(mtime)],
                )?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            return reply.error(err(e));
        }
        match sys::fstat(node.fd()) {
            Ok(st) => reply.attr(&TTL, &attr_of(ino.0, &st)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .node(ino)
            .and_then(|n| sys::readlink(n.fd()).map_err(err))
        {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        self.make(req, parent, name, reply, |dir, c| {
            sys::mknod_at(dir, c, mode & !umask, rdev)
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.make(req, parent, name, reply, |dir, c| {
            sys::mkdir_at(dir, c, mode & !umask)
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req.pid(), parent, name, false, reply);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(req.pid(), parent, name, true, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let target = match sys::cstr(target.as_os_str()) {
            Ok(t) => t,
            Err(e) => return reply.error(err(e)),
        };
        self.make(req, parent, link_name, reply, |dir, c| {
            sys::symlink_at(&target, dir, c)
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if Self::reserved(parent, name)
            || Self::reserved(newparent, newname)
            || Self::is_virtual(parent)
            || Self::is_virtual(newparent)
        {
            return reply.error(Errno::EPERM);
        }
        let (p, np) = match (self.node(parent), self.node(newparent)) {
            (Ok(p), Ok(np)) => (p, np),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let (old_c, new_c) = match (sys::cstr(name), sys::cstr(newname)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return reply.error(Errno::EINVAL),
        };
        let from = self.child_class(parent.0, name);
        let to = self.child_class(newparent.0, newname);
        for c in [&from, &to] {
            if replicated(c) {
                if let Err(e) = self.repl.check_write(c, req.pid()) {
                    return reply.error(err(e));
                }
            }
        }
        if let Err(e) = sys::rename_at(p.fd(), &old_c, np.fd(), &new_c, flags.bits()) {
            return reply.error(err(e));
        }
        let mut outcome = Ok(());
        if replicated(&from) {
            outcome = outcome.and(if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                self.repl.replaced(&from)
            } else {
                self.repl.removed(&from)
            });
        }
        if replicated(&to) {
            outcome = outcome.and(self.repl.replaced(&to));
        }
        // The moved node keeps its fd; its name and class follow it. With
        // RENAME_EXCHANGE the node now under the old name moves the other way.
        for (dir, dir_ino, c, nm) in [
            (&np, newparent.0, &new_c, newname),
            (&p, parent.0, &old_c, name),
        ] {
            if let Ok(st) = sys::fstatat(dir.fd(), c) {
                if let Some(n) = self.inodes.by_key(&st) {
                    let class = self.child_class(dir_ino, nm);
                    self.inodes.relocate(n.ino, dir_ino, nm, class);
                }
            }
        }
        match outcome {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.make(req, newparent, newname, reply, |dir, c| {
            sys::link_at(node.fd(), dir, c)
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if Self::is_virtual(ino) {
            if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
                return reply.error(Errno::EROFS);
            }
            return match self.virt.render(ino.0) {
                Some(bytes) => {
                    let fh = self.new_handle(Handle::Virtual(bytes));
                    reply.opened(
                        FileHandle(fh),
                        FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NOFLUSH,
                    )
                }
                None => reply.error(Errno::ENOENT),
            };
        }
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let class = node.class();
        let truncating =
            flags.0 & libc::O_TRUNC != 0 && flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        if replicated(&class) {
            let checked = match truncating {
                true => self
                    .repl
                    .check_write(&class, req.pid())
                    .and_then(|()| self.repl.before_write(&class, 0, u64::MAX)),
                false => Ok(()),
            };
            if let Err(e) = checked {
                return reply.error(err(e));
            }
        }
        let opened = sys::reopen(node.fd(), flags.0);
        if let (true, true, Ok(fd)) = (truncating, req.uid() != 0, &opened) {
            // KILLPRIV_V2 leaves clearing set-id bits on O_TRUNC to us.
            if let Err(e) = sys::kill_suidgid(fd.as_raw_fd()) {
                return reply.error(err(e));
            }
        }
        if let (true, true, Ok(_)) = (truncating, replicated(&class), &opened) {
            if let Err(e) = self.repl.truncated(&class, 0) {
                return reply.error(err(e));
            }
        }
        let fd = match opened {
            Ok(fd) => fd,
            Err(e) => return reply.error(err(e)),
        };
        let fh = fd.as_raw_fd() as u64;
        let wants = self.wants_kernel(&class, req, fd.as_raw_fd());
        let opened = self
            .io_modes
            .open(&self.io, ino.0, fh, wants, &fd, |f| reply.open_backing(f));
        self.report_open(&class, fh, req, &opened);
        match opened {
            Ok(Opened::Kernel(id)) => {
                let _ = fd.into_raw_fd();
                reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &id)
            }
            Ok(Opened::Daemon { keep_cache }) => {
                let _ = fd.into_raw_fd();
                reply.opened(FileHandle(fh), daemon_flags(keep_cache))
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if fh.0 >= HANDLE_BASE {
            let handles = self.handles.lock().unwrap();
            return match handles.get(&fh.0) {
                Some(Handle::Virtual(bytes)) => {
                    let start = (offset as usize).min(bytes.len());
                    let end = (start + size as usize).min(bytes.len());
                    reply.data(&bytes[start..end])
                }
                _ => reply.error(Errno::EBADF),
            };
        }
        let class = match self.node(ino) {
            Ok(n) => n.class(),
            Err(e) => return reply.error(e),
        };
        self.io.read(&class);
        let repl = replicated(&class);
        if repl {
            if let Err(e) = self.repl.before_read(&class, offset, size) {
                return reply.error(err(e));
            }
        }
        let mut buf = vec![0u8; size as usize];
        match sys::pread(fh.0 as RawFd, &mut buf, offset) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if fh.0 >= HANDLE_BASE {
            return reply.error(Errno::EBADF);
        }
        let class = match self.node(ino) {
            Ok(n) => n.class(),
            Err(e) => return reply.error(e),
        };
        self.io.wrote(&class);
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.write_at(&class, req.pid(), fh.0 as RawFd, data, offset, kill) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(e),
        }
    }

    /// Opens say FOPEN_NOFLUSH (there is nothing to do at flush): a close
    /// never waits for the daemon, which matters most for the daemon's own
    /// fds through the mount (the follower's lock fd), closed as it exits.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 >= HANDLE_BASE {
            self.handles.lock().unwrap().remove(&fh.0);
            return reply.ok();
        }
        self.io_modes.release(fh.0);
        sys::close(fh.0 as RawFd);
        if let Ok(n) = self.node(ino) {
            let c = n.class();
            if replicated(&c) {
                self.repl.released(&c, fh.0);
            }
        }
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            if let Ok(n) = self.node(ino) {
                let c = n.class();
                if replicated(&c) {
                    if let Err(e) = self.repl.synced(&c) {
                        return reply.error(err(e));
                    }
                }
            }
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 >= HANDLE_BASE {
            return reply.ok();
        }
        if let Err(e) = sys::fsync(fh.0 as RawFd, datasync) {
            return reply.error(err(e));
        }
        let class = self.node(ino).map(|n| n.class());
        match class {
            Ok(c) if replicated(&c) => match self.repl.synced(&c) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(err(e)),
            },
            _ => reply.ok(),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == VIRT_DIR_INO {
            let entries = self
                .virt
                .entries()
                .into_iter()
                .map(|(n, i)| (OsString::from(n), i, FileType::RegularFile))
                .collect();
            let fh = self.new_handle(Handle::Dir(entries));
            return reply.opened(FileHandle(fh), FopenFlags::empty());
        }
        let node = match self.node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match sys::read_dir(node.fd()) {
            Ok(list) => {
                let mut entries: Vec<(OsString, u64, FileType)> = list
                    .into_iter()
                    .filter(|(n, _, _)| {
                        !(ino.0 == ROOT && n.as_slice() == virt::DIR_NAME.as_bytes())
                    })
                    .map(|(n, i, t)| (OsString::from_vec(n), i, dirent_type(t)))
                    .collect();
                if ino.0 == ROOT {
                    entries.push((virt::DIR_NAME.into(), VIRT_DIR_INO, FileType::Directory));
                }
                let fh = self.new_handle(Handle::Dir(entries));
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let handles = self.handles.lock().unwrap();
        let Some(Handle::Dir(entries)) = handles.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        // Offsets 1 and 2 are "." and ".."; entry i has offset i + 3.
        let dots = [
            (".", ino.0, FileType::Directory),
            ("..", ino.0, FileType::Directory),
        ];
        for (i, (name, eino, kind)) in dots.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*eino), i as u64 + 1, *kind, name) {
                return reply.ok();
            }
        }
        let skip = (offset as usize).saturating_sub(2);
        for (i, (name, eino, kind)) in entries.iter().enumerate().skip(skip) {
            if reply.add(INodeNo(*eino), i as u64 + 3, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.handles.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if Self::is_virtual(ino) {
            return reply.ok();
        }
        let res = self.node(ino).and_then(|n| {
            let fd = sys::reopen(n.fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(err)?;
            sys::fsync(fd.as_raw_fd(), datasync).map_err(err)
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let root = self.inodes.get(ROOT).expect("root is never forgotten");
        match sys::statvfs(root.fd()) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if Self::is_virtual(ino) {
            return reply.error(Errno::EROFS);
        }
        let res = self.node(ino).and_then(|n| {
            let c = sys::cstr(name).map_err(err)?;
            sys::setxattr(n.fd(), &c, value, flags).map_err(err)
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if Self::is_virtual(ino) {
            return reply.error(Errno::NO_XATTR);
        }
        let res = self.node(ino).and_then(|n| {
            let c = sys::cstr(name).map_err(err)?;
            sys::getxattr(n.fd(), &c, size as usize).map_err(err)
        });
        xattr_reply(res, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if Self::is_virtual(ino) {
            return xattr_reply(Ok(Vec::new()), size, reply);
        }
        let res = self
            .node(ino)
            .and_then(|n| sys::listxattr(n.fd(), size as usize).map_err(err));
        xattr_reply(res, size, reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if Self::is_virtual(ino) {
            return reply.error(Errno::EROFS);
        }
        let res = self.node(ino).and_then(|n| {
            let c = sys::cstr(name).map_err(err)?;
            sys::removexattr(n.fd(), &c).map_err(err)
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Mounted with default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (p, c) = match self.target(parent, name, Errno::EACCES) {
            Ok(t) => t,
            Err(e) => return reply.error(e),
        };
        let class = self.child_class(parent.0, name);
        let mut flags = flags;
        if replicated(&class) {
            if let Err(e) = self.repl.check_create(&class, req.pid()) {
                return reply.error(err(e));
            }
            if self.repl.check_write(&class, req.pid()).is_err() {
                // Created, not written: should it exist by now after all,
                // it is opened as it is.
                flags &= !libc::O_TRUNC;
            }
        }
        if parent.0 == ROOT && class::is_old_tool_temp(name) {
            // An old tool's pull hook left on this machine would download a
            // whole database here only to fail replacing it on a secondary:
            // refused before the download (docs/ARCHITECTURE.md, "Living
            // beside the old tool").
            let db = PathClass::Database(crate::remote::keys::LEGACY_DB_NAME.into());
            if let Err(e) = self.repl.check_write(&db, req.pid()) {
                return reply.error(err(e));
            }
        }
        let file = match sys::create_at(p.fd(), &c, flags, mode & !umask) {
            Ok(f) => f,
            Err(e) => return reply.error(err(e)),
        };
        self.give_to_caller(req, p.fd(), &c);
        let attr = match self.do_lookup(&p, name) {
            Ok(attr) => attr,
            Err(e) => return reply.error(e),
        };
        let fh = file.as_raw_fd() as u64;
        let wants = self.wants_kernel(&class, req, file.as_raw_fd());
        let ino = attr.ino.0;
        let opened = self
            .io_modes
            .open(&self.io, ino, fh, wants, &file, |f| reply.open_backing(f));
        self.report_open(&class, fh, req, &opened);
        match opened {
            Ok(Opened::Kernel(id)) => {
                let _ = file.into_raw_fd();
                reply.created_passthrough(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::FOPEN_NOFLUSH,
                    &id,
                )
            }
            Ok(Opened::Daemon { keep_cache }) => {
                let _ = file.into_raw_fd();
                reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    daemon_flags(keep_cache),
                )
            }
            Err(e) => reply.error(e),
        }
    }

    /// On a replicated path, a write like any other: the role check first,
    /// and the range reported as written (punching a hole or zeroing a range
    /// writes zeros; allocating leaves the bytes, and capture finds nothing
    /// changed). Modes that shift the bytes after `offset` are refused there.
    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if fh.0 >= HANDLE_BASE {
            return reply.error(Errno::EBADF);
        }
        let class = match self.node(ino) {
            Ok(n) => n.class(),
            Err(e) => return reply.error(e),
        };
        let repl = replicated(&class);
        if repl {
            let checked = self
                .repl
                .check_write(&class, req.pid())
                .and_then(|()| self.repl.before_write(&class, offset, length));
            if let Err(e) = checked {
                return reply.error(err(e));
            }
            let in_place =
                libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
            if mode & !in_place != 0 {
                return reply.error(Errno::EOPNOTSUPP);
            }
        }
        if let Err(e) = sys::fallocate(fh.0 as RawFd, mode, offset, length) {
            return reply.error(err(e));
        }
        if repl {
            if let Err(e) = self.repl.written(&class, offset, length) {
                return reply.error(err(e));
            }
        }
        reply.ok()
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if fh.0 >= HANDLE_BASE {
            return reply.error(Errno::EBADF);
        }
        match sys::lseek(fh.0 as RawFd, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(err(e)),
        }
    }

    /// Between host-local files, the kernel copies. When either side is
    /// replicated, the copy is a read and a write like any other (read-through
    /// of the source, role check and capture of the
    /// destination), one bounded chunk per call: the caller loops on a short
    /// count as for any copy_file_range.
    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        if fh_in.0 >= HANDLE_BASE || fh_out.0 >= HANDLE_BASE {
            return reply.error(Errno::EBADF);
        }
        let (class_in, class_out) = match (self.node(ino_in), self.node(ino_out)) {
            (Ok(a), Ok(b)) => (a.class(), b.class()),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        if replicated(&class_in) || replicated(&class_out) {
            let copied = self.copy_through(
                req.pid(),
                (&class_in, fh_in.0 as RawFd, offset_in),
                (&class_out, fh_out.0 as RawFd, offset_out),
                len,
            );
            return match copied {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(e),
            };
        }
        let len = len.min(u32::MAX as u64 / 2);
        match sys::copy_file_range(
            fh_in.0 as RawFd,
            offset_in,
            fh_out.0 as RawFd,
            offset_out,
            len,
        ) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(err(e)),
        }
    }
}

impl PassthroughFs {
    /// `write` on an open file: the role check on a replicated path, the
    /// write, then capture of what was written.
    fn write_at(
        &self,
        class: &PathClass,
        pid: u32,
        fd: RawFd,
        data: &[u8],
        offset: u64,
        kill_suidgid: bool,
    ) -> Result<usize, Errno> {
        if replicated(class) {
            self.repl.check_write(class, pid).map_err(err)?;
            self.repl
                .before_write(class, offset, data.len() as u64)
                .map_err(err)?;
        }
        if kill_suidgid {
            sys::kill_suidgid(fd).map_err(err)?;
        }
        let n = sys::pwrite(fd, data, offset).map_err(err)?;
        if replicated(class) {
            // An O_APPEND handle wrote at the end, whatever `offset` said.
            let at = if sys::is_append(fd) {
                sys::lseek(fd, 0, libc::SEEK_END).map(|end| end as u64 - n as u64)
            } else {
                Ok(offset)
            };
            at.and_then(|at| self.repl.written(class, at, n as u64))
                .map_err(err)?;
        }
        Ok(n)
    }

    /// copy_file_range with a replicated side: one chunk read as `read`
    /// reads it and written as `write` writes it.
    fn copy_through(
        &self,
        pid: u32,
        (class_in, fd_in, offset_in): (&PathClass, RawFd, u64),
        (class_out, fd_out, offset_out): (&PathClass, RawFd, u64),
        len: u64,
    ) -> Result<usize, Errno> {
        const CHUNK: u64 = 1 << 20;
        if replicated(class_out) {
            // Refuse before reading anything.
            self.repl.check_write(class_out, pid).map_err(err)?;
        }
        let len = len.min(CHUNK) as u32;
        if replicated(class_in) {
            self.repl
                .before_read(class_in, offset_in, len)
                .map_err(err)?;
        }
        let mut buf = vec![0u8; len as usize];
        let n = sys::pread(fd_in, &mut buf, offset_in).map_err(err)?;

        if n == 0 {
            return Ok(0);
        }
        self.write_at(class_out, pid, fd_out, &buf[..n], offset_out, false)
    }

    /// The parent node and C name for creating `name`; `.membridge` and the
    /// virtual dir refuse with `reserved`.
    fn target(
        &self,
        parent: INodeNo,
        name: &OsStr,
        reserved: Errno,
    ) -> Result<(Arc<Inode>, std::ffi::CString), Errno> {
        if Self::reserved(parent, name) || Self::is_virtual(parent) {
            return Err(reserved);
        }
        Ok((self.node(parent)?, sys::cstr(name).map_err(err)?))
    }

    /// Shared tail of mkdir/mknod/symlink/link: create, hand over, look up.
    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEntry,
        op: impl FnOnce(RawFd, &std::ffi::CStr) -> Result<(), i32>,
    ) {
        let (p, c) = match self.target(parent, name, Errno::EEXIST) {
            Ok(t) => t,
            Err(e) => return reply.error(e),
        };
        if let Err(e) = op(p.fd(), &c) {
            return reply.error(err(e));
        }
        self.give_to_caller(req, p.fd(), &c);
        match self.do_lookup(&p, name) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn remove(&self, pid: u32, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        if Self::reserved(parent, name) || Self::is_virtual(parent) {
            return reply.error(Errno::EPERM);
        }
        let class = self.child_class(parent.0, name);
        let res = self.node(parent).and_then(|p| {
            let c = sys::cstr(name).map_err(err)?;
            if replicated(&class) {
                self.repl.check_write(&class, pid).map_err(err)?;
            }
            sys::unlink_at(p.fd(), &c, dir).map_err(err)?;
            if replicated(&class) {
                self.repl.removed(&class).map_err(err)?;
            }
            Ok(())
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

/// Open flags of a handle served by the daemon: the kernel keeps its page
/// cache across opens unless passthrough writes may have made it stale.
fn daemon_flags(keep_cache: bool) -> FopenFlags {
    match keep_cache {
        true => FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
        false => FopenFlags::FOPEN_NOFLUSH,
    }
}

fn xattr_reply(res: Result<Vec<u8>, Errno>, size: u32, reply: ReplyXattr) {
    match res {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(e),
    }
}
