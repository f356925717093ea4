//! Lending the daemon's WAL write lock to the view applier
//! (docs/ARCHITECTURE.md, "Passthrough"): SQLite in this process locks with
//! POSIX locks, which conflict with the daemon's own OFD lock on the same
//! byte, so the applier's request for exactly that lock is answered
//! "granted" while the daemon holds it for it.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, OnceLock};

use super::SHM_WRITE;

/// `-shm` inodes (device, inode) whose write lock the daemon holds for the
/// view applier.
static LENT: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
/// SQLite's own fcntl, called for everything not lent.
static REAL_FCNTL: OnceLock<usize> = OnceLock::new();

pub(super) fn lend_write_lock(shm: &File, on: bool) {
    let Ok(m) = shm.metadata() else { return };
    let key = (m.dev(), m.ino());
    let mut l = LENT.lock().unwrap();
    l.retain(|k| *k != key);
    if on {
        l.push(key);
    }
}

/// While the daemon holds a database's WAL write lock to keep its clients
/// out, the view applier (SQLite in this process, locking with POSIX locks,
/// which conflict with the daemon's OFD lock) must still write: its request
/// for exactly that lock is answered "granted", the daemon's lock standing
/// for it. Installed once as SQLite's `fcntl` through the unix VFS's
/// system-call override.
pub fn install_lock_lending() {
    use rusqlite::ffi;
    if REAL_FCNTL.get().is_some() {
        return;
    }
    // SAFETY: sqlite3_initialize has no preconditions; the default VFS is
    // checked non-null before use; "fcntl" is a NUL-terminated literal;
    // xGetSystemCall/xSetSystemCall are the unix VFS's documented override
    // hooks, called before any connection of ours uses the VFS concurrently
    // (at daemon start).
    unsafe {
        ffi::sqlite3_initialize();
        let vfs = ffi::sqlite3_vfs_find(std::ptr::null());
        if vfs.is_null() {
            return;
        }
        let (Some(get), Some(set)) = ((*vfs).xGetSystemCall, (*vfs).xSetSystemCall) else {
            return;
        };
        let name = c"fcntl".as_ptr();
        let Some(real) = get(vfs, name) else { return };
        let _ = REAL_FCNTL.set(real as usize);
        let ours: unsafe extern "C" fn(libc::c_int, libc::c_int, usize) -> libc::c_int =
            lending_fcntl;
        // The unix VFS calls it as `int (*)(int, int, ...)`; on the Linux
        // ABIs (x86-64, AArch64) a variadic call passes these three
        // arguments in the same registers as this non-variadic function
        // receives them.
        set(
            vfs,
            name,
            Some(std::mem::transmute::<
                unsafe extern "C" fn(libc::c_int, libc::c_int, usize) -> libc::c_int,
                unsafe extern "C" fn(),
            >(ours)),
        );
    }
}

unsafe extern "C" fn lending_fcntl(fd: libc::c_int, cmd: libc::c_int, arg: usize) -> libc::c_int {
    if (cmd == libc::F_SETLK || cmd == libc::F_SETLKW) && arg != 0 {
        // SAFETY: for F_SETLK/F_SETLKW the third argument is a `struct flock *`.
        let fl = &*(arg as *const libc::flock);
        if fl.l_type == libc::F_WRLCK as i16 && fl.l_start == SHM_WRITE && fl.l_len == 1 && lent(fd)
        {
            return 0;
        }
    }
    let real = *REAL_FCNTL.get().expect("installed before use");
    // SAFETY: `real` is the unix VFS's own fcntl, which takes these
    // arguments as passed to us.
    let real: unsafe extern "C" fn(libc::c_int, libc::c_int, ...) -> libc::c_int =
        std::mem::transmute(real);
    real(fd, cmd, arg)
}

fn lent(fd: libc::c_int) -> bool {
    let l = LENT.lock().unwrap();
    if l.is_empty() {
        return false;
    }
    // SAFETY: stat is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the stat we own; a bad fd is an error.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    l.contains(&(st.st_dev, st.st_ino))
}
