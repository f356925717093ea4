//! Opening files: the role checks and truncation of an open, and whether the
//! kernel serves the open file from the backing file (passthrough) or the
//! daemon does (docs/ARCHITECTURE.md, "Passthrough").

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd, RawFd};

use fuser::{Errno, FileAttr, FopenFlags};

use super::class::{self, PathClass};
use super::inode::ROOT;
use super::iomode::Opened;
use super::{err, replicated, sys, Caller, Handle, Open, PassthroughFs};

/// Open flags of a handle served by the daemon: the kernel keeps its page
/// cache across opens unless passthrough writes may have made it stale.
fn daemon_flags(keep_cache: bool) -> FopenFlags {
    match keep_cache {
        true => FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
        false => FopenFlags::FOPEN_NOFLUSH,
    }
}

impl<B> PassthroughFs<B> {
    /// May an open of this class be served by the kernel from the backing
    /// file? Local paths, whose bytes the daemon need not see, and
    /// replicated ones when replication says so (docs/ARCHITECTURE.md,
    /// "Passthrough").
    ///
    /// Not a file with set-id bits opened by a non-root user: the kernel
    /// writes a backing file with the daemon's credentials, so such a write
    /// would not clear the bits as the caller's own write does.
    fn wants_kernel(&self, class: &PathClass, caller: Caller, fd: RawFd) -> bool {
        if !self.io.enabled() {
            return false;
        }
        if replicated(class) && !self.repl.kernel_io(class, caller.pid) {
            return false;
        }
        caller.uid == 0
            || sys::fstat(fd).is_ok_and(|st| st.st_mode & (libc::S_ISUID | libc::S_ISGID) == 0)
    }

    fn report_open(
        &self,
        class: &PathClass,
        fh: u64,
        caller: Caller,
        opened: &Result<Opened<B>, Errno>,
    ) {
        if let (true, Ok(o)) = (replicated(class), opened) {
            self.repl
                .opened(class, fh, caller.pid, matches!(o, Opened::Kernel(_)));
        }
    }

    /// Settle how the open file `fd` of inode `ino` is served, report it to
    /// replication, and hand the fd over to the kernel as the handle.
    /// `register` makes the inode's backing file when passthrough needs one.
    fn serve(
        &self,
        class: &PathClass,
        caller: Caller,
        ino: u64,
        fd: OwnedFd,
        register: impl FnOnce(&OwnedFd) -> std::io::Result<B>,
    ) -> Result<Open<B>, Errno> {
        let fh = fd.as_raw_fd() as u64;
        let mut register = Some(register);
        let mut open = || {
            let wants = self.wants_kernel(class, caller, fd.as_raw_fd());
            let register = |f| register.take().expect("registered at most once")(f);
            self.io_modes.open(&self.io, ino, fh, wants, &fd, register)
        };
        let mut opened = open();
        if replicated(class) && matches!(opened, Err(Errno::EBUSY)) {
            // The database changed hands between the question and the
            // answer (the tailer's own open began arming it): asked again,
            // the question now waits for the outcome.
            opened = open();
        }
        self.report_open(class, fh, caller, &opened);
        let open = match opened? {
            Opened::Kernel(backing) => Open::Kernel { fh, backing },
            Opened::Daemon { keep_cache } => Open::Daemon {
                fh,
                flags: daemon_flags(keep_cache),
            },
        };
        let _ = fd.into_raw_fd();
        Ok(open)
    }

    /// Open inode `ino` with the open(2) `flags`. A virtual file is rendered
    /// once here, so its reader sees one state.
    pub fn open(
        &self,
        caller: Caller,
        ino: u64,
        flags: i32,
        register: impl FnOnce(&OwnedFd) -> std::io::Result<B>,
    ) -> Result<Open<B>, Errno> {
        if Self::is_virtual(ino) {
            if flags & libc::O_ACCMODE != libc::O_RDONLY {
                return Err(Errno::EROFS);
            }
            let bytes = self.virt.render(ino).ok_or(Errno::ENOENT)?;
            let fh = self.new_handle(Handle::Virtual(bytes));
            return Ok(Open::Daemon {
                fh,
                flags: FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NOFLUSH,
            });
        }
        let node = self.node(ino)?;
        let class = node.class();
        let truncating = flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY;
        if replicated(&class) && truncating {
            self.repl
                .check_write(&class, caller.pid)
                .and_then(|()| self.repl.before_write(&class, 0, u64::MAX))
                .map_err(err)?;
        }
        let opened = sys::reopen(node.fd(), flags);
        if let (true, true, Ok(fd)) = (truncating, caller.uid != 0, &opened) {
            // KILLPRIV_V2 leaves clearing set-id bits on O_TRUNC to us.
            sys::kill_suidgid(fd.as_raw_fd()).map_err(err)?;
        }
        if let (true, true, Ok(_)) = (truncating, replicated(&class), &opened) {
            self.repl.truncated(&class, 0).map_err(err)?;
        }
        let fd = opened.map_err(err)?;
        self.serve(&class, caller, ino, fd, register)
    }

    /// Create `name` under `parent` (or open it, without O_EXCL) with the
    /// open(2) `flags` and `mode` (the caller's umask applied).
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        register: impl FnOnce(&OwnedFd) -> std::io::Result<B>,
    ) -> Result<(FileAttr, Open<B>), Errno> {
        let (p, c) = self.target(parent, name, Errno::EACCES)?;
        let class = self.child_class(parent, name);
        let mut flags = flags;
        if replicated(&class) {
            self.repl.check_create(&class, caller.pid).map_err(err)?;
            if self.repl.check_write(&class, caller.pid).is_err() {
                // Created, not written: should it exist by now after all,
                // it is opened as it is.
                flags &= !libc::O_TRUNC;
            }
        }
        if parent == ROOT && class::is_old_tool_temp(name) {
            // An old tool's pull hook left on this machine would download a
            // whole database here only to fail replacing it on a secondary:
            // refused before the download (docs/ARCHITECTURE.md, "Living
            // beside the old tool").
            let db = PathClass::Database(crate::remote::keys::LEGACY_DB_NAME.into());
            self.repl.check_write(&db, caller.pid).map_err(err)?;
        }
        let file = sys::create_at(p.fd(), &c, flags, mode).map_err(err)?;
        self.give_to_caller(caller, p.fd(), &c);
        let attr = self.do_lookup(&p, name)?;
        let open = self.serve(&class, caller, attr.ino.0, file, register)?;
        Ok((attr, open))
    }

    /// The kernel released handle `fh` of inode `ino`, opened with `flags`.
    pub fn release(&self, ino: u64, fh: u64, flags: i32) -> Result<(), Errno> {
        if !Self::is_fd(fh) {
            self.handles.lock().unwrap().remove(&fh);
            return Ok(());
        }
        self.io_modes.release(fh);
        sys::close(fh as RawFd);
        if let Ok(n) = self.node(ino) {
            let c = n.class();
            if replicated(&c) {
                self.repl.released(&c, fh);
            }
        }
        if flags & libc::O_ACCMODE != libc::O_RDONLY {
            if let Ok(n) = self.node(ino) {
                let c = n.class();
                if replicated(&c) {
                    self.repl.synced(&c).map_err(err)?;
                }
            }
        }
        Ok(())
    }
}
