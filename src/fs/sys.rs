//! Thin, errno-preserving wrappers over the `*at()` syscalls the passthrough needs.
//!
//! Every backing operation is relative to an fd opened before the mount covered the
//! directory, so the daemon keeps reaching the files the mount hides. Errors keep the
//! exact errno of the backing filesystem: SQLite decides what to do from it.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

pub type SysResult<T> = Result<T, i32>;

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(ret: libc::c_int) -> SysResult<libc::c_int> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> SysResult<usize> {
    if ret < 0 {
        Err(errno())
    } else {
        Ok(ret as usize)
    }
}

pub fn cstr(name: &OsStr) -> SysResult<CString> {
    CString::new(name.as_bytes()).map_err(|_| libc::EINVAL)
}

const EMPTY: &CStr = c"";

/// `/proc/self/fd/N`: reopens an `O_PATH` fd with real access flags, and reaches
/// calls (chmod, xattrs, utimens) that refuse `O_PATH` fds directly.
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

pub fn open_path_at(dir: RawFd, name: &CStr) -> SysResult<OwnedFd> {
    // SAFETY: `name` is a NUL-terminated C string borrowed for the call; openat
    // reads nothing else from our memory (a bad `dir` is EBADF, not UB).
    let fd = check(unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned by a successful openat, so it is open and
    // nothing else owns it: the OwnedFd becomes its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn open_dir_path(path: &std::path::Path) -> SysResult<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| libc::EINVAL)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a fresh fd from a successful open, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reopen the file an `O_PATH` fd designates with the caller's flags.
pub fn reopen(path_fd: RawFd, flags: i32) -> SysResult<OwnedFd> {
    let flags = (flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW))
        | libc::O_CLOEXEC;
    let p = proc_path(path_fd);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    let fd = check(unsafe { libc::open(p.as_ptr(), flags) })?;
    // SAFETY: a fresh fd from a successful open, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `f` with this thread's umask at 0, so that what it creates gets
/// exactly the mode asked for: the mode a FUSE request carries was already
/// masked with the caller's umask (by the kernel, and by us with the umask
/// the request carries), and the daemon's own umask must not mask it again.
///
/// The thread first takes a private copy of its filesystem attributes
/// (`unshare(CLONE_FS)`: umask, cwd, root), so the umask is 0 only in this
/// thread and only for the duration of `f`: the daemon's other threads (the
/// journal, base images, divergent copies) keep creating files under the
/// umask the daemon was started with. If the kernel refuses the unshare, the
/// process umask applies as before.
pub fn with_zero_umask<T>(f: impl FnOnce() -> T) -> T {
    thread_local! {
        static PRIVATE_FS: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    }
    let private = PRIVATE_FS.with(|p| {
        if let Some(known) = p.get() {
            return known;
        }
        // SAFETY: unshare takes no pointers; CLONE_FS only gives this thread
        // its own copy of umask/cwd/root, which Rust code does not cache.
        let ok = unsafe { libc::unshare(libc::CLONE_FS) } == 0;
        if !ok {
            tracing::warn!(
                error = %io::Error::last_os_error(),
                "cannot give a FUSE thread its own umask: new files follow the daemon's umask"
            );
        }
        p.set(Some(ok));
        ok
    });
    if !private {
        return f();
    }
    // SAFETY: umask takes no pointers and cannot fail; after the unshare
    // above it changes this thread's umask only.
    let old = unsafe { libc::umask(0) };
    let out = f();
    // SAFETY: as above, restoring the value read before `f`.
    unsafe { libc::umask(old) };
    out
}

/// With exactly `mode` (see [`with_zero_umask`]).
pub fn create_at(dir: RawFd, name: &CStr, flags: i32, mode: u32) -> SysResult<OwnedFd> {
    let flags = (flags | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW) & !libc::O_NOCTTY;
    let fd = with_zero_umask(|| {
        // SAFETY: `name` is a NUL-terminated C string borrowed for the call;
        // with O_CREAT the variadic mode is passed as the c_uint openat reads.
        check(unsafe { libc::openat(dir, name.as_ptr(), flags, mode as libc::c_uint) })
    })?;
    // SAFETY: a fresh fd from a successful openat, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn fstat(fd: RawFd) -> SysResult<libc::stat> {
    // SAFETY: `stat` is a plain C struct of integers: all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: EMPTY is a static NUL-terminated string and `st` a live, writable
    // stat the kernel fills; AT_EMPTY_PATH makes `fd` itself the target.
    check(unsafe {
        libc::fstatat(
            fd,
            EMPTY.as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn fstatat(dir: RawFd, name: &CStr) -> SysResult<libc::stat> {
    // SAFETY: `stat` is a plain C struct of integers: all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is NUL-terminated and borrowed; `st` is live and writable.
    check(unsafe { libc::fstatat(dir, name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st)
}

pub fn pread(fd: RawFd, buf: &mut [u8], off: u64) -> SysResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: pointer and length come from the same live `&mut` slice
        // `buf[done..]`, so the kernel writes only inside `buf`.
        let n = check_size(unsafe {
            libc::pread(
                fd,
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                (off + done as u64) as libc::off_t,
            )
        });
        match n {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

pub fn pwrite(fd: RawFd, buf: &[u8], off: u64) -> SysResult<usize> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: pointer and length come from the same live slice
        // `buf[done..]`, which the kernel only reads.
        let n = check_size(unsafe {
            libc::pwrite(
                fd,
                buf[done..].as_ptr().cast(),
                buf.len() - done,
                (off + done as u64) as libc::off_t,
            )
        });
        match n {
            Ok(n) => done += n,
            Err(libc::EINTR) => continue,
            Err(e) if done > 0 => {
                let _ = e;
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Drops set-user-ID, and set-group-ID on a group-executable file, as the
/// kernel does when a writer without CAP_FSETID changes a file: the daemon
/// writes as root, which would keep them.
pub fn kill_suidgid(fd: RawFd) -> SysResult<()> {
    let mode = fstat(fd)?.st_mode & 0o7777;
    let sgid = if mode & libc::S_IXGRP != 0 {
        mode & libc::S_ISGID
    } else {
        0
    };
    let kill = (mode & libc::S_ISUID) | sgid;
    if kill != 0 {
        chmod_path_fd(fd, mode & !kill)?;
    }
    Ok(())
}

pub fn ftruncate(fd: RawFd, size: u64) -> SysResult<()> {
    // SAFETY: no pointers; a bad fd is EBADF.
    check(unsafe { libc::ftruncate(fd, size as libc::off_t) }).map(drop)
}

pub fn truncate_path_fd(path_fd: RawFd, size: u64) -> SysResult<()> {
    let f = reopen(path_fd, libc::O_WRONLY)?;
    ftruncate(f.as_raw_fd(), size)
}

pub fn fsync(fd: RawFd, datasync: bool) -> SysResult<()> {
    // SAFETY: no pointers; a bad fd is EBADF.
    check(unsafe {
        if datasync {
            libc::fdatasync(fd)
        } else {
            libc::fsync(fd)
        }
    })
    .map(drop)
}

pub fn chmod_path_fd(path_fd: RawFd, mode: u32) -> SysResult<()> {
    let p = proc_path(path_fd);
    // SAFETY: `p` is a NUL-terminated path that outlives the call.
    check(unsafe { libc::chmod(p.as_ptr(), mode & 0o7777) }).map(drop)
}

pub fn chown_fd(path_fd: RawFd, uid: Option<u32>, gid: Option<u32>) -> SysResult<()> {
    let uid = uid.unwrap_or(u32::MAX);
    let gid = gid.unwrap_or(u32::MAX);
    // SAFETY: EMPTY is a static NUL-terminated string; u32::MAX is chown's
    // documented "leave unchanged" value, not an invalid id.
    check(unsafe {
        libc::fchownat(
            path_fd,
            EMPTY.as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `times`: (atime, mtime) as `timespec` (UTIME_OMIT / UTIME_NOW allowed).
pub fn utimens(path_fd: RawFd, is_symlink: bool, times: [libc::timespec; 2]) -> SysResult<()> {
    if is_symlink {
        // A symlink's own times: reachable only with AT_EMPTY_PATH on its O_PATH fd.
        // SAFETY: EMPTY is static and NUL-terminated; `times` is a live array of
        // exactly the two timespecs utimensat reads.
        check(unsafe {
            libc::utimensat(path_fd, EMPTY.as_ptr(), times.as_ptr(), libc::AT_EMPTY_PATH)
        })
        .map(drop)
    } else {
        let p = proc_path(path_fd);
        // SAFETY: `p` outlives the call; `times` holds the two timespecs read.
        check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) }).map(drop)
    }
}

pub fn readlink(path_fd: RawFd) -> SysResult<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which is
    // live and exclusively borrowed for the call.
    let n = check_size(unsafe {
        libc::readlinkat(path_fd, EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// With exactly `mode` (see [`with_zero_umask`]).
pub fn mkdir_at(dir: RawFd, name: &CStr, mode: u32) -> SysResult<()> {
    // SAFETY: `name` is NUL-terminated and borrowed for the call.
    with_zero_umask(|| check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode as libc::mode_t) }))
        .map(drop)
}

/// With exactly `mode` (see [`with_zero_umask`]).
pub fn mknod_at(dir: RawFd, name: &CStr, mode: u32, rdev: u32) -> SysResult<()> {
    with_zero_umask(|| {
        // SAFETY: `name` is NUL-terminated and borrowed for the call.
        check(unsafe {
            libc::mknodat(
                dir,
                name.as_ptr(),
                mode as libc::mode_t,
                rdev as libc::dev_t,
            )
        })
    })
    .map(drop)
}

pub fn symlink_at(target: &CStr, dir: RawFd, name: &CStr) -> SysResult<()> {
    // SAFETY: both strings are NUL-terminated and borrowed for the call.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

pub fn link_at(path_fd: RawFd, dir: RawFd, name: &CStr) -> SysResult<()> {
    // AT_EMPTY_PATH links need CAP_DAC_READ_SEARCH; /proc/self/fd with
    // AT_SYMLINK_FOLLOW works for any owner of the file.
    let p = proc_path(path_fd);
    // SAFETY: `p` and `name` are NUL-terminated and outlive the call.
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            p.as_ptr(),
            dir,
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

pub fn unlink_at(dir: RawFd, name: &CStr, dir_flag: bool) -> SysResult<()> {
    let flags = if dir_flag { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `name` is NUL-terminated and borrowed for the call.
    check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub fn rename_at(
    olddir: RawFd,
    old: &CStr,
    newdir: RawFd,
    new: &CStr,
    flags: u32,
) -> SysResult<()> {
    // SAFETY: both names are NUL-terminated and borrowed for the call.
    check(unsafe {
        libc::renameat2(olddir, old.as_ptr(), newdir, new.as_ptr(), flags) as libc::c_int
    })
    .map(drop)
}

pub fn statvfs(path_fd: RawFd) -> SysResult<libc::statvfs> {
    // SAFETY: `statvfs` is a plain C struct of integers: all-zero is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is live and writable for the call.
    check(unsafe { libc::fstatvfs(path_fd, &mut st) })?;
    Ok(st)
}

pub fn fallocate(fd: RawFd, mode: i32, off: u64, len: u64) -> SysResult<()> {
    // SAFETY: no pointers; a bad fd or mode is an errno.
    check(unsafe { libc::fallocate(fd, mode, off as libc::off_t, len as libc::off_t) }).map(drop)
}

pub fn lseek(fd: RawFd, off: i64, whence: i32) -> SysResult<i64> {
    // SAFETY: no pointers; a bad fd or whence is an errno.
    let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

pub fn copy_file_range(
    fd_in: RawFd,
    off_in: u64,
    fd_out: RawFd,
    off_out: u64,
    len: u64,
) -> SysResult<usize> {
    let mut oi = off_in as libc::loff_t;
    let mut oo = off_out as libc::loff_t;
    // SAFETY: `oi` and `oo` are live locals the kernel updates; no buffer of
    // ours is involved.
    check_size(unsafe { libc::copy_file_range(fd_in, &mut oi, fd_out, &mut oo, len as usize, 0) })
}

/// Closes a file handle's fd. The caller must own `fd`: FUSE `release` passes
/// back, exactly once, the fd that `open`/`create` turned into the handle.
pub fn close(fd: RawFd) {
    // SAFETY: no pointers. Closing is sound for the memory of this process;
    // ownership is the caller's contract above (a wrong fd is EBADF, or closes
    // an fd the caller should not have named).
    unsafe {
        libc::close(fd);
    }
}

/// Directory entries of the directory an `O_PATH` fd designates, without `.`/`..`.
pub fn read_dir(path_fd: RawFd) -> SysResult<Vec<(Vec<u8>, u64, u8)>> {
    let fd = reopen(path_fd, libc::O_RDONLY | libc::O_DIRECTORY)?;
    // SAFETY: `fd` is open and owned here; on success the DIR takes it over
    // (hence the `forget` below), on failure it stays ours and is dropped.
    let dir = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if dir.is_null() {
        return Err(errno());
    }
    std::mem::forget(fd); // owned by `dir` now
    let mut out = Vec::new();
    loop {
        // SAFETY: __errno_location returns this thread's errno slot, always
        // valid for writes; clearing it tells end-of-directory from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `dir` is the non-null DIR from fdopendir, not yet closed.
        let ent = unsafe { libc::readdir64(dir) };
        if ent.is_null() {
            // SAFETY: this thread's errno slot, valid for reads.
            let e = unsafe { *libc::__errno_location() };
            // SAFETY: `dir` is open and closed exactly once, here, before the
            // loop ends; it closes the fd it took over.
            unsafe { libc::closedir(dir) };
            if e != 0 {
                return Err(e);
            }
            break;
        }
        // SAFETY: a non-null readdir64 result points to an entry owned by
        // `dir`, valid until the next readdir64/closedir; `ent` and `name` are
        // used (and `name` copied) before either.
        let ent = unsafe { &*ent };
        // SAFETY: d_name is NUL-terminated within the entry (readdir(3)).
        let name = unsafe { CStr::from_ptr(ent.d_name.as_ptr()) }.to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push((name.to_vec(), ent.d_ino, ent.d_type));
    }
    Ok(out)
}

pub fn getxattr(path_fd: RawFd, name: &CStr, size: usize) -> SysResult<Vec<u8>> {
    let p = proc_path(path_fd);
    let mut buf = vec![0u8; size];
    // SAFETY: the kernel writes at most `size` == `buf.len()` bytes into
    // `buf`; `p` and `name` are NUL-terminated and outlive the call.
    let n = check_size(unsafe {
        libc::getxattr(p.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), size)
    })?;
    // With size 0 the kernel only reports the length; the caller replies with it.
    buf.resize(n, 0);
    Ok(buf)
}

pub fn listxattr(path_fd: RawFd, size: usize) -> SysResult<Vec<u8>> {
    let p = proc_path(path_fd);
    let mut buf = vec![0u8; size];
    // SAFETY: at most `size` == `buf.len()` bytes are written into `buf`.
    let n = check_size(unsafe { libc::listxattr(p.as_ptr(), buf.as_mut_ptr().cast(), size) })?;
    buf.resize(n, 0);
    Ok(buf)
}

pub fn setxattr(path_fd: RawFd, name: &CStr, value: &[u8], flags: i32) -> SysResult<()> {
    let p = proc_path(path_fd);
    // SAFETY: `value`'s pointer and length come from one live slice the
    // kernel only reads; `p` and `name` are NUL-terminated.
    check(unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn removexattr(path_fd: RawFd, name: &CStr) -> SysResult<()> {
    let p = proc_path(path_fd);
    // SAFETY: `p` and `name` are NUL-terminated and outlive the call.
    check(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(drop)
}

pub fn is_append(fd: RawFd) -> bool {
    // SAFETY: F_GETFL takes no argument and reads no memory of ours.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    fl >= 0 && fl & libc::O_APPEND != 0
}
