//! Test-only SQLite VFS that wraps the default one and records every write,
//! truncate and delete SQLite performs on the main database, its WAL and its
//! rollback journal, in order. Replaying the log reproduces exactly the
//! sequence of writes the FUSE layer will see, including SQLite's split frame
//! writes, in-place frame overwrites and checksum rewrites.
//!
//! Safety: every `unsafe fn` below is a callback SQLite calls through the
//! `sqlite3_vfs` and [`METHODS`] tables installed by [`RecVfs::register`],
//! with the pointers its VFS contract guarantees valid: the `sqlite3_vfs` we
//! registered (whose `pAppData` is the leaked, never-freed [`Shared`]), and a
//! `sqlite3_file` of `szOsFile` bytes that `x_open` initialised as a
//! [`ShimFile`] and that lives until `m_close`. Each delegates to the real
//! VFS with the same arguments, so what SQLite guarantees us, it guarantees
//! the real VFS.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use rusqlite::ffi;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Db,
    Wal,
    Journal,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    Write {
        kind: Kind,
        offset: u64,
        data: Vec<u8>,
    },
    Truncate {
        kind: Kind,
        size: u64,
    },
    Delete {
        kind: Kind,
    },
}

/// Told of each change after it reached the file, as the FUSE layer tells
/// replication; `false` fails SQLite's call with an I/O error (as an errno
/// from the daemon would).
type Hook = Box<dyn Fn(&Ev) -> bool + Send + Sync>;

struct Shared {
    real: *mut ffi::sqlite3_vfs,
    log: Mutex<Vec<Ev>>,
    hook: Mutex<Option<Hook>>,
    /// Clear SQLITE_IOCAP_POWERSAFE_OVERWRITE so SQLite pads WAL commits.
    no_psow: bool,
}

/// A registered recording VFS. Leaked on purpose: SQLite keeps pointers to it.
pub struct RecVfs {
    pub name: String,
    shared: &'static Shared,
}

impl RecVfs {
    pub fn register(no_psow: bool) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!("recvfs{}", N.fetch_add(1, Ordering::Relaxed));
        // SAFETY: sqlite3_initialize has no preconditions; the default VFS it
        // finds is asserted non-null before `(*real)` is read. The new vfs
        // struct, its name and its `Shared` are leaked, so they outlive every
        // use SQLite makes of them after registration; `szOsFile` is the size
        // of the ShimFile our callbacks treat each file as.
        unsafe {
            ffi::sqlite3_initialize();
            let real = ffi::sqlite3_vfs_find(std::ptr::null());
            assert!(!real.is_null());
            let shared: &'static Shared = Box::leak(Box::new(Shared {
                real,
                log: Mutex::new(Vec::new()),
                hook: Mutex::new(None),
                no_psow,
            }));
            let zname = CString::new(name.clone()).unwrap().into_raw();
            let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
                iVersion: 2,
                szOsFile: std::mem::size_of::<ShimFile>() as c_int,
                mxPathname: (*real).mxPathname,
                pNext: std::ptr::null_mut(),
                zName: zname,
                pAppData: shared as *const Shared as *mut c_void,
                xOpen: Some(x_open),
                xDelete: Some(x_delete),
                xAccess: Some(x_access),
                xFullPathname: Some(x_full_pathname),
                xDlOpen: None,
                xDlError: None,
                xDlSym: None,
                xDlClose: None,
                xRandomness: Some(x_randomness),
                xSleep: Some(x_sleep),
                xCurrentTime: Some(x_current_time),
                xGetLastError: Some(x_get_last_error),
                xCurrentTimeInt64: Some(x_current_time_int64),
                xSetSystemCall: None,
                xGetSystemCall: None,
                xNextSystemCall: None,
            }));
            assert_eq!(ffi::sqlite3_vfs_register(vfs, 0), ffi::SQLITE_OK);
            Self { name, shared }
        }
    }

    /// Calls `hook` with every write, truncate and delete once it reached the
    /// file; when it returns `false`, SQLite's call fails with an I/O error.
    pub fn on_change(&self, hook: impl Fn(&Ev) -> bool + Send + Sync + 'static) {
        *self.shared.hook.lock().unwrap() = Some(Box::new(hook));
    }

    /// Takes the events recorded so far.
    pub fn take(&self) -> Vec<Ev> {
        std::mem::take(&mut *self.shared.log.lock().unwrap())
    }

    pub fn open(&self, path: &std::path::Path) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags_and_vfs(
            path,
            rusqlite::OpenFlags::default(),
            self.name.as_str(),
        )
        .unwrap()
    }
}

#[repr(C)]
struct ShimFile {
    base: ffi::sqlite3_file,
    real: *mut ffi::sqlite3_file,
    kind: Kind,
    shared: *const Shared,
}

/// # Safety
/// `vfs` is a vfs registered by [`RecVfs::register`] (its `pAppData` is a leaked `Shared`).
unsafe fn shared(vfs: *mut ffi::sqlite3_vfs) -> &'static Shared {
    &*((*vfs).pAppData as *const Shared)
}

/// # Safety
/// As [`shared`].
unsafe fn real_vfs(vfs: *mut ffi::sqlite3_vfs) -> *mut ffi::sqlite3_vfs {
    shared(vfs).real
}

fn kind_of_name(name: &str) -> Kind {
    if name.ends_with("-wal") {
        Kind::Wal
    } else if name.ends_with("-journal") {
        Kind::Journal
    } else if name.ends_with(".db") {
        Kind::Db
    } else {
        Kind::Other
    }
}

unsafe extern "C" fn x_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    let sh = shared(vfs);
    let rv = sh.real;
    let size = (*rv).szOsFile as usize;
    let layout = std::alloc::Layout::from_size_align(size.max(8), 16).unwrap();
    let real = std::alloc::alloc_zeroed(layout) as *mut ffi::sqlite3_file;
    let rc = ((*rv).xOpen.unwrap())(rv, name, real, flags, out);
    let sf = file as *mut ShimFile;
    let kind = if flags & ffi::SQLITE_OPEN_WAL != 0 {
        Kind::Wal
    } else if flags & ffi::SQLITE_OPEN_MAIN_JOURNAL != 0 {
        Kind::Journal
    } else if flags & ffi::SQLITE_OPEN_MAIN_DB != 0 {
        Kind::Db
    } else {
        Kind::Other
    };
    (*sf).real = real;
    (*sf).kind = kind;
    (*sf).shared = sh;
    if (*real).pMethods.is_null() {
        (*sf).base.pMethods = std::ptr::null();
        std::alloc::dealloc(real as *mut u8, layout);
    } else {
        (*sf).base.pMethods = &METHODS;
    }
    rc
}

unsafe extern "C" fn x_delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    sync: c_int,
) -> c_int {
    let rv = real_vfs(vfs);
    let rc = ((*rv).xDelete.unwrap())(rv, name, sync);
    let n = CStr::from_ptr(name).to_string_lossy();
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    let ev = Ev::Delete {
        kind: kind_of_name(&n),
    };
    shared(vfs).record(ev, rc, ffi::SQLITE_IOERR_DELETE)
}

unsafe extern "C" fn x_access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    f: c_int,
    out: *mut c_int,
) -> c_int {
    let rv = real_vfs(vfs);
    ((*rv).xAccess.unwrap())(rv, name, f, out)
}

unsafe extern "C" fn x_full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    let rv = real_vfs(vfs);
    ((*rv).xFullPathname.unwrap())(rv, name, n, out)
}

unsafe extern "C" fn x_randomness(vfs: *mut ffi::sqlite3_vfs, n: c_int, out: *mut c_char) -> c_int {
    let rv = real_vfs(vfs);
    ((*rv).xRandomness.unwrap())(rv, n, out)
}

unsafe extern "C" fn x_sleep(vfs: *mut ffi::sqlite3_vfs, us: c_int) -> c_int {
    let rv = real_vfs(vfs);
    ((*rv).xSleep.unwrap())(rv, us)
}

unsafe extern "C" fn x_current_time(vfs: *mut ffi::sqlite3_vfs, t: *mut f64) -> c_int {
    let rv = real_vfs(vfs);
    ((*rv).xCurrentTime.unwrap())(rv, t)
}

unsafe extern "C" fn x_get_last_error(
    vfs: *mut ffi::sqlite3_vfs,
    n: c_int,
    z: *mut c_char,
) -> c_int {
    let rv = real_vfs(vfs);
    ((*rv).xGetLastError.unwrap())(rv, n, z)
}

unsafe extern "C" fn x_current_time_int64(
    vfs: *mut ffi::sqlite3_vfs,
    t: *mut ffi::sqlite3_int64,
) -> c_int {
    let rv = real_vfs(vfs);
    ((*rv).xCurrentTimeInt64.unwrap())(rv, t)
}

/// # Safety
/// `f` is a file `x_open` opened successfully and that is not closed yet.
unsafe fn parts(
    f: *mut ffi::sqlite3_file,
) -> (*mut ffi::sqlite3_file, &'static ffi::sqlite3_io_methods) {
    let sf = f as *mut ShimFile;
    let real = (*sf).real;
    (real, &*(*real).pMethods)
}

macro_rules! delegate {
    ($name:ident, $field:ident, ($($arg:ident : $ty:ty),*) -> $ret:ty) => {
        unsafe extern "C" fn $name(f: *mut ffi::sqlite3_file $(, $arg: $ty)*) -> $ret {
            let (real, m) = parts(f);
            (m.$field.unwrap())(real $(, $arg)*)
        }
    };
}

delegate!(m_read, xRead, (buf: *mut c_void, amt: c_int, off: ffi::sqlite3_int64) -> c_int);
delegate!(m_sync, xSync, (flags: c_int) -> c_int);
delegate!(m_file_size, xFileSize, (out: *mut ffi::sqlite3_int64) -> c_int);
delegate!(m_lock, xLock, (l: c_int) -> c_int);
delegate!(m_unlock, xUnlock, (l: c_int) -> c_int);
delegate!(m_check_reserved, xCheckReservedLock, (out: *mut c_int) -> c_int);
delegate!(m_file_control, xFileControl, (op: c_int, arg: *mut c_void) -> c_int);
delegate!(m_sector_size, xSectorSize, () -> c_int);
delegate!(m_shm_map, xShmMap, (pg: c_int, sz: c_int, ext: c_int, pp: *mut *mut c_void) -> c_int);
delegate!(m_shm_lock, xShmLock, (off: c_int, n: c_int, flags: c_int) -> c_int);
delegate!(m_shm_unmap, xShmUnmap, (del: c_int) -> c_int);

unsafe extern "C" fn m_shm_barrier(f: *mut ffi::sqlite3_file) {
    let (real, m) = parts(f);
    (m.xShmBarrier.unwrap())(real)
}

unsafe extern "C" fn m_fetch(
    _f: *mut ffi::sqlite3_file,
    _off: ffi::sqlite3_int64,
    _amt: c_int,
    pp: *mut *mut c_void,
) -> c_int {
    *pp = std::ptr::null_mut(); // no memory mapping: every read goes through xRead
    ffi::SQLITE_OK
}

unsafe extern "C" fn m_unfetch(
    _f: *mut ffi::sqlite3_file,
    _off: ffi::sqlite3_int64,
    _p: *mut c_void,
) -> c_int {
    ffi::SQLITE_OK
}

unsafe extern "C" fn m_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    let (real, m) = parts(f);
    let dc = (m.xDeviceCharacteristics.unwrap())(real);
    let sf = f as *mut ShimFile;
    if (*(*sf).shared).no_psow {
        dc & !ffi::SQLITE_IOCAP_POWERSAFE_OVERWRITE
    } else {
        dc
    }
}

unsafe extern "C" fn m_close(f: *mut ffi::sqlite3_file) -> c_int {
    let (real, m) = parts(f);
    let rc = (m.xClose.unwrap())(real);
    let sf = f as *mut ShimFile;
    let size = (*(*(*sf).shared).real).szOsFile as usize;
    let layout = std::alloc::Layout::from_size_align(size.max(8), 16).unwrap();
    std::alloc::dealloc(real as *mut u8, layout);
    rc
}

unsafe extern "C" fn m_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amt: c_int,
    off: ffi::sqlite3_int64,
) -> c_int {
    let (real, m) = parts(f);
    let rc = (m.xWrite.unwrap())(real, buf, amt, off);
    let sf = f as *mut ShimFile;
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    let data = std::slice::from_raw_parts(buf as *const u8, amt as usize).to_vec();
    let ev = Ev::Write {
        kind: (*sf).kind,
        offset: off as u64,
        data,
    };
    (*(*sf).shared).record(ev, rc, ffi::SQLITE_IOERR_WRITE)
}

unsafe extern "C" fn m_truncate(f: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    let (real, m) = parts(f);
    let rc = (m.xTruncate.unwrap())(real, size);
    let sf = f as *mut ShimFile;
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    let ev = Ev::Truncate {
        kind: (*sf).kind,
        size: size as u64,
    };
    (*(*sf).shared).record(ev, rc, ffi::SQLITE_IOERR_TRUNCATE)
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(m_close),
    xRead: Some(m_read),
    xWrite: Some(m_write),
    xTruncate: Some(m_truncate),
    xSync: Some(m_sync),
    xFileSize: Some(m_file_size),
    xLock: Some(m_lock),
    xUnlock: Some(m_unlock),
    xCheckReservedLock: Some(m_check_reserved),
    xFileControl: Some(m_file_control),
    xSectorSize: Some(m_sector_size),
    xDeviceCharacteristics: Some(m_device_characteristics),
    xShmMap: Some(m_shm_map),
    xShmLock: Some(m_shm_lock),
    xShmBarrier: Some(m_shm_barrier),
    xShmUnmap: Some(m_shm_unmap),
    xFetch: Some(m_fetch),
    xUnfetch: Some(m_unfetch),
};

/// In-memory copy of the files, rebuilt by replaying events.
#[derive(Default, Clone)]
pub struct Files {
    pub db: Vec<u8>,
    pub wal: Vec<u8>,
    pub journal: Option<Vec<u8>>,
}

impl Shared {
    /// Records `ev`; `rc` unless the hook refuses it.
    fn record(&self, ev: Ev, rc: c_int, refused: c_int) -> c_int {
        let ok = self.hook.lock().unwrap().as_ref().is_none_or(|h| h(&ev));
        self.log.lock().unwrap().push(ev);
        if ok {
            rc
        } else {
            refused
        }
    }
}

impl Files {
    /// Applies one event; returns the kind of file it touched.
    pub fn apply(&mut self, ev: &Ev) {
        match ev {
            Ev::Write { kind, offset, data } => {
                let f = match kind {
                    Kind::Db => &mut self.db,
                    Kind::Wal => &mut self.wal,
                    Kind::Journal => self.journal.get_or_insert_with(Vec::new),
                    Kind::Other => return,
                };
                let o = *offset as usize;
                if f.len() < o + data.len() {
                    f.resize(o + data.len(), 0);
                }
                f[o..o + data.len()].copy_from_slice(data);
            }
            Ev::Truncate { kind, size } => match kind {
                Kind::Db => self.db.resize(*size as usize, 0),
                Kind::Wal => self.wal.resize(*size as usize, 0),
                Kind::Journal => self
                    .journal
                    .get_or_insert_with(Vec::new)
                    .resize(*size as usize, 0),
                Kind::Other => {}
            },
            Ev::Delete { kind } => match kind {
                Kind::Wal => self.wal.clear(),
                Kind::Journal => self.journal = None,
                _ => {}
            },
        }
    }
}
