//! Lending the daemon's own wal-index locks to SQLite in this process
//! (docs/ARCHITECTURE.md, "Passthrough"): the view applier and the tailer's
//! checkpointer lock with POSIX locks, which conflict with the daemon's own
//! OFD lock on the same byte, so their request for exactly that lock is
//! answered "granted" while the daemon holds it for them: the WAL write lock
//! (byte 120), and read-mark 1 (byte 124) while the tailer copies the WAL.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, OnceLock};

/// A lock the daemon holds exclusively (an OFD lock on `owner`, an open
/// `-shm`) for SQLite in this process.
struct Lent {
    dev: u64,
    ino: u64,
    byte: i64,
    /// Given back by the borrower's unlock: the daemon's lock becomes a
    /// read lock again, and requests go to the kernel from then on.
    once: Option<std::os::fd::RawFd>,
}

static LENT: Mutex<Vec<Lent>> = Mutex::new(Vec::new());
/// SQLite's own fcntl, called for everything not lent.
static REAL_FCNTL: OnceLock<usize> = OnceLock::new();

/// Lend (or stop lending) the daemon's exclusive lock on `byte` of `shm`,
/// for as long as the daemon holds it.
pub(super) fn lend(shm: &File, byte: i64, on: bool) {
    lend_as(shm, byte, on, None);
}

/// Lend the daemon's exclusive lock on `byte` of `shm` until the borrower
/// unlocks it, when the daemon's lock turns into a read lock: the tailer's
/// checkpoint moves read-mark 1 so, and clients may read at the new mark
/// while it copies.
pub(super) fn lend_once(shm: &File, byte: i64, on: bool) {
    use std::os::fd::AsRawFd;
    lend_as(shm, byte, on, Some(shm.as_raw_fd()));
}

fn lend_as(shm: &File, byte: i64, on: bool, once: Option<std::os::fd::RawFd>) {
    let Ok(m) = shm.metadata() else { return };
    let (dev, ino) = (m.dev(), m.ino());
    let mut l = LENT.lock().unwrap();
    l.retain(|k| (k.dev, k.ino, k.byte) != (dev, ino, byte));
    if on {
        l.push(Lent {
            dev,
            ino,
            byte,
            once,
        });
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
        if fl.l_len == 1 && lent(fd, fl.l_start, fl.l_type) {
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

/// Is this request for `byte` of the file `fd` answered by a lent lock?
/// A write lock request, for any lent lock; a read lock request, for one
/// lent until unlocked (the daemon's exclusive lock covers it); an unlock,
/// for one lent until unlocked, which it gives back.
fn lent(fd: libc::c_int, byte: i64, typ: i16) -> bool {
    let mut l = LENT.lock().unwrap();
    if l.is_empty() {
        return false;
    }
    // SAFETY: stat is plain old data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the stat we own; a bad fd is an error.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    let Some(at) = l
        .iter()
        .position(|k| (k.dev, k.ino, k.byte) == (st.st_dev, st.st_ino, byte))
    else {
        return false;
    };
    match (typ as i32, l[at].once) {
        (libc::F_WRLCK, _) => true,
        (libc::F_RDLCK, Some(_)) => true,
        (libc::F_UNLCK, Some(owner)) => {
            l.remove(at);
            let fl = super::flock(libc::F_RDLCK, byte, 1);
            // SAFETY: F_OFD_SETLK reads the flock we pass; `owner` is the
            // daemon's open `-shm`, open while the lock is lent.
            unsafe { libc::fcntl(owner, libc::F_OFD_SETLK, &fl) };
            true
        }
        _ => false,
    }
}
