//! Capture off the write path: a replicated database in WAL mode is served by
//! the kernel (FUSE passthrough) on the primary, and its commits are read
//! from the backing `-wal` after the fact (docs/ARCHITECTURE.md,
//! "Passthrough", "Capture off the write path").
//!
//! The kernel cannot be asked to hand a passthrough open back, so whatever
//! the daemon must prevent is prevented with SQLite's own locks, taken as
//! open-file-description locks on files opened through the mount (the same
//! inodes, so the same lock table as every client):
//! - the **guard**, a read lock on the database file's SHARED range, held
//!   while any open of the database may be a passthrough one: leaving WAL
//!   mode needs an EXCLUSIVE lock, and outside WAL mode a connection writes
//!   the main file in ways the daemon would not see;
//! - the **pin**, a read lock on the wal-index's read-mark 1 byte: a writer
//!   restarts the WAL only once it holds every read-mark lock, so frames stay
//!   in `-wal` until the tailer has read them. It is released for a moment
//!   each time the tailer has caught up, so the WAL can restart at all;
//! - the **write lock** (wal-index byte 120), held while the node is not
//!   primary and clients it served in passthrough are still open: their
//!   writes wait (SQLITE_BUSY) instead of reaching the file. The view
//!   applier, which must write meanwhile, is lent the lock
//!   ([`lend_write_lock`]).

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::fs::class::{PathClass, Sidecar};

mod lend;
pub use lend::install_lock_lending;
use lend::lend_write_lock;

/// wal-index lock bytes (SQLITE_NOTES.md: byte 120 + lock number).
const SHM_WRITE: i64 = 120;
/// WAL_READ_LOCK(1): 120 + 3 + 1.
const SHM_READ1: i64 = 124;
/// The database file's SHARED range (os.h: PENDING_BYTE 0x40000000 + 2, 510 bytes).
const DB_SHARED_FIRST: i64 = 0x4000_0002;
const DB_SHARED_SIZE: i64 = 510;

/// How long a role change waits for a client's open write transaction
/// before it stops writers anyway (the transaction then waits for the lock).
const WRITER_WAIT: Duration = Duration::from_secs(5);
/// How often the tailer looks for new commits while they come...
pub const TICK: Duration = Duration::from_millis(5);
/// ...and once none came for [`BUSY_FOR`]: an idle daemon stays idle, and a
/// first commit is still journaled well within 50 ms.
const IDLE_TICK: Duration = Duration::from_millis(20);
const BUSY_FOR: Duration = Duration::from_secs(2);
/// How often a database not served in passthrough is tried again.
const RETRY: Duration = Duration::from_millis(200);
/// How long an open waits for a database to leave [`Io::Arming`] or
/// [`Io::Draining`]; past it the open fails EBUSY.
const SETTLE_WAIT: Duration = Duration::from_secs(2);

/// How the opens of one database are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// Through the daemon (write-path capture, the role gate).
    Off,
    /// The tailer is taking the guard: only its own open may pass through.
    Arming,
    /// Primary: main file and `-wal` in passthrough, guarded and pinned.
    Armed,
    /// Not primary, passthrough opens still open: writers locked out.
    Locked,
    /// The last client's passthrough open closed: the daemon's own are
    /// closing, after which opens take the daemon's path again.
    Draining,
}

impl Io {
    pub fn name(self) -> &'static str {
        match self {
            Io::Off => "daemon",
            Io::Arming => "arming",
            Io::Armed => "kernel",
            Io::Locked => "kernel, writers locked out",
            Io::Draining => "draining",
        }
    }
}

#[derive(Default)]
struct Tail {
    io: Option<Io>,
    /// The guard's open of the database, through the mount.
    guard: Option<Arc<File>>,
    /// The `-shm`, through the mount: the pin and the write lock.
    shm: Option<Arc<File>>,
    pinned: bool,
    write_locked: bool,
    /// Passthrough opens of the main file and `-wal`, by handle: clients'
    /// and the daemon's own (the guard, the view applier).
    clients: HashSet<u64>,
    own: HashSet<u64>,
    /// Opens of the main file and `-wal` on the daemon's path: while there
    /// is one, the kernel would refuse a passthrough open, so arming waits
    /// (without an open through the mount every retry).
    daemon: HashSet<u64>,
    next_try: Option<Instant>,
    /// The tailer is opening the guard: that open starts [`Io::Arming`].
    arming: bool,
}

impl Tail {
    fn io(&self) -> Io {
        self.io.unwrap_or(Io::Off)
    }
}

/// Per-database passthrough state, shared by the FUSE threads (which ask
/// [`Tails::kernel_io`] at each open) and the tailer.
#[derive(Default)]
pub struct Tails {
    map: Mutex<HashMap<String, Tail>>,
    /// Signalled when a database leaves [`Io::Arming`] or [`Io::Draining`].
    settled: Condvar,
    /// Opens waiting on [`Tails::settled`], and how many may: a FUSE thread
    /// must stay free to answer the releases that end [`Io::Draining`].
    waiting: AtomicUsize,
    max_waiting: AtomicUsize,
    mount: OnceLock<PathBuf>,
    stats: OnceLock<Arc<crate::fs::iomode::IoStats>>,
    /// The tailer thread (its opens through the mount are recognised).
    tid: AtomicI32,
    /// Primary: passthrough writers allowed, commits tailed.
    writers: AtomicBool,
    /// Closes the view applier's connection to a database.
    close_own: OnceLock<CloseOwn>,
    /// Unmounting: the daemon's own opens through the mount are closed
    /// until then, so they do not keep it busy.
    paused_until: Mutex<Option<Instant>>,
}

type CloseOwn = Box<dyn Fn(&str) + Send + Sync>;

fn db_of(class: &PathClass) -> Option<(&str, bool)> {
    match class {
        PathClass::Database(db) => Some((db, true)),
        PathClass::Sidecar(db, Sidecar::Wal) => Some((db, false)),
        _ => None,
    }
}

impl Tails {
    /// Passthrough for databases needs the mount path (the daemon's own
    /// opens go through it). Without it, every database stays on the
    /// daemon's path.
    /// `threads` is the number of FUSE threads answering requests.
    pub fn set_mount(&self, mount: &Path, stats: Arc<crate::fs::iomode::IoStats>, threads: usize) {
        let _ = self.mount.set(mount.to_path_buf());
        let _ = self.stats.set(stats);
        self.max_waiting
            .store(threads.saturating_sub(1), Ordering::Release);
    }

    fn show(&self, db: &str, io: Io) {
        if let Some(s) = self.stats.get() {
            s.set_database(db, io.name());
        }
    }

    pub fn set_close_own(&self, f: CloseOwn) {
        let _ = self.close_own.set(f);
    }

    /// Let go of every open through the mount for `d` (an unmount is
    /// coming); a database a client still holds in passthrough keeps its
    /// guard (the unmount fails busy anyway).
    pub fn pause(&self, d: Duration) {
        *self.paused_until.lock().unwrap() = Some(Instant::now() + d);
    }

    fn paused(&self) -> bool {
        self.paused_until
            .lock()
            .unwrap()
            .is_some_and(|t| Instant::now() < t)
    }

    fn let_go(&self) {
        let mut dropped = Vec::new();
        {
            let mut m = self.map.lock().unwrap();
            for (db, t) in m.iter_mut() {
                if !t.clients.is_empty() || t.io() == Io::Off {
                    continue;
                }
                if let Some(s) = &t.shm {
                    lend_write_lock(s, false);
                }
                t.write_locked = false;
                t.pinned = false;
                t.io = Some(Io::Off);
                dropped.push((db.clone(), t.guard.take(), t.shm.take()));
            }
        }
        self.settled.notify_all();
        for (db, guard, shm) in dropped {
            self.show(&db, Io::Off);
            drop((guard, shm));
        }
    }

    pub fn enabled(&self) -> bool {
        self.mount.get().is_some()
    }

    pub fn writers_allowed(&self) -> bool {
        self.writers.load(Ordering::Acquire)
    }

    pub fn is_tailer(&self, pid: u32) -> bool {
        let t = self.tid.load(Ordering::Acquire);
        t != 0 && t as u32 == pid
    }

    pub fn io(&self, db: &str) -> Io {
        self.map.lock().unwrap().get(db).map_or(Io::Off, Tail::io)
    }

    /// All databases and how they are served (for status).
    pub fn modes(&self) -> Vec<(String, Io)> {
        let m = self.map.lock().unwrap();
        let mut v: Vec<_> = m.iter().map(|(k, t)| (k.clone(), t.io())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// May this open be served by the kernel? An open while the database
    /// changes hands waits for the outcome (the inode's passthrough and
    /// daemon opens cannot be mixed): the tailer's own open of the main file
    /// is what starts [`Io::Arming`], and no request of the mount is needed
    /// to finish it.
    pub fn kernel_io(&self, class: &PathClass, pid: u32) -> bool {
        let Some((db, main)) = db_of(class) else {
            return false;
        };
        let tailer = self.is_tailer(pid);
        let deadline = Instant::now() + SETTLE_WAIT;
        let mut m = self.map.lock().unwrap();
        loop {
            let t = m.entry(db.to_string()).or_default();
            match t.io() {
                Io::Armed | Io::Locked => return true,
                Io::Off if tailer && main && t.arming => {
                    t.io = Some(Io::Arming);
                    return true;
                }
                Io::Arming if tailer => return main,
                Io::Off => return false,
                Io::Arming | Io::Draining => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() || !self.take_wait_slot() {
                        return false;
                    }
                    m = self.settled.wait_timeout(m, left).unwrap().0;
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    fn take_wait_slot(&self) -> bool {
        let slots = self.max_waiting.load(Ordering::Acquire);
        self.waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < slots).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn opened(&self, class: &PathClass, fh: u64, kernel: bool, own: bool) {
        let Some((db, _)) = db_of(class) else {
            return;
        };
        let mut m = self.map.lock().unwrap();
        let t = m.entry(db.to_string()).or_default();
        if !kernel {
            t.daemon.insert(fh);
        } else if own {
            t.own.insert(fh);
        } else {
            t.clients.insert(fh);
        }
    }

    pub fn released(&self, class: &PathClass, fh: u64) {
        let Some((db, _)) = db_of(class) else {
            return;
        };
        let mut m = self.map.lock().unwrap();
        if let Some(t) = m.get_mut(db) {
            t.clients.remove(&fh);
            t.own.remove(&fh);
            t.daemon.remove(&fh);
        }
    }

    /// Stops passthrough writers before the node stops being primary: each
    /// armed database's write lock is taken (waiting at most [`WRITER_WAIT`]
    /// for a transaction in progress), then `final_tail` captures what they
    /// committed, and the database stays locked until its clients close.
    pub fn stop_writers(&self, final_tail: &dyn Fn(&str)) {
        self.writers.store(false, Ordering::Release);
        let armed: Vec<(String, Option<Arc<File>>)> = {
            let m = self.map.lock().unwrap();
            m.iter()
                .filter(|(_, t)| t.io() == Io::Armed)
                .map(|(k, t)| (k.clone(), t.shm.clone()))
                .collect()
        };
        for (db, shm) in armed {
            let deadline = Instant::now() + WRITER_WAIT;
            let locked = shm.as_ref().is_some_and(|shm| loop {
                match ofd_lock(shm, libc::F_WRLCK, SHM_WRITE, 1) {
                    Ok(()) => break true,
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(e) => {
                        tracing::error!(db = %db, error = %e,
                            "a client kept a write transaction open past the role change; \
                             its commit will be captured as this node's last");
                        break false;
                    }
                }
            });
            final_tail(&db);
            if let Some(shm) = &shm {
                let _ = ofd_lock(shm, libc::F_UNLCK, SHM_READ1, 1);
            }
            let mut m = self.map.lock().unwrap();
            if let Some(t) = m.get_mut(&db) {
                t.pinned = false;
                t.write_locked = locked;
                t.io = Some(Io::Locked);
                if let (true, Some(shm)) = (locked, &shm) {
                    lend_write_lock(shm, true);
                }
            }
            drop(m);
            self.show(&db, Io::Locked);
            tracing::info!(db = %db, "not primary: clients served by the kernel can no longer write");
        }
    }

    /// The node became primary: locked databases take writes again (pinned
    /// first, so nothing they commit can be checkpointed away unread).
    pub fn start_writers(&self) {
        let mut m = self.map.lock().unwrap();
        for (db, t) in m.iter_mut() {
            if t.io() != Io::Locked {
                continue;
            }
            let Some(shm) = t.shm.clone() else { continue };
            match ofd_lock(&shm, libc::F_RDLCK, SHM_READ1, 1) {
                Ok(()) => t.pinned = true,
                Err(e) => {
                    tracing::warn!(db = %db, error = %e, "cannot pin the WAL; writers stay locked out");
                    continue;
                }
            }
            if t.write_locked {
                lend_write_lock(&shm, false);
                let _ = ofd_lock(&shm, libc::F_UNLCK, SHM_WRITE, 1);
                t.write_locked = false;
            }
            t.io = Some(Io::Armed);
            self.show(db, Io::Armed);
        }
        self.writers.store(true, Ordering::Release);
    }

    /// One round of the tailer for `db`: arm it when it can be, leave the
    /// locked state when its clients are gone. Returns whether `db` is
    /// armed (its commits must be tailed).
    pub fn step(&self, db: &str, wal_mode: impl Fn() -> bool) -> bool {
        let (io, clients, own, daemon, next_try) = {
            let mut m = self.map.lock().unwrap();
            let t = m.entry(db.to_string()).or_default();
            (
                t.io(),
                t.clients.len(),
                t.own.len(),
                t.daemon.len(),
                t.next_try,
            )
        };
        match io {
            Io::Armed => true,
            Io::Off if self.writers_allowed() && !self.paused() => {
                if daemon > 0 || next_try.is_some_and(|t| Instant::now() < t) || !wal_mode() {
                    return false;
                }
                self.arm(db, &wal_mode)
            }
            Io::Locked if clients == 0 => {
                tracing::info!(db = %db, "the last client served by the kernel closed: the database goes back to the daemon's path");
                self.set_io(db, Io::Draining);
                if let Some(f) = self.close_own.get() {
                    f(db);
                }
                let guard = self
                    .map
                    .lock()
                    .unwrap()
                    .get_mut(db)
                    .and_then(|t| t.guard.take());
                drop(guard); // a RELEASE through the mount: no lock held here
                false
            }
            Io::Draining if own == 0 => {
                let shm = {
                    let mut m = self.map.lock().unwrap();
                    let t = m.get_mut(db).expect("entry exists");
                    if t.write_locked {
                        if let Some(s) = &t.shm {
                            lend_write_lock(s, false);
                            let _ = ofd_lock(s, libc::F_UNLCK, SHM_WRITE, 1);
                        }
                        t.write_locked = false;
                    }
                    t.io = Some(Io::Off);
                    t.shm.take()
                };
                self.settled.notify_all();
                self.show(db, Io::Off);
                drop(shm);
                tracing::debug!(db = %db, "on the daemon's path again");
                false
            }
            _ => false,
        }
    }

    /// The model test (src/replica/model/) has no mount: a database is
    /// armed on its files directly (the same locks: its clients run in this
    /// process, and their POSIX locks conflict with these OFD locks as any
    /// other process's would) and let go as the tailer thread would once its
    /// clients closed.
    #[cfg(test)]
    pub fn model_tick(&self, db: &str, dir: &Path) {
        match self.io(db) {
            Io::Off if self.writers_allowed() => {
                let Ok(guard) = OpenOptions::new().read(true).write(true).open(dir.join(db)) else {
                    return;
                };
                let mut b = [0u8; 20];
                use std::os::unix::fs::FileExt;
                if !guard.read_at(&mut b, 0).is_ok_and(|n| n == 20) || b[18] != 2 || b[19] != 2 {
                    return;
                }
                if ofd_lock(&guard, libc::F_RDLCK, DB_SHARED_FIRST, DB_SHARED_SIZE).is_err() {
                    return;
                }
                let Ok(shm) = open_shm(dir, db) else { return };
                if ofd_lock(&shm, libc::F_RDLCK, SHM_READ1, 1).is_err() {
                    return;
                }
                self.set_armed(db, guard, shm);
            }
            Io::Locked => {
                let (guard, shm) = {
                    let mut m = self.map.lock().unwrap();
                    let t = m.get_mut(db).expect("locked, so known");
                    t.io = Some(Io::Off);
                    t.write_locked = false;
                    (t.guard.take(), t.shm.take())
                };
                if let Some(s) = &shm {
                    lend_write_lock(s, false);
                }
                drop((guard, shm));
            }
            _ => {}
        }
    }

    fn set_io(&self, db: &str, io: Io) {
        self.map
            .lock()
            .unwrap()
            .entry(db.to_string())
            .or_default()
            .io = Some(io);
        self.settled.notify_all();
        self.show(db, io);
    }

    /// Arming failed. A guard opened in passthrough keeps the inode's mode
    /// until its release is answered, so opens wait ([`Io::Draining`]) till
    /// then rather than be refused.
    fn retry_later(&self, db: &str, guard: Option<File>) {
        let io = {
            let mut m = self.map.lock().unwrap();
            let t = m.entry(db.to_string()).or_default();
            t.arming = false;
            t.next_try = Some(Instant::now() + RETRY);
            let io = match t.own.is_empty() {
                true => Io::Off,
                false => Io::Draining,
            };
            t.io = Some(io);
            io
        };
        self.settled.notify_all();
        self.show(db, io);
        drop(guard);
    }

    /// Guard, then pin, then passthrough. The wal-index is opened first:
    /// the guard's open is the tailer's last request of its own mount, since
    /// clients' opens wait while the database is arming and may take every
    /// FUSE thread. No lock of ours is held across an open through the
    /// mount: the FUSE threads answering it take them.
    fn arm(&self, db: &str, wal_mode: &dyn Fn() -> bool) -> bool {
        let Some(mount) = self.mount.get() else {
            return false;
        };
        let shm = match open_shm(mount, db) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(db, error = %e, "cannot open the wal-index to pin the WAL");
                self.retry_later(db, None);
                return false;
            }
        };
        self.map
            .lock()
            .unwrap()
            .entry(db.to_string())
            .or_default()
            .arming = true;
        let guard = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(mount.join(db));
        let guard = match guard {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(db, error = %e, "cannot open the database for the guard");
                self.retry_later(db, None);
                return false;
            }
        };
        // A client opened it on the daemon's path first: the inode takes
        // no passthrough open until that client closes.
        let in_passthrough = {
            let mut m = self.map.lock().unwrap();
            let t = m.entry(db.to_string()).or_default();
            t.arming = false;
            t.io() == Io::Arming && !t.own.is_empty()
        };
        if !in_passthrough {
            self.retry_later(db, Some(guard));
            return false;
        }
        self.show(db, Io::Arming);
        if ofd_lock(&guard, libc::F_RDLCK, DB_SHARED_FIRST, DB_SHARED_SIZE).is_err() || !wal_mode()
        {
            self.retry_later(db, Some(guard));
            return false;
        }
        if let Err(e) = pin(&shm) {
            tracing::warn!(db, error = %e, "cannot pin the WAL");
            self.retry_later(db, Some(guard));
            return false;
        }
        self.set_armed(db, guard, shm);
        tracing::info!(
            db,
            "served by the kernel: commits are captured from the WAL"
        );
        true
    }

    /// Guarded and pinned: opens of `db` may pass through from now on.
    fn set_armed(&self, db: &str, guard: File, shm: File) {
        {
            let mut m = self.map.lock().unwrap();
            let t = m.entry(db.to_string()).or_default();
            t.guard = Some(Arc::new(guard));
            t.shm = Some(Arc::new(shm));
            t.pinned = true;
            t.io = Some(Io::Armed);
        }
        self.settled.notify_all();
        self.show(db, Io::Armed);
    }

    /// After the tailer caught up with a long WAL: checkpoint it and start
    /// it over, as SQLite's auto-checkpoint would (the pin keeps clients'
    /// checkpoints from restarting it). Writers are held off throughout, so
    /// `catch_up` reads the last frames before they move into the main file;
    /// the pin is let go for the checkpoint, which waits for readers.
    pub fn checkpoint(&self, db: &str, conn: &rusqlite::Connection, catch_up: &dyn Fn() -> bool) {
        let shm = {
            let m = self.map.lock().unwrap();
            match m.get(db) {
                Some(t) if t.io() == Io::Armed => t.shm.clone(),
                _ => None,
            }
        };
        let Some(shm) = shm else { return };
        if ofd_lock(&shm, libc::F_WRLCK, SHM_WRITE, 1).is_err() {
            return; // a write transaction is open: next time
        }
        if catch_up() {
            lend_write_lock(&shm, true);
            let _ = ofd_lock(&shm, libc::F_UNLCK, SHM_READ1, 1);
            let res: rusqlite::Result<(i64, i64, i64)> =
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                });
            if let Err(e) = pin(&shm) {
                tracing::warn!(db, error = %e, "cannot pin the WAL again");
            }
            lend_write_lock(&shm, false);
            match res {
                Ok((0, _, _)) => tracing::debug!(db, "WAL checkpointed and truncated"),
                Ok(_) => tracing::debug!(db, "WAL checkpoint postponed: a reader is behind"),
                Err(e) => tracing::warn!(db, error = %e, "WAL checkpoint failed"),
            }
        }
        let _ = ofd_lock(&shm, libc::F_UNLCK, SHM_WRITE, 1);
    }

    /// Holds every writer and checkpointer of `db` off while `f` runs (a
    /// resync reads the main file and the WAL as one state).
    pub fn frozen<T>(&self, db: &str, f: impl FnOnce() -> T) -> T {
        let shm = self.map.lock().unwrap().get(db).and_then(|t| t.shm.clone());
        let Some(shm) = shm else { return f() };
        // Bytes 120 and 121: the write and checkpoint locks.
        let _ = ofd_lock_wait(&shm, libc::F_WRLCK, SHM_WRITE, 2);
        let out = f();
        let _ = ofd_lock(&shm, libc::F_UNLCK, SHM_WRITE, 2);
        out
    }
}

/// The WAL size past which the tailer checkpoints (SQLite's default
/// auto-checkpoint: 1,000 pages).
const CHECKPOINT_BYTES: u64 = 4 << 20;

/// What the tailer needs of capture.
pub trait Tailed: Send + Sync + 'static {
    /// The databases to look after.
    fn databases(&self) -> Vec<String>;
    /// Whether the backing database is in WAL mode now.
    fn wal_mode(&self, db: &str) -> bool;
    /// Capture what was committed since the last call; true when caught up
    /// with the file (false: an error, logged).
    fn tail(&self, db: &str) -> bool;
    /// The size of the backing `-wal`.
    fn wal_len(&self, db: &str) -> u64;
    /// How long since the last transaction was captured (None: none yet).
    fn since_last_commit(&self) -> Option<Duration>;
}

/// Starts the tailer thread: every [`TICK`], each database is armed when it
/// can be, its new commits are captured, and a long WAL is checkpointed.
pub fn spawn(tails: Arc<Tails>, capture: Arc<dyn Tailed>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("wal-tailer".into())
        .spawn(move || {
            // SAFETY: gettid has no preconditions and cannot fail.
            tails.tid.store(unsafe { libc::gettid() }, Ordering::Release);
            let mut conns: HashMap<String, rusqlite::Connection> = HashMap::new();
            loop {
                if tails.paused() {
                    conns.clear();
                    tails.let_go();
                    std::thread::sleep(TICK);
                    continue;
                }
                for db in capture.databases() {
                    let armed = tails.step(&db, || capture.wal_mode(&db));
                    if !armed {
                        conns.remove(&db);
                        continue;
                    }
                    if !tails.writers_allowed() || !capture.tail(&db) {
                        continue;
                    }
                    if capture.wal_len(&db) < CHECKPOINT_BYTES {
                        continue;
                    }
                    if !conns.contains_key(&db) {
                        match checkpointer(tails.mount.get(), &db) {
                            Ok(c) => {
                                conns.insert(db.clone(), c);
                            }
                            Err(e) => {
                                tracing::warn!(db, error = %e, "cannot open the database to checkpoint it");
                                continue;
                            }
                        }
                    }
                    tails.checkpoint(&db, &conns[&db], &|| capture.tail(&db));
                }
                let busy = capture.since_last_commit().is_some_and(|d| d < BUSY_FOR);
                std::thread::sleep(if busy { TICK } else { IDLE_TICK });
            }
        })?;
    Ok(())
}

fn checkpointer(mount: Option<&PathBuf>, db: &str) -> rusqlite::Result<rusqlite::Connection> {
    let path = mount.map(|m| m.join(db)).unwrap_or_default();
    let c = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    c.busy_timeout(Duration::from_millis(200))?;
    // Never checkpoints on its own (at close, say): only under the write lock.
    c.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )?;
    c.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(c)
}

/// The `-shm` through the mount, created (with the database's owner and
/// mode, as SQLite would) if no client has yet.
fn open_shm(mount: &Path, db: &str) -> std::io::Result<File> {
    let path = mount.join(format!("{db}-shm"));
    let meta = std::fs::metadata(mount.join(db))?;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(meta.mode() & 0o666)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)?;
    let st = f.metadata()?;
    if st.uid() != meta.uid() || st.gid() != meta.gid() {
        std::os::unix::fs::fchown(&f, Some(meta.uid()), Some(meta.gid()))?;
    }
    Ok(f)
}

/// The pin: a read lock on read-mark 1. Waits out a writer restarting the
/// WAL (it holds every read-mark lock for a moment).
fn pin(shm: &File) -> std::io::Result<()> {
    ofd_lock_wait(shm, libc::F_RDLCK, SHM_READ1, 1)
}

fn flock(typ: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = typ as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = start;
    fl.l_len = len;
    fl
}

/// An open-file-description lock: owned by this open of the file, not by
/// the process, so the daemon's other opens (the view applier's SQLite)
/// neither drop it when they close nor share it.
fn ofd_lock(f: &File, typ: i32, start: i64, len: i64) -> std::io::Result<()> {
    let fl = flock(typ, start, len);
    // SAFETY: F_OFD_SETLK reads the flock we pass, valid for the call.
    match unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) } {
        -1 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

fn ofd_lock_wait(f: &File, typ: i32, start: i64, len: i64) -> std::io::Result<()> {
    let fl = flock(typ, start, len);
    loop {
        // SAFETY: F_OFD_SETLKW reads the flock we pass, valid for the call.
        match unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLKW, &fl) } {
            -1 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            _ => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_while(io: Io, then: Io) -> (bool, Duration) {
        let tails = Arc::new(Tails::default());
        tails.max_waiting.store(3, Ordering::Release);
        tails.set_io("a.db", io);
        let t = tails.clone();
        let opener = std::thread::spawn(move || {
            let t0 = Instant::now();
            let k = t.kernel_io(&PathClass::Database("a.db".into()), 4242);
            (k, t0.elapsed())
        });
        std::thread::sleep(Duration::from_millis(100));
        tails.set_io("a.db", then);
        opener.join().unwrap()
    }

    /// CI failure: a client opening the database while the tailer armed it
    /// was answered EBUSY (SQLite: "unable to open database file"), since
    /// the guard's open was already a passthrough one.
    #[test]
    fn an_open_while_arming_waits_for_the_outcome() {
        let (kernel, waited) = open_while(Io::Arming, Io::Armed);
        assert!(kernel, "armed: the client is served by the kernel too");
        assert!(waited >= Duration::from_millis(80), "{waited:?}");
        let (kernel, _) = open_while(Io::Arming, Io::Off);
        assert!(!kernel, "arming failed: the daemon's path");
    }

    /// The tailer's own open of the main file is what starts arming; a
    /// client's open before it takes the daemon's path (and arming waits).
    #[test]
    fn only_the_tailers_open_of_the_main_file_starts_arming() {
        let tails = Tails::default();
        let main = PathClass::Database("a.db".into());
        tails
            .map
            .lock()
            .unwrap()
            .entry("a.db".into())
            .or_default()
            .arming = true;
        assert!(!tails.kernel_io(&main, 4242));
        assert_eq!(tails.io("a.db"), Io::Off);
        tails.tid.store(77, Ordering::Release);
        let wal = PathClass::Sidecar("a.db".into(), Sidecar::Wal);
        assert!(!tails.kernel_io(&wal, 77));
        assert!(tails.kernel_io(&main, 77));
        assert_eq!(tails.io("a.db"), Io::Arming);
    }

    /// With every slot taken, an open does not wait: a FUSE thread must be
    /// left to answer the releases that end draining.
    #[test]
    fn opens_wait_only_while_a_fuse_thread_is_left() {
        let tails = Tails::default();
        tails.set_io("a.db", Io::Draining);
        let t0 = Instant::now();
        assert!(!tails.kernel_io(&PathClass::Database("a.db".into()), 4242));
        assert!(t0.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn an_open_while_draining_waits_for_the_daemons_path() {
        let (kernel, waited) = open_while(Io::Draining, Io::Off);
        assert!(!kernel);
        assert!(waited >= Duration::from_millis(80), "{waited:?}");
    }
}
