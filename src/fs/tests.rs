//! The open path's decisions, without a mount: a real backing directory, a
//! replication that records what it is told and answers as the test says,
//! and backing files "registered" by a counter (there is no `/dev/fuse`).

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use fuser::Errno;

use super::class::{Classifier, PathClass};
use super::inode::ROOT;
use super::iomode::IoStats;
use super::virt::{self, VirtualFiles, VIRT_DIR_INO};
use super::{sys, Caller, Open, PassthroughFs, Replication};

const ROOT_CALLER: Caller = Caller {
    pid: 4242,
    uid: 0,
    gid: 0,
};

/// Answers as a role would, recording every question and report in order.
#[derive(Default)]
struct Recorder {
    calls: Mutex<Vec<String>>,
    /// check_write (and so check_create) answers EROFS, as a secondary does.
    refuse_writes: AtomicBool,
    /// kernel_io's answer...
    kernel_io: AtomicBool,
    /// ...unless answers are queued here.
    answers: Mutex<std::collections::VecDeque<bool>>,
}

impl Recorder {
    fn log(&self, s: String) {
        self.calls.lock().unwrap().push(s);
    }
    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl Replication for Recorder {
    fn check_write(&self, c: &PathClass, pid: u32) -> Result<(), i32> {
        self.log(format!("check_write {} {pid}", c.label()));
        match self.refuse_writes.load(Ordering::SeqCst) {
            true => Err(libc::EROFS),
            false => Ok(()),
        }
    }
    fn before_write(&self, c: &PathClass, offset: u64, len: u64) -> Result<(), i32> {
        self.log(format!("before_write {} {offset} {len}", c.label()));
        Ok(())
    }
    fn written(&self, c: &PathClass, offset: u64, len: u64) -> Result<(), i32> {
        self.log(format!("written {} {offset} {len}", c.label()));
        Ok(())
    }
    fn truncated(&self, c: &PathClass, len: u64) -> Result<(), i32> {
        self.log(format!("truncated {} {len}", c.label()));
        Ok(())
    }
    fn removed(&self, c: &PathClass) -> Result<(), i32> {
        self.log(format!("removed {}", c.label()));
        Ok(())
    }
    fn replaced(&self, c: &PathClass) -> Result<(), i32> {
        self.log(format!("replaced {}", c.label()));
        Ok(())
    }
    fn synced(&self, c: &PathClass) -> Result<(), i32> {
        self.log(format!("synced {}", c.label()));
        Ok(())
    }
    fn kernel_io(&self, c: &PathClass, pid: u32) -> bool {
        self.log(format!("kernel_io {} {pid}", c.label()));
        let queued = self.answers.lock().unwrap().pop_front();
        queued.unwrap_or_else(|| self.kernel_io.load(Ordering::SeqCst))
    }
    fn opened(&self, c: &PathClass, _fh: u64, pid: u32, kernel: bool) {
        self.log(format!("opened {} {pid} kernel={kernel}", c.label()));
    }
    fn released(&self, c: &PathClass, _fh: u64) {
        self.log(format!("released {}", c.label()));
    }
}

struct Status;

impl VirtualFiles for Status {
    fn names(&self) -> &'static [&'static str] {
        &["status.json"]
    }
    fn content(&self, name: &str) -> Option<Vec<u8>> {
        (name == "status.json").then(|| b"{\"role\":\"primary\"}\n".to_vec())
    }
}

/// A registered backing file: which registration it was.
#[derive(Debug, PartialEq, Eq)]
struct Backing(usize);

struct Fixture {
    dir: tempfile::TempDir,
    repl: Arc<Recorder>,
    fs: PassthroughFs<Backing>,
    registered: AtomicUsize,
}

/// `claude-mem.db` (replicated) and `app.log` (local), 4 bytes each.
fn fixture(passthrough: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("claude-mem.db"), b"data").unwrap();
    std::fs::write(dir.path().join("app.log"), b"logs").unwrap();
    let root = sys::open_dir_path(dir.path()).unwrap();
    let repl = Arc::new(Recorder::default());
    let io = Arc::new(IoStats::default());
    match passthrough {
        true => io.set_on(),
        false => io.set_off("test"),
    }
    let fs = PassthroughFs::new(
        root,
        Classifier::new(&["claude-mem.db".into()], &[]),
        Arc::new(Status),
        repl.clone(),
        passthrough,
        io,
    )
    .unwrap();
    Fixture {
        dir,
        repl,
        fs,
        registered: AtomicUsize::new(0),
    }
}

impl Fixture {
    fn ino(&self, name: &str) -> u64 {
        let (attr, _) = self.fs.lookup(ROOT, OsStr::new(name)).unwrap();
        assert_ne!(attr.ino.0, 0, "{name} exists");
        attr.ino.0
    }

    fn register(&self) -> impl FnOnce(&OwnedFd) -> std::io::Result<Backing> + '_ {
        |_| Ok(Backing(self.registered.fetch_add(1, Ordering::SeqCst)))
    }

    fn open(&self, caller: Caller, name: &str, flags: i32) -> Result<Open<Backing>, Errno> {
        self.fs.open(caller, self.ino(name), flags, self.register())
    }

    fn release(&self, name: &str, open: Open<Backing>, flags: i32) {
        let fh = match open {
            Open::Kernel { fh, .. } | Open::Daemon { fh, .. } => fh,
        };
        self.fs.release(self.ino(name), fh, flags).unwrap();
    }

    fn content(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join(name)).unwrap()
    }
}

fn is_kernel(o: &Result<Open<Backing>, Errno>) -> bool {
    matches!(o, Ok(Open::Kernel { .. }))
}

fn is_daemon(o: &Result<Open<Backing>, Errno>) -> bool {
    matches!(o, Ok(Open::Daemon { .. }))
}

#[test]
fn a_local_path_opens_on_the_kernels_path_when_passthrough_is_on() {
    let f = fixture(true);
    let o = f.open(ROOT_CALLER, "app.log", libc::O_RDWR);
    assert!(is_kernel(&o));
    // A second open of the inode shares its backing file.
    let o2 = f.open(ROOT_CALLER, "app.log", libc::O_RDONLY);
    match (&o, &o2) {
        (Ok(Open::Kernel { backing: a, .. }), Ok(Open::Kernel { backing: b, .. })) => {
            assert_eq!(**a, Backing(0));
            assert!(Arc::ptr_eq(a, b));
        }
        _ => panic!("both in passthrough"),
    }
    assert_eq!(f.registered.load(Ordering::SeqCst), 1);
    f.release("app.log", o.unwrap(), libc::O_RDWR);
    f.release("app.log", o2.unwrap(), libc::O_RDONLY);
    // Replication hears nothing of local paths.
    assert_eq!(f.repl.calls(), Vec::<String>::new());

    let off = fixture(false);
    let o = off.open(ROOT_CALLER, "app.log", libc::O_RDWR);
    assert!(is_daemon(&o), "passthrough off: the daemon's path");
    assert_eq!(off.registered.load(Ordering::SeqCst), 0);
}

#[test]
fn a_replicated_database_goes_to_the_daemon_unless_replication_says_kernel() {
    let f = fixture(true);
    let o = f.open(ROOT_CALLER, "claude-mem.db", libc::O_RDWR);
    assert!(is_daemon(&o));
    f.release("claude-mem.db", o.unwrap(), libc::O_RDWR);
    assert_eq!(
        f.repl.calls(),
        [
            "kernel_io replicated-database 4242",
            "opened replicated-database 4242 kernel=false",
            "released replicated-database",
            "synced replicated-database",
        ]
    );

    f.repl.kernel_io.store(true, Ordering::SeqCst);
    let o = f.open(ROOT_CALLER, "claude-mem.db", libc::O_RDONLY);
    assert!(is_kernel(&o));
    assert_eq!(
        f.repl.calls(),
        [
            "kernel_io replicated-database 4242",
            "opened replicated-database 4242 kernel=true",
        ]
    );
    // Every release is reported; a read-only one syncs nothing.
    f.release("claude-mem.db", o.unwrap(), libc::O_RDONLY);
    assert_eq!(f.repl.calls(), ["released replicated-database"]);

    // Its `-wal` is asked about as the database's sidecar.
    f.repl.kernel_io.store(false, Ordering::SeqCst);
    std::fs::write(f.dir.path().join("claude-mem.db-wal"), b"").unwrap();
    let o = f.open(ROOT_CALLER, "claude-mem.db-wal", libc::O_RDWR);
    assert!(is_daemon(&o));
    assert_eq!(
        f.repl.calls(),
        [
            "kernel_io database-sidecar 4242",
            "opened database-sidecar 4242 kernel=false",
        ]
    );
}

#[test]
fn a_truncating_open_on_a_refused_role_is_refused_before_anything_is_truncated() {
    let f = fixture(true);
    f.repl.refuse_writes.store(true, Ordering::SeqCst);
    let o = f.open(ROOT_CALLER, "claude-mem.db", libc::O_WRONLY | libc::O_TRUNC);
    assert_eq!(o.err(), Some(Errno::EROFS));
    assert_eq!(f.content("claude-mem.db"), b"data");
    assert_eq!(f.repl.calls(), ["check_write replicated-database 4242"]);

    f.repl.refuse_writes.store(false, Ordering::SeqCst);
    f.repl.calls();
    let o = f.open(ROOT_CALLER, "claude-mem.db", libc::O_WRONLY | libc::O_TRUNC);
    assert!(is_daemon(&o));
    assert_eq!(f.content("claude-mem.db"), b"");
    assert_eq!(
        f.repl.calls()[..3],
        [
            "check_write replicated-database 4242",
            format!("before_write replicated-database 0 {}", u64::MAX).as_str(),
            "truncated replicated-database 0",
        ]
    );
}

#[test]
fn an_inode_open_in_passthrough_refuses_a_daemon_path_open_with_ebusy() {
    let f = fixture(true);
    f.repl.kernel_io.store(true, Ordering::SeqCst);
    let kernel = f.open(ROOT_CALLER, "claude-mem.db", libc::O_RDWR);
    assert!(is_kernel(&kernel));
    f.repl.kernel_io.store(false, Ordering::SeqCst);
    f.repl.calls();
    let o = f.open(ROOT_CALLER, "claude-mem.db", libc::O_RDWR);
    assert_eq!(o.err(), Some(Errno::EBUSY));
    // Asked twice (the second answer waits for a database changing hands);
    // refused opens are not reported as opened.
    assert_eq!(
        f.repl.calls(),
        [
            "kernel_io replicated-database 4242",
            "kernel_io replicated-database 4242"
        ]
    );
    f.release("claude-mem.db", kernel.unwrap(), libc::O_RDWR);
    // Once it closed, the daemon's path is open to it again.
    let o = f.open(ROOT_CALLER, "claude-mem.db", libc::O_RDWR);
    assert!(is_daemon(&o));
}

/// CI failure: a client asked while the database was not yet armed, and
/// the tailer's guard opened in passthrough before the client's answer was
/// recorded. Asked again, it joins the passthrough opens.
#[test]
fn an_open_that_lost_a_race_with_arming_asks_again() {
    let f = fixture(true);
    f.repl.kernel_io.store(true, Ordering::SeqCst);
    let guard = f.open(ROOT_CALLER, "claude-mem.db", libc::O_RDWR);
    assert!(is_kernel(&guard));
    f.repl.answers.lock().unwrap().extend([false, true]);
    f.repl.calls();
    let o = f.open(ROOT_CALLER, "claude-mem.db", libc::O_RDWR);
    assert!(is_kernel(&o), "{:?}", o.err());
    assert_eq!(f.registered.load(Ordering::SeqCst), 1, "one backing file");
    assert_eq!(
        f.repl.calls(),
        [
            "kernel_io replicated-database 4242",
            "kernel_io replicated-database 4242",
            "opened replicated-database 4242 kernel=true",
        ]
    );
}

#[test]
fn a_set_id_file_opened_by_a_user_stays_on_the_daemons_path() {
    use std::os::unix::fs::PermissionsExt;
    let f = fixture(true);
    let path = f.dir.path().join("app.log");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o4755)).unwrap();
    let user = Caller {
        pid: 7,
        uid: 1000,
        gid: 1000,
    };
    // The kernel would write it with the daemon's credentials, leaving the bit.
    assert!(is_daemon(&f.open(user, "app.log", libc::O_RDONLY)));
}

#[test]
fn create_on_a_role_that_may_create_but_not_write_does_not_truncate() {
    struct CreateOnly(Recorder);
    impl Replication for CreateOnly {
        fn check_create(&self, _: &PathClass, _: u32) -> Result<(), i32> {
            Ok(())
        }
        fn check_write(&self, c: &PathClass, pid: u32) -> Result<(), i32> {
            self.0.check_write(c, pid)
        }
        fn written(&self, c: &PathClass, o: u64, l: u64) -> Result<(), i32> {
            self.0.written(c, o, l)
        }
        fn truncated(&self, c: &PathClass, l: u64) -> Result<(), i32> {
            self.0.truncated(c, l)
        }
        fn removed(&self, c: &PathClass) -> Result<(), i32> {
            self.0.removed(c)
        }
        fn replaced(&self, c: &PathClass) -> Result<(), i32> {
            self.0.replaced(c)
        }
        fn synced(&self, c: &PathClass) -> Result<(), i32> {
            self.0.synced(c)
        }
    }
    let f = fixture(true);
    let repl = Arc::new(CreateOnly(Recorder::default()));
    repl.0.refuse_writes.store(true, Ordering::SeqCst);
    let fs = PassthroughFs::<Backing>::new(
        sys::open_dir_path(f.dir.path()).unwrap(),
        Classifier::new(&["claude-mem.db".into()], &[]),
        Arc::new(Status),
        repl.clone(),
        true,
        f.fs.io.clone(),
    )
    .unwrap();
    let (attr, o) = fs
        .create(
            ROOT_CALLER,
            ROOT,
            OsStr::new("claude-mem.db"),
            0o644,
            libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
            f.register(),
        )
        .unwrap();
    assert_eq!(attr.size, 4);
    assert!(matches!(o, Open::Daemon { .. }));
    assert_eq!(f.content("claude-mem.db"), b"data");

    // The default role gate refuses the create itself: nothing is made.
    f.repl.refuse_writes.store(true, Ordering::SeqCst);
    let name = OsStr::new("claude-mem.db-wal");
    let r = f.fs.create(
        ROOT_CALLER,
        ROOT,
        name,
        0o644,
        libc::O_RDWR | libc::O_CREAT,
        f.register(),
    );
    assert_eq!(r.err(), Some(Errno::EROFS));
    assert!(!f.dir.path().join(name).exists());

    // An old tool's download next to the database is a write of the
    // database, refused before it starts.
    f.repl.calls();
    let name = OsStr::new("tmpk2j_x.db.tmp");
    let r = f.fs.create(
        ROOT_CALLER,
        ROOT,
        name,
        0o600,
        libc::O_RDWR | libc::O_CREAT,
        f.register(),
    );
    assert_eq!(r.err(), Some(Errno::EROFS));
    assert!(!f.dir.path().join(name).exists());
    assert_eq!(f.repl.calls(), ["check_write replicated-database 4242"]);
}

#[test]
fn the_membridge_directory_is_virtual_and_read_only() {
    let f = fixture(true);
    let (dir, _) = f.fs.lookup(ROOT, OsStr::new(virt::DIR_NAME)).unwrap();
    assert_eq!(dir.ino.0, VIRT_DIR_INO);
    let (file, _) =
        f.fs.lookup(VIRT_DIR_INO, OsStr::new("status.json"))
            .unwrap();
    let ino = file.ino.0;
    let w = f.fs.open(ROOT_CALLER, ino, libc::O_WRONLY, f.register());
    assert_eq!(w.err(), Some(Errno::EROFS));
    let Ok(Open::Daemon { fh, flags }) = f.fs.open(ROOT_CALLER, ino, libc::O_RDONLY, f.register())
    else {
        panic!("a virtual file is served by the daemon");
    };
    assert!(flags.contains(fuser::FopenFlags::FOPEN_DIRECT_IO));
    assert_eq!(
        f.fs.read(ino, fh, 0, 100).unwrap(),
        b"{\"role\":\"primary\"}\n"
    );
    f.fs.release(ino, fh, libc::O_RDONLY).unwrap();
    assert_eq!(f.fs.read(ino, fh, 0, 100).err(), Some(Errno::EBADF));
    // Nothing real takes its name.
    let c = f.fs.create(
        ROOT_CALLER,
        ROOT,
        OsStr::new(virt::DIR_NAME),
        0o644,
        libc::O_RDWR | libc::O_CREAT,
        f.register(),
    );
    assert_eq!(c.err(), Some(Errno::EACCES));
    assert_eq!(f.registered.load(Ordering::SeqCst), 0);
    assert_eq!(f.repl.calls(), Vec::<String>::new());
}
