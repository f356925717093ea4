//! Every operation but opening (`open.rs`): passed through to the backing
//! directory, with the role checks and reports of [`Replication`] on
//! replicated paths. Each returns what the kernel is to be told.
//!
//! [`Replication`]: super::Replication

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::Path;
use std::time::Duration;

use fuser::{Errno, FileAttr, FileType, RenameFlags, TimeOrNow};

use super::attr::{attr_of, dirent_type, time_spec, NEGATIVE};
use super::class::PathClass;
use super::inode::ROOT;
use super::virt::{self, VIRT_DIR_INO};
use super::{err, replicated, sys, Caller, Handle, PassthroughFs, TTL};

/// What a SETATTR asks to change; `None` leaves it as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    /// The open handle the change came through, if any.
    pub fh: Option<u64>,
}

/// One side of a copy_file_range: inode, handle and offset.
#[derive(Debug, Clone, Copy)]
pub struct CopySide {
    pub ino: u64,
    pub fh: u64,
    pub offset: u64,
}

impl<B> PassthroughFs<B> {
    /// Look `name` up under `parent`: its attributes and how long the kernel
    /// may cache them. A missing name is a negative entry (inode 0).
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<(FileAttr, Duration), Errno> {
        if Self::reserved(parent, name) {
            return Ok((self.virt.dir_attr(), TTL));
        }
        if parent == VIRT_DIR_INO {
            return match self.virt.lookup(name) {
                Some(a) => Ok((a, Duration::ZERO)),
                None => Err(Errno::ENOENT),
            };
        }
        let parent = self.node(parent)?;
        match self.do_lookup(&parent, name) {
            Ok(a) => Ok((a, TTL)),
            Err(e) if e == Errno::ENOENT => Ok((NEGATIVE, TTL)),
            Err(e) => Err(e),
        }
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        if !Self::is_virtual(ino) {
            self.inodes.forget(ino, nlookup);
            if self.inodes.get(ino).is_none() {
                self.io_modes.forget(ino);
            }
        }
    }

    /// Attributes of `ino` (through the open handle `fh` when there is one)
    /// and how long the kernel may cache them.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<(FileAttr, Duration), Errno> {
        if Self::is_virtual(ino) {
            return match self.virt.attr(ino) {
                Some(a) => Ok((a, Duration::ZERO)),
                None => Err(Errno::ENOENT),
            };
        }
        let st = match fh {
            Some(fh) if Self::is_fd(fh) => sys::fstat(fh as RawFd),
            _ => sys::fstat(self.node(ino)?.fd()),
        };
        Ok((attr_of(ino, &st.map_err(err)?), TTL))
    }

    pub fn setattr(&self, caller: Caller, ino: u64, set: SetAttr) -> Result<FileAttr, Errno> {
        if Self::is_virtual(ino) {
            return Err(Errno::EROFS);
        }
        let node = self.node(ino)?;
        let open_fd = set.fh.filter(|f| Self::is_fd(*f)).map(|f| f as RawFd);
        let class = node.class();
        let result = (|| -> Result<(), i32> {
            if let Some(mode) = set.mode {
                sys::chmod_path_fd(node.fd(), mode)?;
            }
            if set.uid.is_some() || set.gid.is_some() {
                sys::chown_fd(node.fd(), set.uid, set.gid)?;
            }
            if let Some(size) = set.size {
                if replicated(&class) {
                    self.repl.check_write(&class, caller.pid)?;
                    self.repl.before_write(&class, size, u64::MAX)?;
                }
                match open_fd {
                    Some(fd) => sys::ftruncate(fd, size)?,
                    None => sys::truncate_path_fd(node.fd(), size)?,
                }
                // KILLPRIV_V2 leaves this to us; an explicit mode wins.
                if caller.uid != 0 && set.mode.is_none() {
                    sys::kill_suidgid(node.fd())?;
                }
                if replicated(&class) {
                    self.repl.truncated(&class, size)?;
                }
            }
            if set.atime.is_some() || set.mtime.is_some() {
                sys::utimens(
                    node.fd(),
                    node.is_symlink,
                    [time_spec(set.atime), time_spec(set.mtime)],
                )?;
            }
            Ok(())
        })();
        result.map_err(err)?;
        let st = sys::fstat(node.fd()).map_err(err)?;
        Ok(attr_of(ino, &st))
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        sys::readlink(self.node(ino)?.fd()).map_err(err)
    }

    /// `mode` has the caller's umask applied.
    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Result<FileAttr, Errno> {
        self.make(caller, parent, name, |dir, c| {
            sys::mknod_at(dir, c, mode, rdev)
        })
    }

    /// `mode` has the caller's umask applied.
    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> Result<FileAttr, Errno> {
        self.make(caller, parent, name, |dir, c| sys::mkdir_at(dir, c, mode))
    }

    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        link_name: &OsStr,
        target: &Path,
    ) -> Result<FileAttr, Errno> {
        let target = sys::cstr(target.as_os_str()).map_err(err)?;
        self.make(caller, parent, link_name, |dir, c| {
            sys::symlink_at(&target, dir, c)
        })
    }

    pub fn link(
        &self,
        caller: Caller,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
    ) -> Result<FileAttr, Errno> {
        let node = self.node(ino)?;
        self.make(caller, newparent, newname, |dir, c| {
            sys::link_at(node.fd(), dir, c)
        })
    }

    pub fn unlink(&self, caller: Caller, parent: u64, name: &OsStr) -> Result<(), Errno> {
        self.remove(caller.pid, parent, name, false)
    }

    pub fn rmdir(&self, caller: Caller, parent: u64, name: &OsStr) -> Result<(), Errno> {
        self.remove(caller.pid, parent, name, true)
    }

    pub fn rename(
        &self,
        caller: Caller,
        (parent, name): (u64, &OsStr),
        (newparent, newname): (u64, &OsStr),
        flags: RenameFlags,
    ) -> Result<(), Errno> {
        if Self::reserved(parent, name)
            || Self::reserved(newparent, newname)
            || Self::is_virtual(parent)
            || Self::is_virtual(newparent)
        {
            return Err(Errno::EPERM);
        }
        let (p, np) = match (self.node(parent), self.node(newparent)) {
            (Ok(p), Ok(np)) => (p, np),
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        let (old_c, new_c) = match (sys::cstr(name), sys::cstr(newname)) {
            (Ok(a), Ok(b)) => (a, b),
            _ => return Err(Errno::EINVAL),
        };
        let from = self.child_class(parent, name);
        let to = self.child_class(newparent, newname);
        for c in [&from, &to] {
            if replicated(c) {
                self.repl.check_write(c, caller.pid).map_err(err)?;
            }
        }
        sys::rename_at(p.fd(), &old_c, np.fd(), &new_c, flags.bits()).map_err(err)?;
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
            (&np, newparent, &new_c, newname),
            (&p, parent, &old_c, name),
        ] {
            if let Ok(st) = sys::fstatat(dir.fd(), c) {
                if let Some(n) = self.inodes.by_key(&st) {
                    let class = self.child_class(dir_ino, nm);
                    self.inodes.relocate(n.ino, dir_ino, nm, class);
                }
            }
        }
        outcome.map_err(err)
    }

    /// Up to `size` bytes at `offset` of handle `fh`.
    pub fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        if !Self::is_fd(fh) {
            let handles = self.handles.lock().unwrap();
            return match handles.get(&fh) {
                Some(Handle::Virtual(bytes)) => {
                    let start = (offset as usize).min(bytes.len());
                    let end = (start + size as usize).min(bytes.len());
                    Ok(bytes[start..end].to_vec())
                }
                _ => Err(Errno::EBADF),
            };
        }
        let class = self.node(ino)?.class();
        self.io.read(super::iomode::class_index(&class));
        if replicated(&class) {
            self.repl.before_read(&class, offset, size).map_err(err)?;
        }
        let mut buf = vec![0u8; size as usize];
        let n = sys::pread(fh as RawFd, &mut buf, offset).map_err(err)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Write `data` at `offset` of handle `fh`; `kill_suidgid` when the
    /// kernel asks the set-id bits cleared (FUSE_WRITE_KILL_SUIDGID).
    pub fn write(
        &self,
        caller: Caller,
        (ino, fh): (u64, u64),
        offset: u64,
        data: &[u8],
        kill_suidgid: bool,
    ) -> Result<usize, Errno> {
        if !Self::is_fd(fh) {
            return Err(Errno::EBADF);
        }
        let class = self.node(ino)?.class();
        self.io.wrote(super::iomode::class_index(&class));
        self.write_at(&class, caller.pid, fh as RawFd, data, offset, kill_suidgid)
    }

    pub fn fsync(&self, ino: u64, fh: u64, datasync: bool) -> Result<(), Errno> {
        if !Self::is_fd(fh) {
            return Ok(());
        }
        sys::fsync(fh as RawFd, datasync).map_err(err)?;
        match self.node(ino).map(|n| n.class()) {
            Ok(c) if replicated(&c) => self.repl.synced(&c).map_err(err),
            _ => Ok(()),
        }
    }

    /// Read directory `ino` whole; the listing is the handle's, so a reader
    /// paging through it sees one state.
    pub fn opendir(&self, ino: u64) -> Result<u64, Errno> {
        if ino == VIRT_DIR_INO {
            let entries = self
                .virt
                .entries()
                .into_iter()
                .map(|(n, i)| (OsString::from(n), i, FileType::RegularFile))
                .collect();
            return Ok(self.new_handle(Handle::Dir(entries)));
        }
        let node = self.node(ino)?;
        let list = sys::read_dir(node.fd()).map_err(err)?;
        let mut entries: Vec<(OsString, u64, FileType)> = list
            .into_iter()
            .filter(|(n, _, _)| !(ino == ROOT && n.as_slice() == virt::DIR_NAME.as_bytes()))
            .map(|(n, i, t)| (OsString::from_vec(n), i, dirent_type(t)))
            .collect();
        if ino == ROOT {
            entries.push((virt::DIR_NAME.into(), VIRT_DIR_INO, FileType::Directory));
        }
        Ok(self.new_handle(Handle::Dir(entries)))
    }

    /// The entries of listing `fh` after `offset`, handed to `add(ino,
    /// offset of the next entry, kind, name)` until it returns true (full).
    pub fn readdir(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> Result<(), Errno> {
        let handles = self.handles.lock().unwrap();
        let Some(Handle::Dir(entries)) = handles.get(&fh) else {
            return Err(Errno::EBADF);
        };
        // Offsets 1 and 2 are "." and ".."; entry i has offset i + 3.
        let dots = [
            (".", ino, FileType::Directory),
            ("..", ino, FileType::Directory),
        ];
        for (i, (name, eino, kind)) in dots.iter().enumerate().skip(offset as usize) {
            if add(*eino, i as u64 + 1, *kind, OsStr::new(name)) {
                return Ok(());
            }
        }
        let skip = (offset as usize).saturating_sub(2);
        for (i, (name, eino, kind)) in entries.iter().enumerate().skip(skip) {
            if add(*eino, i as u64 + 3, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        self.handles.lock().unwrap().remove(&fh);
    }

    pub fn fsyncdir(&self, ino: u64, datasync: bool) -> Result<(), Errno> {
        if Self::is_virtual(ino) {
            return Ok(());
        }
        let n = self.node(ino)?;
        let fd = sys::reopen(n.fd(), libc::O_RDONLY | libc::O_DIRECTORY).map_err(err)?;
        sys::fsync(fd.as_raw_fd(), datasync).map_err(err)
    }

    pub fn statfs(&self) -> Result<libc::statvfs, Errno> {
        let root = self.inodes.get(ROOT).expect("root is never forgotten");
        sys::statvfs(root.fd()).map_err(err)
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<(), Errno> {
        if Self::is_virtual(ino) {
            return Err(Errno::EROFS);
        }
        let n = self.node(ino)?;
        let c = sys::cstr(name).map_err(err)?;
        sys::setxattr(n.fd(), &c, value, flags).map_err(err)
    }

    /// The value, or with `size` 0 as much as its length needs.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Result<Vec<u8>, Errno> {
        if Self::is_virtual(ino) {
            return Err(Errno::NO_XATTR);
        }
        let n = self.node(ino)?;
        let c = sys::cstr(name).map_err(err)?;
        sys::getxattr(n.fd(), &c, size as usize).map_err(err)
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> Result<Vec<u8>, Errno> {
        if Self::is_virtual(ino) {
            return Ok(Vec::new());
        }
        sys::listxattr(self.node(ino)?.fd(), size as usize).map_err(err)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Result<(), Errno> {
        if Self::is_virtual(ino) {
            return Err(Errno::EROFS);
        }
        let n = self.node(ino)?;
        let c = sys::cstr(name).map_err(err)?;
        sys::removexattr(n.fd(), &c).map_err(err)
    }

    /// On a replicated path, a write like any other: the role check first,
    /// and the range reported as written (punching a hole or zeroing a range
    /// writes zeros; allocating leaves the bytes, and capture finds nothing
    /// changed). Modes that shift the bytes after `offset` are refused there.
    pub fn fallocate(
        &self,
        caller: Caller,
        (ino, fh): (u64, u64),
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        if !Self::is_fd(fh) {
            return Err(Errno::EBADF);
        }
        let class = self.node(ino)?.class();
        let repl = replicated(&class);
        if repl {
            self.repl
                .check_write(&class, caller.pid)
                .and_then(|()| self.repl.before_write(&class, offset, length))
                .map_err(err)?;
            let in_place =
                libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
            if mode & !in_place != 0 {
                return Err(Errno::EOPNOTSUPP);
            }
        }
        sys::fallocate(fh as RawFd, mode, offset, length).map_err(err)?;
        if repl {
            self.repl.written(&class, offset, length).map_err(err)?;
        }
        Ok(())
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Result<i64, Errno> {
        if !Self::is_fd(fh) {
            return Err(Errno::EBADF);
        }
        sys::lseek(fh as RawFd, offset, whence).map_err(err)
    }

    /// Between host-local files, the kernel copies. When either side is
    /// replicated, the copy is a read and a write like any other (read-through
    /// of the source, role check and capture of the
    /// destination), one bounded chunk per call: the caller loops on a short
    /// count as for any copy_file_range.
    pub fn copy_file_range(
        &self,
        caller: Caller,
        from: CopySide,
        to: CopySide,
        len: u64,
    ) -> Result<usize, Errno> {
        if !Self::is_fd(from.fh) || !Self::is_fd(to.fh) {
            return Err(Errno::EBADF);
        }
        let (class_in, class_out) = match (self.node(from.ino), self.node(to.ino)) {
            (Ok(a), Ok(b)) => (a.class(), b.class()),
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        if replicated(&class_in) || replicated(&class_out) {
            return self.copy_through(
                caller.pid,
                (&class_in, from.fh as RawFd, from.offset),
                (&class_out, to.fh as RawFd, to.offset),
                len,
            );
        }
        let len = len.min(u32::MAX as u64 / 2);
        sys::copy_file_range(
            from.fh as RawFd,
            from.offset,
            to.fh as RawFd,
            to.offset,
            len,
        )
        .map_err(err)
    }
}

impl<B> PassthroughFs<B> {
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

    /// Shared tail of mkdir/mknod/symlink/link: create, hand over, look up.
    fn make(
        &self,
        caller: Caller,
        parent: u64,
        name: &OsStr,
        op: impl FnOnce(RawFd, &std::ffi::CStr) -> Result<(), i32>,
    ) -> Result<FileAttr, Errno> {
        let (p, c) = self.target(parent, name, Errno::EEXIST)?;
        op(p.fd(), &c).map_err(err)?;
        self.give_to_caller(caller, p.fd(), &c);
        self.do_lookup(&p, name)
    }

    fn remove(&self, pid: u32, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        if Self::reserved(parent, name) || Self::is_virtual(parent) {
            return Err(Errno::EPERM);
        }
        let class = self.child_class(parent, name);
        let p = self.node(parent)?;
        let c = sys::cstr(name).map_err(err)?;
        if replicated(&class) {
            self.repl.check_write(&class, pid).map_err(err)?;
        }
        sys::unlink_at(p.fd(), &c, dir).map_err(err)?;
        if replicated(&class) {
            self.repl.removed(&class).map_err(err)?;
        }
        Ok(())
    }
}
